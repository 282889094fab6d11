//! The proxied path and query: judged as the upstream will decode them, and kept under the
//! connection's API base whatever the caller sends; the broker's own `tenant` parameter taken
//! out of the query.

use url::Url;

/// Refuses a proxied path (`rest`: the raw, still percent-encoded path after
/// `/api/proxy/{connection}/`) that could leave the API's base once the upstream decodes it.
pub(super) fn check_path(rest: &str) -> Result<(), &'static str> {
    if rest.is_empty() {
        return Err("name a path under the API, e.g. /api/proxy/{connection}/api.xro/2.0/Invoices");
    }
    // Judge the path as the upstream will read it: decoded. Encoded separators are refused
    // outright (`%2f`, `%5c`), so decoding cannot create a segment the check did not see.
    let lower = rest.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || rest.contains('\\') {
        return Err("encoded or backward slashes are not allowed in a proxied path");
    }
    let decoded = percent_decode(rest).ok_or("the path is not valid percent-encoded UTF-8")?;
    if decoded.chars().any(char::is_control) {
        return Err("control characters are not allowed in a proxied path");
    }
    for segment in decoded.split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err("empty, `.` and `..` path segments are not allowed in a proxied path");
        }
    }
    if decoded.contains("://") {
        return Err("absolute URLs are not allowed in a proxied path");
    }
    Ok(())
}

/// The upstream URL for `rest` (see [`check_path`]) and `query`, or why it would leave
/// `base`.
pub(super) fn target_url(base: &Url, rest: &str, query: Option<&str>) -> Result<Url, &'static str> {
    check_path(rest)?;
    let mut text = format!("{}/{rest}", base.as_str().trim_end_matches('/'));
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        text.push('?');
        text.push_str(query);
    }
    let url = Url::parse(&text).map_err(|_| "the proxied path does not make a valid URL")?;
    // Belt and braces: the result must still be under the base.
    if under_base(&url, base).is_none() {
        return Err("the proxied path leaves the connection's API");
    }
    Ok(url)
}

/// The path of `url` below `base` (without the leading slash) when `url` is on the same
/// origin and under the base's path.
pub(super) fn under_base<'u>(url: &'u Url, base: &Url) -> Option<&'u str> {
    let same_origin = url.scheme() == base.scheme()
        && url.host_str() == base.host_str()
        && url.port_or_known_default() == base.port_or_known_default();
    let base_path = base.path().trim_end_matches('/');
    let rest = url.path().strip_prefix(base_path)?.strip_prefix('/')?;
    same_origin.then_some(rest)
}

/// The query without the broker's own `tenant` parameter, and that parameter's value.
pub(super) fn split_tenant(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut tenant = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == "tenant" {
                tenant = percent_decode(&value.replace('+', " "));
                false
            } else {
                true
            }
        })
        .collect();
    let kept = kept.join("&");
    ((!kept.is_empty()).then_some(kept), tenant)
}

/// Strict percent-decoding to UTF-8: a malformed escape (`%zz`, a lone `%`) is an error,
/// where the percent-encoding crate's decoder would pass it through as text — a proxied path
/// with one is refused rather than guessed at.
pub(super) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_parameter_is_the_brokers() {
        assert_eq!(
            split_tenant(Some("page=2&tenant=Demo%20Co&where=a%3Db")),
            (
                Some("page=2&where=a%3Db".to_owned()),
                Some("Demo Co".to_owned())
            )
        );
        assert_eq!(split_tenant(Some("tenant=x")), (None, Some("x".to_owned())));
        assert_eq!(split_tenant(None), (None, None));
    }

    #[test]
    fn paths_stay_under_the_base() {
        let base = Url::parse("https://api.example.com/v2").expect("url");
        let ok = target_url(&base, "invoices/42", Some("page=2&x=%20y")).expect("under the base");
        assert_eq!(
            ok.as_str(),
            "https://api.example.com/v2/invoices/42?page=2&x=%20y"
        );
        for bad in [
            "",
            "../admin",
            "a/../../admin",
            "%2e%2e/admin",
            "a/%2E%2e/b",
            "a%2fb",
            "a%5cb",
            "a\\b",
            "/evil.example/x",
            "a//b",
            "https://evil.example/x",
            "https:%2f%2fevil.example",
            "a/./b",
            "a%00b",
            "%ff",
        ] {
            assert!(
                target_url(&base, bad, None).is_err(),
                "{bad:?} was accepted"
            );
        }
    }
}
