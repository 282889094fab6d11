//! Test harness: a real `oidc-provider` upstream (Node) and a real broker per test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::header::LOCATION;
use reqwest::redirect::Policy;
use serde_json::{json, Value};
use token_broker::{Application, Config};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::Url;

pub const CALLER_KEY: &str = "test-caller-key-0123456789";
pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const STATE_SECRET: &str = "test-state-secret-0123456789abcdef";

/// A random string, for secrets that the leak tests look for.
pub fn random(prefix: &str) -> String {
    let n: u128 = rand::thread_rng().gen();
    format!("{prefix}-{n:032x}")
}

/// A port that was free a moment ago (for the tests that start the binary).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The `oidc-provider` test server (tests/upstream/server.js), killed on drop.
pub struct Upstream {
    pub url: String,
    pub client_id: String,
    pub client_secret: String,
    auth_method: String,
    child: Child,
    _stdin: ChildStdin,
    http: reqwest::Client,
}

impl Upstream {
    /// Starts an upstream with one client whose redirect URI is `redirect_uri`.
    pub async fn start(redirect_uri: &str, auth_method: &str, access_token_ttl: u64) -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/upstream");
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "the test upstream is not installed: run `npm ci --prefix tests/upstream` (scripts/test does)"
        );
        let client_id = "broker".to_owned();
        let client_secret = random("client-secret");
        let config = json!({
            "clients": [{
                "client_id": client_id,
                "client_secret": client_secret,
                "redirect_uris": [redirect_uri],
                "token_endpoint_auth_method": auth_method,
            }],
            "access_token_ttl": access_token_ttl,
        });
        let mut child = Command::new("node")
            .arg(dir.join("server.js"))
            .env("UPSTREAM_CONFIG", config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start node (is Node.js installed?)");
        let stdin = child.stdin.take().expect("stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read upstream stdout") {
                if let Some(url) = line.strip_prefix("LISTENING ") {
                    return url.trim().to_owned();
                }
            }
            panic!("the test upstream exited before listening");
        })
        .await
        .expect("the test upstream did not start within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            url,
            client_id,
            client_secret,
            auth_method: auth_method.to_owned(),
            child,
            _stdin: stdin,
            http: reqwest::Client::new(),
        }
    }

    /// A `[connections.{name}]` table for a generic connection to this upstream; `extra`
    /// adds lines (the client secret, store options, ...).
    pub fn connection_toml(&self, name: &str, extra: &str) -> String {
        format!(
            r#"
[connections.{name}]
provider = "oauth2"
authorize_url = "{up}/auth"
token_url = "{up}/token"
client_id = "{client_id}"
scopes = ["openid", "offline_access", "api:read"]
{extra}
"#,
            up = self.url,
            client_id = self.client_id,
        )
    }

    pub async fn stats(&self) -> Value {
        self.http
            .get(format!("{}/test/stats", self.url))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }

    /// Number of token requests of one grant type so far.
    pub async fn token_requests(&self, grant_type: &str) -> u64 {
        self.stats().await["token_requests"][grant_type]
            .as_u64()
            .unwrap_or(0)
    }

    pub async fn grants_revoked(&self) -> u64 {
        self.stats().await["grants_revoked"].as_u64().unwrap_or(0)
    }

    /// The next `count` token requests get this answer instead of being processed.
    pub async fn fail_next(&self, count: u32, status: u16, body: &str, content_type: &str) {
        let response = self
            .http
            .post(format!("{}/test/fail-next", self.url))
            .json(&json!({"count": count, "status": status, "body": body, "content_type": content_type}))
            .send()
            .await
            .expect("fail-next");
        assert!(response.status().is_success());
    }

    /// Every token request waits this long first (to make concurrent requests overlap).
    pub async fn delay(&self, ms: u64) {
        let response = self
            .http
            .post(format!("{}/test/delay", self.url))
            .json(&json!({ "ms": ms }))
            .send()
            .await
            .expect("delay");
        assert!(response.status().is_success());
    }

    /// Whether the provider's introspection endpoint says `token` is active.
    pub async fn is_active(&self, token: &str) -> bool {
        let request = self.http.post(format!("{}/token/introspection", self.url));
        let request = if self.auth_method == "client_secret_post" {
            request.form(&[
                ("token", token),
                ("client_id", &self.client_id),
                ("client_secret", &self.client_secret),
            ])
        } else {
            request
                .basic_auth(&self.client_id, Some(&self.client_secret))
                .form(&[("token", token)])
        };
        let response: Value = request
            .send()
            .await
            .expect("introspection")
            .json()
            .await
            .expect("introspection json");
        response["active"].as_bool().expect("active is a boolean")
    }

    /// Uses a refresh token directly, as another client would.
    pub async fn use_refresh_token(&self, refresh_token: &str) -> reqwest::StatusCode {
        self.http
            .post(format!("{}/token", self.url))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .expect("token request")
            .status()
    }

    /// Every secret the upstream has issued or received.
    pub async fn secrets_seen(&self) -> Vec<String> {
        let stats = self.stats().await;
        let mut secrets = vec![self.client_secret.clone()];
        for kind in ["codes", "code_verifiers", "refresh_tokens", "access_tokens"] {
            for value in stats["seen"][kind].as_array().expect("seen list") {
                secrets.push(value.as_str().expect("string").to_owned());
            }
        }
        secrets
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Waits out the back-off a failed refresh answer announces in `Retry-After` (which it
/// must carry).
pub async fn wait_retry_after(response: &reqwest::Response) {
    let secs: u64 = response
        .headers()
        .get("retry-after")
        .expect("a failed refresh says when to try again")
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
}

/// How a test wants its broker and upstream.
pub struct Options {
    pub auth_method: &'static str,
    pub access_token_ttl: u64,
    /// Extra TOML appended to the generated config.
    pub extra_config: String,
    /// `lock.failure_backoff`: seconds every caller gets a failed refresh's outcome.
    pub failure_backoff: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            auth_method: "client_secret_basic",
            access_token_ttl: 3600,
            extra_config: String::new(),
            failure_backoff: 1,
        }
    }
}

