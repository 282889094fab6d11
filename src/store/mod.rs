//! Where tokens live. The broker talks to a [`TokenStore`]; this module picks one from config.

mod file;

pub use file::FileStore;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::StoreConfig;
use crate::token::TokenRecord;

/// Why the store could not do what was asked. Messages never contain token values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record for `{connection}` is unreadable: {message}")]
    Corrupt { connection: String, message: String },
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

/// Builds the store the configuration asks for.
pub fn from_config(config: &StoreConfig) -> anyhow::Result<Arc<dyn TokenStore>> {
    match config {
        StoreConfig::File { dir } => Ok(Arc::new(FileStore::open(dir)?)),
    }
}
