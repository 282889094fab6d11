//! Outgoing HTTPS: the system roots plus the certificates in `SSL_CERT_FILE`.
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
    Ok(builder)
}
