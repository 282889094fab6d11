//! Which headers cross the proxy, both ways (RFC 9110 §7.6.1): the caller's credentials,
//! cookies, hop-by-hop headers and what the hosting platform adds stay behind; the API's
//! cookies and hop-by-hop headers do not come back.

use axum::http::{header, HeaderMap, HeaderName};

/// Request headers never forwarded: the caller's credentials and cookies, hop-by-hop
/// headers (RFC 9110 §7.6.1), what the Functions host, App Service and proxies in front add
/// (Easy Auth's principal and token store — `X-MS-TOKEN-AAD-ACCESS-TOKEN` and friends are
/// the signed-in caller's own tokens — and the client's address), and Xero's tenant header,
/// which the broker sets from the consent.
pub(super) fn forwardable_request_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    !matches!(
        name,
        "authorization"
            | "x-api-key"
            | "cookie"
            | "host"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "forwarded"
            | "x-client-ip"
            | "x-client-port"
            | "x-real-ip"
            | "xero-tenant-id"
    ) && !name.starts_with("x-forwarded-")
        && !name.starts_with("x-azure-")
        && !name.starts_with("x-ms-client-principal")
        && !name.starts_with("x-ms-token-")
        && !name.starts_with("x-arr-")
        && !name.starts_with("x-original-")
}

/// The caller's headers that go on to the API: [`forwardable_request_header`], less every
/// header the caller's `Connection` header names — those are hop-by-hop for this hop only
/// (RFC 9110 §7.6.1: "a proxy … MUST remove … each connection option").
pub(super) fn forwarded_headers(headers: &HeaderMap) -> reqwest::header::HeaderMap {
    let nominated: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|option| option.trim().to_ascii_lowercase())
        .filter(|option| !option.is_empty())
        .collect();
    let mut forwarded = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        if forwardable_request_header(name) && !nominated.iter().any(|n| n == name.as_str()) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    forwarded
}

/// Response headers never returned: cookies and hop-by-hop headers (the length is the
/// streamed body's business).
pub(super) fn returnable_response_header(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "set-cookie"
            | "set-cookie2"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_options_easy_auth_tokens_and_client_addresses_stay_behind() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Hop-Secret"),
            ("x-hop-secret", "1"),
            ("x-ms-token-aad-access-token", "eyJ"),
            ("x-ms-token-aad-id-token", "eyJ"),
            ("x-client-ip", "203.0.113.9"),
            ("xero-tenant-id", "caller-picked"),
            ("accept", "application/json"),
            ("if-none-match", "\"v1\""),
        ] {
            headers.append(
                HeaderName::from_static(name),
                value.parse().expect("header value"),
            );
        }
        let forwarded = forwarded_headers(&headers);
        let names: Vec<&str> = forwarded.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept", "if-none-match"]);
    }
}
