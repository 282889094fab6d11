//! The lease across instances: an Azure Blob lease per connection, through the official
//! `azure_storage_blob` crate, on the Function App's own storage account.
//!
//! Blob `refresh/{connection}` in the configured container (both created on first use) is
//! leased for `lease_duration` and renewed at a third of it while held, so a refresh longer
//! than one lease keeps it; an instance killed mid-refresh stops renewing and the lease
//! expires. The notes are the blob's metadata. Used `state` values are empty blobs
//! `state/{nonce}` written with `If-None-Match: *`, so only the first writer wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use azure_core::error::ErrorKind;
use azure_core::http::{RequestContent, StatusCode};
use azure_storage_blob::models::{
    BlobClientAcquireLeaseOptions, BlobClientGetPropertiesResultHeaders,
    BlobClientSetMetadataOptions, BlockBlobClientUploadOptions,
};
use azure_storage_blob::{BlobClient, BlobContainerClient, BlobContainerClientOptions};
use chrono::{DateTime, Utc};
use rand::RngCore;
use tracing::{error, warn};
use url::Url;

use super::{Lease, LeaseNotes, LockError, RefreshLock};
use crate::config::BlobLockConfig;

/// How long one storage call may keep retrying. Short: a broken storage account must turn
/// into a prompt 503, not a caller waiting out the SDK's default minute of retries.
const STORAGE_RETRY_BUDGET: Duration = Duration::from_secs(3);
/// First pause between attempts to take a lease another instance holds; grows to the max.
const POLL_START: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_millis(1000);

/// Leases on blobs in one container.
pub struct BlobLock {
    container: BlobContainerClient,
    url: Url,
    lease_duration: Duration,
    /// Set once the container is known to exist, to skip creating it again.
    container_ready: AtomicBool,
}

impl BlobLock {
    /// A lock on `config`'s container, with the credential it names.
    pub fn new(config: &BlobLockConfig) -> anyhow::Result<Self> {
        let options = crate::azure::client_options(STORAGE_RETRY_BUDGET)?;
        let (credential, _) = crate::azure::credential(
            config.credential,
            config.managed_identity_client_id.as_deref(),
            &options,
        )?;
        let url = Url::parse(&format!(
            "{}/{}",
            config.blob_service_url.as_str().trim_end_matches('/'),
            config.container
        ))
        .context("building the lease container URL")?;
        let container = BlobContainerClient::new(
            url.clone(),
            Some(credential),
            Some(BlobContainerClientOptions {
                client_options: options,
                ..Default::default()
            }),
        )
        .context("setting up the lease container client")?;
        Ok(Self {
            container,
            url,
            lease_duration: config.lease_duration,
            container_ready: AtomicBool::new(false),
        })
    }

