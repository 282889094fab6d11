//! The configuration file's shape, as `serde` reads it, and the validation of its global
//! sections (public URL, auth, store, refresh, lock) into the typed [`super::Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::connection::{validate_connection_name, RawConnection};
use super::values::*;
use super::*;

/// Variables that say the broker runs behind the Functions host's relay or in App Service:
/// the host's port for its custom handler, and the instance variables App Service sets on
/// every instance (azure-docs `reference-app-settings.md`, "Environment variables").
const HOSTED_VARIABLES: &[&str] = &[
    "FUNCTIONS_CUSTOMHANDLER_PORT",
    "WEBSITE_INSTANCE_ID",
    "WEBSITE_OWNER_NAME",
    "WEBSITE_SITE_NAME",
    "WEBSITE_HOSTNAME",
    "WEBSITE_RESOURCE_GROUP",
    "WEBSITE_ROLE_INSTANCE_ID",
    "WEBSITE_DEPLOYMENT_ID",
];

/// Key Vault secrets the deployment itself keeps (infra/resources.bicep), never a
/// connection's record, mirror or client secret.
const DEPLOYMENT_SECRETS: &[&str] = &[
    "broker-state-secret",
    "broker-api-key",
    "broker-admin-key",
    "broker-alert-webhook-secret",
    "broker-sign-in-client-secret",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    /// Trying the broker on this machine: example placeholders are accepted (with a
    /// warning), and the broker listens on loopback only.
    #[serde(default)]
    local_mode: bool,
    public_url: Option<String>,
    state_secret: Option<String>,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    lock: lock::RawLock,
    #[serde(default)]
    connections: BTreeMap<String, RawConnection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
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
pub(super) struct RawServer {
    header_timeout: Option<u64>,
    body_timeout: Option<u64>,
    write_timeout: Option<u64>,
    max_connections: Option<usize>,
}

impl RawServer {
    fn validate(self) -> Result<ServerConfig, ConfigError> {
        let secs = |key: &str, value: Option<u64>, default: u64| match value.unwrap_or(default) {
            secs @ 1..=300 => Ok(Duration::from_secs(secs)),
            _ => Err(ConfigError::key(key, "must be 1-300 seconds")),
        };
        Ok(ServerConfig {
            header_timeout: secs("server.header_timeout", self.header_timeout, 20)?,
            body_timeout: secs("server.body_timeout", self.body_timeout, 20)?,
            write_timeout: secs("server.write_timeout", self.write_timeout, 60)?,
            max_connections: match self.max_connections.unwrap_or(512) {
                n @ 8..=65_536 => n,
                _ => {
                    return Err(ConfigError::key(
                        "server.max_connections",
                        "must be 8-65536 connections",
                    ))
                }
            },
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRefresh {
    min_validity: Option<u64>,
    default_lifetime: Option<u64>,
    upstream_timeout: Option<u64>,
    prerefresh_window: Option<u64>,
    force_burst: Option<u32>,
    force_interval: Option<u64>,
    expiry_warning_days: Option<u64>,
}

impl RawConfig {
    pub(super) fn validate(
        self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // Example placeholders (`replace-with-…`, `change-me`) are not credentials: refused
        // unless the config says it is a local trial.
        let mut placeholders = Vec::new();
        let mut candidates: Vec<(String, &str)> = Vec::new();
        if let Some(secret) = &self.state_secret {
            candidates.push(("state_secret".to_owned(), secret));
        }
        for (list, values) in [
            ("auth.api_keys", &self.auth.api_keys),
            ("auth.admin_keys", &self.auth.admin_keys),
        ] {
            for (i, value) in values.iter().enumerate() {
                candidates.push((format!("{list}[{i}]"), value));
            }
        }
        for (name, connection) in &self.connections {
            for (field, value) in connection.credentials() {
                candidates.push((format!("connections.{name}.{field}"), value));
            }
        }
        for (key, value) in candidates {
            if is_placeholder(value) {
                if !self.local_mode {
                    return Err(ConfigError::key(
                        key,
                        "is an example placeholder, not a credential: set the real value (a \
                         random key: `openssl rand -hex 24`), or set `local_mode = true` at the top \
                         of the file to try the broker on this machine",
                    ));
                }
                placeholders.push(key);
            }
        }
        // Behind a relay: under the Functions host (which sets FUNCTIONS_CUSTOMHANDLER_PORT,
        // `func start` included) or in App Service (which sets the WEBSITE_* instance
        // variables). The broker then always listens on loopback, and the host relays the
        // Internet to it, so "only on loopback" protects nothing: both settings that rest
        // on it are refused. (Not CONTAINER_NAME: many container runtimes set that on a
        // developer's machine.)
        let relayed_by = HOSTED_VARIABLES
            .iter()
            .find(|name| env(name).is_some_and(|v| !v.trim().is_empty()));
        if let Some(variable) = relayed_by {
            for (key, set) in [
                ("auth.allow_anonymous", self.auth.allow_anonymous),
                ("local_mode", self.local_mode),
            ] {
                if set {
                    return Err(ConfigError::key(
                        key,
                        format!(
                            "is refused under the Functions host or in Azure ({variable} is set): \
                             the host relays every caller to the broker's loopback port, so \
                             loopback-only protects nothing; remove it and configure real \
                             credentials"
                        ),
                    ));
                }
            }
        }

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
            force_burst: match self.refresh.force_burst.unwrap_or(5) {
                burst @ 1..=100 => burst,
                _ => {
                    return Err(ConfigError::key(
                        "refresh.force_burst",
                        "must be 1-100 forced refreshes",
                    ))
                }
            },
            force_interval: match self.refresh.force_interval.unwrap_or(60) {
                secs @ 1..=86_400 => Duration::from_secs(secs),
                _ => {
                    return Err(ConfigError::key(
                        "refresh.force_interval",
                        "must be 1-86400 seconds",
                    ))
                }
            },
            expiry_warning: match self.refresh.expiry_warning_days.unwrap_or(14) {
                days @ 0..=365 => Duration::from_secs(days * 86_400),
                _ => {
                    return Err(ConfigError::key(
                        "refresh.expiry_warning_days",
                        "must be 0-365 days (0: no warnings)",
                    ))
                }
            },
        };

        let mut warnings = Vec::new();
        if !placeholders.is_empty() {
            warnings.push(format!(
                "local_mode: example placeholders accepted for {} — fine on this machine, never \
                 in a deployment",
                placeholders.join(", ")
            ));
        }
        if auth
            .entra
            .as_ref()
            .is_some_and(|e| e.allowed_principals.is_empty() && e.admin_principals.is_empty())
        {
            warnings.push(
                "auth.entra authorizes no principal yet (only the nil GUID or empty entries): \
                 no Entra ID token is accepted until an object id is set (ADF_PRINCIPAL_ID in the \
                 example config)"
                    .to_owned(),
            );
        }
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
        // Secret names the broker writes (records, mirrors), by their lower-case form: Key
        // Vault names are case-insensitive, so `Acme` and `acme` would share one secret.
        // The names the deployment keeps its own secrets under (infra/resources.bicep) are
        // taken from the start: a connection named `api-key` under the prefix `broker-`
        // would otherwise write its record over the broker's API key.
        let mut secret_names: BTreeMap<String, String> = DEPLOYMENT_SECRETS
            .iter()
            .map(|name| {
                (
                    name.to_string(),
                    "the deployment's own secrets (infra/)".to_owned(),
                )
            })
            .collect();
        // Client secrets the broker reads: shared between connections is fine, but never one
        // of the names it writes.
        let mut read_names: Vec<(String, String)> = Vec::new();
        for (name, raw) in self.connections {
            let key = format!("connections.{name}");
            validate_connection_name(&key, &name)?;
            let connection = raw.validate(&key)?;
            let mut claim =
                |secret: String, by: String| match secret_names.get(&secret.to_ascii_lowercase()) {
                    Some(other) => Err(ConfigError::key(
                        by.clone(),
                        format!(
                            "Key Vault secret name `{secret}` is already used by `{other}` \
                             (Key Vault names are case-insensitive)"
                        ),
                    )),
                    None => {
                        secret_names.insert(secret.to_ascii_lowercase(), by);
                        Ok(())
                    }
                };
            match &store {
                StoreConfig::KeyVault(vault) => {
                    claim(vault.secret_name(&name), key.clone())?;
                    if let Some(mirror) = &connection.mirror_refresh_token_secret {
                        claim(mirror.clone(), format!("{key}.mirror_refresh_token_secret"))?;
                    }
                    if let Some(read) = &connection.client_secret_name {
                        read_names.push((read.clone(), format!("{key}.client_secret_name")));
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
        for (read, by) in read_names {
            if let Some(owner) = secret_names.get(&read.to_ascii_lowercase()) {
                return Err(ConfigError::key(
                    by,
                    format!(
                        "Key Vault secret `{read}` is one the broker writes for `{owner}`; \
                         a client secret must have a name of its own"
                    ),
                ));
            }
        }

        let alert_webhook = match env("BROKER_ALERT_WEBHOOK_URL").filter(|v| !v.trim().is_empty()) {
            Some(url) => Some(alert_webhook(&url)?),
            None => None,
        };
        let server = self.server.validate()?;
        Ok(Config {
            server,
            local_mode: self.local_mode,
            alert_webhook,
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
    pub(super) fn validate(
        self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<StoreConfig, ConfigError> {
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

/// The alert webhook's URL: https (http only on loopback), checked without ever echoing it —
/// an incoming-webhook URL is its own credential.
fn alert_webhook(value: &str) -> Result<SecretString, ConfigError> {
    const KEY: &str = "BROKER_ALERT_WEBHOOK_URL";
    let url = url::Url::parse(value.trim()).map_err(|_| {
        ConfigError::key(KEY, "is not a valid URL (value not shown: it is a secret)")
    })?;
    if url.host().is_none() || !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::key(
            KEY,
            "must be an https URL (value not shown)",
        ));
    }
    if url.scheme() != "https" && !crate::presets::is_loopback(&url) {
        return Err(ConfigError::key(
            KEY,
            "must use https (http only for localhost / 127.0.0.1; value not shown)",
        ));
    }
    Ok(SecretString::from(url.to_string()))
}

/// The placeholders the examples ship (`replace-with-…`, `…-change-me`): never a credential.
pub(super) fn is_placeholder(value: &str) -> bool {
    let value = value.to_ascii_lowercase();
    value.contains("replace-with") || value.contains("change-me") || value.contains("changeme")
}
