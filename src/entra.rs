//! Microsoft Entra ID bearer tokens: how Data Factory's managed identity (or any Entra
//! principal) authenticates to the broker, checked in the app itself.
//!
//! A token is accepted when it is an RS256 JWT signed by a key from the tenant's JWKS
//! (`{authority}/{tenant}/discovery/v2.0/keys`), issued by the tenant (v1
//! `https://sts.windows.net/{tenant}/` or v2 `{authority}/{tenant}/v2.0`), for one of the
//! configured audiences, unexpired (5 minutes of clock skew allowed), and its `oid` (the
//! principal's object id) is one of the allowed principals.
//!
//! Keys are cached; an unknown `kid` refetches the set (Entra rotates keys), at most once a
//! minute so forged `kid`s cannot turn the broker into a JWKS hammer.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use url::Url;

use crate::config::EntraConfig;

/// How often an unknown key id may trigger a JWKS refetch.
const REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Keys older than this are refetched regardless.
const MAX_KEY_AGE: Duration = Duration::from_secs(24 * 3600);

/// Why a bearer token was refused. The token itself is never part of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("invalid bearer token: {0}")]
    Invalid(String),
    #[error("the signing keys of the tenant could not be fetched: {0}")]
    KeysUnavailable(String),
}

/// What a verified token says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Object id of the principal (for a managed identity, its principal id).
    pub object_id: String,
}

#[derive(Deserialize)]
struct Claims {
    oid: Option<String>,
    tid: Option<String>,
}

struct Keys {
    set: JwkSet,
    /// When the set was last fetched successfully.
    fetched: Option<Instant>,
    /// When a fetch was last tried, successful or not.
    attempted: Option<Instant>,
}

/// Verifies Entra ID access tokens for one tenant.
pub struct EntraVerifier {
    tenant: String,
    audiences: Vec<String>,
    issuers: Vec<String>,
    jwks_url: Url,
    pub(crate) allowed_principals: HashSet<String>,
    pub(crate) admin_principals: HashSet<String>,
    http: reqwest::Client,
    keys: tokio::sync::RwLock<Keys>,
}

impl EntraVerifier {
    pub fn new(config: &EntraConfig, http: reqwest::Client) -> anyhow::Result<Self> {
        let authority = config.authority.as_str().trim_end_matches('/');
        let tenant = &config.tenant_id;
        Ok(Self {
            tenant: tenant.clone(),
            audiences: config.audiences.clone(),
            issuers: vec![
                format!("https://sts.windows.net/{tenant}/"),
                format!("{authority}/{tenant}/v2.0"),
            ],
            jwks_url: Url::parse(&format!("{authority}/{tenant}/discovery/v2.0/keys"))?,
            allowed_principals: config.allowed_principals.iter().cloned().collect(),
            admin_principals: config.admin_principals.iter().cloned().collect(),
            http,
            keys: tokio::sync::RwLock::new(Keys {
                set: JwkSet { keys: Vec::new() },
                fetched: None,
                attempted: None,
            }),
        })
    }

    /// Verifies `token` and returns its principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Invalid("not a JWT".into()))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("no key id (kid)".into()))?;
        let key = self.key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 300;
        // RFC 7519 §4.1.5: a token that is not yet valid must be refused (jsonwebtoken leaves
        // `nbf` unchecked unless asked).
        validation.validate_nbf = true;
        validation.set_audience(&self.audiences);
        validation.set_issuer(&self.issuers);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|err| TokenError::Invalid(describe(&err)))?
            .claims;
        if claims.tid.as_deref().is_some_and(|tid| tid != self.tenant) {
            return Err(TokenError::Invalid("issued for another tenant".into()));
        }
        let object_id = claims
            .oid
            .ok_or_else(|| TokenError::Invalid("no object id (oid) claim".into()))?;
        Ok(Principal { object_id })
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        {
            let keys = self.keys.read().await;
            let fresh = keys.fetched.is_some_and(|at| at.elapsed() < MAX_KEY_AGE);
            // Stale keys still serve while refetching fails (see below).
            let refetch_blocked = keys
                .attempted
                .is_some_and(|at| at.elapsed() < REFETCH_INTERVAL);
            if let (true, Some(jwk)) = (fresh || refetch_blocked, keys.set.find(kid)) {
                return DecodingKey::from_jwk(jwk)
                    .map_err(|_| TokenError::Invalid("unusable signing key".into()));
            }
        }
        let mut keys = self.keys.write().await;
        // One fetch attempt a minute at most, failed or not: another caller may have just
        // refetched, and made-up key ids must not turn every request into a fetch.
        let recently = keys
            .attempted
            .is_some_and(|at| at.elapsed() < REFETCH_INTERVAL);
        if !recently {
            keys.attempted = Some(Instant::now());
            match self.fetch().await {
                Ok(set) => {
                    keys.set = set;
                    keys.fetched = Some(Instant::now());
                }
                // Keep serving the keys we have; without any, say so.
                Err(err) if keys.set.keys.is_empty() => return Err(err),
                Err(err) => {
                    tracing::warn!(error = %err, "refetching Entra ID keys failed; using the cached ones")
                }
            }
        } else if keys.set.keys.is_empty() {
            return Err(TokenError::KeysUnavailable(
                "the tenant's signing keys could not be fetched recently".into(),
            ));
        }
        let jwk = keys.set.find(kid).ok_or_else(|| {
            TokenError::Invalid("signed with a key the tenant does not publish".into())
        })?;
        DecodingKey::from_jwk(jwk).map_err(|_| TokenError::Invalid("unusable signing key".into()))
    }

    async fn fetch(&self) -> Result<JwkSet, TokenError> {
        let response = self
            .http
            .get(self.jwks_url.clone())
            .send()
            .await
            .map_err(|err| TokenError::KeysUnavailable(err.to_string()))?;
        if !response.status().is_success() {
            return Err(TokenError::KeysUnavailable(format!(
                "{} answered HTTP {}",
                self.jwks_url,
                response.status().as_u16()
            )));
        }
        let set: JwkSet = response
            .json()
            .await
            .map_err(|err| TokenError::KeysUnavailable(format!("bad key set: {err}")))?;
        tracing::info!(keys = set.keys.len(), url = %self.jwks_url, "fetched Entra ID signing keys");
        Ok(set)
    }
}

/// jsonwebtoken's messages name the failed check, not token content; keep them short.
fn describe(err: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match err.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not yet valid".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        _ => "malformed".into(),
    }
}
