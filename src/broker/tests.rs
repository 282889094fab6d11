//! The broker's time rules, driven by a manual clock (no sleeping): a provider's minimum
//! refresh interval, the pre-refresh window, idle refresh tokens and the back-off after a
//! failed refresh. The provider is a tiny local token endpoint that counts requests and
//! answers `invalid_client`, so every refresh attempt is seen and fails at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::{AccessToken, RefreshToken};

use super::{Broker, BrokerError, ConnectionSetup, ForceLimit, PrerefreshOutcome, TokenRequest};
use crate::alert::Alerts;
use crate::clock::ManualClock;
use crate::config::{Config, Endpoints, LeaseTimings};
use crate::lock::LocalLock;
use crate::provider::{Provider, UpstreamHttp};
use crate::store::{FileStore, TokenStore};
use crate::token::{GrantStatus, TokenRecord};

struct Setup {
    broker: Arc<Broker>,
    /// What the alert webhook received.
    alerts: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    clock: Arc<ManualClock>,
    store: Arc<FileStore>,
    token_requests: Arc<AtomicUsize>,
    /// The token endpoint answers a token instead of `invalid_client`.
    succeed: Arc<AtomicBool>,
    start: DateTime<Utc>,
    _dir: tempfile::TempDir,
}

/// A broker with one connection `c` (extra TOML lines for it in `connection`), a record
/// obtained at the clock's start whose access token lives `lifetime` seconds.
async fn setup(connection: &str, lifetime: i64) -> Setup {
    let token_requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&token_requests);
    let succeed = Arc::new(AtomicBool::new(false));
    let succeeding = Arc::clone(&succeed);
    let app = axum::Router::new().route(
        "/token",
        axum::routing::post(move || {
            let counter = Arc::clone(&counter);
            let succeeding = Arc::clone(&succeeding);
            async move {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if succeeding.load(Ordering::SeqCst) {
                    return (
                        axum::http::StatusCode::OK,
                        axum::Json(serde_json::json!({
                            "access_token": format!("at-{n}"), "token_type": "Bearer",
                            "expires_in": 3600, "refresh_token": format!("rt-{n}"),
                        })),
                    );
                }
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    axum::Json(serde_json::json!({"error": "invalid_client"})),
                )
            }
        }),
    );
    // The alert webhook (Teams/Slack style), recording what it is sent.
    let alerts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let received = Arc::clone(&alerts);
    let app = app.route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let received = Arc::clone(&received);
            async move {
                received.lock().expect("lock").push(body);
                "1"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let text = format!(
        r#"
        [auth]
        api_keys = ["0123456789abcdef-key"]
        [connections.c]
        provider = "oauth2"
        authorize_url = "{base}/auth"
        token_url = "{base}/token"
        client_id = "client"
        client_secret = "secret"
        scopes = ["offline_access"]
        {connection}
        "#
    );
    let config = Config::parse(&text, &|_| None).expect("config");
    let connection = &config.connections["c"];
    let Endpoints::Static {
        authorize_url,
        token_url,
    } = &connection.endpoints
    else {
        panic!("static endpoints")
    };
    let redirect = url::Url::parse("http://localhost/api/callback").expect("url");
    let provider = Provider::new(
        connection,
        (authorize_url, token_url),
        connection.client_secret.as_ref(),
        &redirect,
        Duration::from_secs(3600),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FileStore::open(dir.path()).expect("store"));
    let start = DateTime::parse_from_rfc3339("2026-06-01T08:00:00Z")
        .expect("time")
        .with_timezone(&Utc);
    store
        .save(
            "c",
            &TokenRecord {
                status: GrantStatus::Connected,
                access_token: Some(AccessToken::new("at".into())),
                token_type: "Bearer".into(),
                expires_at: Some(start + chrono::Duration::seconds(lifetime)),
                refresh_token: Some(RefreshToken::new("rt".into())),
                scope: None,
                facts: Default::default(),
                obtained_at: start,
                consented_at: start,
                last_error: None,
            },
        )
        .await
        .expect("save");
    let clock = Arc::new(ManualClock::new(start));
    let broker = Arc::new(Broker::new(
        BTreeMap::from([(
            "c".to_owned(),
            ConnectionSetup {
                provider_name: "oauth2",
                provider: Ok(provider),
            },
        )]),
        store.clone(),
        (
            Arc::new(LocalLock::default()),
            LeaseTimings {
                wait: Duration::from_secs(1),
                failure_backoff: Duration::from_secs(30),
            },
        ),
        UpstreamHttp::new(Duration::from_secs(5)).expect("http"),
        (
            Duration::from_secs(300),
            ForceLimit {
                burst: 3,
                interval: Duration::from_secs(600),
            },
        ),
        clock.clone(),
        Alerts::new(Some(&format!("{base}/hook").into()), None).expect("alerts"),
    ));
    Setup {
        broker,
        alerts,
        clock,
        store,
        token_requests,
        succeed,
        start,
        _dir: dir,
    }
}

