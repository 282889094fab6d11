//! The `token-broker` binary: `serve` (default), `check`, `login`, `token` and `openapi`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use token_broker::{store, telemetry, Application, Config};

#[derive(Parser)]
#[command(
    version,
    about = "Consent once, then fresh OAuth 2.0 access tokens from one URL"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "BROKER_CONFIG",
        default_value = "broker.toml"
    )]
    config: PathBuf,
    /// Address to listen on: default 127.0.0.1 under the Functions host (only the host
    /// talks to the handler), else 0.0.0.0. The port comes from
    /// FUNCTIONS_CUSTOMHANDLER_PORT, else PORT, else 7071. A top-level option, so that
    /// BROKER_BIND applies whether or not `serve` is named.
    #[arg(long, global = true, env = "BROKER_BIND")]
    bind: Option<IpAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Validate the configuration and list each connection with its state
    Check,
    /// Connect a connection from this machine and store its tokens (first refresh token)
    ///
    /// Opens the consent in your browser (or prints the address), waits for
    /// the provider to send it back to http://127.0.0.1:PORT/api/callback (register that
    /// redirect URI at the provider), and stores the tokens in the configured store (the
    /// token file, or Key Vault — so a vault can be seeded before the app is deployed).
    Login {
        /// The connection's name in the config.
        connection: String,
        /// The loopback port the provider redirects back to.
        #[arg(long, default_value_t = 7071)]
        port: u16,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Only print the URL to open; do not start a browser.
        #[arg(long)]
        no_browser: bool,
    },
    /// Print a valid access token for a connection as JSON, as /api/refresh answers
    ///
    /// Refreshes it when needed through the same code as the service (single flight, the lease when
    /// configured, a rotated refresh token saved first).
    Token {
        /// The connection's name in the config.
        connection: String,
        /// Seconds of life the token must have left (default refresh.min_validity).
        #[arg(long)]
        min_validity: Option<u64>,
        /// Refresh even if the current token is good enough.
        #[arg(long)]
        force: bool,
    },
    /// Print the OpenAPI document (what `/api/openapi.json` serves; needs no config).
    Openapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::Openapi)) {
        let document = token_broker::http::openapi_document();
        println!(
            "{}",
            serde_json::to_string_pretty(&document).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    // Held to the end of `main`: dropping it writes out the log lines still queued.
    let _log = telemetry::init();
    let config = match Config::load(&cli.config, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                // Under the host, and for a local trial, nobody else needs to reach it.
                let bind = cli
                    .bind
                    .unwrap_or(if config.functions_host || config.local_mode {
                        IpAddr::from([127, 0, 0, 1])
                    } else {
                        IpAddr::from([0, 0, 0, 0])
                    });
                serve(config, bind).await
            }
            Command::Check => check(config).await,
            Command::Login {
                connection,
                port,
                timeout,
                no_browser,
            } => login(config, &connection, port, timeout, no_browser).await,
            Command::Token {
                connection,
                min_validity,
                force,
            } => token(config, &connection, min_validity, force).await,
            Command::Openapi => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The port the Functions host assigns, else `PORT`, else 7071 (what `func start` uses).
fn port() -> anyhow::Result<u16> {
    for name in ["FUNCTIONS_CUSTOMHANDLER_PORT", "PORT"] {
        if let Some(value) = std::env::var(name).ok().filter(|v| !v.is_empty()) {
            return value
                .parse()
                .with_context(|| format!("{name}={value} is not a port number"));
        }
    }
    Ok(7071)
}

async fn serve(config: Config, bind: IpAddr) -> anyhow::Result<()> {
    // Anonymous access only where nobody else can reach it: before binding anything wider.
    if config.auth.allow_anonymous && !bind.is_loopback() {
        anyhow::bail!(
            "config key `auth.allow_anonymous`: only allowed when the broker listens on loopback \
             (BROKER_BIND=127.0.0.1); it would listen on {bind}"
        );
    }
    if config.local_mode && !bind.is_loopback() {
        anyhow::bail!(
            "config key `local_mode`: only allowed when the broker listens on loopback \
             (BROKER_BIND=127.0.0.1); it would listen on {bind}"
        );
    }
    let addr = SocketAddr::new(bind, port()?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let app = Application::build(config, listener).await?;
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(())
}

async fn check(config: Config) -> anyhow::Result<()> {
    let store = store::open(&config)?.store;
    println!("config ok; {}", store.describe());
    let lock = token_broker::lock::open(&config)?;
    lock.check()
        .await
        .with_context(|| format!("refresh lease: {}", lock.describe()))?;
    println!("refresh lease ok; {}", lock.describe());
    let every_caller: Vec<String> = config
        .auth
        .api_keys
        .iter()
        .map(|k| k.name.clone())
        .chain(
            config
                .auth
                .entra
                .iter()
                .flat_map(|e| e.allowed_principals.clone()),
        )
        .collect();
    for (name, connection) in &config.connections {
        // Who may take it: its `callers`, or every caller identity; admins always.
        let callers = connection.callers.as_ref().unwrap_or(&every_caller);
        let who = match (callers.is_empty(), connection.callers.is_some()) {
            _ if config.auth.allow_anonymous => "anyone (auth.allow_anonymous)".to_owned(),
            (true, _) => "admins only".to_owned(),
            (false, true) => format!("{} (and admins)", callers.join(", ")),
            (false, false) => format!("every caller: {} (and admins)", callers.join(", ")),
        };
        println!("{name}: taken by {who}");
        let status = match store.load(name).await? {
            None => "no token yet (consent required)".to_owned(),
            Some(record) => format!(
                "{:?}, access token expires {}",
                record.status,
                record
                    .expires_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into())
            ),
        };
        println!("{name}: {status}");
    }
    Ok(())
}

async fn token(
    config: Config,
    connection: &str,
    min_validity: Option<u64>,
    force: bool,
) -> anyhow::Result<()> {
    if !config.connections.contains_key(connection) {
        anyhow::bail!("no connection `{connection}` in the config");
    }
    let audit = token_broker::audit::Audit::new(config.audit);
    let broker = token_broker::app::broker(config).await?;
    let request = token_broker::broker::TokenRequest {
        min_validity: min_validity.map(std::time::Duration::from_secs),
        force,
        internal: false,
    };
    let asked_at = broker.now();
    let result = broker.token(connection, request).await;
    // A refresh token the store has not accepted yet must not leave with this process.
    broker.flush_pending().await;
    let record = result.map_err(|err| anyhow::anyhow!("{err}"))?;
    let body = record.to_response(broker.now()).ok_or_else(|| {
        anyhow::anyhow!(
            "connection `{connection}` has no access token: run `token-broker login {connection}`"
        )
    })?;
    if let Some(token) = &record.access_token {
        // Whoever runs the CLI holds the configuration and its secrets: `cli` names them.
        audit.issued(&token_broker::audit::Handout {
            connection,
            caller: "cli",
            app_id: None,
            route: "cli",
            tenant: None,
            source: token_broker::audit::Source::of(record.obtained_at, asked_at),
            token_id: &token_broker::audit::token_id(token),
            expires_at: record
                .expires_at
                .map(token_broker::audit::timestamp)
                .as_deref(),
            invocation_id: "",
        });
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

async fn login(
    mut config: Config,
    connection: &str,
    port: u16,
    timeout: u64,
    no_browser: bool,
) -> anyhow::Result<()> {
    if !config.connections.contains_key(connection) {
        anyhow::bail!("no connection `{connection}` in the config");
    }
    // The provider sends the browser back to this machine. The redirect URI names the IP
    // literal, not `localhost` (RFC 8252 §7.3, §8.3): `localhost` may resolve to `::1`,
    // where another local user could listen on the same port and take the key and the code.
    let public_url = format!("http://127.0.0.1:{port}");
    config.public_url = Some(url::Url::parse(&public_url)?);
    // The process signs its `state` and its one admin session with a key of its own, so
    // nothing it issues is good on an instance that shares the deployment's state_secret.
    config.state_secret = Vec::new();
    // A one-time key for one `?key=` exchange on this connection's consent (LoginGate): not
    // an admin key, so never good as X-API-Key, on another route, or twice.
    let one_time = secrecy::SecretString::from({
        use rand::Rng;
        let bytes: [u8; 24] = rand::thread_rng().gen();
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    });
    let gate = token_broker::http::LoginGate::new(connection, &one_time);
    let listener = tokio::net::TcpListener::bind((IpAddr::from([127, 0, 0, 1]), port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port} (choose another with --port)"))?;
    let app = Application::build_for_login(config, listener, gate).await?;
    let broker = app.broker();
    let started = broker.now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let url = format!(
        "{public_url}/api/authorize/{connection}?key={}",
        secrecy::ExposeSecret::expose_secret(&one_time)
    );
    eprintln!("Register this redirect URI at the provider: {public_url}/api/callback");
    eprintln!(
        "Open this address in a browser on this machine to connect `{connection}`:\n\n    {url}\n"
    );
    // Kept until the login ends: the page that hands the address to the browser.
    let _launcher_page = if no_browser { None } else { open_browser(&url) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let outcome = loop {
        let status = broker
            .statuses()
            .await
            .into_iter()
            .find(|s| s.name == connection);
        if let Some(status) = status.filter(|s| s.consented_at.is_some_and(|at| at > started)) {
            break Ok(status);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break Err(anyhow::anyhow!(
                "no consent for `{connection}` within {timeout} s (run it again, or give more time with --timeout)"
            ));
        }
        if progress {
            eprint!(
                "\rWaiting for the consent to come back… {:>3} s left ",
                left.as_secs()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    if progress {
        eprintln!();
    }
    let _ = stop.send(());
    server.await??;
    let status = outcome?;
    let organisations = match status.tenants.len() {
        0 => String::new(),
        n => format!(
            "; {n} organisation{}: {}",
            if n == 1 { "" } else { "s" },
            status
                .tenants
                .iter()
                .map(|t| if t.name.is_empty() {
                    t.id.clone()
                } else {
                    format!("{} ({})", t.name, t.id)
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let ends = status
        .forecast
        .as_ref()
        .map(|f| format!("; grant {}", f.summary))
        .unwrap_or_default();
    println!(
        "{connection}: connected ({}), access token until {}{organisations}{ends}",
        status.provider,
        status
            .expires_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into()),
    );
    Ok(())
}

/// Opens `url` in the desktop's browser when there is one (best effort: the URL is printed
/// either way). The URL holds the one-time key, and a program's arguments are readable by
/// every local user (`/proc/PID/cmdline`), so the launcher is given the path of an
/// owner-only page that forwards to the URL, never the URL itself. The page lives in a
/// private temporary folder, returned so that it is removed when the login ends.
fn open_browser(url: &str) -> Option<tempfile::TempDir> {
    let candidates: &[&str] = if cfg!(target_os = "macos") {
        &["open"]
    } else if cfg!(windows) {
        &["explorer"]
    } else if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    {
        &["xdg-open"]
    } else {
        &[]
    };
    if candidates.is_empty() {
        return None;
    }
    // tempfile makes the folder owner-only (0700) and the page is written 0600.
    let folder = tempfile::Builder::new()
        .prefix("token-broker-login-")
        .tempdir()
        .ok()?;
    let page = folder.path().join("login.html");
    let escaped = url
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;");
    let html = format!(
        "<!doctype html><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\"><meta http-equiv=\"refresh\" content=\"0;url={escaped}\"><title>Token Broker login</title><a href=\"{escaped}\">Continue to the consent</a>"
    );
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&page)
        .and_then(|mut file| std::io::Write::write_all(&mut file, html.as_bytes()));
    if written.is_err() {
        return None;
    }
    for program in candidates {
        let spawned = std::process::Command::new(program)
            .arg(&page)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if spawned.is_ok() {
            break;
        }
    }
    Some(folder)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
