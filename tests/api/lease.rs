//! One refresh per connection across instances: several real broker processes sharing one
//! real Azurite (the blob lease, over HTTPS with bearer tokens from the managed-identity
//! double), one Key Vault double and the strict upstream (rotation on every use, reuse
//! revokes the grant).
//!
//! Long on purpose: one cluster harness and the scenarios the lease protocol must survive.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::azure_doubles::Azure;
use crate::support::azurite::Azurite;
use crate::support::{
    consent, consent_until_callback, BrokerConfig, BrokerProcess, Upstream, CALLER_KEY,
};

/// The shared peers and `n` broker processes using them.
struct Cluster {
    azure: Azure,
    azurite: Azurite,
    upstream: Upstream,
    brokers: Vec<BrokerProcess>,
    http: reqwest::Client,
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` brokers; the upstream issues access tokens living `ttl` seconds; `extra` adds to
    /// the shared configuration.
    async fn start(n: usize, ttl: u64, extra: impl FnOnce(BrokerConfig) -> BrokerConfig) -> Self {
        let azure = Azure::start().await;
        let azurite = Azurite::start(&azure.pki).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let ports: Vec<u16> = (0..n).map(|_| crate::support::free_port()).collect();
        // Consents go through the first instance: its callback is the redirect URI.
        let upstream = Upstream::start(
            &format!("http://127.0.0.1:{}/api/callback", ports[0]),
            "client_secret_basic",
            ttl,
        )
        .await;
        let config = extra(
            BrokerConfig::default()
                .store("retry_budget", 3)
                .lock("lease_duration", 15)
                .lock("failure_backoff", 1),
        )
        .tables(&upstream.connection_toml(
            "acme",
            &format!("client_secret = \"{}\"", upstream.client_secret),
        ))
        .write(dir.path());
        let mut env = azure.env();
        env.extend(azurite.env());
        env.push(("RUST_LOG", "info,token_broker=debug".to_owned()));
        let mut brokers = Vec::new();
        for (i, port) in ports.into_iter().enumerate() {
            let log = dir.path().join(format!("broker-{i}.log"));
            brokers.push(BrokerProcess::start_on(port, &config, &env, &log).await);
        }
        Self {
            azure,
            azurite,
            upstream,
            brokers,
            http: reqwest::Client::new(),
            env,
            dir,
        }
    }

    async fn refresh(&self, instance: usize, query: &str) -> (u16, Value, Option<String>) {
        refresh(&self.http, &self.brokers[instance].base, query).await
    }

    async fn token(&self, instance: usize, query: &str) -> String {
        let (status, body, _) = self.refresh(instance, query).await;
        assert_eq!(status, 200, "{body}\n{}", self.logs());
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// The timer's invocation, as the host sends it (an admin key stands in for loopback).
    async fn timer(&self, instance: usize) -> Value {
        crate::support::invoke_timer(
            &self.http,
            &self.brokers[instance].base,
            &crate::support::timer_payload(),
        )
        .await
    }

    fn stored_refresh_token(&self) -> String {
        let record: Value = serde_json::from_str(
            &self
                .azure
                .shared
                .value("token-broker-acme")
                .expect("record secret"),
        )
        .expect("record JSON");
        record["refresh_token"]
            .as_str()
            .expect("refresh token")
            .to_owned()
    }

    async fn latest_issued_refresh_token(&self) -> String {
        self.upstream.stats().await["seen"]["refresh_tokens"]
            .as_array()
            .and_then(|tokens| tokens.last())
            .and_then(Value::as_str)
            .expect("an issued refresh token")
            .to_owned()
    }

    /// Storage requests the brokers made so far (their DEBUG `storage call` lines).
    fn storage_calls(&self) -> usize {
        self.logs().matches("storage call").count()
    }

    /// `token-broker check` with the cluster's config and environment.
    async fn check(&self) -> std::process::Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
            .arg("check")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BROKER_CONFIG", self.dir.path().join("broker.toml"))
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .await
            .expect("run check")
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for (i, broker) in self.brokers.iter().enumerate() {
            all.push_str(&format!("--- broker {i}\n{}", broker.logs()));
        }
        all
    }
}

async fn refresh(http: &reqwest::Client, base: &str, query: &str) -> (u16, Value, Option<String>) {
    let response = http
        .get(format!("{base}/api/refresh/acme{query}"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("refresh");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().expect("ascii").to_owned());
    (status, response.json().await.expect("json"), retry_after)
}

/// `count` concurrent calls spread round-robin over the cluster's instances.
async fn spread(cluster: &Cluster, count: usize, query: &str) -> Vec<(u16, Value)> {
    let calls: Vec<_> = (0..count)
        .map(|i| {
            let http = cluster.http.clone();
            let base = cluster.brokers[i % cluster.brokers.len()].base.clone();
            let query = query.to_owned();
            tokio::spawn(async move {
                let (status, body, _) = refresh(&http, &base, &query).await;
                (status, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("join"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_make_one_upstream_refresh_per_expiry_window() {
    let ttl = 8;
    let cluster = Cluster::start(3, ttl, |c| c).await;
    consent(&cluster.brokers[0].base, "acme").await;
    // Slow token endpoint: the calls really overlap the refresh.
    cluster.upstream.delay(300).await;
    let mut calls = 0;
    let mut ok = 0;
    let mut per_window = Vec::new();
    let mut storage_per_window = Vec::new();
    for _window in 0..3 {
        // Let the access token expire everywhere.
        tokio::time::sleep(Duration::from_secs(ttl)).await;
        let before = cluster.upstream.token_requests("refresh_token").await;
        let storage_before = cluster.storage_calls();
        let w0 = Instant::now();
        let answers = spread(&cluster, 100, "?min_validity=1").await;
        eprintln!("PROBE window took {:?}", w0.elapsed());
        calls += answers.len();
        for (status, body) in &answers {
            assert_eq!(*status, 200, "{body}\n{}", cluster.logs());
            ok += 1;
        }
        per_window.push(cluster.upstream.token_requests("refresh_token").await - before);
        storage_per_window.push(cluster.storage_calls() - storage_before);
    }
    // Cached answers make no storage request at all.
    let storage_before = cluster.storage_calls();
    for (status, body) in spread(&cluster, 30, "?min_validity=1").await {
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(cluster.storage_calls(), storage_before);
    let revoked = cluster.upstream.grants_revoked().await;
    eprintln!(
        "three instances: {calls} calls, {ok} answered 200, upstream refreshes per window {per_window:?}, {revoked} revocations, storage requests per window (all instances) {storage_per_window:?}"
    );
    assert_eq!(per_window, vec![1, 1, 1], "{}", cluster.logs());
    assert_eq!(revoked, 0);
    assert_eq!(
        cluster.stored_refresh_token(),
        cluster.latest_issued_refresh_token().await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timer_in_its_own_process_never_reuses_a_refresh_token() {
    // Tokens living 60 s, a 59 s window: every timer run refreshes, as callers force
    // refreshes on the other two instances at the same moments.
    let cluster = Cluster::start(3, 60, |c| c.refresh("prerefresh_window", 59)).await;
    consent(&cluster.brokers[0].base, "acme").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    cluster.upstream.delay(200).await;
    // Alone, the timer's instance refreshes itself.
    let report = cluster.timer(2).await;
    assert_eq!(
        report["ReturnValue"]["connections"][0]["outcome"], "refreshed",
        "{report}"
    );
    assert!(
        cluster.brokers[2].logs().contains("token refreshed"),
        "{}",
        cluster.logs()
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut timer_refreshed = 0;
    for _round in 0..4 {
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let http = cluster.http.clone();
                let base = cluster.brokers[i % 2].base.clone();
                tokio::spawn(async move { refresh(&http, &base, "?force=true").await })
            })
            .collect();
        let report = cluster.timer(2).await;
        for call in calls {
            let (status, body, _) = call.await.expect("join");
            assert_eq!(status, 200, "{body}\n{}", cluster.logs());
        }
        let outcome = report["ReturnValue"]["connections"][0]["outcome"].clone();
        assert_ne!(outcome, "failed", "{report}\n{}", cluster.logs());
        if outcome == "refreshed" {
            timer_refreshed += 1;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert!(timer_refreshed > 0, "the timer took part");
    assert_eq!(
        cluster.upstream.grants_revoked().await,
        0,
        "{}",
        cluster.logs()
    );
    let token = cluster.token(1, "").await;
    assert!(cluster.upstream.is_active(&token).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_lease_holder_mid_refresh_hands_over_within_the_lease_duration() {
    let mut cluster = Cluster::start(2, 3600, |c| c).await;
    consent(&cluster.brokers[0].base, "acme").await;
    // Instance 0 takes the lease and re-reads the vault, which is slow; it is killed there.
    cluster.azure.shared.delay_reads(5000);
    let reads = cluster.azure.shared.count("get_started");
    let http = cluster.http.clone();
    let base = cluster.brokers[0].base.clone();
    // Its caller sees the connection drop, nothing more.
    let doomed = tokio::spawn(async move {
        http.get(format!("{base}/api/refresh/acme?force=true"))
            .header("X-API-Key", CALLER_KEY)
            .send()
            .await
    });
    // The vault read starts only once the lease is held.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.azure.shared.count("get_started") == reads {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leased_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.brokers[0].stop().await; // SIGKILL
    let killed_at = Instant::now();
    let _ = doomed.await;
    cluster.azure.shared.delay_reads(0);
    let before = cluster.upstream.token_requests("refresh_token").await;

    let token = cluster.token(1, "?force=true").await;
    let recovery = killed_at.elapsed();
    eprintln!("kill -9 of the lease holder: instance 1 answered {recovery:?} after the kill");
    // It had to wait for the dead holder's lease (15 s from when it was taken)…
    assert!(
        leased_at.elapsed() >= Duration::from_secs(14),
        "{recovery:?}"
    );
    // …and not much longer: the lease duration plus one refresh.
    assert!(recovery < Duration::from_secs(15 + 5), "{recovery:?}");
    assert_eq!(
        cluster.upstream.token_requests("refresh_token").await,
        before + 1,
        "the dead instance never reached the provider; the survivor refreshed once"
    );
    assert!(cluster.upstream.is_active(&token).await);
    assert_eq!(cluster.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_down_refuses_refreshes_but_serves_cached_tokens() {
    let mut cluster = Cluster::start(1, 3600, |c| c).await;
    consent(&cluster.brokers[0].base, "acme").await;
    let cached = cluster.token(0, "").await;
    let before = cluster.upstream.token_requests("refresh_token").await;

    cluster.azurite.stop().await;
    // A token that satisfies the caller is still served.
    assert_eq!(cluster.token(0, "").await, cached);
    // A refresh is not made without the lease: a prompt JSON 503.
    let started = Instant::now();
    let (status, body, retry_after) = cluster.refresh(0, "?force=true").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "lock_unavailable", "{body}");
    assert!(retry_after.is_some());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        cluster.upstream.token_requests("refresh_token").await,
        before,
        "no token request without the lease"
    );

    cluster.azurite.start_again().await;
    let fresh = cluster.token(0, "?force=true").await;
    assert_ne!(fresh, cached);
    assert!(cluster.upstream.is_active(&fresh).await);
    assert_eq!(cluster.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unsaved_refresh_token_keeps_the_lease_until_the_vault_accepts_it() {
    // The timer wants to refresh any token older than a second.
    let mut cluster = Cluster::start(2, 3600, |c| c.refresh("prerefresh_window", 3599)).await;
    consent(&cluster.brokers[0].base, "acme").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Instance 0 rotates the token, but the vault refuses the write.
    cluster.azure.shared.fail_writes(1_000_000);
    let (status, body, _) = cluster.refresh(0, "?force=true").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable");
    let requests = cluster.upstream.token_requests("refresh_token").await;

    // Instance 1's callers and its timer make no token request meanwhile.
    let (status, body, retry_after) = cluster.refresh(1, "?force=true").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "refresh_in_progress", "{body}");
    assert!(retry_after.is_some());
    let report = cluster.timer(1).await;
    assert_eq!(
        report["ReturnValue"]["connections"][0]["outcome"], "failed",
        "the timer could not take the lease: {report}"
    );
    let forced = cluster.refresh(1, "?force=true").await;
    assert_eq!(forced.0, 503);
    assert_eq!(
        cluster.upstream.token_requests("refresh_token").await,
        requests
    );

    // The vault heals: instance 0's background save lands, the lease is released.
    cluster.azure.shared.fail_writes(0);
    let deadline = Instant::now() + Duration::from_secs(40);
    let token = loop {
        let (status, body, _) = cluster.refresh(1, "?force=true").await;
        if status == 200 {
            break body["access_token"].as_str().expect("token").to_owned();
        }
        assert!(Instant::now() < deadline, "{body}\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(cluster.upstream.is_active(&token).await);
    assert_eq!(
        cluster.upstream.grants_revoked().await,
        0,
        "{}",
        cluster.logs()
    );
    assert_eq!(
        cluster.stored_refresh_token(),
        cluster.latest_issued_refresh_token().await
    );

    // The same again, but instance 0 dies (SIGKILL) holding the unsaved token: the
    // takeover says a refresh token may have been lost.
    cluster.azure.shared.fail_writes(1_000_000);
    assert_eq!(cluster.refresh(0, "?force=true").await.0, 503);
    cluster.brokers[0].stop().await;
    cluster.azure.shared.fail_writes(0);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (status, body, _) = cluster.refresh(1, "?force=true").await;
        if status != 503 {
            // The strict upstream revokes the grant when the older token comes back.
            assert!(status == 200 || status == 409, "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "{body}\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        cluster.brokers[1]
            .logs()
            .contains("a refresh token may have been lost"),
        "{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consent_racing_a_refresh_on_another_instance_leaves_one_consistent_record() {
    let cluster = Cluster::start(2, 3600, |c| c).await;
    consent(&cluster.brokers[0].base, "acme").await;
    cluster.upstream.delay(300).await;
    let browser = consent_until_callback(&cluster.brokers[0].base, "acme").await;
    let consent_started = chrono::Utc::now();
    let http = cluster.http.clone();
    let base = cluster.brokers[1].base.clone();
    let racing = tokio::spawn(async move { refresh(&http, &base, "?force=true").await });
    let (status, page) = browser.finish().await;
    assert_eq!(status, 200, "{page}");
    let (status, body, _) = racing.await.expect("join");
    assert_eq!(status, 200, "{body}");

    // Whichever ran first, the record now belongs to the new consent: a refresh of the old
    // grant either finished before it (and was replaced) or found it (and took it).
    let record: Value = serde_json::from_str(
        &cluster
            .azure
            .shared
            .value("token-broker-acme")
            .expect("record"),
    )
    .expect("json");
    let consented_at: chrono::DateTime<chrono::Utc> = record["consented_at"]
        .as_str()
        .expect("consented_at")
        .parse()
        .expect("time");
    assert!(
        consented_at >= consent_started,
        "{record}\n{}",
        cluster.logs()
    );
    // And it is alive: the next refresh uses its refresh token without a revocation.
    cluster.upstream.delay(0).await;
    let token = cluster.token(1, "?force=true").await;
    assert!(cluster.upstream.is_active(&token).await);
    assert_eq!(cluster.upstream.grants_revoked().await, 0);

    // The same callback URL replayed on the other instance (same browser, same cookie)
    // is refused before any code exchange.
    let exchanges = cluster.upstream.token_requests("authorization_code").await;
    let replay =
        browser
            .callback_url
            .replacen(&cluster.brokers[0].base, &cluster.brokers[1].base, 1);
    let response = browser.client.get(&replay).send().await.expect("replay");
    assert_eq!(response.status(), 400);
    let page = response.text().await.expect("page");
    assert!(page.contains("already used"), "{page}");
    assert_eq!(
        cluster.upstream.token_requests("authorization_code").await,
        exchanges
    );
    drop(cluster.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_provider_costs_one_flight_across_all_instances() {
    let cluster = Cluster::start(3, 3600, |c| c.lock("failure_backoff", 30)).await;
    consent(&cluster.brokers[0].base, "acme").await;
    let before = cluster.upstream.token_requests("refresh_token").await;
    cluster
        .upstream
        .fail_next(1_000_000, 503, "down", "text/plain")
        .await;
    let started = Instant::now();
    let answers = spread(&cluster, 30, "?force=true").await;
    let slowest = started.elapsed();
    let requests = cluster.upstream.token_requests("refresh_token").await - before;
    eprintln!(
        "30 callers on 3 instances, failing provider: {requests} token requests, slowest answer {slowest:?}"
    );
    for (status, body) in &answers {
        assert_eq!(*status, 502, "{body}");
        assert_eq!(body["error"], "provider_unavailable", "{body}");
    }
    // One flight's three attempts; the other instances honour its back-off.
    assert_eq!(requests, 3, "{}", cluster.logs());
    assert!(slowest < Duration::from_secs(10), "{slowest:?}");
    cluster.upstream.fail_next(0, 503, "", "text/plain").await;
}

#[tokio::test]
async fn check_reports_whether_the_lease_store_is_reachable() {
    let mut cluster = Cluster::start(1, 3600, |c| c).await;
    let output = cluster.check().await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("refresh lease ok"), "{stdout}");
    cluster.azurite.stop().await;
    let output = cluster.check().await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("refresh lease"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_longer_than_the_lease_keeps_it_by_renewing() {
    let cluster = Cluster::start(2, 3600, |c| c).await;
    consent(&cluster.brokers[0].base, "acme").await;
    let before = cluster.upstream.token_requests("refresh_token").await;
    // Longer than the 15 s lease; the upstream timeout (30 s) lets it finish.
    cluster.upstream.delay(17_000).await;
    let http = cluster.http.clone();
    let base = cluster.brokers[0].base.clone();
    let slow = tokio::spawn(async move { refresh(&http, &base, "?force=true").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Instance 1 waits for the lease past its first expiry, then takes instance 0's token.
    let (status, body, _) = cluster.refresh(1, "?force=true").await;
    assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    let (status, first, _) = slow.await.expect("join");
    assert_eq!(status, 200, "{first}");
    assert_eq!(body["access_token"], first["access_token"]);
    assert_eq!(
        cluster.upstream.token_requests("refresh_token").await - before,
        1
    );
    assert_eq!(cluster.upstream.grants_revoked().await, 0);
    assert!(
        !cluster.logs().contains("lease was lost"),
        "{}",
        cluster.logs()
    );
}
