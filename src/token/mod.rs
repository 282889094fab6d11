//! What the broker keeps per connection, and the answer `/api/refresh` gives from it.

use chrono::{DateTime, Utc};
use oauth2::{AccessToken, RefreshToken};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

mod facts;

use crate::presets::Fact;

pub use facts::{Facts, Id, Organisation};

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
    /// What the consent and the provider's answers taught us (organisations, the API
    /// base, ...): non-secret, answered to callers. Stored as `extra`.
    #[serde(default, rename = "extra")]
    pub facts: Facts,
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
        serde_json::to_value(Answer(self, self.access_token.as_ref()?, now)).ok()
    }

    /// The same answer written straight to JSON bytes, without building a map first: the
    /// cached path's answer, where the map was a measurable part of the cost.
    pub fn response_bytes(&self, now: DateTime<Utc>) -> Option<Vec<u8>> {
        serde_json::to_vec(&Answer(self, self.access_token.as_ref()?, now)).ok()
    }
}

/// `/api/refresh`'s answer for a record at a moment: the provider's extras, then the
/// standard fields, which win over an extra of the same name.
struct Answer<'a>(&'a TokenRecord, &'a AccessToken, DateTime<Utc>);

impl Serialize for Answer<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Answer(record, access_token, now) = self;
        let expires_at = record
            .expires_at
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        let written = |key: &str| match key {
            "access_token" | "token_type" | "expires_in" => true,
            "expires_at" => expires_at.is_some(),
            "scope" => record.scope.is_some(),
            _ => false,
        };
        let mut map = serializer.serialize_map(None)?;
        record.facts.write_entries(&mut map, written)?;
        map.serialize_entry("access_token", access_token.secret())?;
        map.serialize_entry("token_type", &record.token_type)?;
        map.serialize_entry("expires_in", &record.remaining(*now).as_secs())?;
        if let Some(expires_at) = &expires_at {
            map.serialize_entry("expires_at", expires_at)?;
        }
        if let Some(scope) = &record.scope {
            map.serialize_entry("scope", scope)?;
        }
        map.end()
    }
}

/// An organisation a consent covers (a Xero tenant, a QuickBooks company, an Exact Online
/// division), as recorded at consent. Not a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub id: String,
    /// The organisation's name, when the provider gives one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl Tenant {
    fn label(&self) -> String {
        if self.name.is_empty() {
            self.id.clone()
        } else {
            format!("{} ({})", self.id, self.name)
        }
    }
}

impl TokenRecord {
    /// The organisations the consent covers: Xero's tenants, QuickBooks' company
    /// (`realm_id`), Exact Online's current division.
    pub fn tenants(&self) -> Vec<Tenant> {
        if let Some(all) = &self.facts.organisations {
            return all
                .iter()
                .map(|o| Tenant {
                    id: o.tenant_id.clone(),
                    name: o.tenant_name.clone().unwrap_or_default(),
                })
                .collect();
        }
        [Fact::RealmId, Fact::Division]
            .into_iter()
            .filter_map(|fact| self.facts.text(fact))
            .map(|id| Tenant {
                id,
                name: String::new(),
            })
            .collect()
    }

    /// The organisation a caller means: the one `wanted` names (its id, any case, or its
    /// exact name), else the only one. Unknown, ambiguous, or several with none named: an
    /// error that lists the choices by id and name.
    pub fn pick_tenant(&self, wanted: Option<&str>) -> Result<Option<Tenant>, TenantError> {
        let tenants = self.tenants();
        let list = || {
            tenants
                .iter()
                .map(Tenant::label)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match wanted {
            Some(wanted) => {
                let by_id: Vec<&Tenant> = tenants
                    .iter()
                    .filter(|t| t.id.eq_ignore_ascii_case(wanted))
                    .collect();
                let by_name: Vec<&Tenant> =
                    tenants.iter().filter(|t| t.name == wanted).collect();
                match (by_id.as_slice(), by_name.as_slice()) {
                    ([only], _) | ([], [only]) => Ok(Some((*only).clone())),
                    ([], []) if tenants.is_empty() => Err(TenantError::Unknown(format!(
                        "tenant `{wanted}`: this connection's consent recorded no organisations"
                    ))),
                    ([], []) => Err(TenantError::Unknown(format!(
                        "tenant `{wanted}` is not one this connection was granted: {}",
                        list()
                    ))),
                    _ => Err(TenantError::Ambiguous(format!(
                        "tenant `{wanted}` names several organisations: use the id ({})",
                        list()
                    ))),
                }
            }
            None => match tenants.as_slice() {
                [] => Ok(None),
                [only] => Ok(Some(only.clone())),
                _ => Err(TenantError::Ambiguous(format!(
                    "this connection was granted several organisations: name one with ?tenant= ({})",
                    list()
                ))),
            },
        }
    }
}

/// Why no organisation could be picked; the message lists the choices by id and name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenantError {
    /// The named organisation is not one the consent recorded (a 404: like an unknown
    /// connection, the data is not there).
    #[error("{0}")]
    Unknown(String),
    /// A name several organisations share, or several and none named (a 400: the request
    /// must say which).
    #[error("{0}")]
    Ambiguous(String),
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
            facts: Facts::from_map(serde_json::Map::from_iter([
                ("instance_url".into(), Value::from("https://x.example")),
                ("access_token".into(), Value::from("spoofed")),
            ])),
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

