//! Test support: the peers (a strict `oidc-provider` upstream, Azurite, Azure doubles, a
//! provider double), one configuration builder for every harness, and the two ways to run the
//! broker — in process ([`TestApp`]) and as the real binary ([`BrokerProcess`]).

pub mod api_double;
pub mod azure_doubles;
pub mod azurite;
pub mod entra;
pub mod provider_double;

mod app;
mod browser;
mod config;
mod process;
mod upstream;

pub use app::{ConfiguredBroker, Options, TestApp};
pub use browser::{consent, consent_until_callback, meta_refresh, walk_to_callback, Browser};
pub use config::{connection_table, settings, BrokerConfig};
pub use process::{memory_kib, wait_ready, BrokerProcess, ConsentedBroker};
pub use upstream::Upstream;

use rand::Rng;

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

/// The log of brokers run in process: shown only when `TEST_LOG` is set (filtered by
/// `RUST_LOG`, default `info`), through the test harness's capture, so a failing test prints
/// it and a passing one stays quiet (zero-to-production's `TEST_LOG`). Brokers run as
/// processes log to their own files (`BrokerProcess::logs`).
pub fn test_log() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// An answer read off the wire by [`raw_request`].
pub struct RawAnswer {
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    /// The value of header `name` (any case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// Sends `request`, a whole HTTP/1.1 request as written (it must ask for `Connection:
/// close`), on a new connection to `port` and reads the answer to its end: for what a client
/// would change or leave out, such as a path with `..` or a `Content-Length` on a GET.
pub async fn raw_request(port: u16, request: &str) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    RawAnswer {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_default(),
        head: head.to_owned(),
        body: body.to_owned(),
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

/// Invokes the timer function at `base` as the Functions host would (an admin key stands in
/// for the host's loopback); its JSON answer, after checking it succeeded.
pub async fn invoke_timer(
    http: &reqwest::Client,
    base: &str,
    payload: &serde_json::Value,
) -> serde_json::Value {
    let response = http
        .post(format!("{base}/prerefresh"))
        .header("X-API-Key", ADMIN_KEY)
        .json(payload)
        .send()
        .await
        .expect("prerefresh");
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// The host's payload for an on-time timer run.
pub fn timer_payload() -> serde_json::Value {
    serde_json::json!({"Data": {"timer": {"IsPastDue": false}}, "Metadata": {}})
}
