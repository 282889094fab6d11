//! One connection's settings: its provider preset, endpoints, client and scopes, validated
//! into a [`super::ConnectionConfig`].

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::auth::NOBODY;
use super::values::{
    is_guid, parse_endpoint, positive_secs, require_https_off_loopback, validate_secret_name,
};
use super::{
    ClientAuth, ConfigError, ConnectionConfig, Endpoints, GrantLifetime, ProviderKind, ProxyBase,
    ProxyConfig,
};
use crate::presets::{PresetSettings, ProviderProfile, Rotation};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnection {
    provider: ProviderKind,
    authorize_url: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_name: Option<String>,
    mirror_refresh_token_secret: Option<String>,
    client_auth: Option<ClientAuth>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    authorize_params: BTreeMap<String, String>,
    default_lifetime: Option<u64>,
    refresh_token_idle_days: Option<u64>,
    /// Days a grant lives from consent, whatever is done with it (a Google app in
    /// "testing" status: 7); replaces the preset's hard limit.
    grant_lifetime_days: Option<u64>,
    min_refresh_interval: Option<u64>,
    region: Option<String>,
    tenant: Option<String>,
    domain: Option<String>,
    environment: Option<String>,
    issuer: Option<String>,
    api_url: Option<String>,
    /// Where the provider's API lives, for the proxy (presets know theirs).
    api_base_url: Option<String>,
    /// The proxy route for this connection (default on when an API base URL is known).
    proxy: Option<bool>,
    /// Who may take this connection's tokens: key names and Entra object ids (checked
    /// against `[auth]` by `auth::check_callers`).
    callers: Option<Vec<String>>,
}

/// Authorization parameters the broker sets itself; configuring them would break the flow.
pub(super) const RESERVED_AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
];

impl RawConnection {
    /// The settings that identify the client to the provider, for the placeholder check.
    pub(super) fn credentials(&self) -> Vec<(&'static str, &str)> {
        [
            ("client_id", self.client_id.as_deref()),
            ("client_secret", self.client_secret.as_deref()),
        ]
        .into_iter()
        .filter_map(|(field, value)| Some((field, value?)))
        .collect()
    }

