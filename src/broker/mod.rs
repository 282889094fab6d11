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

//!
//! # Layout
//! - this file: the [`Broker`], its errors, and the cached path of [`Broker::token`];
//! - `connection`: per-connection state (cache, flight, back-off, failures);
//! - `flight`: everything behind the cache — the lease, the store re-read, the persist, the
//!   back-off and the background save of an unsaved refresh token;
//! - `refresh`: the provider call and what its answer means (rotation, lost race, dead grant);
//! - `consent`: storing a completed consent, under the same lease;
//! - `timer`: the pre-refresh pass and the shutdown flush;
//! - `status`: the status page's view of every connection;
//! - `forecast`: when each grant will end, and the `grant_expiring` warning.

mod backoff;
mod connection;
mod consent;
mod flight;
mod forecast;
mod refresh;
mod status;
mod timer;

pub use connection::CachedAnswer;
pub use forecast::{forecast, ExpiryReason, Forecast};
pub use status::{ConnectionState, ConnectionStatus};
pub use timer::{PrerefreshOutcome, PrerefreshReport};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::Instrument;

use crate::alert::{AlertState, Alerts, StateChange};
use crate::clock::Clock;
use crate::config::LeaseTimings;
use crate::lock::{LockError, RefreshLock};
use crate::provider::{Provider, UpstreamError, UpstreamHttp};
use crate::store::{StoreError, TokenStore};
use crate::token::TokenRecord;
use connection::Connection;
pub use connection::ForceLimit;

/// What a caller asks of `/api/refresh`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenRequest {
    /// Life the token must have left; the broker default when `None`.
    pub min_validity: Option<Duration>,
    /// Refresh even if the cached token is good enough. Callers' forced refreshes — and
    /// refreshes for a `min_validity` above the default — are rate-limited per connection
    /// ([`ForceLimit`]).
    pub force: bool,
    /// The broker's own request (the timer): not subject to the forced-refresh limit.
    pub internal: bool,
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
    /// The caller asked for refreshes (`force=true`, or a `min_validity` above the default
    /// that the current token cannot meet) faster than the connection allows.
    #[error("too many caller-requested refreshes of `{connection}` (force=true, or a min_validity above what its current token has left): the next is allowed in {} s; call without force and with a min_validity the provider's tokens can meet for the current token", retry_after.as_secs().max(1))]
    ForceLimited {
        connection: String,
        retry_after: Duration,
    },
    /// The lease store cannot be reached: no refresh without the lease.
    #[error("{0}")]
    LockUnavailable(String),
    /// The connection's provider could not be set up (its client secret is not in the vault
    /// yet, discovery failed); retried in the background.
    #[error("connection `{connection}` is misconfigured: {reason}")]
    Misconfigured { connection: String, reason: String },
    #[error("{0}")]
    Internal(String),
}

/// A connection as startup left it: its provider, or why that could not be set up.
pub struct ConnectionSetup {
    pub provider_name: &'static str,
    pub provider: Result<Provider, String>,
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
    /// For a provider failure, its stable code (`provider_unavailable` or `provider_error`).
    pub fn provider_code(&self) -> Option<&'static str> {
        match self {
            BrokerError::Upstream(err) => Some(err.code()),
            BrokerError::RefreshFailed { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How long the caller should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BrokerError::RefreshFailed { retry_after, .. }
            | BrokerError::ForceLimited { retry_after, .. } => Some(*retry_after),
            BrokerError::Busy(_) | BrokerError::LockUnavailable(_) | BrokerError::Store(_) => {
                Some(Duration::from_secs(5))
            }
            BrokerError::Misconfigured { .. } => Some(Duration::from_secs(30)),
            _ => None,
        }
    }
}

/// Hands out access tokens for the configured connections.
pub struct Broker {
    connections: BTreeMap<String, Connection>,
    store: Arc<dyn TokenStore>,
    lock: Arc<dyn RefreshLock>,
    timings: LeaseTimings,
    http: UpstreamHttp,
    min_validity: Duration,
    force_limit: ForceLimit,
    clock: Arc<dyn Clock>,
    alerts: Alerts,
    /// How far ahead a grant's forecast end is warned about (`grant_expiring`).
    expiry_warning: Duration,
}

