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
    pub api_keys: Vec<SecretString>,
    /// Keys accepted for admin routes (`/api/authorize`), and for everything else too.
    pub admin_keys: Vec<SecretString>,
    /// Serve without any caller authentication. Only when explicitly set.
    pub allow_anonymous: bool,
    /// Entra ID bearer tokens (Data Factory's managed identity).
    pub entra: Option<EntraConfig>,
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
    pub(super) api_keys: Vec<String>,
    #[serde(default)]
    pub(super) admin_keys: Vec<String>,
    #[serde(default)]
    pub(super) allow_anonymous: bool,
    entra: Option<RawEntra>,
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
    pub(super) fn validate(self) -> Result<EntraConfig, ConfigError> {
        // Every token's issuer carries the tenant's GUID: a domain would refuse everyone.
        if !is_guid(&self.tenant_id) {
            return Err(ConfigError::key(
                "auth.entra.tenant_id",
                "must be the tenant's id, a GUID like 72f988bf-86f1-41af-91ab-2d7cd011db47 \
                 (a domain name never matches a token's issuer)",
            ));
        }
        if self.audiences.iter().all(|a| a.is_empty()) {
            return Err(ConfigError::key(
                "auth.entra.audiences",
                "name at least one audience: the broker app's Application ID URI and/or client id",
            ));
        }
        if self.allowed_principals.is_empty() && self.admin_principals.is_empty() {
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

/// The nil GUID: no Entra object has it. Deployments write it where a principal is not known
/// yet (`ADF_PRINCIPAL_ID` before the factory exists), because an empty app setting may be
/// dropped by the platform and a missing one stops the broker.
const NOBODY: &str = "00000000-0000-0000-0000-000000000000";

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
        let auth = AuthConfig {
            api_keys: secrets("auth.api_keys", self.api_keys)?,
            admin_keys: secrets("auth.admin_keys", self.admin_keys)?,
            allow_anonymous: self.allow_anonymous,
            entra: self.entra.map(RawEntra::validate).transpose()?,
        };
        // One key in both lists would make a caller key an admin key without anyone saying
        // so (and rotating it out of one list would leave it in the other).
        for (i, admin) in auth.admin_keys.iter().enumerate() {
            if let Some(j) = auth
                .api_keys
                .iter()
                .position(|caller| caller.expose_secret() == admin.expose_secret())
            {
                return Err(ConfigError::key(
                    format!("auth.admin_keys[{i}]"),
                    format!(
                        "is also listed as auth.api_keys[{j}]: a key is either a caller key or \
                         an admin key (admin keys already work on every caller route)"
                    ),
                ));
            }
        }
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
