//! Faithful doubles of the two Azure endpoints that have no emulator, speaking their REST
//! contracts:
//!
//! - **Key Vault secrets** (api-version 7.x / 2025-07-01), over HTTPS with a private CA: the
//!   bearer challenge (401 + `WWW-Authenticate: Bearer authorization="…", resource="…"` to a
//!   request without a token), `api-version` required, a new version on every PUT, 404
//!   `SecretNotFound`, the name (1–127 of `0-9a-zA-Z-`) and size (25 KB) rules, and
//!   injectable 429 (with `Retry-After`) and 503.
//! - **App Service managed identity** (`IDENTITY_ENDPOINT`, api-version 2019-08-01): `GET
//!   ?api-version&resource` with the `X-IDENTITY-HEADER` secret, answering
//!   `{access_token, expires_on, resource, token_type}`. The tokens are JWT-shaped as Entra
//!   ID's are (issuer, audience = the resource, lifetime), so Azurite in `--oauth basic` mode
//!   accepts those issued for `https://storage.azure.com` (see `azurite.rs`).
//!
//! The vault accepts only tokens the identity endpoint issued for the vault resource.
//! `tests/keyvault/sdk_check.py` drives both with Microsoft's Python SDK to show they behave
//! as the real services do for an independent official client.
//!
//! The Key Vault REST contract is in `vault`, Entra ID's sign-in (authorize and token
//! endpoints) in `sign_in`; this file holds the certificates, the shared state, the
//! identity endpoint and the Entra key set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use axum_server::tls_rustls::RustlsConfig;
use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

mod sign_in;
mod vault;
pub use sign_in::{ClientCredential, Forgery, SignInDouble, User};
use vault::{get_latest, get_version, kv_error, set_secret};

/// The vault's host name. The Azure SDK requires the vault host to end with
/// `.{challenge resource host}`; nothing edits `/etc/hosts`: the broker resolves it through
/// `BROKER_RESOLVE` (see [`Azure::env`]), test clients through `reqwest`'s `resolve`.
pub const VAULT_HOST: &str = "tb-test.vault.azure.net";
/// The vault name the Python SDK sees, with no port: it compares host *and port* with the
/// challenge resource, as real vaults are on 443. Its connections are redirected to the
/// double's high port inside the Python process (`TEST_VAULT_CONNECT`).
pub const VAULT_HOST_443: &str = "tb-sdk.vault.azure.net";
pub const VAULT_RESOURCE: &str = "https://vault.azure.net";
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const MAX_VALUE_BYTES: usize = 25 * 1024;

/// A private CA and a server certificate for the vault host, as PEM files.
pub struct Pki {
    pub ca_file: PathBuf,
    cert_pem: String,
    key_pem: String,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    _dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Token Broker test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca cert");
        let (cert_pem, key_pem) = issue(&ca, &[VAULT_HOST, VAULT_HOST_443]);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write ca");
        Self {
            ca_file,
            cert_pem,
            key_pem,
            ca,
            _dir: dir,
        }
    }

    /// A server certificate issued by this CA for `names` (DNS names or IP addresses, e.g.
    /// `127.0.0.1`), written with its key into `dir` as `server-cert.pem` and
    /// `server-key.pem`; returns (certificate file, key file).
    pub fn issue_server_files(&self, names: &[&str], dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let (cert_pem, key_pem) = issue(&self.ca, names);
        let cert_file = dir.join("server-cert.pem");
        let key_file = dir.join("server-key.pem");
        std::fs::write(&cert_file, cert_pem).expect("write server certificate");
        std::fs::write(&key_file, key_pem).expect("write server key");
        (cert_file, key_file)
    }
}

/// A leaf certificate for `names` (the first is also the common name), signed by `ca`, and
/// its key, as PEM.
fn issue(ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>, names: &[&str]) -> (String, String) {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names.clone()).expect("leaf params");
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("server", String::as_str),
    );
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, ca).expect("leaf cert");
    (cert.pem(), key.serialize_pem())
}

