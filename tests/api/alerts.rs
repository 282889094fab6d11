//! Telling an admin when a grant dies: the `connection_state_changed` log event once per
//! transition, the webhook notification once per transition, and a webhook that hangs never
//! delaying a refresh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{consent, free_port, BrokerConfig, BrokerProcess, Upstream, CALLER_KEY};

/// A Teams/Slack-style incoming webhook: records every POSTed JSON body (and, raw, each
/// delivery's headers and bytes), and answers at once, never, or first with a 500.
struct Hook {
    url: String,
    received: Arc<Mutex<Vec<Value>>>,
    deliveries: Arc<Mutex<Vec<(axum::http::HeaderMap, axum::body::Bytes)>>>,
}

impl Hook {
    async fn start(hang: bool) -> Self {
        Self::start_with(hang, false).await
    }

    /// `fail_first`: the first delivery is answered 500 (and not counted as received).
    async fn start_with(hang: bool, fail_first: bool) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let (seen, raw) = (Arc::clone(&received), Arc::clone(&deliveries));
        let app = axum::Router::new().route(
            "/hook/secret-path",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, bytes: axum::body::Bytes| {
                    let (seen, raw) = (Arc::clone(&seen), Arc::clone(&raw));
                    async move {
                        let first = {
                            let mut raw = raw.lock().expect("lock");
                            raw.push((headers, bytes.clone()));
                            raw.len() == 1
                        };
                        if fail_first && first {
                            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "later");
                        }
                        let body: Value = serde_json::from_slice(&bytes).expect("a JSON body");
                        seen.lock().expect("lock").push(body);
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        (axum::http::StatusCode::OK, "1")
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/hook/secret-path",
            listener.local_addr().expect("addr")
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            received,
            deliveries,
        }
    }

    fn states(&self) -> Vec<String> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .map(|body| body["state"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    /// Waits until `n` notifications arrived, then a little longer to see that no more do.
    async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.received.lock().expect("lock").len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.received.lock().expect("lock").clone()
    }
}

struct Setup {
    upstream: Upstream,
    broker: BrokerProcess,
    hook: Hook,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(hang: bool) -> Self {
        Self::with(hang, "").await
    }

    /// With `extra` settings for connection `acme`.
    async fn with(hang: bool, extra: &str) -> Self {
        Self::around(Hook::start(hang).await, extra, &[]).await
    }

