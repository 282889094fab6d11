//! The provider call and what its answer means: rotation persisted first, a lost race told
//! apart from a dead grant, a malformed answer's new refresh token kept, and the retries
//! that cannot re-send a spent refresh token.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::TokenResponse;
use tracing::{info, warn};

use super::connection::{Connection, Failure};
use super::{Broker, BrokerError};
use crate::alert::AlertState;
use crate::provider::{Provider, ProviderTokenResponse, UpstreamError};
use crate::token::{GrantStatus, TokenRecord};

/// How often a token request is tried when the provider answers 429/503 or cannot be
/// reached (see [`UpstreamError::is_retryable`]).
const UPSTREAM_ATTEMPTS: u32 = 3;
/// Pause before the first retry; doubled for each further one.
const UPSTREAM_BACKOFF: Duration = Duration::from_millis(500);

impl Broker {
    pub(super) async fn refresh_locked(
        &self,
        name: &str,
        conn: &Connection,
        mut record: Arc<TokenRecord>,
        min_validity: Duration,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let provider = conn.provider(name)?;
        // At most two rounds: the second only after losing a race to another instance.
        for round in 0..2 {
            let Some(refresh_token) = record
                .refresh_token
                .clone()
                .filter(|_| record.status == GrantStatus::Connected)
            else {
                return Err(consent_required(name, &record));
            };
            match self.refresh_with_retries(&provider, &refresh_token).await {
                Ok(response) => {
                    let now = self.clock.now();
                    let next = new_record(
                        Some(&record),
                        &response,
                        provider.default_lifetime,
                        now,
                        record.consented_at,
                    );
                    let record = self.persist_locked(name, conn, next).await?;
                    self.transition(name, conn, AlertState::Connected, None);
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
                            self.transition(name, conn, AlertState::Connected, None);
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
                    self.transition(
                        name,
                        conn,
                        AlertState::ConsentRequired,
                        dead.last_error.clone(),
                    );
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
                    self.transition(name, conn, AlertState::Failing, Some(err.to_string()));
                    return Err(err.into());
                }
            }
        }
        Err(consent_required(name, &record))
    }

    pub(super) async fn refresh_with_retries(
        &self,
        provider: &Provider,
        refresh_token: &oauth2::RefreshToken,
    ) -> Result<ProviderTokenResponse, UpstreamError> {
        let mut backoff = UPSTREAM_BACKOFF;
        let mut attempt = 1;
        loop {
            match provider.refresh(&self.http, refresh_token).await {
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
    let mut facts = previous.map(|p| p.facts.clone()).unwrap_or_default();
    facts.merge(response.extra());
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
        facts,
        obtained_at: now,
        consented_at,
        last_error: None,
    }
}