    #[test]
    fn the_written_answer_is_the_mapped_answer() {
        let now = Utc::now();
        let record = record(600);
        let written: Value =
            serde_json::from_slice(&record.response_bytes(now).expect("bytes")).expect("json");
        assert_eq!(Some(written), record.to_response(now));
    }
}

#[cfg(test)]
mod tenant_tests {
    use super::*;

    fn with_extra(extra: Value) -> TokenRecord {
        let now = Utc::now();
        TokenRecord {
            status: GrantStatus::Connected,
            access_token: None,
            token_type: "Bearer".into(),
            expires_at: None,
            refresh_token: None,
            scope: None,
            facts: serde_json::from_value(extra).expect("facts"),
            obtained_at: now,
            consented_at: now,
            last_error: None,
        }
    }

    #[test]
    fn a_tenant_is_picked_by_id_or_exact_name_and_otherwise_listed() {
        let xero = with_extra(serde_json::json!({"tenants": [
            {"tenant_id": "aaa-1", "tenant_name": "Demo Co"},
            {"tenant_id": "bbb-2", "tenant_name": "Other Ltd"},
            {"tenant_id": "ccc-3", "tenant_name": "Other Ltd"},
        ]}));
        assert_eq!(
            xero.pick_tenant(Some("Demo Co"))
                .expect("name")
                .map(|t| t.id),
            Some("aaa-1".into())
        );
        assert_eq!(
            xero.pick_tenant(Some("BBB-2")).expect("id").map(|t| t.id),
            Some("bbb-2".into())
        );
        let ambiguous = xero
            .pick_tenant(Some("Other Ltd"))
            .expect_err("two by that name");
        assert!(matches!(ambiguous, TenantError::Ambiguous(_)));
        let ambiguous = ambiguous.to_string();
        assert!(
            ambiguous.contains("several") && ambiguous.contains("ccc-3 (Other Ltd)"),
            "{ambiguous}"
        );
        let unknown = xero
            .pick_tenant(Some("demo co"))
            .expect_err("names are exact");
        assert!(matches!(unknown, TenantError::Unknown(_)));
        let unknown = unknown.to_string();
        assert!(unknown.contains("aaa-1 (Demo Co)"), "{unknown}");
        let several = xero.pick_tenant(None).expect_err("none named");
        assert!(matches!(several, TenantError::Ambiguous(_)));
        let several = several.to_string();
        assert!(several.contains("bbb-2 (Other Ltd)"), "{several}");

        let quickbooks =
            with_extra(serde_json::json!({"realm_id": "9130355", "api_base_url": "x"}));
        assert_eq!(
            quickbooks.pick_tenant(None).expect("only").map(|t| t.id),
            Some("9130355".into())
        );
        assert!(quickbooks
            .pick_tenant(Some("123"))
            .expect_err("unknown")
            .to_string()
            .contains("9130355"));
        let exact = with_extra(serde_json::json!({"division": 1234567}));
        assert_eq!(
            exact
                .pick_tenant(Some("1234567"))
                .expect("id")
                .map(|t| t.id),
            Some("1234567".into())
        );
        let none = with_extra(serde_json::json!({}));
        assert_eq!(none.pick_tenant(None), Ok(None));
        assert!(matches!(
            none.pick_tenant(Some("x")),
            Err(TenantError::Unknown(_))
        ));
    }
}