impl Broker {
    /// A broker over `providers`, keeping tokens in `store`.
    pub fn new(
        connections: BTreeMap<String, ConnectionSetup>,
        store: Arc<dyn TokenStore>,
        lock: (Arc<dyn RefreshLock>, LeaseTimings),
        http: UpstreamHttp,
        (min_validity, force_limit): (Duration, ForceLimit),
        clock: Arc<dyn Clock>,
        alerts: Alerts,
    ) -> Self {
        let (lock, timings) = lock;
        let connections = connections
            .into_iter()
            .map(|(name, setup)| (name, Connection::new(setup)))
            .collect();
        let broker = Self {
            connections,
            store,
            lock,
            timings,
            http,
            min_validity,
            force_limit,
            clock,
            alerts,
            expiry_warning: Duration::from_secs(14 * 86_400),
        };
        for (name, conn) in &broker.connections {
            if let Some(reason) = conn.misconfiguration() {
                broker.transition(name, conn, AlertState::Misconfigured, Some(reason));
            }
        }
        broker
    }

    /// Warn about grants forecast to end within `window` (zero: never).
    pub fn with_expiry_warning(mut self, window: Duration) -> Self {
        self.expiry_warning = window;
        self
    }

    /// The provider of a configured connection.
    pub fn provider(&self, name: &str) -> Result<Arc<Provider>, BrokerError> {
        self.connection(name)?.provider(name)
    }

    /// Connections whose provider could not be set up, with the reason.
    pub fn misconfigured(&self) -> Vec<(String, String)> {
        self.connections
            .iter()
            .filter_map(|(name, conn)| Some((name.clone(), conn.misconfiguration()?)))
            .collect()
    }

    /// A retry of a misconfigured connection's setup: its provider, or the reason (which may
    /// have changed) it still cannot be set up.
    pub fn set_up(&self, name: &str, setup: Result<Provider, String>) {
        let Ok(conn) = self.connection(name) else {
            return;
        };
        match &setup {
            Ok(_) => {
                conn.set_setup(setup);
                self.transition(name, conn, AlertState::Configured, None);
            }
            Err(reason) => {
                let reason = reason.clone();
                conn.set_setup(setup);
                self.transition(name, conn, AlertState::Misconfigured, Some(reason));
            }
        }
    }

    /// Reports `state` for the connection when it differs from the last one reported. The
    /// first report is made only for a state that needs attention (a healthy start is not
    /// news).
    fn transition(&self, name: &str, conn: &Connection, state: AlertState, reason: Option<String>) {
        let previous = {
            let mut reported = conn.reported.lock().unwrap_or_else(|p| p.into_inner());
            let previous = *reported;
            if previous == Some(state) {
                return;
            }
            *reported = Some(state);
            previous
        };
        if previous.is_none() && !state.needs_attention() {
            return;
        }
        self.alerts.state_changed(StateChange {
            connection: name.to_owned(),
            provider: conn.provider_name,
            state,
            previous,
            reason,
            at: self.clock.now(),
        });
    }

    /// The current time, from the injected clock.
    pub fn now(&self) -> chrono::DateTime<Utc> {
        self.clock.now()
    }

    fn connection(&self, name: &str) -> Result<&Connection, BrokerError> {
        self.connections
            .get(name)
            .ok_or_else(|| BrokerError::UnknownConnection(name.to_owned()))
    }

    /// The `/api/refresh` answer (JSON bytes, as [`TokenRecord::response_bytes`] writes
    /// them) when the cached record satisfies `request` as it is (no `force`, the provider
    /// set up, enough life left), without waiting for anything; `None`: ask
    /// [`Broker::token`].
    pub fn cached_answer(&self, name: &str, request: TokenRequest) -> Option<CachedAnswer> {
        if request.force {
            return None;
        }
        let conn = self.connections.get(name)?;
        if !conn.is_set_up() {
            return None;
        }
        let min_validity = request.min_validity.unwrap_or(self.min_validity);
        let now = self.clock.now();
        conn.cached_answer(|r| r.is_valid_for(min_validity, now), now)
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
        // Until its provider is set up, a connection answers nothing but why.
        conn.provider(name)?;
        let min_validity = request.min_validity.unwrap_or(self.min_validity);
        let arrived_at = self.clock.now();

        if !request.force {
            if let Some(record) = conn.cached_if(|r| r.is_valid_for(min_validity, arrived_at)) {
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
}

#[cfg(test)]
mod tests;
