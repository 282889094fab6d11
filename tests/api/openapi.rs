//! The OpenAPI contract: the checked-in `openapi.json` is what the binary serves, an
//! independent validator accepts it, and Schemathesis fuzzes the real binary against it
//! (a consented connection, the strict upstream behind it) without finding anything.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{
    consent, free_port, BrokerConfig, BrokerProcess, TestApp, Upstream, ADMIN_KEY,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn checked_in() -> Value {
    let text = std::fs::read_to_string(root().join("openapi.json")).expect("openapi.json");
    serde_json::from_str(&text).expect("openapi.json is JSON")
}

/// A tool from the test venv (scripts/test installs tests/openapi/requirements.txt there).
fn venv_tool(name: &str) -> PathBuf {
    let python =
        std::env::var("TEST_PYTHON").expect("TEST_PYTHON: run the tests through scripts/test");
    Path::new(&python).with_file_name(name)
}

#[tokio::test]
async fn the_checked_in_document_is_what_the_binary_serves() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .get(format!("{}/api/openapi.json", app.base))
        .send()
        .await
        .expect("openapi.json");
    assert_eq!(response.status(), 200);
    let served: Value = response.json().await.expect("json");
    assert_eq!(
        served,
        checked_in(),
        "openapi.json differs from what the broker serves: regenerate it with `cargo run -- openapi > openapi.json`"
    );
    assert_eq!(served["openapi"], "3.1.0");
    for path in [
        "/api/refresh/{connection}",
        "/api/authorize/{connection}",
        "/api/callback",
        "/api/connections",
        "/api/health",
        "/prerefresh",
    ] {
        assert!(served["paths"].get(path).is_some(), "{path} undocumented");
    }
    for scheme in ["api_key", "entra", "admin_session"] {
        assert!(
            served["components"]["securitySchemes"]
                .get(scheme)
                .is_some(),
            "{scheme}"
        );
    }
}

#[tokio::test]
async fn an_independent_validator_accepts_the_document() {
    let output = tokio::process::Command::new(venv_tool("openapi-spec-validator"))
        .arg(root().join("openapi.json"))
        .output()
        .await
        .expect("openapi-spec-validator");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_a_consented_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let upstream =
        Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
    let config = BrokerConfig::default()
        .file_store(&dir.path().join("tokens"))
        .tables(&upstream.connection_toml(
            "acme",
            // The proxy forwards to the upstream itself: fuzzed paths reach a real server.
            &format!(
                "client_secret = \"{}\"\napi_base_url = \"{}\"",
                upstream.client_secret, upstream.url
            ),
        ))
        .write(dir.path());
    let broker = BrokerProcess::start_on(port, &config, &[], &dir.path().join("broker.log")).await;
    consent(&base, "acme").await;
    // A real admin session too: the browser routes take it as an alternative to the key,
    // and with both given as they are (not generated), Schemathesis's authentication
    // check takes each away in turn and expects a refusal.
    let exchanged = reqwest::Client::new()
        .get(format!("{base}/api/connections?key={ADMIN_KEY}"))
        .send()
        .await
        .expect("key exchange");
    let session = exchanged
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("an admin session cookie")
        .to_owned();

    let output = tokio::process::Command::new(venv_tool("schemathesis"))
        .arg("--config-file")
        .arg(root().join("tests/openapi/schemathesis.toml"))
        .args([
            "run",
            &format!("{base}/api/openapi.json"),
            "--checks",
            "all",
            "--max-examples",
            "25",
            "--seed",
            "20261201",
            "--workers",
            "1",
            "-H",
            &format!("X-API-Key: {ADMIN_KEY}"),
            "-H",
            &format!("Cookie: {session}"),
        ])
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .output()
        .await
        .expect("schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{report}\n{}", broker.logs());
    assert!(report.contains("14 selected"), "{report}");
    eprintln!(
        "{}",
        report
            .lines()
            .filter(|l| l.contains("generated") || l.contains("Operations"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The grant survived the fuzzing.
    assert_eq!(upstream.grants_revoked().await, 0);
}

/// The error codes come from one table: the document's `ErrorBody.error` enum is it, and
/// the manual's error table (docs/api.md) names every code in it.
#[test]
fn the_manual_lists_every_error_code_the_document_names() {
    let document = checked_in();
    let codes: Vec<&str> = document["components"]["schemas"]["ErrorBody"]["properties"]["error"]
        ["enum"]
        .as_array()
        .expect("an enum of codes")
        .iter()
        .map(|code| code.as_str().expect("a code"))
        .collect();
    assert!(codes.len() >= 20, "{codes:?}");
    for code in [
        "consent_required",
        "unknown_tenant",
        "server_busy",
        "force_rate_limited",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
    let manual = std::fs::read_to_string(root().join("docs/api.md")).expect("docs/api.md");
    let table: Vec<&str> = manual.lines().filter(|l| l.starts_with("| ")).collect();
    for code in codes {
        assert!(
            table.iter().any(|row| row.contains(&format!("`{code}`"))),
            "docs/api.md's error table does not list `{code}`"
        );
    }
}
