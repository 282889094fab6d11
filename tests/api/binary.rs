//! The real binary: startup validation, the port the Functions host assigns, and a full flow
//! at TRACE level whose logs must not contain a single secret.

use std::path::Path;
use std::process::Stdio;

use crate::support::api_double::ApiDouble;
use crate::support::azure_doubles::Azure;
use crate::support::{
    free_port, random, wait_ready, BrokerConfig, BrokerProcess, Upstream, ADMIN_KEY,
};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn broker(config: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("BROKER_CONFIG", config)
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn bad_config_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    let cases = [
        (
            "[auth]\napi_keys = [\"${NOT_SET_ANYWHERE}\"]\n",
            "auth.api_keys[0]",
        ),
        (
            "[auth]\nallow_anonymous = true\n[connections.a]\nprovider = \"oauth9\"\n",
            "connections.a.provider",
        ),
        (
            "[auth]\nallow_anonymous = true\n[connections.a]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"nope\"\nclient_id = \"c\"\n",
            "connections.a.token_url",
        ),
        ("[connections]\n", "`auth`"),
    ];
    for (text, key) in cases {
        std::fs::write(&config, text).expect("write");
        let output = broker(&config)
            .env("PORT", free_port().to_string())
            .output()
            .await
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "for {text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(key), "expected {key} in: {stderr}");
    }
}

