//! The token endpoint's answer, read leniently (providers differ) but never echoed.

use std::fmt;
use std::time::Duration;

use oauth2::basic::BasicTokenType;
use oauth2::{AccessToken, RefreshToken, Scope, TokenResponse};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::token::Facts;

/// Response fields that are secrets or already mapped; never copied into `extra`.
pub(super) const NOT_EXTRA: &[&str] = &[
    "access_token",
    "refresh_token",
    "id_token",
    "token_type",
    "expires_in",
    "scope",
];

/// A token endpoint response (RFC 6749 §5.1), lenient where real providers differ:
/// `token_type` in any case or missing (Bearer assumed), `expires_in` as a number or a
/// string (Exact Online sends a string), and every other field kept for callers.
#[derive(Clone, Serialize, Deserialize)]
pub struct ProviderTokenResponse {
    access_token: AccessToken,
    #[serde(
        default = "bearer",
        deserialize_with = "oauth2::helpers::deserialize_untagged_enum_case_insensitive"
    )]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<RefreshToken>,
    #[serde(
        default,
        rename = "scope",
        deserialize_with = "oauth2::helpers::deserialize_space_delimited_vec",
        serialize_with = "oauth2::helpers::serialize_space_delimited_vec"
    )]
    scopes: Option<Vec<Scope>>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

pub(super) fn bearer() -> BasicTokenType {
    BasicTokenType::Bearer
}

pub(super) fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrString {
        Number(u64),
        Float(f64),
        String(String),
    }
    match Option::<NumberOrString>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumberOrString::Number(n)) => Ok(Some(n)),
        Some(NumberOrString::Float(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
        Some(NumberOrString::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("expires_in is not a number of seconds")),
        Some(NumberOrString::Float(_)) => Err(serde::de::Error::custom(
            "expires_in is not a number of seconds",
        )),
    }
}

impl fmt::Debug for ProviderTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderTokenResponse")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .field("other_keys", &self.other.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenResponse for ProviderTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

impl ProviderTokenResponse {
    /// The token type as callers put it in an `Authorization` header.
    pub fn token_type_name(&self) -> String {
        match &self.token_type {
            BasicTokenType::Bearer => "Bearer".into(),
            BasicTokenType::Mac => "MAC".into(),
            BasicTokenType::Extension(other) => other.clone(),
        }
    }

    /// Granted scopes as one space-delimited string, if the provider said.
    pub fn scope(&self) -> Option<String> {
        self.scopes.as_ref().map(|scopes| {
            scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    /// Non-secret, non-standard fields (e.g. Salesforce `instance_url`).
    pub fn extra(&self) -> Facts {
        Facts::from_map(
            self.other
                .iter()
                .filter(|(key, _)| !NOT_EXTRA.contains(&key.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}
