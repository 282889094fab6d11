//! The `[auth]` section: caller and admin keys, anonymous access, Entra ID bearer tokens.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;

use super::values::{is_guid, parse_base_url, secrets};
use super::ConfigError;

/// How callers prove who they are (checked in the app itself, not by the host).
#[derive(Debug, Default)]
pub struct AuthConfig {
    /// Keys accepted in `X-API-Key` for `/api/refresh`.
    pub api_keys: Vec<NamedKey>,
    /// Keys accepted for admin routes (`/api/authorize`), and for everything else too.
    pub admin_keys: Vec<NamedKey>,
    /// Serve without any caller authentication. Only when explicitly set.
    pub allow_anonymous: bool,
    /// Entra ID bearer tokens (Data Factory's managed identity).
    pub entra: Option<EntraConfig>,
    /// Admins signing in with Entra ID in the browser (`[auth.admin_sign_in]`).
    pub admin_sign_in: Option<AdminSignInConfig>,
}

/// `[auth.admin_sign_in]`: the broker's own app registration, which admins sign in to with
/// OpenID Connect (the tenant and authority are `[auth.entra]`'s).
#[derive(Debug, Clone)]
pub struct AdminSignInConfig {
    /// The app registration's application (client) id: the id_token's `aud`.
    pub client_id: String,
    /// How the broker proves it is that app at the token endpoint.
    pub credential: SignInCredential,
}

/// The broker's credential at the tenant's token endpoint.
#[derive(Debug, Clone)]
pub enum SignInCredential {
    /// A client secret of the app registration.
    Secret(SecretString),
    /// No secret: the app trusts the broker's managed identity (a federated identity
    /// credential), and a managed-identity token for `api://AzureADTokenExchange` is the
    /// `client_assertion`. `Some(client id)` for a user-assigned identity.
    ManagedIdentity(Option<String>),
}

/// A key and the name logs, the audit trail and connections' `callers` know it by.
#[derive(Debug, Clone)]
pub struct NamedKey {
    pub name: String,
    pub key: SecretString,
}

impl NamedKey {
    pub fn new(name: &str, key: &str) -> NamedKey {
        NamedKey {
            name: name.to_owned(),
            key: SecretString::from(key.to_owned()),
        }
    }
}

/// Keys as the file writes them: a table of name → key, or a plain list, whose entries are
/// named by position (`key-1`, `key-2`, … for `api_keys`; `admin-key-1`, … for
/// `admin_keys`).
#[derive(Debug, Default)]
pub(super) struct RawKeys {
    named: bool,
    entries: Vec<(String, String)>,
}

impl RawKeys {
    /// `(config key, name, value)` for each entry: `auth.api_keys[0]` or
    /// `auth.api_keys.finance`.
    pub(super) fn entries<'a>(
        &'a self,
        list: &'a str,
        unnamed: &'a str,
    ) -> impl Iterator<Item = (String, String, &'a str)> + 'a {
        self.entries
            .iter()
            .enumerate()
            .map(move |(i, (name, value))| {
                if self.named {
                    (format!("{list}.{name}"), name.clone(), value.as_str())
                } else {
                    (
                        format!("{list}[{i}]"),
                        format!("{unnamed}-{}", i + 1),
                        value.as_str(),
                    )
                }
            })
    }
}

impl<'de> Deserialize<'de> for RawKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = RawKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of named keys ({ finance = \"…\" }) or a list of keys")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawKeys, A::Error> {
                let mut entries = Vec::new();
                while let Some(value) = seq.next_element::<String>()? {
                    entries.push((String::new(), value));
                }
                Ok(RawKeys {
                    named: false,
                    entries,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawKeys, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, String>()? {
                    entries.push(entry);
                }
                Ok(RawKeys {
                    named: true,
                    entries,
                })
            }
        }
        deserializer.deserialize_any(Keys)
    }
}

