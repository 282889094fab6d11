//! A configured provider: its endpoints and client credentials, and the two token requests
//! (code exchange, refresh) made through the `oauth2` crate.
//!
//! Security notes: the HTTP client used here never follows redirects (a token request that
//! is redirected could carry the client secret or a code elsewhere) and has timeouts. Error
//! values carry the provider's OAuth error code and description, never a response body,
//! because a malformed body may well contain a token.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AccessToken, AsyncHttpClient, AuthType, AuthUrl, AuthorizationCode, Client, ClientId,
    ClientSecret, CsrfToken, EndpointNotSet, EndpointSet, HttpRequest, HttpResponse,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use url::Url;

use crate::config::{ClientAuth, ConnectionConfig, ProviderKind};
use crate::presets::Lookup;

/// Response fields that are secrets or already mapped; never copied into `extra`.
const NOT_EXTRA: &[&str] = &[
    "access_token",
    "refresh_token",
    "id_token",
    "token_type",
    "expires_in",
    "scope",
];

/// A token endpoint response (RFC 6749 §5.1), lenient where real providers differ:
/// `token_type` in any case or missing (Bearer assumed), `expires_in` as a number or a
/// string (Exact Online sends a string), and every other field kept for callers.
#[derive(Clone, Serialize, Deserialize)]
pub struct ProviderTokenResponse {
    access_token: AccessToken,
    #[serde(
        default = "bearer",
        deserialize_with = "oauth2::helpers::deserialize_untagged_enum_case_insensitive"
    )]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<RefreshToken>,
    #[serde(
        default,
        rename = "scope",
        deserialize_with = "oauth2::helpers::deserialize_space_delimited_vec",
        serialize_with = "oauth2::helpers::serialize_space_delimited_vec"
    )]
    scopes: Option<Vec<Scope>>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

fn bearer() -> BasicTokenType {
    BasicTokenType::Bearer
}

fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Number(u64),
        Float(f64),
        String(String),
    }
    match Option::<NumberOrString>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumberOrString::Number(n)) => Ok(Some(n)),
        Some(NumberOrString::Float(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
        Some(NumberOrString::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("expires_in is not a number of seconds")),
        Some(NumberOrString::Float(_)) => Err(serde::de::Error::custom(
            "expires_in is not a number of seconds",
        )),
    }
}

impl fmt::Debug for ProviderTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderTokenResponse")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("other_keys", &self.other.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenResponse for ProviderTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

impl ProviderTokenResponse {
    /// The token type as callers put it in an `Authorization` header.
    pub fn token_type_name(&self) -> String {
        match &self.token_type {
            BasicTokenType::Bearer => "Bearer".into(),
            BasicTokenType::Mac => "MAC".into(),
            BasicTokenType::Extension(other) => other.clone(),
        }
    }

