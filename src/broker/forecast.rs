//! When a connection's grant will end, from what the broker knows — never a guessed date:
//!
//! - the refresh token's idle deadline: the last successful refresh (or consent) plus the
//!   provider's documented idle lifetime (`refresh_token_idle_days` overrides it); the timer
//!   uses an idle refresh token again at half that lifetime, so while the timer runs the
//!   deadline keeps moving and `keep_alive_at` says when it next will;
//! - a limit counted from consent: the admin's `grant_lifetime_days` (a Google app in
//!   "testing" status: 7) or else the provider's documented cap (QuickBooks: 5 years);
//! - the earlier of the two is the forecast; with neither, the end is unknown.
//!
//! [`Broker::warn_if_expiring`] turns a forecast within `refresh.expiry_warning_days` into
//! one `grant_expiring` alert per connection and forecast date.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::connection::Connection;
use super::Broker;
use crate::alert::GrantExpiring;
use crate::config::GrantLifetime;
use crate::token::{GrantStatus, TokenRecord};

/// Which rule ends the grant first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryReason {
    /// The refresh token dies when unused for the provider's idle lifetime.
    RefreshTokenIdle,
    /// The provider's documented maximum from consent.
    ProviderLimit,
    /// The admin's `grant_lifetime_days`.
    ConfiguredLifetime,
}

impl ExpiryReason {
    pub fn name(self) -> &'static str {
        match self {
            ExpiryReason::RefreshTokenIdle => "refresh_token_idle",
            ExpiryReason::ProviderLimit => "provider_limit",
            ExpiryReason::ConfiguredLifetime => "configured_lifetime",
        }
    }
}

/// A connection's expiry forecast. No secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Forecast {
    /// When the current access token expires.
    pub access_token_expires_at: Option<DateTime<Utc>>,
    /// When the grant ends if nothing changes; `None`: unknown (or already dead).
    pub grant_expires_at: Option<DateTime<Utc>>,
    /// Which rule gives `grant_expires_at`.
    pub grant_expiry_reason: Option<ExpiryReason>,
    /// Last successful refresh + the idle lifetime.
    pub refresh_token_idle_deadline: Option<DateTime<Utc>>,
    /// When the timer uses the refresh token again if nothing else does (half the idle
    /// lifetime after the last refresh).
    pub keep_alive_at: Option<DateTime<Utc>>,
    /// Consent + the configured lifetime or the provider's cap.
    pub grant_lifetime_deadline: Option<DateTime<Utc>>,
    /// The forecast in plain words.
    pub summary: String,
}

/// The forecast for `record` under `idle` (the refresh token's idle lifetime) and
/// `lifetime` (the grant's limit from consent).
pub fn forecast(
    record: &TokenRecord,
    idle: Option<std::time::Duration>,
    lifetime: Option<GrantLifetime>,
) -> Forecast {
    let at = |base: DateTime<Utc>, span: std::time::Duration| {
        chrono::Duration::from_std(span)
            .ok()
            .and_then(|span| base.checked_add_signed(span))
    };
    let date = |t: DateTime<Utc>| t.format("%Y-%m-%d").to_string();
    let alive = record.status == GrantStatus::Connected && record.refresh_token.is_some();
    let idle_deadline = idle
        .filter(|_| alive)
        .and_then(|i| at(record.obtained_at, i));
    let keep_alive_at = idle
        .filter(|_| alive)
        .and_then(|i| at(record.obtained_at, i / 2));
    let lifetime_deadline = lifetime
        .filter(|_| alive)
        .and_then(|l| at(record.consented_at, l.lifetime));
    let lifetime_reason = match lifetime {
        Some(GrantLifetime {
            configured: true, ..
        }) => ExpiryReason::ConfiguredLifetime,
        _ => ExpiryReason::ProviderLimit,
    };
    let (grant_expires_at, reason) = match (idle_deadline, lifetime_deadline) {
        (Some(idle), Some(cap)) if idle < cap => (Some(idle), Some(ExpiryReason::RefreshTokenIdle)),
        (_, Some(cap)) => (Some(cap), Some(lifetime_reason)),
        (Some(idle), None) => (Some(idle), Some(ExpiryReason::RefreshTokenIdle)),
        (None, None) => (None, None),
    };
    let days = |span: std::time::Duration| span.as_secs() / 86_400;
    let summary = match (alive, reason, grant_expires_at) {
        (false, _, _) => "no live grant: an admin must connect it".to_owned(),
        (true, Some(ExpiryReason::RefreshTokenIdle), Some(end)) => format!(
            "ends {} if its refresh token goes unused for {} days; the timer uses it again by {}",
            date(end),
            idle.map(days).unwrap_or_default(),
            keep_alive_at.map(date).unwrap_or_default(),
        ),
        (true, Some(ExpiryReason::ProviderLimit), Some(end)) => format!(
            "ends {} whatever is done: the provider limits a grant to {} days from consent",
            date(end),
            lifetime.map(|l| days(l.lifetime)).unwrap_or_default(),
        ),
        (true, Some(ExpiryReason::ConfiguredLifetime), Some(end)) => format!(
            "ends {}: configured to last {} days from consent (grant_lifetime_days)",
            date(end),
            lifetime.map(|l| days(l.lifetime)).unwrap_or_default(),
        ),
        (true, _, _) => {
            "unknown: the provider documents no limit (set grant_lifetime_days if you know one)"
                .to_owned()
        }
    };
    Forecast {
        access_token_expires_at: record.expires_at.filter(|_| record.access_token.is_some()),
        grant_expires_at,
        grant_expiry_reason: reason,
        refresh_token_idle_deadline: idle_deadline,
        keep_alive_at,
        grant_lifetime_deadline: lifetime_deadline,
        summary,
    }
}

