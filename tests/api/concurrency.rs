//! Single flight: many concurrent callers, one upstream refresh.

use crate::helpers::TestApp;
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

    let calls = (0..200).map(|_| {
        let http = app.http.clone();
        let url = format!("{}/api/refresh/acme", app.base);
        tokio::spawn(async move {
            let response = http
                .get(url)
                .header("X-API-Key", crate::helpers::CALLER_KEY)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.expect("json");
            (status, body)
        })
    });
    let mut tokens = HashSet::new();
    for call in calls.collect::<Vec<_>>() {
        let (status, body) = call.await.expect("join");
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
                    .header("X-API-Key", crate::helpers::CALLER_KEY)
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
