//! Configuration: one TOML file, `${NAME}` expanded from the environment, validated at boot.
//!
//! Loading happens in three steps so that every error can name the key it is about:
//! parse the TOML into a tree, expand `${NAME}` in every string (tracking the key path),
//! then deserialize the typed configuration with `serde_path_to_error`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

mod lock;
pub use lock::{BlobLockConfig, LeaseTimings, LockConfig};

pub use crate::presets::{ClientAuth, ProviderKind};
use crate::presets::{Lookup, Preset, PresetError, PresetSettings};
use serde::Deserialize;
use url::Url;

/// Everything the broker needs, validated.
#[derive(Debug)]
pub struct Config {
    /// Public base URL of the broker; the redirect URI is `{public_url}/api/callback`.
    /// `None` means "derive from the listening port" (`http://localhost:{port}`).
    pub public_url: Option<Url>,
    /// Key for signing `state` and deriving PKCE verifiers. Random per process when absent.
    pub state_secret: Option<SecretString>,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub refresh: RefreshConfig,
    /// Where refreshes are coordinated across instances.
    pub lock: LockConfig,
    /// Connections by name, sorted.
    pub connections: BTreeMap<String, ConnectionConfig>,
    /// Running under the Azure Functions host (`FUNCTIONS_CUSTOMHANDLER_PORT` is set): the
    /// host reaches the timer route over loopback without a key.
    pub functions_host: bool,
    /// Settings that work but probably not as intended; logged at startup.
    pub warnings: Vec<String>,
}

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

