//! The few small HTML pages a browser sees (the callback's result). Never a token.

use crate::broker::{ConnectionState, ConnectionStatus};

/// A complete page with a title and one paragraph; both are escaped here.
pub fn page(title: &str, message: &str) -> String {
    let message = format!("<p>{}</p>", html_escape::encode_text(message));
    document(title, &message)
}

/// A page with a title, a paragraph and a link back to the status page (a same-site
/// navigation, so the admin's session cookie goes with it).
pub fn page_back(title: &str, message: &str) -> String {
    let message = format!(
        "<p>{}</p><p><a class=\"button\" href=\"/api/connections\">Back to the connections</a></p>",
        html_escape::encode_text(message)
    );
    document(title, &message)
}

/// One connection on the status page, with its links.
pub struct Card<'a> {
    pub status: &'a ConnectionStatus,
    /// Where an admin (re)connects it: no key in it (the session cookie admits the admin).
    pub authorize_url: &'a str,
    /// What a pipeline's Web activity calls.
    pub refresh_url: &'a str,
}

fn time(t: Option<chrono::DateTime<chrono::Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "–".into())
}

/// The state in plain words: a label, a CSS class and a sentence.
fn state_words(status: &ConnectionStatus) -> (&'static str, &'static str, String) {
    let error = status.last_error.as_deref().unwrap_or("");
    match status.state {
        ConnectionState::Connected => (
            "Connected",
            "ok",
            "Pipelines get tokens from it.".to_owned(),
        ),
        ConnectionState::ConsentRequired if status.consented_at.is_none() => (
            "Not connected yet",
            "bad",
            "An admin has to connect it once: use the button below.".to_owned(),
        ),
        ConnectionState::ConsentRequired => (
            "Needs reconnecting",
            "bad",
            format!("The provider no longer accepts its grant{}. An admin has to connect it again.",
                if error.is_empty() { String::new() } else { format!(" ({error})") }),
        ),
        ConnectionState::Failing => (
            "Failing",
            "warn",
            format!("The last refresh failed: {error}. Tokens still valid are served; it is tried again."),
        ),
        ConnectionState::Misconfigured => (
            "Misconfigured",
            "bad",
            format!("It cannot start: {error}. The broker retries by itself; nothing is served until it works."),
        ),
    }
}

