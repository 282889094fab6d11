//! Refresh coordination: serve from cache, refresh once per connection at a time, never lose
//! a rotated refresh token.
//!
//! Per connection there is an in-memory copy of the stored record and a tokio mutex (the
//! "flight"). A caller whose cached token is good enough never takes the mutex. Everyone else
//! queues on it; the holder re-reads the store (another instance may have refreshed) and
//! refreshes only if the token still is not good enough. A caller that finds a token obtained
//! after it arrived (here or by another instance) takes it: it satisfies any `min_validity`
//! and `force` — a thousand concurrent callers cause one token request, and no caller ever
//! refreshes twice. Everything behind the cache runs in a task of its own, so a caller that
//! goes away cannot cancel a refresh between the provider's rotation and the store's write.
//!
//! Across instances, the caller that holds the flight then takes the connection's lease
//! ([`crate::lock`]) before it re-reads the store, so one instance at a time calls the
//! provider; a caller that arrived before another instance's refresh takes that token.
//! A failed flight leaves a back-off in the lease's notes: every caller that queued behind
//! it, here or on another instance, gets the same failure until the back-off ends, instead of
//! one retry loop per caller. A refresh token the store has not accepted yet keeps the lease
//! (renewed) until a background save succeeds, so no instance refreshes with the older copy.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::{PkceCodeVerifier, TokenResponse};
use serde_json::{Map, Value};
use tracing::{info, warn, Instrument};

use crate::config::LeaseTimings;
use crate::lock::{instance_name, Lease, LeaseNotes, LockError, RefreshLock};
use crate::provider::{Provider, ProviderTokenResponse, UpstreamError, UpstreamHttp};
use crate::store::{StoreError, TokenStore};
use crate::token::{GrantStatus, TokenRecord};

/// How often a token request is tried when the provider answers 429/503 or cannot be
/// reached (see [`UpstreamError::is_retryable`]).
const UPSTREAM_ATTEMPTS: u32 = 3;
/// Pause before the first retry; doubled for each further one.
const UPSTREAM_BACKOFF: Duration = Duration::from_millis(500);

/// What a caller asks of `/api/refresh`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenRequest {
    /// Life the token must have left; the broker default when `None`.
    pub min_validity: Option<Duration>,
    /// Refresh even if the cached token is good enough.
    pub force: bool,
}

/// Why no token could be handed out, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("unknown connection `{0}`")]
    UnknownConnection(String),
    /// No token yet, or the grant is dead: an admin must consent (again).
    #[error("{reason}")]
    ConsentRequired { connection: String, reason: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The last refresh failed and the connection is backing off; every caller gets this
    /// until `retry_after` has passed.
    #[error("{message}")]
    RefreshFailed {
        /// `provider_unavailable` or `provider_error`.
        code: &'static str,
        message: String,
        retry_after: Duration,
    },
    /// Another instance holds the connection's lease (refreshing, or saving a refresh token).
    #[error("{0}")]
    Busy(String),
    /// The lease store cannot be reached: no refresh without the lease.
    #[error("{0}")]
    LockUnavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<LockError> for BrokerError {
    fn from(err: LockError) -> Self {
        match err {
            LockError::Busy { .. } => {
                BrokerError::Busy(format!("{err}; try again in a few seconds"))
            }
            LockError::Unavailable(_) => BrokerError::LockUnavailable(err.to_string()),
        }
    }
}

impl BrokerError {
    /// How long the caller should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BrokerError::RefreshFailed { retry_after, .. } => Some(*retry_after),
            BrokerError::Busy(_) | BrokerError::LockUnavailable(_) | BrokerError::Store(_) => {
                Some(Duration::from_secs(5))
            }
            _ => None,
        }
    }
}

