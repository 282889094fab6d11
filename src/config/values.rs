//! Parsers shared by the sections: URLs, durations, secrets and names, each error naming
//! the key.

use std::time::Duration;

use super::ConfigError;
use secrecy::SecretString;
use url::Url;

/// A GUID in its usual 8-4-4-4-12 hexadecimal form.
pub(super) fn is_guid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Key Vault secret names: 1-127 of `0-9a-zA-Z-`, starting with a letter.
pub(super) fn validate_secret_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = (1..=127).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            format!("`{name}` is not a valid Key Vault secret name (1-127 of 0-9, a-z, A-Z and `-`, starting with a letter)"),
        ))
    }
}

pub(super) fn secrets(key: &str, values: Vec<String>) -> Result<Vec<SecretString>, ConfigError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            if v.len() < 16 {
                Err(ConfigError::key(
                    format!("{key}[{i}]"),
                    "keys must be at least 16 characters",
                ))
            } else {
                Ok(SecretString::from(v))
            }
        })
        .collect()
}

pub(super) fn positive_secs(key: &str, secs: u64) -> Result<Duration, ConfigError> {
    if secs == 0 {
        Err(ConfigError::key(
            key,
            "must be a positive number of seconds",
        ))
    } else {
        Ok(Duration::from_secs(secs))
    }
}

pub(super) fn parse_http_url(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value)
        .map_err(|err| ConfigError::key(key, format!("`{value}` is not a valid URL: {err}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ConfigError::key(
            key,
            format!("`{value}` must be an http(s) URL with a host"),
        ));
    }
    Ok(url)
}

pub(super) fn parse_endpoint(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url = parse_http_url(key, value)?;
    require_https_off_loopback(key, &url)?;
    if url.fragment().is_some() {
        return Err(ConfigError::key(
            key,
            "an endpoint URL cannot have a fragment",
        ));
    }
    Ok(url)
}

/// Provider endpoints carry client secrets, codes and tokens: plain `http` only to this
/// machine (local providers, tests).
pub(super) fn require_https_off_loopback(key: &str, url: &Url) -> Result<(), ConfigError> {
    if url.scheme() == "https" || crate::presets::is_loopback(url) {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            "must use https: over plain http the client secret, codes and tokens travel in clear \
             text (http is accepted only for localhost / 127.0.0.1)",
        ))
    }
}

/// A base URL: no query or fragment, no trailing slash (so `{base}/api/...` is exact).
pub(super) fn parse_base_url(key: &str, value: &str) -> Result<Url, ConfigError> {
    let url = parse_http_url(key, value.trim_end_matches('/'))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::key(
            key,
            "a base URL cannot have a query or fragment",
        ));
    }
    Ok(url)
}

/// A setting written as one string or as a list of them (`state_secret = "…"` or
/// `state_secret = ["new…", "old…"]`).
#[derive(Debug)]
pub(super) enum StringOrList {
    One(String),
    List(Vec<String>),
}

impl StringOrList {
    /// `(config key, value)` for each: `key` alone, or `key[i]`.
    pub(super) fn entries<'a>(&'a self, key: &'a str) -> Vec<(String, &'a str)> {
        match self {
            StringOrList::One(value) => vec![(key.to_owned(), value.as_str())],
            StringOrList::List(values) => values
                .iter()
                .enumerate()
                .map(|(i, value)| (format!("{key}[{i}]"), value.as_str()))
                .collect(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        matches!(self, StringOrList::List(values) if values.is_empty())
    }
}

impl<'de> serde::Deserialize<'de> for StringOrList {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StringOrList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<StringOrList, E> {
                Ok(StringOrList::One(value.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StringOrList, A::Error> {
                let mut values = Vec::new();
                while let Some(value) = seq.next_element::<String>()? {
                    values.push(value);
                }
                Ok(StringOrList::List(values))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
