//! One builder for the broker's configuration, used by every harness: in process, the real
//! binary, several instances. Defaults: a random `state_secret`, the caller and admin keys,
//! nothing else; each test adds what it is about.

use std::path::{Path, PathBuf};

use super::{random, ADMIN_KEY, CALLER_KEY};

/// A broker configuration file, section by section.
#[derive(Clone)]
pub struct BrokerConfig {
    top: Vec<String>,
    auth: Vec<String>,
    /// Whole tables under `[auth]` (e.g. `[auth.entra]`).
    auth_tables: Vec<String>,
    store: Vec<String>,
    refresh: Vec<String>,
    lock: Vec<String>,
    /// Whole tables appended at the end: connections, and anything a test writes itself.
    tables: Vec<String>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            top: vec![line("state_secret", random("state-secret"))],
            auth: vec![
                line("api_keys", vec![CALLER_KEY.to_owned()]),
                line("admin_keys", vec![ADMIN_KEY.to_owned()]),
            ],
            auth_tables: Vec::new(),
            store: Vec::new(),
            refresh: Vec::new(),
            lock: Vec::new(),
            tables: Vec::new(),
        }
    }
}

/// `key = value`, the value written as TOML.
fn line(key: &str, value: impl Into<toml::Value>) -> String {
    format!("{key} = {}", value.into())
}

/// A `[connections.{name}]` table: `settings` written as TOML values, then `extra` (lines a
/// test adds as they are, e.g. `api_base_url = "…"`). The one way tests write a connection;
/// only the startup-error tests keep deliberately broken ones inline.
pub fn connection_table(name: &str, settings: &[(&str, toml::Value)], extra: &str) -> String {
    let mut table = format!("[connections.{name}]\n");
    for (key, value) in settings {
        table.push_str(&line(key, value.clone()));
        table.push('\n');
    }
    if !extra.trim().is_empty() {
        table.push_str(extra.trim());
        table.push('\n');
    }
    table
}

/// `(key, value)` pairs for [`connection_table`], from strings.
pub fn settings<'a>(pairs: &[(&'a str, &str)]) -> Vec<(&'a str, toml::Value)> {
    pairs
        .iter()
        .map(|(key, value)| (*key, toml::Value::from(*value)))
        .collect()
}

/// Replaces `key`'s line in `lines`, or adds it.
fn set(lines: &mut Vec<String>, key: &str, value: impl Into<toml::Value>) {
    let new = line(key, value);
    match lines
        .iter_mut()
        .find(|l| l.starts_with(&format!("{key} = ")))
    {
        Some(existing) => *existing = new,
        None => lines.push(new),
    }
}

impl BrokerConfig {
    /// A top-level setting (`public_url`, `state_secret`).
    pub fn top(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.top, key, value);
        self
    }

    /// An `[auth]` setting (`api_keys`, `admin_keys`, `allow_anonymous`).
    pub fn auth(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.auth, key, value);
        self
    }

    /// Removes an `[auth]` setting.
    pub fn without_auth(mut self, key: &str) -> Self {
        self.auth.retain(|l| !l.starts_with(&format!("{key} = ")));
        self
    }

    /// A table under `[auth]`, written whole (`[auth.entra]` …).
    pub fn auth_table(mut self, toml: &str) -> Self {
        self.auth_tables.push(toml.trim().to_owned());
        self
    }

    /// The file store in `dir`.
    pub fn file_store(self, dir: &Path) -> Self {
        self.store("kind", "file")
            .store("path", dir.display().to_string())
    }

    /// A `[store]` setting (with `KEY_VAULT_URL` in the environment, the vault is the store).
    pub fn store(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.store, key, value);
        self
    }

    /// A `[refresh]` setting.
    pub fn refresh(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.refresh, key, value);
        self
    }

    /// A `[lock]` setting.
    pub fn lock(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        set(&mut self.lock, key, value);
        self
    }

    /// Whole tables (a connection, …), appended at the end.
    pub fn tables(mut self, toml: &str) -> Self {
        if !toml.trim().is_empty() {
            self.tables.push(toml.trim().to_owned());
        }
        self
    }

    /// A connection (see [`connection_table`]).
    pub fn connection(self, name: &str, settings: &[(&str, toml::Value)], extra: &str) -> Self {
        self.tables(&connection_table(name, settings, extra))
    }

    /// A generic OAuth 2.0 connection whose endpoints nobody serves (`id.example.com`), for
    /// tests about anything but the provider.
    pub fn unreached_connection(self, name: &str) -> Self {
        self.connection(name, &unreached(), "")
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = self.top.join("\n");
        let mut section = |name: &str, lines: &[String]| {
            if !lines.is_empty() {
                out.push_str(&format!("\n\n[{name}]\n{}", lines.join("\n")));
            }
        };
        section("auth", &self.auth);
        section("store", &self.store);
        section("refresh", &self.refresh);
        section("lock", &self.lock);
        for table in self.auth_tables.iter().chain(&self.tables) {
            out.push_str("\n\n");
            out.push_str(table);
        }
        out.push('\n');
        out
    }

    /// Writes `broker.toml` into `dir`; its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("broker.toml");
        std::fs::write(&path, self.render()).expect("write broker.toml");
        path
    }
}

/// The settings of [`BrokerConfig::unreached_connection`].
pub fn unreached() -> Vec<(&'static str, toml::Value)> {
    settings(&[
        ("provider", "oauth2"),
        ("authorize_url", "https://id.example.com/auth"),
        ("token_url", "https://id.example.com/token"),
        ("client_id", "c"),
    ])
}

#[test]
fn renders_sections_once_with_tables_last() {
    let text = BrokerConfig::default()
        .top("public_url", "http://127.0.0.1:1")
        .store("path", "/tmp/x")
        .lock("failure_backoff", 1)
        .lock("failure_backoff", 2)
        .connection(
            "a",
            &settings(&[("provider", "oauth2")]),
            "scopes = [\"x\"]",
        )
        .render();
    let parsed: toml::Value = toml::from_str(&text).expect("valid TOML");
    assert_eq!(parsed["lock"]["failure_backoff"].as_integer(), Some(2));
    assert_eq!(parsed["store"]["path"].as_str(), Some("/tmp/x"));
    assert_eq!(parsed["auth"]["api_keys"][0].as_str(), Some(CALLER_KEY));
    assert_eq!(
        parsed["connections"]["a"]["provider"].as_str(),
        Some("oauth2")
    );
    assert_eq!(parsed["connections"]["a"]["scopes"][0].as_str(), Some("x"));
}
