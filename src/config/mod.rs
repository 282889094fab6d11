//! Configuration: one TOML file, `${NAME}` expanded from the environment, validated at boot.
//!
//! Loading happens in three steps so that every error can name the key it is about:
//! parse the TOML into a tree, expand `${NAME}` in every string (tracking the key path),
//! then deserialize the typed configuration with `serde_path_to_error`.
//!
//! # Layout
//! - this file: the validated types the rest of the broker reads, and [`Config::load`];
//! - `env`: `${NAME}` expansion, tracking each value's key;
//! - `raw`: the file's shape (`serde`), the file-wide checks (placeholders, the host's
//!   relay, the public URL, Key Vault names across connections) and a call per section;
//! - one file per section, each with its raw type, validated type and validation: `auth`,
//!   `store`, `refresh`, `server`, `lock` (the refresh lease), `connection` (with its
//!   preset's settings);
//! - `values`: shared parsers for URLs, durations, secrets and names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

mod auth;
mod connection;
mod env;
mod lock;
mod raw;
mod refresh;
mod server;
mod store;
mod values;

pub use auth::{AdminSignInConfig, AuthConfig, EntraConfig, NamedKey, SignInCredential};
pub use lock::{BlobLockConfig, LeaseTimings, LockConfig};
pub use refresh::RefreshConfig;
pub use server::ServerConfig;
pub use store::{CredentialKind, KeyVaultConfig, StoreConfig};

use env::expand_env;
use raw::RawConfig;

pub use crate::presets::{ClientAuth, Fact, ProviderKind};
use crate::presets::{Lookup, PresetError};
use url::Url;

/// Everything the broker needs, validated.
#[derive(Debug)]
pub struct Config {
    /// A trial on this machine (`local_mode = true`): example placeholders accepted, and
    /// the broker refuses to listen beyond loopback.
    pub local_mode: bool,
    /// Public base URL of the broker; the redirect URI is `{public_url}/api/callback`.
    /// `None` means "derive from the listening port" (`http://localhost:{port}`).
    pub public_url: Option<Url>,
    /// Keys for signing `state` and admin sessions and deriving PKCE verifiers: the first
    /// signs, every one verifies (a rotation lists the new key first, then the old one).
    /// Empty: a random key per process.
    pub state_secret: Vec<SecretString>,
    /// Write the audit trail (`token_issued`, `token_refused`): on unless `audit = false`.
    pub audit: bool,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub refresh: RefreshConfig,
    pub server: ServerConfig,
    /// Where refreshes are coordinated across instances.
    pub lock: LockConfig,
    /// Connections by name, sorted.
    pub connections: BTreeMap<String, ConnectionConfig>,
    /// Running under the Azure Functions host (`FUNCTIONS_CUSTOMHANDLER_PORT` is set): the
    /// host reaches the timer route over loopback without a key.
    pub functions_host: bool,
    /// Where connection state changes are posted (`BROKER_ALERT_WEBHOOK_URL`, a Teams or
    /// Slack incoming webhook). A secret: such URLs carry their own credential.
    pub alert_webhook: Option<SecretString>,
    /// Signs every webhook post per Standard Webhooks (`BROKER_ALERT_WEBHOOK_SECRET`,
    /// `whsec_` + base64 of the key); unsigned without it.
    pub alert_webhook_secret: Option<SecretString>,
    /// Settings that work but probably not as intended; logged at startup.
    pub warnings: Vec<String>,
}

/// Environment variables the configuration reads directly (all others come in as `${NAME}`).
const DIRECT_SETTINGS: &[&str] = &[
    "BROKER_PUBLIC_URL",
    "BROKER_ALERT_WEBHOOK_URL",
    "BROKER_ALERT_WEBHOOK_SECRET",
    "KEY_VAULT_URL",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
];

/// The timer's default period (`PREREFRESH_SCHEDULE`, every 5 minutes).
const DEFAULT_TIMER_PERIOD: Duration = Duration::from_secs(300);

/// Where a connection's provider has its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    Static {
        authorize_url: Url,
        token_url: Url,
    },
    /// OIDC discovery from this issuer, at startup.
    Discover {
        issuer: Url,
    },
}

/// A limit on a grant's life counted from consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantLifetime {
    pub lifetime: Duration,
    /// Set by the admin (`grant_lifetime_days`) rather than the provider's documented cap.
    pub configured: bool,
}

