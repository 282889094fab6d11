//! Behind the cache: one flight per connection in this process, then the connection's
//! lease across instances, the store re-read, the provider, the persist. A failed flight
//! leaves a back-off that every caller shares; a refresh token the store has not accepted
//! yet keeps the lease until a background save succeeds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::TokenResponse;
use tracing::{info, warn, Instrument};

use super::connection::{Backoff, Connection, Failure, Flight};
use super::{Broker, BrokerError, TokenRequest};
use crate::lock::{instance_name, Lease, LeaseNotes};
use crate::provider::{ProviderTokenResponse, UpstreamError};
use crate::store::StoreError;
use crate::token::{GrantStatus, TokenRecord};

/// How often a token request is tried when the provider answers 429/503 or cannot be
/// reached (see [`UpstreamError::is_retryable`]).
const UPSTREAM_ATTEMPTS: u32 = 3;
/// Pause before the first retry; doubled for each further one.
const UPSTREAM_BACKOFF: Duration = Duration::from_millis(500);

impl Broker {
    /// Behind the in-process flight: the cache again, the back-off, then the lease.
    pub(super) async fn token_locked(
        self: &Arc<Self>,
        name: &str,
        request: TokenRequest,
        min_validity: Duration,
        arrived_at: DateTime<Utc>,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let conn = self.connection(name)?;
        let mut flight = conn.flight.lock().await;
        let now = self.clock.now();
        // A token obtained while we waited is newer than this request.
        if let Some(record) =
            conn.cached_if(|r| r.obtained_at > arrived_at && r.is_valid_for(Duration::ZERO, now))
        {
            return Ok(record);
        }
        if !request.force {
            if let Some(record) = conn.cached_if(|r| r.is_valid_for(min_validity, now)) {
                return Ok(record);
            }
        }
        // A flight failed a moment ago: share its outcome rather than try again.
        if let Some(err) = conn.backing_off(now) {
            return Err(err);
        }
        // The store refused a save while this caller waited: share that outcome rather than
        // have every queued caller make an attempt of its own (the background save goes on).
        if conn.cached().unsaved && conn.save_failed_since(arrived_at) {
            return Err(BrokerError::Store(StoreError::Unavailable(
                "the store refused the last write; the new tokens are kept and saved as soon as it accepts them".to_owned(),
            )));
        }

        let mut lease = self.take_lease(name, &mut flight).await?;
        let result = self
            .token_leased(
                name,
                conn,
                lease.as_mut(),
                request,
                min_validity,
                arrived_at,
            )
            .await;
        self.end_flight(name, conn, &mut flight, lease).await;
        result
    }

    /// The connection's lease: the one this instance keeps for an unsaved refresh token, or
    /// a new one (waiting for another instance's refresh, within the caller's budget).
    pub(super) async fn take_lease(
        &self,
        name: &str,
        flight: &mut Flight,
    ) -> Result<Box<dyn Lease>, BrokerError> {
        if let Some(lease) = flight.held.take() {
            if !lease.lost() {
                return Ok(lease);
            }
            // Another instance may have held it since: take it anew, and the save below
            // checks the store for a newer record first.
            tracing::error!(
                connection = name,
                "the lease kept for an unsaved refresh token was lost; taking it again"
            );
        }
        self.lock
            .acquire(name, self.timings.wait)
            .await
            .inspect_err(|err| warn!(connection = name, error = %err, "no refresh lease"))
            .map_err(BrokerError::from)
    }

    /// After work under the lease: keep it while a refresh token waits to be saved (and
    /// retry the save in the background), give it back otherwise.
    pub(super) async fn end_flight(
        self: &Arc<Self>,
        name: &str,
        conn: &Connection,
        flight: &mut Flight,
        mut lease: Box<dyn Lease>,
    ) {
        if lease.lost() {
            tracing::error!(
                connection = name,
                "the refresh lease was lost during the flight; its result was persisted regardless"
            );
        }
        if conn.cached().unsaved {
            if lease.notes().pending_since.is_none() {
                let notes = LeaseNotes {
                    pending_since: Some(self.clock.now()),
                    holder: Some(instance_name()),
                    ..lease.notes().clone()
                };
                if let Err(err) = lease.set_notes(notes).await {
                    warn!(connection = name, error = %err, "could not mark the refresh lease as holding an unsaved refresh token");
                }
            }
            flight.held = Some(lease);
            self.spawn_saver(name);
            return;
        }
        if lease.notes().pending_since.is_some() {
            let notes = LeaseNotes {
                pending_since: None,
                holder: None,
                ..lease.notes().clone()
            };
            if let Err(err) = lease.set_notes(notes).await {
                warn!(connection = name, error = %err, "could not clear the refresh lease's pending mark");
            }
        }
        lease.release().await;
    }