#[tokio::test]
async fn listens_on_the_functions_port_before_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\napi_keys = [\"{}\"]\n[store]\npath = \"{}\"\n",
            random("key"),
            dir.path().join("tokens").display()
        ),
    )
    .expect("write");
    let functions_port = free_port();
    let mut child = broker(&config)
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", functions_port.to_string())
        .env("PORT", free_port().to_string())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    wait_ready(
        functions_port,
        &mut child,
        Path::new("(stderr not captured)"),
    )
    .await;
    let health: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{functions_port}/api/health"))
            .await
            .expect("health")
            .json()
            .await
            .expect("json");
    assert_eq!(health["status"], "ok");
    child.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level_with_the_file_store() {
    full_flow_logs_no_secret(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level_with_key_vault() {
    let azure = Azure::start().await;
    full_flow_logs_no_secret(Some(&azure)).await;
}

/// Consent, cached, forced and failing refreshes with every crate at TRACE; then searches
/// the output for every token, code, verifier and secret involved.
async fn full_flow_logs_no_secret(azure: Option<&Azure>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let upstream =
        Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
    let api = ApiDouble::start().await;
    let caller_key = random("caller-key");
    let state_secret = random("state-secret");
    let (store, client_secret) = match azure {
        Some(azure) => {
            azure
                .shared
                .put("acme-client-secret", &upstream.client_secret);
            (
                "mirror_refresh_token_secret = \"acme-refresh-token\"\nclient_secret_name = \"acme-client-secret\"".to_owned(),
                String::new(),
            )
        }
        None => (
            String::new(),
            "client_secret = \"${ACME_SECRET}\"".to_owned(),
        ),
    };
    let config = BrokerConfig::default()
        .top("state_secret", state_secret.clone())
        .auth("api_keys", vec!["${CALLER_KEY}".to_owned()])
        .store("path", dir.path().join("tokens").display().to_string())
        .tables(&upstream.connection_toml(
            "acme",
            &format!("{client_secret}\n{store}\napi_base_url = \"{}\"", api.base),
        ))
        .write(dir.path());
    let mut env = vec![
        ("RUST_LOG", "trace".to_owned()),
        ("CALLER_KEY", caller_key.clone()),
        ("ACME_SECRET", upstream.client_secret.clone()),
    ];
    if let Some(azure) = azure {
        env.extend(azure.env());
    }
    let mut broker =
        BrokerProcess::start_on(port, &config, &env, &dir.path().join("broker.log")).await;

    // Consent like a browser, from `?key=` (exchanged for a session cookie) on.
    crate::support::consent(&base, "acme").await;

    // Refresh: cached, forced, failing (malformed response), and a key in the URL.
    let http = reqwest::Client::new();
    let mut tokens = Vec::new();
    for query in ["", "?force=true", "?force=true"] {
        let body: serde_json::Value = http
            .get(format!("{base}/api/refresh/acme{query}"))
            .header("X-API-Key", &caller_key)
            .send()
            .await
            .expect("refresh")
            .json()
            .await
            .expect("json");
        tokens.push(body["access_token"].as_str().expect("token").to_owned());
    }
    // Through the proxy: pages with the API's marker in body and cookie, the caller's cookie,
    // an upload whose body is a secret, and a 401 that costs a refresh.
    let cookie = random("caller-cookie");
    let uploaded = random("uploaded-body");
    let page = http
        .get(format!("{base}/api/proxy/acme/invoices?page=1"))
        .header("X-API-Key", &caller_key)
        .header("Cookie", format!("c={cookie}"))
        .send()
        .await
        .expect("proxy");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("page").contains(&api.marker));
    let upload = http
        .post(format!("{base}/api/proxy/acme/upload"))
        .header("X-API-Key", &caller_key)
        .body(uploaded.clone())
        .send()
        .await
        .expect("proxy");
    assert_eq!(upload.status(), 200);
    let flaky = http
        .get(format!("{base}/api/proxy/acme/flaky"))
        .header("X-API-Key", &caller_key)
        .send()
        .await
        .expect("proxy");
    assert_eq!(flaky.status(), 200);
    let forwarded: Vec<String> = api
        .seen()
        .iter()
        .filter_map(|s| s.authorization.clone())
        .collect();
    assert_eq!(forwarded.len(), 4, "the API saw the broker's token");

    upstream
        .fail_next(
            1,
            200,
            r#"{"access_token":918273645546372819}"#,
            "application/json",
        )
        .await;
    let failed = http
        .get(format!("{base}/api/refresh/acme?force=true"))
        .header("X-API-Key", &caller_key)
        .send()
        .await
        .expect("refresh");
    assert_eq!(failed.status(), 502);
    let refused = http
        .get(format!("{base}/api/refresh/acme?key={caller_key}"))
        .send()
        .await
        .expect("refresh");
    assert_eq!(refused.status(), 400, "a key in the URL is refused");

    broker.stop().await;
    let logs = broker.logs();
    // The log is real: it traced the requests and the refreshes.
    assert!(
        logs.contains("token refreshed"),
        "no refresh logged:\n{logs}"
    );
    assert!(logs.contains("consent completed"), "no consent logged");
    assert!(logs.contains("proxied"), "no proxied call logged:\n{logs}");
    assert!(logs.contains("TRACE"), "not at trace level");
    if azure.is_some() {
        assert!(
            logs.contains("Key Vault"),
            "the vault store was not used:\n{logs}"
        );
    }

    let mut secrets = upstream.secrets_seen().await;
    secrets.extend(tokens);
    secrets.extend([
        caller_key,
        ADMIN_KEY.to_owned(),
        state_secret,
        "918273645546372819".to_owned(),
        cookie,
        uploaded,
        api.marker.clone(),
    ]);
    secrets.extend(
        forwarded
            .iter()
            .filter_map(|a| a.strip_prefix("Bearer ").map(str::to_owned)),
    );
    if let Some(azure) = azure {
        secrets.push(azure.identity_header.clone());
        secrets.extend(azure.shared.issued_tokens());
    }
    let seen = upstream.stats().await;
    for kind in ["codes", "code_verifiers", "refresh_tokens", "access_tokens"] {
        assert!(
            !seen["seen"][kind].as_array().expect("list").is_empty(),
            "the upstream saw no {kind}: the test would prove nothing"
        );
    }
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret leaked into the logs: {secret}"
        );
    }
}