    /// Granted scopes as one space-delimited string, if the provider said.
    pub fn scope(&self) -> Option<String> {
        self.scopes.as_ref().map(|scopes| {
            scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    /// Non-secret, non-standard fields (e.g. Salesforce `instance_url`).
    pub fn extra(&self) -> Map<String, Value> {
        self.other
            .iter()
            .filter(|(key, _)| !NOT_EXTRA.contains(&key.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

type OAuthClient = Client<
    BasicErrorResponse,
    ProviderTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// Why a token request failed, told apart by what the broker must do about it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `invalid_grant`: the code or refresh token is dead (or was already rotated).
    #[error("the provider rejected the grant (invalid_grant){}", describe(.description))]
    InvalidGrant { description: Option<String> },
    /// Any other OAuth error response (`invalid_client`, `unauthorized_client`, ...).
    #[error("the provider answered `{error}`{}", describe(.description))]
    Rejected {
        error: String,
        description: Option<String>,
    },
    /// The provider answered 429 or 5xx; worth trying again.
    #[error("the provider's token endpoint answered HTTP {status}")]
    Unavailable { status: u16 },
    /// No connection could be made (DNS, TCP, TLS): nothing was sent, so it is retryable.
    #[error("the provider's token endpoint could not be reached: {0}")]
    Unreachable(String),
    /// The request was sent but no complete answer came (timeout, reset). Not retried: the
    /// provider may have rotated the refresh token before the answer was lost.
    #[error("no complete answer from the provider's token endpoint: {0}")]
    Transport(String),
    /// A response that is not a valid token response.
    #[error("the provider sent a malformed response ({0})")]
    Malformed(String),
    /// A malformed token response that still carried a new refresh token (kept).
    #[error(
        "the provider sent a malformed token response ({detail}); its new refresh token was kept"
    )]
    MalformedWithRefreshToken {
        detail: String,
        refresh_token: RefreshToken,
    },
    /// The consent yielded no refresh token, so the connection could not be kept alive.
    #[error("the provider issued no refresh token: {0}")]
    NoRefreshToken(&'static str),
    /// A post-consent lookup was refused.
    #[error("the provider's API answered HTTP {status} to {what}")]
    Lookup { what: String, status: u16 },
}

fn describe(description: &Option<String>) -> String {
    match description {
        Some(d) => format!(": {d}"),
        None => String::new(),
    }
}

impl UpstreamError {
    /// True when the request did not reach the provider's grant logic, so trying again
    /// cannot present a spent refresh token: no connection, or 429/503 (refused before
    /// processing). A 500/502/504 may come after the provider rotated the token, so it is
    /// not retried.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable { status: 429 | 503 } | UpstreamError::Unreachable(_)
        )
    }
}

/// A provider as one connection is configured to use it.
pub struct Provider {
    kind: ProviderKind,
    client: OAuthClient,
    scopes: Vec<Scope>,
    authorize_params: Vec<(String, String)>,
    /// Lifetime assumed when the provider sends no `expires_in`.
    pub default_lifetime: Duration,
    /// A refresh token unused this long dies at the provider.
    pub refresh_token_idle_lifetime: Option<Duration>,
    /// The provider refuses a refresh sooner than this after the last one.
    pub min_refresh_interval: Duration,
    lookup: Option<Lookup>,
    /// Callback query parameters kept for callers, as (parameter, response field).
    pub callback_params: &'static [(&'static str, &'static str)],
    require_refresh_token: bool,
    static_extra: Vec<(&'static str, String)>,
}

impl Provider {
    /// Builds the provider for `connection` (with its client secret, resolved by the caller
    /// from the config or Key Vault), redirecting back to `redirect_uri`.
    pub fn new(
        connection: &ConnectionConfig,
        endpoints: (&Url, &Url),
        client_secret: Option<&SecretString>,
        redirect_uri: &Url,
        default_lifetime: Duration,
    ) -> Self {
        let (authorize_url, token_url) = endpoints;
        let mut client = Client::new(ClientId::new(connection.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(authorize_url.clone()))
            .set_token_uri(TokenUrl::from_url(token_url.clone()))
            .set_redirect_uri(RedirectUrl::from_url(redirect_uri.clone()))
            .set_auth_type(match connection.client_auth {
                ClientAuth::Basic => AuthType::BasicAuth,
                ClientAuth::Post => AuthType::RequestBody,
            });
        if let Some(secret) = client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        Self {
            kind: connection.provider,
            client,
            scopes: connection
                .scopes
                .iter()
                .map(|s| Scope::new(s.clone()))
                .collect(),
            authorize_params: connection
                .authorize_params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            default_lifetime: connection.default_lifetime.unwrap_or(default_lifetime),
            refresh_token_idle_lifetime: connection.refresh_token_idle_lifetime,
            min_refresh_interval: connection.min_refresh_interval,
            lookup: connection.lookup.clone(),
            callback_params: connection.callback_params,
            require_refresh_token: connection.require_refresh_token,
            static_extra: connection.static_extra.clone(),
        }
    }

    /// Refuses a consent without a refresh token when the connection cannot live without
    /// one, saying what usually causes it.
    pub fn check_refresh_token(
        &self,
        response: &ProviderTokenResponse,
    ) -> Result<(), UpstreamError> {
        if response.refresh_token().is_some() || !self.require_refresh_token {
            return Ok(());
        }
        let advice = match self.kind {
            ProviderKind::Google => "Google issues one only with access_type=offline and prompt=consent (the preset sends both); remove the app's access at https://myaccount.google.com/permissions and consent again",
            ProviderKind::Salesforce => "the connected app needs the refresh_token (or offline_access) scope",
            _ => "check that the scopes include offline_access (or the provider's equivalent)",
        };
        Err(UpstreamError::NoRefreshToken(advice))
    }

    /// The post-consent lookup (Xero tenants, Exact Online division): fields for callers.
    pub async fn lookup(
        &self,
        http: &UpstreamHttp,
        access_token: &AccessToken,
    ) -> Result<Map<String, Value>, UpstreamError> {
        let mut extra: Map<String, Value> = self
            .static_extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(v.clone())))
            .collect();
        match &self.lookup {
            None => {}
            Some(Lookup::XeroTenants { url }) => {
                let connections = http.get_json(url, access_token).await?;
                let tenants: Vec<Value> = connections
                    .as_array()
                    .ok_or_else(|| {
                        UpstreamError::Malformed("Xero connections is not a list".into())
                    })?
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "tenant_id": c["tenantId"],
                            "tenant_name": c["tenantName"],
                            "tenant_type": c["tenantType"],
                        })
                    })
                    .collect();
                if let [only] = tenants.as_slice() {
                    extra.insert("tenant_id".into(), only["tenant_id"].clone());
                }
                extra.insert("tenants".into(), Value::Array(tenants));
            }
            Some(Lookup::ExactDivision { url }) => {
                let me = http.get_json(url, access_token).await?;
                // OData v2 answers {"d":{"results":[…]}}; some endpoints {"d":[…]}.
                let results = me["d"]["results"].as_array().or_else(|| me["d"].as_array());
                let division = results
                    .and_then(|r| r.first())
                    .map(|user| user["CurrentDivision"].clone())
                    .filter(|d| !d.is_null())
                    .ok_or_else(|| {
                        UpstreamError::Malformed(
                            "Exact Online /current/Me has no CurrentDivision".into(),
                        )
                    })?;
                extra.insert("division".into(), division);
            }
        }
        Ok(extra)
    }

    /// The consent URL: `response_type=code`, scopes, `state`, PKCE S256 and the configured
    /// extra parameters.
    pub fn authorize_url(&self, state: String, verifier: &PkceCodeVerifier) -> Url {
        let mut request = self
            .client
            .authorize_url(|| CsrfToken::new(state))
            .add_scopes(self.scopes.iter().cloned())
            .set_pkce_challenge(PkceCodeChallenge::from_code_verifier_sha256(verifier));
        for (name, value) in &self.authorize_params {
            request = request.add_extra_param(name.as_str(), value.as_str());
        }
        request.url().0
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3) with its PKCE verifier.
    pub async fn exchange_code(
        &self,
        http: &UpstreamHttp,
        code: String,
        verifier: PkceCodeVerifier,
    ) -> Result<ProviderTokenResponse, UpstreamError> {
        self.client
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(verifier)
            .request_async(http)
            .await
            .map_err(classify)
    }

    /// Uses a refresh token (RFC 6749 §6). Scopes are not sent: the provider then grants the
    /// scopes of the original consent, which is what every rotating provider expects.
    pub async fn refresh(
        &self,
        http: &UpstreamHttp,
        refresh_token: &RefreshToken,
    ) -> Result<ProviderTokenResponse, UpstreamError> {
        self.client
            .exchange_refresh_token(refresh_token)
            .request_async(http)
            .await
            .map_err(classify)
    }
}

