//! The API's answer back to the caller: its status and body (streamed) as they are, its
//! headers less cookies and hop-by-hop ones, and `Link` / `Location` URLs into the API
//! pointed at the proxy.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;

use super::super::ApiError;
use super::headers::returnable_response_header;
use super::links::{rewrite_links, to_proxy};
use super::target::Target;
use super::Relayed;

/// The caller's answer for `upstream`; links into the API become URLs under the proxy's
/// prefix (`proxy_prefix`, asked for only when the answer has a link).
pub(super) fn answer(
    upstream: reqwest::Response,
    target: &Target,
    proxy_prefix: impl Fn() -> String,
) -> Result<Response, ApiError> {
    let tenant = target.tenant.as_deref();
    let mut prefix: Option<String> = None;
    let mut response = Response::builder()
        .status(upstream.status())
        .extension(Relayed);
    for (name, value) in upstream.headers() {
        if !returnable_response_header(name) {
            continue;
        }
        let rewritten = match (name.as_str(), value.to_str()) {
            ("link", Ok(text)) => {
                let prefix = prefix.get_or_insert_with(&proxy_prefix);
                Some(rewrite_links(
                    text,
                    &target.url,
                    &target.base,
                    prefix,
                    tenant,
                ))
            }
            ("location" | "content-location", Ok(text)) => {
                let prefix = prefix.get_or_insert_with(&proxy_prefix);
                to_proxy(text, &target.url, &target.base, prefix, tenant)
            }
            _ => None,
        };
        match rewritten.and_then(|text| header::HeaderValue::from_str(&text).ok()) {
            Some(value) => response = response.header(name, value),
            None => response = response.header(name, value),
        }
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .map_err(|_| ApiError::provider_error("the provider's answer could not be relayed"))
}
