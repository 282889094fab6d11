//! Where a proxied request goes: the configured API base, or one the provider named in its
//! token response — never this machine or an internal network, unless `local_mode`.

use url::Url;

use super::super::ApiError;
use crate::config::ProxyBase;
use crate::token::TokenRecord;

/// The API base for a request: the configured one, or the one the provider named in the
/// token response (Salesforce's `instance_url`). A provider-named base must be https,
/// without credentials or query, and — unless `local_mode` — not on this machine or a
/// private, link-local or otherwise internal address: a hostile or compromised provider
/// must not turn the proxy against the broker's own network (the instance metadata
/// service at 169.254.169.254, the Functions host's loopback port) with a bearer token.
/// Host names are judged as written; the proxy client does not follow redirects.
pub(super) fn resolve_base(
    base: &ProxyBase,
    record: &TokenRecord,
    local_mode: bool,
) -> Result<Url, ApiError> {
    match base {
        ProxyBase::Fixed(url) => Ok(url.clone()),
        ProxyBase::FromRecord(fact) => {
            let field = fact.key();
            let named = record
                .facts
                .text(*fact)
                .and_then(|text| Url::parse(text.trim_end_matches('/')).ok())
                .filter(|url| {
                    let internal = is_internal(url);
                    (url.scheme() == "https" || (local_mode && crate::presets::is_loopback(url)))
                        && (local_mode || !internal)
                        && url.query().is_none()
                        && url.username().is_empty()
                        && url.password().is_none()
                });
            named.ok_or_else(|| {
                ApiError::provider_error(format!("the provider named no usable `{field}` for the proxy (https, on a public address; consent again, or set api_base_url)"),
                )
            })
        }
    }
}

/// Whether `url`'s host is this machine or an address that is not on the public Internet:
/// loopback, private (RFC 1918, RFC 4193), link-local (the cloud metadata services),
/// shared (RFC 6598), unspecified, or a name for this machine.
pub(super) fn is_internal(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            domain == "localhost" || domain.ends_with(".localhost") || domain.ends_with(".internal")
        }
        Some(url::Host::Ipv4(ip)) => is_internal_ip(ip.into()),
        Some(url::Host::Ipv6(ip)) => is_internal_ip(ip.into()),
        None => true,
    }
}

pub(super) fn is_internal_ip(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(ip) => {
            let [a, b, ..] = ip.octets();
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        std::net::IpAddr::V6(ip) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || ip
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_internal_ip(v4.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_base_from_the_token_response_must_be_https_without_credentials() {
        let record = |url: Option<&str>| TokenRecord {
            status: crate::token::GrantStatus::Connected,
            access_token: None,
            token_type: "Bearer".into(),
            expires_at: None,
            refresh_token: None,
            scope: None,
            facts: crate::token::Facts {
                instance_url: url.map(str::to_owned),
                ..Default::default()
            },
            obtained_at: chrono::Utc::now(),
            consented_at: chrono::Utc::now(),
            last_error: None,
        };
        let base = ProxyBase::FromRecord(crate::presets::Fact::InstanceUrl);
        let ok = resolve_base(
            &base,
            &record(Some("https://acme.my.salesforce.com/")),
            false,
        )
        .expect("https");
        assert_eq!(ok.as_str(), "https://acme.my.salesforce.com/");
        // This machine and internal networks only in local mode.
        for internal in [
            "http://127.0.0.1:8080",
            "https://127.0.0.1:8443",
            "https://localhost",
            "https://10.1.2.3",
            "https://172.16.0.1",
            "https://192.168.1.1",
            "https://169.254.169.254",
            "https://100.64.0.1",
            "https://[::1]",
            "https://[fd00::1]",
            "https://[fe80::1]",
            "https://[::ffff:10.0.0.1]",
            "https://0.0.0.0",
            "https://metadata.google.internal",
        ] {
            assert!(
                resolve_base(&base, &record(Some(internal)), false).is_err(),
                "{internal} accepted outside local mode"
            );
        }
        assert!(
            resolve_base(&base, &record(Some("http://127.0.0.1:8080")), true).is_ok(),
            "loopback in local mode"
        );
        assert!(
            resolve_base(&base, &record(Some("http://192.168.1.1")), true).is_err(),
            "plain http only to this machine, even in local mode"
        );
        for bad in [
            "http://acme.my.salesforce.com",
            "https://user:pw@acme.my.salesforce.com",
            "https://acme.my.salesforce.com/?x=1",
            "not a url",
        ] {
            for local_mode in [false, true] {
                assert!(
                    resolve_base(&base, &record(Some(bad)), local_mode).is_err(),
                    "{bad}"
                );
            }
        }
        assert!(
            resolve_base(&base, &record(None), false).is_err(),
            "none named"
        );
    }
}
