//! The timer's pass (`POST /prerefresh`): refresh what is about to expire, exercise idle
//! refresh tokens, and the shutdown flush of unsaved refresh tokens.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{info, warn, Instrument};

use super::connection::Connection;
use super::{Broker, TokenRequest};
use crate::token::GrantStatus;

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

impl Broker {
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

    pub(super) async fn prerefresh_one(
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
        let provider = match conn.provider(name) {
            Ok(provider) => provider,
            Err(err) => return report(PrerefreshOutcome::Failed, err.to_string(), None),
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
        // A grant forecast to end soon is worth a warning whatever this run does with it.
        self.warn_if_expiring(name, conn, &self.forecast_for(conn, name, &record));
        if record.status != GrantStatus::Connected || record.refresh_token.is_none() {
            return report(
                PrerefreshOutcome::Skipped,
                "no usable refresh token: consent required".into(),
                record.expires_at,
            );
        }
        let now = self.clock.now();
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
            provider
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
            internal: true,
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
}
