//! Who may take which connection's tokens: a connection's `callers` (key names and Entra
//! object ids) are the only callers besides admins that get its tokens — on `/api/refresh`
//! (the cached fast path and the router's path alike), with `?tenant=`, and through its
//! proxy — and `check` says who they are. The real binary, the strict upstream, the Entra
//! tenant double and the provider API double.

use serde_json::Value;

use crate::support::api_double::ApiDouble;
use crate::support::azure_doubles::{Azure, VAULT_HOST};
use crate::support::entra::{claims_from, entra_table, sign};
use crate::support::{consent, free_port, BrokerConfig, BrokerProcess, Upstream, ADMIN_KEY};

pub(crate) const FINANCE_KEY: &str = "finance-caller-key-0123456789";
pub(crate) const OPS_KEY: &str = "ops-caller-key-0123456789";
/// Data Factory's managed identity: listed in the connection's `callers`.
pub(crate) const ADF: &str = "6a1f2c3d-0000-4000-8000-00000000adf1";
/// Another managed identity the broker admits, but not for this connection.
pub(crate) const OTHER: &str = "6a1f2c3d-0000-4000-8000-0000000a0e01";

pub(crate) enum Credential<'a> {
    Key(&'a str),
    Bearer(String),
}

/// The binary with `acme` consented, scoped to `finance` and ADF; `ops` and OTHER are
/// callers the broker admits but `acme` does not serve.
pub(crate) struct Setup {
    pub(crate) azure: Azure,
    pub(crate) api: ApiDouble,
    pub(crate) broker: BrokerProcess,
    pub(crate) base: String,
    pub(crate) config: std::path::PathBuf,
    pub(crate) http: reqwest::Client,
    pub(crate) upstream: Upstream,
    pub(crate) dir: tempfile::TempDir,
}

impl Setup {
    /// With `env` besides the doubles' own.
    pub(crate) async fn start(extra_env: &[(&str, String)]) -> Self {
        let azure = Azure::start().await;
        let api = ApiDouble::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let upstream =
            Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
        let mut keys = toml::Table::new();
        keys.insert("finance".into(), FINANCE_KEY.into());
        keys.insert("ops".into(), OPS_KEY.into());
        let config = BrokerConfig::default()
            .auth("api_keys", keys)
            .auth_table(&entra_table(&azure.login_authority, &[ADF, OTHER], &[]))
            .file_store(&dir.path().join("tokens"))
            .tables(&upstream.connection_toml(
                "acme",
                &format!(
                    "client_secret = \"{}\"\napi_base_url = \"{}\"\ncallers = [\"finance\", \"{ADF}\"]",
                    upstream.client_secret, api.base
                ),
            ))
            .write(dir.path());
        let mut env = vec![
            ("SSL_CERT_FILE", azure.pki.ca_file.display().to_string()),
            ("BROKER_RESOLVE", format!("{VAULT_HOST}=127.0.0.1")),
        ];
        env.extend(extra_env.iter().cloned());
        let broker =
            BrokerProcess::start_on(port, &config, &env, &dir.path().join("broker.log")).await;
        consent(&base, "acme").await;
        Setup {
            azure,
            api,
            broker,
            base,
            config,
            http: reqwest::Client::new(),
            upstream,
            dir,
        }
    }

    pub(crate) fn bearer(&self, oid: &str) -> Credential<'static> {
        Credential::Bearer(sign(&claims_from(&self.azure.login_authority, oid)))
    }

    /// Status and JSON body (`Null` when not JSON) of `method path` with `credential`.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        credential: &Credential<'_>,
    ) -> (u16, Value) {
        let request = self.http.request(
            method.parse().expect("method"),
            format!("{}{path}", self.base),
        );
        let request = match credential {
            Credential::Key(key) => request.header("X-API-Key", *key),
            Credential::Bearer(token) => request.bearer_auth(token),
        };
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Asserts a refusal of `who` for this connection that names `who` and not the list.
    pub(crate) async fn refused(
        &self,
        method: &str,
        path: &str,
        credential: &Credential<'_>,
        who: &str,
    ) {
        let (status, body) = self.call(method, path, credential).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert_eq!(body["error"], "caller_not_allowed", "{body}");
        let message = body["error_description"].as_str().unwrap_or_default();
        assert!(message.contains(who), "names the caller: {message}");
        for listed in ["finance", ADF] {
            assert!(!message.contains(listed), "never the list: {message}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_connections_callers_and_admins_take_its_tokens() {
    let setup = Setup::start(&[]).await;
    let finance = Credential::Key(FINANCE_KEY);
    let ops = Credential::Key(OPS_KEY);
    let admin = Credential::Key(ADMIN_KEY);
    let adf = setup.bearer(ADF);
    let other = setup.bearer(OTHER);

    // The cached fast path: a plain GET of a cached token.
    for (who, credential) in [("finance", &finance), ("adf", &adf), ("admin", &admin)] {
        let (status, body) = setup.call("GET", "/api/refresh/acme", credential).await;
        assert_eq!(status, 200, "{who}: {body}");
        assert!(body["access_token"].is_string(), "{who}: {body}");
    }
    setup
        .refused("GET", "/api/refresh/acme", &ops, "`ops`")
        .await;
    setup
        .refused("GET", "/api/refresh/acme", &other, OTHER)
        .await;
    // The router's path (a POST), and `?tenant=`: the same rule before anything else.
    setup
        .refused("POST", "/api/refresh/acme", &ops, "`ops`")
        .await;
    setup
        .refused("GET", "/api/refresh/acme?tenant=x", &ops, "`ops`")
        .await;
    setup
        .refused("GET", "/api/refresh/acme?tenant=x", &other, OTHER)
        .await;
    let (status, body) = setup.call("POST", "/api/refresh/acme", &finance).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = setup
        .call("GET", "/api/refresh/acme?tenant=x", &finance)
        .await;
    assert_eq!(
        (status, &body["error"]),
        (404, &"unknown_tenant".into()),
        "{body}"
    );

    // The proxy: the refused never reach the API.
    let page = "/api/proxy/acme/invoices?page=1";
    setup.refused("GET", page, &ops, "`ops`").await;
    setup.refused("GET", page, &other, OTHER).await;
    assert!(
        setup.api.seen().is_empty(),
        "a refused caller reached the API"
    );
    for credential in [&finance, &adf] {
        let (status, _) = setup.call("GET", page, credential).await;
        assert_eq!(status, 200);
    }
    assert_eq!(setup.api.seen().len(), 2);

    // `check` says who may take it.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-broker"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&setup.config)
        .arg("check")
        .output()
        .await
        .expect("check");
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("acme: taken by finance, {ADF} (and admins)")),
        "{printed}"
    );
    let mut broker = setup.broker;
    broker.stop().await;
}