fn classify(err: RequestTokenError<TransportError, BasicErrorResponse>) -> UpstreamError {
    match err {
        RequestTokenError::ServerResponse(response) => {
            let description = response.error_description().map(|d| truncate(d, 300));
            match response.error() {
                BasicErrorResponseType::InvalidGrant => UpstreamError::InvalidGrant { description },
                other => UpstreamError::Rejected {
                    error: truncate(other.as_ref(), 100),
                    description,
                },
            }
        }
        RequestTokenError::Request(TransportError::Status(status)) => {
            UpstreamError::Unavailable { status }
        }
        RequestTokenError::Request(TransportError::Connect(message)) => {
            UpstreamError::Unreachable(message)
        }
        RequestTokenError::Request(TransportError::Send(message)) => {
            UpstreamError::Transport(message)
        }
        // The serde message can quote the offending value (possibly a token): report only
        // where the document went wrong and what kind of wrong it was.
        RequestTokenError::Parse(err, body) => {
            let kind = match err.inner().classify() {
                serde_json::error::Category::Data => "unexpected or missing field",
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    "not JSON"
                }
                serde_json::error::Category::Io => "unreadable",
            };
            let path = err.path().to_string();
            let detail = if path == "." || path.is_empty() {
                kind.to_owned()
            } else {
                format!("{kind} at `{path}`")
            };
            // A provider that rotates has spent the refresh token we sent once it answers;
            // if its answer names a new one, that must not be thrown away with the rest.
            let salvaged = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("refresh_token")?.as_str().map(str::to_owned))
                .filter(|t| !t.is_empty());
            match salvaged {
                Some(token) => UpstreamError::MalformedWithRefreshToken {
                    detail,
                    refresh_token: RefreshToken::new(token),
                },
                None => UpstreamError::Malformed(detail),
            }
        }
        RequestTokenError::Other(message) => UpstreamError::Malformed(truncate(&message, 200)),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_owned()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

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
    async fn get_json(
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
        response.json().await.map_err(|_| {
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
            let body = response
                .bytes()
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
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ProviderTokenResponse {
        serde_json::from_str(json).expect("valid token response")
    }

    #[test]
    fn lenient_token_response() {
        let r = parse(
            r#"{"access_token":"a","token_type":"bearer","expires_in":"600",
                "scope":"x y","instance_url":"https://i.example","id_token":"secret"}"#,
        );
        assert_eq!(r.token_type_name(), "Bearer");
        assert_eq!(r.expires_in(), Some(Duration::from_secs(600)));
        assert_eq!(r.scope().as_deref(), Some("x y"));
        let extra = r.extra();
        assert_eq!(extra["instance_url"], "https://i.example");
        assert!(!extra.contains_key("id_token"));

        let r = parse(r#"{"access_token":"a"}"#);
        assert_eq!(r.token_type_name(), "Bearer");
        assert_eq!(r.expires_in(), None);
        assert!(r.refresh_token().is_none());
    }

    #[test]
    fn malformed_expiry_is_rejected() {
        assert!(serde_json::from_str::<ProviderTokenResponse>(
            r#"{"access_token":"a","expires_in":"soon"}"#
        )
        .is_err());
    }

    #[test]
    fn debug_shows_no_tokens() {
        let r = parse(r#"{"access_token":"at-secret","refresh_token":"rt-secret","x":"1"}"#);
        let text = format!("{r:?}");
        assert!(!text.contains("secret"), "{text}");
    }
}
