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

use std::collections::HashMap;

use crate::config::{AuthConfig, NamedKey};
use crate::entra::{EntraVerifier, SignedIn, TokenError};

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
    /// An authenticated caller the connection's `callers` do not name.
    #[error("{0} may not take connection `{1}`'s tokens: its `callers` do not name it")]
    CallerNotAllowed(String, String),
}

impl From<TokenError> for AuthError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Invalid(why) => AuthError::InvalidToken(why),
            TokenError::KeysUnavailable(why) => AuthError::KeysUnavailable(why),
        }
    }
}

/// Who a request's credential names. Logs and the audit trail know a caller by
/// [`Caller::name`]; `callers` lists of connections use the same names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An API key, by its configured name.
    Key { name: String, admin: bool },
    /// An Entra ID principal, by its object id (with the client's app id when the token
    /// carries one).
    Principal {
        object_id: String,
        app_id: Option<String>,
        admin: bool,
    },
    /// Anyone: `auth.allow_anonymous`.
    Anonymous,
}

impl Caller {
    /// Admins (and anonymous access) may take every connection and use every route.
    pub fn is_admin(&self) -> bool {
        match self {
            Caller::Key { admin, .. } | Caller::Principal { admin, .. } => *admin,
            Caller::Anonymous => true,
        }
    }

    /// The key's name, the principal's object id, or `anonymous`.
    pub fn name(&self) -> &str {
        match self {
            Caller::Key { name, .. } => name,
            Caller::Principal { object_id, .. } => object_id,
            Caller::Anonymous => "anonymous",
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Key { name, .. } => write!(f, "the key `{name}`"),
            Caller::Principal { object_id, .. } => write!(f, "the principal {object_id}"),
            Caller::Anonymous => f.write_str("an anonymous caller"),
        }
    }
}

/// Keys by name, kept as their SHA-256 digests.
#[derive(Default)]
struct Keys {
    names: Vec<String>,
    digests: Vec<[u8; 32]>,
}

impl Keys {
    fn of(keys: &[NamedKey]) -> Keys {
        Keys {
            names: keys.iter().map(|k| k.name.clone()).collect(),
            digests: keys.iter().map(|k| digest(k.key.expose_secret())).collect(),
        }
    }

    /// The name of the key whose digest `presented` is, comparing every key in full.
    fn find(&self, presented: &[u8; 32]) -> Option<&str> {
        let at = position(&self.digests, presented)?;
        self.names.get(at).map(String::as_str)
    }
}

/// The configured ways in, and who may take which connection.
pub struct CallerAuth {
    api_keys: Keys,
    admin_keys: Keys,
    anonymous: bool,
    entra: Option<EntraVerifier>,
    /// Connection → the callers (key names, object ids) its `callers` lists; a connection
    /// without `callers` is not here and serves every authenticated caller.
    callers: HashMap<String, Vec<String>>,
    /// Admins sign in with Entra ID in the browser.
    sign_in: bool,
}

/// A key as it is kept and compared: its SHA-256 digest.
pub(crate) fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Whether `presented` is one of `keys`, comparing every key in full and in constant time.
pub(crate) fn contains(keys: &[[u8; 32]], presented: &[u8; 32]) -> bool {
    position(keys, presented).is_some()
}

