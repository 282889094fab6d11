//! Telling an admin when a connection changes state: one log event per transition, with a
//! stable name and fields that an Application Insights alert rule matches (see `docs/operations.md`,
//! "Alerts"), and optionally a small JSON POST to an incoming webhook (Teams, Slack).
//!
//! The event is `connection_state_changed` with target `token_broker::alert` and the fields
//! `connection`, `provider`, `state`, `previous` and `reason` — never a token: `reason` is a
//! provider error code and description, or a configuration problem. ERROR for
//! `consent_required`, `failing` and `misconfigured`; INFO for `connected` and `configured`.
//!
//! A second event, `grant_expiring` (WARN, same target), says ahead of time that a grant is
//! forecast to end (see `broker::forecast`): fields `connection`, `provider`, `reason`
//! (`refresh_token_idle`, `provider_limit` or `configured_lifetime`), `expires_at` (RFC 3339),
//! `days_left` and `detail` — never a token.
//!
//! The webhook runs in a task of its own behind a bounded queue: a refresh only ever puts a
//! notification in the queue (dropping it, with a warning, when the queue is full), so a
//! slow or failing webhook never delays one.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::mpsc;

/// Notifications waiting for the webhook; beyond that they are dropped.
const QUEUE: usize = 64;
/// Tries per notification, and the time each may take.
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before the second try; doubled for each further one.
const FIRST_PAUSE: Duration = Duration::from_secs(1);

/// A connection's state, as alerts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Connected,
    ConsentRequired,
    Failing,
    Misconfigured,
    /// Its settings work again (after `misconfigured`); the grant's state follows.
    Configured,
}

impl AlertState {
    pub fn name(self) -> &'static str {
        match self {
            AlertState::Connected => "connected",
            AlertState::ConsentRequired => "consent_required",
            AlertState::Failing => "failing",
            AlertState::Misconfigured => "misconfigured",
            AlertState::Configured => "configured",
        }
    }

    /// A state a person has to act on.
    pub fn needs_attention(self) -> bool {
        matches!(
            self,
            AlertState::ConsentRequired | AlertState::Failing | AlertState::Misconfigured
        )
    }
}

/// One transition.
#[derive(Debug, Clone, Serialize)]
pub struct StateChange {
    pub connection: String,
    pub provider: &'static str,
    pub state: AlertState,
    pub previous: Option<AlertState>,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// A grant forecast to end soon.
#[derive(Debug, Clone, Serialize)]
pub struct GrantExpiring {
    pub connection: String,
    pub provider: &'static str,
    /// `refresh_token_idle`, `provider_limit` or `configured_lifetime`.
    pub reason: &'static str,
    pub expires_at: DateTime<Utc>,
    pub days_left: i64,
    /// The forecast in plain words.
    pub detail: String,
}

/// A webhook notification: the connection (for the delivery's own log lines) and the body.
type Notification = (String, serde_json::Value);

/// Where transitions go: the log always, the webhook when configured.
pub struct Alerts {
    webhook: Option<mpsc::Sender<Notification>>,
}

impl Alerts {
    /// Log only.
    pub fn log_only() -> Self {
        Self { webhook: None }
    }

    /// Log, and POST to `webhook` when given, signed with `secret` when given (Standard
    /// Webhooks). Starts the webhook's task: call within the tokio runtime.
    pub fn new(
        webhook: Option<&SecretString>,
        secret: Option<&SecretString>,
    ) -> anyhow::Result<Self> {
        let Some(url) = webhook else {
            if secret.is_some() {
                tracing::warn!("BROKER_ALERT_WEBHOOK_SECRET is set but BROKER_ALERT_WEBHOOK_URL is not: nothing is posted");
            }
            return Ok(Self::log_only());
        };
        let url = url::Url::parse(url.expose_secret())
            .map_err(|_| anyhow::anyhow!("BROKER_ALERT_WEBHOOK_URL is not a valid URL"))?;
        let signer = secret
            .map(|secret| standardwebhooks::Webhook::new(secret.expose_secret()))
            .transpose()
            .map_err(|_| {
                anyhow::anyhow!("BROKER_ALERT_WEBHOOK_SECRET is not a Standard Webhooks secret")
            })?;
        let client = crate::http_client::builder()?.timeout(TIMEOUT).build()?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(client, url, signer, receiver));
        Ok(Self {
            webhook: Some(sender),
        })
    }

    /// Reports a transition. Never blocks.
    pub fn state_changed(&self, change: StateChange) {
        let previous = change.previous.map_or("unknown", AlertState::name);
        let reason = change.reason.as_deref().unwrap_or("");
        if change.state.needs_attention() {
            tracing::error!(
                connection = %change.connection,
                provider = %change.provider,
                state = %change.state.name(),
                previous = %previous,
                reason,
                "connection_state_changed"
            );
        } else {
            tracing::info!(
                connection = %change.connection,
                provider = %change.provider,
                state = %change.state.name(),
                previous = %previous,
                reason,
                "connection_state_changed"
            );
        }
        self.notify(
            change.connection.clone(),
            body(&change),
            "connection_state_changed",
        );
    }

