//! The happy path: consent once, then tokens; cache, force, restart, dead grants.

use crate::support::{raw_request, TestApp, ADMIN_KEY, CALLER_KEY};
use serde_json::Value;

fn access_token(body: &Value) -> String {
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

#[tokio::test]
async fn consent_then_cached_forced_and_restarted_refreshes() {
    let mut app = TestApp::spawn().await;
    app.consent("acme").await;
    assert_eq!(app.upstream.token_requests("authorization_code").await, 1);
    let first_refresh_token = app.stored_refresh_token("acme");

    // The token from the consent is served, and it is live at the provider.
    let response = app.refresh("acme", "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["cache-control"].to_str().expect("ascii"),
        "no-store"
    );
    let body: Value = response.json().await.expect("json");
    let token = access_token(&body);
    assert!(app.upstream.is_active(&token).await);
    assert_eq!(body["token_type"], "Bearer");
    let expires_in = body["expires_in"].as_u64().expect("expires_in");
    assert!((3500..=3600).contains(&expires_in), "{expires_in}");
    assert!(
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().expect("expires_at"))
            .is_ok()
    );
    assert!(body["scope"].as_str().expect("scope").contains("api:read"));
    assert!(body.get("refresh_token").is_none(), "{body}");

    // A second call is served from the cache: no token request.
    let again = app.token("acme", "").await;
    assert_eq!(access_token(&again), token);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 0);

    // force=true refreshes; the provider rotates the refresh token and we store the new one.
    let forced = app.token("acme", "?force=true").await;
    let forced_token = access_token(&forced);
    assert_ne!(forced_token, token);
    assert!(app.upstream.is_active(&forced_token).await);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    let rotated = app.stored_refresh_token("acme");
    assert_ne!(rotated, first_refresh_token);

    // After a restart the stored refresh token still works, without consent.
    app.restart().await;
    let after_restart = app.token("acme", "?force=true").await;
    assert!(app.upstream.is_active(&access_token(&after_restart)).await);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 2);
    assert_ne!(app.stored_refresh_token("acme"), rotated);
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

