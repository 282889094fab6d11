//! Microsoft Entra ID bearer tokens: how Data Factory's managed identity (or any Entra
//! principal) authenticates to the broker, checked in the app itself.
//!
//! A token is accepted when it is an RS256 JWT signed by a key from the tenant's JWKS
//! (`{authority}/{tenant}/discovery/v2.0/keys`), issued by the tenant (v1
//! `https://sts.windows.net/{tenant}/` — `https://sts.chinacloudapi.cn/{tenant}/` in Azure
//! China — or v2 `{authority}/{tenant}/v2.0`), for one of the
//! configured audiences, unexpired (5 minutes of clock skew allowed), and its `oid` (the
//! principal's object id) is one of the allowed principals.
//!
//! Keys are cached; an unknown `kid` refetches the set (Entra rotates keys), at most once a
//! minute so forged `kid`s cannot turn the broker into a JWKS hammer. No lock on the keys is
//! held while a fetch waits for the network: tokens signed with known keys go on.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use url::Url;

use crate::clock::Clock;
use crate::config::EntraConfig;

/// How often an unknown key id may trigger a JWKS refetch.
const REFETCH_INTERVAL: Duration = Duration::from_secs(60);
/// Keys older than this are refetched regardless.
const MAX_KEY_AGE: Duration = Duration::from_secs(24 * 3600);

fn refetch_interval() -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(REFETCH_INTERVAL).unwrap_or(chrono::TimeDelta::MAX)
}

fn max_key_age() -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(MAX_KEY_AGE).unwrap_or(chrono::TimeDelta::MAX)
}

/// The v1 token issuer's base for an authority: `https://sts.windows.net` for the public
/// and US Government clouds, `https://sts.chinacloudapi.cn` for Azure China (21Vianet)
/// (Microsoft's table of token issuers per national cloud). v2 issuers are
/// `{authority}/{tenant}/v2.0` everywhere.
fn v1_issuer_base(authority: &Url) -> &'static str {
    let host = authority
        .host_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if host.ends_with("chinacloudapi.cn") || host.ends_with("microsoftonline.cn") {
        "https://sts.chinacloudapi.cn"
    } else {
        "https://sts.windows.net"
    }
}

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
    /// The client application the token was issued to (`appid` in v1 tokens, `azp` in v2).
    pub app_id: Option<String>,
}

/// The app role that makes a signed-in user an admin (declared on the broker's app
/// registration; assigned to users or groups in its enterprise application).
pub const ADMIN_ROLE: &str = "TokenBroker.Admin";

/// Who signed in to the admin pages, from a verified id_token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// The user's object id (`oid`).
    pub object_id: String,
    /// `preferred_username` (or `name`), for the pages and logs; not used to decide.
    pub name: Option<String>,
    /// Listed in `admin_principals`, or holding the [`ADMIN_ROLE`] app role.
    pub admin: bool,
}

#[derive(Deserialize)]
struct IdClaims {
    oid: Option<String>,
    tid: Option<String>,
    nonce: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    preferred_username: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    oid: Option<String>,
    tid: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
}

struct Keys {
    set: JwkSet,
    /// When the set was last fetched successfully.
    fetched: Option<DateTime<Utc>>,
    /// When a fetch was last tried, successful or not.
    attempted: Option<DateTime<Utc>>,
}

/// Verifies Entra ID access tokens for one tenant.
pub struct EntraVerifier {
    tenant: String,
    audiences: Vec<String>,
    issuers: Vec<String>,
    /// The v2 issuer alone: what the sign-in's id_tokens (v2.0 endpoints) carry.
    id_token_issuer: [String; 1],
    jwks_url: Url,
    pub(crate) allowed_principals: HashSet<String>,
    pub(crate) admin_principals: HashSet<String>,
    http: reqwest::Client,
    /// A std lock, never held across an await: token checks with known keys go on while a
    /// refetch waits for the network.
    keys: RwLock<Keys>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    clock: Arc<dyn Clock>,
}

impl EntraVerifier {
    pub fn new(config: &EntraConfig, http: reqwest::Client) -> anyhow::Result<Self> {
        Self::with_clock(config, http, Arc::new(crate::clock::SystemClock))
    }

    /// A verifier on `clock` (tests move it by hand).
    pub fn with_clock(
        config: &EntraConfig,
        http: reqwest::Client,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let authority = config.authority.as_str().trim_end_matches('/');
        let tenant = &config.tenant_id;
        Ok(Self {
            tenant: tenant.clone(),
            audiences: config.audiences.clone(),
            issuers: vec![
                format!("{}/{tenant}/", v1_issuer_base(&config.authority)),
                format!("{authority}/{tenant}/v2.0"),
            ],
            id_token_issuer: [format!("{authority}/{tenant}/v2.0")],
            jwks_url: Url::parse(&format!("{authority}/{tenant}/discovery/v2.0/keys"))?,
            allowed_principals: config.allowed_principals.iter().cloned().collect(),
            admin_principals: config.admin_principals.iter().cloned().collect(),
            http,
            keys: RwLock::new(Keys {
                set: JwkSet { keys: Vec::new() },
                fetched: None,
                attempted: None,
            }),
            fetching: tokio::sync::Mutex::new(()),
            clock,
        })
    }

