//! Per-connection state: the cached record, the flight mutex (which also keeps the lease
//! while a refresh token waits to be saved), the back-off after a failed flight, and the
//! last failure for the status page.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{BrokerError, ConnectionSetup};
use crate::alert::AlertState;
use crate::lock::Lease;
use crate::provider::Provider;
use crate::token::TokenRecord;

pub(super) struct Connection {
    /// The provider preset's name, for alerts (known even when the provider is not).
    pub(super) provider_name: &'static str,
    /// The provider, or why it could not be set up (a client secret not in the vault yet,
    /// discovery failing): the connection is then `misconfigured` until a retry succeeds.
    setup: Mutex<Result<Arc<Provider>, String>>,
    /// The state last reported to alerts (`None`: nothing reported yet).
    pub(super) reported: Mutex<Option<AlertState>>,
    /// The last record read or written; a std Mutex because nothing awaits while it is held.
    pub(super) cache: Mutex<Cached>,
    /// One upstream token request per connection at a time; holds the connection's lease
    /// between flights while a refresh token waits to be saved.
    pub(super) flight: tokio::sync::Mutex<Flight>,
    /// The back-off after a failed flight, as this instance knows it.
    pub(super) backoff: Mutex<Option<Backoff>>,
    /// When the store last refused a save.
    pub(super) save_failed_at: Mutex<Option<DateTime<Utc>>>,
    /// A background task is retrying the save of an unsaved refresh token.
    pub(super) saver_running: AtomicBool,
    /// The last failed refresh since the last success, for the status page. Kept in memory
    /// only: writing failures to the store would cost a vault write per failing call.
    pub(super) failure: Mutex<Option<Failure>>,
    /// Forced refreshes this instance may still make (see [`ForceLimit`]).
    pub(super) forced: Mutex<ForceBudget>,
    /// The forecast end last reported in a `grant_expiring` alert.
    pub(super) warned: Mutex<Option<DateTime<Utc>>>,
}

/// How many forced refreshes a connection allows: `burst` at once, then one per `interval`.
/// Each is a token request (providers rate-limit them: Exact Online allows ~200 a day) and a
/// new vault version, so a caller looping on `force=true` must not turn into either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForceLimit {
    pub burst: u32,
    pub interval: Duration,
}

/// The generic cell rate algorithm over the injected clock: `ready_at` is when the budget
/// is full again. Written here rather than taken from a rate-limit crate because it is a
/// dozen lines and must run on the broker's clock, which time-rule tests move by hand.
#[derive(Default)]
pub(super) struct ForceBudget {
    ready_at: Option<DateTime<Utc>>,
}

