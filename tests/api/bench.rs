//! Benchmarks. `scripts/bench` runs them in a release build with `BENCH_FULL=1` and prints
//! the figures `BENCHMARKS.md` records; the test suite runs the same code as a short smoke
//! run that checks counts (requests that reached the API, tokens used, token requests made),
//! never speed.

use std::time::{Duration, Instant};

use crate::support::api_double::ApiDouble;
use crate::support::{free_port, BrokerConfig, ConsentedBroker, CALLER_KEY};

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

/// Sequential GETs of each `(url, header)` in turn, `n` measured rounds after `warmup`,
/// each series on a client (one kept-alive connection) of its own; every answer a 200.
async fn interleaved<const N: usize>(
    targets: [(&String, Option<(&str, &str)>); N],
    warmup: usize,
    n: usize,
) -> [Latencies; N] {
    let clients: Vec<reqwest::Client> = (0..N)
        .map(|_| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client")
        })
        .collect();
    let mut times: [Vec<u128>; N] = std::array::from_fn(|_| Vec::with_capacity(n));
    for round in 0..warmup + n {
        for (i, (url, header)) in targets.iter().enumerate() {
            let mut request = clients[i].get(url.as_str());
            if let Some((name, value)) = header {
                request = request.header(*name, *value);
            }
            let started = Instant::now();
            let response = request.send().await.expect("request");
            let status = response.status();
            let body = response.bytes().await.expect("body");
            let took = started.elapsed();
            assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
            if round >= warmup {
                times[i].push(took.as_micros());
            }
        }
    }
    times.map(Latencies)
}

/// The proxy's added latency: the same page fetched straight from the API double, through
/// a bare axum + reqwest forwarding proxy (`examples/bare_proxy.rs`, the yardstick) and
/// through the broker binary (token cached), one request at a time on one kept-alive
/// connection each. The figure is the broker's added p50 over the bare proxy's (goal at
/// most 1.25x).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_latency_against_calling_the_api_directly() {
    let (warmup, n) = if full() { (500, 20_000) } else { (10, 100) };
    let api = ApiDouble::start().await;
    // Kept whole: its folder holds the broker's token store.
    let mut setup =
        ConsentedBroker::start(3600, &format!("api_base_url = \"{}\"", api.base), "", &[]).await;
    let (upstream, broker, base) = (&setup.upstream, &mut setup.broker, setup.base.clone());
    let token_requests = upstream.token_requests("refresh_token").await
        + upstream.token_requests("authorization_code").await;

    let bare_port = free_port();
    let mut bare = tokio::process::Command::new(example("bare_proxy"))
        .env("PORT", bare_port.to_string())
        .env("UPSTREAM", &api.base)
        .env("BARE_TOKEN", "bare-proxy-token")
        .kill_on_drop(true)
        .spawn()
        .expect("bare_proxy (an example: built with the tests)");
    let bare_base = format!("http://127.0.0.1:{bare_port}");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    for _ in 0..200 {
        if http.get(&bare_base).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Interleaved, one request of each in turn on a kept-alive connection of its own, so
    // that the three series meet the same moments of a busy two-core machine.
    let direct_url = format!("{}/invoices?page=1", api.base);
    let bare_url = format!("{bare_base}/api/proxy/acme/invoices?page=1");
    let proxied_url = format!("{base}/api/proxy/acme/invoices?page=1");
    let [direct, yardstick, proxied] = interleaved(
        [
            (&direct_url, None),
            (&bare_url, None),
            (&proxied_url, Some(("X-API-Key", CALLER_KEY))),
        ],
        warmup,
        n,
    )
    .await;
    let added =
        |series: &Latencies, p: f64| series.percentile(p) as i128 - direct.percentile(p) as i128;
    eprintln!("bench proxy: direct  {}", direct.summary());
    eprintln!("bench proxy: bare    {}", yardstick.summary());
    eprintln!("bench proxy: proxied {}", proxied.summary());
    eprintln!(
        "bench proxy: added p50 {} µs (bare proxy {} µs), p99 {} µs (bare proxy {} µs)",
        added(&proxied, 50.0),
        added(&yardstick, 50.0),
        added(&proxied, 99.0),
        added(&yardstick, 99.0),
    );
    eprintln!(
        "bench proxy: ratio {:.2}x the bare proxy's added p50",
        added(&proxied, 50.0) as f64 / added(&yardstick, 50.0).max(1) as f64
    );

    // Counts: every request reached the API once, the broker's with the one cached token
    // (the yardstick's with its own), and not one token request was made for them.
    let seen = api.seen();
    assert_eq!(seen.len(), 3 * (warmup + n));
    let bare_bearer = Some("Bearer bare-proxy-token".to_owned());
    assert_eq!(
        seen.iter()
            .filter(|s| s.authorization == bare_bearer)
            .count(),
        warmup + n
    );
    let proxied_seen: Vec<_> = seen
        .iter()
        .filter(|s| s.authorization.is_some() && s.authorization != bare_bearer)
        .collect();
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
    bare.kill().await.expect("stop the yardstick");
    broker.stop().await;
}