/// One broker (run in-process, on its own port and token directory) and its upstream.
pub struct TestApp {
    pub base: String,
    pub port: u16,
    pub store_dir: PathBuf,
    pub upstream: Upstream,
    /// A client without cookies or redirects, for API calls.
    pub http: reqwest::Client,
    config_text: String,
    server: Option<(oneshot::Sender<()>, JoinHandle<std::io::Result<()>>)>,
    _tmp: Arc<tempfile::TempDir>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let base = format!("http://127.0.0.1:{port}");
        let upstream = Upstream::start(
            &format!("{base}/api/callback"),
            options.auth_method,
            options.access_token_ttl,
        )
        .await;
        let tmp = Arc::new(tempfile::tempdir().expect("tempdir"));
        let store_dir = tmp.path().join("tokens");
        let client_auth = if options.auth_method == "client_secret_post" {
            "post"
        } else {
            "basic"
        };
        let config_text = format!(
            r#"
public_url = "{base}"
state_secret = "{STATE_SECRET}"

[auth]
api_keys = ["{CALLER_KEY}"]
admin_keys = ["{ADMIN_KEY}"]

[store]
kind = "file"
path = "{store}"

[lock]
failure_backoff = {failure_backoff}

{acme}
[connections.deny]
provider = "oauth2"
authorize_url = "{up}/auth"
token_url = "{up}/token"
client_id = "{client_id}"
client_secret = "{secret}"
client_auth = "{client_auth}"
scopes = ["openid", "offline_access"]
authorize_params = {{ test_deny = "1" }}
{extra}
"#,
            store = store_dir.display(),
            failure_backoff = options.failure_backoff,
            acme = upstream.connection_toml(
                "acme",
                &format!(
                    "client_secret = \"{}\"\nclient_auth = \"{client_auth}\"",
                    upstream.client_secret
                )
            ),
            up = upstream.url,
            client_id = upstream.client_id,
            secret = upstream.client_secret,
            extra = options
                .extra_config
                .replace("${UPSTREAM}", &upstream.url)
                .replace("${SECRET}", &upstream.client_secret),
        );
        let mut app = Self {
            base,
            port,
            store_dir,
            upstream,
            http: reqwest::Client::builder()
                .redirect(Policy::none())
                .build()
                .expect("client"),
            config_text,
            server: None,
            _tmp: tmp,
        };
        app.start(listener).await;
        app
    }

    async fn start(&mut self, listener: TcpListener) {
        let config = Config::parse(&self.config_text, &|name| std::env::var(name).ok())
            .expect("test config is valid");
        let app = Application::build(config, listener)
            .await
            .expect("build app");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        }));
        self.server = Some((tx, handle));
    }

    /// Stops the broker (the upstream keeps running).
    pub async fn stop(&mut self) {
        if let Some((tx, handle)) = self.server.take() {
            let _ = tx.send(());
            handle.await.expect("join").expect("server ran");
        }
    }

    /// Stops the broker and starts a fresh one on the same port and token directory.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("rebind");
        self.start(listener).await;
    }

    /// `GET /api/refresh/{connection}{query}` with the caller key.
    pub async fn refresh(&self, connection: &str, query: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/api/refresh/{connection}{query}", self.base))
            .header("X-API-Key", CALLER_KEY)
            .send()
            .await
            .expect("refresh request")
    }

    /// Like [`TestApp::refresh`], expecting 200 and returning the body.
    pub async fn token(&self, connection: &str, query: &str) -> Value {
        let response = self.refresh(connection, query).await;
        let status = response.status();
        let body: Value = response.json().await.expect("json body");
        assert_eq!(status, 200, "refresh failed: {body}");
        body
    }

    /// The stored record of a connection, as JSON.
    pub fn stored(&self, connection: &str) -> Option<Value> {
        let path = self.store_dir.join(format!("{connection}.json"));
        let bytes = std::fs::read(path).ok()?;
        Some(serde_json::from_slice(&bytes).expect("stored record is JSON"))
    }

    pub fn stored_refresh_token(&self, connection: &str) -> String {
        self.stored(connection).expect("a stored record")["refresh_token"]
            .as_str()
            .expect("a refresh token")
            .to_owned()
    }

    /// Rewrites the stored record (the broker must be stopped).
    pub fn edit_stored(&self, connection: &str, edit: impl FnOnce(&mut Value)) {
        assert!(
            self.server.is_none(),
            "stop the broker before editing its store"
        );
        let path = self.store_dir.join(format!("{connection}.json"));
        let mut record = self.stored(connection).expect("a stored record");
        edit(&mut record);
        std::fs::write(path, serde_json::to_vec(&record).expect("encode")).expect("write");
    }

    /// Drives the consent flow like a browser, stopping before the broker's callback.
    pub async fn consent_until_callback(&self, connection: &str) -> Browser {
        consent_until_callback(&self.base, connection).await
    }

    /// The whole consent flow; asserts the broker shows "Connected".
    pub async fn consent(&self, connection: &str) {
        consent(&self.base, connection).await;
    }
}