/// Which Entra ID tokens are accepted, and from whom.
#[derive(Debug, Clone)]
pub struct EntraConfig {
    pub tenant_id: String,
    /// Accepted `aud` values: the broker's Application ID URI and/or client id.
    pub audiences: Vec<String>,
    /// Object ids (`oid`) that may call `/api/refresh`.
    pub allowed_principals: Vec<String>,
    /// Object ids that may also use admin routes.
    pub admin_principals: Vec<String>,
    /// `https://login.microsoftonline.com`, or a sovereign cloud's.
    pub authority: Url,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    // Read by the file-wide checks too (placeholders, the host's relay).
    #[serde(default)]
    pub(super) api_keys: RawKeys,
    #[serde(default)]
    pub(super) admin_keys: RawKeys,
    #[serde(default)]
    pub(super) allow_anonymous: bool,
    entra: Option<RawEntra>,
    pub(super) admin_sign_in: Option<RawAdminSignIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdminSignIn {
    client_id: String,
    pub(super) client_secret: Option<String>,
    client_assertion: Option<String>,
    managed_identity_client_id: Option<String>,
}

/// What `client_assertion` accepts: the broker's managed identity.
const MANAGED_IDENTITY_ASSERTION: &str = "managed-identity";

impl RawAdminSignIn {
    fn validate(self, entra: Option<&EntraConfig>) -> Result<AdminSignInConfig, ConfigError> {
        if entra.is_none() {
            return Err(ConfigError::key(
                "auth.admin_sign_in",
                "needs [auth.entra] for the tenant (tenant_id, and authority outside the public \
                 cloud)",
            ));
        }
        // The id_token's `aud` is the app's client id, a GUID: anything else admits nobody.
        if !is_guid(&self.client_id) {
            return Err(ConfigError::key(
                "auth.admin_sign_in.client_id",
                "must be the app registration's application (client) id, a GUID",
            ));
        }
        let credential = match (self.client_secret, self.client_assertion.as_deref()) {
            (Some(secret), None) => {
                if self.managed_identity_client_id.is_some() {
                    return Err(ConfigError::key(
                        "auth.admin_sign_in.managed_identity_client_id",
                        "goes with client_assertion = \"managed-identity\", not with a client_secret",
                    ));
                }
                let key = "auth.admin_sign_in.client_secret";
                let secret = secrets(key, vec![secret])?
                    .pop()
                    .ok_or_else(|| ConfigError::key(key, "is empty"))?;
                SignInCredential::Secret(secret)
            }
            (None, Some(MANAGED_IDENTITY_ASSERTION)) => {
                let id = self.managed_identity_client_id.filter(|id| !id.is_empty());
                if id.as_deref().is_some_and(|id| !is_guid(id)) {
                    return Err(ConfigError::key(
                        "auth.admin_sign_in.managed_identity_client_id",
                        "must be the user-assigned identity's client id, a GUID",
                    ));
                }
                SignInCredential::ManagedIdentity(id)
            }
            (None, Some(_)) => {
                return Err(ConfigError::key(
                    "auth.admin_sign_in.client_assertion",
                    "the one assertion the broker presents is \"managed-identity\" (its managed \
                     identity, trusted by the app registration as a federated credential)",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ConfigError::key(
                    "auth.admin_sign_in",
                    "set client_secret or client_assertion = \"managed-identity\", not both",
                ))
            }
            (None, None) => {
                return Err(ConfigError::key(
                    "auth.admin_sign_in",
                    "set client_secret (the app registration's secret) or client_assertion = \
                     \"managed-identity\" (no secret: the app trusts the broker's managed identity)",
                ))
            }
        };
        Ok(AdminSignInConfig {
            client_id: self.client_id.to_ascii_lowercase(),
            credential,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEntra {
    tenant_id: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    allowed_principals: Vec<String>,
    #[serde(default)]
    admin_principals: Vec<String>,
    authority: Option<String>,
}

impl RawEntra {
    /// With `sign_in`, Entra ID may serve only the admins' browser sign-in: no audience (no
    /// bearer tokens) and no listed principal (the app role admits) are then fine.
    pub(super) fn validate(self, sign_in: bool) -> Result<EntraConfig, ConfigError> {
        // Every token's issuer carries the tenant's GUID: a domain would refuse everyone.
        if !is_guid(&self.tenant_id) {
            return Err(ConfigError::key(
                "auth.entra.tenant_id",
                "must be the tenant's id, a GUID like 72f988bf-86f1-41af-91ab-2d7cd011db47 \
                 (a domain name never matches a token's issuer)",
            ));
        }
        let no_audience = self.audiences.iter().all(|a| a.is_empty());
        if no_audience && (!sign_in || !self.allowed_principals.is_empty()) {
            return Err(ConfigError::key(
                "auth.entra.audiences",
                "name at least one audience: the broker app's Application ID URI and/or client id",
            ));
        }
        if self.allowed_principals.is_empty() && self.admin_principals.is_empty() && !sign_in {
            return Err(ConfigError::key(
                "auth.entra.allowed_principals",
                "name the object ids (e.g. Data Factory's managed identity) that may call the broker",
            ));
        }
        let allowed_principals =
            principals("auth.entra.allowed_principals", self.allowed_principals)?;
        let admin_principals = principals("auth.entra.admin_principals", self.admin_principals)?;
        let authority = parse_base_url(
            "auth.entra.authority",
            self.authority
                .as_deref()
                .unwrap_or("https://login.microsoftonline.com"),
        )?;
        if authority.scheme() != "https" {
            return Err(ConfigError::key("auth.entra.authority", "must be https"));
        }
        Ok(EntraConfig {
            tenant_id: self.tenant_id,
            audiences: self
                .audiences
                .into_iter()
                .filter(|a| !a.is_empty())
                .collect(),
            allowed_principals,
            admin_principals,
            authority,
        })
    }
}

/// Keys with their config keys, checked: each at least 16 characters, each name a plain
/// word (not a GUID, which `callers` reads as an object id) used once across both lists,
/// and no key listed twice — in one list, or as both a caller and an admin key (which would
/// make a caller key an admin key without anyone saying so, and rotating it out of one list
/// would leave it in the other).
fn named_keys(
    entries: impl Iterator<Item = (String, String, impl AsRef<str>)>,
    earlier: &[(String, NamedKey)],
) -> Result<Vec<(String, NamedKey)>, ConfigError> {
    let mut keys: Vec<(String, NamedKey)> = Vec::new();
    for (config_key, name, value) in entries {
        let value = value.as_ref();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !valid_name || is_guid(&name) {
            return Err(ConfigError::key(
                config_key,
                "a key's name is 1-64 letters, digits, `-`, `_` or `.`, and not a GUID (in \
                 `callers` a GUID is an Entra object id)",
            ));
        }
        let key = secrets(&config_key, vec![value.to_owned()])?
            .pop()
            .map(|key| NamedKey { name, key });
        let Some(key) = key else { continue };
        for (other_key, other) in earlier.iter().chain(&keys) {
            if other.name == key.name {
                return Err(ConfigError::key(
                    config_key,
                    format!(
                        "names a key `{}` as {other_key} does: names must be unique",
                        key.name
                    ),
                ));
            }
            if other.key.expose_secret() == key.key.expose_secret() {
                return Err(ConfigError::key(
                    config_key,
                    format!(
                        "is the same key as {other_key}: a key is listed once, either as a \
                         caller key or as an admin key (admin keys already work on every \
                         caller route)"
                    ),
                ));
            }
        }
        keys.push((config_key, key));
    }
    Ok(keys)
}

/// Each connection's `callers` against `[auth]`: every entry a key's name or an object id
/// Entra ID admits (`allowed_principals` or `admin_principals`), and never an empty list.
/// A name nobody has would admit nobody and look as if it did.
pub(super) fn check_callers(
    auth: &AuthConfig,
    connections: &std::collections::BTreeMap<String, super::ConnectionConfig>,
) -> Result<(), ConfigError> {
    let principals: Vec<&String> = auth
        .entra
        .iter()
        .flat_map(|e| e.allowed_principals.iter().chain(&e.admin_principals))
        .collect();
    let names: Vec<&str> = auth
        .api_keys
        .iter()
        .chain(&auth.admin_keys)
        .map(|k| k.name.as_str())
        .collect();
    for (connection, config) in connections {
        let Some(callers) = &config.callers else {
            continue;
        };
        if callers.is_empty() {
            return Err(ConfigError::key(
                format!("connections.{connection}.callers"),
                "lists nobody: name the key names and object ids that may take this \
                 connection's tokens, or leave `callers` out to serve every caller",
            ));
        }
        for (i, caller) in callers.iter().enumerate() {
            let key = format!("connections.{connection}.callers[{i}]");
            if is_guid(caller) {
                if !principals.contains(&caller) {
                    return Err(ConfigError::key(
                        key,
                        format!(
                            "names the object id {caller}, which auth.entra does not admit: add \
                             it to auth.entra.allowed_principals"
                        ),
                    ));
                }
            } else if !names.contains(&caller.as_str()) {
                let known = if names.is_empty() {
                    "no key has a name: [auth] configures no keys".to_owned()
                } else {
                    format!("the keys are named {}", names.join(", "))
                };
                return Err(ConfigError::key(
                    key,
                    format!(
                        "`{caller}` is neither a key's name nor an object id (a GUID): {known}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// With several caller identities, a connection without `callers` serves all of them: said
/// at startup, because that is rarely meant once there is more than one pipeline.
pub(super) fn open_connections_warning(
    auth: &AuthConfig,
    connections: &std::collections::BTreeMap<String, super::ConnectionConfig>,
) -> Option<String> {
    let identities = auth.api_keys.len()
        + auth
            .entra
            .as_ref()
            .map_or(0, |e| e.allowed_principals.len());
    let open: Vec<&str> = connections
        .iter()
        .filter(|(_, c)| c.callers.is_none())
        .map(|(name, _)| name.as_str())
        .collect();
    (identities > 1 && !open.is_empty()).then(|| {
        format!(
            "{identities} caller identities are configured and {} take(s) tokens from any of \
             them: set `callers` on each connection to say who may take its tokens",
            open.join(", ")
        )
    })
}

/// The nil GUID: no Entra object has it. Deployments write it where a principal is not known
/// yet (`ADF_PRINCIPAL_ID` before the factory exists), because an empty app setting may be
/// dropped by the platform and a missing one stops the broker.
pub(super) const NOBODY: &str = "00000000-0000-0000-0000-000000000000";

/// Object ids, lower-cased (as tokens carry them). The nil GUID and empty entries stand for
/// nobody and are left out; anything else that is not a GUID (a name, a client id with
/// braces, an unexpanded placeholder) never matches a token's `oid` and is refused.
fn principals(key: &str, entries: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut ids = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let entry = entry.trim().to_ascii_lowercase();
        if entry.is_empty() || entry == NOBODY {
            continue;
        }
        if !is_guid(&entry) {
            return Err(ConfigError::key(
                format!("{key}[{i}]"),
                "must be an object id (a GUID like 5f1c…-…); the nil GUID \
                 00000000-0000-0000-0000-000000000000 stands for nobody",
            ));
        }
        ids.push(entry);
    }
    Ok(ids)
}

impl RawAuth {
    /// `[auth]`: keys, anonymous access, Entra ID; at least one way in.
    pub(super) fn validate(self) -> Result<AuthConfig, ConfigError> {
        let api_keys = named_keys(self.api_keys.entries("auth.api_keys", "key"), &[])?;
        let admin_keys = named_keys(
            self.admin_keys.entries("auth.admin_keys", "admin-key"),
            &api_keys,
        )?;
        let sign_in = self.admin_sign_in.is_some();
        let entra = self
            .entra
            .map(|entra| entra.validate(sign_in))
            .transpose()?;
        let admin_sign_in = self
            .admin_sign_in
            .map(|raw| raw.validate(entra.as_ref()))
            .transpose()?;
        let auth = AuthConfig {
            api_keys: api_keys.into_iter().map(|(_, key)| key).collect(),
            admin_keys: admin_keys.into_iter().map(|(_, key)| key).collect(),
            allow_anonymous: self.allow_anonymous,
            entra,
            admin_sign_in,
        };
        if auth.api_keys.is_empty()
            && auth.admin_keys.is_empty()
            && auth.entra.is_none()
            && !auth.allow_anonymous
        {
            return Err(ConfigError::key(
                "auth",
                "no caller authentication configured: set auth.api_keys / auth.admin_keys or \
                 [auth.entra], or auth.allow_anonymous = true to serve without it (never in production)",
            ));
        }

        Ok(auth)
    }
}
