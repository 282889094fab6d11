//! The status page's view of every connection: from the store (another instance may have
//! changed it) unless this process holds a newer, unsaved record.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Broker, Forecast};
use crate::token::{GrantStatus, Tenant};

/// How a connection is doing, for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Connected,
    ConsentRequired,
    /// The last refresh failed (provider or store trouble); the grant may still be fine.
    Failing,
    /// The provider could not be set up (its client secret is not in the vault yet, say);
    /// retried in the background.
    Misconfigured,
}

/// One row of the status page. No secrets.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnectionStatus {
    pub name: String,
    /// The provider preset (`xero`, `oauth2`, …).
    pub provider: &'static str,
    pub state: ConnectionState,
    /// When the current access token expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the current access token was obtained.
    pub last_refresh: Option<DateTime<Utc>>,
    pub consented_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The organisations the consent covers (Xero tenants, a QuickBooks company, an Exact
    /// Online division).
    pub tenants: Vec<Tenant>,
    /// When the grant will end, as far as anyone knows; `None` before the first consent.
    pub forecast: Option<Forecast>,
}

impl Broker {
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
            let (state, record, last_error, last_error_at) = match (conn.misconfiguration(), record)
            {
                (Some(reason), record) => (
                    ConnectionState::Misconfigured,
                    record.ok().flatten(),
                    Some(reason),
                    None,
                ),
                (None, Err(err)) => (ConnectionState::Failing, None, Some(err.to_string()), None),
                (None, Ok(record)) => {
                    let state = match (&record, &failure) {
                        (None, _) => ConnectionState::ConsentRequired,
                        (Some(r), _) if r.status == GrantStatus::ConsentRequired => {
                            ConnectionState::ConsentRequired
                        }
                        (Some(_), Some(_)) => ConnectionState::Failing,
                        (Some(_), None) => ConnectionState::Connected,
                    };
                    let dead_reason = record.as_ref().and_then(|r| r.last_error.clone());
                    let at = failure.as_ref().map(|f| f.at);
                    (
                        state,
                        record,
                        failure.map(|f| f.message).or(dead_reason),
                        at,
                    )
                }
            };
            statuses.push(ConnectionStatus {
                name: name.clone(),
                provider: conn.provider_name,
                state,
                expires_at: record.as_ref().and_then(|r| r.expires_at),
                last_refresh: record.as_ref().map(|r| r.obtained_at),
                consented_at: record.as_ref().map(|r| r.consented_at),
                last_error,
                last_error_at,
                tenants: record.as_ref().map(|r| r.tenants()).unwrap_or_default(),
                forecast: record.as_ref().map(|r| self.forecast_for(conn, name, r)),
            });
        }
        statuses
    }
}
