//! The `[refresh]` section: how much life a token must have, lifetimes, the timer's window,
//! the callers' refresh budget, the expiry warning.

use std::time::Duration;

use serde::Deserialize;

use super::values::positive_secs;
use super::ConfigError;

/// Refresh policy defaults.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    /// Life an access token must have left when the caller does not pass `min_validity`.
    pub min_validity: Duration,
    /// Lifetime assumed when the provider sends no `expires_in`.
    pub default_lifetime: Duration,
    /// Timeout of one request to a provider's token endpoint.
    pub upstream_timeout: Duration,
    /// The timer refreshes access tokens that expire within this window.
    pub prerefresh_window: Duration,
    /// Forced refreshes a connection allows at once (per instance)…
    pub force_burst: u32,
    /// …and then one per this interval.
    pub force_interval: Duration,
    /// A `grant_expiring` warning goes out when a grant's forecast end is this close.
    pub expiry_warning: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRefresh {
    min_validity: Option<u64>,
    default_lifetime: Option<u64>,
    upstream_timeout: Option<u64>,
    prerefresh_window: Option<u64>,
    force_burst: Option<u32>,
    force_interval: Option<u64>,
    expiry_warning_days: Option<u64>,
}

impl RawRefresh {
    /// `[refresh]`: the refresh policy's defaults and bounds.
    pub(super) fn validate(self) -> Result<RefreshConfig, ConfigError> {
        Ok(RefreshConfig {
            min_validity: Duration::from_secs(self.min_validity.unwrap_or(300)),
            default_lifetime: positive_secs(
                "refresh.default_lifetime",
                self.default_lifetime.unwrap_or(3600),
            )?,
            upstream_timeout: positive_secs(
                "refresh.upstream_timeout",
                self.upstream_timeout.unwrap_or(30),
            )?,
            prerefresh_window: positive_secs(
                "refresh.prerefresh_window",
                self.prerefresh_window.unwrap_or(900),
            )?,
            force_burst: match self.force_burst.unwrap_or(5) {
                burst @ 1..=100 => burst,
                _ => {
                    return Err(ConfigError::key(
                        "refresh.force_burst",
                        "must be 1-100 forced refreshes",
                    ))
                }
            },
            force_interval: match self.force_interval.unwrap_or(60) {
                secs @ 1..=86_400 => Duration::from_secs(secs),
                _ => {
                    return Err(ConfigError::key(
                        "refresh.force_interval",
                        "must be 1-86400 seconds",
                    ))
                }
            },
            expiry_warning: match self.expiry_warning_days.unwrap_or(14) {
                days @ 0..=365 => Duration::from_secs(days * 86_400),
                _ => {
                    return Err(ConfigError::key(
                        "refresh.expiry_warning_days",
                        "must be 0-365 days (0: no warnings)",
                    ))
                }
            },
        })
    }
}
