//! Single flight: many concurrent callers, one upstream refresh.

use crate::support::TestApp;
use std::collections::HashSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_calls_on_an_expired_token_cause_one_refresh() {
    let mut app = TestApp::spawn().await;
    app.consent("acme").await;

    // Let the stored access token expire, and start a broker with a cold cache.
    app.stop().await;
    app.edit_stored("acme", |record| {
        record["expires_at"] = "2020-01-01T00:00:00Z".into();
    });
    app.restart().await;
    // A slow token endpoint makes sure the calls really overlap the refresh.
    app.upstream.delay(300).await;

    let (answers, _) = concurrent_refreshes(&app, 200, "").await;
    let mut tokens = HashSet::new();
    for (status, body, _) in answers {
        assert_eq!(status, 200, "{body}");
        tokens.insert(body["access_token"].as_str().expect("token").to_owned());
    }

    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    assert_eq!(tokens.len(), 1, "every caller got the one refreshed token");
    let token = tokens.into_iter().next().expect("one token");
    assert!(app.upstream.is_active(&token).await);
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_forced_refreshes_share_one_token_request() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    app.upstream.delay(300).await;
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let http = app.http.clone();
            let url = format!("{}/api/refresh/acme?force=true", app.base);
            tokio::spawn(async move {
                http.get(url)
                    .header("X-API-Key", crate::support::CALLER_KEY)
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.expect("join"), 200);
    }
    // Callers that queued behind a refresh take its (newer) token. At most one more
    // refresh happens for callers that arrived after the first one finished.
    let refreshes = app.upstream.token_requests("refresh_token").await;
    assert!((1..=2).contains(&refreshes), "{refreshes} refreshes");
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

/// Starts `count` concurrent `/api/refresh/acme{query}` calls; their statuses, bodies,
/// `Retry-After` headers and the slowest answer's time.
async fn concurrent_refreshes(
    app: &TestApp,
    count: usize,
    query: &str,
) -> (
    Vec<(u16, serde_json::Value, Option<String>)>,
    std::time::Duration,
) {
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let http = app.http.clone();
            let url = format!("{}/api/refresh/acme{query}", app.base);
            tokio::spawn(async move {
                let response = http
                    .get(url)
                    .header("X-API-Key", crate::support::CALLER_KEY)
                    .send()
                    .await
                    .expect("request");
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().expect("ascii").to_owned());
                let body: serde_json::Value = response.json().await.expect("json");
                (status, body, retry_after, started.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    let mut slowest = std::time::Duration::ZERO;
    for call in calls {
        let (status, body, retry_after, took) = call.await.expect("join");
        slowest = slowest.max(took);
        answers.push((status, body, retry_after));
    }
    (answers, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_queued_behind_a_failed_refresh_share_its_failure() {
    // A back-off long enough that the call below surely lands inside it.
    let mut app = TestApp::spawn_with(crate::support::Options {
        failure_backoff: 5,
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    app.stop().await;
    app.edit_stored("acme", |record| {
        record["expires_at"] = "2020-01-01T00:00:00Z".into();
    });
    app.restart().await;
    let before = app.upstream.token_requests("refresh_token").await;
    app.upstream
        .fail_next(1000, 503, "down", "text/plain")
        .await;

    let (answers, slowest) = concurrent_refreshes(&app, 30, "").await;

    // One flight's attempts (three), not three per caller.
    let requests = app.upstream.token_requests("refresh_token").await - before;
    assert_eq!(requests, 3, "token requests for 30 callers");
    for (status, body, retry_after) in &answers {
        assert_eq!(*status, 502, "{body}");
        assert_eq!(body["error"], "provider_unavailable", "{body}");
        assert!(retry_after.is_some(), "every failure says when to retry");
    }
    // The first caller waits for the flight's retries (0.5 s + 1 s of back-off between
    // them); nobody waits for anyone else's.
    assert!(
        slowest < std::time::Duration::from_secs(10),
        "slowest answer {slowest:?}"
    );
    eprintln!(
        "30 callers on a failing provider: {requests} token requests, slowest answer {slowest:?}"
    );

    // During the back-off no caller reaches the provider; after it, the next caller does.
    let during = app.refresh("acme", "").await;
    assert_eq!(during.status(), 502);
    assert_eq!(
        app.upstream.token_requests("refresh_token").await - before,
        3
    );
    app.upstream.fail_next(0, 503, "", "text/plain").await;
    crate::support::wait_retry_after(&during).await;
    let body = app.token("acme", "").await;
    assert!(
        app.upstream
            .is_active(body["access_token"].as_str().expect("token"))
            .await
    );
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

#[tokio::test]
async fn a_refresh_token_that_may_be_spent_is_not_resent_within_the_flight() {
    let app = TestApp::spawn_with(crate::support::Options {
        extra_config: "[refresh]\nupstream_timeout = 1\n".into(),
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    let before = app.upstream.token_requests("refresh_token").await;
    // The provider answers after the broker gave up: it may have rotated the token.
    app.upstream.delay(2500).await;
    let response = app.refresh("acme", "?force=true").await;
    assert_eq!(response.status(), 502);
    let error: serde_json::Value = response.json().await.expect("json");
    assert_eq!(error["error"], "provider_unavailable", "{error}");
    assert_eq!(
        app.upstream.token_requests("refresh_token").await - before,
        1,
        "the possibly spent refresh token was sent once"
    );
    // The strict upstream did rotate it. After the back-off the next attempt re-sends it
    // (lenient providers accept the previous token for a while); this one calls that
    // reuse and revokes the grant, which the broker then reports as dead.
    app.upstream.delay(0).await;
    tokio::time::sleep(std::time::Duration::from_millis(2600)).await;
    let response = app.refresh("acme", "?force=true").await;
    assert_eq!(response.status(), 409);
    let error: serde_json::Value = response.json().await.expect("json");
    assert_eq!(error["error"], "consent_required", "{error}");
    assert!(error["authorize_url"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_beyond_the_connections_limit_get_429_with_retry_after() {
    let app = TestApp::spawn_with(crate::support::Options {
        extra_config: "[refresh]\nforce_burst = 2\nforce_interval = 3600\n".into(),
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    let call = |query: &'static str| {
        let http = app.http.clone();
        let url = format!("{}/api/refresh/acme{query}", app.base);
        async move {
            http.get(url)
                .header("X-API-Key", crate::support::CALLER_KEY)
                .send()
                .await
                .expect("request")
        }
    };
    for _ in 0..2 {
        assert_eq!(call("?force=true").await.status(), 200);
    }
    assert_eq!(app.upstream.token_requests("refresh_token").await, 2);

    let limited = call("?force=true").await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = limited.json().await.expect("json");
    assert_eq!(body["error"], "force_rate_limited", "{body}");
    assert_eq!(app.upstream.token_requests("refresh_token").await, 2);

    // The current token is still there for callers that do not force.
    let current = call("").await;
    assert_eq!(current.status(), 200);
    let body: serde_json::Value = current.json().await.expect("json");
    assert!(
        app.upstream
            .is_active(body["access_token"].as_str().expect("token"))
            .await
    );
    assert_eq!(app.upstream.token_requests("refresh_token").await, 2);
}

/// Every refresh a caller causes beyond what the cached token serves — `force=true`, a
/// `min_validity` above the default that the provider's tokens can never meet (30-minute
/// tokens, `min_validity=3600`), with or without `tenant`, in the query or a POST body, and
/// the proxy's forced retry after an upstream 401 — spends the connection's one budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_caused_refreshes_of_every_kind_stay_within_the_connections_budget() {
    let api = crate::support::api_double::ApiDouble::start().await;
    let app = TestApp::spawn_with(crate::support::Options {
        access_token_ttl: 1800,
        extra_config: "[refresh]\nforce_burst = 3\nforce_interval = 3600\n".into(),
        acme_extra: format!("api_base_url = \"{}\"", api.base),
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    let key = crate::support::CALLER_KEY;
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for round in 0..6 {
        let mut answers = Vec::new();
        for query in [
            "?min_validity=3600",
            "?min_validity=0",
            "?force=true",
            "?min_validity=2000&tenant=nobody",
            "?min_validity=1799",
            "",
        ] {
            answers.push(app.refresh("acme", query).await);
        }
        answers.push(
            app.http
                .post(format!("{}/api/refresh/acme", app.base))
                .header("X-API-Key", key)
                .json(&serde_json::json!({"min_validity": 3000 + round}))
                .send()
                .await
                .expect("post"),
        );
        // The API refuses every token: the proxy asks for one forced refresh each time.
        answers.push(
            app.http
                .get(format!("{}/api/proxy/acme/always401", app.base))
                .header("X-API-Key", key)
                .send()
                .await
                .expect("proxy"),
        );
        for answer in answers {
            let status = answer.status().as_u16();
            *statuses.entry(status).or_default() += 1;
            if status == 429 {
                assert!(answer.headers().contains_key("retry-after"));
                let body: serde_json::Value = answer.json().await.expect("json");
                assert_eq!(body["error"], "force_rate_limited", "{body}");
            }
        }
    }
    let refreshes = app.upstream.token_requests("refresh_token").await;
    assert!(
        refreshes <= 3,
        "{refreshes} token requests for a budget of 3 (answers: {statuses:?})"
    );
    assert!(refreshes >= 1, "nothing refreshed at all: {statuses:?}");
    assert!(statuses.contains_key(&429), "{statuses:?}");
    // Requests the cached token meets are still served.
    assert_eq!(app.refresh("acme", "?min_validity=60").await.status(), 200);
    assert_eq!(app.upstream.grants_revoked().await, 0);
}
