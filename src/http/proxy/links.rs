//! `Link` and `Location` answers that point into the API, pointed back at the proxy (RFC 8288
//! paging through the broker).

use url::Url;

use super::path::under_base;

/// A `Link` or `Location` URL that points into the API, as the proxy URL that reaches it
/// (keeping the caller's `tenant`), so paging by RFC 8288 links — Data Factory's REST source
/// follows them by default — goes through the broker instead of straight to the API
/// without a token. Other URLs stay as they are.
pub(super) fn to_proxy(
    reference: &str,
    target: &Url,
    base: &Url,
    proxy_prefix: &str,
    tenant: Option<&str>,
) -> Option<String> {
    let url = target.join(reference.trim()).ok()?;
    let rest = under_base(&url, base)?;
    let mut out = format!("{proxy_prefix}{rest}");
    let mut query: Vec<String> = url.query().map(|q| q.to_owned()).into_iter().collect();
    if let Some(tenant) = tenant {
        query.push(format!(
            "tenant={}",
            url::form_urlencoded::byte_serialize(tenant.as_bytes()).collect::<String>()
        ));
    }
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    Some(out)
}

/// Every `<URI-reference>` of a `Link` header through [`to_proxy`].
pub(super) fn rewrite_links(
    value: &str,
    target: &Url,
    base: &Url,
    proxy_prefix: &str,
    tenant: Option<&str>,
) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(open) = rest.find('<') {
        let Some(len) = rest[open + 1..].find('>') else {
            break;
        };
        let reference = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..=open]);
        match to_proxy(reference, target, base, proxy_prefix, tenant) {
            Some(proxied) => out.push_str(&proxied),
            None => out.push_str(reference),
        }
        out.push('>');
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_into_the_api_point_at_the_proxy_and_others_stay() {
        let base = Url::parse("https://api.example.com/v2").expect("url");
        let target = Url::parse("https://api.example.com/v2/invoices?page=1").expect("url");
        let prefix = "https://broker.example/api/proxy/acme/";
        assert_eq!(
            rewrite_links(
                "<https://api.example.com/v2/invoices?page=2>; rel=\"next\", <https://other.example/v2/x>; rel=\"help\"",
                &target, &base, prefix, None,
            ),
            "<https://broker.example/api/proxy/acme/invoices?page=2>; rel=\"next\", <https://other.example/v2/x>; rel=\"help\""
        );
        // Relative references resolve against the request; the tenant stays chosen.
        assert_eq!(
            rewrite_links(
                "</v2/invoices?page=3>; rel=next",
                &target,
                &base,
                prefix,
                Some("Demo Co")
            ),
            "<https://broker.example/api/proxy/acme/invoices?page=3&tenant=Demo+Co>; rel=next"
        );
        assert_eq!(
            to_proxy("page2", &target, &base, prefix, None).as_deref(),
            Some("https://broker.example/api/proxy/acme/page2")
        );
        // Outside the base path, another port or scheme: untouched.
        for other in [
            "/v1/x",
            "http://api.example.com/v2/x",
            "https://api.example.com:8443/v2/x",
        ] {
            assert_eq!(
                to_proxy(other, &target, &base, prefix, None),
                None,
                "{other}"
            );
        }
        assert_eq!(
            rewrite_links("<unclosed", &target, &base, prefix, None),
            "<unclosed"
        );
    }
}
