//! A real Azure Storage blob emulator (Azurite, pinned by tests/storage/package-lock.json),
//! reached the way production reaches Azure Storage: HTTPS with a certificate from the test
//! CA ([`Pki`]), and bearer tokens (Azurite's `--oauth basic`: it checks the token's issuer,
//! audience `https://storage.azure.com` and lifetime, not its signature) that the
//! managed-identity double in `azure_doubles.rs` issues.
//!
//! [`Azurite::start`] runs the blob service only, on a free port with its own data directory;
//! [`Azurite::stop`] and [`Azurite::start_again`] restart it on the same port and data, to
//! show what survives. In-process SDK clients trust the test CA through
//! [`sdk_client_options`]; a child process (the broker) through `SSL_CERT_FILE`
//! (`Azure::env()`), plus [`Azurite::env`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_storage_blob::{BlobServiceClient, BlobServiceClientOptions};
use tokio::process::{Child, Command};

use crate::support::azure_doubles::Pki;
use crate::support::free_port;

/// Azurite's built-in account (path-style URLs: the account is the first path segment).
pub const ACCOUNT: &str = "devstoreaccount1";
/// How long Azurite may take to listen (it takes about 1–2 s).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Azurite may take to exit after SIGINT (it takes about 1 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The Azurite blob service, killed on drop.
pub struct Azurite {
    /// `https://127.0.0.1:{port}/devstoreaccount1`
    pub blob_url: String,
    pub port: u16,
    /// Azurite's stdout and stderr, across restarts.
    pub log_file: PathBuf,
    /// The test CA's certificate (PEM), which issued Azurite's server certificate.
    pub ca_file: PathBuf,
    /// How long the last (re)start took until Azurite listened.
    pub start_time: Duration,
    cert_file: PathBuf,
    key_file: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Azurite {
    /// Starts Azurite's blob service on a free port, with a certificate for 127.0.0.1 from
    /// `pki` and a fresh data directory, and waits until it listens.
    pub async fn start(pki: &Pki) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert_file, key_file) = pki.issue_server_files(&["127.0.0.1", "localhost"], dir.path());
        let ca_file = dir.path().join("ca.pem");
        std::fs::copy(&pki.ca_file, &ca_file).expect("copy the test CA");
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).expect("data dir");
        let port = free_port();
        let mut azurite = Self {
            blob_url: format!("https://127.0.0.1:{port}/{ACCOUNT}"),
            port,
            log_file: dir.path().join("azurite.log"),
            ca_file,
            start_time: Duration::ZERO,
            cert_file,
            key_file,
            data_dir,
            child: None,
            dir,
        };
        azurite.spawn().await;
        azurite
    }

    /// Stops Azurite as an operator would (SIGINT; it ignores SIGTERM at times) and waits
    /// until it exits, so that it has saved its data. Killed if it does not exit in 10 s.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                status.expect("wait for Azurite");
            }
            Err(_) => {
                eprintln!(
                    "Azurite did not exit within {STOP_TIMEOUT:?} of SIGINT; killing it\n{}",
                    self.logs()
                );
                let _ = child.kill().await;
            }
        }
    }

    /// Starts Azurite again (after [`Azurite::stop`]) on the same port and data directory.
    pub async fn start_again(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    /// The environment a broker needs to use this Azurite as `AzureWebJobsStorage` (identity
    /// based): add `Azure::env()` for `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` and
    /// `SSL_CERT_FILE` (the test CA).
    #[allow(dead_code)] // for the broker's blob-storage tests
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AzureWebJobsStorage__blobServiceUri", self.blob_url.clone()),
            (
                "AzureWebJobsStorage__credential",
                "managedidentity".to_owned(),
            ),
        ]
    }

    /// Azurite's output so far (for assertion messages).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// A blob service client for this Azurite with `credential`, trusting the test CA and
    /// without retries.
    pub fn service_client(&self, credential: Arc<dyn TokenCredential>) -> BlobServiceClient {
        BlobServiceClient::new(
            self.blob_url.parse().expect("blob URL"),
            Some(credential),
            Some(BlobServiceClientOptions {
                client_options: sdk_client_options(&self.ca_file),
                ..Default::default()
            }),
        )
        .expect("blob service client")
    }

    async fn spawn(&mut self) {
        let main_js = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/storage/node_modules/azurite/dist/src/blob/main.js");
        assert!(
            main_js.exists(),
            "Azurite is not installed: run `npm ci --prefix tests/storage` (scripts/test does)"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .expect("open the Azurite log");
        let log_start = log.metadata().expect("log metadata").len();
        let started = Instant::now();
        let child = Command::new("node")
            .arg(&main_js)
            .args([
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                &self.port.to_string(),
            ])
            .args(["--oauth", "basic"])
            .arg("--cert")
            .arg(&self.cert_file)
            .arg("--key")
            .arg(&self.key_file)
            .arg("--location")
            .arg(&self.data_dir)
            .args(["--silent", "--disableTelemetry"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start node (is Node.js installed?)");
        self.child = Some(child);
        // Azurite prints this once it listens (on our port: a port taken in the meantime
        // makes it exit instead).
        let ready = format!("successfully listens on https://127.0.0.1:{}", self.port);
        loop {
            let output = std::fs::read(&self.log_file).unwrap_or_default();
            let output = String::from_utf8_lossy(
                output
                    .get(usize::try_from(log_start).expect("log size")..)
                    .unwrap_or_default(),
            );
            if output.contains(&ready) {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("poll Azurite"))
            {
                panic!(
                    "Azurite exited ({status}) before listening:\n{}",
                    self.logs()
                );
            }
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "Azurite did not listen within {READY_TIMEOUT:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.start_time = started.elapsed();
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// `ClientOptions` for in-process Azure SDK clients talking to the doubles and Azurite: a
/// reqwest transport that trusts only the test CA in `ca_file` (PEM), and no retries, so a
/// failure surfaces at once instead of after the default policy's ~80 s.
pub fn sdk_client_options(ca_file: &Path) -> ClientOptions {
    let pem = std::fs::read(ca_file).expect("read the test CA");
    let ca = reqwest::Certificate::from_pem(&pem).expect("the test CA is PEM");
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client");
    ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        retry: RetryOptions::none(),
        ..Default::default()
    }
}
