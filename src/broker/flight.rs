//! Behind the cache: one flight per connection in this process, then the connection's
//! lease across instances, the store re-read, the provider, the persist. A failed flight
//! leaves a back-off that every caller shares; a refresh token the store has not accepted
//! yet keeps the lease until a background save succeeds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn, Instrument};

use super::backoff::BackoffPolicy;
use super::connection::{Backoff, Connection, Failure, Flight};
use super::{Broker, BrokerError, TokenRequest};
use crate::alert::AlertState;
use crate::lock::{instance_name, Lease, LeaseNotes};
use crate::store::StoreError;
use crate::token::TokenRecord;

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
        // A flight failed a moment ago, or while this caller queued: share its outcome
        // rather than try again.
        if let Some(err) = conn.shared_failure(now, Some(arrived_at)) {
            return Err(err);
        }
        // Out of the caller's refresh budget, and only the caller's request would refresh:
        // say so before waiting for the lease (the budget is spent below, when the provider
        // is actually asked).
        if conn
            .cached_if(|r| self.caller_caused(request, min_validity, r, now))
            .is_some()
        {
            self.force_budget(name, conn, now, false)?;
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
        // A record obtained since this caller arrived was stored by this flight (or by
        // another instance, which cleared the back-off already): the rule `audit::Source::of`
        // follows too.
        let stored = matches!(&result, Ok(record) if record.obtained_at >= arrived_at);
        self.end_flight(name, conn, &mut flight, lease, stored)
            .await;
        result
    }

    /// Whether refreshing `record` for `request` is the caller's doing rather than the
    /// token's age: the record would still serve a request with the broker's default
    /// `min_validity` (or the caller's, when lower), so only `force=true` or a `min_validity`
    /// above the default makes this a token request. Such refreshes spend the connection's
    /// budget ([`super::ForceLimit`]): a `min_validity` above what the provider grants can
    /// never be met, and would otherwise make every call a token request and a vault version.
    /// The broker's own requests (the timer) are exempt.
    fn caller_caused(
        &self,
        request: TokenRequest,
        min_validity: Duration,
        record: &TokenRecord,
        now: DateTime<Utc>,
    ) -> bool {
        !request.internal && record.is_valid_for(min_validity.min(self.min_validity), now)
    }

    /// A refresh the caller caused ([`Broker::caller_caused`]): within the connection's
    /// [`super::ForceLimit`], or refused with the time until the next one. `take` spends
    /// one.
    fn force_budget(
        &self,
        name: &str,
        conn: &Connection,
        now: DateTime<Utc>,
        take: bool,
    ) -> Result<(), BrokerError> {
        let mut budget = conn.forced.lock().unwrap_or_else(|p| p.into_inner());
        let result = if take {
            budget.take(self.force_limit, now)
        } else {
            budget.check(self.force_limit, now)
        };
        result.map_err(|retry_after| {
            warn!(
                connection = name,
                "refresh refused: over the connection's limit of caller-requested refreshes (force=true, or a min_validity above the default)"
            );
            BrokerError::ForceLimited {
                connection: name.to_owned(),
                retry_after,
            }
        })
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
    /// retry the save in the background), give it back otherwise. `stored`: the flight
    /// stored a new record, which ends any back-off.
    pub(super) async fn end_flight(
        self: &Arc<Self>,
        name: &str,
        conn: &Connection,
        flight: &mut Flight,
        mut lease: Box<dyn Lease>,
        stored: bool,
    ) {
        if lease.lost() {
            tracing::error!(
                connection = name,
                "the refresh lease was lost during the flight; its result was persisted regardless"
            );
        }
        // The notes follow this instance's state, in one write when anything changed: the
        // pending mark while a refresh token waits to be saved (none otherwise, which also
        // clears a dead holder's), and no back-off once the flight stored a new record.
        let unsaved = conn.cached().unsaved;
        let mut notes = lease.notes().clone();
        match (unsaved, notes.pending_since) {
            (true, None) => {
                notes.pending_since = Some(self.clock.now());
                notes.holder = Some(instance_name());
            }
            (false, Some(_)) => {
                notes.pending_since = None;
                notes.holder = None;
            }
            _ => {}
        }
        if stored {
            // The first success anywhere resets the back-off's growth.
            notes.backoff_until = None;
            notes.failure = None;
            notes.failure_code = None;
            notes.failures = 0;
            notes.failed_at = None;
        }
        if let Err(err) = lease.set_notes(notes).await {
            warn!(connection = name, error = %err, "could not update the refresh lease's notes");
        }
        if unsaved {
            flight.held = Some(lease);
            self.spawn_saver(name);
        } else {
            lease.release().await;
        }
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
                this.end_flight(&name, conn, &mut flight, lease, false)
                    .await;
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
            // `end_flight` clears the mark.
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
        // A back-off any instance set, or a failure that happened while this caller
        // waited for the lease: shared.
        let failed_while_waiting = notes.failed_at.is_some_and(|at| at >= arrived_at);
        if notes.backing_off(now).is_some() || failed_while_waiting {
            let backoff = Backoff {
                since: notes.failed_at.unwrap_or(now),
                until: notes.backoff_until.unwrap_or(now),
                code: failure_code(notes.failure_code.as_deref()),
                message: notes
                    .failure
                    .clone()
                    .unwrap_or_else(|| "the last refresh failed".to_owned()),
            };
            conn.set_backoff(Some(backoff));
            if let Some(err) = conn.shared_failure(now, Some(arrived_at)) {
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
        if self.caller_caused(request, min_validity, &record, now) {
            self.force_budget(name, conn, now, true)?;
        }
        let result = self
            .refresh_locked(name, conn, record, min_validity)
            .instrument(tracing::info_span!("refresh", connection = name))
            .await;
        match result {
            Err(BrokerError::Upstream(err)) => {
                // Everyone queued behind this flight, here and elsewhere, shares its outcome
                // until the back-off ends.
                // Growing with each failed flight in a row, wherever it ran (`backoff`).
                let failures = lease.notes().failures.saturating_add(1);
                let delay =
                    BackoffPolicy::new(self.timings.failure_backoff).delay_jittered(failures);
                let failed_at = self.clock.now();
                let until = failed_at + chrono::Duration::from_std(delay).unwrap_or_default();
                let code = err.code();
                let message = err.to_string();
                let notes = LeaseNotes {
                    backoff_until: Some(until),
                    failure: Some(message.clone()),
                    failure_code: Some(code.to_owned()),
                    failures,
                    failed_at: Some(failed_at),
                    ..lease.notes().clone()
                };
                if let Err(err) = lease.set_notes(notes).await {
                    warn!(connection = name, error = %err, "could not record the back-off with the lease");
                }
                conn.set_backoff(Some(Backoff {
                    since: failed_at,
                    until,
                    code,
                    message: message.clone(),
                }));
                Err(BrokerError::RefreshFailed {
                    code,
                    message,
                    retry_after: delay,
                })
            }
            other => other,
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
        self.end_flight(name, conn, &mut flight, lease, false).await;
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
            conn.set_failure(None);
            self.transition(name, conn, AlertState::Connected, None);
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
            self.transition(name, conn, AlertState::Failing, Some(err.to_string()));
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
