//! Path placeholders the broker fills from what a consent recorded (QuickBooks' company,
//! Exact Online's division).

/// Values the broker fills into a proxied path from what consent recorded: QuickBooks'
/// company (`realm_id`, from the redirect) and Exact Online's division (`division`, from
/// `/api/v1/current/Me`).
pub(super) const PLACEHOLDERS: &[&str] = &["realm_id", "division"];

/// `rest` with `{realm_id}` / `{division}` (raw or percent-encoded braces) replaced by the
/// connection's recorded values. A placeholder the broker does not know, or one the
/// consent did not record, is the caller's error.
pub(super) fn fill_placeholders(
    rest: &str,
    extra: &serde_json::Map<String, serde_json::Value>,
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
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "`{{{name}}}` is not a placeholder the broker fills in (it knows {{realm_id}} for QuickBooks and {{division}} for Exact Online)"
            ));
        }
        let value = match extra.get(name) {
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(serde_json::Value::Number(number)) => number.to_string(),
            _ => {
                return Err(format!(
                    "this connection's consent recorded no `{name}` to fill in `{{{name}}}`"
                ))
            }
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
        let extra = serde_json::json!({"realm_id": "9130355", "division": 1234567, "bad": "a/b"});
        let extra = extra.as_object().expect("map");
        assert_eq!(
            fill_placeholders("v3/company/{realm_id}/query", extra).as_deref(),
            Ok("v3/company/9130355/query")
        );
        assert_eq!(
            fill_placeholders("api/v1/%7Bdivision%7d/x/%7bdivision}", extra).as_deref(),
            Ok("api/v1/1234567/x/1234567")
        );
        assert_eq!(
            fill_placeholders("plain/path%7", extra).as_deref(),
            Ok("plain/path%7")
        );
        assert_eq!(fill_placeholders("a{b", extra).as_deref(), Ok("a{b"));
        assert!(fill_placeholders("{bad}", extra).is_err(), "unknown name");
        assert!(fill_placeholders("{tenant_id}/x", extra).is_err());
        let none = serde_json::Map::new();
        let err = fill_placeholders("{division}", &none).expect_err("not recorded");
        assert!(err.contains("recorded no `division`"), "{err}");
        let hostile = serde_json::json!({"realm_id": "../admin"});
        assert!(fill_placeholders("{realm_id}", hostile.as_object().expect("map")).is_err());
    }
}
