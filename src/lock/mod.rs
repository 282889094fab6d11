//! The refresh lease: one upstream refresh per connection across every instance.
//!
//! The broker's in-process single flight already lets one caller per connection through on
//! each instance; that caller then takes the connection's lease here before it re-reads the
//! store and calls the provider. Two kinds:
//! - [`LocalLock`]: this process only (local runs, a single container). The lease is always
//!   free, since the in-process flight is the lock; the notes live in memory.
//! - [`BlobLock`]: an Azure Blob lease on one small blob per connection in the Function
//!   App's own storage account (as the Functions host does for its singletons). A lease left
//!   by a killed instance expires after its duration and the next caller takes it.
//!
//! With the lease come [`LeaseNotes`], kept as blob metadata so every instance honours them:
//! the back-off after a failed refresh, and whether a refresh token is waiting to be saved.

mod blob;
mod local;

pub use blob::BlobLock;
pub use local::LocalLock;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::config::{Config, LockConfig};

/// Why a lease could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another instance held the lease for longer than the caller may wait.
    #[error("another instance is refreshing `{connection}`")]
    Busy { connection: String },
    /// Storage could not be reached or refused the request.
    #[error("the lease store is unavailable: {0}")]
    Unavailable(String),
}

/// What a flight leaves for the next one, on whichever instance it runs. No secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseNotes {
    /// No refresh before this: the last flight failed.
    pub backoff_until: Option<DateTime<Utc>>,
    /// Why the last flight failed (shown to callers during the back-off).
    pub failure: Option<String>,
    /// The error code callers get during the back-off (`provider_unavailable`, ...).
    pub failure_code: Option<String>,
    /// Consecutive failed flights since the last stored refresh, on any instance: how far
    /// the back-off has grown (0 after a success).
    pub failures: u32,
    /// When the last flight failed: callers that were waiting for the lease then share its
    /// failure, however short the back-off.
    pub failed_at: Option<DateTime<Utc>>,
    /// An instance holds a refresh token the store has not accepted yet, since then.
    pub pending_since: Option<DateTime<Utc>>,
    /// Which instance wrote the notes (host name and process id).
    pub holder: Option<String>,
}

impl LeaseNotes {
    /// The back-off still running at `now`, if any.
    pub fn backing_off(&self, now: DateTime<Utc>) -> Option<Duration> {
        self.backoff_until
            .and_then(|until| (until - now).to_std().ok())
            .filter(|left| !left.is_zero())
    }
}

/// Where leases come from.
#[async_trait]
pub trait RefreshLock: Send + Sync + 'static {
    /// Takes `connection`'s lease, waiting up to `wait` while another instance holds it.
    async fn acquire(&self, connection: &str, wait: Duration) -> Result<Box<dyn Lease>, LockError>;
    /// Records `key` as used, on every instance at once; `false` if it already was.
    async fn claim_once(&self, key: &str) -> Result<bool, LockError>;
    /// Checks that the lease store can be reached (for `token-broker check`).
    async fn check(&self) -> Result<(), LockError>;
    /// Where the leases are, for the startup log (never a secret).
    fn describe(&self) -> String;
}

/// A held lease. Dropping it without [`Lease::release`] lets it expire on its own.
#[async_trait]
pub trait Lease: Send + Sync {
    /// The notes as they were when the lease was taken (or last set).
    fn notes(&self) -> &LeaseNotes;
    /// Replaces the notes, while the lease is held.
    async fn set_notes(&mut self, notes: LeaseNotes) -> Result<(), LockError>;
    /// True when renewing failed since the lease was taken: another instance may hold it.
    fn lost(&self) -> bool;
    /// Gives the lease back.
    async fn release(self: Box<Self>);
}

/// This instance's name in notes and logs: host name (Azure sets `WEBSITE_INSTANCE_ID` or
/// `COMPUTERNAME` on Functions instances) and process id.
pub fn instance_name() -> String {
    let host = ["WEBSITE_INSTANCE_ID", "COMPUTERNAME", "HOSTNAME"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "local".to_owned());
    let host: String = host.chars().take(40).collect();
    format!("{host}/{}", std::process::id())
}

/// The lock the configuration asks for.
pub fn open(config: &Config) -> anyhow::Result<Arc<dyn RefreshLock>> {
    Ok(match &config.lock {
        LockConfig::Local(_) => Arc::new(LocalLock::default()),
        LockConfig::Blob(blob) => Arc::new(BlobLock::new(blob)?),
    })
}