    async fn ensure_container(&self) -> Result<(), LockError> {
        if self.container_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        storage_call("create container");
        match self.container.create(None).await {
            Ok(_) => {}
            Err(err) if code(&err).as_deref() == Some("ContainerAlreadyExists") => {}
            Err(err) => return Err(unavailable("creating the lease container", &err)),
        }
        self.container_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// True when the lease's notes say its holder keeps it for an unsaved refresh token
    /// (reading metadata needs no lease).
    async fn holds_pending(&self, blob: &BlobClient) -> bool {
        storage_call("read notes");
        match blob.get_properties(None).await {
            Ok(response) => response
                .metadata()
                .map(|m| notes_from_metadata(&m).pending_since.is_some())
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Creates a blob holding `content` unless one exists. `false` when it already did.
    async fn create_blob(&self, blob: &BlobClient, content: &[u8]) -> Result<bool, LockError> {
        storage_call("create blob");
        let options = BlockBlobClientUploadOptions::default().if_not_exists();
        match blob
            .upload(RequestContent::from(content.to_vec()), Some(options))
            .await
        {
            Ok(_) => Ok(true),
            // Exists (maybe leased: then the lease is reported before the condition).
            Err(err)
                if matches!(
                    code(&err).as_deref(),
                    Some("BlobAlreadyExists" | "LeaseIdMissing")
                ) || err.http_status() == Some(StatusCode::PreconditionFailed) =>
            {
                Ok(false)
            }
            Err(err) if code(&err).as_deref() == Some("ContainerNotFound") => {
                self.container_ready.store(false, Ordering::Release);
                self.ensure_container().await?;
                Box::pin(self.create_blob(blob, content)).await
            }
            Err(err) => Err(unavailable("creating a lease blob", &err)),
        }
    }
}

#[async_trait]
impl RefreshLock for BlobLock {
    async fn acquire(&self, connection: &str, wait: Duration) -> Result<Box<dyn Lease>, LockError> {
        let blob = self.container.blob_client(&format!("refresh/{connection}"));
        let lease_id = new_lease_id();
        let started = tokio::time::Instant::now();
        let mut poll = POLL_START;
        let secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(60);
        loop {
            let options = BlobClientAcquireLeaseOptions {
                proposed_lease_id: Some(lease_id.clone()),
                ..Default::default()
            };
            storage_call("acquire lease");
            match blob.acquire_lease(secs, Some(options)).await {
                Ok(_) => break,
                Err(err) => match code(&err).as_deref() {
                    Some("LeaseAlreadyPresent") => {
                        // A holder saving a refresh token may keep the lease for long:
                        // say so at once instead of waiting out the caller's budget.
                        if poll == POLL_START && self.holds_pending(&blob).await {
                            return Err(LockError::Busy {
                                connection: connection.to_owned(),
                            });
                        }
                        if started.elapsed() + poll > wait {
                            return Err(LockError::Busy {
                                connection: connection.to_owned(),
                            });
                        }
                        tokio::time::sleep(poll).await;
                        poll = (poll * 2).min(POLL_MAX);
                    }
                    Some("BlobNotFound") => {
                        self.create_blob(&blob, b"").await?;
                    }
                    Some("ContainerNotFound") => {
                        self.container_ready.store(false, Ordering::Release);
                        self.ensure_container().await?;
                    }
                    _ => return Err(unavailable("taking the refresh lease", &err)),
                },
            }
        }
        let lost = Arc::new(AtomicBool::new(false));
        // Read after taking the lease: the notes were written by the previous holder.
        storage_call("read notes");
        let notes = match blob.get_properties(None).await {
            Ok(response) => response
                .metadata()
                .map(|m| notes_from_metadata(&m))
                .unwrap_or_default(),
            Err(err) => {
                let _ = blob.release_lease(lease_id.clone(), None).await;
                return Err(unavailable("reading the refresh lease", &err));
            }
        };
        let renewer = tokio::spawn(renew(
            self.container.blob_client(&format!("refresh/{connection}")),
            lease_id.clone(),
            self.lease_duration,
            Arc::clone(&lost),
            connection.to_owned(),
        ));
        Ok(Box::new(BlobLease {
            blob,
            lease_id,
            notes,
            lost,
            renewer,
        }))
    }

    async fn claim_once(&self, key: &str) -> Result<bool, LockError> {
        self.ensure_container().await?;
        let blob = self.container.blob_client(&format!("state/{key}"));
        // A random mark of this claim: if the create succeeded but its answer was lost and
        // the SDK's retry then finds the blob, reading the mark back tells it was ours.
        let mut mark = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut mark);
        let mark: Vec<u8> = mark
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .collect();
        if self.create_blob(&blob, &mark).await? {
            return Ok(true);
        }
        storage_call("read claim");
        let existing = match blob.download(None).await {
            Ok(download) => download
                .body
                .collect()
                .await
                .map_err(|err| unavailable("reading a used state", &err))?,
            Err(err) => return Err(unavailable("reading a used state", &err)),
        };
        Ok(existing.as_ref() == mark.as_slice())
    }

    async fn check(&self) -> Result<(), LockError> {
        self.ensure_container().await
    }

    fn describe(&self) -> String {
        format!(
            "Azure Blob leases in {} ({} s, renewed while held)",
            self.url,
            self.lease_duration.as_secs()
        )
    }
}

/// Renews the lease until aborted. A failed renewal is retried soon: Azure renews a lease
/// that expired as long as nobody leased the blob since. The lease counts as lost when
/// another instance holds it, or when no renewal succeeded for a whole lease duration (then
/// another instance may have taken and released it).
async fn renew(
    blob: BlobClient,
    lease_id: String,
    duration: Duration,
    lost: Arc<AtomicBool>,
    connection: String,
) {
    let every = duration / 3;
    let mut last_renewed = tokio::time::Instant::now();
    let mut pause = every;
    loop {
        tokio::time::sleep(pause).await;
        storage_call("renew lease");
        match blob.renew_lease(lease_id.clone(), None).await {
            Ok(_) => {
                last_renewed = tokio::time::Instant::now();
                pause = every;
            }
            Err(err) => {
                let taken = matches!(
                    code(&err).as_deref(),
                    Some(
                        "LeaseIdMismatchWithLeaseOperation"
                            | "LeaseNotPresentWithLeaseOperation"
                            | "LeaseLost"
                    )
                );
                if taken || last_renewed.elapsed() >= duration {
                    lost.store(true, Ordering::Release);
                    error!(connection = %connection, error = %describe_error(&err), "the refresh lease was lost while held: another instance may refresh at the same time");
                    return;
                }
                warn!(connection = %connection, error = %describe_error(&err), "renewing the refresh lease failed; retrying");
                pause = (every / 5).max(Duration::from_secs(1));
            }
        }
    }
}

struct BlobLease {
    blob: BlobClient,
    lease_id: String,
    notes: LeaseNotes,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

#[async_trait]
impl Lease for BlobLease {
    fn notes(&self) -> &LeaseNotes {
        &self.notes
    }

    async fn set_notes(&mut self, notes: LeaseNotes) -> Result<(), LockError> {
        if notes == self.notes {
            return Ok(());
        }
        let options = BlobClientSetMetadataOptions {
            lease_id: Some(self.lease_id.clone()),
            ..Default::default()
        };
        storage_call("write notes");
        self.blob
            .set_metadata(&notes_to_metadata(&notes), Some(options))
            .await
            .map_err(|err| unavailable("writing the refresh lease's notes", &err))?;
        self.notes = notes;
        Ok(())
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    async fn release(self: Box<Self>) {
        self.renewer.abort();
        storage_call("release lease");
        if let Err(err) = self.blob.release_lease(self.lease_id.clone(), None).await {
            // It expires on its own; the next caller waits at most one lease duration.
            warn!(error = %describe_error(&err), "releasing the refresh lease failed");
        }
    }
}

impl Drop for BlobLease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// One line per storage request at DEBUG, so what the lease costs can be counted.
fn storage_call(op: &'static str) {
    tracing::debug!(op, "storage call");
}

/// A lease id: Azure wants a GUID string.
fn new_lease_id() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The storage error code (`x-ms-error-code`) of a failed call.
fn code(err: &azure_core::Error) -> Option<String> {
    match err.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
        _ => None,
    }
}

fn describe_error(err: &azure_core::Error) -> String {
    match (err.http_status(), code(err)) {
        (Some(status), Some(code)) => format!("HTTP {} {code}", u16::from(status)),
        (Some(status), None) => format!("HTTP {}", u16::from(status)),
        _ => err.to_string(),
    }
}

fn unavailable(what: &str, err: &azure_core::Error) -> LockError {
    LockError::Unavailable(format!("{what}: {}", describe_error(err)))
}

// Metadata names must be C# identifiers; values ASCII.
const BACKOFF_UNTIL: &str = "backoffuntil";
const FAILURE: &str = "failure";
const FAILURE_CODE: &str = "failurecode";
const FAILURES: &str = "failures";
const FAILED_AT: &str = "failedat";
const PENDING_SINCE: &str = "pendingsince";
const HOLDER: &str = "holder";

fn notes_to_metadata(notes: &LeaseNotes) -> HashMap<String, String> {
    let mut metadata = HashMap::new();
    let mut put = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            metadata.insert(key.to_owned(), ascii(&value));
        }
    };
    put(BACKOFF_UNTIL, notes.backoff_until.map(|t| t.to_rfc3339()));
    put(FAILURE, notes.failure.clone());
    put(FAILURE_CODE, notes.failure_code.clone());
    put(
        FAILURES,
        (notes.failures > 0).then(|| notes.failures.to_string()),
    );
    put(FAILED_AT, notes.failed_at.map(|t| t.to_rfc3339()));
    put(PENDING_SINCE, notes.pending_since.map(|t| t.to_rfc3339()));
    put(HOLDER, notes.holder.clone());
    metadata
}

fn notes_from_metadata(metadata: &HashMap<String, String>) -> LeaseNotes {
    let time = |key: &str| {
        metadata
            .get(key)
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    LeaseNotes {
        backoff_until: time(BACKOFF_UNTIL),
        failure: metadata.get(FAILURE).cloned(),
        failure_code: metadata.get(FAILURE_CODE).cloned(),
        failures: metadata
            .get(FAILURES)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        failed_at: time(FAILED_AT),
        pending_since: time(PENDING_SINCE),
        holder: metadata.get(HOLDER).cloned(),
    }
}

/// A header-safe copy: printable ASCII only, at most 300 characters.
fn ascii(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(300)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_survive_metadata() {
        let notes = LeaseNotes {
            backoff_until: Some(
                DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
                    .expect("time")
                    .with_timezone(&Utc),
            ),
            failure: Some("the provider answered HTTP 503 — busy".into()),
            failure_code: Some("provider_unavailable".into()),
            failures: 3,
            failed_at: Some(
                DateTime::parse_from_rfc3339("2026-12-01T09:59:58Z")
                    .expect("time")
                    .with_timezone(&Utc),
            ),
            pending_since: None,
            holder: Some("host/42".into()),
        };
        let back = notes_from_metadata(&notes_to_metadata(&notes));
        assert_eq!(back.backoff_until, notes.backoff_until);
        assert_eq!(
            back.failure.as_deref(),
            Some("the provider answered HTTP 503 ? busy")
        );
        assert_eq!(back.failure_code, notes.failure_code);
        assert_eq!(back.holder, notes.holder);
        assert_eq!(notes_from_metadata(&HashMap::new()), LeaseNotes::default());
    }

    #[test]
    fn lease_ids_are_guids() {
        let id = new_lease_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
        assert_ne!(id, new_lease_id());
    }
}
