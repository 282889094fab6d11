//! Configuration: one TOML file, `${NAME}` expanded from the environment, validated at boot.
//!
//! Loading happens in three steps so that every error can name the key it is about:
//! parse the TOML into a tree, expand `${NAME}` in every string (tracking the key path),
//! then deserialize the typed configuration with `serde_path_to_error`.
//!
//! # Layout
//! - this file: the validated types the rest of the broker reads, and [`Config::load`];
//! - `env`: `${NAME}` expansion, tracking each value's key;
//! - `raw`: the file's shape (`serde`) and the validation of the global sections;
//! - `connection`: a connection's validation, with its preset's settings;
//! - `lock`: the `[lock]` section (the refresh lease);
//! - `values`: shared parsers for URLs, durations, secrets and names.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

mod connection;
mod env;
mod lock;
mod raw;
mod values;

pub use lock::{BlobLockConfig, LeaseTimings, LockConfig};

use env::expand_env;
use raw::RawConfig;

pub use crate::presets::{ClientAuth, ProviderKind};
use crate::presets::{Lookup, PresetError};
use serde::Deserialize;
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
    /// Key for signing `state` and deriving PKCE verifiers. Random per process when absent.
    pub state_secret: Option<SecretString>,
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
    /// Settings that work but probably not as intended; logged at startup.
    pub warnings: Vec<String>,
}

/// Environment variables the configuration reads directly (all others come in as `${NAME}`).
const DIRECT_SETTINGS: &[&str] = &[
    "BROKER_PUBLIC_URL",
    "BROKER_ALERT_WEBHOOK_URL",
    "KEY_VAULT_URL",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
];

/// The timer's default period (`PREREFRESH_SCHEDULE`, every 5 minutes).
const DEFAULT_TIMER_PERIOD: Duration = Duration::from_secs(300);

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

/// Where tokens are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// One JSON file per connection under this directory.
    File { dir: PathBuf },
    /// One secret per connection in an Azure Key Vault.
    KeyVault(KeyVaultConfig),
}

/// The Key Vault store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVaultConfig {
    /// `https://{name}.vault.azure.net` (or a sovereign-cloud equivalent).
    pub vault_url: Url,
    /// Prepended to connection names to form secret names.
    pub secret_prefix: String,
    pub credential: CredentialKind,
    /// Client id of a user-assigned managed identity; system-assigned when absent.
    pub managed_identity_client_id: Option<String>,
    /// How long one store operation may keep retrying throttling and faults.
    pub retry_budget: Duration,
}

/// How the broker authenticates to Azure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    /// Managed identity when `IDENTITY_ENDPOINT` is set (App Service / Functions), workload
    /// identity when `AZURE_FEDERATED_TOKEN_FILE` is set, developer tools otherwise.
    Auto,
    ManagedIdentity,
    WorkloadIdentity,
    /// Azure CLI / Azure Developer CLI sign-in.
    Developer,
}

/// The HTTP listener's limits (`[server]`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A request's headers must arrive within this; also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this, counted from the moment its headers
    /// are in: a deadline, not an idle timer (a body trickling a byte at a time is cut).
    pub body_timeout: Duration,
    /// An answer whose bytes cannot be written for this long (the caller stopped reading)
    /// ends, and its connection is closed: no write may stall longer.
    pub write_timeout: Duration,
    /// Open connections at most; at the cap the longest-idle one is closed for a new one.
    pub max_connections: usize,
}

/// Refresh policy defaults.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// Life an access token must have left when the caller does not pass `min_validity`.
    pub min_validity: Duration,
    /// Lifetime assumed when the provider sends no `expires_in`.
    pub default_lifetime: Duration,
    /// Timeout of one request to a provider's token endpoint.
    pub upstream_timeout: Duration,
    /// The timer refreshes access tokens that expire within this window.
    pub prerefresh_window: Duration,
    /// Forced refreshes a connection allows at once (per instance)…
    pub force_burst: u32,
    /// …and then one per this interval.
    pub force_interval: Duration,
    /// A `grant_expiring` warning goes out when a grant's forecast end is this close.
    pub expiry_warning: Duration,
}

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

/// Where a connection's proxy forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyBase {
    /// A base URL from the config or the preset.
    Fixed(Url),
    /// A base URL the provider names in the token response, read from the stored record
    /// (Salesforce's `instance_url`).
    FromRecord(&'static str),
}

/// One named connection to one provider account.
#[derive(Debug)]
pub struct ConnectionConfig {
    pub provider: ProviderKind,
    /// Where `/api/proxy/{connection}/…` forwards to; `None`: no proxy for it.
    pub proxy_base: Option<ProxyBase>,
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
    pub callback_params: &'static [(&'static str, &'static str)],
    /// A consent without a refresh token is refused with advice.
    pub require_refresh_token: bool,
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
mod tests;
