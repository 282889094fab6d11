//! The few small HTML pages a browser sees (the callback's result). Never a token.

use crate::broker::{ConnectionState, ConnectionStatus};

/// A complete page with a title and one paragraph; both are escaped here.
pub fn page(title: &str, message: &str) -> String {
    let message = format!("<p>{}</p>", html_escape::encode_text(message));
    document(title, &message)
}

/// The status page: one row per connection with a (re)connect link.
pub fn connections(rows: &[(ConnectionStatus, String)]) -> String {
    let mut body = String::from(
        "<table><thead><tr><th>connection</th><th>state</th><th>token expires</th>\
         <th>last refresh</th><th>last error</th><th></th></tr></thead><tbody>",
    );
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "–".into())
    };
    for (status, authorize_url) in rows {
        let (state, link) = match status.state {
            ConnectionState::Connected => ("connected", "reconnect"),
            ConnectionState::ConsentRequired => ("consent required", "connect"),
            ConnectionState::Failing => ("failing", "reconnect"),
            ConnectionState::Misconfigured => ("misconfigured", "connect"),
        };
        body.push_str(&format!(
            "<tr><td>{}</td><td class=\"{}\">{state}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><a href=\"{}\">{link}</a></td></tr>",
            html_escape::encode_text(&status.name),
            state.replace(' ', "-"),
            time(status.expires_at),
            time(status.last_refresh),
            html_escape::encode_text(status.last_error.as_deref().unwrap_or("")),
            html_escape::encode_double_quoted_attribute(authorize_url),
        ));
    }
    body.push_str(
        "</tbody></table><p>The links work in this browser for 30 minutes after the admin key \
         was last given (<code>?key=…</code> once, which this page then drops from the address).</p>",
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

fn document(title: &str, body: &str) -> String {
    let title = html_escape::encode_text(title);
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Token Broker</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:4rem auto;padding:0 1rem;line-height:1.5}}\
         td,th{{text-align:left;padding:.2rem .8rem .2rem 0}}.connected{{color:#176f2c}}.failing,.consent-required{{color:#a4262c}}</style>\
         </head><body><h1>{title}</h1>{body}</body></html>\n"
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
