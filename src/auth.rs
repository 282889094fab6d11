//! Caller authentication, done in the app itself so it holds off-Azure too.
//!
//! Two ways in: an Entra ID bearer token (`Authorization: Bearer …`, e.g. Data Factory's
//! managed identity; see [`crate::entra`]) from an allowed principal, or an API key in
//! `X-API-Key`. Keys are compared as SHA-256 digests with a constant-time equality, and
//! every configured key is compared, so neither the position of a match nor the length of a
//! key shows in the timing.

use axum::http::{header, HeaderMap, HeaderName};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;
use crate::entra::{EntraVerifier, TokenError};

/// Header carrying an API key (a typed name: looking it up by `&str` would parse it on
/// every request).
pub const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Machine callers of `/api/refresh`.
    Caller,
    /// Admins: consent and status routes.
    Admin,
}

/// Why a caller was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials (send an Entra ID bearer token, or an API key in the X-API-Key header)")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("this key may not use admin routes")]
    NotAdmin,
    #[error("invalid bearer token: {0}")]
    InvalidToken(String),
    /// The tenant's signing keys could not be fetched: nobody can be checked right now.
    #[error("the signing keys of the tenant could not be fetched: {0}")]
    KeysUnavailable(String),
    #[error("bearer tokens are not accepted: no [auth.entra] is configured")]
    NoEntra,
    #[error("the principal {0} is not allowed{1}")]
    PrincipalNotAllowed(String, &'static str),
}

impl From<TokenError> for AuthError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Invalid(why) => AuthError::InvalidToken(why),
            TokenError::KeysUnavailable(why) => AuthError::KeysUnavailable(why),
        }
    }
}

/// The configured ways in.
pub struct CallerAuth {
    api_keys: Vec<[u8; 32]>,
    admin_keys: Vec<[u8; 32]>,
    anonymous: bool,
    entra: Option<EntraVerifier>,
}

/// A key as it is kept and compared: its SHA-256 digest.
pub(crate) fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn digests(keys: &[SecretString]) -> Vec<[u8; 32]> {
    keys.iter().map(|k| digest(k.expose_secret())).collect()
}

/// Whether `presented` is one of `keys`, comparing every key in full and in constant time.
/// Compared as four 64-bit words rather than 32 bytes: `subtle` puts an optimisation
/// barrier after each element, and this runs on every request.
pub(crate) fn contains(keys: &[[u8; 32]], presented: &[u8; 32]) -> bool {
    let presented = words(presented);
    keys.iter()
        .fold(subtle::Choice::from(0), |found, key| {
            found | words(key).ct_eq(&presented)
        })
        .into()
}

