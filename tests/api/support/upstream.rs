//! The `oidc-provider` test server (tests/upstream/server.js): strict PKCE, refresh tokens
//! rotating on every use, reuse revoking the grant; its test endpoints inject faults.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::*;

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
        let mut settings = self.connection_settings();
        settings.push((
            "scopes",
            toml::Value::from(vec!["openid", "offline_access", "api:read"]),
        ));
        super::connection_table(name, &settings, extra)
    }

    /// A generic connection's endpoints and client id at this upstream.
    pub fn connection_settings(&self) -> Vec<(&'static str, toml::Value)> {
        super::settings(&[
            ("provider", "oauth2"),
            ("authorize_url", &format!("{}/auth", self.url)),
            ("token_url", &format!("{}/token", self.url)),
            ("client_id", &self.client_id),
        ])
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