/// One named connection to one provider account.
#[derive(Debug)]
pub struct ConnectionConfig {
    pub provider: ProviderKind,
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

/// Expands `${NAME}` in every string of the tree. `path` is the dotted key of `value`;
/// the values substituted are collected in `expanded` (to keep them out of errors).
fn expand_env(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    expanded: &mut Vec<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => *s = expand_str(s, path, env, expanded)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, expanded)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                expand_env(item, path, env, expanded)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand_str(
    s: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    expanded: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::key(key, "unterminated `${` (expected `${NAME}`)"))?;
        let name = &after[..end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(ConfigError::key(
                key,
                format!("`${{{name}}}` is not a valid environment variable reference"),
            ));
        }
        let value = env(name).ok_or_else(|| {
            ConfigError::key(key, format!("environment variable {name} is not set"))
        })?;
        out.push_str(&value);
        expanded.push(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    public_url: Option<String>,
    state_secret: Option<String>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    lock: lock::RawLock,
    #[serde(default)]
    connections: BTreeMap<String, RawConnection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    api_keys: Vec<String>,
    #[serde(default)]
    admin_keys: Vec<String>,
    #[serde(default)]
    allow_anonymous: bool,
    entra: Option<RawEntra>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntra {
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
    fn validate(self) -> Result<EntraConfig, ConfigError> {
        let tenant_ok = !self.tenant_id.is_empty()
            && self
                .tenant_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !tenant_ok {
            return Err(ConfigError::key(
                "auth.entra.tenant_id",
                "must be the tenant's id (a GUID) or domain",
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
            allowed_principals: self.allowed_principals,
            admin_principals: self.admin_principals,
            authority,
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    path: Option<PathBuf>,
    vault_url: Option<String>,
    secret_prefix: Option<String>,
    credential: Option<CredentialKind>,
    managed_identity_client_id: Option<String>,
    retry_budget: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    min_validity: Option<u64>,
    default_lifetime: Option<u64>,
    upstream_timeout: Option<u64>,
    prerefresh_window: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    provider: ProviderKind,
    authorize_url: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_name: Option<String>,
    mirror_refresh_token_secret: Option<String>,
    client_auth: Option<ClientAuth>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    authorize_params: BTreeMap<String, String>,
    default_lifetime: Option<u64>,
    refresh_token_idle_days: Option<u64>,
    min_refresh_interval: Option<u64>,
    region: Option<String>,
    tenant: Option<String>,
    domain: Option<String>,
    environment: Option<String>,
    issuer: Option<String>,
    api_url: Option<String>,
}

/// Authorization parameters the broker sets itself; configuring them would break the flow.
const RESERVED_AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
];

impl RawConfig {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        // The environment wins over the file for the public URL: the same config file serves
        // local runs and every deployment slot.
        let public_url = match env("BROKER_PUBLIC_URL").filter(|v| !v.is_empty()) {
            Some(url) => Some(parse_base_url("BROKER_PUBLIC_URL", &url)?),
            None => self
                .public_url
                .as_deref()
                .map(|url| parse_base_url("public_url", url))
                .transpose()?,
        };
        let state_secret = match self.state_secret {
            Some(secret) if secret.len() < 32 => {
                return Err(ConfigError::key(
                    "state_secret",
                    "must be at least 32 characters (it signs OAuth `state`)",
                ))
            }
            other => other.map(SecretString::from),
        };

        let auth = AuthConfig {
            api_keys: secrets("auth.api_keys", self.auth.api_keys)?,
            admin_keys: secrets("auth.admin_keys", self.auth.admin_keys)?,
            allow_anonymous: self.auth.allow_anonymous,
            entra: self.auth.entra.map(RawEntra::validate).transpose()?,
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

        let store = self.store.validate(env)?;
        let lock = self.lock.validate(env)?;

        let refresh = RefreshConfig {
            min_validity: Duration::from_secs(self.refresh.min_validity.unwrap_or(300)),
            default_lifetime: positive_secs(
                "refresh.default_lifetime",
                self.refresh.default_lifetime.unwrap_or(3600),
            )?,
            upstream_timeout: positive_secs(
                "refresh.upstream_timeout",
                self.refresh.upstream_timeout.unwrap_or(30),
            )?,
            prerefresh_window: positive_secs(
                "refresh.prerefresh_window",
                self.refresh.prerefresh_window.unwrap_or(900),
            )?,
        };

        let mut warnings = Vec::new();
        // The timer must reach a token before callers do, or both refresh at the same moment
        // (and the timer's run is wasted): its window must exceed what callers ask for plus
        // the time between two runs.
        if refresh.prerefresh_window <= refresh.min_validity + DEFAULT_TIMER_PERIOD {
            warnings.push(format!(
                "refresh.prerefresh_window ({} s) should exceed refresh.min_validity ({} s) plus the \
                 timer's period (default {} s), so the timer refreshes tokens before callers need to",
                refresh.prerefresh_window.as_secs(),
                refresh.min_validity.as_secs(),
                DEFAULT_TIMER_PERIOD.as_secs()
            ));
        }

        let mut connections = BTreeMap::new();
        let mut secret_names: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in self.connections {
            let key = format!("connections.{name}");
            validate_connection_name(&key, &name)?;
            let connection = raw.validate(&key)?;
            let mut claim = |secret: String, by: String| match secret_names.get(&secret) {
                Some(other) => Err(ConfigError::key(
                    by.clone(),
                    format!("Key Vault secret name `{secret}` is already used by `{other}`"),
                )),
                None => {
                    secret_names.insert(secret, by);
                    Ok(())
                }
            };
            match &store {
                StoreConfig::KeyVault(vault) => {
                    claim(vault.secret_name(&name), key.clone())?;
                    if let Some(mirror) = &connection.mirror_refresh_token_secret {
                        claim(mirror.clone(), format!("{key}.mirror_refresh_token_secret"))?;
                    }
                }
                StoreConfig::File { .. } => {
                    for (field, set) in [
                        (
                            "client_secret_name",
                            connection.client_secret_name.is_some(),
                        ),
                        (
                            "mirror_refresh_token_secret",
                            connection.mirror_refresh_token_secret.is_some(),
                        ),
                    ] {
                        if set {
                            return Err(ConfigError::key(
                                format!("{key}.{field}"),
                                "needs the Key Vault store (set KEY_VAULT_URL or store.kind = \"key-vault\")",
                            ));
                        }
                    }
                }
            }
            connections.insert(name, connection);
        }

        Ok(Config {
            public_url,
            state_secret,
            auth,
            store,
            refresh,
            lock,
            connections,
            functions_host: env("FUNCTIONS_CUSTOMHANDLER_PORT").is_some_and(|p| !p.is_empty()),
            warnings,
        })
    }
}

impl RawStore {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<StoreConfig, ConfigError> {
        let env_vault = env("KEY_VAULT_URL").filter(|v| !v.is_empty());
        // An explicit kind wins; without one, KEY_VAULT_URL selects the vault.
        let kind = match (self.kind.as_deref(), &env_vault, &self.vault_url) {
            (Some(kind), _, _) => kind.to_owned(),
            (None, Some(_), _) | (None, None, Some(_)) => "key-vault".to_owned(),
            (None, None, None) => "file".to_owned(),
        };
        match kind.as_str() {
            "file" => Ok(StoreConfig::File {
                dir: self.path.unwrap_or_else(|| PathBuf::from(".tokens")),
            }),
            "key-vault" => {
                let (key, url) = match (env_vault, self.vault_url) {
                    (Some(url), _) => ("KEY_VAULT_URL", url),
                    (None, Some(url)) => ("store.vault_url", url),
                    (None, None) => return Err(ConfigError::key(
                        "store.vault_url",
                        "the Key Vault store needs a vault URL (store.vault_url or KEY_VAULT_URL)",
                    )),
                };
                let vault_url = parse_base_url(key, &url)?;
                if vault_url.scheme() != "https" {
                    return Err(ConfigError::key(
                        key,
                        "Key Vault is only reachable over https",
                    ));
                }
                let secret_prefix = self
                    .secret_prefix
                    .unwrap_or_else(|| "token-broker-".to_owned());
                if !secret_prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
                    || !secret_prefix.starts_with(|c: char| c.is_ascii_alphabetic())
                    || secret_prefix.len() > 60
                {
                    return Err(ConfigError::key(
                        "store.secret_prefix",
                        "must start with a letter and hold only 0-9, a-z, A-Z and `-` (at most 60)",
                    ));
                }
                Ok(StoreConfig::KeyVault(KeyVaultConfig {
                    vault_url,
                    secret_prefix,
                    credential: self.credential.unwrap_or(CredentialKind::Auto),
                    managed_identity_client_id: self
                        .managed_identity_client_id
                        .filter(|id| !id.is_empty()),
                    retry_budget: positive_secs(
                        "store.retry_budget",
                        self.retry_budget.unwrap_or(20),
                    )?,
                }))
            }
            other => Err(ConfigError::key(
                "store.kind",
                format!("unknown store kind `{other}` (expected `file` or `key-vault`)"),
            )),
        }
    }
}

impl KeyVaultConfig {
    /// The secret holding `connection`'s record. Connection names may contain `_`, which
    /// Key Vault names may not: it becomes `-` (collisions are refused at startup).
    pub fn secret_name(&self, connection: &str) -> String {
        format!("{}{}", self.secret_prefix, connection.replace('_', "-"))
    }
}

/// Key Vault secret names: 1-127 of `0-9a-zA-Z-`, starting with a letter.
fn validate_secret_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = (1..=127).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            format!("`{name}` is not a valid Key Vault secret name (1-127 of 0-9, a-z, A-Z and `-`, starting with a letter)"),
        ))
    }
}

impl RawConnection {
    fn validate(self, key: &str) -> Result<ConnectionConfig, ConfigError> {
        let preset = Preset::resolve(
            self.provider,
            &PresetSettings {
                region: self.region.as_deref(),
                tenant: self.tenant.as_deref(),
                domain: self.domain.as_deref(),
                environment: self.environment.as_deref(),
                issuer: self.issuer.as_deref(),
                api_url: self.api_url.as_deref(),
            },
            key,
        )?;
        let required = |field: &str, value: Option<String>| {
            value
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| ConfigError::key(format!("{key}.{field}"), "is required"))
        };
        // Configured endpoints win over the preset's (tests, sandboxes, sovereign clouds).
        let endpoints = match (&preset.issuer, &self.authorize_url, &self.token_url) {
            (Some(issuer), None, None) => Endpoints::Discover {
                issuer: issuer.clone(),
            },
            _ => {
                let authorize_url = required(
                    "authorize_url",
                    self.authorize_url.or(preset.authorize_url.clone()),
                )?;
                let token_url = required("token_url", self.token_url.or(preset.token_url.clone()))?;
                Endpoints::Static {
                    authorize_url: parse_endpoint(&format!("{key}.authorize_url"), &authorize_url)?,
                    token_url: parse_endpoint(&format!("{key}.token_url"), &token_url)?,
                }
            }
        };
        let client_id = required("client_id", self.client_id)?;
        for param in self.authorize_params.keys() {
            if RESERVED_AUTHORIZE_PARAMS.contains(&param.as_str()) {
                return Err(ConfigError::key(
                    format!("{key}.authorize_params.{param}"),
                    "is set by the broker itself and cannot be configured",
                ));
            }
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            if scope.is_empty() || scope.contains(char::is_whitespace) {
                return Err(ConfigError::key(
                    format!("{key}.scopes[{i}]"),
                    "a scope must be one non-empty word without spaces",
                ));
            }
        }
        let mut scopes = self.scopes;
        let mut added_scopes = Vec::new();
        for required in preset.required_scopes {
            if !scopes.iter().any(|s| s == required) {
                scopes.push((*required).to_owned());
                added_scopes.push((*required).to_owned());
            }
        }
        let mut authorize_params: BTreeMap<String, String> = preset
            .authorize_params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        authorize_params.extend(self.authorize_params);
        for (field, name) in [
            ("client_secret_name", &self.client_secret_name),
            (
                "mirror_refresh_token_secret",
                &self.mirror_refresh_token_secret,
            ),
        ] {
            if let Some(name) = name {
                validate_secret_name(&format!("{key}.{field}"), name)?;
            }
        }
        let client_secret = self.client_secret.filter(|s| !s.is_empty());
        if client_secret.is_some() && self.client_secret_name.is_some() {
            return Err(ConfigError::key(
                format!("{key}.client_secret_name"),
                "set either client_secret or client_secret_name, not both",
            ));
        }
        Ok(ConnectionConfig {
            provider: self.provider,
            endpoints,
            client_id,
            client_secret: client_secret.map(SecretString::from),
            client_secret_name: self.client_secret_name,
            mirror_refresh_token_secret: self.mirror_refresh_token_secret,
            client_auth: self.client_auth.unwrap_or(preset.client_auth),
            scopes,
            authorize_params,
            default_lifetime: match self.default_lifetime {
                Some(secs) => Some(positive_secs(&format!("{key}.default_lifetime"), secs)?),
                None => preset.default_lifetime,
            },
            refresh_token_idle_lifetime: match self.refresh_token_idle_days {
                Some(days) => Some(positive_secs(
                    &format!("{key}.refresh_token_idle_days"),
                    days.checked_mul(86_400).ok_or_else(|| {
                        ConfigError::key(format!("{key}.refresh_token_idle_days"), "is too large")
                    })?,
                )?),
                None => preset.idle_lifetime,
            },
            min_refresh_interval: self
                .min_refresh_interval
                .map(Duration::from_secs)
                .unwrap_or(preset.min_refresh_interval),
            lookup: preset.lookup,
            callback_params: preset.callback_params,
            require_refresh_token: preset.require_refresh_token,
            added_scopes,
            static_extra: preset.static_extra,
        })
    }
}

