//! What a consent and the provider's answers teach the broker about a grant, typed: the
//! organisations it covers (Xero), the API base the provider names (Salesforce), the
//! company (QuickBooks) and the division (Exact Online). Everything else a provider sends
//! that callers may need (QuickBooks' `api_base_url`, Salesforce's `id` and `issued_at`) is
//! kept as it came, beside them.
//!
//! Stored as the record's `extra` object under the keys it always had, so a record written
//! before this type reads back as it was. A value that does not have its fact's shape (a
//! provider sending `division` as an object) stays an untyped field rather than failing
//! the record: one odd answer must not make a connection unreadable.

use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::presets::Fact;

/// An identifier as the provider wrote it: QuickBooks' realm is text, Exact Online's
/// division a number; either is answered and stored in its own JSON type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Number(serde_json::Number),
    Text(String),
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Number(number) => write!(f, "{number}"),
            Id::Text(text) => f.write_str(text),
        }
    }
}

/// One organisation a Xero consent covers, as Xero's `/connections` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organisation {
    pub tenant_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_name: Option<String>,
    /// What else the listing says (`tenant_type`), kept for callers.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// Everything a grant taught us that is not a secret. See the module comment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// Xero's organisations (`tenants`); when there is exactly one, the answer also names
    /// it as `tenant_id`.
    pub organisations: Option<Vec<Organisation>>,
    pub instance_url: Option<String>,
    pub realm_id: Option<Id>,
    pub division: Option<Id>,
    /// The provider's other non-secret fields, as it sent them.
    pub rest: Map<String, Value>,
}

const TENANTS: &str = "tenants";
/// Derived from `tenants` (the only organisation), never read back.
const TENANT_ID: &str = "tenant_id";

impl Facts {
    /// Facts from a JSON object: each typed fact taken out when it has its shape, the rest
    /// kept as it is.
    pub fn from_map(mut map: Map<String, Value>) -> Facts {
        fn take<T: DeserializeOwned>(map: &mut Map<String, Value>, key: &str) -> Option<T> {
            let value = map.get(key).filter(|v| !v.is_null())?;
            let typed = T::deserialize(value).ok()?;
            map.remove(key);
            Some(typed)
        }
        let organisations: Option<Vec<Organisation>> = take(&mut map, TENANTS);
        if organisations.is_some() {
            map.remove(TENANT_ID);
        }
        Facts {
            organisations,
            instance_url: take(&mut map, Fact::InstanceUrl.key()),
            realm_id: take(&mut map, Fact::RealmId.key()),
            division: take(&mut map, Fact::Division.key()),
            rest: map,
        }
    }

    /// Plain fields for callers (a preset's fixed ones).
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, String)>) -> Facts {
        Facts::from_map(
            fields
                .into_iter()
                .map(|(key, value)| (key.to_owned(), Value::from(value)))
                .collect(),
        )
    }

    /// `self` with what `newer` says laid over it, field by field: a newer answer wins,
    /// what it does not mention stays.
    pub fn merge(&mut self, newer: Facts) {
        let mut map = self.to_map();
        map.extend(newer.to_map());
        *self = Facts::from_map(map);
    }

    /// A fact as text: for a proxy path, a base URL, a tenant id.
    pub fn text(&self, fact: Fact) -> Option<String> {
        match fact {
            Fact::InstanceUrl => self.instance_url.clone(),
            Fact::RealmId => self.realm_id.as_ref().map(Id::to_string),
            Fact::Division => self.division.as_ref().map(Id::to_string),
        }
    }

    /// Records a fact from text (a callback parameter).
    pub fn set_text(&mut self, fact: Fact, value: String) {
        match fact {
            Fact::InstanceUrl => self.instance_url = Some(value),
            Fact::RealmId => self.realm_id = Some(Id::Text(value)),
            Fact::Division => self.division = Some(Id::Text(value)),
        }
        self.rest.remove(fact.key());
    }

    fn to_map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // Facts always serialize to an object.
            _ => Map::new(),
        }
    }

    /// Writes the facts as entries of `map`, leaving out untyped fields `skip` names (the
    /// `/api/refresh` answer's own fields win over a provider's of the same name).
    pub fn write_entries<M: SerializeMap>(
        &self,
        map: &mut M,
        skip: impl Fn(&str) -> bool,
    ) -> Result<(), M::Error> {
        if let Some(organisations) = &self.organisations {
            map.serialize_entry(TENANTS, organisations)?;
            if let [only] = organisations.as_slice() {
                map.serialize_entry(TENANT_ID, &only.tenant_id)?;
            }
        }
        if let Some(url) = &self.instance_url {
            map.serialize_entry(Fact::InstanceUrl.key(), url)?;
        }
        if let Some(realm) = &self.realm_id {
            map.serialize_entry(Fact::RealmId.key(), realm)?;
        }
        if let Some(division) = &self.division {
            map.serialize_entry(Fact::Division.key(), division)?;
        }
        let typed = |key: &str| match key {
            TENANT_ID => self
                .organisations
                .as_ref()
                .is_some_and(|all| all.len() == 1),
            _ => false,
        };
        for (key, value) in &self.rest {
            if !skip(key) && !typed(key) {
                map.serialize_entry(key, value)?;
            }
        }
        Ok(())
    }
}