impl Setup {
    fn at(&self, seconds: i64) {
        self.clock
            .set(self.start + chrono::Duration::seconds(seconds));
    }

    fn requests(&self) -> usize {
        self.token_requests.load(Ordering::SeqCst)
    }

    async fn forced(&self) -> Result<Arc<TokenRecord>, BrokerError> {
        self.forced_by(false).await
    }

    async fn forced_by(&self, internal: bool) -> Result<Arc<TokenRecord>, BrokerError> {
        let request = TokenRequest {
            min_validity: None,
            force: true,
            internal,
        };
        self.broker.token("c", request).await
    }

    async fn prerefresh(&self, window: u64) -> PrerefreshOutcome {
        let reports = self.broker.prerefresh(Duration::from_secs(window)).await;
        reports[0].outcome
    }
}

#[tokio::test]
async fn a_minimum_refresh_interval_serves_the_current_token_until_it_passes() {
    // Exact Online: 600 s tokens, no refresh within 570 s of the last.
    let s = setup("min_refresh_interval = 570", 600).await;
    s.at(569);
    let record = s.forced().await.expect("the current token");
    assert_eq!(record.obtained_at, s.start);
    assert_eq!(s.requests(), 0);
    s.at(571);
    assert!(s.forced().await.is_err());
    assert_eq!(s.requests(), 1, "past the interval the provider is asked");
    assert!(s.store.load("c").await.expect("load").is_some());
}

#[tokio::test]
async fn the_timer_refreshes_only_within_its_window() {
    let s = setup("", 3600).await;
    s.at(3600 - 901);
    assert_eq!(s.prerefresh(900).await, PrerefreshOutcome::Fresh);
    assert_eq!(s.requests(), 0);
    s.at(3600 - 899);
    assert_eq!(s.prerefresh(900).await, PrerefreshOutcome::Failed);
    assert_eq!(s.requests(), 1);
}

#[tokio::test]
async fn idle_refresh_tokens_are_exercised_at_half_their_idle_lifetime() {
    // 600 s access tokens are left to callers; a 60-day idle refresh token is used at 30.
    let s = setup("refresh_token_idle_days = 60", 600).await;
    s.at(29 * 86_400);
    assert_eq!(s.prerefresh(900).await, PrerefreshOutcome::Fresh);
    assert_eq!(s.requests(), 0);
    s.at(30 * 86_400 + 1);
    assert_eq!(s.prerefresh(900).await, PrerefreshOutcome::Failed);
    assert_eq!(s.requests(), 1);
}

