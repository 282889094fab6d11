//! The HTTP client for token requests, as the `oauth2` crate's async client: no redirects
//! (a redirected token request could carry the client secret or a code elsewhere), timeouts,
//! and 429/5xx told apart before the body is parsed.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::{AccessToken, AsyncHttpClient, HttpRequest, HttpResponse};
use serde_json::Value;
use url::Url;

use super::*;

/// Failures of one HTTP exchange with a token endpoint, before OAuth semantics apply.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Send(String),
    /// 429 or 5xx: the provider did not process the grant.
    #[error("HTTP {0}")]
    Status(u16),
}

/// The HTTP client for token endpoints: one `reqwest::Client`, no redirects, timeouts.
///
/// Written as our own [`AsyncHttpClient`] (rather than the `oauth2` crate's reqwest glue) to
/// turn 429/5xx into a retryable transport error before the body is parsed, and to keep
/// `reqwest` error text (which names only the URL) as the transport message.
#[derive(Clone)]
pub struct UpstreamHttp {
    client: reqwest::Client,
}

impl UpstreamHttp {
    /// Builds the client; `SSL_CERT_FILE` certificates are trusted in addition to the
    /// system roots.
    pub fn new(timeout: Duration) -> anyhow::Result<Self> {
        let client = crate::http_client::builder()?
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()?;
        Ok(Self { client })
    }
}

impl UpstreamHttp {
    /// The underlying client (no redirects, timeouts, the broker's trust roots), for the
    /// other outgoing calls that are no token requests: OIDC discovery, Entra ID keys.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `GET url` with the access token, expecting JSON (the post-consent lookups).
    pub(super) async fn get_json(
        &self,
        url: &Url,
        access_token: &AccessToken,
    ) -> Result<Value, UpstreamError> {
        let response = self
            .client
            .get(url.clone())
            .bearer_auth(access_token.secret())
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|err| UpstreamError::Transport(error_chain(&err)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(UpstreamError::Lookup {
                what: format!("GET {}", url.path()),
                status: status.as_u16(),
            });
        }
        let body = crate::http_client::read_capped(response, crate::http_client::PEER_BODY_MAX)
            .await
            .map_err(|err| UpstreamError::Malformed(format!("GET {}: {err}", url.path())))?;
        serde_json::from_slice(&body).map_err(|_| {
            UpstreamError::Malformed(format!("GET {} did not answer JSON", url.path()))
        })
    }
}

impl<'c> AsyncHttpClient<'c> for UpstreamHttp {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request = reqwest::Request::try_from(request)
                .map_err(|err| TransportError::Send(err.to_string()))?;
            let response = self.client.execute(request).await.map_err(|err| {
                if err.is_connect() {
                    TransportError::Connect(error_chain(&err))
                } else {
                    TransportError::Send(error_chain(&err))
                }
            })?;
            let status = response.status();
            if status.as_u16() == 429 || status.is_server_error() {
                return Err(TransportError::Status(status.as_u16()));
            }
            let mut headers = response.headers().clone();
            // Capped: a token endpoint that streams without end must not fill the memory.
            let body = crate::http_client::read_capped(response, crate::http_client::PEER_BODY_MAX)
                .await
                .map_err(|err| TransportError::Send(error_chain(&err)))?;
            // Some providers label JSON `text/plain` or `text/html`; the oauth2 crate would
            // drop such an answer unread (and with it a rotated refresh token).
            if body.first() == Some(&b'{') {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
            }
            let mut response = http::Response::new(body.to_vec());
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok(response)
        })
    }
}

/// An error and its sources, `: `-separated ("error sending request: tcp connect error:
/// Connection refused"). reqwest errors name only the URL, which holds no secret.
pub(super) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
