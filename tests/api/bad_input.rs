//! Refusals: bad state, provider errors, unknown connections, bad keys, malformed responses.

use crate::support::{TestApp, ADMIN_KEY, CALLER_KEY, STATE_SECRET};
use serde_json::Value;
use token_broker::state::{StateSigner, BINDING_COOKIE};

async fn callback_with(app: &TestApp, query: &str, cookie: Option<&str>) -> (u16, String) {
    let mut request = app.http.get(format!("{}/api/callback?{query}", app.base));
    if let Some(binding) = cookie {
        request = request.header("Cookie", format!("{BINDING_COOKIE}={binding}"));
    }
    let response = request.send().await.expect("callback");
    let status = response.status().as_u16();
    (status, response.text().await.expect("page"))
}

fn nothing_stored(app: &TestApp) {
    assert!(app.stored("acme").is_none(), "a record was stored");
}

#[tokio::test]
async fn forged_state_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn().await;
    let binding = StateSigner::new_binding();
    // Signed with another key.
    let forged = StateSigner::new(&[]).issue("acme", &binding, chrono::Utc::now());
    let (status, page) = callback_with(
        &app,
        &format!("code=abc&state={}", forged.state),
        Some(&binding),
    )
    .await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("not issued to this browser"), "{page}");
    let (status, _) = callback_with(&app, "code=abc&state=v1.garbage.x", Some(&binding)).await;
    assert_eq!(status, 400);
    let (status, _) = callback_with(&app, "code=abc", Some(&binding)).await;
    assert_eq!(status, 400);
    assert_eq!(app.upstream.token_requests("authorization_code").await, 0);
    nothing_stored(&app);
}

#[tokio::test]
async fn expired_state_is_refused() {
    let app = TestApp::spawn().await;
    let signer = StateSigner::new(&[STATE_SECRET.to_owned().into()]);
    let binding = StateSigner::new_binding();
    let eleven_minutes_ago = chrono::Utc::now() - chrono::Duration::minutes(11);
    let issued = signer.issue("acme", &binding, eleven_minutes_ago);
    let (status, page) = callback_with(
        &app,
        &format!("code=abc&state={}", issued.state),
        Some(&binding),
    )
    .await;
    assert_eq!(status, 400);
    assert!(page.contains("expired"), "{page}");
    assert_eq!(app.upstream.token_requests("authorization_code").await, 0);
    nothing_stored(&app);
}

#[tokio::test]
async fn callback_without_the_browser_cookie_is_refused() {
    let app = TestApp::spawn().await;
    let browser = app.consent_until_callback("acme").await;
    // Same URL (valid state and code), but from a client without the binding cookie.
    let response = app
        .http
        .get(&browser.callback_url)
        .send()
        .await
        .expect("callback");
    assert_eq!(response.status(), 400);
    let page = response.text().await.expect("page");
    assert!(page.contains("cookie"), "{page}");
    assert_eq!(app.upstream.token_requests("authorization_code").await, 0);
    nothing_stored(&app);
}

#[tokio::test]
async fn replayed_callback_is_refused() {
    let app = TestApp::spawn().await;
    let browser = app.consent_until_callback("acme").await;
    let (status, _) = browser.finish().await;
    assert_eq!(status, 200);
    let stored = app.stored_refresh_token("acme");
    let (status, page) = browser.finish().await;
    assert_eq!(status, 400);
    assert!(page.contains("already used"), "{page}");
    assert_eq!(app.upstream.token_requests("authorization_code").await, 1);
    assert_eq!(app.stored_refresh_token("acme"), stored);
}

#[tokio::test]
async fn provider_error_on_the_callback_shows_a_page_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let browser = app.consent_until_callback("deny").await;
    assert!(browser.callback_url.contains("error=access_denied"));
    let (status, page) = browser.finish().await;
    assert_eq!(status, 400);
    assert!(page.contains("access_denied"), "{page}");
    assert!(page.contains("Nothing was stored"), "{page}");
    assert!(app.stored("deny").is_none());
    assert_eq!(app.upstream.token_requests("authorization_code").await, 0);
}