/// Drives the consent flow like a browser against the broker at `base`, stopping before
/// the broker's callback.
pub async fn consent_until_callback(base: &str, connection: &str) -> Browser {
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .build()
        .expect("browser");
    let mut url = format!("{base}/api/authorize/{connection}?key={ADMIN_KEY}");
    let callback = format!("{base}/api/callback");
    for _ in 0..20 {
        let response = client.get(&url).send().await.expect("browser request");
        let status = response.status();
        if !status.is_redirection() {
            let body = response.text().await.unwrap_or_default();
            panic!("consent flow stopped at {url} with {status}: {body}");
        }
        let location = response
            .headers()
            .get(LOCATION)
            .expect("redirect location")
            .to_str()
            .expect("ascii location");
        url = Url::parse(&url)
            .expect("url")
            .join(location)
            .expect("join")
            .to_string();
        if url.starts_with(&callback) {
            return Browser {
                client,
                callback_url: url,
            };
        }
    }
    panic!("consent flow did not reach the callback in 20 redirects");
}

/// The whole consent flow against the broker at `base`; asserts "Connected".
pub async fn consent(base: &str, connection: &str) {
    let browser = consent_until_callback(base, connection).await;
    let (status, body) = browser.finish().await;
    assert_eq!(status, 200, "callback failed: {body}");
    assert!(body.contains("Connected"), "{body}");
}

/// The real `token-broker` binary, started as a deployment would start it. Killed on drop.
pub struct BrokerProcess {
    pub port: u16,
    pub base: String,
    config: PathBuf,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
}

impl BrokerProcess {
    /// Starts the binary with `config` on `port`, logging (appending) to `log_path`.
    pub async fn start_on(
        port: u16,
        config: &Path,
        env: &[(&str, String)],
        log_path: &Path,
    ) -> Self {
        let mut process = Self {
            port,
            base: format!("http://127.0.0.1:{port}"),
            config: config.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            log_path: log_path.to_owned(),
            child: None,
        };
        process.spawn().await;
        process
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_token-broker"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BROKER_CONFIG", &self.config)
            .env("PORT", self.port.to_string())
            .env("BROKER_BIND", "127.0.0.1")
            .env("BROKER_PUBLIC_URL", &self.base)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = command.spawn().expect("start the broker binary");
        wait_ready(self.port, &mut child, &self.log_path).await;
        self.child = Some(child);
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the process the way a platform does (SIGTERM) and waits for it to exit.
    pub async fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().expect("running").to_string();
            let status = Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .await
                .expect("kill");
            assert!(status.success());
            let exited = tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .expect("the broker did not exit within 20 s of SIGTERM")
                .expect("wait");
            assert!(exited.success(), "exit status {exited}");
        }
    }

    /// Stops the process and starts a new one with the same config, port and environment.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// Waits until `GET /` answers, as the Functions host does.
pub async fn wait_ready(port: u16, child: &mut Child, log_path: &Path) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(response) = client.get(format!("http://127.0.0.1:{port}/")).send().await {
            assert_eq!(response.status(), 200);
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let logs = std::fs::read_to_string(log_path).unwrap_or_default();
            panic!("the broker exited early ({status}):\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the broker did not answer GET / within 15 s");
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some((tx, _)) = self.server.take() {
            let _ = tx.send(());
        }
    }
}

/// A browser that went through consent and holds the provider's redirect to the callback.
pub struct Browser {
    pub client: reqwest::Client,
    pub callback_url: String,
}

impl Browser {
    /// Follows the redirect to the broker's callback; returns status and page.
    pub async fn finish(&self) -> (u16, String) {
        let response = self
            .client
            .get(&self.callback_url)
            .send()
            .await
            .expect("callback request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("page"))
    }
}
