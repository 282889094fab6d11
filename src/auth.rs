//! Caller authentication, done in the app itself so it holds off-Azure too.
//!
//! Callers present an API key in `X-API-Key`. Keys are compared as SHA-256 digests with a
//! constant-time equality, and every configured key is compared, so neither the position
//! of a match nor the length of a key shows in the timing.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// Header carrying an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// What a route needs of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Machine callers of `/api/refresh`.
    Caller,
    /// Admins: consent and status routes.
    Admin,
}

/// Why a caller was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key (send it in the X-API-Key header)")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("this key may not use admin routes")]
    NotAdmin,
}

/// The configured keys.
pub struct CallerAuth {
    api_keys: Vec<[u8; 32]>,
    admin_keys: Vec<[u8; 32]>,
    anonymous: bool,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn digests(keys: &[SecretString]) -> Vec<[u8; 32]> {
    keys.iter().map(|k| digest(k.expose_secret())).collect()
}

fn contains(keys: &[[u8; 32]], presented: &[u8; 32]) -> bool {
    keys.iter()
        .fold(subtle::Choice::from(0), |found, key| {
            found | key.ct_eq(presented)
        })
        .into()
}

impl CallerAuth {
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            api_keys: digests(&config.api_keys),
            admin_keys: digests(&config.admin_keys),
            anonymous: config.allow_anonymous,
        }
    }

    /// True when anyone may call every route.
    pub fn is_anonymous(&self) -> bool {
        self.anonymous
    }

    /// True when no admin key exists, so admin routes refuse everyone.
    pub fn has_admin_keys(&self) -> bool {
        !self.admin_keys.is_empty()
    }

    /// Checks a presented key for a route needing `role`. Admin keys are good for every route.
    pub fn check(&self, presented: Option<&str>, role: Role) -> Result<(), AuthError> {
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
        CallerAuth::new(&AuthConfig {
            api_keys: vec![SecretString::from("caller-key-0123456789")],
            admin_keys: vec![SecretString::from("admin-key-0123456789")],
            allow_anonymous: false,
        })
    }

    #[test]
    fn roles() {
        let a = auth();
        assert_eq!(a.check(Some("caller-key-0123456789"), Role::Caller), Ok(()));
        assert_eq!(a.check(Some("admin-key-0123456789"), Role::Caller), Ok(()));
        assert_eq!(a.check(Some("admin-key-0123456789"), Role::Admin), Ok(()));
        assert_eq!(
            a.check(Some("caller-key-0123456789"), Role::Admin),
            Err(AuthError::NotAdmin)
        );
        assert_eq!(
            a.check(Some("caller-key-012345678"), Role::Caller),
            Err(AuthError::Invalid)
        );
        assert_eq!(a.check(None, Role::Caller), Err(AuthError::Missing));
        assert_eq!(a.check(Some(""), Role::Caller), Err(AuthError::Missing));
    }

    #[test]
    fn anonymous_allows_everything() {
        let a = CallerAuth::new(&AuthConfig {
            allow_anonymous: true,
            ..AuthConfig::default()
        });
        assert_eq!(a.check(None, Role::Admin), Ok(()));
    }
}