#[tokio::test]
async fn unresolved_references_and_empty_secrets_stop_startup_without_echoing_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    // What App Service leaves in a setting whose reference it could not resolve.
    let reference =
        "@Microsoft.KeyVault(SecretUri=https://kv-tb-leak.vault.azure.net/secrets/broker-api-key/)";
    let app_config = "@Microsoft.AppConfiguration(Endpoint=https://appcs-leak.azconfig.io; Key=k)";
    let connection = "[connections.a]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n";
    // (config text, environment, the key the error must name)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "[auth]\napi_keys = [\"${BROKER_API_KEY}\"]\n".into(),
            vec![("BROKER_API_KEY", reference)],
            "auth.api_keys[0]",
        ),
        (
            "[auth]\nadmin_keys = [\"${BROKER_ADMIN_KEY}\"]\n".into(),
            vec![("BROKER_ADMIN_KEY", app_config)],
            "auth.admin_keys[0]",
        ),
        (
            "state_secret = \"${BROKER_STATE_SECRET}\"\n[auth]\nallow_anonymous = true\n".into(),
            vec![("BROKER_STATE_SECRET", reference)],
            "state_secret",
        ),
        (
            format!(
                "[auth]\nallow_anonymous = true\n{connection}client_secret = \"${{SECRET}}\"\n"
            ),
            vec![("SECRET", reference)],
            "connections.a.client_secret",
        ),
        (
            format!(
                "[auth]\nallow_anonymous = true\n{connection}client_secret = \"${{SECRET}}\"\n"
            ),
            vec![("SECRET", "")],
            "connections.a.client_secret",
        ),
        (
            "[auth]\nallow_anonymous = true\n".into(),
            vec![("KEY_VAULT_URL", reference)],
            "KEY_VAULT_URL",
        ),
        (
            // Written literally into the file.
            format!("[auth]\napi_keys = [\"{reference}\"]\n"),
            vec![],
            "auth.api_keys[0]",
        ),
        // The examples' placeholders, outside local mode.
        (
            "state_secret = \"${BROKER_STATE_SECRET}\"\n[auth]\nallow_anonymous = true\n".into(),
            vec![(
                "BROKER_STATE_SECRET",
                "replace-with-32-or-more-random-characters-leak",
            )],
            "state_secret",
        ),
        (
            "[auth]\napi_keys = [\"local-caller-key-change-me-leak\"]\n".into(),
            vec![],
            "auth.api_keys[0]",
        ),
        (
            "[auth]\napi_keys = [\"k-0123456789abcdef\"]\nadmin_keys = [\"${BROKER_ADMIN_KEY}\"]\n".into(),
            vec![("BROKER_ADMIN_KEY", "replace-with-a-random-admin-key-leak")],
            "auth.admin_keys[0]",
        ),
        (
            format!(
                "[auth]\nallow_anonymous = true\n{connection}client_secret = \"replace-with-your-client-secret-leak\"\n"
            ),
            vec![],
            "connections.a.client_secret",
        ),
        (
            // Local mode is refused in Azure.
            "local_mode = true\n[auth]\napi_keys = [\"local-caller-key-change-me-leak\"]\n".into(),
            vec![("WEBSITE_INSTANCE_ID", "a1b2c3")],
            "local_mode",
        ),
    ];
    for (text, env, key) in cases {
        std::fs::write(&config, &text).expect("write");
        let output = broker(&config)
            .env("PORT", free_port().to_string())
            .envs(env.iter().copied())
            .output()
            .await
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "for {text}: {stderr}");
        assert!(stderr.contains(key), "expected {key} in: {stderr}");
        assert!(
            !stderr.contains("leak"),
            "the reference is never echoed: {stderr}"
        );
    }
}

