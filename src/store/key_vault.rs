//! The Azure Key Vault store: one secret per connection, through Microsoft's official
//! `azure_security_keyvault_secrets` client (challenge-based auth, retries with
//! `Retry-After`).
//!
//! Every write is a new secret version, and vault backups fail past 500 versions, so a
//! write identical to the last value seen is skipped. Values are JSON with content type
//! `application/json`; tags carry the connection, its status and the access token's expiry
//! (never a secret).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_core::http::StatusCode;
use azure_security_keyvault_secrets::models::SetSecretParameters;
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use secrecy::SecretString;

use super::{StoreError, TokenStore};
use crate::config::KeyVaultConfig;
use crate::token::TokenRecord;

/// Key Vault's limit on a secret value.
const MAX_VALUE_BYTES: usize = 25 * 1024;

/// Tokens in Key Vault.
pub struct KeyVaultStore {
    client: SecretClient,
    config: KeyVaultConfig,
    credential_name: &'static str,
    /// Connection → name of the secret that mirrors its plain refresh token.
    mirrors: BTreeMap<String, String>,
    /// Secret name → the last value read or written, to skip identical writes. A std Mutex:
    /// nothing awaits while it is held.
    last_values: Mutex<HashMap<String, Arc<str>>>,
}

impl KeyVaultStore {
    /// A store in the configured vault. `mirrors` maps connections to mirror secret names.
    pub fn new(config: &KeyVaultConfig, mirrors: BTreeMap<String, String>) -> anyhow::Result<Self> {
        let options = crate::azure::client_options(config.retry_budget)?;
        let (credential, credential_name) = crate::azure::credential(
            config.credential,
            config.managed_identity_client_id.as_deref(),
            &options,
        )?;
        let client = SecretClient::new(
            config.vault_url.as_str(),
            credential,
            Some(SecretClientOptions {
                client_options: options,
                ..Default::default()
            }),
        )?;
        Ok(Self {
            client,
            config: config.clone(),
            credential_name,
            mirrors,
            last_values: Mutex::new(HashMap::new()),
        })
    }

    /// The current value of secret `name`, or `None` if it does not exist.
    pub async fn read_secret(&self, name: &str) -> Result<Option<SecretString>, StoreError> {
        Ok(self
            .get(name)
            .await?
            .map(|value| SecretString::from(value.to_string())))
    }

    async fn get(&self, name: &str) -> Result<Option<Arc<str>>, StoreError> {
        let response = match self.client.get_secret(name, None).await {
            Ok(response) => response,
            Err(err) if err.http_status() == Some(StatusCode::NotFound) => return Ok(None),
            Err(err) => return Err(unavailable("reading", name, &err)),
        };
        let secret = response
            .into_model()
            .map_err(|err| unavailable("decoding", name, &err))?;
        let value: Arc<str> = Arc::from(secret.value.unwrap_or_default());
        self.remember(name, value.clone());
        Ok(Some(value))
    }

    async fn put(
        &self,
        name: &str,
        value: &str,
        content_type: &str,
        tags: HashMap<String, String>,
    ) -> Result<(), StoreError> {
        if self.is_last(name, value) {
            tracing::debug!(secret = name, "unchanged; not writing a new version");
            return Ok(());
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::Unavailable(format!(
                "the value for secret `{name}` is {} bytes; Key Vault takes at most {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        let parameters = SetSecretParameters {
            value: Some(value.to_owned()),
            content_type: Some(content_type.to_owned()),
            tags: Some(tags),
            ..Default::default()
        };
        let body = parameters
            .try_into()
            .map_err(|err| unavailable("encoding", name, &err))?;
        self.client
            .set_secret(name, body, None)
            .await
            .map_err(|err| unavailable("writing", name, &err))?;
        self.remember(name, Arc::from(value));
        Ok(())
    }

    fn remember(&self, name: &str, value: Arc<str>) {
        self.last_values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), value);
    }

    fn is_last(&self, name: &str, value: &str) -> bool {
        self.last_values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .is_some_and(|last| &**last == value)
    }
}

/// A store error from an SDK error. Only the operation, the secret name, the HTTP status and
/// the service's error code are kept: never a body.
fn unavailable(action: &str, name: &str, err: &azure_core::Error) -> StoreError {
    let detail = match err.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => format!(
            "HTTP {}{}",
            u16::from(*status),
            error_code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default()
        ),
        ErrorKind::Connection => "the vault could not be reached".to_owned(),
        ErrorKind::Credential => format!("no Azure credential: {err}"),
        ErrorKind::Io => "I/O error".to_owned(),
        ErrorKind::DataConversion => "unexpected response".to_owned(),
        _ => "request failed".to_owned(),
    };
    StoreError::Unavailable(format!("{action} Key Vault secret `{name}`: {detail}"))
}

#[async_trait]
impl TokenStore for KeyVaultStore {
    async fn load(&self, connection: &str) -> Result<Option<TokenRecord>, StoreError> {
        let name = self.config.secret_name(connection);
        let Some(value) = self.get(&name).await? else {
            return Ok(None);
        };
        serde_json::from_str(&value)
            .map(Some)
            .map_err(|err| StoreError::corrupt(connection, &format!("secret `{name}`"), &err))
    }

    async fn save(&self, connection: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let name = self.config.secret_name(connection);
        let value = serde_json::to_string(record)
            .map_err(|err| StoreError::Unavailable(format!("encoding record: {err}")))?;
        let mut tags = HashMap::from([
            ("connection".to_owned(), connection.to_owned()),
            ("status".to_owned(), format!("{:?}", record.status)),
        ]);
        if let Some(expires_at) = record.expires_at {
            tags.insert("access-token-expires".to_owned(), expires_at.to_rfc3339());
        }
        self.put(&name, &value, "application/json", tags).await?;

        // The mirror follows the record: written only when the refresh token differs from
        // the last value written (`put` skips identical writes). It is a courtesy copy for
        // another consumer: the record is saved, so a failed mirror write must not fail the
        // refresh; the next save tries again.
        if let (Some(mirror), Some(refresh_token)) =
            (self.mirrors.get(connection), &record.refresh_token)
        {
            let tags = HashMap::from([
                ("connection".to_owned(), connection.to_owned()),
                ("mirror-of".to_owned(), name.clone()),
            ]);
            if let Err(err) = self
                .put(mirror, refresh_token.secret(), "text/plain", tags)
                .await
            {
                tracing::warn!(
                    connection,
                    secret = mirror.as_str(),
                    "the refresh-token mirror was not updated (retried at the next refresh): {err}"
                );
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "Key Vault {} (secrets `{}<connection>`, {})",
            self.config.vault_url, self.config.secret_prefix, self.credential_name
        )
    }
}