/// The back-off a failed refresh answered with (`retry_after`), in seconds.
fn backoff_of(result: Result<Arc<TokenRecord>, BrokerError>) -> f64 {
    match result {
        Err(BrokerError::RefreshFailed { retry_after, .. }) => retry_after.as_secs_f64(),
        other => panic!("expected a failed refresh, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_failed_refresh_is_shared_for_a_back_off_that_grows_and_resets() {
    let s = setup("", 600).await;
    let ms = |ms: i64| s.clock.set(s.start + chrono::Duration::milliseconds(ms));
    // The first failure: about a second (±20 %).
    ms(700_000);
    let first = backoff_of(s.forced_by(true).await);
    assert!((0.8..=1.2).contains(&first), "{first}");
    assert_eq!(s.requests(), 1);
    // Within it: the same failure, with the time left, and no request.
    ms(700_500);
    let left = backoff_of(s.forced_by(true).await);
    assert!((first - 0.5 - left).abs() < 0.01, "{first} then {left}");
    assert_eq!(s.requests(), 1);
    // Each failed flight in a row grows it by 1.6, within its jitter.
    let mut at = 700_000 + (first * 1000.0) as i64 + 1;
    for (failures, expected) in [(2, 1.6), (3, 2.56), (4, 4.096)] {
        ms(at);
        let delay = backoff_of(s.forced_by(true).await);
        assert!(
            (expected * 0.8..=expected * 1.2).contains(&delay),
            "failure {failures}: {delay}"
        );
        assert_eq!(s.requests(), failures);
        at += (delay * 1000.0) as i64 + 1;
    }
    // A stored refresh resets it: the next failure is back to about a second.
    s.succeed.store(true, Ordering::SeqCst);
    ms(at);
    assert!(s.forced_by(true).await.is_ok());
    s.succeed.store(false, Ordering::SeqCst);
    ms(at + 1);
    let after = backoff_of(s.forced_by(true).await);
    assert!((0.8..=1.2).contains(&after), "{after}");
    assert_eq!(s.requests(), 6);
}

#[tokio::test]
async fn forced_refreshes_beyond_the_burst_wait_for_the_interval_and_the_timer_is_exempt() {
    // Burst 3, then one per 600 s. The provider refuses every refresh here, with a
    // back-off after each (growing, at most 30 s): calls within a back-off get its failure
    // and cost nothing.
    let s = setup("", 3600).await;
    for (i, at) in [0, 31, 62].into_iter().enumerate() {
        s.at(at);
        assert!(matches!(
            s.forced().await,
            Err(BrokerError::RefreshFailed { .. })
        ));
        assert_eq!(s.requests(), i + 1);
    }
    s.at(93);
    match s.forced().await {
        Err(BrokerError::ForceLimited { retry_after, .. }) => {
            // The first of the burst was at 0: the budget has one again at 600.
            assert_eq!(retry_after, Duration::from_secs(600 - 93));
        }
        other => panic!("expected the force limit, got {:?}", other.map(|_| ())),
    }
    assert_eq!(s.requests(), 3, "a limited call never reaches the provider");
    // The broker's own forced refresh (the timer) is not limited.
    assert!(matches!(
        s.forced_by(true).await,
        Err(BrokerError::RefreshFailed { .. })
    ));
    assert_eq!(s.requests(), 4);
    // A caller without force still gets the cached token.
    let request = TokenRequest::default();
    assert!(s.broker.token("c", request).await.is_ok());
    s.at(601);
    assert!(matches!(
        s.forced().await,
        Err(BrokerError::RefreshFailed { .. })
    ));
    assert_eq!(s.requests(), 5);
    s.at(640);
    assert!(matches!(
        s.forced().await,
        Err(BrokerError::ForceLimited { .. })
    ));
}

impl Setup {
    /// The `grant_expiring` notifications the webhook has received, after giving the
    /// webhook's task a moment to deliver.
    async fn expiring(&self) -> Vec<serde_json::Value> {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.alerts
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a["event"] == "grant_expiring")
            .cloned()
            .collect()
    }
}

#[tokio::test]
async fn grant_expiring_goes_out_once_per_forecast_within_the_warning_window() {
    const DAY: i64 = 86_400;
    // Refresh tokens die after 20 idle days; access tokens outlive the test.
    let s = setup("refresh_token_idle_days = 20", 100 * DAY).await;
    s.prerefresh(900).await;
    assert!(
        s.expiring().await.is_empty(),
        "20 days ahead: outside the 14-day window"
    );

    s.at(7 * DAY);
    s.prerefresh(900).await;
    let sent = s.expiring().await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let warning = &sent[0];
    assert_eq!(warning["connection"], "c");
    assert_eq!(warning["provider"], "oauth2");
    assert_eq!(warning["reason"], "refresh_token_idle");
    assert_eq!(warning["expires_at"], "2026-06-21T08:00:00Z");
    assert_eq!(warning["days_left"], 13);
    assert!(
        warning["detail"]
            .as_str()
            .expect("detail")
            .contains("20 days"),
        "{warning}"
    );
    assert!(warning["text"]
        .as_str()
        .expect("text")
        .contains("/api/authorize/c"));

    // The same forecast is not reported again, however often the timer runs.
    s.at(8 * DAY);
    s.prerefresh(900).await;
    s.at(9 * DAY);
    s.prerefresh(900).await;
    assert_eq!(s.expiring().await.len(), 1);

    // Another instance refreshes on day 9: a new forecast (day 29), quiet until it too
    // comes within the window, then reported once.
    let mut record = s.store.load("c").await.expect("load").expect("record");
    record.obtained_at = s.start + chrono::Duration::seconds(9 * DAY);
    s.store.save("c", &record).await.expect("save");
    s.prerefresh(900).await;
    assert_eq!(s.expiring().await.len(), 1);
    s.at(16 * DAY);
    s.prerefresh(900).await;
    s.prerefresh(900).await;
    let sent = s.expiring().await;
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[1]["expires_at"], "2026-06-30T08:00:00Z");
    assert_eq!(sent[1]["days_left"], 13);
}