impl ForceBudget {
    /// Whether a forced refresh is available now, or how long until one is.
    pub(super) fn check(&self, limit: ForceLimit, now: DateTime<Utc>) -> Result<(), Duration> {
        let (next_free, _) = self.next(limit, now);
        match (next_free - now).to_std() {
            Ok(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Takes one forced refresh, or says how long until one is available.
    pub(super) fn take(&mut self, limit: ForceLimit, now: DateTime<Utc>) -> Result<(), Duration> {
        self.check(limit, now)?;
        let (_, ready_at) = self.next(limit, now);
        self.ready_at = Some(ready_at);
        Ok(())
    }

    /// When the next forced refresh is free, and when the budget would be full again after
    /// taking it.
    fn next(&self, limit: ForceLimit, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
        let interval = chrono::Duration::from_std(limit.interval).unwrap_or(chrono::TimeDelta::MAX);
        let tolerance = interval * (limit.burst.max(1) as i32 - 1);
        let ready_at = self.ready_at.filter(|t| *t > now).unwrap_or(now);
        (ready_at - tolerance, ready_at + interval)
    }
}

#[derive(Default)]
pub(super) struct Flight {
    /// The lease, kept while the cache holds a refresh token the store has not accepted.
    pub(super) held: Option<Box<dyn Lease>>,
}

#[derive(Clone)]
pub(super) struct Backoff {
    /// When the flight failed: a caller that arrived before shares the failure even after
    /// the back-off ended (it queued behind that flight).
    pub(super) since: DateTime<Utc>,
    pub(super) until: DateTime<Utc>,
    pub(super) code: &'static str,
    pub(super) message: String,
}

#[derive(Clone)]
pub(super) struct Failure {
    pub(super) at: DateTime<Utc>,
    pub(super) message: String,
}

#[derive(Default, Clone)]
pub(super) struct Cached {
    pub(super) record: Option<Arc<TokenRecord>>,
    /// The record holds a refresh token the store has not accepted yet. It must be saved
    /// before anything else happens, and the store's older copy must never be used.
    pub(super) unsaved: bool,
    /// The record's `/api/refresh` answer and the `expires_in` it was written for: the
    /// answer changes only with the record and that second, so busy callers share it.
    pub(super) answer: Option<(u64, CachedAnswer)>,
}

/// A cached token's `/api/refresh` answer, with what the audit trail writes of it.
#[derive(Debug, Clone)]
pub struct CachedAnswer {
    pub body: Bytes,
    /// The access token's fingerprint (`audit::token_id`).
    pub token_id: Arc<str>,
    /// When the access token expires, as the audit trail writes it.
    pub expires_at: Option<Arc<str>>,
}

impl Connection {
    pub(super) fn new(setup: ConnectionSetup) -> Self {
        Self {
            provider_name: setup.provider_name,
            setup: Mutex::new(setup.provider.map(Arc::new)),
            reported: Mutex::new(None),
            cache: Mutex::new(Cached::default()),
            flight: tokio::sync::Mutex::new(Flight::default()),
            backoff: Mutex::new(None),
            saver_running: AtomicBool::new(false),
            save_failed_at: Mutex::new(None),
            failure: Mutex::new(None),
            forced: Mutex::new(ForceBudget::default()),
            warned: Mutex::new(None),
        }
    }

    /// The provider, or [`BrokerError::Misconfigured`] while it cannot be set up.
    pub(super) fn provider(&self, name: &str) -> Result<Arc<Provider>, BrokerError> {
        self.setup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map_err(|reason| BrokerError::Misconfigured {
                connection: name.to_owned(),
                reason,
            })
    }

    /// True when the provider is set up (what [`Connection::provider`] checks, without
    /// handing it out).
    pub(super) fn is_set_up(&self) -> bool {
        self.setup.lock().unwrap_or_else(|p| p.into_inner()).is_ok()
    }

    /// Why the provider cannot be set up, if it cannot.
    pub(super) fn misconfiguration(&self) -> Option<String> {
        self.setup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .err()
            .cloned()
    }

    pub(super) fn set_setup(&self, setup: Result<Provider, String>) {
        *self.setup.lock().unwrap_or_else(|p| p.into_inner()) = setup.map(Arc::new);
    }

    /// True when the provider would refuse a refresh now and the current token still works.
    pub(super) fn too_soon_to_refresh(&self, record: &TokenRecord, now: DateTime<Utc>) -> bool {
        let interval = match &*self.setup.lock().unwrap_or_else(|p| p.into_inner()) {
            Ok(provider) => provider.min_refresh_interval,
            Err(_) => return false,
        };
        !interval.is_zero()
            && record.is_valid_for(Duration::ZERO, now)
            && (now - record.obtained_at).to_std().unwrap_or_default() < interval
    }

    pub(super) fn cached(&self) -> Cached {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The cached record if it is saved and `accept` likes it.
    pub(super) fn cached_if(
        &self,
        accept: impl Fn(&TokenRecord) -> bool,
    ) -> Option<Arc<TokenRecord>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match &cache.record {
            Some(record) if !cache.unsaved && accept(record) => Some(record.clone()),
            _ => None,
        }
    }

    /// The `/api/refresh` answer for the cached record when it satisfies `accept`, written
    /// at most once per second of `expires_in` and then reused: a cached call costs this
    /// lock and a reference count rather than a JSON serialization.
    pub(super) fn cached_answer(
        &self,
        accept: impl Fn(&TokenRecord) -> bool,
        now: DateTime<Utc>,
    ) -> Option<CachedAnswer> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let record = cache
            .record
            .as_ref()
            .filter(|record| !cache.unsaved && accept(record))?;
        let expires_in = record.remaining(now).as_secs();
        if let Some((written_for, answer)) = &cache.answer {
            if *written_for == expires_in {
                return Some(answer.clone());
            }
        }
        let (token_id, expires_at) = match &cache.answer {
            // The same record, a second later: the same token.
            Some((_, previous)) => (Arc::clone(&previous.token_id), previous.expires_at.clone()),
            None => (
                crate::audit::token_id(record.access_token.as_ref()?).into(),
                record.expires_at.map(|t| crate::audit::timestamp(t).into()),
            ),
        };
        let answer = CachedAnswer {
            body: Bytes::from(record.response_bytes(now)?),
            token_id,
            expires_at,
        };
        cache.answer = Some((expires_in, answer.clone()));
        Some(answer)
    }

    pub(super) fn set_cache(&self, record: Option<Arc<TokenRecord>>, unsaved: bool) {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Cached {
            record,
            unsaved,
            answer: None,
        };
    }

    pub(super) fn note_save_failure(&self, now: DateTime<Utc>) {
        *self
            .save_failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// The store refused a save after `since`.
    pub(super) fn save_failed_since(&self, since: DateTime<Utc>) -> bool {
        self.save_failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|at| at > since)
    }

    /// The shared failure while a back-off runs, or — for a caller that `arrived` before
    /// the flight failed, and so queued behind it — of that flight, however short its
    /// back-off was (`Retry-After` at least a second).
    pub(super) fn shared_failure(
        &self,
        now: DateTime<Utc>,
        arrived: Option<DateTime<Utc>>,
    ) -> Option<BrokerError> {
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let backoff = backoff.as_ref()?;
        let queued_behind = arrived.is_some_and(|arrived| backoff.since >= arrived);
        let left = (backoff.until - now)
            .to_std()
            .ok()
            .filter(|d| !d.is_zero())
            .or(queued_behind.then_some(std::time::Duration::from_secs(1)))?;
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

    pub(super) fn set_backoff(&self, backoff: Option<Backoff>) {
        *self.backoff.lock().unwrap_or_else(|p| p.into_inner()) = backoff;
    }

    pub(super) fn set_failure(&self, failure: Option<Failure>) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = failure;
    }

    pub(super) fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