    pub(super) fn validate(self, key: &str) -> Result<ConnectionConfig, ConfigError> {
        let preset = ProviderProfile::resolve(
            self.provider,
            &PresetSettings {
                region: self.region.as_deref(),
                tenant: self.tenant.as_deref(),
                domain: self.domain.as_deref(),
                environment: self.environment.as_deref(),
                issuer: self.issuer.as_deref(),
                api_url: self.api_url.as_deref(),
            },
            key,
        )?;
        let required = |field: &str, value: Option<String>| {
            value
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| ConfigError::key(format!("{key}.{field}"), "is required"))
        };
        // Configured endpoints win over the preset's (tests, sandboxes, sovereign clouds).
        let endpoints = match (&preset.issuer, &self.authorize_url, &self.token_url) {
            (Some(issuer), None, None) => {
                require_https_off_loopback(&format!("{key}.issuer"), issuer)?;
                Endpoints::Discover {
                    issuer: issuer.clone(),
                }
            }
            _ => {
                let authorize_url = required(
                    "authorize_url",
                    self.authorize_url.or(preset.authorize_url.clone()),
                )?;
                let token_url = required("token_url", self.token_url.or(preset.token_url.clone()))?;
                Endpoints::Static {
                    authorize_url: parse_endpoint(&format!("{key}.authorize_url"), &authorize_url)?,
                    token_url: parse_endpoint(&format!("{key}.token_url"), &token_url)?,
                }
            }
        };
        let client_id = required("client_id", self.client_id)?;
        for param in self.authorize_params.keys() {
            if RESERVED_AUTHORIZE_PARAMS.contains(&param.as_str()) {
                return Err(ConfigError::key(
                    format!("{key}.authorize_params.{param}"),
                    "is set by the broker itself and cannot be configured",
                ));
            }
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            if scope.is_empty() || scope.contains(char::is_whitespace) {
                return Err(ConfigError::key(
                    format!("{key}.scopes[{i}]"),
                    "a scope must be one non-empty word without spaces",
                ));
            }
        }
        let mut scopes = self.scopes;
        let mut added_scopes = Vec::new();
        for required in preset.required_scopes {
            if !scopes.iter().any(|s| s == required) {
                scopes.push((*required).to_owned());
                added_scopes.push((*required).to_owned());
            }
        }
        let mut authorize_params: BTreeMap<String, String> = preset
            .authorize_params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        authorize_params.extend(self.authorize_params);
        for (field, name) in [
            ("client_secret_name", &self.client_secret_name),
            (
                "mirror_refresh_token_secret",
                &self.mirror_refresh_token_secret,
            ),
        ] {
            if let Some(name) = name {
                validate_secret_name(&format!("{key}.{field}"), name)?;
            }
        }
        if self.mirror_refresh_token_secret.is_some() && preset.rotation == Rotation::Always {
            // Whichever side refreshes second would spend a retired token, and strict
            // providers then revoke the grant.
            return Err(ConfigError::key(
                format!("{key}.mirror_refresh_token_secret"),
                format!(
                    "provider `{}` rotates refresh tokens, so a copy for another consumer \
                     is spent at the next refresh (and reusing it can revoke the grant): \
                     let the consumer call /api/refresh instead",
                    self.provider.name()
                ),
            ));
        }
        if self
            .client_secret
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            // Most likely `${NAME}` of an empty app setting: refuse rather than send no secret.
            return Err(ConfigError::key(
                format!("{key}.client_secret"),
                "is empty: set the client secret, or remove the key for a public client",
            ));
        }
        let client_secret = self.client_secret;
        if client_secret.is_some() && self.client_secret_name.is_some() {
            return Err(ConfigError::key(
                format!("{key}.client_secret_name"),
                "set either client_secret or client_secret_name, not both",
            ));
        }
        let proxy_base = match (
            self.proxy,
            self.api_base_url.or(preset.api_base_url.clone()),
            preset.api_base_from_record,
        ) {
            (Some(false), _, _) => None,
            (_, Some(base), _) => {
                let field = format!("{key}.api_base_url");
                let url = parse_endpoint(&field, base.trim_end_matches('/'))?;
                if url.query().is_some() {
                    return Err(ConfigError::key(field, "a base URL cannot have a query"));
                }
                Some(ProxyBase::Fixed(url))
            }
            (_, None, Some(field)) => Some(ProxyBase::FromRecord(field)),
            (Some(true), None, None) => {
                return Err(ConfigError::key(
                    format!("{key}.proxy"),
                    "needs api_base_url: where the provider's API lives",
                ))
            }
            (None, None, None) => None,
        };
        let proxy = proxy_base.map(|base| ProxyConfig {
            base,
            tenant_header: preset.proxy_tenant_header,
            path_values: preset.proxy_path_values,
        });
        Ok(ConnectionConfig {
            callers: self.callers.map(|callers| {
                callers
                    .into_iter()
                    .map(|c| {
                        let c = c.trim();
                        // Object ids as tokens carry them; key names as written.
                        if is_guid(c) {
                            c.to_ascii_lowercase()
                        } else {
                            c.to_owned()
                        }
                    })
                    // The nil GUID stands for nobody, as in `auth.entra`'s lists.
                    .filter(|c| c != NOBODY)
                    .collect()
            }),
            proxy,
            provider: self.provider,
            endpoints,
            client_id,
            client_secret: client_secret.map(SecretString::from),
            client_secret_name: self.client_secret_name,
            mirror_refresh_token_secret: self.mirror_refresh_token_secret,
            client_auth: self.client_auth.unwrap_or(preset.client_auth),
            scopes,
            authorize_params,
            default_lifetime: match self.default_lifetime {
                Some(secs) => Some(positive_secs(&format!("{key}.default_lifetime"), secs)?),
                None => preset.default_lifetime,
            },
            refresh_token_idle_lifetime: match self.refresh_token_idle_days {
                Some(days) => Some(positive_secs(
                    &format!("{key}.refresh_token_idle_days"),
                    days.checked_mul(86_400).ok_or_else(|| {
                        ConfigError::key(format!("{key}.refresh_token_idle_days"), "is too large")
                    })?,
                )?),
                None => preset.idle_lifetime,
            },
            min_refresh_interval: self
                .min_refresh_interval
                .map(Duration::from_secs)
                .unwrap_or(preset.min_refresh_interval),
            grant_lifetime: match self.grant_lifetime_days {
                Some(days) => Some(GrantLifetime {
                    lifetime: positive_secs(
                        &format!("{key}.grant_lifetime_days"),
                        days.checked_mul(86_400).ok_or_else(|| {
                            ConfigError::key(format!("{key}.grant_lifetime_days"), "is too large")
                        })?,
                    )?,
                    configured: true,
                }),
                None => preset.grant_max_lifetime.map(|lifetime| GrantLifetime {
                    lifetime,
                    configured: false,
                }),
            },
            lookup: preset.lookup,
            callback_params: preset.callback_params,
            require_refresh_token: preset.require_refresh_token,
            added_scopes,
            static_extra: preset.static_extra,
        })
    }
}

pub(super) fn validate_connection_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::key(
            key,
            "connection names are 1-64 characters of a-z, A-Z, 0-9, `-` and `_`, \
             starting with a letter or digit",
        ))
    }
}
