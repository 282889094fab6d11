//! Path placeholders the broker fills from what a consent recorded. Which ones a connection
//! has is its preset's business (`ProviderProfile::proxy_path_values`: QuickBooks'
//! `realm_id`, Exact Online's `division`); this file only fills them.

use crate::presets::Fact;
use crate::token::Facts;

/// `rest` with each `{name}` of `names` (raw or percent-encoded braces) replaced by the
/// connection's recorded value of that name. Any other placeholder, or one the consent did
/// not record, is the caller's error.
pub(super) fn fill_placeholders(
    rest: &str,
    facts_named: &[Fact],
    facts: &Facts,
) -> Result<String, String> {
    if !rest.contains('{') && !rest.contains('%') {
        // Most paths have none: nothing to look for.
        return Ok(rest.to_owned());
    }
    let mut out = String::with_capacity(rest.len());
    let mut remaining = rest;
    loop {
        let lower = remaining.to_ascii_lowercase();
        let open = [(lower.find('{'), 1), (lower.find("%7b"), 3)]
            .into_iter()
            .filter_map(|(at, len)| Some((at?, len)))
            .min();
        let Some((at, open_len)) = open else {
            out.push_str(remaining);
            return Ok(out);
        };
        let after = &lower[at + open_len..];
        let close = [(after.find('}'), 1), (after.find("%7d"), 3)]
            .into_iter()
            .filter_map(|(at, len)| Some((at?, len)))
            .min();
        let Some((name_len, close_len)) = close else {
            out.push_str(remaining);
            return Ok(out);
        };
        let name = &remaining[at + open_len..at + open_len + name_len];
        let Some(fact) = facts_named.iter().find(|f| f.key() == name) else {
            let known: Vec<String> = facts_named
                .iter()
                .map(|f| format!("{{{}}}", f.key()))
                .collect();
            return Err(match known.as_slice() {
                [] => format!("`{{{name}}}`: this connection's proxy fills in no placeholders"),
                _ => format!(
                    "`{{{name}}}` is not a placeholder this connection's proxy fills in ({})",
                    known.join(", ")
                ),
            });
        };
        let Some(value) = facts.text(*fact) else {
            return Err(format!(
                "this connection's consent recorded no `{name}` to fill in `{{{name}}}`"
            ));
        };
        if value.is_empty()
            || !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("the recorded `{name}` cannot be used in a path"));
        }
        out.push_str(&remaining[..at]);
        out.push_str(&value);
        remaining = &remaining[at + open_len + name_len + close_len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_take_the_consents_values_and_nothing_else() {
        let facts =
            |json: serde_json::Value| -> Facts { serde_json::from_value(json).expect("facts") };
        let extra =
            &facts(serde_json::json!({"realm_id": "9130355", "division": 1234567, "bad": "a/b"}));
        let quickbooks: &[Fact] = &[Fact::RealmId];
        let exact: &[Fact] = &[Fact::Division];
        assert_eq!(
            fill_placeholders("v3/company/{realm_id}/query", quickbooks, extra).as_deref(),
            Ok("v3/company/9130355/query")
        );
        assert_eq!(
            fill_placeholders("api/v1/%7Bdivision%7d/x/%7bdivision}", exact, extra).as_deref(),
            Ok("api/v1/1234567/x/1234567")
        );
        assert_eq!(
            fill_placeholders("plain/path%7", exact, extra).as_deref(),
            Ok("plain/path%7")
        );
        assert_eq!(fill_placeholders("a{b", exact, extra).as_deref(), Ok("a{b"));
        assert!(
            fill_placeholders("{bad}", exact, extra).is_err(),
            "unknown name"
        );
        assert!(fill_placeholders("{tenant_id}/x", quickbooks, extra).is_err());
        // Only the preset's own: QuickBooks has no division, a generic connection nothing.
        let err = fill_placeholders("{division}", quickbooks, extra).expect_err("not its own");
        assert!(err.contains("({realm_id})"), "{err}");
        let err = fill_placeholders("{realm_id}", &[], extra).expect_err("none at all");
        assert!(err.contains("fills in no placeholders"), "{err}");
        let none = Facts::default();
        let err = fill_placeholders("{division}", exact, &none).expect_err("not recorded");
        assert!(err.contains("recorded no `division`"), "{err}");
        let hostile = facts(serde_json::json!({"realm_id": "../admin"}));
        assert!(fill_placeholders("{realm_id}", quickbooks, &hostile).is_err());
    }
}
