//! Admins signing in with Entra ID in the browser: OpenID Connect's authorization code flow
//! with PKCE (S256), `state` and `nonce`, against the tenant of `[auth.entra]`, for the
//! broker's own app registration (`[auth.admin_sign_in]`).
//!
//! This module is the broker's side of the protocol: the authorization URL and the code
//! exchange (through the `oauth2` crate, over the token requests' client: no redirects,
//! timeouts), authenticated with the app's client secret or — no secret at all — with a
//! managed-identity token for `api://AzureADTokenExchange` as the `client_assertion`, which
//! the app registration trusts as a federated identity credential. What the id_token says is
//! checked by [`crate::entra::EntraVerifier::verify_id_token`]; the `state`, verifier and
//! nonce come from [`crate::state::StateSigner::issue_sign_in`]; the routes are
//! `http::sign_in`.

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use oauth2::basic::BasicTokenType;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken,
    ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RequestTokenError, Scope,
    StandardTokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::{AdminSignInConfig, EntraConfig, SignInCredential};
use crate::provider::{CodeFlowClient, UpstreamHttp};

/// The audience of the managed-identity token a federated identity credential accepts
/// (Microsoft's "workload identity federation" for managed identities).
pub const TOKEN_EXCHANGE_SCOPE: &str = "api://AzureADTokenExchange/.default";

/// RFC 7523 §2.2: a JWT as the client's credential.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The path Entra ID sends the browser back to (the app registration's redirect URI is
/// `{public_url}` + this).
pub const REDIRECT_PATH: &str = "/api/signin";

/// The id_token beside the standard fields. Its `Debug` shows no token.
#[derive(Clone, Serialize, Deserialize)]
pub struct IdTokenField {
    id_token: Option<String>,
}

impl std::fmt::Debug for IdTokenField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdTokenField([redacted])")
    }
}

impl ExtraTokenFields for IdTokenField {}

type SignInClient = CodeFlowClient<StandardTokenResponse<IdTokenField, BasicTokenType>>;

/// Why a sign-in's code exchange failed. Never a code, a token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The token endpoint refused (`invalid_grant`, `invalid_client`, …).
    #[error("Entra ID refused the sign-in: {0}")]
    Refused(String),
    /// The token endpoint could not be reached or answered nonsense.
    #[error("Entra ID's token endpoint failed: {0}")]
    Unavailable(String),
    /// The managed identity gave no token to present as the client assertion.
    #[error("the managed identity gave no token for the client assertion: {0}")]
    Assertion(String),
}

/// How the broker authenticates at the token endpoint.
enum Credential {
    /// In the client (`client_secret` in the body).
    Secret,
    /// A managed-identity token, fetched for each exchange (the credential caches it).
    ManagedIdentity(Arc<dyn TokenCredential>),
}

/// The broker's app registration, as admins sign in to it.
pub struct AdminSignIn {
    client: SignInClient,
    credential: Credential,
    client_id: String,
    http: UpstreamHttp,
}

impl AdminSignIn {
    /// The sign-in for `config` in `entra`'s tenant, coming back to `public_url` +
    /// [`REDIRECT_PATH`]. `identity` is the managed-identity credential when the config
    /// asks for a client assertion.
    pub fn new(
        config: &AdminSignInConfig,
        entra: &EntraConfig,
        public_url: &Url,
        http: UpstreamHttp,
        identity: Option<Arc<dyn TokenCredential>>,
    ) -> anyhow::Result<Self> {
        let base = format!(
            "{}/{}/oauth2/v2.0",
            entra.authority.as_str().trim_end_matches('/'),
            entra.tenant_id
        );
        let redirect = format!(
            "{}{REDIRECT_PATH}",
            public_url.as_str().trim_end_matches('/')
        );
        let mut client = Client::new(ClientId::new(config.client_id.clone()))
            .set_auth_uri(AuthUrl::new(format!("{base}/authorize"))?)
            .set_token_uri(TokenUrl::new(format!("{base}/token"))?)
            .set_redirect_uri(RedirectUrl::new(redirect)?)
            // Entra ID reads the client's credential from the body.
            .set_auth_type(AuthType::RequestBody);
        let credential = match &config.credential {
            SignInCredential::Secret(secret) => {
                client =
                    client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
                Credential::Secret
            }
            SignInCredential::ManagedIdentity(_) => Credential::ManagedIdentity(
                identity.ok_or_else(|| anyhow::anyhow!("no managed identity credential"))?,
            ),
        };
        Ok(Self {
            client,
            credential,
            client_id: config.client_id.clone(),
            http,
        })
    }

    /// The app registration's client id (the id_token's audience).
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Where the browser signs in: `response_type=code`, `scope=openid profile`, the
    /// `state`, the `nonce` and the PKCE S256 challenge.
    pub fn authorize_url(&self, state: String, nonce: &str, verifier: &PkceCodeVerifier) -> Url {
        self.client
            .authorize_url(|| CsrfToken::new(state))
            .add_scopes([Scope::new("openid".into()), Scope::new("profile".into())])
            .add_extra_param("nonce", nonce)
            // The code comes back in the query, to a GET route.
            .add_extra_param("response_mode", "query")
            .set_pkce_challenge(PkceCodeChallenge::from_code_verifier_sha256(verifier))
            .url()
            .0
    }

    /// Exchanges the code (with its PKCE verifier) for the id_token.
    pub async fn exchange(
        &self,
        code: String,
        verifier: PkceCodeVerifier,
    ) -> Result<SecretString, SignInError> {
        let mut request = self
            .client
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(verifier);
        let assertion;
        if let Credential::ManagedIdentity(identity) = &self.credential {
            assertion = identity
                .get_token(&[TOKEN_EXCHANGE_SCOPE], None)
                .await
                .map_err(|err| SignInError::Assertion(err.to_string()))?;
            request = request
                .add_extra_param("client_assertion_type", JWT_BEARER)
                .add_extra_param("client_assertion", assertion.token.secret());
        }
        let response = request
            .request_async(&self.http)
            .await
            .map_err(|err| match err {
                RequestTokenError::ServerResponse(response) => {
                    SignInError::Refused(response.error().to_string())
                }
                RequestTokenError::Request(err) => SignInError::Unavailable(err.to_string()),
                RequestTokenError::Parse(..) => {
                    SignInError::Unavailable("the token response is not OAuth JSON".into())
                }
                RequestTokenError::Other(what) => SignInError::Unavailable(what),
            })?;
        response
            .extra_fields()
            .id_token
            .clone()
            .map(SecretString::from)
            .ok_or_else(|| SignInError::Unavailable("the token response has no id_token".into()))
    }
}
