//! The consent flow, driven like a browser.

use reqwest::header::LOCATION;
use reqwest::redirect::Policy;
use url::Url;

use super::*;

/// Drives the consent flow like a browser against the broker at `base`, stopping before
/// the broker's callback.
pub async fn consent_until_callback(base: &str, connection: &str) -> Browser {
    walk_to_callback(
        &format!("{base}/api/authorize/{connection}?key={ADMIN_KEY}"),
        &format!("{base}/api/callback"),
    )
    .await
}

/// Drives a browser from `start` (an authorize URL with `?key=`) through redirects and
/// meta refreshes until the provider sends it to `callback`.
pub async fn walk_to_callback(start: &str, callback: &str) -> Browser {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .build()
        .expect("browser");
    let mut url = start.to_owned();
    for _ in 0..20 {
        let response = client.get(&url).send().await.expect("browser request");
        let status = response.status();
        let location = if status.is_redirection() {
            response
                .headers()
                .get(LOCATION)
                .expect("redirect location")
                .to_str()
                .expect("ascii location")
                .to_owned()
        } else {
            // The page a browser gets for `?key=` goes on by itself (a meta refresh).
            let body = response.text().await.unwrap_or_default();
            match meta_refresh(&body) {
                Some(target) if status == 200 => target,
                _ => panic!("consent flow stopped at {url} with {status}: {body}"),
            }
        };
        url = Url::parse(&url)
            .expect("url")
            .join(&location)
            .expect("join")
            .to_string();
        if url.starts_with(callback) {
            return Browser {
                client,
                callback_url: url,
            };
        }
    }
    panic!("consent flow did not reach the callback in 20 redirects");
}

/// The target of a page's `<meta http-equiv="refresh" content="0;url=…">`, unescaped.
pub fn meta_refresh(html: &str) -> Option<String> {
    let start = html.find("http-equiv=\"refresh\"")?;
    let rest = &html[start..];
    let url = &rest[rest.find("url=")? + 4..];
    let url = &url[..url.find('"')?];
    Some(url.replace("&amp;", "&"))
}

/// The whole consent flow against the broker at `base`; asserts "Connected".
pub async fn consent(base: &str, connection: &str) {
    let browser = consent_until_callback(base, connection).await;
    let (status, body) = browser.finish().await;
    assert_eq!(status, 200, "callback failed: {body}");
    assert!(body.contains("Connected"), "{body}");
}

/// A browser that went through consent and holds the provider's redirect to the callback.
pub struct Browser {
    pub client: reqwest::Client,
    pub callback_url: String,
}

impl Browser {
    /// Follows the redirect to the broker's callback; returns status and page.
    pub async fn finish(&self) -> (u16, String) {
        let response = self
            .client
            .get(&self.callback_url)
            .send()
            .await
            .expect("callback request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("page"))
    }
}