/// Counters and fault switches shared by the doubles and the tests.
#[derive(Default)]
pub struct Shared {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Lower-cased secret name → versions, oldest first (names are case-insensitive).
    secrets: HashMap<String, Vec<Version>>,
    /// Bearer tokens issued by the identity double, with their resource.
    tokens: HashMap<String, String>,
    requests: u64,
    /// Operation → count ("get", "set", "challenge", "throttled", "failed", "identity").
    ops: HashMap<&'static str, u64>,
    fail_writes: u32,
    /// Lower-cased names of secrets the identity may not write (403).
    forbidden_writes: std::collections::HashSet<String>,
    throttle_every: Option<u64>,
    /// `client_id` of the last identity request (a user-assigned identity), if any.
    identity_client_id: Option<String>,
    /// Authenticated reads wait this long first.
    read_delay: std::time::Duration,
}

#[derive(Clone)]
struct Version {
    id: String,
    value: String,
    content_type: Option<String>,
    tags: Value,
    created: i64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Authenticated secret reads wait `ms` first (a slow vault).
    pub fn delay_reads(&self, ms: u64) {
        self.lock().read_delay = std::time::Duration::from_millis(ms);
    }

    /// The next `n` PUTs fail with 503.
    pub fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    /// Writes to secret `name` are refused with 403 (a role assignment scoped to other
    /// secrets), until [`Shared::allow_writes`].
    pub fn forbid_writes(&self, name: &str) {
        self.lock()
            .forbidden_writes
            .insert(name.to_ascii_lowercase());
    }

    pub fn allow_writes(&self, name: &str) {
        self.lock()
            .forbidden_writes
            .remove(&name.to_ascii_lowercase());
    }

    /// Every `k`-th vault request (counting all) is answered 429 with `Retry-After: 1`.
    pub fn throttle_every(&self, k: Option<u64>) {
        self.lock().throttle_every = k;
    }

    pub fn count(&self, op: &str) -> u64 {
        self.lock().ops.get(op).copied().unwrap_or(0)
    }

    /// Vault operations that reached the secret logic (reads and writes).
    pub fn vault_operations(&self) -> u64 {
        self.count("get") + self.count("set")
    }

    /// The latest value of a secret.
    pub fn value(&self, name: &str) -> Option<String> {
        self.lock()
            .secrets
            .get(&name.to_ascii_lowercase())
            .and_then(|versions| versions.last())
            .map(|v| v.value.clone())
    }

    pub fn versions(&self, name: &str) -> usize {
        self.lock()
            .secrets
            .get(&name.to_ascii_lowercase())
            .map_or(0, Vec::len)
    }

    pub fn content_type(&self, name: &str) -> Option<String> {
        self.lock()
            .secrets
            .get(&name.to_ascii_lowercase())
            .and_then(|versions| versions.last())
            .and_then(|v| v.content_type.clone())
    }

    /// The user-assigned identity (client id) the last identity request asked for.
    pub fn identity_client_id(&self) -> Option<String> {
        self.lock().identity_client_id.clone()
    }

    /// Every bearer token the identity double issued.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().tokens.keys().cloned().collect()
    }

    /// Puts a secret directly (as an admin would in the portal).
    pub fn put(&self, name: &str, value: &str) {
        let version = new_version(value.to_owned(), None, json!({}));
        self.lock()
            .secrets
            .entry(name.to_ascii_lowercase())
            .or_default()
            .push(version);
    }
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

fn new_version(value: String, content_type: Option<String>, tags: Value) -> Version {
    Version {
        id: random_hex(16),
        value,
        content_type,
        tags,
        created: chrono::Utc::now().timestamp(),
    }
}

/// Both doubles, running until dropped.
pub struct Azure {
    pub pki: Pki,
    pub shared: Arc<Shared>,
    /// `https://tb-test.vault.azure.net:{port}`
    pub vault_url: String,
    /// The App Service `IDENTITY_ENDPOINT`.
    pub identity_endpoint: String,
    /// The Entra ID authority double (`{login_authority}/{tenant}/discovery/v2.0/keys`).
    pub login_authority: String,
    pub identity_header: String,
    /// Entra ID's sign-in for the broker's app registration, on the login authority.
    pub sign_in: SignInDouble,
    vault_connect: String,
    handles: Vec<axum_server::Handle<SocketAddr>>,
}

