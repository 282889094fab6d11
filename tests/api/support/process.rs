//! The real `token-broker` binary, started as a deployment would start it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The real `token-broker` binary, started as a deployment would start it. Killed on drop.
pub struct BrokerProcess {
    pub port: u16,
    pub base: String,
    config: PathBuf,
    env: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
    /// The soft limit on open files the process runs under (`ulimit -n`), if lowered.
    open_files: Option<u32>,
}

impl BrokerProcess {
    /// Starts the binary with `config` on `port`, logging (appending) to `log_path`.
    pub async fn start_on(
        port: u16,
        config: &Path,
        env: &[(&str, String)],
        log_path: &Path,
    ) -> Self {
        Self::start_limited(port, config, env, log_path, None).await
    }

    /// As [`BrokerProcess::start_on`], under a lowered limit on open files (through the
    /// shell's `ulimit -n`: no privileges needed to lower one's own limit).
    pub async fn start_limited(
        port: u16,
        config: &Path,
        env: &[(&str, String)],
        log_path: &Path,
        open_files: Option<u32>,
    ) -> Self {
        let mut process = Self {
            open_files,
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
        let binary = env!("CARGO_BIN_EXE_token-broker");
        let mut command = match self.open_files {
            Some(limit) => {
                let mut command = Command::new("sh");
                command.args([
                    "-c",
                    "ulimit -n \"$0\" && exec \"$1\"",
                    &limit.to_string(),
                    binary,
                ]);
                command
            }
            None => Command::new(binary),
        };
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

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
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

/// A memory figure of process `pid` from `/proc/{pid}/status`, in KiB: `VmRSS` (resident
/// now) or `VmHWM` (the peak resident so far).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} for {pid}"))
}

/// The broker binary with connection `acme` consented at a fresh strict upstream: file
/// store, callers with [`super::CALLER_KEY`], `RUST_LOG=info`.
pub struct ConsentedBroker {
    pub upstream: super::Upstream,
    pub broker: BrokerProcess,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl ConsentedBroker {
    /// Access tokens live `ttl` seconds; `acme_extra` are more settings for `acme`, `tables`
    /// more of the config, `env` more of the environment.
    pub async fn start(ttl: u64, acme_extra: &str, tables: &str, env: &[(&str, String)]) -> Self {
        Self::start_with_top(ttl, &[], acme_extra, tables, env).await
    }

    /// As [`ConsentedBroker::start`], with top-level settings (`audit = false`).
    pub async fn start_with_top(
        ttl: u64,
        top: &[(&str, toml::Value)],
        acme_extra: &str,
        tables: &str,
        env: &[(&str, String)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = super::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let upstream =
            super::Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", ttl)
                .await;
        let config = top
            .iter()
            .fold(super::BrokerConfig::default(), |config, (key, value)| {
                config.top(key, value.clone())
            })
            .auth("api_keys", vec![super::CALLER_KEY.to_owned()])
            .store("path", dir.path().join("tokens").display().to_string())
            .tables(&upstream.connection_toml(
                "acme",
                &format!(
                    "client_secret = \"{}\"\n{acme_extra}",
                    upstream.client_secret
                ),
            ))
            .tables(tables)
            .write(dir.path());
        let mut all_env = vec![("RUST_LOG", "info".to_owned())];
        all_env.extend(env.iter().cloned());
        let broker =
            BrokerProcess::start_on(port, &config, &all_env, &dir.path().join("broker.log")).await;
        super::consent(&base, "acme").await;
        Self {
            upstream,
            broker,
            base,
            _dir: dir,
        }
    }
}
