//! The `token-broker` binary: `serve` (default) and `check`.

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
    /// Validate the configuration and show each connection's stored status.
    Check,
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
    telemetry::init();
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
    for name in config.connections.keys() {
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
