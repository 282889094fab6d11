//! Where tokens live. The broker talks to a [`TokenStore`]; this module picks one from config.

mod file;
mod key_vault;

pub use file::FileStore;
pub use key_vault::KeyVaultStore;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Config, StoreConfig};
use crate::token::TokenRecord;

/// Why the store could not do what was asked. Messages never contain token values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record for `{connection}` is unreadable: {message}")]
    Corrupt { connection: String, message: String },
}

impl StoreError {
    /// A stored value that is not a token record. Only the kind of error and where it is:
    /// serde_json's own message can quote the content, which holds tokens.
    fn corrupt(connection: &str, what: &str, err: &serde_json::Error) -> Self {
        StoreError::Corrupt {
            connection: connection.to_owned(),
            message: format!(
                "{what} is not a token record ({:?} error at line {} column {})",
                err.classify(),
                err.line(),
                err.column()
            ),
        }
    }
}

/// Persistent storage of one [`TokenRecord`] per connection.
///
/// A save must be durable when it returns `Ok`: the broker hands out an access token only
/// after the refresh token that came with it is saved.
#[async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// The record for `connection`, or `None` if none was ever saved.
    async fn load(&self, connection: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Replaces the record for `connection`.
    async fn save(&self, connection: &str, record: &TokenRecord) -> Result<(), StoreError>;
    /// Where the tokens go, for the startup log (never a secret).
    fn describe(&self) -> String;
}

/// The store the configuration asks for, and the vault when it is one (client secrets may
/// be read from it).
pub struct OpenedStore {
    pub store: Arc<dyn TokenStore>,
    pub vault: Option<Arc<KeyVaultStore>>,
}

/// Builds the store the configuration asks for.
pub fn open(config: &Config) -> anyhow::Result<OpenedStore> {
    match &config.store {
        StoreConfig::File { dir } => Ok(OpenedStore {
            store: Arc::new(FileStore::open(dir)?),
            vault: None,
        }),
        StoreConfig::KeyVault(vault) => {
            let mirrors = config
                .connections
                .iter()
                .filter_map(|(name, c)| {
                    let mirror = c.mirror_refresh_token_secret.clone()?;
                    Some((name.clone(), mirror))
                })
                .collect();
            let vault = Arc::new(KeyVaultStore::new(vault, mirrors)?);
            Ok(OpenedStore {
                store: vault.clone(),
                vault: Some(vault),
            })
        }
    }
}