impl Azure {
    /// The doubles on free ports.
    pub async fn start() -> Self {
        Self::start_on(false).await
    }

    /// The vault double addressed as `https://tb-sdk.vault.azure.net` (port 443, as the
    /// Python SDK wants); it listens on a free high port given by [`Azure::vault_connect`].
    pub async fn start_for_python_sdk() -> Self {
        Self::start_on(true).await
    }

    /// Where the vault double really listens (`127.0.0.1:{port}`).
    pub fn vault_connect(&self) -> String {
        self.vault_connect.clone()
    }

    async fn start_on(standard_port: bool) -> Self {
        let pki = Pki::new();
        let shared = Arc::new(Shared::default());
        let identity_header = format!("identity-header-{}", random_hex(8));

        let vault_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind vault");
        let host = if standard_port {
            VAULT_HOST_443
        } else {
            VAULT_HOST
        };
        vault_listener.set_nonblocking(true).expect("nonblocking");
        let vault_port = vault_listener.local_addr().expect("addr").port();
        let tls = RustlsConfig::from_pem(
            pki.cert_pem.clone().into_bytes(),
            pki.key_pem.clone().into_bytes(),
        )
        .await
        .expect("tls config");
        let vault_handle = axum_server::Handle::new();
        let vault_url = if standard_port {
            format!("https://{host}")
        } else {
            format!("https://{host}:{vault_port}")
        };
        let vault = Router::new()
            .route("/secrets/{name}", get(get_latest).put(set_secret))
            .route("/secrets/{name}/", get(get_latest))
            .route("/secrets/{name}/{version}", get(get_version))
            .fallback(|| async {
                kv_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "The requested resource was not found.",
                )
            })
            .with_state(VaultState {
                shared: shared.clone(),
                base: vault_url.clone(),
            });
        let server = axum_server::from_tcp_rustls(vault_listener, tls)
            .expect("vault server")
            .handle(vault_handle.clone());
        tokio::spawn(server.serve(vault.into_make_service()));

        let identity_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind identity");
        identity_listener
            .set_nonblocking(true)
            .expect("nonblocking");
        let identity_port = identity_listener.local_addr().expect("addr").port();
        let identity_handle = axum_server::Handle::new();
        let identity = Router::new()
            .route("/msi/token", get(identity_token))
            .with_state(IdentityState {
                shared: shared.clone(),
                header: identity_header.clone(),
            });
        let server = axum_server::from_tcp(identity_listener)
            .expect("identity server")
            .handle(identity_handle.clone());
        tokio::spawn(server.serve(identity.into_make_service()));

        // Entra ID's key set, for the tokens the tests mint with tests/fixtures keys.
        let login_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind login");
        login_listener.set_nonblocking(true).expect("nonblocking");
        let login_port = login_listener.local_addr().expect("addr").port();
        let login_handle = axum_server::Handle::new();
        let login_authority = format!("https://{VAULT_HOST}:{login_port}");
        let sign_in = SignInDouble::default();
        sign_in.set_authority(&login_authority);
        let login = Router::new()
            .route("/{tenant}/discovery/v2.0/keys", get(jwks))
            .with_state(shared.clone())
            .merge(sign_in::routes(shared.clone(), sign_in.clone()));
        let tls = RustlsConfig::from_pem(
            pki.cert_pem.clone().into_bytes(),
            pki.key_pem.clone().into_bytes(),
        )
        .await
        .expect("tls config");
        let server = axum_server::from_tcp_rustls(login_listener, tls)
            .expect("login server")
            .handle(login_handle.clone());
        tokio::spawn(server.serve(login.into_make_service()));

        Self {
            pki,
            shared,
            vault_url,
            identity_endpoint: format!("http://127.0.0.1:{identity_port}/msi/token"),
            identity_header,
            login_authority,
            sign_in,
            vault_connect: format!("127.0.0.1:{vault_port}"),
            handles: vec![vault_handle, identity_handle, login_handle],
        }
    }

    /// The environment a process needs to use these doubles as its Azure.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KEY_VAULT_URL", self.vault_url.clone()),
            ("IDENTITY_ENDPOINT", self.identity_endpoint.clone()),
            ("IDENTITY_HEADER", self.identity_header.clone()),
            ("SSL_CERT_FILE", self.pki.ca_file.display().to_string()),
            ("BROKER_RESOLVE", format!("{VAULT_HOST}=127.0.0.1")),
        ]
    }
}