#[tokio::test]
async fn unknown_connection_is_404() {
    let app = TestApp::spawn().await;
    let response = app.refresh("nope", "").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "unknown_connection");
    let response = app
        .http
        .get(format!("{}/api/authorize/nope", app.base))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("authorize");
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn missing_or_wrong_keys_are_refused() {
    let app = TestApp::spawn().await;
    let url = format!("{}/api/refresh/acme", app.base);
    let response = app.http.get(&url).send().await.expect("request");
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "unauthorized");
    let response = app
        .http
        .get(&url)
        .header("X-API-Key", "wrong-key-0123456789")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
    // Unknown connections are not revealed to unauthenticated callers.
    let response = app
        .http
        .get(format!("{}/api/refresh/nope", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);

    // Admin routes: no key 401, a caller key 403, the admin key a redirect.
    let authorize = format!("{}/api/authorize/acme", app.base);
    let response = app.http.get(&authorize).send().await.expect("request");
    assert_eq!(response.status(), 401);
    let response = app
        .http
        .get(&authorize)
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 403);
    let response = app
        .http
        .get(&authorize)
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 302);
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    for part in [
        "code_challenge_method=S256",
        "code_challenge=",
        "state=v1.",
        "response_type=code",
    ] {
        assert!(location.contains(part), "{part} missing from {location}");
    }
    let cookie = response.headers()["set-cookie"].to_str().expect("ascii");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
}

#[tokio::test]
async fn malformed_token_responses_are_502_and_keep_the_refresh_token() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    let stored = app.stored_refresh_token("acme");
    let cases = [
        (
            200,
            r#"{"token_type":"Bearer","expires_in":3600}"#,
            "application/json",
        ),
        (200, "<html>oops</html>", "text/html"),
        (
            200,
            r#"{"access_token":"x","expires_in":"soon"}"#,
            "application/json",
        ),
        (400, "not json either", "text/plain"),
    ];
    for (status, body, content_type) in cases {
        app.upstream.fail_next(1, status, body, content_type).await;
        let response = app.refresh("acme", "?force=true").await;
        assert_eq!(response.status(), 502, "for {body}");
        crate::support::wait_retry_after(&response).await;
        let error: Value = response.json().await.expect("json");
        assert_eq!(error["error"], "provider_error");
        let description = error["error_description"].as_str().expect("description");
        assert!(description.contains("malformed"), "{description}");
        assert!(
            !description.contains("oops") && !description.contains("soon"),
            "{description}"
        );
        assert_eq!(app.stored_refresh_token("acme"), stored);
    }
    // The grant is intact: the next refresh works.
    let body = app.token("acme", "?force=true").await;
    assert!(
        app.upstream
            .is_active(body["access_token"].as_str().expect("token"))
            .await
    );
}

#[tokio::test]
async fn a_provider_outage_is_retried_then_reported_as_502() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    // One 503 is retried transparently.
    app.upstream.fail_next(1, 503, "busy", "text/plain").await;
    let body = app.token("acme", "?force=true").await;
    assert!(
        app.upstream
            .is_active(body["access_token"].as_str().expect("token"))
            .await
    );
    assert_eq!(app.upstream.token_requests("refresh_token").await, 2);
    // A lasting outage ends in 502 provider_unavailable, and the grant survives it.
    app.upstream.fail_next(3, 503, "busy", "text/plain").await;
    let response = app.refresh("acme", "?force=true").await;
    assert_eq!(response.status(), 502);
    crate::support::wait_retry_after(&response).await;
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"], "provider_unavailable");
    app.token("acme", "?force=true").await;

    // A 502 may come after the provider rotated the token: it is not retried with the
    // same refresh token.
    let before = app.upstream.token_requests("refresh_token").await;
    app.upstream
        .fail_next(1, 502, "bad gateway", "text/plain")
        .await;
    assert_eq!(app.refresh("acme", "?force=true").await.status(), 502);
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        before + 1
    );
}

/// Asserts the broker's JSON error shape and returns the `error` code.
async fn json_error(
    response: reqwest::Response,
    status: u16,
) -> (String, reqwest::header::HeaderMap) {
    assert_eq!(response.status(), status);
    let headers = response.headers().clone();
    assert_eq!(
        headers
            .get("content-type")
            .map(|v| v.to_str().expect("ascii")),
        Some("application/json"),
        "{headers:?}"
    );
    let body: Value = response.json().await.expect("a JSON body");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    (body["error"].as_str().expect("error").to_owned(), headers)
}

