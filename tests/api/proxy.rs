//! The proxy (`/api/proxy/{connection}/…`) against a provider API double: pages pulled
//! through it unchanged with the broker's token on every upstream request and the caller's
//! credentials on none; traversal attempts refused before anything leaves the broker.

use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{json, Value};

use crate::support::{Options, TestApp, CALLER_KEY};

/// What the API double saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path_and_query: String,
    authorization: Option<String>,
    caller_key: bool,
    cookie: bool,
}

/// A paged API under `/v2`: `/v2/invoices?page=N` (1..=3) with a `Link` to the next page,
/// and a `Set-Cookie` the proxy must not pass on.
struct ApiDouble {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ApiDouble {
    async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}/v2", listener.local_addr().expect("addr"));
        let link_base = base.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let record = Arc::clone(&record);
            let link_base = link_base.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                record.lock().expect("lock").push(Seen {
                    path_and_query: uri
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    authorization: header("authorization"),
                    caller_key: headers.contains_key("x-api-key"),
                    cookie: headers.contains_key("cookie"),
                });
                let tries = record
                    .lock()
                    .expect("lock")
                    .iter()
                    .filter(|s| s.path_and_query == uri.path())
                    .count();
                match uri.path() {
                    // Refuses the first token it sees, then takes any.
                    "/v2/flaky" if tries == 1 => {
                        return (StatusCode::UNAUTHORIZED, "expired").into_response()
                    }
                    "/v2/flaky" => return axum::Json(json!({"ok": true})).into_response(),
                    "/v2/always401" => return (StatusCode::UNAUTHORIZED, "no").into_response(),
                    _ => {}
                }
                if uri.path() != "/v2/invoices" {
                    return (StatusCode::NOT_FOUND, "no such resource").into_response();
                }
                let page: u32 = uri
                    .query()
                    .and_then(|q| q.strip_prefix("page="))
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(1);
                let mut response =
                    axum::Json(json!({"page": page, "items": [page * 10, page * 10 + 1]}))
                        .into_response();
                let headers = response.headers_mut();
                headers.insert("set-cookie", "session=upstream".parse().expect("header"));
                headers.insert(
                    "x-continuation",
                    format!("c{page}").parse().expect("header"),
                );
                if page < 3 {
                    let link = format!("<{link_base}/invoices?page={}>; rel=\"next\"", page + 1);
                    headers.insert("link", link.parse().expect("header"));
                }
                response
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

async fn app_with_api(api: &ApiDouble) -> TestApp {
    TestApp::spawn_with(Options {
        acme_extra: format!("api_base_url = \"{}\"", api.base),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_pull_through_the_proxy_returns_every_page_with_the_brokers_token_only() {
    let api = ApiDouble::start().await;
    let app = app_with_api(&api).await;
    app.consent("acme").await;

    let mut url = format!("{}/api/proxy/acme/invoices?page=1", app.base);
    let mut pages = Vec::new();
    loop {
        let response = app
            .http
            .get(&url)
            .header("X-API-Key", CALLER_KEY)
            .header("Cookie", "caller=secret")
            .send()
            .await
            .expect("proxy");
        assert_eq!(response.status(), 200);
        assert!(
            response.headers().get("set-cookie").is_none(),
            "upstream cookies never come back"
        );
        let continuation = response.headers()["x-continuation"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let next = response
            .headers()
            .get("link")
            .map(|l| l.to_str().expect("ascii").to_owned());
        let body: Value = response.json().await.expect("json");
        assert_eq!(continuation, format!("c{}", body["page"]));
        pages.push(body);
        // The caller follows the API's own Link, re-based onto the proxy (as a Copy
        // activity's pagination rule does).
        let Some(next) = next else { break };
        let next_query = next
            .split("?")
            .nth(1)
            .and_then(|q| q.split('>').next())
            .expect("query");
        url = format!("{}/api/proxy/acme/invoices?{next_query}", app.base);
    }
    assert_eq!(pages.len(), 3);
    for (i, page) in pages.iter().enumerate() {
        assert_eq!(page["page"], i + 1);
    }

    let token = app.token("acme", "").await;
    let seen = api.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for request in &seen {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {}", token["access_token"].as_str().expect("token")).as_str())
        );
        assert!(!request.caller_key, "the caller's key was forwarded");
        assert!(!request.cookie, "the caller's cookie was forwarded");
    }
    assert_eq!(seen[1].path_and_query, "/v2/invoices?page=2");
    assert!(
        app.upstream
            .is_active(token["access_token"].as_str().expect("token"))
            .await
    );
}

#[tokio::test]
async fn traversal_and_host_escapes_are_refused_before_anything_leaves() {
    let api = ApiDouble::start().await;
    let app = app_with_api(&api).await;
    app.consent("acme").await;
    for path in [
        "../admin",
        "invoices/../../admin",
        "%2e%2e/admin",
        "invoices/%2E%2E/%2e%2e/x",
        "invoices%2f..%2fadmin",
        "%5c%5cevil.example/x",
        "/evil.example/x",
        "https://evil.example/x",
        "invoices/./x",
        "invoices//x",
        "invoices\\..\\x",
    ] {
        // Raw, so that no client normalises the path first.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", app.port))
            .await
            .expect("connect");
        let request = format!(
            "GET /api/proxy/acme/{path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {CALLER_KEY}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let status = answer.split(' ').nth(1).unwrap_or_default().to_owned();
        assert_eq!(status, "400", "{path}: {answer}");
        assert!(answer.contains("\"error\""), "{answer}");
    }
    assert!(
        api.seen().is_empty(),
        "a request left the broker: {:?}",
        api.seen()
    );

    // No credential, no proxy; a connection without an API base, no proxy either.
    let response = app
        .http
        .get(format!("{}/api/proxy/acme/invoices", app.base))
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 401);
    let response = app
        .http
        .get(format!("{}/api/proxy/deny/invoices", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "no_proxy", "{body}");
    assert!(api.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_costs_one_refresh_and_one_retry_and_a_second_401_is_returned() {
    let api = ApiDouble::start().await;
    let app = app_with_api(&api).await;
    app.consent("acme").await;
    let refreshes = app.upstream.token_requests("refresh_token").await;

    let response = app
        .http
        .get(format!("{}/api/proxy/acme/flaky", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 200);
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes + 1,
        "one refresh"
    );
    let seen = api.seen();
    assert_eq!(seen.len(), 2, "one retry: {seen:?}");
    assert_ne!(
        seen[0].authorization, seen[1].authorization,
        "the retry carries the new token"
    );
    let current = app.token("acme", "").await;
    assert_eq!(
        seen[1].authorization.as_deref(),
        Some(
            format!(
                "Bearer {}",
                current["access_token"].as_str().expect("token")
            )
            .as_str()
        )
    );

    // Refused again after the refresh: the 401 goes back to the caller, no more retries.
    let response = app
        .http
        .get(format!("{}/api/proxy/acme/always401", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.text().await.expect("body"),
        "no",
        "the API's own answer"
    );
    assert_eq!(api.seen().len(), 4);
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes + 2
    );
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_between_pages_is_refreshed_once_and_no_page_fails() {
    let api = ApiDouble::start().await;
    // Tokens live 303 s; callers get at least min_validity (300 s) of life: three seconds in,
    // the proxy must refresh before forwarding.
    let app = TestApp::spawn_with(Options {
        access_token_ttl: 303,
        acme_extra: format!("api_base_url = \"{}\"", api.base),
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    let refreshes = app.upstream.token_requests("refresh_token").await;
    let page = |n: u32| {
        let http = app.http.clone();
        let url = format!("{}/api/proxy/acme/invoices?page={n}", app.base);
        async move {
            http.get(url)
                .header("X-API-Key", CALLER_KEY)
                .send()
                .await
                .expect("proxy")
                .status()
        }
    };
    assert_eq!(page(1).await, 200);
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes
    );
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    assert_eq!(page(2).await, 200);
    assert_eq!(page(3).await, 200);
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes + 1,
        "refreshed once between the pages"
    );
    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    assert_ne!(seen[0].authorization, seen[1].authorization);
    assert_eq!(seen[1].authorization, seen[2].authorization);
    let current = app.token("acme", "").await;
    assert!(
        app.upstream
            .is_active(current["access_token"].as_str().expect("token"))
            .await
    );
}