/// A connection's proxy: where it forwards, and what the provider needs on the way (all of
/// it from the preset, so the HTTP edge names no provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    pub base: ProxyBase,
    /// The header the chosen organisation is sent in (Xero's `xero-tenant-id`).
    pub tenant_header: Option<&'static str>,
    /// Path placeholders filled from the consent's record (`realm_id`, `division`).
    pub path_values: &'static [Fact],
}

/// Where a connection's proxy forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyBase {
    /// A base URL from the config or the preset.
    Fixed(Url),
    /// A base URL the provider names in the token response, read from the stored record
    /// (Salesforce's `instance_url`).
    FromRecord(Fact),
}

/// One named connection to one provider account.
#[derive(Debug)]
pub struct ConnectionConfig {
    pub provider: ProviderKind,
    /// Who may take its tokens and use its proxy (key names, Entra object ids) besides
    /// admins; `None`: every authenticated caller.
    pub callers: Option<Vec<String>>,
    /// Where `/api/proxy/{connection}/…` forwards to, and how; `None`: no proxy for it.
    pub proxy: Option<ProxyConfig>,
    pub endpoints: Endpoints,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    /// Name of a Key Vault secret holding the client secret (read once at startup).
    pub client_secret_name: Option<String>,
    /// Name of a Key Vault secret that gets a plain copy of the refresh token, for ADF
    /// linked services that read a refresh token from Key Vault themselves.
    pub mirror_refresh_token_secret: Option<String>,
    pub client_auth: ClientAuth,
    pub scopes: Vec<String>,
    /// Extra query parameters for the authorization request (`prompt`, `access_type`, ...).
    pub authorize_params: BTreeMap<String, String>,
    /// Overrides `refresh.default_lifetime` for this connection.
    pub default_lifetime: Option<Duration>,
    /// A refresh token unused this long dies at the provider (Xero 60 days, Exact Online 30);
    /// the timer uses it once half of that has passed.
    pub refresh_token_idle_lifetime: Option<Duration>,
    /// How long a grant lives from consent at most, if anyone knows.
    pub grant_lifetime: Option<GrantLifetime>,
    /// The provider refuses a refresh sooner than this after the last (Exact Online ~570 s).
    pub min_refresh_interval: Duration,
    /// A lookup made right after consent (Xero tenants, Exact Online division).
    pub lookup: Option<Lookup>,
    /// Callback query parameters kept for callers, as (parameter, response field).
    pub callback_params: &'static [(&'static str, Fact)],
    /// A consent without a refresh token is refused with advice.
    pub require_refresh_token: Option<&'static str>,
    /// Scopes the preset added because the config lacked them (logged at startup).
    pub added_scopes: Vec<String>,
    /// Fixed fields for callers (e.g. QuickBooks `api_base_url`).
    pub static_extra: Vec<(&'static str, String)>,
}

/// A configuration error that names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
}

impl From<PresetError> for ConfigError {
    fn from(err: PresetError) -> Self {
        ConfigError::key(err.key, err.message)
    }
}

impl ConfigError {
    pub(crate) fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads, expands and validates the file at `path`, taking `${NAME}` from `env`.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, env).map_err(|err| match err {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses configuration text (see [`Config::load`]).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // Settings read straight from the environment, not through `${NAME}`.
        for name in DIRECT_SETTINGS {
            if env(name).is_some_and(|v| env::is_unresolved_reference(&v)) {
                return Err(env::unresolved(
                    name,
                    &format!("environment variable {name}"),
                ));
            }
        }
        let mut tree: toml::Value = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: PathBuf::new(),
            message: err.message().to_owned(),
        })?;
        let mut expanded = Vec::new();
        expand_env(&mut tree, &mut String::new(), env, &mut expanded)?;
        let raw: RawConfig = serde_path_to_error::deserialize(tree).map_err(|err| {
            let key = err.path().to_string();
            // serde quotes offending values; a value from the environment may be a secret.
            let mut message = err.into_inner().to_string();
            for value in expanded.iter().filter(|v| v.len() >= 4) {
                message = message.replace(value.as_str(), "[value from the environment]");
            }
            ConfigError::key(key, message)
        })?;
        raw.validate(env)
    }
}

impl KeyVaultConfig {
    /// The secret holding `connection`'s record. Connection names may contain `_`, which
    /// Key Vault names may not: it becomes `-` (collisions are refused at startup).
    pub fn secret_name(&self, connection: &str) -> String {
        format!("{}{}", self.secret_prefix, connection.replace('_', "-"))
    }
}

#[cfg(test)]
mod auth_tests;
#[cfg(test)]
mod tests;