/// What `wrk` measured.
#[derive(Debug)]
struct Load {
    requests_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    non_2xx: u64,
}

/// Microseconds from a wrk figure (`403.00us`, `2.31ms`, `1.02s`).
fn micros(text: &str) -> f64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(text.len()),
    );
    let value: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => value,
        "ms" => value * 1_000.0,
        "s" => value * 1_000_000.0,
        _ => f64::NAN,
    }
}

/// `wrk --latency` against `url` (2 threads, `connections` connections, `secs` seconds).
async fn wrk(url: &str, header: Option<&str>, connections: u32, secs: u32) -> Load {
    let mut command = tokio::process::Command::new("wrk");
    command.args([
        "--latency",
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
    ]);
    if let Some(header) = header {
        command.args(["-H", header]);
    }
    let output = command
        .arg(url)
        .output()
        .await
        .expect("wrk (scripts/bench installs it)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(|rest| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
    };
    Load {
        requests_per_sec: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Requests/sec in {text}")),
        p50_us: micros(&field("50%").expect("p50")),
        p99_us: micros(&field("99%").expect("p99")),
        requests: text
            .lines()
            .find(|l| l.contains(" requests in "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        non_2xx: field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    }
}

/// The release (or debug) build's example `name`, next to the test binary's folder.
fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile_dir.join("examples").join(name)
}

/// The broker binary with `acme` consented, room for many connections, and the vault
/// double as its store when `azure` is given.
async fn consented(
    azure: Option<&crate::support::azure_doubles::Azure>,
    ttl: u64,
) -> ConsentedBroker {
    let env = azure.map(|a| a.env()).unwrap_or_default();
    ConsentedBroker::start(ttl, "", "[server]\nmax_connections = 4096", &env).await
}

/// A cached `/api/refresh` against a bare axum handler answering the same bytes: requests
/// per second and latency under the same load, in one run. The smoke run checks that the
/// cached path makes no token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_refresh_throughput_against_a_bare_handler() {
    let setup = consented(None, 3600).await;
    let url = format!("{}/api/refresh/acme", setup.base);
    let http = reqwest::Client::new();
    let body = http
        .get(&url)
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("refresh")
        .text()
        .await
        .expect("body");
    let bare_port = free_port();
    let mut bare = tokio::process::Command::new(example("bare_handler"))
        .env("PORT", bare_port.to_string())
        .env("BARE_BODY", &body)
        .kill_on_drop(true)
        .spawn()
        .expect("bare_handler (an example: built with the tests)");
    let bare_url = format!("http://127.0.0.1:{bare_port}/api/refresh/acme");
    for _ in 0..200 {
        if http.get(&bare_url).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let token_requests = setup.upstream.token_requests("refresh_token").await;
    let key = format!("X-API-Key: {CALLER_KEY}");

    if full() {
        // The same broker with the audit trail off: what the trail itself costs, measured
        // beside the bare handler's swings.
        let quiet = ConsentedBroker::start_with_top(
            3600,
            &[("audit", false.into())],
            "",
            "[server]\nmax_connections = 4096",
            &[],
        )
        .await;
        let quiet_url = format!("{}/api/refresh/acme", quiet.base);
        // Twice each, alternating, after a warm-up; the better run of each counts.
        wrk(&bare_url, None, 64, 3).await;
        wrk(&url, Some(&key), 64, 3).await;
        wrk(&quiet_url, Some(&key), 64, 3).await;
        let mut best: [Option<Load>; 3] = [None, None, None];
        for _ in 0..2 {
            for (i, (target, header)) in [
                (&bare_url, None),
                (&url, Some(key.as_str())),
                (&quiet_url, Some(key.as_str())),
            ]
            .into_iter()
            .enumerate()
            {
                let load = wrk(target, header, 64, 10).await;
                assert_eq!(load.non_2xx, 0, "{load:?}");
                if best[i]
                    .as_ref()
                    .is_none_or(|b| load.requests_per_sec > b.requests_per_sec)
                {
                    best[i] = Some(load);
                }
            }
        }
        let [Some(bare_load), Some(broker_load), Some(quiet_load)] = best else {
            panic!("no runs")
        };
        eprintln!(
            "bench refresh: broker without the audit trail {:.0} req/s, p99 {:.0} µs; with it {:.3} of that",
            quiet_load.requests_per_sec,
            quiet_load.p99_us,
            broker_load.requests_per_sec / quiet_load.requests_per_sec
        );
        drop(quiet);
        eprintln!(
            "bench refresh: bare   {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs",
            bare_load.requests_per_sec, bare_load.p50_us, bare_load.p99_us
        );
        eprintln!(
            "bench refresh: broker {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs ({} requests)",
            broker_load.requests_per_sec,
            broker_load.p50_us,
            broker_load.p99_us,
            broker_load.requests
        );
        eprintln!(
            "bench refresh: ratio {:.3} of the bare handler's throughput, p99 {:.2}x",
            broker_load.requests_per_sec / bare_load.requests_per_sec,
            broker_load.p99_us / bare_load.p99_us
        );
    } else {
        for target in [&bare_url, &url] {
            for _ in 0..100 {
                let response = http
                    .get(target)
                    .header("X-API-Key", CALLER_KEY)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 200);
                assert_eq!(response.text().await.expect("body").len(), body.len());
            }
        }
    }
    assert_eq!(
        setup.upstream.token_requests("refresh_token").await,
        token_requests,
        "the cached path makes no token request"
    );
    // Resident memory after the load (over 100 000 requests in the full run).
    let pid = setup.broker.pid().expect("pid");
    eprintln!(
        "bench memory: broker resident {} KiB (peak {} KiB) after the load",
        crate::support::memory_kib(pid, "VmRSS"),
        crate::support::memory_kib(pid, "VmHWM")
    );
    let _ = bare.kill().await;
}