/// Where `presented` is in `keys`, comparing every key in full and in constant time (the
/// index is chosen with `subtle`'s conditional assignment, not a branch). Compared as four
/// 64-bit words rather than 32 bytes: `subtle` puts an optimisation barrier after each
/// element, and this runs on every request.
fn position(keys: &[[u8; 32]], presented: &[u8; 32]) -> Option<usize> {
    use subtle::ConditionallySelectable;
    let presented = words(presented);
    let mut found = u64::MAX;
    for (i, key) in keys.iter().enumerate() {
        found.conditional_assign(&(i as u64), words(key).ct_eq(&presented));
    }
    (found != u64::MAX).then_some(found as usize)
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
            api_keys: Keys::of(&config.api_keys),
            admin_keys: Keys::of(&config.admin_keys),
            anonymous: config.allow_anonymous,
            entra: config
                .entra
                .as_ref()
                .map(|entra| EntraVerifier::new(entra, http.clone()))
                .transpose()?,
            callers: HashMap::new(),
            sign_in: config.admin_sign_in.is_some(),
        })
    }

    /// Verifies an admin sign-in's id_token (for the broker app `client_id`, carrying
    /// `nonce`): who signed in, and whether they are an admin.
    pub async fn verify_sign_in(
        &self,
        id_token: &SecretString,
        client_id: &str,
        nonce: &str,
    ) -> Result<SignedIn, TokenError> {
        let entra = self
            .entra
            .as_ref()
            .ok_or_else(|| TokenError::Invalid("no [auth.entra] tenant is configured".into()))?;
        entra
            .verify_id_token(id_token.expose_secret(), client_id, nonce)
            .await
    }

    /// Who may take each connection: its `callers`, for the connections that have them.
    pub fn with_callers<'a>(
        mut self,
        connections: impl IntoIterator<Item = (&'a String, &'a Option<Vec<String>>)>,
    ) -> Self {
        self.callers = connections
            .into_iter()
            .filter_map(|(name, callers)| Some((name.clone(), callers.clone()?)))
            .collect();
        self
    }

    /// A digest of the admin key set, whatever its order: admin sessions are bound to it,
    /// so adding or removing an admin key ends them.
    pub fn admin_generation(&self) -> [u8; 32] {
        let mut keys = self.admin_keys.digests.clone();
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
        self.sign_in
            || !self.admin_keys.digests.is_empty()
            || self
                .entra
                .as_ref()
                .is_some_and(|e| !e.admin_principals.is_empty())
    }

    /// Authenticates a request for a route needing `role`: a bearer token if one is sent,
    /// else the API key from `X-API-Key` (never from the URL: a browser's `?key=` is
    /// exchanged for a session cookie by the browser routes themselves).
    pub async fn authenticate(&self, headers: &HeaderMap, role: Role) -> Result<Caller, AuthError> {
        if self.anonymous {
            return Ok(Caller::Anonymous);
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
                _ if admin || (role == Role::Caller && caller) => Ok(Caller::Principal {
                    object_id: principal.object_id,
                    app_id: principal.app_id,
                    admin,
                }),
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

    /// [`Self::authenticate`] for a route that hands out `connection`'s tokens (its
    /// `/api/refresh`, its proxy): the caller must also be one the connection serves.
    pub async fn authenticate_for(
        &self,
        headers: &HeaderMap,
        connection: &str,
    ) -> Result<Caller, AuthError> {
        let caller = self.authenticate(headers, Role::Caller).await?;
        self.may_take(&caller, connection)?;
        Ok(caller)
    }

    /// Whether `caller` may take `connection`'s tokens: admins always; anyone else when the
    /// connection lists no `callers`, or lists them. The refusal names the caller, never
    /// the list.
    pub fn may_take(&self, caller: &Caller, connection: &str) -> Result<(), AuthError> {
        match self.callers.get(connection) {
            Some(allowed) if !caller.is_admin() && !allowed.iter().any(|c| c == caller.name()) => {
                Err(AuthError::CallerNotAllowed(
                    caller.to_string(),
                    connection.to_owned(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Checks an API key for a route needing `role`. Admin keys are good for every route.
    pub fn check_key(&self, presented: Option<&str>, role: Role) -> Result<Caller, AuthError> {
        if self.anonymous {
            return Ok(Caller::Anonymous);
        }
        let presented = presented
            .filter(|k| !k.is_empty())
            .ok_or(AuthError::Missing)?;
        let presented = digest(presented);
        // Both lists are searched whatever the first finds: the timing shows neither.
        let admin = self.admin_keys.find(&presented);
        let caller = self.api_keys.find(&presented);
        match (role, admin, caller) {
            (_, Some(name), _) => Ok(Caller::Key {
                name: name.to_owned(),
                admin: true,
            }),
            (Role::Caller, None, Some(name)) => Ok(Caller::Key {
                name: name.to_owned(),
                admin: false,
            }),
            (Role::Admin, None, Some(_)) => Err(AuthError::NotAdmin),
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
                api_keys: vec![NamedKey::new("ci", "caller-key-0123456789")],
                admin_keys: vec![NamedKey::new("root", "admin-key-0123456789")],
                allow_anonymous: false,
                entra: None,
                admin_sign_in: None,
            },
            &reqwest::Client::new(),
        )
        .expect("auth")
    }

    #[test]
    fn roles() {
        let a = auth();
        let key = |name: &str, admin| {
            Ok(Caller::Key {
                name: name.into(),
                admin,
            })
        };
        assert_eq!(
            a.check_key(Some("caller-key-0123456789"), Role::Caller),
            key("ci", false)
        );
        assert_eq!(
            a.check_key(Some("admin-key-0123456789"), Role::Caller),
            key("root", true)
        );
        assert_eq!(
            a.check_key(Some("admin-key-0123456789"), Role::Admin),
            key("root", true)
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
        assert_eq!(position(&[[0; 32], key, [1; 32]], &key), Some(1));
        assert_eq!(
            position(&[key, key], &key),
            Some(1),
            "the last match: every key is compared"
        );
    }

    #[test]
    fn a_connection_with_callers_serves_those_and_admins_only() {
        let callers = Some(vec![
            "ci".to_owned(),
            "6d3a1c4e-0000-4000-8000-00000000adf1".to_owned(),
        ]);
        let open = None;
        let names = ["xero".to_owned(), "open".to_owned()];
        let a = auth().with_callers([(&names[0], &callers), (&names[1], &open)]);
        let key = |name: &str, admin| Caller::Key {
            name: name.into(),
            admin,
        };
        let principal = |object_id: &str| Caller::Principal {
            object_id: object_id.into(),
            app_id: None,
            admin: false,
        };
        assert_eq!(a.may_take(&key("ci", false), "xero"), Ok(()));
        assert_eq!(
            a.may_take(&principal("6d3a1c4e-0000-4000-8000-00000000adf1"), "xero"),
            Ok(())
        );
        assert_eq!(
            a.may_take(&key("root", true), "xero"),
            Ok(()),
            "admins take everything"
        );
        assert_eq!(a.may_take(&Caller::Anonymous, "xero"), Ok(()));
        let refused = a
            .may_take(&key("ops", false), "xero")
            .expect_err("not listed");
        let text = refused.to_string();
        assert!(text.contains("`ops`") && text.contains("xero"), "{text}");
        assert!(
            !text.contains("ci") && !text.contains("6d3a"),
            "never the list: {text}"
        );
        assert!(a
            .may_take(&principal("7e000000-0000-4000-8000-000000000001"), "xero")
            .is_err());
        assert_eq!(
            a.may_take(&key("ops", false), "open"),
            Ok(()),
            "no callers: everyone"
        );
        assert_eq!(
            a.may_take(&key("ops", false), "unknown"),
            Ok(()),
            "404 comes later"
        );
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
        assert_eq!(a.check_key(None, Role::Admin), Ok(Caller::Anonymous));
    }
}