/// The status page: one card per connection — state in plain words, the expiry forecast,
/// last refresh, last error, the organisations it covers, a (re)connect button and the Web
/// activity URL. No script, no secrets.
pub fn connections(cards: &[Card<'_>]) -> String {
    let mut body = String::from(
        "<p class=\"lead\">Every connection this broker serves. A pipeline's Web activity calls the \
         URL shown on its card (managed identity, or the <code>X-API-Key</code> header).</p>\
         <ul class=\"cards\">",
    );
    let text = |s: &str| html_escape::encode_text(s).into_owned();
    let attr = |s: &str| html_escape::encode_double_quoted_attribute(s).into_owned();
    for card in cards {
        let status = card.status;
        let name = &status.name;
        let (label, class, sentence) = state_words(status);
        let id = format!("c-{name}");
        let button = match status.state {
            ConnectionState::Connected | ConnectionState::Failing => "Reconnect",
            _ => "Connect",
        };
        let forecast = match &status.forecast {
            Some(f) => match f.grant_expires_at {
                Some(end) => format!(
                    "<strong>{}</strong><br><span class=\"when\">{}</span>",
                    time(Some(end)),
                    text(&f.summary)
                ),
                None => text(&f.summary),
            },
            None => "No grant yet.".to_owned(),
        };
        let tenants = if status.tenants.is_empty() {
            "–".to_owned()
        } else {
            let items: Vec<String> = status
                .tenants
                .iter()
                .map(|t| {
                    if t.name.is_empty() {
                        format!("<li><code>{}</code></li>", text(&t.id))
                    } else {
                        format!("<li>{} <code>{}</code></li>", text(&t.name), text(&t.id))
                    }
                })
                .collect();
            format!("<ul class=\"tenants\">{}</ul>", items.concat())
        };
        let error = match (&status.last_error, status.state) {
            (Some(err), ConnectionState::Failing | ConnectionState::ConsentRequired) => {
                format!(
                    "{} <span class=\"when\">{}</span>",
                    text(err),
                    time(status.last_error_at)
                )
            }
            _ => "–".to_owned(),
        };
        body.push_str(&format!(
            "<li class=\"card\" aria-labelledby=\"{id}\"><article>\
             <h2 id=\"{id}\">{n} <span class=\"provider\">{provider}</span></h2>\
             <p class=\"state {class}\"><strong>{label}.</strong> {sentence}</p>\
             <dl>\
             <dt>Grant ends</dt><dd class=\"forecast\">{forecast}</dd>\
             <dt>Access token expires</dt><dd>{expires}</dd>\
             <dt>Last refresh</dt><dd>{last}</dd>\
             <dt>Connected since</dt><dd>{consented}</dd>\
             <dt>Last error</dt><dd>{error}</dd>\
             <dt>Organisations</dt><dd>{tenants}</dd>\
             </dl>\
             <label for=\"{id}-url\">Web activity URL</label>\
             <input id=\"{id}-url\" type=\"text\" readonly value=\"{refresh}\">\
             <p><a class=\"button\" href=\"{authorize}\">{button}<span class=\"visually-hidden\"> {n}</span></a></p>\
             </article></li>",
            n = text(name),
            provider = text(status.provider),
            sentence = text(&sentence),
            expires = time(status.expires_at),
            last = time(status.last_refresh),
            consented = time(status.consented_at),
            refresh = attr(card.refresh_url),
            authorize = attr(card.authorize_url),
        ));
    }
    body.push_str(
        "</ul><p class=\"note\">The buttons work in this browser for 30 minutes after you signed in \
         (with Entra ID, or with the admin key as <code>?key=…</code> once, which this page then \
         drops from the address).</p>",
    );
    document("Connections", &body)
}

/// The page a browser gets for `?key=`: it has its session cookie now, and goes on to
/// `target` (the same address without the key) from this page, so the navigation is
/// same-site and the `SameSite=Strict` cookie goes with it.
pub fn continue_to(target: &str) -> String {
    let target = html_escape::encode_double_quoted_attribute(target);
    let body = format!(
        "<meta http-equiv=\"refresh\" content=\"0;url={target}\">\
         <p>Signed in. <a href=\"{target}\">Continue</a>.</p>"
    );
    document("Signed in", &body)
}

/// Styles: readable on a phone, contrast at least 4.5:1 in both schemes, a dark scheme
/// that follows the browser, visible keyboard focus.
const STYLE: &str = "\
:root{color-scheme:light dark;--bg:#fff;--fg:#1b1b1b;--muted:#555;--card:#f6f7f9;--line:#d0d4da;\
--ok:#176f2c;--warn:#8a5300;--bad:#a4262c;--link:#0b57d0;--btn:#0b57d0;--btnfg:#fff}\
@media (prefers-color-scheme:dark){:root{--bg:#121417;--fg:#e8eaed;--muted:#b4b8bf;--card:#1d2025;\
--line:#3a3f47;--ok:#7bd88f;--warn:#f2c46d;--bad:#ff9a9f;--link:#8ab4f8;--btn:#8ab4f8;--btnfg:#0b1a33}}\
body{font-family:system-ui,sans-serif;background:var(--bg);color:var(--fg);max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.5}\
a{color:var(--link)}a:focus,input:focus{outline:3px solid var(--link);outline-offset:2px}\
.lead,.note,.when,.provider{color:var(--muted)}.provider{font-size:.8em;font-weight:normal}\
.cards{list-style:none;padding:0;display:grid;gap:1rem;grid-template-columns:repeat(auto-fill,minmax(min(100%,22rem),1fr))}\
.card article{background:var(--card);border:1px solid var(--line);border-radius:.5rem;padding:1rem}\
.card h2{margin:0 0 .5rem;font-size:1.25rem;overflow-wrap:anywhere}\
.state.ok strong{color:var(--ok)}.state.warn strong{color:var(--warn)}.state.bad strong{color:var(--bad)}\
dl{display:grid;grid-template-columns:minmax(6rem,38%) 1fr;gap:.25rem .75rem;margin:.75rem 0}dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}\
.tenants{margin:0;padding-left:1.1rem}label{display:block;font-weight:600;margin-top:.5rem}\
input{width:100%;box-sizing:border-box;font:inherit;font-size:.9em;padding:.4rem;background:var(--bg);color:var(--fg);border:1px solid var(--line);border-radius:.25rem}\
.button{display:inline-block;background:var(--btn);color:var(--btnfg);padding:.5rem 1rem;border-radius:.375rem;text-decoration:none;font-weight:600}\
.visually-hidden{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}";

fn document(title: &str, body: &str) -> String {
    let title = html_escape::encode_text(title);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Token Broker</title><style>{STYLE}</style>\
         </head><body><main><h1>{title}</h1>{body}</main></body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        let html = super::page("<b>", "<script>alert(1)</script>");
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
    }
}