#[tokio::test]
async fn errors_the_framework_answers_itself_use_the_json_shape() {
    let app = TestApp::spawn().await;
    let url = |path: &str| format!("{}{path}", app.base);

    // A method the route lacks: 405 with Allow.
    let response = app
        .http
        .delete(url("/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("delete");
    let (error, headers) = json_error(response, 405).await;
    assert_eq!(error, "method_not_allowed");
    let allow = headers
        .get("allow")
        .expect("Allow")
        .to_str()
        .expect("ascii");
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let response = app.http.get(url("/prerefresh")).send().await.expect("get");
    let (error, headers) = json_error(response, 405).await;
    assert_eq!(error, "method_not_allowed");
    assert!(headers.contains_key("allow"));

    // A body over the limit: 413.
    let response = app
        .http
        .post(url("/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .header("content-type", "application/json")
        .body(vec![b' '; 3 * 1024 * 1024])
        .send()
        .await
        .expect("post");
    assert_eq!(json_error(response, 413).await.0, "payload_too_large");

    // A body that is not JSON: 415.
    let response = app
        .http
        .post(url("/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("force=true")
        .send()
        .await
        .expect("post");
    assert_eq!(json_error(response, 415).await.0, "unsupported_media_type");

    // A path segment that does not decode: 400, without echoing it.
    let response = app
        .http
        .get(url("/api/refresh/%FF%FE"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("get");
    assert_eq!(json_error(response, 400).await.0, "invalid_request");

    // No such route: 404.
    let response = app.http.get(url("/api/nope")).send().await.expect("get");
    assert_eq!(json_error(response, 404).await.0, "not_found");
}

#[tokio::test]
async fn min_validity_is_capped_at_an_hour() {
    let app = TestApp::spawn().await;
    app.consent("acme").await;
    let response = app.refresh("acme", "?min_validity=3601").await;
    let (error, _) = json_error(response, 400).await;
    assert_eq!(error, "invalid_request");
    let response = app
        .http
        .post(format!("{}/api/refresh/acme", app.base))
        .header("X-API-Key", CALLER_KEY)
        .json(&serde_json::json!({"min_validity": 86_400}))
        .send()
        .await
        .expect("post");
    assert_eq!(json_error(response, 400).await.0, "invalid_request");
    // The bound itself is fine (and refreshes once, since the token lives an hour).
    assert_eq!(
        app.refresh("acme", "?min_validity=3600").await.status(),
        200
    );
}

#[tokio::test]
async fn a_forged_code_on_a_real_consent_answers_400_with_its_page() {
    let app = TestApp::spawn().await;
    let mut browser = app.consent_until_callback("acme").await;
    let mut url = url::Url::parse(&browser.callback_url).expect("url");
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "code" { "forged-code".into() } else { v };
            (k.into_owned(), v.into_owned())
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(&pairs);
    browser.callback_url = url.to_string();
    let (status, page) = browser.finish().await;
    assert_eq!(status, 400, "{page}");
    assert!(page.contains("refused the authorization code"), "{page}");
    assert!(app.stored("acme").is_none(), "nothing stored");
}

/// Every operation the OpenAPI document lists refuses a body declared over its route's
/// limit (64 KB; the proxy's 32 MiB) with the JSON 413, before it is read or anyone is
/// authenticated: no route lost its limit by being registered after a layer.
#[tokio::test]
async fn every_documented_route_refuses_a_declared_body_over_its_limit() {
    let app = TestApp::spawn().await;
    let document: Value = app
        .http
        .get(format!("{}/api/openapi.json", app.base))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let mut checked = 0;
    for (path, operations) in document["paths"].as_object().expect("paths") {
        let concrete = path
            .replace("{connection}", "acme")
            .replace("{path}", "v2/invoices");
        // Over the larger limit, so every route's own limit is passed.
        let declared = 33 * 1024 * 1024;
        for method in operations.as_object().expect("operations").keys() {
            let answer = crate::support::raw_request(
                app.port,
                &format!(
                    "{} {concrete} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n",
                    method.to_uppercase()
                ),
            )
            .await;
            assert_eq!(answer.status, 413, "{method} {path}: {}", answer.head);
            assert!(
                answer.body.contains("\"payload_too_large\""),
                "{method} {path}: {}",
                answer.body
            );
            checked += 1;
        }
    }
    assert!(checked >= 14, "{checked} operations");
}