    /// Warns that a grant is forecast to end soon. Never blocks.
    pub fn grant_expiring(&self, warning: GrantExpiring) {
        tracing::warn!(
            connection = %warning.connection,
            provider = %warning.provider,
            reason = %warning.reason,
            expires_at = %warning.expires_at.to_rfc3339(),
            days_left = warning.days_left,
            detail = %warning.detail,
            "grant_expiring"
        );
        let text = format!(
            "Token Broker: the grant of connection `{}` ({}) is forecast to end on {} ({} days): {} — reconnect it at /api/authorize/{} before then",
            warning.connection,
            warning.provider,
            warning.expires_at.format("%Y-%m-%d %H:%M UTC"),
            warning.days_left,
            warning.detail,
            warning.connection,
        );
        let body = serde_json::json!({
            "text": text,
            "event": "grant_expiring",
            "connection": warning.connection,
            "provider": warning.provider,
            "reason": warning.reason,
            "expires_at": warning.expires_at,
            "days_left": warning.days_left,
            "detail": warning.detail,
        });
        self.notify(warning.connection, body, "grant_expiring");
    }

    fn notify(&self, connection: String, body: serde_json::Value, event: &str) {
        if let Some(sender) = &self.webhook {
            if sender.try_send((connection, body)).is_err() {
                tracing::warn!(event, "the alert webhook is behind: a notification was dropped (the log line above still stands)");
            }
        }
    }
}

/// The webhook's body: `text` for Teams and Slack incoming webhooks (which show it), the
/// fields for anything that reads JSON.
fn body(change: &StateChange) -> serde_json::Value {
    let what = match change.state {
        AlertState::ConsentRequired => {
            "needs consent again: open /api/authorize/{connection} as an admin"
        }
        AlertState::Failing => "is failing to refresh",
        AlertState::Misconfigured => "is misconfigured",
        AlertState::Connected => "is connected again",
        AlertState::Configured => "is configured again",
    }
    .replace("{connection}", &change.connection);
    let mut text = format!(
        "Token Broker: connection `{}` ({}) {what}",
        change.connection, change.provider
    );
    if let Some(reason) = &change.reason {
        text.push_str(&format!(" — {reason}"));
    }
    serde_json::json!({
        "text": text,
        "event": "connection_state_changed",
        "connection": change.connection,
        "provider": change.provider,
        "state": change.state,
        "previous": change.previous,
        "reason": change.reason,
        "at": change.at,
    })
}

/// One attempt's request: the body as JSON, and with a signer the Standard Webhooks
/// headers — `webhook-id` (the event's, the same on every attempt), `webhook-timestamp`
/// (this attempt's, so a receiver's 5-minute tolerance holds for retries too) and
/// `webhook-signature` (`v1,` + base64 HMAC-SHA256 over `id.timestamp.body`).
fn request(
    client: &reqwest::Client,
    url: &url::Url,
    signer: Option<&standardwebhooks::Webhook>,
    id: &str,
    payload: &[u8],
) -> reqwest::RequestBuilder {
    let mut request = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(payload.to_vec());
    if let Some(signer) = signer {
        let timestamp = chrono::Utc::now().timestamp();
        if let Ok(signature) = signer.sign(id, timestamp, payload) {
            request = request
                .header(standardwebhooks::HEADER_WEBHOOK_ID, id)
                .header(
                    standardwebhooks::HEADER_WEBHOOK_TIMESTAMP,
                    timestamp.to_string(),
                )
                .header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signature);
        }
    }
    request
}

async fn deliver(
    client: reqwest::Client,
    url: url::Url,
    signer: Option<standardwebhooks::Webhook>,
    mut receiver: mpsc::Receiver<Notification>,
) {
    while let Some((connection, body)) = receiver.recv().await {
        let mut pause = FIRST_PAUSE;
        // One id per event, kept across its retries, so a receiver can drop duplicates.
        let id = format!("msg_{}", {
            use rand::Rng;
            let bytes: [u8; 16] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        });
        let payload = serde_json::to_vec(&body).unwrap_or_default();
        for attempt in 1..=ATTEMPTS {
            // The URL is a credential: errors are reported without it.
            let outcome = match request(&client, &url, signer.as_ref(), &id, &payload)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
                Err(err) if err.is_timeout() => Err("timed out".to_owned()),
                Err(_) => Err("could not connect".to_owned()),
            };
            match outcome {
                Ok(()) => break,
                Err(problem) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, problem, "alert webhook failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(problem) => tracing::warn!(
                    connection = %connection,
                    event = %body["event"].as_str().unwrap_or_default(),
                    problem,
                    "the alert webhook refused the notification {ATTEMPTS} times; giving up on it"
                ),
            }
        }
    }
}