#[tokio::test]
async fn anonymous_access_is_refused_unless_the_broker_listens_on_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nallow_anonymous = true\n[store]\npath = \"{}\"\n",
            dir.path().join("tokens").display()
        ),
    )
    .expect("write");
    // Refused before it binds anything.
    let output = broker(&config)
        .env("PORT", free_port().to_string())
        .env("BROKER_BIND", "0.0.0.0")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("auth.allow_anonymous"), "{stderr}");

    // On loopback it starts (with its loud warning).
    let port = free_port();
    let log = dir.path().join("broker.log");
    let mut child = broker(&config)
        .env("PORT", port.to_string())
        .env("BROKER_BIND", "127.0.0.1")
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
        .spawn()
        .expect("start");
    wait_ready(port, &mut child, &log).await;
    child.kill().await.expect("kill");
    assert!(std::fs::read_to_string(&log)
        .expect("log")
        .contains("allow_anonymous = true"));
}

#[tokio::test]
async fn local_mode_listens_on_loopback_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/broker.toml"))
            .expect("example");
    std::fs::write(
        &config,
        example.replace(
            "path = \".tokens\"",
            &format!("path = \"{}\"", dir.path().join("tokens").display()),
        ),
    )
    .expect("write");
    // Refused before it binds anything wider.
    let output = broker(&config)
        .env("PORT", free_port().to_string())
        .env("BROKER_BIND", "0.0.0.0")
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("local_mode"), "{stderr}");

    // Without BROKER_BIND the example serves on 127.0.0.1, warning about its placeholders.
    let port = free_port();
    let log = dir.path().join("broker.log");
    let mut child = broker(&config)
        .env("PORT", port.to_string())
        .env_remove("BROKER_BIND")
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
        .spawn()
        .expect("start");
    wait_ready(port, &mut child, &log).await;
    let health = reqwest::get(format!("http://127.0.0.1:{port}/api/health"))
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
    child.kill().await.expect("kill");
    let logs = std::fs::read_to_string(&log).expect("log");
    assert!(logs.contains("placeholders accepted"), "{logs}");
    assert!(
        logs.contains(&format!("address=127.0.0.1:{port}")),
        "{logs}"
    );
    assert!(!logs.contains("change-me"), "values are not echoed: {logs}");
}

/// Under the Functions host the broker listens on loopback and the host relays the Internet
/// to it: `allow_anonymous` and `local_mode`, which rest on "loopback only", are refused at
/// startup (exit 2, naming the key) whenever the host's port or an App Service instance
/// variable is set — even with BROKER_BIND=127.0.0.1.
#[tokio::test]
async fn anonymous_and_local_mode_are_refused_under_the_functions_host_and_in_azure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    let tokens = dir.path().join("tokens");
    let anonymous = format!(
        "[auth]\nallow_anonymous = true\n[store]\npath = \"{}\"\n",
        tokens.display()
    );
    let local = format!(
        "local_mode = true\n[auth]\napi_keys = [\"local-caller-key-change-me\"]\n[store]\npath = \"{}\"\n",
        tokens.display()
    );
    for (text, key) in [(&anonymous, "auth.allow_anonymous"), (&local, "local_mode")] {
        for variable in [
            "FUNCTIONS_CUSTOMHANDLER_PORT",
            "WEBSITE_INSTANCE_ID",
            "WEBSITE_SITE_NAME",
        ] {
            std::fs::write(&config, text).expect("write");
            let port = free_port();
            let value = if variable == "FUNCTIONS_CUSTOMHANDLER_PORT" {
                port.to_string()
            } else {
                "tb-instance-1".to_owned()
            };
            let run = broker(&config)
                .env("PORT", port.to_string())
                .env("BROKER_BIND", "127.0.0.1")
                .env(variable, &value)
                .output();
            // A broker that started would serve until killed: give it a bound.
            let output = tokio::time::timeout(std::time::Duration::from_secs(20), run)
                .await
                .unwrap_or_else(|_| panic!("{key} with {variable} set: the broker started"))
                .expect("run");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(2),
                "{key} with {variable}: {stderr}"
            );
            assert!(stderr.contains(key), "{key} with {variable}: {stderr}");
            assert!(stderr.contains(variable), "{key} with {variable}: {stderr}");
        }
    }
}
