//! OpenID Connect Discovery 1.0 (§4): a connection's endpoints from its issuer's
//! `/.well-known/openid-configuration`.

use anyhow::Context;
use url::Url;

use crate::http_client::{read_capped, PEER_BODY_MAX};

/// The authorization and token endpoints from `{issuer}/.well-known/openid-configuration`.
/// The document must name the same issuer (§4.3), so a misconfigured issuer cannot send
/// codes elsewhere; and every endpoint it names must be https (plain http only to this
/// machine), as configured URLs must: the authorization endpoint receives the browser, the
/// token endpoint the client secret, codes and refresh tokens.
pub async fn discover(http: &reqwest::Client, issuer: &Url) -> anyhow::Result<(Url, Url)> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        issuer: String,
        authorization_endpoint: Url,
        token_endpoint: Url,
    }
    let base = issuer.as_str().trim_end_matches('/');
    let url = format!("{base}/.well-known/openid-configuration");
    let response = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("fetching {url}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "{url} answered HTTP {}",
        response.status().as_u16()
    );
    let body = read_capped(response, PEER_BODY_MAX)
        .await
        .with_context(|| format!("reading {url}"))?;
    let metadata: Metadata = serde_json::from_slice(&body)
        .with_context(|| format!("{url} is not an OpenID provider configuration"))?;
    anyhow::ensure!(
        metadata.issuer.trim_end_matches('/') == base,
        "{url} names the issuer `{}`, not `{base}`",
        metadata.issuer
    );
    for (field, endpoint) in [
        ("authorization_endpoint", &metadata.authorization_endpoint),
        ("token_endpoint", &metadata.token_endpoint),
    ] {
        anyhow::ensure!(
            endpoint.scheme() == "https" || crate::presets::is_loopback(endpoint),
            "{url} names a {field} that is not https ({}://{}): refused, it would carry \
             credentials in clear",
            endpoint.scheme(),
            endpoint.host_str().unwrap_or_default()
        );
    }
    Ok((metadata.authorization_endpoint, metadata.token_endpoint))
}