    /// Verifies `token` (an access token for the broker) and returns its principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        if self.audiences.is_empty() {
            // `[auth.entra]` serves only the admins' sign-in: no audience, no bearer tokens.
            return Err(TokenError::Invalid(
                "bearer tokens are not accepted: auth.entra names no audiences".into(),
            ));
        }
        let claims: Claims = self.decode(token, &self.audiences, &self.issuers).await?;
        let object_id = self.check_tenant(claims.tid.as_deref(), claims.oid)?;
        Ok(Principal {
            object_id,
            app_id: claims.appid.or(claims.azp),
        })
    }

    /// Verifies an id_token from the admins' sign-in (OpenID Connect Core §3.1.3.7): the
    /// tenant's signature, the v2 issuer, `aud` = the broker app's `client_id`, `tid`,
    /// `exp`/`nbf`, and the `nonce` this sign-in sent.
    pub async fn verify_id_token(
        &self,
        token: &str,
        client_id: &str,
        nonce: &str,
    ) -> Result<SignedIn, TokenError> {
        let claims: IdClaims = self
            .decode(token, &[client_id.to_owned()], &self.id_token_issuer)
            .await?;
        // Not a secret (it travelled through the browser), but compared in constant time
        // all the same.
        use subtle::ConstantTimeEq;
        let nonce_matches = claims
            .nonce
            .as_deref()
            .is_some_and(|sent| bool::from(sent.as_bytes().ct_eq(nonce.as_bytes())));
        if !nonce_matches {
            return Err(TokenError::Invalid(
                "the nonce is not this sign-in's".into(),
            ));
        }
        let object_id = self.check_tenant(claims.tid.as_deref(), claims.oid)?;
        let admin = self.admin_principals.contains(&object_id)
            || claims.roles.iter().any(|role| role == ADMIN_ROLE);
        Ok(SignedIn {
            object_id,
            name: claims.preferred_username.or(claims.name),
            admin,
        })
    }

    /// The object id, when the token was issued in the configured tenant.
    fn check_tenant(&self, tid: Option<&str>, oid: Option<String>) -> Result<String, TokenError> {
        if tid.is_some_and(|tid| tid != self.tenant) {
            return Err(TokenError::Invalid("issued for another tenant".into()));
        }
        oid.map(|oid| oid.to_ascii_lowercase())
            .ok_or_else(|| TokenError::Invalid("no object id (oid) claim".into()))
    }

    /// Checks `token`'s signature (RS256, a key the tenant publishes), lifetime, audience
    /// and issuer, and returns its claims.
    async fn decode<C: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        audiences: &[String],
        issuers: &[String],
    ) -> Result<C, TokenError> {
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
        validation.set_audience(audiences);
        validation.set_issuer(issuers);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        Ok(jsonwebtoken::decode::<C>(token, &key, &validation)
            .map_err(|err| TokenError::Invalid(describe(&err)))?
            .claims)
    }

    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        if let Some(key) = self.cached_key(kid)? {
            return Ok(key);
        }
        // One fetch at a time; whoever waited here may find the keys it needs fetched.
        let _fetching = self.fetching.lock().await;
        if let Some(key) = self.cached_key(kid)? {
            return Ok(key);
        }
        // One fetch attempt a minute at most, failed or not: made-up key ids must not turn
        // every request into a fetch.
        let now = self.clock.now();
        let recently = self
            .read_keys()
            .attempted
            .is_some_and(|at| now - at < refetch_interval());
        if !recently {
            self.write_keys().attempted = Some(now);
            // No lock on the keys during the network call.
            let fetched = self.fetch().await;
            let mut keys = self.write_keys();
            match fetched {
                Ok(set) => {
                    keys.set = set;
                    keys.fetched = Some(self.clock.now());
                }
                // Keep serving the keys we have; without any, say so.
                Err(err) if keys.set.keys.is_empty() => return Err(err),
                Err(err) => {
                    tracing::warn!(error = %err, "refetching Entra ID keys failed; using the cached ones")
                }
            }
        }
        let keys = self.read_keys();
        if keys.set.keys.is_empty() {
            return Err(TokenError::KeysUnavailable(
                "the tenant's signing keys could not be fetched recently".into(),
            ));
        }
        let jwk = keys.set.find(kid).ok_or_else(|| {
            TokenError::Invalid("signed with a key the tenant does not publish".into())
        })?;
        DecodingKey::from_jwk(jwk).map_err(|_| TokenError::Invalid("unusable signing key".into()))
    }

    /// The key for `kid` when the cached set may be used as it is: fresh, or a refetch was
    /// tried too recently (stale keys still serve while refetching fails).
    fn cached_key(&self, kid: &str) -> Result<Option<DecodingKey>, TokenError> {
        let now = self.clock.now();
        let keys = self.read_keys();
        let fresh = keys.fetched.is_some_and(|at| now - at < max_key_age());
        let refetch_blocked = keys
            .attempted
            .is_some_and(|at| now - at < refetch_interval());
        match (fresh || refetch_blocked, keys.set.find(kid)) {
            (true, Some(jwk)) => DecodingKey::from_jwk(jwk)
                .map(Some)
                .map_err(|_| TokenError::Invalid("unusable signing key".into())),
            _ => Ok(None),
        }
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, Keys> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
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
        let body = crate::http_client::read_capped(response, crate::http_client::PEER_BODY_MAX)
            .await
            .map_err(|err| TokenError::KeysUnavailable(format!("key set: {err}")))?;
        let set: JwkSet = serde_json::from_slice(&body)
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use jsonwebtoken::{EncodingKey, Header};

    use super::*;
    use crate::clock::ManualClock;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const OID: &str = "6a1f2c3d-0000-4000-8000-00000000adf1";

    /// A JWKS endpoint (the test key set) that answers after `delay` ms; counts fetches.
    async fn jwks_server(delay: Arc<AtomicU64>, fetches: Arc<AtomicUsize>) -> Url {
        let app = axum::Router::new().route(
            "/{tenant}/discovery/v2.0/keys",
            axum::routing::get(move || {
                let (delay, fetches) = (Arc::clone(&delay), Arc::clone(&fetches));
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let ms = delay.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    include_str!("../tests/fixtures/entra-jwks.json")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Url::parse(&url).expect("url")
    }

    fn token(authority: &Url, kid: &str) -> String {
        let now = Utc::now().timestamp();
        let claims = serde_json::json!({
            "aud": "api://broker", "iss": format!("{}/{TENANT}/v2.0", authority.as_str().trim_end_matches('/')),
            "iat": now, "nbf": now, "exp": now + 3600, "oid": OID, "tid": TENANT,
        });
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        let key =
            EncodingKey::from_rsa_pem(include_bytes!("../tests/fixtures/entra-signing-key.pem"))
                .expect("key");
        jsonwebtoken::encode(&header, &claims, &key).expect("sign")
    }

    fn config(authority: Url) -> EntraConfig {
        EntraConfig {
            tenant_id: TENANT.to_owned(),
            audiences: vec!["api://broker".to_owned()],
            allowed_principals: vec![OID.to_owned()],
            admin_principals: Vec::new(),
            authority,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_key_refetch_never_holds_up_tokens_signed_with_known_keys() {
        let delay = Arc::new(AtomicU64::new(0));
        let fetches = Arc::new(AtomicUsize::new(0));
        let authority = jwks_server(Arc::clone(&delay), Arc::clone(&fetches)).await;
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let verifier = Arc::new(
            EntraVerifier::with_clock(
                &config(authority.clone()),
                reqwest::Client::new(),
                clock.clone(),
            )
            .expect("verifier"),
        );
        let known = token(&authority, "test-key-1");
        assert_eq!(verifier.verify(&known).await.expect("valid").object_id, OID);
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // A minute on, a token with an unknown key id makes the broker refetch, from a key
        // endpoint that now takes 3 s.
        delay.store(3000, Ordering::SeqCst);
        clock.advance(chrono::Duration::seconds(61));
        let unknown = {
            let (verifier, token) = (Arc::clone(&verifier), token(&authority, "rotated-key"));
            tokio::spawn(async move { verifier.verify(&token).await })
        };
        while fetches.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Meanwhile, tokens signed with a known key are checked at once.
        let checked = tokio::time::timeout(Duration::from_secs(1), verifier.verify(&known))
            .await
            .expect("not held up by the refetch");
        assert_eq!(checked.expect("valid").object_id, OID);
        assert!(matches!(
            unknown.await.expect("join"),
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn v1_issuers_follow_the_authoritys_national_cloud() {
        let issuers = |authority: &str| {
            EntraVerifier::new(
                &config(Url::parse(authority).expect("url")),
                reqwest::Client::new(),
            )
            .expect("verifier")
            .issuers
        };
        assert_eq!(
            issuers("https://login.microsoftonline.com"),
            [
                format!("https://sts.windows.net/{TENANT}/"),
                format!("https://login.microsoftonline.com/{TENANT}/v2.0")
            ]
        );
        assert_eq!(
            issuers("https://login.microsoftonline.us")[0],
            format!("https://sts.windows.net/{TENANT}/")
        );
        assert_eq!(
            issuers("https://login.chinacloudapi.cn"),
            [
                format!("https://sts.chinacloudapi.cn/{TENANT}/"),
                format!("https://login.chinacloudapi.cn/{TENANT}/v2.0")
            ]
        );
        assert_eq!(
            issuers("https://login.partner.microsoftonline.cn")[0],
            format!("https://sts.chinacloudapi.cn/{TENANT}/")
        );
    }
}
