//! The CLI on the same binary: `login` connects a connection from a terminal (a loopback
//! listener, the browser flow, state and PKCE checked by the same callback) and stores the
//! tokens; `token` prints what `/api/refresh` answers through the same broker code; `check`
//! lists each connection with its state. Never a token on the terminal except `token`'s own.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::{free_port, walk_to_callback, BrokerConfig, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn cli(config: &std::path::Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(config)
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_a_refresh_token_and_token_serves_it_like_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // What an admin registers at the provider for `login`.
    let upstream = Upstream::start(
        &format!("http://localhost:{port}/api/callback"),
        "client_secret_basic",
        3600,
    )
    .await;
    let store = dir.path().join("tokens");
    let config = BrokerConfig::default()
        .store("path", store.display().to_string())
        .tables(&upstream.connection_toml(
            "acme",
            &format!("client_secret = \"{}\"", upstream.client_secret),
        ))
        .write(dir.path());

    let mut login = cli(&config)
        .args(["login", "acme", "--no-browser", "--timeout", "60", "--port"])
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("login");
    // The address to open comes on stderr.
    let mut lines = BufReader::new(login.stderr.take().expect("stderr")).lines();
    let mut said = Vec::new();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("login prints the address in time")
            .expect("read")
            .unwrap_or_else(|| panic!("login ended early: {said:?}"));
        said.push(line.clone());
        if let Some(url) = line
            .trim()
            .strip_prefix(&format!("http://localhost:{port}/api/authorize/acme?key="))
        {
            break format!("http://localhost:{port}/api/authorize/acme?key={url}");
        }
    };
    assert!(
        said.iter()
            .any(|l| l.contains(&format!("http://localhost:{port}/api/callback"))),
        "says which redirect URI to register: {said:?}"
    );
    let browser = walk_to_callback(&url, &format!("http://localhost:{port}/api/callback")).await;
    let (status, page) = browser.finish().await;
    assert_eq!(status, 200, "{page}");
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    let output = tokio::time::timeout(Duration::from_secs(30), login.wait_with_output())
        .await
        .expect("login ends once the consent is back")
        .expect("login");
    let stderr = rest.await.expect("stderr").join("\n");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("acme: connected (oauth2)"), "{stdout}");

    // Stored in the configured store; the listener is gone.
    let record: Value =
        serde_json::from_slice(&std::fs::read(store.join("acme.json")).expect("the token file"))
            .expect("json");
    let refresh_token = record["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();
    let access_token = record["access_token"]
        .as_str()
        .expect("access token")
        .to_owned();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    for secret in [&refresh_token, &access_token] {
        assert!(!stdout.contains(secret.as_str()) && !stderr.contains(secret.as_str()));
    }

    // `token`: the cached token, as /api/refresh answers it; `--force` rotates it.
    let token = |args: &'static [&'static str]| {
        let mut command = cli(&config);
        command.arg("token").arg("acme").args(args);
        async move {
            let output = command.output().await.expect("token");
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            serde_json::from_slice::<Value>(&output.stdout).expect("JSON on stdout")
        }
    };
    let cached = token(&[]).await;
    assert_eq!(cached["access_token"], access_token.as_str());
    assert_eq!(cached["token_type"], "Bearer");
    assert!(cached["expires_in"].as_u64().expect("expires_in") > 3000);
    let refreshes = upstream.token_requests("refresh_token").await;
    let forced = token(&["--force"]).await;
    assert_ne!(forced["access_token"], cached["access_token"]);
    assert_eq!(
        upstream.token_requests("refresh_token").await,
        refreshes + 1
    );
    assert!(
        upstream
            .is_active(forced["access_token"].as_str().expect("token"))
            .await
    );
    let stored: Value =
        serde_json::from_slice(&std::fs::read(store.join("acme.json")).expect("file"))
            .expect("json");
    assert_ne!(
        stored["refresh_token"],
        refresh_token.as_str(),
        "rotation persisted"
    );
    assert_eq!(upstream.grants_revoked().await, 0);

    // `check` lists the connection and its state.
    let output = cli(&config).arg("check").output().await.expect("check");
    let listed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{listed}");
    assert!(listed.contains("acme: Connected"), "{listed}");

    // An unknown connection is a clear error.
    let output = cli(&config)
        .args(["token", "nope"])
        .output()
        .await
        .expect("token");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no connection `nope`"));
}