struct Connection {
    provider: Provider,
    /// The last record read or written; a std Mutex because nothing awaits while it is held.
    cache: Mutex<Cached>,
    /// One upstream token request per connection at a time; holds the connection's lease
    /// between flights while a refresh token waits to be saved.
    flight: tokio::sync::Mutex<Flight>,
    /// The back-off after a failed flight, as this instance knows it.
    backoff: Mutex<Option<Backoff>>,
    /// When the store last refused a save.
    save_failed_at: Mutex<Option<DateTime<Utc>>>,
    /// A background task is retrying the save of an unsaved refresh token.
    saver_running: std::sync::atomic::AtomicBool,
    /// The last failed refresh since the last success, for the status page. Kept in memory
    /// only: writing failures to the store would cost a vault write per failing call.
    failure: Mutex<Option<Failure>>,
}

#[derive(Default)]
struct Flight {
    /// The lease, kept while the cache holds a refresh token the store has not accepted.
    held: Option<Box<dyn Lease>>,
}

#[derive(Clone)]
struct Backoff {
    until: DateTime<Utc>,
    code: &'static str,
    message: String,
}

#[derive(Clone)]
struct Failure {
    at: DateTime<Utc>,
    message: String,
}

#[derive(Default, Clone)]
struct Cached {
    record: Option<Arc<TokenRecord>>,
    /// The record holds a refresh token the store has not accepted yet. It must be saved
    /// before anything else happens, and the store's older copy must never be used.
    unsaved: bool,
}

/// How a connection is doing, for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Connected,
    ConsentRequired,
    /// The last refresh failed (provider or store trouble); the grant may still be fine.
    Failing,
}

/// One row of the status page. No secrets.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionStatus {
    pub name: String,
    pub state: ConnectionState,
    /// When the current access token expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the current access token was obtained.
    pub last_refresh: Option<DateTime<Utc>>,
    pub consented_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// What the timer did for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrerefreshOutcome {
    Refreshed,
    /// Nothing to do.
    Fresh,
    /// Nothing could be done (no consent yet, provider's minimum interval).
    Skipped,
    Failed,
}

/// One connection's line in the timer's report. No secrets.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrerefreshReport {
    pub connection: String,
    pub outcome: PrerefreshOutcome,
    pub detail: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Hands out access tokens for the configured connections.
pub struct Broker {
    connections: BTreeMap<String, Connection>,
    store: Arc<dyn TokenStore>,
    lock: Arc<dyn RefreshLock>,
    timings: LeaseTimings,
    http: UpstreamHttp,
    min_validity: Duration,
}

impl Broker {
    /// A broker over `providers`, keeping tokens in `store`.
    pub fn new(
        providers: BTreeMap<String, Provider>,
        store: Arc<dyn TokenStore>,
        lock: (Arc<dyn RefreshLock>, LeaseTimings),
        http: UpstreamHttp,
        min_validity: Duration,
    ) -> Self {
        let (lock, timings) = lock;
        let connections = providers
            .into_iter()
            .map(|(name, provider)| {
                let connection = Connection {
                    provider,
                    cache: Mutex::new(Cached::default()),
                    flight: tokio::sync::Mutex::new(Flight::default()),
                    backoff: Mutex::new(None),
                    saver_running: std::sync::atomic::AtomicBool::new(false),
                    save_failed_at: Mutex::new(None),
                    failure: Mutex::new(None),
                };
                (name, connection)
            })
            .collect();
        Self {
            connections,
            store,
            lock,
            timings,
            http,
            min_validity,
        }
    }

    /// The provider of a configured connection.
    pub fn provider(&self, name: &str) -> Result<&Provider, BrokerError> {
        Ok(&self.connection(name)?.provider)
    }

