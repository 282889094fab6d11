//! The `[server]` section: the HTTP listener's timeouts and connection cap.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The HTTP listener's limits (`[server]`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A request's headers must arrive within this; also how long an idle keep-alive
    /// connection stays open.
    pub header_timeout: Duration,
    /// A request's whole body must arrive within this, counted from the moment its headers
    /// are in: a deadline, not an idle timer (a body trickling a byte at a time is cut).
    pub body_timeout: Duration,
    /// An answer whose bytes cannot be written for this long (the caller stopped reading)
    /// ends, and its connection is closed: no write may stall longer.
    pub write_timeout: Duration,
    /// Open connections at most; at the cap the longest-idle one is closed for a new one.
    pub max_connections: usize,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    header_timeout: Option<u64>,
    body_timeout: Option<u64>,
    write_timeout: Option<u64>,
    max_connections: Option<usize>,
}

impl RawServer {
    pub(super) fn validate(self) -> Result<ServerConfig, ConfigError> {
        let secs = |key: &str, value: Option<u64>, default: u64| match value.unwrap_or(default) {
            secs @ 1..=300 => Ok(Duration::from_secs(secs)),
            _ => Err(ConfigError::key(key, "must be 1-300 seconds")),
        };
        Ok(ServerConfig {
            header_timeout: secs("server.header_timeout", self.header_timeout, 20)?,
            body_timeout: secs("server.body_timeout", self.body_timeout, 20)?,
            write_timeout: secs("server.write_timeout", self.write_timeout, 60)?,
            max_connections: match self.max_connections.unwrap_or(512) {
                n @ 8..=65_536 => n,
                _ => {
                    return Err(ConfigError::key(
                        "server.max_connections",
                        "must be 8-65536 connections",
                    ))
                }
            },
        })
    }
}
