//! The lease within one process: always free (the broker's in-process flight already lets
//! one caller per connection through), with the notes kept in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{Lease, LeaseNotes, LockError, RefreshLock};

/// Leases for a single instance.
#[derive(Default)]
pub struct LocalLock {
    /// A std Mutex: nothing awaits while it is held.
    notes: Arc<Mutex<HashMap<String, LeaseNotes>>>,
}

#[async_trait]
impl RefreshLock for LocalLock {
    async fn acquire(
        &self,
        connection: &str,
        _wait: Duration,
    ) -> Result<Box<dyn Lease>, LockError> {
        let notes = self
            .notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(connection)
            .cloned()
            .unwrap_or_default();
        Ok(Box::new(LocalLease {
            all: Arc::clone(&self.notes),
            connection: connection.to_owned(),
            notes,
        }))
    }

    async fn claim_once(&self, _key: &str) -> Result<bool, LockError> {
        // One process: the state signer's own used-state memory is the whole truth.
        Ok(true)
    }

    async fn check(&self) -> Result<(), LockError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "this process only (no storage account configured)".to_owned()
    }
}

struct LocalLease {
    all: Arc<Mutex<HashMap<String, LeaseNotes>>>,
    connection: String,
    notes: LeaseNotes,
}

#[async_trait]
impl Lease for LocalLease {
    fn notes(&self) -> &LeaseNotes {
        &self.notes
    }

    async fn set_notes(&mut self, notes: LeaseNotes) -> Result<(), LockError> {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.connection.clone(), notes.clone());
        self.notes = notes;
        Ok(())
    }

    fn lost(&self) -> bool {
        false
    }

    async fn release(self: Box<Self>) {}
}
