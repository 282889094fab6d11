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

/// The strict upstream expecting `login`'s redirect URI on `port`, and `base` with its file
/// store under `dir` and two connections to the upstream, `acme` and `other`: the upstream,
/// the config file and the store folder.
async fn login_setup(
    dir: &std::path::Path,
    port: u16,
    base: BrokerConfig,
) -> (Upstream, std::path::PathBuf, std::path::PathBuf) {
    // What an admin registers at the provider for `login`.
    let upstream = Upstream::start(
        &format!("http://127.0.0.1:{port}/api/callback"),
        "client_secret_basic",
        3600,
    )
    .await;
    let store = dir.join("tokens");
    let secret = format!("client_secret = \"{}\"", upstream.client_secret);
    let config = base
        .store("path", store.display().to_string())
        .tables(&upstream.connection_toml("acme", &secret))
        .tables(&upstream.connection_toml("other", &secret))
        .write(dir);
    (upstream, config, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_a_refresh_token_and_token_serves_it_like_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let (upstream, config, store) = login_setup(dir.path(), port, BrokerConfig::default()).await;

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
            .strip_prefix(&format!("http://127.0.0.1:{port}/api/authorize/acme?key="))
        {
            break format!("http://127.0.0.1:{port}/api/authorize/acme?key={url}");
        }
    };
    assert!(
        said.iter()
            .any(|l| l.contains(&format!("http://127.0.0.1:{port}/api/callback"))),
        "says which redirect URI to register: {said:?}"
    );
    let browser = walk_to_callback(&url, &format!("http://127.0.0.1:{port}/api/callback")).await;
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

/// `login`'s key admits one browser, once, to one connection's consent, and is seen by no
/// other process: not as `X-API-Key`, not on another route, not twice, not as a session on
/// an instance sharing the deployment's `state_secret`; the browser launcher gets an
/// owner-only page, never the key in its arguments; the address names 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_one_time_key_opens_one_consent_once_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let deployment = BrokerConfig::default().top("state_secret", crate::support::STATE_SECRET);
    let (_upstream, config, _) = login_setup(dir.path(), port, deployment).await;
    // A desktop whose browser launcher records what it was given.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin");
    let seen = dir.path().join("launcher");
    let launcher = bin.join("xdg-open");
    std::fs::write(
        &launcher,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{args}.tmp' && cat \"$1\" > '{page}' && mv '{args}.tmp' '{args}'\n",
            args = seen.with_extension("args").display(),
            page = seen.with_extension("page").display(),
        ),
    )
    .expect("launcher");
    std::fs::set_permissions(
        &launcher,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut login = cli(&config)
        .env("PATH", path)
        .env("DISPLAY", ":99")
        .args(["login", "acme", "--timeout", "60", "--port"])
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("login");
    let mut lines = BufReader::new(login.stderr.take().expect("stderr")).lines();
    let prefix = format!("http://127.0.0.1:{port}/api/authorize/acme?key=");
    let key = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("login prints the address in time")
            .expect("read")
            .expect("login ended early");
        if let Some(key) = line.trim().strip_prefix(&prefix) {
            break key.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // The launcher got a page's path; the page holds the address; no argument holds the key.
    let args_file = seen.with_extension("args");
    for _ in 0..100 {
        if args_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let args = std::fs::read_to_string(&args_file).expect("the launcher was started");
    assert!(
        !args.contains(&key),
        "the key is in the launcher's arguments: {args}"
    );
    let page = std::fs::read_to_string(seen.with_extension("page")).expect("the page");
    assert!(page.contains(&format!("{prefix}{key}")), "{page}");
    let page_path = std::path::Path::new(args.trim());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(page_path)
            .expect("the page")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the page is readable by others: {mode:o}");

    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let get = |path: String, key_header: bool| {
        let mut request = http.get(format!("{base}{path}"));
        if key_header {
            request = request.header("X-API-Key", key.as_str());
        }
        async move { request.send().await.expect("request") }
    };
    // Not an admin key: refused as X-API-Key, where the consent would otherwise start.
    assert_eq!(get("/api/authorize/acme".into(), true).await.status(), 401);
    // Every other route is absent.
    for path in [
        "/api/refresh/acme",
        "/api/connections",
        "/api/health",
        "/api/proxy/acme/x",
        "/",
    ] {
        let response = get(path.into(), true).await;
        assert_eq!(response.status(), 404, "{path}");
    }
    // Another connection's consent is not this login's.
    let other = get(format!("/api/authorize/other?key={key}"), false).await;
    assert_eq!(other.status(), 404);
    // One exchange, on its connection.
    let exchanged = get(format!("/api/authorize/acme?key={key}"), false).await;
    assert_eq!(exchanged.status(), 200);
    let session = exchanged
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let again = get(format!("/api/authorize/acme?key={key}"), false).await;
    assert_eq!(again.status(), 401, "a second exchange");
    // The session opens this login's consent …
    let consent = http
        .get(format!("{base}/api/authorize/acme"))
        .header("Cookie", &session)
        .send()
        .await
        .expect("authorize");
    assert_eq!(consent.status(), 302);

    // … and nothing on an instance that shares the deployment's state_secret.
    let instance_port = free_port();
    let instance = crate::support::BrokerProcess::start_on(
        instance_port,
        &config,
        &[],
        &dir.path().join("instance.log"),
    )
    .await;
    let status_page = http
        .get(format!("{}/api/connections", instance.base))
        .header("Cookie", &session)
        .header("Accept", "application/json")
        .send()
        .await
        .expect("status");
    assert_eq!(status_page.status(), 401);
    let refused = http
        .get(format!("{}/api/refresh/acme", instance.base))
        .header("X-API-Key", key.as_str())
        .send()
        .await
        .expect("refresh");
    assert_eq!(refused.status(), 401);
    login.kill().await.expect("stop login");
}