    /// The state of every connection, read from the store (another instance may have
    /// changed it) unless this process holds a newer, unsaved record.
    pub async fn statuses(&self) -> Vec<ConnectionStatus> {
        let mut statuses = Vec::with_capacity(self.connections.len());
        for (name, conn) in &self.connections {
            let cached = conn.cached();
            let record = match (cached.unsaved, cached.record) {
                (true, Some(record)) => Ok(Some(record)),
                _ => self.store.load(name).await.map(|r| r.map(Arc::new)),
            };
            let failure = conn.failure();
            let status = match record {
                Err(err) => ConnectionStatus {
                    name: name.clone(),
                    state: ConnectionState::Failing,
                    expires_at: None,
                    last_refresh: None,
                    consented_at: None,
                    last_error: Some(err.to_string()),
                    last_error_at: None,
                },
                Ok(record) => {
                    let state = match (&record, &failure) {
                        (None, _) => ConnectionState::ConsentRequired,
                        (Some(r), _) if r.status == GrantStatus::ConsentRequired => {
                            ConnectionState::ConsentRequired
                        }
                        (Some(_), Some(_)) => ConnectionState::Failing,
                        (Some(_), None) => ConnectionState::Connected,
                    };
                    let dead_reason = record.as_ref().and_then(|r| r.last_error.clone());
                    ConnectionStatus {
                        name: name.clone(),
                        state,
                        expires_at: record.as_ref().and_then(|r| r.expires_at),
                        last_refresh: record.as_ref().map(|r| r.obtained_at),
                        consented_at: record.as_ref().map(|r| r.consented_at),
                        last_error_at: failure.as_ref().map(|f| f.at),
                        last_error: failure.map(|f| f.message).or(dead_reason),
                    }
                }
            };
            statuses.push(status);
        }
        statuses
    }

    fn connection(&self, name: &str) -> Result<&Connection, BrokerError> {
        self.connections
            .get(name)
            .ok_or_else(|| BrokerError::UnknownConnection(name.to_owned()))
    }

    /// A record whose access token satisfies `request`, refreshing if needed.
    ///
    /// Everything past the cache runs in its own task: a caller that goes away (an ADF
    /// timeout, a dropped connection) must not cancel a refresh halfway, between the
    /// provider rotating the refresh token and the new one being stored.
    pub async fn token(
        self: &Arc<Self>,
        name: &str,
        request: TokenRequest,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let conn = self.connection(name)?;
        let min_validity = request.min_validity.unwrap_or(self.min_validity);
        let arrived_at = Utc::now();

        if !request.force {
            if let Some(record) = conn.cached_if(|r| r.is_valid_for(min_validity, Utc::now())) {
                tracing::debug!(connection = name, "served from cache");
                return Ok(record);
            }
        }

        let this = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(
            async move {
                this.token_locked(&name, request, min_validity, arrived_at)
                    .await
            }
            .in_current_span(),
        )
        .await
        .map_err(|err| BrokerError::Internal(format!("refresh task failed: {err}")))?
    }

