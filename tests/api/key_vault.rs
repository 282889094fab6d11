//! The Key Vault store, end to end: the real binary, the official Azure SDK for Rust
//! (challenge auth, managed identity, retries), the Key Vault and managed-identity doubles,
//! and the strict upstream.

use std::process::Stdio;

use serde_json::Value;

use crate::support::azure_doubles::Azure;
use crate::support::{consent, BrokerConfig, BrokerProcess, Upstream, CALLER_KEY};

const RECORD: &str = "token-broker-acme";
const MIRROR: &str = "acme-refresh-token";
const CLIENT_SECRET: &str = "acme-client-secret";
/// A user-assigned managed identity, by client id.
const MI_CLIENT_ID: &str = "3f2b1c9e-0000-4000-8000-0000000000c1";

/// The doubles, an upstream and a broker using the vault, with its own temp directory.
struct VaultSetup {
    azure: Azure,
    upstream: Upstream,
    broker: BrokerProcess,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl VaultSetup {
    async fn start(before_broker: impl FnOnce(&Azure)) -> Self {
        Self::start_with(true, |_| String::new(), before_broker).await
    }

    /// `put_client_secret`: whether acme's client secret is in the vault at startup;
    /// `more_tables`: further config tables, given the upstream.
    async fn start_with(
        put_client_secret: bool,
        more_tables: impl FnOnce(&Upstream) -> String,
        before_broker: impl FnOnce(&Azure),
    ) -> Self {
        let azure = Azure::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        // The broker's port is only known once it starts, and the upstream needs the
        // redirect URI first: reserve a port the broker will then be told to use.
        let port = crate::support::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let upstream =
            Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
        // The client secret lives in the vault, not in the config.
        if put_client_secret {
            azure.shared.put(CLIENT_SECRET, &upstream.client_secret);
        }
        let more_tables = more_tables(&upstream);
        let config = BrokerConfig::default()
            .store("retry_budget", 3)
            .store("managed_identity_client_id", MI_CLIENT_ID)
            .tables(&format!(
                "{}{more_tables}",
                upstream.connection_toml(
                    "acme",
                    &format!(
                        "client_secret_name = \"{CLIENT_SECRET}\"\nmirror_refresh_token_secret = \"{MIRROR}\""
                    ),
                )
            ))
            .write(dir.path());
        before_broker(&azure);
        let mut env = azure.env();
        env.push(("RUST_LOG", "info,token_broker=debug".to_owned()));
        let broker =
            BrokerProcess::start_on(port, &config, &env, &dir.path().join("broker.log")).await;
        Self {
            azure,
            upstream,
            broker,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    async fn refresh(&self, query: &str) -> (u16, Value) {
        self.refresh_of("acme", query).await
    }

    async fn refresh_of(&self, connection: &str, query: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!(
                "{}/api/refresh/{connection}{query}",
                self.broker.base
            ))
            .header("X-API-Key", CALLER_KEY)
            .send()
            .await
            .expect("refresh");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    }

    /// Each connection's state on the status page (JSON), by name.
    async fn states(&self) -> std::collections::BTreeMap<String, String> {
        let page: Value = self
            .http
            .get(format!("{}/api/connections", self.broker.base))
            .header("X-API-Key", crate::support::ADMIN_KEY)
            .header("Accept", "application/json")
            .send()
            .await
            .expect("connections")
            .json()
            .await
            .expect("json");
        page["connections"]
            .as_array()
            .expect("connections")
            .iter()
            .map(|c| {
                let field = |k: &str| c[k].as_str().expect(k).to_owned();
                (field("name"), field("state"))
            })
            .collect()
    }

    async fn token(&self, query: &str) -> String {
        let (status, body) = self.refresh(query).await;
        assert_eq!(status, 200, "{body}\n{}", self.broker.logs());
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// The record the vault holds, parsed.
    fn stored(&self) -> Value {
        serde_json::from_str(&self.azure.shared.value(RECORD).expect("record secret"))
            .expect("record JSON")
    }

    fn stored_refresh_token(&self) -> String {
        self.stored()["refresh_token"]
            .as_str()
            .expect("refresh token")
            .to_owned()
    }

    /// The vault holds the refresh token the upstream issued last.
    async fn assert_newest_refresh_token_stored(&self) {
        assert_eq!(
            self.stored_refresh_token(),
            self.latest_issued_refresh_token().await,
            "{}",
            self.broker.logs()
        );
    }

    /// The refresh token the upstream issued last.
    async fn latest_issued_refresh_token(&self) -> String {
        let stats = self.upstream.stats().await;
        stats["seen"]["refresh_tokens"]
            .as_array()
            .and_then(|tokens| tokens.last())
            .and_then(Value::as_str)
            .expect("an issued refresh token")
            .to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_refresh_rotate_restart_with_key_vault() {
    let mut setup = VaultSetup::start(|_| {}).await;
    consent(&setup.broker.base, "acme").await;
    assert_eq!(
        setup.azure.shared.content_type(RECORD).as_deref(),
        Some("application/json")
    );
    setup.assert_newest_refresh_token_stored().await;
    assert_eq!(
        setup.azure.shared.value(MIRROR),
        Some(setup.stored_refresh_token())
    );
    assert!(
        setup.azure.shared.count("challenge") >= 1,
        "the SDK went through the challenge"
    );
    assert!(
        setup.azure.shared.count("identity") >= 1,
        "the token came from managed identity"
    );
    assert_eq!(
        setup.azure.shared.identity_client_id().as_deref(),
        Some(MI_CLIENT_ID),
        "the configured user-assigned identity was asked for"
    );

    let token = setup.token("").await;
    assert!(setup.upstream.is_active(&token).await);

    // Cached answers touch the vault zero times.
    let before = setup.azure.shared.vault_operations();
    for _ in 0..10 {
        assert_eq!(setup.token("").await, token);
    }
    assert_eq!(setup.azure.shared.vault_operations(), before);

    // One refresh: one read (another instance may have rotated) and two writes (record,
    // mirror), each write a new version.
    let versions = setup.azure.shared.versions(RECORD);
    let (gets, sets) = (
        setup.azure.shared.count("get"),
        setup.azure.shared.count("set"),
    );
    let rotated = setup.token("?force=true").await;
    assert_ne!(rotated, token);
    assert_eq!(setup.azure.shared.count("get") - gets, 1);
    assert_eq!(setup.azure.shared.count("set") - sets, 2);
    assert_eq!(setup.azure.shared.versions(RECORD), versions + 1);
    setup.assert_newest_refresh_token_stored().await;
    assert_eq!(
        setup.azure.shared.value(MIRROR),
        Some(setup.stored_refresh_token())
    );

    // A new process reads the vault and refreshes without consent.
    setup.broker.restart().await;
    assert_eq!(
        setup.token("").await,
        rotated,
        "served from the vault after a restart"
    );
    let after_restart = setup.token("?force=true").await;
    assert!(setup.upstream.is_active(&after_restart).await);
    setup.assert_newest_refresh_token_stored().await;
    assert_eq!(setup.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_write_failures_after_a_rotation_never_lose_the_refresh_token() {
    let setup = VaultSetup::start(|_| {}).await;
    consent(&setup.broker.base, "acme").await;
    let consented = setup.stored_refresh_token();

    // The provider rotates, then the vault refuses every write for a while.
    setup.azure.shared.fail_writes(1000);
    let (status, body) = setup.refresh("?force=true").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable");
    let refreshes = setup.upstream.token_requests("refresh_token").await;
    assert_eq!(refreshes, 1);

    // While the vault is down, callers get 503 and the provider is not asked again: the
    // old refresh token is never sent once a new one exists.
    for _ in 0..2 {
        let (status, _) = setup.refresh("").await;
        assert_eq!(status, 503);
    }
    assert_eq!(
        setup.upstream.token_requests("refresh_token").await,
        refreshes
    );
    assert_eq!(
        setup.stored_refresh_token(),
        consented,
        "the vault still has the old one"
    );

    // The vault recovers: the next call stores the newest refresh token and answers.
    setup.azure.shared.fail_writes(0);
    let token = setup.token("").await;
    assert!(setup.upstream.is_active(&token).await);
    setup.assert_newest_refresh_token_stored().await;
    assert_ne!(setup.stored_refresh_token(), consented);
    assert_eq!(
        setup.upstream.token_requests("refresh_token").await,
        refreshes
    );

    // And the grant is alive.
    setup.token("?force=true").await;
    assert_eq!(setup.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_cannot_be_written_never_fails_a_refresh() {
    let setup = VaultSetup::start(|azure| azure.shared.forbid_writes(MIRROR)).await;
    consent(&setup.broker.base, "acme").await;
    setup.assert_newest_refresh_token_stored().await;
    assert_eq!(setup.azure.shared.value(MIRROR), None);

    // The record is saved, so the refresh succeeds and the connection stays connected.
    let token = setup.token("?force=true").await;
    assert!(setup.upstream.is_active(&token).await);
    setup.assert_newest_refresh_token_stored().await;
    assert_eq!(setup.azure.shared.value(MIRROR), None);
    assert!(setup.azure.shared.count("forbidden") >= 2);
    let states = setup.states().await;
    assert_eq!(states["acme"], "connected", "{states:?}");
    let logs = setup.broker.logs();
    assert!(
        logs.contains("the refresh-token mirror was not updated") && logs.contains(MIRROR),
        "{logs}"
    );

    // Once writable, the next refresh brings the mirror up to date.
    setup.azure.shared.allow_writes(MIRROR);
    setup.token("?force=true").await;
    assert_eq!(
        setup.azure.shared.value(MIRROR),
        Some(setup.stored_refresh_token())
    );
    assert_eq!(setup.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_secret_missing_from_the_vault_leaves_that_connection_misconfigured_until_it_appears(
) {
    // The normal state right after the first `azd up`: the vault exists, the secret not yet.
    let setup = VaultSetup::start_with(
        false,
        |upstream| {
            upstream.connection_toml(
                "beta",
                &format!("client_secret = \"{}\"", upstream.client_secret),
            )
        },
        |_| {},
    )
    .await;
    let health = setup
        .http
        .get(format!("{}/api/health", setup.broker.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);

    // The other connection works.
    consent(&setup.broker.base, "beta").await;
    let (status, body) = setup.refresh_of("beta", "").await;
    assert_eq!(status, 200, "{body}");

    // acme: 503 naming the secret, and `misconfigured` on the status page.
    let (status, body) = setup.refresh("").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "connection_misconfigured");
    let description = body["error_description"].as_str().expect("description");
    assert!(description.contains(CLIENT_SECRET), "{description}");
    let states = setup.states().await;
    assert_eq!(states["acme"], "misconfigured", "{states:?}");
    assert_eq!(states["beta"], "connected", "{states:?}");

    // The secret is added: the connection works without a restart.
    setup
        .azure
        .shared
        .put(CLIENT_SECRET, &setup.upstream.client_secret);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = setup.refresh("").await;
        if status == 409 {
            assert_eq!(body["error"], "consent_required", "{body}");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "still misconfigured: {body}\n{}",
            setup.broker.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    consent(&setup.broker.base, "acme").await;
    let token = setup.token("").await;
    assert!(setup.upstream.is_active(&token).await);
    let logs = setup.broker.logs();
    assert!(
        logs.contains("connection_state_changed") && logs.contains("misconfigured"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_on_every_third_vault_request_is_absorbed() {
    let setup = VaultSetup::start(|azure| azure.shared.throttle_every(Some(3))).await;
    consent(&setup.broker.base, "acme").await;
    let mut tokens = Vec::new();
    for query in ["", "?force=true", "", "?force=true", "?force=true"] {
        tokens.push(setup.token(query).await);
    }
    assert!(
        setup.azure.shared.count("throttled") >= 2,
        "throttling happened"
    );
    for token in &tokens[3..] {
        assert!(!token.is_empty());
    }
    assert!(setup.upstream.is_active(&tokens[4]).await);
    setup.assert_newest_refresh_token_stored().await;
    assert_eq!(setup.upstream.grants_revoked().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_agrees_with_the_doubles() {
    let azure = Azure::start_for_python_sdk().await;
    // Throttling on: Microsoft's retry policy must get through it as it would in Azure.
    azure.shared.throttle_every(Some(4));
    let python = std::env::var("TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keyvault/sdk_check.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .envs(azure.env())
        .env("REQUESTS_CA_BUNDLE", &azure.pki.ca_file)
        .env("TEST_VAULT_CONNECT", azure.vault_connect())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python SDK check failed (is TEST_PYTHON set to a Python with tests/keyvault/requirements.txt? scripts/test sets it up):\n{stdout}\n{stderr}"
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("summary JSON");
    assert_eq!(seen["not_found"], "SecretNotFound");
    assert_eq!(azure.shared.versions("py-check"), 2);
    assert!(azure.shared.count("challenge") >= 1);
    assert!(azure.shared.count("identity") >= 1);
    assert!(azure.shared.count("throttled") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_and_a_graceful_shutdown_save_a_pending_refresh_token() {
    let mut setup = VaultSetup::start(|_| {}).await;
    consent(&setup.broker.base, "acme").await;

    // Rotation, then the vault refuses the write: the new token waits in memory.
    setup.azure.shared.fail_writes(1000);
    assert_eq!(setup.refresh("?force=true").await.0, 503);
    setup.azure.shared.fail_writes(0);
    // No caller comes; the timer runs (an admin key stands in for the host's loopback).
    crate::support::invoke_timer(
        &setup.http,
        &setup.broker.base,
        &crate::support::timer_payload(),
    )
    .await;
    setup.assert_newest_refresh_token_stored().await;

    // Again, and this time the instance is shut down before anyone calls.
    setup.azure.shared.fail_writes(1000);
    assert_eq!(setup.refresh("?force=true").await.0, 503);
    setup.azure.shared.fail_writes(0);
    setup.broker.terminate().await;
    setup.assert_newest_refresh_token_stored().await;

    setup.broker.restart().await;
    setup.token("?force=true").await;
    assert_eq!(setup.upstream.grants_revoked().await, 0);
}
