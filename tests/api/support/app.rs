//! The broker in process, on its own port and token directory, with its own upstream.

use std::path::PathBuf;
use std::sync::Arc;

use reqwest::redirect::Policy;
use serde_json::Value;
use token_broker::{Application, Config};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

/// How a test wants its broker and upstream.
pub struct Options {
    pub auth_method: &'static str,
    pub access_token_ttl: u64,
    /// Extra TOML appended to the generated config.
    pub extra_config: String,
    /// `lock.failure_backoff`: seconds every caller gets a failed refresh's outcome.
    pub failure_backoff: u64,
    /// Extra lines in the `acme` connection's table.
    pub acme_extra: String,
    /// `local_mode = true`: a trial on this machine (e.g. a provider naming a loopback API).
    pub local_mode: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            auth_method: "client_secret_basic",
            access_token_ttl: 3600,
            extra_config: String::new(),
            failure_backoff: 1,
            acme_extra: String::new(),
            local_mode: false,
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
        test_log();
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
        let mut deny = upstream.connection_settings();
        deny.extend(settings(&[
            ("client_secret", &upstream.client_secret),
            ("client_auth", client_auth),
        ]));
        deny.push((
            "scopes",
            toml::Value::from(vec!["openid", "offline_access"]),
        ));
        let deny = connection_table("deny", &deny, "authorize_params = { test_deny = \"1\" }");
        let config_text = BrokerConfig::default()
            .top("local_mode", options.local_mode)
            .top("public_url", base.clone())
            .top("state_secret", STATE_SECRET)
            .file_store(&store_dir)
            .lock("failure_backoff", options.failure_backoff as i64)
            .tables(&upstream.connection_toml(
                "acme",
                &format!(
                    "client_secret = \"{}\"\nclient_auth = \"{client_auth}\"\n{}",
                    upstream.client_secret, options.acme_extra
                ),
            ))
            .tables(&deny)
            .tables(
                &options
                    .extra_config
                    .replace("${UPSTREAM}", &upstream.url)
                    .replace("${SECRET}", &upstream.client_secret),
            )
            .render();
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

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some((tx, _)) = self.server.take() {
            let _ = tx.send(());
        }
    }
}

/// A broker built in process from a configuration text (parsed without an environment) on a
/// free loopback port, for tests that need a configuration `TestApp` does not make (other
/// admin keys, an issuer to discover); stopped when dropped.
pub struct ConfiguredBroker {
    pub base: String,
    stop: Option<oneshot::Sender<()>>,
}

impl ConfiguredBroker {
    /// Startup must succeed (one connection's trouble never stops the broker).
    pub async fn serve(text: &str) -> Self {
        test_log();
        let config = Config::parse(text, &|_| None).expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let app = Application::build(config, listener)
            .await
            .expect("startup succeeds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            base,
            stop: Some(stop),
        }
    }
}

impl Drop for ConfiguredBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