impl Drop for Azure {
    fn drop(&mut self) {
        for handle in &self.handles {
            handle.shutdown();
        }
    }
}

async fn jwks(State(shared): State<Arc<Shared>>, Path(tenant): Path<String>) -> Response {
    *shared.lock().ops.entry("jwks").or_default() += 1;
    if tenant != TENANT {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_tenant"})),
        )
            .into_response();
    }
    let keys: Value = serde_json::from_str(include_str!("../../../fixtures/entra-jwks.json"))
        .expect("fixture JWKS");
    Json(keys).into_response()
}

#[derive(Clone)]
struct IdentityState {
    shared: Arc<Shared>,
    header: String,
}

#[derive(Deserialize)]
struct IdentityQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    resource: Option<String>,
    client_id: Option<String>,
}

async fn identity_token(
    State(state): State<IdentityState>,
    Query(query): Query<IdentityQuery>,
    headers: HeaderMap,
) -> Response {
    let presented = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if presented != state.header {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"statusCode": 401, "message": "Unauthorized: X-IDENTITY-HEADER is missing or invalid"})),
        )
            .into_response();
    }
    if query.api_version.as_deref() != Some("2019-08-01") {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"statusCode": 400, "message": "api-version 2019-08-01 is required"})),
        )
            .into_response();
    }
    let Some(resource) = query.resource.filter(|r| !r.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"statusCode": 400, "message": "resource is required"})),
        )
            .into_response();
    };
    let now = chrono::Utc::now().timestamp();
    let expires_on = now + 3600;
    let token = mint_token(&resource, query.client_id.as_deref(), now, expires_on);
    {
        let mut inner = state.shared.lock();
        *inner.ops.entry("identity").or_default() += 1;
        inner.identity_client_id = query.client_id.clone();
        inner
            .tokens
            .insert(token.clone(), resource.trim_end_matches('/').to_owned());
    }
    Json(json!({
        "access_token": token,
        "expires_on": expires_on.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "client_id": query.client_id.as_deref().unwrap_or(SYSTEM_ASSIGNED_CLIENT_ID),
    }))
    .into_response()
}

/// Client id of the system-assigned identity the endpoint answers for by default.
const SYSTEM_ASSIGNED_CLIENT_ID: &str = "00000000-0000-0000-0000-0000000000a1";
/// Object (principal) id of the managed identity.
const IDENTITY_OBJECT_ID: &str = "00000000-0000-0000-0000-0000000000b1";

/// An access token shaped as Entra ID issues them for a managed identity: a JWT (RS256
/// header, v1 claims with `iss = https://sts.windows.net/{tenant}/`, `aud` = the resource
/// without a trailing slash, `iat`/`nbf` five minutes back as Entra does, `exp`, a random
/// `jti`/`uti`) with a dummy signature. Nothing here verifies signatures: the vault double
/// looks tokens up among those issued, and Azurite (`--oauth basic`) checks only `iss`,
/// `aud` and the lifetime claims.
fn mint_token(resource: &str, client_id: Option<&str>, now: i64, expires_on: i64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let issuer = format!("https://sts.windows.net/{TENANT}/");
    let header = json!({"alg": "RS256", "typ": "JWT"});
    let claims = json!({
        "aud": resource.trim_end_matches('/'),
        "iss": issuer,
        "idp": issuer,
        "iat": now - 300,
        "nbf": now - 300,
        "exp": expires_on,
        "appid": client_id.unwrap_or(SYSTEM_ASSIGNED_CLIENT_ID),
        "appidacr": "2",
        "idtyp": "app",
        "oid": IDENTITY_OBJECT_ID,
        "sub": IDENTITY_OBJECT_ID,
        "tid": TENANT,
        "jti": random_hex(16),
        "uti": random_hex(11),
        "ver": "1.0",
    });
    let signature: [u8; 32] = rand::thread_rng().gen();
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

#[derive(Clone)]
struct VaultState {
    shared: Arc<Shared>,
    base: String,
}