    /// Retries saving an unsaved refresh token with back-off until the store accepts it.
    pub(super) fn spawn_saver(self: &Arc<Self>, name: &str) {
        let Ok(conn) = self.connection(name) else {
            return;
        };
        if conn.saver_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(500);
            loop {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(30));
                let Ok(conn) = this.connection(&name) else {
                    return;
                };
                let mut flight = conn.flight.lock().await;
                if !conn.cached().unsaved {
                    break;
                }
                let lease = match this.take_lease(&name, &mut flight).await {
                    Ok(lease) => lease,
                    Err(_) => continue,
                };
                let saved = this.load_locked(&name, conn).await.is_ok();
                this.end_flight(&name, conn, &mut flight, lease).await;
                if saved {
                    break;
                }
            }
            if let Ok(conn) = this.connection(&name) {
                conn.saver_running.store(false, Ordering::Release);
            }
        });
    }

    pub(super) async fn token_leased(
        &self,
        name: &str,
        conn: &Connection,
        lease: &mut dyn Lease,
        request: TokenRequest,
        min_validity: Duration,
        arrived_at: DateTime<Utc>,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let notes = lease.notes().clone();
        if let (Some(since), false) = (notes.pending_since, conn.cached().unsaved) {
            // The previous holder kept the lease for an unsaved refresh token and stopped
            // renewing it (killed): that token may be gone, and the store's may be spent.
            tracing::error!(
                connection = name,
                holder = notes.holder.as_deref().unwrap_or("unknown"),
                pending_since = %since,
                "a refresh token may have been lost: the instance holding one the store had not accepted stopped; if the next refresh answers invalid_grant, consent again"
            );
            let cleared = LeaseNotes {
                pending_since: None,
                holder: None,
                ..notes.clone()
            };
            lease.set_notes(cleared).await?;
        }

        let record = self.load_locked(name, conn).await?;
        let now = self.clock.now();
        if !request.force && record.is_valid_for(min_validity, now) {
            return Ok(record);
        }
        if record.obtained_at > arrived_at && record.is_valid_for(Duration::ZERO, now) {
            // Another instance refreshed after this caller arrived: newer than the request.
            return Ok(record);
        }
        if let Some(left) = notes.backing_off(now) {
            let backoff = Backoff {
                until: now + chrono::Duration::from_std(left).unwrap_or_default(),
                code: failure_code(notes.failure_code.as_deref()),
                message: notes
                    .failure
                    .clone()
                    .unwrap_or_else(|| "the last refresh failed".to_owned()),
            };
            conn.set_backoff(Some(backoff));
            if let Some(err) = conn.backing_off(now) {
                return Err(err);
            }
        }
        if conn.too_soon_to_refresh(&record, now) {
            // The provider would refuse (Exact Online answers an error within ~570 s), and
            // the token still works: hand it out rather than fail.
            tracing::debug!(
                connection = name,
                "refreshed too recently for this provider; serving the current token"
            );
            return Ok(record);
        }
        let result = self
            .refresh_locked(name, conn, record, min_validity)
            .instrument(tracing::info_span!("refresh", connection = name))
            .await;
        match result {
            Err(BrokerError::Upstream(err)) => {
                // Everyone queued behind this flight, here and elsewhere, shares its outcome
                // until the back-off ends.
                let until = self.clock.now()
                    + chrono::Duration::from_std(self.timings.failure_backoff).unwrap_or_default();
                let code = match err {
                    UpstreamError::Unavailable { .. }
                    | UpstreamError::Unreachable(_)
                    | UpstreamError::Transport(_) => "provider_unavailable",
                    _ => "provider_error",
                };
                let message = err.to_string();
                let notes = LeaseNotes {
                    backoff_until: Some(until),
                    failure: Some(message.clone()),
                    failure_code: Some(code.to_owned()),
                    ..lease.notes().clone()
                };
                if let Err(err) = lease.set_notes(notes).await {
                    warn!(connection = name, error = %err, "could not record the back-off with the lease");
                }
                conn.set_backoff(Some(Backoff {
                    until,
                    code,
                    message: message.clone(),
                }));
                Err(BrokerError::RefreshFailed {
                    code,
                    message,
                    retry_after: self.timings.failure_backoff,
                })
            }
            other => {
                if other.is_ok() && lease.notes().backoff_until.is_some() {
                    let notes = LeaseNotes {
                        backoff_until: None,
                        failure: None,
                        failure_code: None,
                        ..lease.notes().clone()
                    };
                    if let Err(err) = lease.set_notes(notes).await {
                        warn!(connection = name, error = %err, "could not clear the back-off");
                    }
                }
                other
            }
        }
    }

    /// Under the flight and the lease, saves the refresh token the store has not accepted
    /// yet (or re-reads the store if another task saved it meanwhile).
    pub(super) async fn save_pending(
        self: &Arc<Self>,
        name: &str,
        conn: &Connection,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let mut flight = conn.flight.lock().await;
        let lease = self.take_lease(name, &mut flight).await?;
        let saved = self.load_locked(name, conn).await;
        self.end_flight(name, conn, &mut flight, lease).await;
        saved
    }

    /// The authoritative record, with the flight held: an unsaved one is saved first;
    /// otherwise the store is re-read, since another instance may have refreshed.
    pub(super) async fn load_locked(
        &self,
        name: &str,
        conn: &Connection,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let cached = conn.cached();
        if let (true, Some(record)) = (cached.unsaved, cached.record) {
            // Never over a newer record: if this instance lost the lease at some point,
            // another may have refreshed (or an admin consented) and saved since.
            let stored = self.store.load(name).await.inspect_err(|err| {
                conn.note_save_failure(self.clock.now());
                warn!(connection = name, error = %err, "the store is still unavailable; the pending refresh token waits");
            })?;
            if let Some(stored) = stored.filter(|stored| stored.supersedes(&record)) {
                tracing::error!(
                    connection = name,
                    "another instance stored a newer record meanwhile; the unsaved refresh token is dropped (it may have been spent)"
                );
                let stored = Arc::new(stored);
                conn.set_cache(Some(stored.clone()), false);
                return Ok(stored);
            }
            self.store.save(name, &record).await.inspect_err(|err| {
                conn.note_save_failure(self.clock.now());
                warn!(connection = name, error = %err, "saving the pending refresh token failed again");
            })?;
            conn.set_cache(Some(record.clone()), false);
            info!(connection = name, "pending refresh token saved");
            return Ok(record);
        }
        let stored = self.store.load(name).await?.map(Arc::new);
        conn.set_cache(stored.clone(), false);
        stored.ok_or_else(|| BrokerError::ConsentRequired {
            connection: name.to_owned(),
            reason: format!("connection `{name}` has no token yet: an admin must consent first"),
        })
    }

    pub(super) async fn refresh_locked(
        &self,
        name: &str,
        conn: &Connection,
        mut record: Arc<TokenRecord>,
        min_validity: Duration,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        // At most two rounds: the second only after losing a race to another instance.
        for round in 0..2 {
            let Some(refresh_token) = record
                .refresh_token
                .clone()
                .filter(|_| record.status == GrantStatus::Connected)
            else {
                return Err(consent_required(name, &record));
            };
            match self.refresh_with_retries(conn, &refresh_token).await {
                Ok(response) => {
                    let now = self.clock.now();
                    let next = new_record(
                        Some(&record),
                        &response,
                        conn.provider.default_lifetime,
                        now,
                        record.consented_at,
                    );
                    let record = self.persist_locked(name, conn, next).await?;
                    info!(outcome = "refreshed", rotated = response.refresh_token().is_some(), expires_at = ?record.expires_at, "token refreshed");
                    return Ok(record);
                }
                Err(UpstreamError::InvalidGrant { description }) => {
                    // Lost race or dead grant? If the store holds another refresh token than
                    // the one just refused, someone else rotated it: use theirs.
                    let latest = self.store.load(name).await?;
                    let rotated_elsewhere = latest.as_ref().is_some_and(|l| {
                        l.status == GrantStatus::Connected
                            && l.refresh_token.as_ref().map(|t| t.secret())
                                != Some(refresh_token.secret())
                    });
                    if let (true, Some(latest)) = (rotated_elsewhere && round == 0, latest) {
                        info!(
                            outcome = "lost_race",
                            "refresh token was rotated elsewhere; using the newer one"
                        );
                        let latest = Arc::new(latest);
                        conn.set_cache(Some(latest.clone()), false);
                        let now = self.clock.now();
                        if latest.is_valid_for(min_validity, now)
                            || conn.too_soon_to_refresh(&latest, now)
                        {
                            conn.set_failure(None);
                            return Ok(latest);
                        }
                        record = latest;
                        continue;
                    }
                    warn!(outcome = "grant_dead", "the provider refused the refresh token (invalid_grant); consent is required");
                    // The refresh token stays in the record (the status alone stops its
                    // use): if this was a misreading, nothing is lost.
                    let mut dead = (*record).clone();
                    dead.status = GrantStatus::ConsentRequired;
                    dead.access_token = None;
                    dead.last_error = Some(UpstreamError::InvalidGrant { description }.to_string());
                    let dead = self.persist_locked(name, conn, dead).await?;
                    return Err(consent_required(name, &dead));
                }
                Err(err) => {
                    warn!(outcome = "failed", error = %err, "refresh failed");
                    // A malformed answer may still carry the provider's new refresh token:
                    // the one just sent may be spent, so keep the new one.
                    if let UpstreamError::MalformedWithRefreshToken { refresh_token, .. } = &err {
                        let mut kept = (*record).clone();
                        kept.refresh_token = Some(refresh_token.clone());
                        self.persist_locked(name, conn, kept).await?;
                        warn!("kept the new refresh token from the malformed response");
                    }
                    conn.set_failure(Some(Failure {
                        at: self.clock.now(),
                        message: err.to_string(),
                    }));
                    return Err(err.into());
                }
            }
        }
        Err(consent_required(name, &record))
    }

    pub(super) async fn refresh_with_retries(
        &self,
        conn: &Connection,
        refresh_token: &oauth2::RefreshToken,
    ) -> Result<ProviderTokenResponse, UpstreamError> {
        let mut backoff = UPSTREAM_BACKOFF;
        let mut attempt = 1;
        loop {
            match conn.provider.refresh(&self.http, refresh_token).await {
                Err(err) if err.is_retryable() && attempt < UPSTREAM_ATTEMPTS => {
                    warn!(attempt, error = %err, "token endpoint unavailable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Puts `record` in the cache (marked unsaved, so the refresh token it carries is kept
    /// even if the store fails), then saves it.
    pub(super) async fn persist_locked(
        &self,
        name: &str,
        conn: &Connection,
        record: TokenRecord,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let record = Arc::new(record);
        conn.set_cache(Some(record.clone()), true);
        if let Err(err) = self.store.save(name, &record).await {
            conn.note_save_failure(self.clock.now());
            warn!(connection = name, error = %err, "saving tokens failed; keeping them in memory until the store accepts them");
            conn.set_failure(Some(Failure {
                at: self.clock.now(),
                message: err.to_string(),
            }));
            return Err(err.into());
        }
        conn.set_cache(Some(record.clone()), false);
        conn.set_failure(None);
        conn.set_backoff(None);
        Ok(record)
    }
}

/// The error code a back-off recorded by any instance answers with.
pub(super) fn failure_code(code: Option<&str>) -> &'static str {
    match code {
        Some("provider_unavailable") => "provider_unavailable",
        _ => "provider_error",
    }
}

pub(super) fn consent_required(name: &str, record: &TokenRecord) -> BrokerError {
    let reason = match (&record.status, &record.last_error) {
        (GrantStatus::ConsentRequired, Some(err)) => {
            format!(
                "the grant for `{name}` is no longer valid ({err}): an admin must consent again"
            )
        }
        _ => format!("connection `{name}` has no refresh token: an admin must consent again"),
    };
    BrokerError::ConsentRequired {
        connection: name.to_owned(),
        reason,
    }
}

/// The record after a token response. A provider that sends no new refresh token keeps the
/// old one; one that sends no `expires_in` gets `default_lifetime`; extras accumulate (a
/// refresh may omit fields the consent returned).
pub(super) fn new_record(
    previous: Option<&TokenRecord>,
    response: &ProviderTokenResponse,
    default_lifetime: Duration,
    now: DateTime<Utc>,
    consented_at: DateTime<Utc>,
) -> TokenRecord {
    // Clamped so that a nonsensical `expires_in` cannot overflow the date arithmetic.
    let lifetime = response
        .expires_in()
        .unwrap_or(default_lifetime)
        .min(Duration::from_secs(10 * 365 * 86_400));
    let mut extra = previous.map(|p| p.extra.clone()).unwrap_or_default();
    extra.extend(response.extra());
    TokenRecord {
        status: GrantStatus::Connected,
        access_token: Some(response.access_token().clone()),
        token_type: response.token_type_name(),
        expires_at: chrono::Duration::from_std(lifetime)
            .ok()
            .and_then(|lifetime| now.checked_add_signed(lifetime)),
        refresh_token: response
            .refresh_token()
            .cloned()
            .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
        scope: response
            .scope()
            .or_else(|| previous.and_then(|p| p.scope.clone())),
        extra,
        obtained_at: now,
        consented_at,
        last_error: None,
    }
}
