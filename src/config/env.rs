//! `${NAME}` expansion in every string of the parsed TOML tree, tracking each value's key.

use super::ConfigError;

/// Expands `${NAME}` in every string of the tree. `path` is the dotted key of `value`;
/// the values substituted are collected in `expanded` (to keep them out of errors).
pub(super) fn expand_env(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    expanded: &mut Vec<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => {
            *s = expand_str(s, path, env, expanded)?;
            if is_unresolved_reference(s) {
                return Err(unresolved(path, "the value"));
            }
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, expanded)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                expand_env(item, path, env, expanded)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

pub(super) fn expand_str(
    s: &str,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    expanded: &mut Vec<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::key(key, "unterminated `${` (expected `${NAME}`)"))?;
        let name = &after[..end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(ConfigError::key(
                key,
                format!("`${{{name}}}` is not a valid environment variable reference"),
            ));
        }
        let value = env(name).ok_or_else(|| {
            ConfigError::key(key, format!("environment variable {name} is not set"))
        })?;
        if is_unresolved_reference(&value) {
            return Err(unresolved(key, &format!("environment variable {name}")));
        }
        out.push_str(&value);
        expanded.push(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// True for the literal text App Service leaves in an app setting whose Key Vault or App
/// Configuration reference it could not resolve (Azure App Service documentation, "Use Key
/// Vault references"): never a credential.
pub(super) fn is_unresolved_reference(value: &str) -> bool {
    let value = value.trim_start().to_ascii_lowercase();
    value.starts_with("@microsoft.keyvault(") || value.starts_with("@microsoft.appconfiguration(")
}

/// The error for an unresolved reference, naming where it was found but never its text.
pub(super) fn unresolved(key: &str, what: &str) -> ConfigError {
    ConfigError::key(
        key,
        format!(
            "{what} is an unresolved Key Vault or App Configuration reference: the platform could \
             not read the secret it names. Give the app's identity access to it (Key Vault \
             Secrets User), then restart the app"
        ),
    )
}
