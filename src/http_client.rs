//! Outgoing HTTPS: the system roots plus the certificates in `SSL_CERT_FILE`, and host names
//! pinned to addresses by `BROKER_RESOLVE` (`host=ip,host=ip`, like curl's `--resolve`: for
//! split-horizon DNS, and for tests, which must not edit `/etc/hosts`).
//!
//! The platform verifier's root loading may read `SSL_CERT_FILE` *instead of* the system
//! store; the product promises "system roots plus `SSL_CERT_FILE`", so the file's
//! certificates are merged explicitly on top of the platform roots.

use anyhow::Context;

/// A `reqwest` builder with the broker's trust roots and a connect timeout.
pub fn builder() -> anyhow::Result<reqwest::ClientBuilder> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        let pem = std::fs::read(&path)
            .with_context(|| format!("reading SSL_CERT_FILE {}", path.to_string_lossy()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("parsing SSL_CERT_FILE {}", path.to_string_lossy()))?;
        builder = builder.tls_certs_merge(certs);
    }
    if let Some(pins) = std::env::var("BROKER_RESOLVE")
        .ok()
        .filter(|p| !p.trim().is_empty())
    {
        for (host, ip) in parse_resolve(&pins)? {
            // The port is ignored: connections use the URL's port.
            builder = builder.resolve(&host, std::net::SocketAddr::new(ip, 0));
        }
    }
    Ok(builder)
}

/// The most of a body the broker reads from a peer it calls: a token response, a key set,
/// a discovery document or a post-consent lookup is a few KB (a Xero connections list with
/// hundreds of organisations, some tens of KB). A peer that sends more is refused rather
/// than buffered: memory is the other callers' too.
pub const PEER_BODY_MAX: usize = 1024 * 1024;

/// A body longer than its cap.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the answer could not be read: {0}")]
    Read(String),
}

/// Reads `response`'s body, refusing it (without reading further) once it passes `limit`
/// bytes: a declared length over the limit is refused before anything is read.
pub async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        return Err(BodyError::TooLarge(limit));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| BodyError::Read(err.without_url().to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// `host=ip` pairs, comma-separated.
fn parse_resolve(pins: &str) -> anyhow::Result<Vec<(String, std::net::IpAddr)>> {
    pins.split(',')
        .map(str::trim)
        .filter(|pin| !pin.is_empty())
        .map(|pin| {
            let (host, ip) = pin
                .split_once('=')
                .with_context(|| format!("BROKER_RESOLVE: `{pin}` is not `host=ip`"))?;
            let ip = ip
                .trim()
                .parse()
                .with_context(|| format!("BROKER_RESOLVE: `{ip}` is not an IP address"))?;
            Ok((host.trim().to_ascii_lowercase(), ip))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_pins_parse_and_bad_ones_are_refused() {
        let pins = parse_resolve("a.example=127.0.0.1, B.example=::1,").expect("valid");
        assert_eq!(pins.len(), 2);
        assert_eq!(pins[1].0, "b.example");
        assert!(pins[1].1.is_ipv6());
        assert!(parse_resolve("a.example").is_err());
        assert!(parse_resolve("a.example=localhost").is_err());
    }

    /// A peer that streams (no declared length) is cut once it passes the cap.
    #[tokio::test]
    async fn a_streamed_answer_is_cut_at_the_cap() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        let app = axum::Router::new().fallback(|| async {
            // 64 chunks of 64 KiB: 4 MiB, sent chunked.
            let chunks = futures_util::stream::iter(
                (0..64).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 << 10]))),
            );
            axum::body::Body::from_stream(chunks)
        });
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let response = http.get(&url).send().await.expect("request");
        assert_eq!(response.content_length(), None, "chunked");
        match read_capped(response, 1 << 20).await {
            Err(BodyError::TooLarge(limit)) => assert_eq!(limit, 1 << 20),
            other => panic!("expected TooLarge, got {:?}", other.map(|b| b.len())),
        }
        let response = http.get(&url).send().await.expect("request");
        assert_eq!(
            read_capped(response, 8 << 20).await.expect("under").len(),
            4 << 20
        );
        server.abort();
    }
}
