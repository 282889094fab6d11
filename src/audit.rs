//! The audit trail: who took which connection's tokens. One event per token handed out
//! (`token_issued`: `/api/refresh`, cached or refreshed, each proxied request, `token-broker
//! token`, a consent) and per refusal of an authenticated caller (`token_refused`: 403,
//! 409, 429, 5xx), under the target `token_broker::audit`. Unauthenticated attempts are
//! counted, not written one by one: their count goes out at most once a minute
//! (`unauthenticated_attempts`).
//!
//! The events are not debug output: `telemetry::audit` writes them whatever `RUST_LOG` says
//! (not through `tracing`'s filters: see there why), and only `audit = false` in the
//! configuration turns them off. With
//! `BROKER_LOG_FORMAT=json` they are JSON lines like every log line. They carry a
//! fingerprint of the access token (`token_id`) so handouts of one token can be grouped,
//! never the token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use oauth2::AccessToken;
use sha2::{Digest, Sha256};

use crate::telemetry::{audit, AuditValue};

/// Where a handed-out token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The broker's cache (no token request).
    Cached,
    /// A token request made for this handout (or one another caller's request just made).
    Refreshed,
    /// A consent: the grant's first token, stored by the broker.
    Consent,
}

impl Source {
    /// A token obtained at `obtained_at` for a caller who asked at `asked_at`: refreshed
    /// when obtained since, else cached.
    pub fn of(obtained_at: DateTime<Utc>, asked_at: DateTime<Utc>) -> Source {
        if obtained_at >= asked_at {
            Source::Refreshed
        } else {
            Source::Cached
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cached => "cached",
            Source::Refreshed => "refreshed",
            Source::Consent => "consent",
        }
    }
}

/// One token handed out.
pub struct Handout<'a> {
    pub connection: &'a str,
    /// The key's name, the principal's object id; for a consent, the admin who began it (the
    /// admin key's name, or the signed-in user's object id).
    pub caller: &'a str,
    /// The client application of an Entra ID caller, when its token names one.
    pub app_id: Option<&'a str>,
    /// The route, as its template (`/api/refresh/{connection}`), or `cli` for the CLI.
    pub route: &'a str,
    /// The organisation picked with `?tenant=`, if any.
    pub tenant: Option<&'a str>,
    pub source: Source,
    pub token_id: &'a str,
    /// As [`timestamp`] writes it (the cached path keeps it written).
    pub expires_at: Option<&'a str>,
    /// The Functions host's invocation id, if the host relayed the request.
    pub invocation_id: &'a str,
}

/// A refusal of an authenticated caller.
pub struct Refusal<'a> {
    pub connection: &'a str,
    pub caller: &'a str,
    pub app_id: Option<&'a str>,
    pub route: &'a str,
    /// The error code answered (`caller_not_allowed`, `consent_required`, …).
    pub code: &'a str,
    pub status: u16,
    pub invocation_id: &'a str,
}

/// The audit trail of one broker: on or off, and the unauthenticated attempts not yet
/// written.
pub struct Audit {
    enabled: bool,
    unauthenticated: AtomicU64,
    /// When the count was last written; `None` before the first attempt.
    last_count: Mutex<Option<DateTime<Utc>>>,
}

/// How often at most the count of unauthenticated attempts is written.
const COUNT_EVERY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

impl Audit {
    pub fn new(enabled: bool) -> Self {
        Audit {
            enabled,
            unauthenticated: AtomicU64::new(0),
            last_count: Mutex::new(None),
        }
    }

    pub fn issued(&self, handout: &Handout<'_>) {
        if !self.enabled {
            return;
        }
        audit(
            "token_issued",
            &[
                ("connection", text(handout.connection)),
                ("caller", text(handout.caller)),
                ("app_id", handout.app_id.and_then(text)),
                ("route", plain(handout.route)),
                ("tenant", handout.tenant.and_then(text)),
                ("source", plain(handout.source.as_str())),
                ("token_id", plain(handout.token_id)),
                ("expires_at", handout.expires_at.and_then(plain)),
                ("invocation_id", text(handout.invocation_id)),
            ],
        );
    }

    pub fn refused(&self, refusal: &Refusal<'_>) {
        if !self.enabled {
            return;
        }
        audit(
            "token_refused",
            &[
                ("connection", text(refusal.connection)),
                ("caller", text(refusal.caller)),
                ("app_id", refusal.app_id.and_then(text)),
                ("route", plain(refusal.route)),
                ("error", plain(refusal.code)),
                ("status", Some(AuditValue::U64(refusal.status.into()))),
                ("invocation_id", text(refusal.invocation_id)),
            ],
        );
    }

    /// Counts an attempt without valid credentials; writes the count when a minute has
    /// passed since it was last written (the first attempt is written at once).
    pub fn unauthenticated(&self, now: DateTime<Utc>) {
        if !self.enabled {
            return;
        }
        self.unauthenticated.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_count.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| now - at < COUNT_EVERY) {
            return;
        }
        *last = Some(now);
        let count = self.unauthenticated.swap(0, Ordering::Relaxed);
        audit(
            "unauthenticated_attempts",
            &[("count", Some(AuditValue::U64(count)))],
        );
    }
}

fn text(value: &str) -> Option<AuditValue<'_>> {
    Some(AuditValue::Str(value))
}

/// The broker's own text: a route template, an error code, the source, a fingerprint, a
/// timestamp (see [`AuditValue::Plain`]).
fn plain(value: &str) -> Option<AuditValue<'_>> {
    Some(AuditValue::Plain(value))
}

/// An instant as the audit trail writes it: RFC 3339 in UTC, whole seconds.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A short fingerprint of an access token: the first 16 hex digits of its SHA-256. Enough to
/// tell tokens apart in a day's events; nothing to recover the token from.
pub fn token_id(token: &AccessToken) -> String {
    let digest = Sha256::digest(token.secret().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_groups_one_token_and_shows_none() {
        let token = AccessToken::new("at-secret-0123456789".into());
        let id = token_id(&token);
        assert_eq!(id.len(), 16);
        assert_eq!(id, token_id(&token));
        assert_ne!(id, token_id(&AccessToken::new("another".into())));
        assert!(!"at-secret-0123456789".contains(&id));
    }
}