    /// The broker posting to `hook`, with `env` beside the webhook's URL.
    async fn around(hook: Hook, extra: &str, env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let upstream =
            Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
        let config = BrokerConfig::default()
            .file_store(&dir.path().join("tokens"))
            .lock("failure_backoff", 1)
            .tables(&upstream.connection_toml(
                "acme",
                &format!("client_secret = \"{}\"\n{extra}", upstream.client_secret),
            ))
            .write(dir.path());
        let mut env_all = vec![
            ("BROKER_ALERT_WEBHOOK_URL", hook.url.clone()),
            ("RUST_LOG", "info".to_owned()),
        ];
        env_all.extend(env.iter().cloned());
        let broker =
            BrokerProcess::start_on(port, &config, &env_all, &dir.path().join("broker.log")).await;
        Self {
            upstream,
            broker,
            hook,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn refresh(&self, query: &str) -> u16 {
        self.http
            .get(format!("{}/api/refresh/acme{query}", self.broker.base))
            .header("X-API-Key", CALLER_KEY)
            .send()
            .await
            .expect("refresh")
            .status()
            .as_u16()
    }

    /// The provider answers the next forced refresh with a 500: 502, and `failing`.
    async fn provider_fails_once(&self) {
        self.upstream
            .fail_next(1, 500, r#"{"error":"server_error"}"#, "application/json")
            .await;
        assert_eq!(self.refresh("?force=true").await, 502);
    }

    /// Consents, rotates once, and has someone replay the consented refresh token: the
    /// strict upstream revokes the grant, and the broker's next refresh finds it dead.
    async fn kill_the_grant(&self) {
        consent(&self.broker.base, "acme").await;
        let consented = self.stored_refresh_token();
        assert_eq!(self.refresh("?force=true").await, 200);
        assert_eq!(self.upstream.use_refresh_token(&consented).await, 400);
        assert_eq!(self.upstream.grants_revoked().await, 1);
    }

    fn stored_refresh_token(&self) -> String {
        let path = self._dir.path().join("tokens/acme.json");
        let record: Value =
            serde_json::from_slice(&std::fs::read(path).expect("record")).expect("json");
        record["refresh_token"].as_str().expect("token").to_owned()
    }

    fn events(&self) -> Vec<String> {
        self.broker
            .logs()
            .lines()
            .filter(|line| line.contains("connection_state_changed"))
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_transition_is_logged_and_posted_once() {
    let setup = Setup::start(false).await;
    setup.kill_the_grant().await;

    // The grant dies: one event, however many callers hear about it.
    assert_eq!(setup.refresh("?force=true").await, 409);
    assert_eq!(setup.refresh("").await, 409);
    assert_eq!(setup.refresh("?force=true").await, 409);
    // Consent again: recovered.
    consent(&setup.broker.base, "acme").await;
    // The provider fails, then works again.
    setup.provider_fails_once().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(setup.refresh("?force=true").await, 200);
    assert_eq!(setup.refresh("").await, 200);

    let received = setup.hook.wait_for(4).await;
    assert_eq!(
        setup.hook.states(),
        ["consent_required", "connected", "failing", "connected"],
        "{received:?}\n{}",
        setup.broker.logs()
    );
    let dead = &received[0];
    assert_eq!(dead["event"], "connection_state_changed");
    assert_eq!(dead["connection"], "acme");
    assert_eq!(dead["provider"], "oauth2");
    assert_eq!(dead["previous"], "connected");
    assert!(
        dead["reason"]
            .as_str()
            .is_some_and(|r| r.contains("invalid_grant")),
        "{dead}"
    );
    assert!(
        dead["text"]
            .as_str()
            .is_some_and(|t| t.contains("/api/authorize/acme")),
        "{dead}"
    );

    // The log: the same four, with the documented fields, ERROR for the bad ones.
    let events = setup.events();
    assert_eq!(events.len(), 4, "{events:#?}");
    for (line, (level, state)) in events.iter().zip([
        ("ERROR", "consent_required"),
        ("INFO", "connected"),
        ("ERROR", "failing"),
        ("INFO", "connected"),
    ]) {
        assert!(line.contains(level), "{line}");
        assert!(line.contains("token_broker::alert"), "{line}");
        assert!(line.contains(&format!(" state={state} ")), "{line}");
        assert!(line.contains("connection=acme"), "{line}");
        assert!(line.contains(" provider=oauth2 "), "{line}");
        assert!(line.contains("previous="), "{line}");
        assert!(line.contains("reason="), "{line}");
    }
    // The webhook URL is a credential: never logged.
    assert!(!setup.broker.logs().contains("secret-path"));
    // Without BROKER_ALERT_WEBHOOK_SECRET, no Standard Webhooks headers.
    for (headers, _) in setup.hook.deliveries.lock().expect("lock").iter() {
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            assert!(!headers.contains_key(name), "{name} without a secret");
        }
    }
}

/// With `BROKER_ALERT_WEBHOOK_SECRET`, every post carries Standard Webhooks' headers: an id
/// per event that stays the same when the post is retried, the attempt's timestamp, and
/// `v1,` + base64 HMAC-SHA256 over `id.timestamp.body` — computed here independently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_posts_are_signed_and_a_retry_keeps_the_id() {
    use base64::Engine;
    use hmac::Mac;
    let key = [0x5au8; 32];
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let hook = Hook::start_with(false, true).await;
    let setup = Setup::around(hook, "", &[("BROKER_ALERT_WEBHOOK_SECRET", secret.clone())]).await;
    consent(&setup.broker.base, "acme").await;
    setup.provider_fails_once().await;
    let received = setup.hook.wait_for(1).await;
    assert_eq!(setup.hook.states(), ["failing"], "{received:?}");

    let deliveries = setup.hook.deliveries.lock().expect("lock").clone();
    assert_eq!(
        deliveries.len(),
        2,
        "the first post was refused and retried once"
    );
    let header = |headers: &axum::http::HeaderMap, name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .to_str()
            .expect("ascii")
            .to_owned()
    };
    let ids: Vec<String> = deliveries
        .iter()
        .map(|(headers, _)| header(headers, "webhook-id"))
        .collect();
    assert_eq!(ids[0], ids[1], "the id is the event's, the same on a retry");
    assert!(ids[0].starts_with("msg_"), "{}", ids[0]);
    for (headers, body) in &deliveries {
        let timestamp = header(headers, "webhook-timestamp");
        let seconds: i64 = timestamp.parse().expect("Unix seconds");
        assert!((chrono::Utc::now().timestamp() - seconds).abs() < 60);
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("key");
        mac.update(format!("{}.{timestamp}.", ids[0]).as_bytes());
        mac.update(body);
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(header(headers, "webhook-signature"), expected);
    }
    // The secret never reaches the log.
    let logs = setup.broker.logs();
    assert!(!logs.contains(&secret[6..]), "the secret was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_never_delays_a_refresh() {
    let setup = Setup::start(true).await;
    setup.kill_the_grant().await;
    // The transition's notification goes to a webhook that never answers (the broker gives
    // each try 10 s): the refresh answers regardless, well before the first try times out.
    let answered = tokio::time::timeout(Duration::from_secs(8), setup.refresh("?force=true"))
        .await
        .expect("the refresh answers while the webhook hangs");
    assert_eq!(answered, 409);
    consent(&setup.broker.base, "acme").await;
    let answered = tokio::time::timeout(Duration::from_secs(8), setup.refresh("?force=true"))
        .await
        .expect("and again");
    assert_eq!(answered, 200);
    assert_eq!(
        setup.hook.wait_for(1).await.len(),
        1,
        "the first try reached it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_forecast_to_end_soon_is_warned_about_once() {
    // Refresh tokens die after 10 idle days: inside the default 14-day warning window from
    // the moment of consent.
    let setup = Setup::with(false, "refresh_token_idle_days = 10").await;
    consent(&setup.broker.base, "acme").await;
    for _ in 0..3 {
        crate::support::invoke_timer(
            &setup.http,
            &setup.broker.base,
            &crate::support::timer_payload(),
        )
        .await;
    }
    let received = setup.hook.wait_for(1).await;
    let warnings: Vec<&Value> = received
        .iter()
        .filter(|b| b["event"] == "grant_expiring")
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "once, however often the timer runs: {received:?}"
    );
    let warning = warnings[0];
    assert_eq!(warning["connection"], "acme");
    assert_eq!(warning["provider"], "oauth2");
    assert_eq!(warning["reason"], "refresh_token_idle");
    assert!(
        matches!(warning["days_left"].as_i64(), Some(9 | 10)),
        "{warning}"
    );
    assert!(warning["expires_at"].is_string(), "{warning}");
    assert!(
        warning["text"]
            .as_str()
            .is_some_and(|t| t.contains("/api/authorize/acme")),
        "{warning}"
    );

    // The log line the deployed alert rule searches for: the documented fields.
    let logs = setup.broker.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("grant_expiring"))
        .collect();
    assert_eq!(lines.len(), 1, "{logs}");
    let line = lines[0];
    for part in [
        "WARN",
        "token_broker::alert",
        "connection=acme",
        " provider=oauth2 ",
        " reason=refresh_token_idle ",
        " expires_at=",
        " days_left=",
        " detail=",
    ] {
        assert!(line.contains(part), "{part} missing: {line}");
    }
}
