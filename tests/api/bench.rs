//! Benchmarks. `scripts/bench` runs them in a release build with `BENCH_FULL=1` and prints
//! the figures `BENCHMARKS.md` records; the test suite runs the same code as a short smoke
//! run that checks counts (requests that reached the API, tokens used, token requests made),
//! never speed.

use std::time::{Duration, Instant};

use crate::support::api_double::ApiDouble;
use crate::support::{free_port, BrokerConfig, BrokerProcess, Upstream, CALLER_KEY};

/// Whether this is the real benchmark (`scripts/bench`) rather than the smoke run.
fn full() -> bool {
    std::env::var_os("BENCH_FULL").is_some()
}

/// Latency figures of a series of sequential requests, in microseconds.
struct Latencies(Vec<u128>);

impl Latencies {
    fn percentile(&self, p: f64) -> u128 {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn summary(&self) -> String {
        format!(
            "p50 {} µs, p90 {} µs, p99 {} µs ({} requests)",
            self.percentile(50.0),
            self.percentile(90.0),
            self.percentile(99.0),
            self.0.len()
        )
    }
}

/// `n` sequential GETs of `url` on one kept-alive connection (after `warmup` unmeasured
/// ones), each checked for a 200.
async fn sequential(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    warmup: usize,
    n: usize,
) -> Latencies {
    let mut times = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let mut request = http.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let started = Instant::now();
        let response = request.send().await.expect("request");
        let status = response.status();
        let body = response.bytes().await.expect("body");
        let took = started.elapsed();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        if i >= warmup {
            times.push(took.as_micros());
        }
    }
    Latencies(times)
}

/// The proxy's added latency: the same page fetched straight from the API double and
/// through the broker binary (token cached), one request at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_latency_against_calling_the_api_directly() {
    let (warmup, n) = if full() { (500, 20_000) } else { (10, 100) };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let upstream =
        Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
    let api = ApiDouble::start().await;
    let config = BrokerConfig::default()
        .auth("api_keys", vec![CALLER_KEY.to_owned()])
        .store("path", dir.path().join("tokens").display().to_string())
        .tables(&upstream.connection_toml(
            "acme",
            &format!(
                "client_secret = \"{}\"\napi_base_url = \"{}\"",
                upstream.client_secret, api.base
            ),
        ))
        .write(dir.path());
    let mut broker = BrokerProcess::start_on(
        port,
        &config,
        &[("RUST_LOG", "info".to_owned())],
        &dir.path().join("broker.log"),
    )
    .await;
    crate::support::consent(&base, "acme").await;
    let token_requests = upstream.token_requests("refresh_token").await
        + upstream.token_requests("authorization_code").await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let direct = sequential(
        &http,
        &format!("{}/invoices?page=1", api.base),
        &[],
        warmup,
        n,
    )
    .await;
    let proxied = sequential(
        &http,
        &format!("{base}/api/proxy/acme/invoices?page=1"),
        &[("X-API-Key", CALLER_KEY)],
        warmup,
        n,
    )
    .await;
    eprintln!("bench proxy: direct  {}", direct.summary());
    eprintln!("bench proxy: proxied {}", proxied.summary());
    eprintln!(
        "bench proxy: added p50 {} µs, p99 {} µs",
        proxied.percentile(50.0) as i128 - direct.percentile(50.0) as i128,
        proxied.percentile(99.0) as i128 - direct.percentile(99.0) as i128,
    );

    // Counts: every request reached the API once, the proxied ones with the one cached
    // token, and not one token request was made for them.
    let seen = api.seen();
    assert_eq!(seen.len(), 2 * (warmup + n));
    let proxied_seen: Vec<_> = seen.iter().filter(|s| s.authorization.is_some()).collect();
    assert_eq!(proxied_seen.len(), warmup + n);
    assert!(proxied_seen
        .iter()
        .all(|s| s.authorization == proxied_seen[0].authorization && !s.caller_key));
    assert_eq!(
        upstream.token_requests("refresh_token").await
            + upstream.token_requests("authorization_code").await,
        token_requests,
        "a cached token serves every proxied request"
    );
    broker.stop().await;
}