    /// Behind the in-process flight: the cache again, the back-off, then the lease.
    async fn token_locked(
        self: &Arc<Self>,
        name: &str,
        request: TokenRequest,
        min_validity: Duration,
        arrived_at: DateTime<Utc>,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let conn = self.connection(name)?;
        let mut flight = conn.flight.lock().await;
        let now = Utc::now();
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
    async fn take_lease(
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
    async fn end_flight(
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
                    pending_since: Some(Utc::now()),
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
    fn spawn_saver(self: &Arc<Self>, name: &str) {
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

    async fn token_leased(
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
        let now = Utc::now();
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
                let until = Utc::now()
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

    /// The timer's pass over every connection: refresh access tokens that expire within
    /// `window`, and refresh tokens that have been idle for half their idle lifetime. One
    /// failing connection does not stop the others.
    pub async fn prerefresh(self: &Arc<Self>, window: Duration) -> Vec<PrerefreshReport> {
        let mut reports = Vec::with_capacity(self.connections.len());
        for (name, conn) in &self.connections {
            let report = self
                .prerefresh_one(name, conn, window)
                .instrument(tracing::info_span!("prerefresh", connection = %name))
                .await;
            match report.outcome {
                PrerefreshOutcome::Failed => {
                    warn!(connection = %name, detail = %report.detail, "prerefresh failed")
                }
                _ => {
                    info!(connection = %name, outcome = ?report.outcome, detail = %report.detail, "prerefresh")
                }
            }
            reports.push(report);
        }
        reports
    }

    async fn prerefresh_one(
        self: &Arc<Self>,
        name: &str,
        conn: &Connection,
        window: Duration,
    ) -> PrerefreshReport {
        let report = |outcome, detail: String, expires_at| PrerefreshReport {
            connection: name.to_owned(),
            outcome,
            detail,
            expires_at,
        };
        let cached = conn.cached();
        let record = match (cached.unsaved, cached.record) {
            // A refresh token the store has not accepted yet lives only in this process:
            // saving it comes before anything else.
            (true, Some(_)) => match self.save_pending(name, conn).await {
                Ok(record) => record,
                Err(err) => {
                    return report(
                        PrerefreshOutcome::Failed,
                        format!("the pending refresh token could not be saved yet: {err}"),
                        None,
                    )
                }
            },
            _ => match self.store.load(name).await {
                Ok(Some(record)) => Arc::new(record),
                Ok(None) => {
                    return report(
                        PrerefreshOutcome::Skipped,
                        "no token yet: consent required".into(),
                        None,
                    )
                }
                Err(err) => return report(PrerefreshOutcome::Failed, err.to_string(), None),
            },
        };
        if record.status != GrantStatus::Connected || record.refresh_token.is_none() {
            return report(
                PrerefreshOutcome::Skipped,
                "no usable refresh token: consent required".into(),
                record.expires_at,
            );
        }
        let now = Utc::now();
        let remaining = record.remaining(now);
        let idle = (now - record.obtained_at).to_std().unwrap_or_default();
        // Tokens that live no longer than the window (Exact Online's 10 minutes) would be
        // refreshed on every run, all day, whether anyone uses them or not: each a token
        // call and a new vault version. Callers refresh those on demand instead.
        let lifetime = record
            .expires_at
            .and_then(|expires_at| (expires_at - record.obtained_at).to_std().ok())
            .unwrap_or_default();
        let reason = if remaining <= window && lifetime > window {
            Some(format!("access token expires in {} s", remaining.as_secs()))
        } else {
            conn.provider
                .refresh_token_idle_lifetime
                .filter(|lifetime| idle >= *lifetime / 2)
                .map(|lifetime| {
                    format!(
                        "refresh token unused for {} of its {} idle days",
                        idle.as_secs() / 86_400,
                        lifetime.as_secs() / 86_400
                    )
                })
        };
        let Some(reason) = reason else {
            let detail = if lifetime <= window {
                format!(
                    "{} s tokens are refreshed on demand, not ahead of time",
                    lifetime.as_secs()
                )
            } else {
                format!("access token good for {} s", remaining.as_secs())
            };
            return report(PrerefreshOutcome::Fresh, detail, record.expires_at);
        };
        if conn.too_soon_to_refresh(&record, now) {
            return report(
                PrerefreshOutcome::Skipped,
                format!("{reason}, but the provider refuses a refresh this soon after the last"),
                record.expires_at,
            );
        }
        // Through the normal path (single flight, store re-read, rotation rules); an idle
        // refresh token is exercised even though the access token would do.
        let request = TokenRequest {
            min_validity: Some(window),
            force: remaining > window,
        };
        match self.token(name, request).await {
            Ok(record) => report(PrerefreshOutcome::Refreshed, reason, record.expires_at),
            Err(err) => report(
                PrerefreshOutcome::Failed,
                format!("{reason}; refresh failed: {err}"),
                record.expires_at,
            ),
        }
    }

    /// Under the flight and the lease, saves the refresh token the store has not accepted
    /// yet (or re-reads the store if another task saved it meanwhile).
    async fn save_pending(
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

    /// Saves every refresh token the store has not accepted yet (at shutdown: an instance
    /// being recycled must not take the newest refresh token with it). Returns how many
    /// could still not be saved.
    pub async fn flush_pending(self: &Arc<Self>) -> usize {
        let mut failed = 0;
        for (name, conn) in &self.connections {
            if !conn.cached().unsaved {
                continue;
            }
            if let Err(err) = self.save_pending(name, conn).await {
                warn!(connection = %name, error = %err, "a pending refresh token could not be saved before shutdown");
                failed += 1;
            }
        }
        failed
    }

    /// Records a redeemed `state` nonce as used on every instance; `false` if it already was
    /// (a replayed callback URL), so the code is never exchanged twice.
    pub async fn claim_state(&self, nonce: &str) -> Result<bool, BrokerError> {
        self.lock.claim_once(nonce).await.map_err(BrokerError::from)
    }

    /// Stores the tokens from a completed consent, replacing whatever was there.
    pub async fn complete_consent(
        self: &Arc<Self>,
        name: &str,
        code: String,
        verifier: PkceCodeVerifier,
        callback_extra: Map<String, Value>,
    ) -> Result<(), BrokerError> {
        // Its own task, like refreshes: a browser that goes away mid-exchange must not
        // cancel storing the tokens the provider has just issued.
        let this = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            this.complete_consent_detached(&name, code, verifier, callback_extra)
                .await
        })
        .await
        .map_err(|err| BrokerError::Internal(format!("consent task failed: {err}")))?
    }

    async fn complete_consent_detached(
        self: &Arc<Self>,
        name: &str,
        code: String,
        verifier: PkceCodeVerifier,
        callback_extra: Map<String, Value>,
    ) -> Result<(), BrokerError> {
        let conn = self.connection(name)?;
        let span = tracing::info_span!("consent", connection = name);
        async {
            // A code is single use: no retries here.
            let response = conn
                .provider
                .exchange_code(&self.http, code, verifier)
                .await
                .inspect_err(|err| warn!(error = %err, "code exchange failed"))?;
            conn.provider
                .check_refresh_token(&response)
                .inspect_err(|err| warn!(error = %err, "consent refused"))?;
            if response.refresh_token().is_none() {
                warn!("the provider issued no refresh token; the connection will need consent again when the access token expires (check the scopes, e.g. offline_access)");
            }
            let now = Utc::now();
            let mut record = new_record(None, &response, conn.provider.default_lifetime, now, now);
            record.extra.extend(callback_extra);
            // What callers need besides the token (tenants, division). A failed lookup
            // must not lose the grant: the tokens are stored regardless.
            match conn.provider.lookup(&self.http, response.access_token()).await {
                Ok(found) => record.extra.extend(found),
                Err(err) => {
                    warn!(error = %err, "post-consent lookup failed; tokens are stored, reconnect to retry the lookup");
                    record.last_error = Some(format!("post-consent lookup failed: {err}"));
                }
            }
            // Under the lease, so a consent never races a refresh on another instance.
            let mut flight = conn.flight.lock().await;
            let lease = self.take_lease(name, &mut flight).await;
            if let Err(BrokerError::Busy(_)) = lease {
                // Another instance holds the lease (a long refresh, or a refresh token of
                // the old grant it is still saving): keep the new grant in memory and store
                // it once the lease is free, over whatever the other wrote (it is older).
                conn.set_cache(Some(Arc::new(record)), true);
                drop(flight);
                self.spawn_saver(name);
                info!(outcome = "connected", "consent completed; it is stored as soon as another instance releases the refresh lease");
                return Ok(());
            }
            if let Err(err) = &lease {
                // Storage is down. The code is spent already: store the tokens regardless.
                warn!(error = %err, "storing the consent without the refresh lease");
            }
            let persisted = self.persist_locked(name, conn, record).await;
            if persisted.is_ok() {
                conn.set_backoff(None);
            }
            match lease {
                Ok(mut lease) => {
                    if persisted.is_ok() && lease.notes().backoff_until.is_some() {
                        let notes = LeaseNotes {
                            backoff_until: None,
                            failure: None,
                            failure_code: None,
                            ..lease.notes().clone()
                        };
                        let _ = lease.set_notes(notes).await;
                    }
                    self.end_flight(name, conn, &mut flight, lease).await;
                }
                Err(_) if persisted.is_err() => {
                    // Nothing holds the lease for the unsaved tokens: retry the save anyway.
                    self.spawn_saver(name);
                }
                Err(_) => {}
            }
            persisted?;
            info!(outcome = "connected", "consent completed");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// The authoritative record, with the flight held: an unsaved one is saved first;
    /// otherwise the store is re-read, since another instance may have refreshed.
    async fn load_locked(
        &self,
        name: &str,
        conn: &Connection,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let cached = conn.cached();
        if let (true, Some(record)) = (cached.unsaved, cached.record) {
            // Never over a newer record: if this instance lost the lease at some point,
            // another may have refreshed (or an admin consented) and saved since.
            let stored = self.store.load(name).await.inspect_err(|err| {
                conn.note_save_failure();
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
                conn.note_save_failure();
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

    async fn refresh_locked(
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
                    let now = Utc::now();
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
                        let now = Utc::now();
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
                        at: Utc::now(),
                        message: err.to_string(),
                    }));
                    return Err(err.into());
                }
            }
        }
        Err(consent_required(name, &record))
    }

    async fn refresh_with_retries(
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
    async fn persist_locked(
        &self,
        name: &str,
        conn: &Connection,
        record: TokenRecord,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let record = Arc::new(record);
        conn.set_cache(Some(record.clone()), true);
        if let Err(err) = self.store.save(name, &record).await {
            conn.note_save_failure();
            warn!(connection = name, error = %err, "saving tokens failed; keeping them in memory until the store accepts them");
            conn.set_failure(Some(Failure {
                at: Utc::now(),
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

impl Connection {
    /// True when the provider would refuse a refresh now and the current token still works.
    fn too_soon_to_refresh(&self, record: &TokenRecord, now: DateTime<Utc>) -> bool {
        let interval = self.provider.min_refresh_interval;
        !interval.is_zero()
            && record.is_valid_for(Duration::ZERO, now)
            && (now - record.obtained_at).to_std().unwrap_or_default() < interval
    }

    fn cached(&self) -> Cached {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The cached record if it is saved and `accept` likes it.
    fn cached_if(&self, accept: impl Fn(&TokenRecord) -> bool) -> Option<Arc<TokenRecord>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match &cache.record {
            Some(record) if !cache.unsaved && accept(record) => Some(record.clone()),
            _ => None,
        }
    }

    fn set_cache(&self, record: Option<Arc<TokenRecord>>, unsaved: bool) {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Cached { record, unsaved };
    }

    fn note_save_failure(&self) {
        *self
            .save_failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Utc::now());
    }

    /// The store refused a save after `since`.
    fn save_failed_since(&self, since: DateTime<Utc>) -> bool {
        self.save_failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at > since)
    }

    /// The shared failure while a back-off runs.
    fn backing_off(&self, now: DateTime<Utc>) -> Option<BrokerError> {
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let backoff = backoff.as_ref()?;
        let left = (backoff.until - now)
            .to_std()
            .ok()
            .filter(|d| !d.is_zero())?;
        Some(BrokerError::RefreshFailed {
            code: backoff.code,
            message: format!(
                "{} (the last refresh failed; the next attempt is in {} s)",
                backoff.message,
                left.as_secs().max(1)
            ),
            retry_after: left,
        })
    }

    fn set_backoff(&self, backoff: Option<Backoff>) {
        *self.backoff.lock().unwrap_or_else(|p| p.into_inner()) = backoff;
    }

    fn set_failure(&self, failure: Option<Failure>) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    }

    fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The error code a back-off recorded by any instance answers with.
fn failure_code(code: Option<&str>) -> &'static str {
    match code {
        Some("provider_unavailable") => "provider_unavailable",
        _ => "provider_error",
    }
}

fn consent_required(name: &str, record: &TokenRecord) -> BrokerError {
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
fn new_record(
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
