//! Tracing setup: structured logs to stderr, filtered by `RUST_LOG` (default `info`),
//! JSON lines when `BROKER_LOG_FORMAT=json`.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. Call once, at startup.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Whatever RUST_LOG says: the HTTP libraries' own debug and trace lines can quote a
    // request's full URI (the h2 crate logs a malformed request's path, query included), and
    // a query can hold an admin key or an authorization code.
    // And the audit trail at INFO, whatever RUST_LOG says: it is not debug output, and only
    // `audit = false` turns it off (see the `audit` module).
    let filter = [
        "h2=info",
        "hyper=info",
        "hyper_util=info",
        "token_broker::audit=info",
    ]
    .iter()
    .filter_map(|directive| directive.parse().ok())
    .fold(filter, EnvFilter::add_directive);
    let json = std::env::var("BROKER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colour only for a person at a terminal: escape codes in a log file or in Application
    // Insights' `traces` would break every search for `state=…`.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // A second init (tests) is harmless, hence `try_init`.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
