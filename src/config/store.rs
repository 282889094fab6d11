//! The `[store]` section: the token file, or Azure Key Vault.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::values::{parse_base_url, positive_secs};
use super::ConfigError;

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
