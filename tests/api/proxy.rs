//! The proxy (`/api/proxy/{connection}/…`) against a provider API double: pages pulled
//! through it unchanged with the broker's token on every upstream request and the caller's
//! credentials on none; traversal attempts refused before anything leaves the broker.

use serde_json::Value;

use crate::support::api_double::{checksum, pattern_byte, ApiDouble};
use crate::support::{memory_kib, raw_request, ConsentedBroker, Options, TestApp, CALLER_KEY};

/// `/api/proxy/{path}` (connection first) answers 404 `no_proxy`.
async fn assert_no_proxy(app: &TestApp, path: &str) {
    let response = app
        .http
        .get(format!("{}/api/proxy/{path}", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"], "no_proxy", "{body}");
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
        assert_eq!(
            body["note"],
            api.marker.as_str(),
            "the body comes back untouched"
        );
        pages.push(body);
        // The API's Link points into the API; the proxy hands it back pointing at itself,
        // so the caller (a Copy activity's RFC 5988 paging) follows it as it is.
        let Some(next) = next else { break };
        let help = "<https://docs.example/paging>; rel=\"help\"";
        assert!(next.ends_with(help), "other links untouched: {next}");
        url = next
            .strip_prefix('<')
            .and_then(|l| l.split('>').next())
            .expect("a link")
            .to_owned();
        assert!(
            url.starts_with(&format!("{}/api/proxy/acme/invoices?page=", app.base)),
            "{next}"
        );
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
        let answer = raw_request(
            app.port,
            &format!(
                "GET /api/proxy/acme/{path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {CALLER_KEY}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(answer.status, 400, "{path}: {}{}", answer.head, answer.body);
        assert!(answer.body.contains("\"error\""), "{}", answer.body);
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
    assert_no_proxy(&app, "deny/invoices").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_to_the_api_and_only_short_ones_are_sent_twice() {
    let api = ApiDouble::start().await;
    let app = app_with_api(&api).await;
    app.consent("acme").await;
    let refreshes = app.upstream.token_requests("refresh_token").await;
    let post = |path: &str, body: reqwest::Body| {
        app.http
            .post(format!("{}/api/proxy/acme/{path}", app.base))
            .header("X-API-Key", CALLER_KEY)
            .body(body)
    };

    // 1 MB, sent chunked (no length known in advance): it arrives whole.
    let payload: Vec<u8> = (0..1_048_576u32).map(|i| (i % 253) as u8).collect();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        payload.chunks(10_000).map(|c| Ok(c.to_vec())).collect();
    let response = post(
        "upload",
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
    )
    .send()
    .await
    .expect("upload");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["length"], payload.len());
    assert_eq!(body["checksum"], checksum(&payload));

    // A streamed body cannot be sent again: a 401 goes straight back, no refresh.
    let response = post("always401", reqwest::Body::from(payload.clone()))
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 401);
    let tries: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query == "/v2/always401")
        .collect();
    assert_eq!(tries.len(), 1, "not retried: {tries:?}");
    assert_eq!(tries[0].body_len, payload.len());
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes
    );

    // A short body is kept and sent again after the one refresh.
    let response = post("always401", reqwest::Body::from(vec![b'x'; 1000]))
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 401);
    let tries: Vec<_> = api
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query == "/v2/always401")
        .skip(1)
        .collect();
    assert_eq!(tries.len(), 2, "one retry: {tries:?}");
    assert!(tries.iter().all(|t| t.body_len == 1000), "{tries:?}");
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes + 1
    );

    // Over the proxy's limit (32 MiB): 413 whether declared or found while streaming.
    let seen_before = api.seen().len();
    // Refused bodies are not read: the broker answers 413 and closes the connection, and a
    // client still writing may see the close before the answer.
    async fn refused(sent: reqwest::Result<reqwest::Response>) {
        match sent {
            Ok(response) => {
                assert_eq!(response.status(), 413);
                let body: Value = response.json().await.expect("json");
                assert_eq!(body["error"], "payload_too_large", "{body}");
            }
            Err(err) => assert!(err.is_request(), "{err:?}"),
        }
    }
    refused(
        post(
            "upload",
            reqwest::Body::from(vec![0u8; 32 * 1024 * 1024 + 1]),
        )
        .send()
        .await,
    )
    .await;
    // Found over the limit while streaming.
    let chunk = vec![0u8; 1024 * 1024];
    let chunks = (0..33).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    refused(
        post(
            "upload",
            reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
        )
        .send()
        .await,
    )
    .await;
    assert!(
        api.seen().len() <= seen_before + 1,
        "no complete request over the limit reached the API"
    );
    assert!(api.seen()[seen_before..].iter().all(|s| s.body_len == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_answer_streams_through_the_binary_in_bounded_memory() {
    const TOTAL: u64 = 100 * 1024 * 1024;
    /// The most the broker's peak resident memory may grow while relaying TOTAL bytes.
    const BOUND_KIB: u64 = 24 * 1024;
    let api = ApiDouble::start().await;
    // Kept whole: its folder holds the broker's token store.
    let mut setup =
        ConsentedBroker::start(3600, &format!("api_base_url = \"{}\"", api.base), "", &[]).await;
    let (broker, base) = (&mut setup.broker, setup.base.clone());
    let pid = broker.pid().expect("pid");
    let before = memory_kib(pid, "VmHWM");

    let mut response = reqwest::Client::new()
        .get(format!("{base}/api/proxy/acme/big?bytes={TOTAL}"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 200);
    let mut offset = 0u64;
    let mut peak_during = 0;
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        for (i, byte) in chunk.iter().enumerate() {
            if *byte != pattern_byte(offset + i as u64) {
                panic!("byte {} differs", offset + i as u64);
            }
        }
        offset += chunk.len() as u64;
        peak_during = peak_during.max(memory_kib(pid, "VmRSS"));
    }
    assert_eq!(offset, TOTAL, "every byte came through");
    let peak = memory_kib(pid, "VmHWM");
    eprintln!(
        "100 MB relayed: broker peak RSS before {before} KiB, after {peak} KiB (sampled max during: {peak_during} KiB)"
    );
    assert!(
        peak < before + BOUND_KIB,
        "the broker's peak resident memory grew from {before} KiB to {peak} KiB relaying {TOTAL} bytes"
    );
    broker.stop().await;
}

/// A proxied answer still streaming keeps its connection busy: at the connection cap the
/// broker closes idle connections to make room, never one still sending an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_answer_is_not_evicted_as_idle_at_the_connection_cap() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    const CAP: usize = 8;
    let api = ApiDouble::start().await;
    let mut setup = ConsentedBroker::start(
        3600,
        &format!("api_base_url = \"{}\"", api.base),
        &format!("[server]\nmax_connections = {CAP}"),
        &[],
    )
    .await;
    let port: u16 = setup
        .base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let mut response = reqwest::Client::new()
        .get(format!("{}/api/proxy/acme/big?bytes={TOTAL}", setup.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 200);
    let first = response
        .chunk()
        .await
        .expect("chunk")
        .expect("a first chunk");
    // While the answer waits for the reader, twice the cap of new connections arrive, each
    // making room by closing the connection idle the longest.
    let mut idle = Vec::new();
    for _ in 0..2 * CAP {
        idle.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut offset = first.len() as u64;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => offset += chunk.len() as u64,
            Ok(None) => break,
            Err(err) => panic!("the answer was cut after {offset} bytes: {err}"),
        }
    }
    assert_eq!(offset, TOTAL, "every byte came through");
    drop(idle);
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_outages_come_back_as_they_are_and_the_proxy_can_be_off() {
    let api = ApiDouble::start().await;
    let app = TestApp::spawn_with(Options {
        acme_extra: format!("api_base_url = \"{}\"", api.base),
        extra_config: crate::support::connection_table(
            "off",
            &crate::support::settings(&[
                ("provider", "oauth2"),
                ("authorize_url", "${UPSTREAM}/auth"),
                ("token_url", "${UPSTREAM}/token"),
                ("client_id", "x"),
                ("client_secret", "y"),
                ("api_base_url", &api.base),
            ]),
            "proxy = false",
        ),
        ..Default::default()
    })
    .await;
    app.consent("acme").await;
    let refreshes = app.upstream.token_requests("refresh_token").await;
    for (path, status, retry_after, body) in [
        ("busy", 429, "7", "slow down"),
        ("down", 503, "30", "maintenance"),
    ] {
        let response = app
            .http
            .get(format!("{}/api/proxy/acme/{path}", app.base))
            .header("X-API-Key", CALLER_KEY)
            .send()
            .await
            .expect("proxy");
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["retry-after"], retry_after);
        if path == "busy" {
            assert_eq!(response.headers()["x-rate-limit-problem"], "minute");
        }
        assert_eq!(
            response.text().await.expect("body"),
            body,
            "the API's own answer"
        );
    }
    assert_eq!(api.seen().len(), 2, "not retried by the broker");
    assert_eq!(
        app.upstream.token_requests("refresh_token").await,
        refreshes
    );

    // `proxy = false`: no proxy for that connection, even with a base URL.
    assert_no_proxy(&app, "off/busy").await;
    assert_eq!(api.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_options_easy_auth_tokens_and_undocumented_methods_stay_behind() {
    let api = ApiDouble::start().await;
    let app = app_with_api(&api).await;
    app.consent("acme").await;

    let response = app
        .http
        .get(format!("{}/api/proxy/acme/invoices?page=1", app.base))
        .header("X-API-Key", CALLER_KEY)
        .header("Connection", "X-Hop-Secret")
        .header("X-Hop-Secret", "for this hop only")
        .header(
            "X-MS-TOKEN-AAD-ACCESS-TOKEN",
            "the signed-in caller's own token",
        )
        .header("X-Client-IP", "203.0.113.9")
        .header("X-Custom-Kept", "1")
        .send()
        .await
        .expect("proxy");
    assert_eq!(response.status(), 200);
    let seen = api.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let names = &seen[0].header_names;
    assert!(names.iter().any(|n| n == "x-custom-kept"), "{names:?}");
    for dropped in ["x-hop-secret", "x-ms-token-aad-access-token", "x-client-ip"] {
        assert!(
            !names.iter().any(|n| n == dropped),
            "{dropped} was forwarded: {names:?}"
        );
    }

    // Only GET, POST, PUT, PATCH and DELETE are relayed: the rest answer 405 (JSON, with
    // Allow) and nothing reaches the API.
    for method in ["TRACE", "CONNECT", "OPTIONS", "HEAD"] {
        let answer = raw_request(
            app.port,
            &format!(
                "{method} /api/proxy/acme/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {CALLER_KEY}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(answer.status, 405, "{method}: {}", answer.head);
    }
    assert_eq!(
        api.seen().len(),
        1,
        "an undocumented method reached the API"
    );
}