fn words(digest: &[u8; 32]) -> [u64; 4] {
    std::array::from_fn(|i| {
        let mut word = [0; 8];
        word.copy_from_slice(&digest[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(word)
    })
}

impl CallerAuth {
    /// `http` fetches the Entra ID signing keys when bearer tokens are configured.
    pub fn new(config: &AuthConfig, http: &reqwest::Client) -> anyhow::Result<Self> {
        Ok(Self {
            api_keys: digests(&config.api_keys),
            admin_keys: digests(&config.admin_keys),
            anonymous: config.allow_anonymous,
            entra: config
                .entra
                .as_ref()
                .map(|entra| EntraVerifier::new(entra, http.clone()))
                .transpose()?,
        })
    }

    /// A digest of the admin key set, whatever its order: admin sessions are bound to it,
    /// so adding or removing an admin key ends them.
    pub fn admin_generation(&self) -> [u8; 32] {
        let mut keys = self.admin_keys.clone();
        keys.sort_unstable();
        let mut hasher = Sha256::new();
        hasher.update(b"admin-keys");
        for key in &keys {
            hasher.update(key);
        }
        hasher.finalize().into()
    }

    /// True when anyone may call every route.
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// True when some admin credential exists, so admin routes are usable at all.
    pub fn has_admins(&self) -> bool {
        !self.admin_keys.is_empty()
            || self
                .entra
                .as_ref()
                .is_some_and(|e| !e.admin_principals.is_empty())
    }

    /// Authenticates a request for a route needing `role`: a bearer token if one is sent,
    /// else the API key from `X-API-Key` (never from the URL: a browser's `?key=` is
    /// exchanged for a session cookie by the browser routes themselves).
    pub async fn authenticate(&self, headers: &HeaderMap, role: Role) -> Result<(), AuthError> {
        if self.anonymous {
            return Ok(());
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if let Some(token) = bearer {
            let entra = self.entra.as_ref().ok_or(AuthError::NoEntra)?;
            let principal = entra.verify(token.trim()).await?;
            let admin = entra.admin_principals.contains(&principal.object_id);
            let caller = entra.allowed_principals.contains(&principal.object_id);
            return match role {
                _ if admin => Ok(()),
                Role::Caller if caller => Ok(()),
                Role::Admin if caller => Err(AuthError::PrincipalNotAllowed(
                    principal.object_id,
                    " to use admin routes",
                )),
                _ => Err(AuthError::PrincipalNotAllowed(principal.object_id, "")),
            };
        }
        let key = headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok());
        self.check_key(key, role)
    }

    /// Checks an API key for a route needing `role`. Admin keys are good for every route.
    pub fn check_key(&self, presented: Option<&str>, role: Role) -> Result<(), AuthError> {
        if self.anonymous {
            return Ok(());
        }
        let presented = presented
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        let presented = digest(presented);
        let admin = contains(&self.admin_keys, &presented);
        let caller = contains(&self.api_keys, &presented);
        match role {
            _ if admin => Ok(()),
            Role::Caller if caller => Ok(()),
            Role::Admin if caller => Err(AuthError::NotAdmin),
            _ => Err(AuthError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> CallerAuth {
        CallerAuth::new(
            &AuthConfig {
                api_keys: vec![SecretString::from("caller-key-0123456789")],
                admin_keys: vec![SecretString::from("admin-key-0123456789")],
                allow_anonymous: false,
                entra: None,
            },
            &reqwest::Client::new(),
        )
        .expect("auth")
    }

    #[test]
    fn roles() {
        let a = auth();
        assert_eq!(
            a.check_key(Some("caller-key-0123456789"), Role::Caller),
            Ok(())
        );
        assert_eq!(
            a.check_key(Some("admin-key-0123456789"), Role::Caller),
            Ok(())
        );
        assert_eq!(
            a.check_key(Some("admin-key-0123456789"), Role::Admin),
            Ok(())
        );
        assert_eq!(
            a.check_key(Some("caller-key-0123456789"), Role::Admin),
            Err(AuthError::NotAdmin)
        );
        assert_eq!(
            a.check_key(Some("caller-key-012345678"), Role::Caller),
            Err(AuthError::Invalid)
        );
        assert_eq!(a.check_key(None, Role::Caller), Err(AuthError::Missing));
        assert_eq!(a.check_key(Some(""), Role::Caller), Err(AuthError::Missing));
    }

    #[test]
    fn every_byte_of_a_digest_counts() {
        let key = [7u8; 32];
        for i in 0..32 {
            let mut other = key;
            other[i] ^= 0x80;
            assert!(!contains(&[key], &other), "byte {i}");
        }
        assert!(contains(&[[0; 32], key], &key));
        assert!(!contains(&[], &key));
    }

    #[tokio::test]
    async fn bearer_tokens_need_entra_configured() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer abc".parse().expect("header"));
        assert_eq!(
            auth().authenticate(&headers, Role::Caller).await,
            Err(AuthError::NoEntra)
        );
    }

    #[test]
    fn anonymous_allows_everything() {
        let a = CallerAuth::new(
            &AuthConfig {
                allow_anonymous: true,
                ..AuthConfig::default()
            },
            &reqwest::Client::new(),
        )
        .expect("auth");
        assert_eq!(a.check_key(None, Role::Admin), Ok(()));
    }
}
