//! The configuration file's shape, as `serde` reads it, and the validation of its global
//! sections (public URL, auth, store, refresh, lock) into the typed [`super::Config`].

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Deserialize;

use super::auth::{self, RawAuth};
use super::connection::{validate_connection_name, RawConnection};
use super::refresh::RawRefresh;
use super::server::RawServer;
use super::store::RawStore;
use super::values::{parse_base_url, StringOrList};
use super::{
    lock, AuthConfig, Config, ConfigError, ConnectionConfig, RefreshConfig, StoreConfig,
    DEFAULT_TIMER_PERIOD,
};

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
    state_secret: Option<StringOrList>,
    /// The audit trail of token handouts and refusals (default on).
    audit: Option<bool>,
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

impl RawConfig {
    pub(super) fn validate(
        self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        // Example placeholders (`replace-with-…`, `change-me`) are not credentials: refused
        // unless the config says it is a local trial.
        let mut placeholders = Vec::new();
        let mut candidates: Vec<(String, &str)> = Vec::new();
        for (key, secret) in self
            .state_secret
            .iter()
            .flat_map(|s| s.entries("state_secret"))
        {
            candidates.push((key, secret));
        }
        for (list, unnamed, keys) in [
            ("auth.api_keys", "key", &self.auth.api_keys),
            ("auth.admin_keys", "admin-key", &self.auth.admin_keys),
        ] {
            for (key, _, value) in keys.entries(list, unnamed) {
                candidates.push((key, value));
            }
        }
        if let Some(secret) = self
            .auth
            .admin_sign_in
            .as_ref()
            .and_then(|s| s.client_secret.as_deref())
        {
            candidates.push(("auth.admin_sign_in.client_secret".to_owned(), secret));
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
        let mut state_secret = Vec::new();
        for (key, secret) in self
            .state_secret
            .iter()
            .flat_map(|s| s.entries("state_secret"))
        {
            if secret.len() < 32 {
                return Err(ConfigError::key(
                    key,
                    "must be at least 32 characters (it signs OAuth `state`)",
                ));
            }
            state_secret.push(SecretString::from(secret));
        }
        if self
            .state_secret
            .as_ref()
            .is_some_and(StringOrList::is_empty)
        {
            return Err(ConfigError::key(
                "state_secret",
                "lists no key: name the signing key first (then any older ones still accepted), \
                 or leave state_secret out for a random key per process",
            ));
        }

        let auth = self.auth.validate()?;
        let store = self.store.validate(env)?;
        let lock = self.lock.validate(env)?;

        let refresh = self.refresh.validate()?;

        let mut warnings = warnings(&placeholders, &auth, &refresh);
        let connections = validate_connections(self.connections, &store)?;
        auth::check_callers(&auth, &connections)?;
        warnings.extend(auth::open_connections_warning(&auth, &connections));

        let alert_webhook = match env("BROKER_ALERT_WEBHOOK_URL").filter(|v| !v.trim().is_empty()) {
            Some(url) => Some(alert_webhook(&url)?),
            None => None,
        };
        let alert_webhook_secret =
            match env("BROKER_ALERT_WEBHOOK_SECRET").filter(|v| !v.trim().is_empty()) {
                Some(secret) => Some(alert_webhook_secret(&secret)?),
                None => None,
            };
        let server = self.server.validate()?;
        Ok(Config {
            server,
            local_mode: self.local_mode,
            alert_webhook,
            alert_webhook_secret,
            public_url,
            state_secret,
            audit: self.audit.unwrap_or(true),
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

/// Every connection, and the Key Vault names they take: the records and mirrors the broker
/// writes must not collide (case-insensitively) with each other or with the deployment's own
/// secrets, and a client secret it reads must not be one of them.
fn validate_connections(
    raw_connections: BTreeMap<String, RawConnection>,
    store: &StoreConfig,
) -> Result<BTreeMap<String, ConnectionConfig>, ConfigError> {
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
    for (name, raw) in raw_connections {
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
        match store {
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
    Ok(connections)
}

/// Settings that work but probably not as intended, logged at startup.
fn warnings(placeholders: &[String], auth: &AuthConfig, refresh: &RefreshConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    if !placeholders.is_empty() {
        warnings.push(format!(
            "local_mode: example placeholders accepted for {} — fine on this machine, never \
             in a deployment",
            placeholders.join(", ")
        ));
    }
    if auth.admin_sign_in.is_none()
        && auth
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
    warnings
}

/// The alert webhook's signing secret: `whsec_` and the base64 of a key of at least 24 bytes
/// (Standard Webhooks), checked without echoing it; a placeholder or anything else refused.
fn alert_webhook_secret(value: &str) -> Result<SecretString, ConfigError> {
    const KEY: &str = "BROKER_ALERT_WEBHOOK_SECRET";
    use base64::Engine;
    let key = value.trim().strip_prefix("whsec_").and_then(|encoded| {
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
    });
    match key {
        Some(key) if key.len() >= 24 && !is_placeholder(value) => {
            Ok(SecretString::from(value.trim().to_owned()))
        }
        _ => Err(ConfigError::key(
            KEY,
            "must be `whsec_` followed by the base64 of a random key of at least 24 bytes \
             (`echo whsec_$(openssl rand -base64 32)`)",
        )),
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
