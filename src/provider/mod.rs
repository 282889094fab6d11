//! A configured provider: its endpoints and client credentials, and the two token requests
//! (code exchange, refresh) made through the `oauth2` crate.
//!
//! Security notes: the HTTP client used here never follows redirects (a token request that
//! is redirected could carry the client secret or a code elsewhere) and has timeouts. Error
//! values carry the provider's OAuth error code and description, never a response body,
//! because a malformed body may well contain a token.

//!
//! # Layout
//! - this file: [`Provider`], a connection's provider and its token requests;
//! - `response`: the lenient token response (string `expires_in`, extra fields callers need);
//! - `error`: [`UpstreamError`], told apart by what the broker must do;
//! - `transport`: [`UpstreamHttp`], the one HTTP client for token requests (no redirects);
//! - `discovery`: [`discover`], an OIDC issuer's endpoints (https only, off this machine).

mod discovery;
mod error;
mod response;
mod transport;

pub use discovery::discover;
pub use error::UpstreamError;
pub use response::ProviderTokenResponse;
pub use transport::{TransportError, UpstreamHttp};

use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
};
use oauth2::{
    AccessToken, AuthType, AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken,
    EndpointNotSet, EndpointSet, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken,
    Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Map;
use url::Url;

use crate::config::{ClientAuth, ConnectionConfig, ProviderKind};
use crate::presets::{Fact, Lookup};
use crate::token::{Facts, Id, Organisation};

use error::classify;

/// An `oauth2` client with an authorization and a token endpoint (the code flow), whose
/// token endpoint answers `TR`.
pub type CodeFlowClient<TR> = Client<
    BasicErrorResponse,
    TR,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

pub(super) type OAuthClient = CodeFlowClient<ProviderTokenResponse>;

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
    /// A limit on the grant's life from consent (configured, or the provider's cap).
    pub grant_lifetime: Option<crate::config::GrantLifetime>,
    /// The provider refuses a refresh sooner than this after the last one.
    pub min_refresh_interval: Duration,
    lookup: Option<Lookup>,
    /// Callback query parameters kept for callers, as (parameter, response field).
    pub callback_params: &'static [(&'static str, Fact)],
    require_refresh_token: Option<&'static str>,
    static_extra: Vec<(&'static str, String)>,
}

impl Provider {
    /// Which preset this provider is.
    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

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
            grant_lifetime: connection.grant_lifetime,
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
        match self.require_refresh_token {
            Some(advice) if response.refresh_token().is_none() => {
                Err(UpstreamError::NoRefreshToken(advice))
            }
            _ => Ok(()),
        }
    }

    /// The post-consent lookup (Xero tenants, Exact Online division): fields for callers.
    pub async fn lookup(
        &self,
        http: &UpstreamHttp,
        access_token: &AccessToken,
    ) -> Result<Facts, UpstreamError> {
        let mut facts = Facts::from_fields(self.static_extra.iter().map(|(k, v)| (*k, v.clone())));
        match &self.lookup {
            None => {}
            Some(Lookup::XeroTenants { url }) => {
                let connections = http.get_json(url, access_token).await?;
                let organisations = connections
                    .as_array()
                    .ok_or_else(|| {
                        UpstreamError::Malformed("Xero connections is not a list".into())
                    })?
                    .iter()
                    // An entry without an id names no organisation a caller could pick.
                    .filter_map(|c| {
                        let text = |field: &str| c[field].as_str().map(str::to_owned);
                        Some(Organisation {
                            tenant_id: text("tenantId")?,
                            tenant_name: text("tenantName"),
                            rest: Map::from_iter([("tenant_type".into(), c["tenantType"].clone())]),
                        })
                    })
                    .collect();
                facts.organisations = Some(organisations);
            }
            Some(Lookup::ExactDivision { url }) => {
                let me = http.get_json(url, access_token).await?;
                // OData v2 answers {"d":{"results":[…]}}; some endpoints {"d":[…]}.
                let results = me["d"]["results"].as_array().or_else(|| me["d"].as_array());
                let division = results
                    .and_then(|r| r.first())
                    .and_then(|user| Id::deserialize(&user["CurrentDivision"]).ok())
                    .ok_or_else(|| {
                        UpstreamError::Malformed(
                            "Exact Online /current/Me has no CurrentDivision".into(),
                        )
                    })?;
                facts.division = Some(division);
            }
        }
        Ok(facts)
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
        let facts = r.extra();
        assert_eq!(facts.instance_url.as_deref(), Some("https://i.example"));
        assert!(!facts.rest.contains_key("id_token"));

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