impl Serialize for Facts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        self.write_entries(&mut map, |_| false)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Facts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Facts, D::Error> {
        Map::deserialize(deserializer).map(Facts::from_map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stored_extras_read_back_typed_and_write_back_as_they_were() {
        let stored = [
            json!({"tenants": [{"tenant_id": "a-1", "tenant_name": "Demo Co", "tenant_type": "ORGANISATION"}],
                   "tenant_id": "a-1"}),
            json!({"tenants": [{"tenant_id": "a-1", "tenant_type": null}, {"tenant_id": "b-2", "tenant_name": "B"}]}),
            json!({"tenants": []}),
            json!({"realm_id": "9130355", "api_base_url": "https://quickbooks.api.intuit.com"}),
            json!({"division": 1234567}),
            json!({"instance_url": "https://acme.my.salesforce.com", "id": "https://login/id/x", "issued_at": "1"}),
            json!({"division": {"odd": true}, "instance_url": null}),
            json!({}),
        ];
        for before in stored {
            let facts: Facts = serde_json::from_value(before.clone()).expect("reads");
            assert_eq!(serde_json::to_value(&facts).expect("writes"), before);
        }
        let facts: Facts =
            serde_json::from_value(json!({"realm_id": "9130355", "division": 7})).expect("reads");
        assert_eq!(facts.realm_id, Some(Id::Text("9130355".into())));
        assert_eq!(facts.text(Fact::Division).as_deref(), Some("7"));
        assert!(facts.rest.is_empty());
        let odd: Facts = serde_json::from_value(json!({"division": {"odd": true}})).expect("reads");
        assert_eq!((odd.division, odd.rest.len()), (None, 1));
    }

    #[test]
    fn a_newer_answer_wins_field_by_field_and_tenant_id_follows_the_organisations() {
        let mut facts = Facts::from_map(
            json!({"tenants": [{"tenant_id": "a-1"}], "tenant_id": "a-1", "keep": 1, "over": 1})
                .as_object()
                .cloned()
                .expect("object"),
        );
        let newer = json!({"tenants": [{"tenant_id": "a-1"}, {"tenant_id": "b-2"}], "over": 2});
        facts.merge(Facts::from_map(newer.as_object().cloned().expect("object")));
        let written = serde_json::to_value(&facts).expect("writes");
        // Two organisations now: no single `tenant_id` left over from the first consent.
        assert_eq!(
            written,
            json!({"tenants": [{"tenant_id": "a-1"}, {"tenant_id": "b-2"}], "keep": 1, "over": 2})
        );
        facts.set_text(Fact::RealmId, "42".into());
        assert_eq!(facts.text(Fact::RealmId).as_deref(), Some("42"));
    }
}