/// A thousand callers at once on a token they all find too short: one token request, and
/// the time until every caller has its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_on_an_expiring_token_costs_one_token_request() {
    let callers = if full() { 1000 } else { 100 };
    // Tokens live 303 s and callers want 300 s of life: four seconds after the consent the
    // token no longer does for anyone, and every caller arrives needing a new one.
    let setup = consented(None, 303).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = setup.upstream.token_requests("refresh_token").await;
    let url = format!("{}/api/refresh/acme", setup.base);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(callers)
        .build()
        .expect("client");
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let response = http
                    .get(url)
                    .header("X-API-Key", CALLER_KEY)
                    .send()
                    .await
                    .expect("refresh");
                assert_eq!(response.status(), 200);
                let body: serde_json::Value = response.json().await.expect("json");
                body["access_token"].as_str().expect("token").to_owned()
            })
        })
        .collect();
    let mut tokens = std::collections::BTreeSet::new();
    for task in tasks {
        tokens.insert(task.await.expect("caller"));
    }
    let took = started.elapsed();
    let requests = setup.upstream.token_requests("refresh_token").await - before;
    eprintln!(
        "bench fan-in: {callers} callers answered in {} ms with {requests} token request(s)",
        took.as_millis()
    );
    assert_eq!(requests, 1, "one token request for all");
    assert_eq!(tokens.len(), 1, "every caller got the one new token");
}