#[tokio::test]
async fn the_cached_answer_is_rewritten_each_second_and_with_each_record() {
    let s = setup("", 3600).await;
    let plain = TokenRequest::default();
    // Nothing is cached before the record has been read once.
    assert!(s.broker.cached_answer("c", plain).is_none());
    let record = s.broker.token("c", plain).await.expect("token");
    let answer = |at: &str| -> serde_json::Value {
        let bytes = s.broker.cached_answer("c", plain).expect(at).body;
        serde_json::from_slice(&bytes).expect("json")
    };
    let first = s.broker.cached_answer("c", plain).expect("cached").body;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&first).expect("json"),
        record.to_response(s.start).expect("answer"),
        "the same answer as the router's path"
    );
    // Within the same second of expires_in the bytes are shared, not written again.
    s.clock.set(s.start + chrono::Duration::milliseconds(100));
    let early = s.broker.cached_answer("c", plain).expect("cached").body;
    assert_ne!(
        early.as_ptr(),
        first.as_ptr(),
        "3599 s left, no longer 3600"
    );
    s.clock.set(s.start + chrono::Duration::milliseconds(900));
    let late = s.broker.cached_answer("c", plain).expect("cached").body;
    assert_eq!(late.as_ptr(), early.as_ptr());
    // The next second has its own expires_in.
    s.at(1);
    assert_eq!(answer("at 1 s")["expires_in"], 3599);
    s.at(2);
    assert_eq!(answer("at 2 s")["expires_in"], 3598);
    // A record from another instance replaces the answer at once.
    s.store
        .save(
            "c",
            &TokenRecord {
                access_token: Some(AccessToken::new("at-2".into())),
                expires_at: Some(s.start + chrono::Duration::seconds(7200)),
                obtained_at: s.start + chrono::Duration::seconds(2),
                ..(*record).clone()
            },
        )
        .await
        .expect("save");
    s.at(3);
    let longer = TokenRequest {
        min_validity: Some(Duration::from_secs(3598)),
        ..plain
    };
    assert!(
        s.broker.cached_answer("c", longer).is_none(),
        "too short for the caller: not from the cache"
    );
    s.broker.token("c", longer).await.expect("token");
    assert_eq!(answer("the new record")["access_token"], "at-2");
    assert_eq!(answer("the new record")["expires_in"], 7197);
    let forced = TokenRequest {
        force: true,
        ..plain
    };
    assert!(s.broker.cached_answer("c", forced).is_none());
}
