//! What the broker keeps per connection, and the answer `/api/refresh` gives from it.

use chrono::{DateTime, Utc};
use oauth2::{AccessToken, RefreshToken};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;

/// Whether a connection can be served without a person consenting (again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantStatus {
    /// Tokens are present and the grant is believed alive.
    Connected,
    /// The provider declared the grant dead (`invalid_grant`); an admin must consent again.
    ConsentRequired,
}

/// The stored state of one connection. Secrets are `oauth2` types, which print as
/// `AccessToken([redacted])`, so a `Debug` of a record never leaks them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    pub status: GrantStatus,
    pub access_token: Option<AccessToken>,
    pub token_type: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub refresh_token: Option<RefreshToken>,
    pub scope: Option<String>,
    /// Non-secret fields the provider returned that callers need (e.g. `instance_url`).
    #[serde(default)]
    pub extra: Map<String, Value>,
    /// When the current access token was obtained.
    pub obtained_at: DateTime<Utc>,
    /// When the grant was (re)established by consent.
    pub consented_at: DateTime<Utc>,
    /// A short, secret-free description of the last failure, if the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

impl TokenRecord {
    /// Life left on the access token at `now`; zero when expired or absent.
    pub fn remaining(&self, now: DateTime<Utc>) -> Duration {
        match (&self.access_token, self.expires_at) {
            (Some(_), Some(expires_at)) => (expires_at - now).to_std().unwrap_or(Duration::ZERO),
            _ => Duration::ZERO,
        }
    }

    /// True when this record replaces `other`: a later consent, or a later refresh of the
    /// same grant. A refresh of an older grant never replaces a newer consent.
    pub fn supersedes(&self, other: &TokenRecord) -> bool {
        if self.consented_at != other.consented_at {
            self.consented_at > other.consented_at
        } else {
            self.obtained_at > other.obtained_at
        }
    }

    /// True when the access token has more than `min_validity` left.
    pub fn is_valid_for(&self, min_validity: Duration, now: DateTime<Utc>) -> bool {
        self.status == GrantStatus::Connected
            && self.access_token.is_some()
            && self.remaining(now) > min_validity
    }

    /// The JSON object `/api/refresh` answers. Standard fields win over provider extras.
    pub fn to_response(&self, now: DateTime<Utc>) -> Option<Value> {
        let access_token = self.access_token.as_ref()?;
        let mut body = Map::new();
        for (key, value) in &self.extra {
            body.insert(key.clone(), value.clone());
        }
        body.insert("access_token".into(), access_token.secret().clone().into());
        body.insert("token_type".into(), self.token_type.clone().into());
        body.insert("expires_in".into(), self.remaining(now).as_secs().into());
        if let Some(expires_at) = self.expires_at {
            body.insert(
                "expires_at".into(),
                expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    .into(),
            );
        }
        if let Some(scope) = &self.scope {
            body.insert("scope".into(), scope.clone().into());
        }
        Some(Value::Object(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(expires_in: i64) -> TokenRecord {
        let now = Utc::now();
        TokenRecord {
            status: GrantStatus::Connected,
            access_token: Some(AccessToken::new("at-secret".into())),
            token_type: "Bearer".into(),
            expires_at: Some(now + chrono::Duration::seconds(expires_in)),
            refresh_token: Some(RefreshToken::new("rt-secret".into())),
            scope: Some("openid api:read".into()),
            extra: Map::from_iter([
                ("instance_url".into(), Value::from("https://x.example")),
                ("access_token".into(), Value::from("spoofed")),
            ]),
            obtained_at: now,
            consented_at: now,
            last_error: None,
        }
    }

    #[test]
    fn a_newer_consent_supersedes_any_refresh_of_the_older_grant() {
        let old = record(600);
        let mut refreshed = old.clone();
        refreshed.obtained_at = old.obtained_at + chrono::Duration::seconds(60);
        assert!(refreshed.supersedes(&old));
        assert!(!old.supersedes(&refreshed));
        let mut consent = old.clone();
        consent.consented_at = old.consented_at + chrono::Duration::seconds(30);
        consent.obtained_at = consent.consented_at;
        // The old grant was refreshed after the consent: the consent still wins.
        assert!(consent.supersedes(&refreshed));
        assert!(!refreshed.supersedes(&consent));
        assert!(!old.supersedes(&old));
    }

    #[test]
    fn validity_respects_min_validity() {
        let now = Utc::now();
        let r = record(600);
        assert!(r.is_valid_for(Duration::from_secs(300), now));
        assert!(!r.is_valid_for(Duration::from_secs(900), now));
        assert!(!record(-5).is_valid_for(Duration::ZERO, now));
    }

    #[test]
    fn response_has_standard_fields_and_extras() {
        let now = Utc::now();
        let body = record(600).to_response(now).expect("has a token");
        assert_eq!(body["access_token"], "at-secret");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["instance_url"], "https://x.example");
        assert_eq!(body["scope"], "openid api:read");
        let expires_in = body["expires_in"].as_u64().expect("number");
        assert!((598..=600).contains(&expires_in), "{expires_in}");
        let at = body["expires_at"].as_str().expect("string");
        assert!(DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
        assert!(body.get("refresh_token").is_none());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let text = format!("{:?}", record(600));
        assert!(
            !text.contains("at-secret") && !text.contains("rt-secret"),
            "{text}"
        );
    }
}