/// Process start to the first 200 on `/api/health`, polled every millisecond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_to_the_first_healthy_answer() {
    let runs = if full() { 20 } else { 2 };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = BrokerConfig::default()
        .store("path", dir.path().join("tokens").display().to_string())
        .write(dir.path());
    let mut times = Vec::new();
    for _ in 0..runs {
        let port = free_port();
        let started = Instant::now();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .env_clear()
            .env("BROKER_CONFIG", &config)
            .env("PORT", port.to_string())
            .env("BROKER_BIND", "127.0.0.1")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("broker");
        loop {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let request = "GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
                if stream.write_all(request.as_bytes()).await.is_ok() {
                    let mut answer = String::new();
                    let _ = stream.read_to_string(&mut answer).await;
                    if answer.starts_with("HTTP/1.1 200") {
                        break;
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no healthy answer"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(started.elapsed().as_micros());
        let pid = child.id().expect("pid");
        eprintln!(
            "bench startup: {} µs, resident {} KiB",
            times.last().copied().unwrap_or_default(),
            crate::support::memory_kib(pid, "VmRSS")
        );
        let _ = child.kill().await;
    }
    let times = Latencies(times);
    eprintln!("bench startup: {}", times.summary());
}

/// Key Vault operations per cached request (none) and per refresh, against the vault double.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_vault_operations_per_cached_request_and_per_refresh() {
    let (cached_n, forced_n) = if full() { (10_000, 20) } else { (100, 3) };
    let azure = crate::support::azure_doubles::Azure::start().await;
    // Refreshes asked for with min_validity (an hour of life from hour-long tokens), not
    // force: the force limit is not what this counts.
    let setup = consented(Some(&azure), 3600).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/refresh/acme", setup.base);
    let get = |query: &'static str| {
        let request = http
            .get(format!("{url}{query}"))
            .header("X-API-Key", CALLER_KEY);
        async move {
            let response = request.send().await.expect("refresh");
            assert_eq!(response.status(), 200);
        }
    };
    get("").await;
    let before = azure.shared.vault_operations();
    for _ in 0..cached_n {
        get("").await;
    }
    let cached_ops = azure.shared.vault_operations() - before;
    let before = azure.shared.vault_operations();
    let refreshes = setup.upstream.token_requests("refresh_token").await;
    for _ in 0..forced_n {
        get("?min_validity=3600").await;
    }
    let refresh_ops = azure.shared.vault_operations() - before;
    let made = setup.upstream.token_requests("refresh_token").await - refreshes;
    assert_eq!(
        made, forced_n as u64,
        "each asked-for refresh made one token request"
    );
    eprintln!(
        "bench vault: {cached_ops} operations for {cached_n} cached requests; {refresh_ops} for {forced_n} refreshes ({:.1} per refresh: {} reads, {} writes in all)",
        refresh_ops as f64 / forced_n as f64,
        azure.shared.count("get"),
        azure.shared.count("set"),
    );
    assert_eq!(cached_ops, 0, "a cached request never touches the vault");
    assert!(
        refresh_ops >= forced_n as u64,
        "each refresh saves its record"
    );
}