fn validate_connection_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            "connection names are 1-64 characters of a-z, A-Z, 0-9, `-` and `_`, \
             starting with a letter or digit",
        ))
    }
}

fn secrets(key: &str, values: Vec<String>) -> Result<Vec<SecretString>, ConfigError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            if v.len() < 16 {
                Err(ConfigError::key(
                    format!("{key}[{i}]"),
                    "keys must be at least 16 characters",
                ))
            } else {
                Ok(SecretString::from(v))
            }
        })
        .collect()
}

fn positive_secs(key: &str, secs: u64) -> Result<Duration, ConfigError> {
    if secs == 0 {
        Err(ConfigError::key(
            key,
            "must be a positive number of seconds",
        ))
    } else {
        Ok(Duration::from_secs(secs))
    }
}

fn parse_http_url(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value)
        .map_err(|err| ConfigError::key(key, format!("`{value}` is not a valid URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::key(
            key,
            format!("`{value}` must be an http(s) URL with a host"),
        ));
    }
    Ok(url)
}

fn parse_endpoint(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url = parse_http_url(key, value)?;
    if url.fragment().is_some() {
        return Err(ConfigError::key(
            key,
            "an endpoint URL cannot have a fragment",
        ));
    }
    Ok(url)
}

/// A base URL: no query or fragment, no trailing slash (so `{base}/api/...` is exact).
fn parse_base_url(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url = parse_http_url(key, value.trim_end_matches('/'))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::key(
            key,
            "a base URL cannot have a query or fragment",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    const MINIMAL: &str = r#"
        [auth]
        api_keys = ["${API_KEY}"]

        [connections.acme]
        provider = "oauth2"
        authorize_url = "https://id.acme.example/auth"
        token_url = "https://id.acme.example/token"
        client_id = "${ACME_CLIENT_ID}"
        client_secret = "${ACME_CLIENT_SECRET}"
        client_auth = "post"
        scopes = ["openid", "offline_access"]
        authorize_params = { prompt = "consent" }
    "#;

    const ENV: &[(&str, &str)] = &[
        ("API_KEY", "0123456789abcdef-key"),
        ("ACME_CLIENT_ID", "client-1"),
        ("ACME_CLIENT_SECRET", "sec"),
    ];

    fn parse_err(text: &str, vars: &'static [(&'static str, &'static str)]) -> String {
        Config::parse(text, &env_of(vars))
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn the_defaults_leave_the_timer_ahead_of_callers_and_a_tie_is_warned_about() {
        let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid config");
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let tie = format!("[refresh]\nmin_validity = 900\nprerefresh_window = 900\n{MINIMAL}");
        let config = Config::parse(&tie, &env_of(ENV)).expect("valid config");
        assert_eq!(config.warnings.len(), 1);
        assert!(config.warnings[0].contains("refresh.prerefresh_window"));
    }

    #[test]
    fn expands_environment_and_applies_defaults() {
        let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid config");
        let acme = &config.connections["acme"];
        assert_eq!(acme.client_id, "client-1");
        assert_eq!(acme.client_auth, ClientAuth::Post);
        assert_eq!(acme.authorize_params["prompt"], "consent");
        assert_eq!(config.refresh.min_validity, Duration::from_secs(300));
        assert_eq!(
            config.store,
            StoreConfig::File {
                dir: PathBuf::from(".tokens")
            }
        );
        assert!(config.public_url.is_none());
    }

    #[test]
    fn unset_variable_names_key_and_variable() {
        let err = parse_err(MINIMAL, &[("API_KEY", "0123456789abcdef-key")]);
        assert!(err.contains("connections.acme.client_id"), "{err}");
        assert!(err.contains("ACME_CLIENT_ID"), "{err}");
    }

    #[test]
    fn unknown_provider_names_key() {
        let err = parse_err(&MINIMAL.replace("\"oauth2\"", "\"oauth3\""), ENV);
        assert!(err.contains("connections.acme.provider"), "{err}");
    }

    #[test]
    fn misspelt_field_names_key() {
        let err = parse_err(&MINIMAL.replace("client_auth", "client_ath"), ENV);
        assert!(err.contains("client_ath"), "{err}");
    }

    #[test]
    fn malformed_url_names_key() {
        let err = parse_err(
            &MINIMAL.replace("https://id.acme.example/token", "not a url"),
            ENV,
        );
        assert!(err.contains("connections.acme.token_url"), "{err}");
    }

    #[test]
    fn missing_client_id_names_key() {
        let text = MINIMAL.replace("client_id = \"${ACME_CLIENT_ID}\"", "");
        let err = parse_err(&text, ENV);
        assert!(err.contains("connections.acme.client_id"), "{err}");
    }

    #[test]
    fn refuses_to_run_without_auth_unless_anonymous_is_explicit() {
        let text = MINIMAL.replace("api_keys = [\"${API_KEY}\"]", "");
        let err = parse_err(&text, ENV);
        assert!(err.contains("`auth`"), "{err}");
        let text = MINIMAL.replace("api_keys = [\"${API_KEY}\"]", "allow_anonymous = true");
        assert!(Config::parse(&text, &env_of(ENV)).is_ok());
    }

    #[test]
    fn reserved_authorize_params_are_rejected() {
        let text = MINIMAL.replace("prompt = \"consent\"", "state = \"x\"");
        let err = parse_err(&text, ENV);
        assert!(err.contains("authorize_params.state"), "{err}");
    }

    #[test]
    fn public_url_from_environment_wins() {
        let text = format!("public_url = \"https://file.example/\"\n{MINIMAL}");
        let mut vars = ENV.to_vec();
        vars.push(("BROKER_PUBLIC_URL", "https://env.example/"));
        let vars: &'static [(&str, &str)] = Box::leak(vars.into_boxed_slice());
        let config = Config::parse(&text, &env_of(vars)).expect("valid");
        assert_eq!(
            config.public_url.map(|u| u.to_string()),
            Some("https://env.example/".into())
        );
    }

    #[test]
    fn bad_connection_name_is_rejected() {
        let err = parse_err(
            &MINIMAL.replace("connections.acme", "connections.\"a b\""),
            ENV,
        );
        assert!(err.contains("connections.a b"), "{err}");
    }

    #[test]
    fn key_vault_url_selects_the_vault_store() {
        let mut vars = ENV.to_vec();
        vars.push(("KEY_VAULT_URL", "https://my-vault.vault.azure.net/"));
        let vars: &'static [(&str, &str)] = Box::leak(vars.into_boxed_slice());
        let config = Config::parse(MINIMAL, &env_of(vars)).expect("valid");
        let StoreConfig::KeyVault(vault) = config.store else {
            panic!("expected the Key Vault store");
        };
        assert_eq!(
            vault.vault_url.as_str(),
            "https://my-vault.vault.azure.net/"
        );
        assert_eq!(vault.secret_name("my_conn"), "token-broker-my-conn");
        assert_eq!(vault.credential, CredentialKind::Auto);
    }

    #[test]
    fn key_vault_names_are_checked() {
        let vault = "[store]\nkind = \"key-vault\"\nvault_url = \"https://v.vault.azure.net\"\n";
        let text = format!("{vault}{MINIMAL}").replace(
            "client_auth = \"post\"",
            "client_auth = \"post\"\nmirror_refresh_token_secret = \"bad_name\"",
        );
        let err = parse_err(&text, ENV);
        assert!(
            err.contains("connections.acme.mirror_refresh_token_secret"),
            "{err}"
        );

        let text = format!("{vault}{MINIMAL}\n[connections.a_b]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n[connections.a-b]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n");
        let err = parse_err(&text, ENV);
        assert!(err.contains("already used"), "{err}");

        let err = parse_err(&format!("[store]\nkind = \"key-vault\"\n{MINIMAL}"), ENV);
        assert!(err.contains("store.vault_url"), "{err}");
    }

    #[test]
    fn vault_features_need_the_vault_store() {
        let text = MINIMAL.replace(
            "client_secret = \"${ACME_CLIENT_SECRET}\"",
            "client_secret_name = \"acme-secret\"",
        );
        let err = parse_err(&text, ENV);
        assert!(err.contains("connections.acme.client_secret_name"), "{err}");
        assert!(err.contains("Key Vault"), "{err}");
    }

    #[test]
    fn errors_do_not_quote_values_from_the_environment() {
        let text = MINIMAL.replace(
            "client_auth = \"post\"",
            "client_auth = \"${ACME_CLIENT_SECRET}\"",
        );
        let vars: &'static [(&str, &str)] = &[
            ("API_KEY", "0123456789abcdef-key"),
            ("ACME_CLIENT_ID", "client-1"),
            ("ACME_CLIENT_SECRET", "very-secret-value"),
        ];
        let err = parse_err(&text, vars);
        assert!(err.contains("connections.acme.client_auth"), "{err}");
        assert!(!err.contains("very-secret-value"), "{err}");
    }

    #[test]
    fn unterminated_reference_is_rejected() {
        let err = parse_err(&MINIMAL.replace("${ACME_CLIENT_ID}", "${ACME"), ENV);
        assert!(err.contains("unterminated"), "{err}");
    }
}
