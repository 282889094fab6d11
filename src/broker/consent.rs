//! Storing a completed consent: the code exchange runs detached from the browser, and the
//! tokens are stored under the connection's lease so a consent never races a refresh.

use std::sync::Arc;

use crate::token::{Facts, TokenRecord};
use oauth2::{PkceCodeVerifier, TokenResponse};
use tracing::{info, warn, Instrument};

use super::refresh::new_record;
use super::{Broker, BrokerError};
use crate::alert::AlertState;

impl Broker {
    /// Records a redeemed `state` nonce as used on every instance; `false` if it already was
    /// (a replayed callback URL), so the code is never exchanged twice.
    pub async fn claim_state(&self, nonce: &str) -> Result<bool, BrokerError> {
        self.lock.claim_once(nonce).await.map_err(BrokerError::from)
    }

    /// Stores the tokens from a completed consent, replacing whatever was there; the new
    /// record (for the audit trail).
    pub async fn complete_consent(
        self: &Arc<Self>,
        name: &str,
        code: String,
        verifier: PkceCodeVerifier,
        from_callback: Facts,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        // Its own task, like refreshes: a browser that goes away mid-exchange must not
        // cancel storing the tokens the provider has just issued.
        let this = Arc::clone(self);
        let name = name.to_owned();
        tokio::spawn(async move {
            this.complete_consent_detached(&name, code, verifier, from_callback)
                .await
        })
        .await
        .map_err(|err| BrokerError::Internal(format!("consent task failed: {err}")))?
    }

    pub(super) async fn complete_consent_detached(
        self: &Arc<Self>,
        name: &str,
        code: String,
        verifier: PkceCodeVerifier,
        from_callback: Facts,
    ) -> Result<Arc<TokenRecord>, BrokerError> {
        let conn = self.connection(name)?;
        let span = tracing::info_span!("consent", connection = name);
        async {
            let provider = conn.provider(name)?;
            // A code is single use: no retries here.
            let response = provider
                .exchange_code(&self.http, code, verifier)
                .await
                .inspect_err(|err| warn!(error = %err, "code exchange failed"))?;
            provider
                .check_refresh_token(&response)
                .inspect_err(|err| warn!(error = %err, "consent refused"))?;
            if response.refresh_token().is_none() {
                warn!("the provider issued no refresh token; the connection will need consent again when the access token expires (check the scopes, e.g. offline_access)");
            }
            let now = self.clock.now();
            let mut record = new_record(None, &response, provider.default_lifetime, now, now);
            record.facts.merge(from_callback);
            // What callers need besides the token (tenants, division). A failed lookup
            // must not lose the grant: the tokens are stored regardless.
            match provider.lookup(&self.http, response.access_token()).await {
                Ok(found) => record.facts.merge(found),
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
                let record = Arc::new(record);
                conn.set_cache(Some(Arc::clone(&record)), true);
                drop(flight);
                self.spawn_saver(name);
                info!(outcome = "connected", "consent completed; it is stored as soon as another instance releases the refresh lease");
                return Ok(record);
            }
            if let Err(err) = &lease {
                // Storage is down. The code is spent already: store the tokens regardless.
                warn!(error = %err, "storing the consent without the refresh lease");
            }
            let handed = Arc::new(record.clone());
            let persisted = self.persist_locked(name, conn, record).await;
            match lease {
                Ok(lease) => {
                    let stored = persisted.is_ok();
                    self.end_flight(name, conn, &mut flight, lease, stored)
                        .await
                }
                Err(_) if persisted.is_err() => {
                    // Nothing holds the lease for the unsaved tokens: retry the save anyway.
                    self.spawn_saver(name);
                }
                Err(_) => {}
            }
            persisted?;
            self.transition(name, conn, AlertState::Connected, None);
            info!(outcome = "connected", "consent completed");
            Ok(handed)
        }
        .instrument(span)
        .await
    }
}