#[tokio::test]
async fn min_validity_beyond_the_lifetime_refreshes_once_and_answers() {
    let app = TestApp::spawn_with(crate::support::Options {
        access_token_ttl: 1800,
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    // The provider issues half-hour tokens; asking for an hour cannot be satisfied, so the
    // broker refreshes once and hands out the new token rather than looping.
    let body = app.token("acme", "?min_validity=3600").await;
    assert!(app.upstream.is_active(&access_token(&body)).await);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    // A modest min_validity is served from cache.
    app.token("acme", "?min_validity=600").await;
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
}

#[tokio::test]
async fn post_with_a_json_body_forces_a_refresh() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    let response = app
        .http
        .post(format!("{}/api/refresh/acme", app.base))
        .header("X-API-Key", CALLER_KEY)
        .json(&serde_json::json!({"force": true}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    // An empty POST body (what ADF sends with no body) is fine too, and cached.
    let response = app
        .http
        .post(format!("{}/api/refresh/acme", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
}

#[tokio::test]
async fn client_secret_post_is_supported() {
    let app = TestApp::spawn_with(crate::support::Options {
        auth_method: "client_secret_post",
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    let body = app.token("acme", "?force=true").await;
    assert!(app.upstream.is_active(&access_token(&body)).await);
}

#[tokio::test]
async fn no_token_yet_is_409_consent_required_with_the_authorize_url() {
    let app = TestApp::spawn().await;
    let response = app.refresh("acme", "").await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "consent_required");
    assert_eq!(
        body["authorize_url"],
        format!("{}/api/authorize/acme", app.base)
    );
    assert!(body["error_description"]
        .as_str()
        .expect("description")
        .contains("acme"));
}

#[tokio::test]
async fn a_dead_grant_answers_409_and_stops_calling_the_provider() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    let consented = app.stored_refresh_token("acme");
    app.token("acme", "?force=true").await;
    // Someone replays the rotated refresh token: the provider revokes the whole grant.
    assert_eq!(app.upstream.use_refresh_token(&consented).await, 400);
    assert_eq!(app.upstream.grants_revoked().await, 1);

    let response = app.refresh("acme", "?force=true").await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "consent_required");
    assert!(body["authorize_url"]
        .as_str()
        .expect("url")
        .ends_with("/api/authorize/acme"));
    let requests = app.upstream.token_requests("refresh_token").await;

    // The dead grant is remembered: no further token requests until consent.
    let response = app.refresh("acme", "").await;
    assert_eq!(response.status(), 409);
    assert_eq!(app.upstream.token_requests("refresh_token").await, requests);
    let stored = app.stored("acme").expect("record");
    assert_eq!(stored["status"], "consent_required");
    assert!(stored["access_token"].is_null());

    // Consent again and everything works.
    app.consent("acme").await;
    let body = app.token("acme", "").await;
    assert!(app.upstream.is_active(&access_token(&body)).await);
}

#[tokio::test]
async fn connections_page_shows_each_state_without_secrets() {
    let app = TestApp::spawn().await;
    let url = format!("{}/api/connections", app.base);
    let statuses = || async {
        let response = app
            .http
            .get(&url)
            .header("X-API-Key", ADMIN_KEY)
            .header("Accept", "application/json")
            .send()
            .await
            .expect("connections");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        body["connections"].as_array().expect("list").clone()
    };
    let state_of = |list: &[Value], name: &str| {
        list.iter()
            .find(|c| c["name"] == name)
            .map(|c| c["state"].as_str().expect("state").to_owned())
            .expect("listed")
    };

    let list = statuses().await;
    assert_eq!(state_of(&list, "acme"), "consent_required");
    assert_eq!(
        list[0]["authorize_url"],
        format!("{}/api/authorize/acme", app.base)
    );

    app.consent("acme").await;
    let list = statuses().await;
    assert_eq!(state_of(&list, "acme"), "connected");
    assert_eq!(state_of(&list, "deny"), "consent_required");

    // A provider outage shows as failing, with the reason; recovery clears it.
    app.upstream.fail_next(3, 503, "down", "text/plain").await;
    let failed = app.refresh("acme", "?force=true").await;
    assert_eq!(failed.status(), 502);
    let list = statuses().await;
    assert_eq!(state_of(&list, "acme"), "failing");
    let acme = list.iter().find(|c| c["name"] == "acme").expect("acme");
    assert!(
        acme["last_error"].as_str().expect("error").contains("503"),
        "{acme}"
    );
    crate::support::wait_retry_after(&failed).await;
    let token = app.token("acme", "?force=true").await;
    assert_eq!(state_of(&statuses().await, "acme"), "connected");

    // The HTML page lists the connections, and no secret.
    let html = app
        .http
        .get(&url)
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(
        html.contains("<h2 id=\"c-acme\">acme") && html.contains("Connected."),
        "{html}"
    );
    assert!(!html.contains(token["access_token"].as_str().expect("token")));
    assert!(!html.contains(&app.stored_refresh_token("acme")));

    // Admin only.
    let response = app
        .http
        .get(&url)
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("connections");
    assert_eq!(response.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_mid_refresh_does_not_lose_the_rotated_token() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    let consented = app.stored_refresh_token("acme");
    app.upstream.delay(1000).await;
    // The caller times out while the provider is rotating the refresh token.
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .expect("client");
    let gave_up = impatient
        .get(format!("{}/api/refresh/acme?force=true", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await;
    assert!(gave_up.is_err(), "the caller was meant to time out");
    // The refresh finishes without it and the new refresh token is stored.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app.stored_refresh_token("acme") == consented {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated token was never stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.upstream.delay(0).await;
    let body = app.token("acme", "?force=true").await;
    assert!(app.upstream.is_active(&access_token(&body)).await);
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

#[tokio::test]
async fn an_admin_key_in_the_url_is_exchanged_for_a_session_cookie_and_dropped_from_the_address() {
    let app = TestApp::spawn().await;
    let url = format!("{}/api/connections", app.base);
    // No cookie jar, no redirects: what the browser is told.
    let response = app
        .http
        .get(format!("{url}?view=all&key={ADMIN_KEY}"))
        .send()
        .await
        .expect("exchange");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["referrer-policy"], "no-referrer");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let set_cookie = response.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for attribute in [
        "tb_admin=",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/api",
        "Max-Age=1800",
    ] {
        assert!(set_cookie.contains(attribute), "{attribute}: {set_cookie}");
    }
    let page = response.text().await.expect("page");
    let target = crate::support::meta_refresh(&page).expect("goes on by itself");
    assert_eq!(target, "/api/connections?view=all", "the key is dropped");
    assert!(!page.contains(ADMIN_KEY));
    let session = set_cookie.split(';').next().expect("name=value").to_owned();

    // The session opens the browser routes…
    let status_page = app
        .http
        .get(&url)
        .header("Cookie", &session)
        .send()
        .await
        .expect("status page");
    assert_eq!(status_page.status(), 200);
    assert!(status_page.text().await.expect("html").contains("acme"));
    let authorize = app
        .http
        .get(format!("{}/api/authorize/acme", app.base))
        .header("Cookie", &session)
        .send()
        .await
        .expect("authorize");
    assert_eq!(authorize.status(), 302);
    // …but is no credential for pipelines, and a forged one opens nothing.
    let refresh = app
        .http
        .get(format!("{}/api/refresh/acme", app.base))
        .header("Cookie", &session)
        .send()
        .await
        .expect("refresh");
    assert_eq!(refresh.status(), 401);
    let forged = format!("{}x", session);
    let response = app
        .http
        .get(&url)
        .header("Cookie", &forged)
        .send()
        .await
        .expect("forged");
    assert_eq!(response.status(), 401);

    // Only an admin key is exchanged.
    for (key, status) in [("wrong-key-0123456789", 401), (CALLER_KEY, 403)] {
        let response = app
            .http
            .get(format!("{url}?key={key}"))
            .send()
            .await
            .expect("exchange");
        assert_eq!(response.status(), status, "{key}");
        assert!(response.headers().get("set-cookie").is_none());
    }

    // An admin key in the header is good on every route, /api/refresh included.
    app.consent("acme").await;
    let response = app
        .http
        .get(format!("{}/api/refresh/acme", app.base))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("refresh");
    assert_eq!(response.status(), 200);
}

/// A cached token is answered before the router (`refresh::cached_fast_path`); a request
/// the fast path declines (here: one that declares a body) goes through the router. Both
/// must read the same.
#[tokio::test]
async fn a_cached_token_reads_the_same_before_and_through_the_router() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    let url = format!("{}/api/refresh/acme?min_validity=600", app.base);
    let fast = app
        .http
        .get(&url)
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("fast");
    // A `Content-Length` (even 0) sends a GET through the router. Raw, so that the header
    // is certainly sent as written.
    let routed = raw_request(
        app.port,
        &format!(
            "GET /api/refresh/acme?min_validity=600 HTTP/1.1\r\nHost: x\r\nX-API-Key: {CALLER_KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    for name in ["content-type", "cache-control", "pragma"] {
        assert_eq!(
            fast.headers().get(name).and_then(|v| v.to_str().ok()),
            routed.header(name),
            "{name}"
        );
    }
    assert_eq!(fast.status(), 200);
    assert_eq!(routed.status, 200);
    let mut fast: Value = fast.json().await.expect("json");
    let mut routed: Value = serde_json::from_str(&routed.body).expect("json");
    let (a, b) = (fast["expires_in"].take(), routed["expires_in"].take());
    assert!(a.as_u64().expect("n").abs_diff(b.as_u64().expect("n")) <= 1);
    assert_eq!(fast, routed);
    // Declined by the fast path, answered by the router: wrong key, unknown connection.
    let wrong = app
        .http
        .get(&url)
        .header("X-API-Key", "nope-nope-nope-nope")
        .send()
        .await
        .expect("wrong key");
    assert_eq!(wrong.status(), 401);
    let unknown = app
        .http
        .get(format!("{}/api/refresh/nope", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("unknown");
    assert_eq!(unknown.status(), 404);
}

/// A broker in process on `admin_keys`, sharing `state_secret`, reached at `public_url`.
async fn broker_with_admin_keys(
    dir: &std::path::Path,
    public_url: &str,
    admin_keys: &[&str],
) -> crate::support::ConfiguredBroker {
    let text = crate::support::BrokerConfig::default()
        .top("state_secret", crate::support::STATE_SECRET)
        .top("public_url", public_url)
        .auth(
            "admin_keys",
            admin_keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        )
        .file_store(&dir.join("tokens"))
        .unreached_connection("acme")
        .render();
    crate::support::ConfiguredBroker::serve(&text).await
}

/// An admin session ends when the admin keys change — on every instance sharing the
/// `state_secret` — and on https it is a `__Host-` cookie (`Secure`, `Path=/`).
#[tokio::test]
async fn admin_sessions_end_when_the_admin_keys_change_and_are_host_cookies_on_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    const ROTATED: &str = "rotated-admin-key-0123456789";
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let broker = broker_with_admin_keys(dir.path(), "https://broker.example", &[ADMIN_KEY]).await;
    let base = broker.base.clone();
    let exchanged = http
        .get(format!("{base}/api/connections?key={ADMIN_KEY}"))
        .send()
        .await
        .expect("exchange");
    assert_eq!(exchanged.status(), 200);
    let set_cookie = exchanged.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for attribute in [
        "__Host-tb_admin=",
        "; Path=/;",
        "; Secure",
        "HttpOnly",
        "SameSite=Strict",
    ] {
        assert!(
            set_cookie.contains(attribute) || set_cookie.ends_with(attribute.trim_end_matches(';')),
            "{attribute}: {set_cookie}"
        );
    }
    assert!(!set_cookie.contains("Domain"), "{set_cookie}");
    let session = set_cookie.split(';').next().expect("name=value").to_owned();
    let status = |base: String, session: String| {
        let http = http.clone();
        async move {
            http.get(format!("{base}/api/connections"))
                .header("Cookie", session)
                .header("Accept", "application/json")
                .send()
                .await
                .expect("status")
                .status()
        }
    };
    assert_eq!(status(base.clone(), session.clone()).await, 200);
    // The bare name is not the session on https.
    let bare = session.replacen("__Host-", "", 1);
    assert_eq!(status(base.clone(), bare).await, 401);
    drop(broker);

    // Another instance with the same admin keys takes it; one whose keys changed does not,
    // whichever way they changed.
    for (keys, accepted) in [
        (vec![ADMIN_KEY], true),
        (vec![ADMIN_KEY, ROTATED], false),
        (vec![ROTATED], false),
        (vec![ROTATED, ADMIN_KEY], false),
    ] {
        let broker = broker_with_admin_keys(dir.path(), "https://broker.example", &keys).await;
        let expected = if accepted { 200 } else { 401 };
        assert_eq!(
            status(broker.base.clone(), session.clone()).await,
            expected,
            "{keys:?}"
        );
    }
}