impl Broker {
    /// The forecast of connection `name` for `record` (its provider's lifetimes; unknown
    /// while the provider is not set up).
    pub(super) fn forecast_for(
        &self,
        conn: &Connection,
        name: &str,
        record: &TokenRecord,
    ) -> Forecast {
        match conn.provider(name) {
            Ok(provider) => forecast(
                record,
                provider.refresh_token_idle_lifetime,
                provider.grant_lifetime,
            ),
            Err(_) => forecast(record, None, None),
        }
    }

    /// Sends `grant_expiring` when `forecast` ends within the warning window — once per
    /// connection and forecast date: the same forecast is not reported twice, a new date
    /// (a refresh moved the idle deadline, a new consent) is.
    pub(super) fn warn_if_expiring(&self, name: &str, conn: &Connection, forecast: &Forecast) {
        let (Some(expires_at), Some(reason)) =
            (forecast.grant_expires_at, forecast.grant_expiry_reason)
        else {
            return;
        };
        let now = self.clock.now();
        let window = chrono::Duration::from_std(self.expiry_warning).unwrap_or_default();
        if self.expiry_warning.is_zero() || expires_at - now > window {
            return;
        }
        {
            let mut warned = conn.warned.lock().unwrap_or_else(|p| p.into_inner());
            if *warned == Some(expires_at) {
                return;
            }
            *warned = Some(expires_at);
        }
        self.alerts.grant_expiring(GrantExpiring {
            connection: name.to_owned(),
            provider: conn.provider_name,
            reason: reason.name(),
            expires_at,
            days_left: (expires_at - now).num_days().max(0),
            detail: forecast.summary.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeZone;
    use oauth2::{AccessToken, RefreshToken};

    use super::*;
    use crate::config::{Config, GrantLifetime};

    const DAY: u64 = 86_400;

    fn t(day: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .expect("time")
            + chrono::Duration::days(day)
    }

    /// A record consented on day `consented` and last refreshed on day `refreshed`.
    fn record(consented: i64, refreshed: i64) -> TokenRecord {
        TokenRecord {
            status: GrantStatus::Connected,
            access_token: Some(AccessToken::new("a".into())),
            token_type: "Bearer".into(),
            expires_at: Some(t(refreshed) + chrono::Duration::minutes(30)),
            refresh_token: Some(RefreshToken::new("r".into())),
            scope: None,
            facts: Default::default(),
            obtained_at: t(refreshed),
            consented_at: t(consented),
            last_error: None,
        }
    }

    /// The idle lifetime and grant limit a preset gives a connection (as configured).
    fn lifetimes(settings: &str) -> (Option<Duration>, Option<GrantLifetime>) {
        let text = format!(
            "[auth]\napi_keys = [\"0123456789abcdef-key\"]\n[connections.c]\nclient_id = \"id\"\nclient_secret = \"s\"\n{settings}\n"
        );
        let config = Config::parse(&text, &|_| None).expect("config");
        let c = &config.connections["c"];
        (c.refresh_token_idle_lifetime, c.grant_lifetime)
    }

    #[test]
    fn each_preset_forecasts_from_its_documented_lifetimes() {
        // (settings, days after the last refresh it ends, reason) for a grant consented on
        // day 0 and refreshed on day 10.
        let cases = [
            ("provider = \"xero\"", Some((10 + 60, ExpiryReason::RefreshTokenIdle))),
            ("provider = \"exact-online\"", Some((10 + 30, ExpiryReason::RefreshTokenIdle))),
            ("provider = \"microsoft\"", Some((10 + 90, ExpiryReason::RefreshTokenIdle))),
            ("provider = \"google\"", Some((10 + 180, ExpiryReason::RefreshTokenIdle))),
            ("provider = \"quickbooks\"", Some((10 + 100, ExpiryReason::RefreshTokenIdle))),
            ("provider = \"hubspot\"", None),
            ("provider = \"salesforce\"", None),
            (
                "provider = \"oauth2\"\nauthorize_url = \"https://idp.example/a\"\ntoken_url = \"https://idp.example/t\"",
                None,
            ),
        ];
        for (settings, expected) in cases {
            let (idle, lifetime) = lifetimes(settings);
            let f = forecast(&record(0, 10), idle, lifetime);
            match expected {
                Some((day, reason)) => {
                    assert_eq!(f.grant_expires_at, Some(t(day)), "{settings}");
                    assert_eq!(f.grant_expiry_reason, Some(reason), "{settings}");
                    let idle_days = (day - 10) as u64;
                    assert_eq!(
                        f.keep_alive_at,
                        Some(t(10) + chrono::Duration::seconds((idle_days * DAY / 2) as i64)),
                        "{settings}"
                    );
                }
                None => {
                    assert_eq!(
                        f.grant_expires_at, None,
                        "{settings}: unknown stays unknown"
                    );
                    assert!(f.summary.starts_with("unknown"), "{}", f.summary);
                }
            }
            assert_eq!(
                f.access_token_expires_at,
                Some(t(10) + chrono::Duration::minutes(30))
            );
        }
    }

    #[test]
    fn the_idle_deadline_moves_with_each_refresh() {
        let (idle, lifetime) = lifetimes("provider = \"xero\"");
        let first = forecast(&record(0, 0), idle, lifetime);
        let later = forecast(&record(0, 25), idle, lifetime);
        assert_eq!(first.grant_expires_at, Some(t(60)));
        assert_eq!(later.grant_expires_at, Some(t(85)));
        assert_eq!(later.keep_alive_at, Some(t(55)));
        assert!(later.summary.contains("2026-03-27"), "{}", later.summary);
    }

    #[test]
    fn the_quickbooks_cap_counts_from_consent() {
        let (idle, lifetime) = lifetimes("provider = \"quickbooks\"");
        assert_eq!(lifetime.map(|l| l.configured), Some(false));
        // Refreshed the day before the cap: the cap, not the idle deadline, ends it.
        let cap = 5 * 365 + 1;
        let f = forecast(&record(0, cap - 1), idle, lifetime);
        assert_eq!(f.grant_expires_at, Some(t(cap)));
        assert_eq!(f.grant_expiry_reason, Some(ExpiryReason::ProviderLimit));
        assert_eq!(f.grant_lifetime_deadline, Some(t(cap)));
        assert_eq!(f.refresh_token_idle_deadline, Some(t(cap - 1 + 100)));
    }

    #[test]
    fn a_configured_lifetime_wins() {
        // A Google app in "testing" status: 7 days from consent, whatever the refreshes.
        let (idle, lifetime) = lifetimes("provider = \"google\"\ngrant_lifetime_days = 7");
        let f = forecast(&record(0, 6), idle, lifetime);
        assert_eq!(f.grant_expires_at, Some(t(7)));
        assert_eq!(
            f.grant_expiry_reason,
            Some(ExpiryReason::ConfiguredLifetime)
        );
        assert!(f.summary.contains("grant_lifetime_days"), "{}", f.summary);
        // It replaces the provider's cap, too.
        let (idle, lifetime) = lifetimes("provider = \"quickbooks\"\ngrant_lifetime_days = 30");
        let f = forecast(&record(0, 1), idle, lifetime);
        assert_eq!(f.grant_expires_at, Some(t(30)));
        assert_eq!(
            f.grant_expiry_reason,
            Some(ExpiryReason::ConfiguredLifetime)
        );
    }

    #[test]
    fn a_dead_grant_has_no_forecast() {
        let (idle, lifetime) = lifetimes("provider = \"xero\"");
        let mut dead = record(0, 1);
        dead.status = GrantStatus::ConsentRequired;
        let f = forecast(&dead, idle, lifetime);
        assert_eq!(f.grant_expires_at, None);
        assert_eq!(f.keep_alive_at, None);
        assert!(f.summary.contains("must connect"), "{}", f.summary);
    }
}
