//! Provider presets: what `provider = "xero"` (and friends) means — endpoints, client
//! authentication, scopes and parameters a provider insists on, token lifetimes, and the
//! lookups callers need after consent. Every URL stays overridable in the config (tests,
//! sovereign clouds, sandboxes).
//!
//! Sources are cited per preset: each provider's public developer documentation.
//!
//! Longer than the house's ~500 lines on purpose: it is the one table where providers are
//! compared, one arm each with its sources, and a third of it is that table's tests.

use std::time::Duration;

use url::Url;

use serde::Deserialize;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// HTTP Basic with the form-encoded client id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// Provider kinds: a generic OAuth 2.0 server, or a preset (see [`ProviderProfile::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Any OAuth 2.0 authorization server described by its endpoints.
    Oauth2,
    Xero,
    Google,
    ExactOnline,
    Microsoft,
    Quickbooks,
    Salesforce,
    Hubspot,
    /// Any OpenID Connect provider, from its issuer by discovery.
    Oidc,
}

impl ProviderKind {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Oauth2 => "oauth2",
            ProviderKind::Xero => "xero",
            ProviderKind::Google => "google",
            ProviderKind::ExactOnline => "exact-online",
            ProviderKind::Microsoft => "microsoft",
            ProviderKind::Quickbooks => "quickbooks",
            ProviderKind::Salesforce => "salesforce",
            ProviderKind::Hubspot => "hubspot",
            ProviderKind::Oidc => "oidc",
        }
    }
}

/// A preset setting that is missing or wrong, by the config key it is about. The config
/// turns it into its own error; presets know nothing of the config's types.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct PresetError {
    pub key: String,
    pub message: String,
}

impl PresetError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A value a consent teaches the broker that the broker itself reads back: a preset names
/// one to say where it comes from (a callback parameter) and where it goes (a proxy path
/// placeholder, the proxy's base). `key` is its name in the stored record, in the
/// `/api/refresh` answer and as a `{placeholder}`. (`token::Facts` holds the values.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// The API base the provider names in its token response (Salesforce).
    InstanceUrl,
    /// The company a consent chose (QuickBooks' `realmId` callback parameter).
    RealmId,
    /// The user's current division (Exact Online's `/current/Me`).
    Division,
}

impl Fact {
    pub const fn key(self) -> &'static str {
        match self {
            Fact::InstanceUrl => "instance_url",
            Fact::RealmId => "realm_id",
            Fact::Division => "division",
        }
    }
}

/// Advice for a consent without a refresh token, where the provider has no better.
const OFFLINE_ACCESS: &str =
    "check that the scopes include offline_access (or the provider's equivalent)";

/// What the broker does right after consent (and remembers in the record for callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Xero: `GET {url}` with the new access token lists the authorized tenants
    /// (`tenants`, and `tenant_id` when there is exactly one).
    XeroTenants { url: Url },
    /// Exact Online: `GET {url}` (`/api/v1/current/Me`) gives the current division
    /// (`division`).
    ExactDivision { url: Url },
}

/// Everything that describes a provider, as a preset resolves it for one connection's
/// settings: endpoints, client authentication, required scopes and parameters, lifetimes,
/// the minimum refresh interval, and what callers need besides the token.
#[derive(Debug, Clone)]
pub struct ProviderProfile {
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    /// OIDC discovery: the issuer whose `/.well-known/openid-configuration` gives the
    /// endpoints (read once at startup).
    pub issuer: Option<Url>,
    pub client_auth: ClientAuth,
    /// Scopes the flow cannot work without; added when the config omits them.
    pub required_scopes: &'static [&'static str],
    pub authorize_params: &'static [(&'static str, &'static str)],
    pub default_lifetime: Option<Duration>,
    pub idle_lifetime: Option<Duration>,
    pub min_refresh_interval: Duration,
    pub lookup: Option<Lookup>,
    /// Callback query parameters to keep, as (parameter, the fact it gives).
    pub callback_params: &'static [(&'static str, Fact)],
    /// Refuse a consent that yields no refresh token, with this advice (what usually
    /// causes it at this provider).
    pub require_refresh_token: Option<&'static str>,
    /// Fixed fields for callers (QuickBooks' API base for the chosen environment).
    pub static_extra: Vec<(&'static str, String)>,
    /// Whether the provider replaces the refresh token on use.
    pub rotation: Rotation,
    /// Where the provider's API lives, for the proxy (`/api/proxy/{connection}/…`).
    pub api_base_url: Option<String>,
    /// Otherwise, the token-response field that names it (Salesforce `instance_url`).
    pub api_base_from_record: Option<Fact>,
    /// The header the proxy sends the chosen organisation in (Xero's `xero-tenant-id`).
    pub proxy_tenant_header: Option<&'static str>,
    /// Path placeholders the proxy fills from what the consent recorded: `{key}` is the
    /// fact of that key (QuickBooks' `{realm_id}`, Exact Online's `{division}`).
    pub proxy_path_values: &'static [Fact],
    /// A documented hard limit on a grant's life, counted from consent, whatever is done
    /// with it (QuickBooks' five years).
    pub grant_max_lifetime: Option<Duration>,
}

/// Whether a provider replaces the refresh token when it is used. A copy of a rotating
/// refresh token held by anyone else is spent the moment either side refreshes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Every refresh returns a new refresh token and retires the old one.
    Always,
    /// The refresh token stays the same.
    Never,
    /// The provider's or app's settings decide (Salesforce's rotation option, generic
    /// providers): the broker cannot know.
    Configurable,
}

/// Settings only some presets take.
#[derive(Debug, Default)]
pub struct PresetSettings<'a> {
    pub region: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub domain: Option<&'a str>,
    pub environment: Option<&'a str>,
    pub issuer: Option<&'a str>,
    pub api_url: Option<&'a str>,
}

const DAY: u64 = 86_400;

fn days(n: u64) -> Option<Duration> {
    Some(Duration::from_secs(n * DAY))
}

/// True when `url` points at this machine (`localhost`, 127.0.0.0/8, `::1`): the only
/// place a provider URL may use plain `http`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A URL from a preset setting (`api_url`, `domain`, `issuer`): it will carry tokens, so
/// plain `http` only to this machine.
fn url(key: &str, value: &str) -> Result<Url, PresetError> {
    let url = Url::parse(value)
        .map_err(|err| PresetError::key(key, format!("`{value}` is not a valid URL: {err}")))?;
    if url.scheme() != "https" && !is_loopback(&url) {
        return Err(PresetError::key(
            key,
            "must use https (http is accepted only for localhost / 127.0.0.1)",
        ));
    }
    Ok(url)
}

fn generic(client_auth: ClientAuth) -> ProviderProfile {
    ProviderProfile {
        authorize_url: None,
        token_url: None,
        issuer: None,
        client_auth,
        required_scopes: &[],
        authorize_params: &[],
        default_lifetime: None,
        idle_lifetime: None,
        min_refresh_interval: Duration::ZERO,
        lookup: None,
        callback_params: &[],
        require_refresh_token: None,
        static_extra: Vec::new(),
        rotation: Rotation::Configurable,
        api_base_url: None,
        api_base_from_record: None,
        proxy_tenant_header: None,
        proxy_path_values: &[],
        grant_max_lifetime: None,
    }
}

impl ProviderProfile {
    /// The preset for `kind`, given the connection's preset settings. `key` is the
    /// connection's config key, for errors.
    pub fn resolve(
        kind: ProviderKind,
        settings: &PresetSettings<'_>,
        key: &str,
    ) -> Result<ProviderProfile, PresetError> {
        let allowed: &[&str] = match kind {
            ProviderKind::ExactOnline => &["region", "api_url"],
            ProviderKind::Microsoft => &["tenant"],
            ProviderKind::Salesforce => &["domain"],
            ProviderKind::Quickbooks => &["environment"],
            ProviderKind::Oidc => &["issuer"],
            ProviderKind::Xero => &["api_url"],
            _ => &[],
        };
        for (name, value) in [
            ("region", settings.region),
            ("tenant", settings.tenant),
            ("domain", settings.domain),
            ("environment", settings.environment),
            ("issuer", settings.issuer),
            ("api_url", settings.api_url),
        ] {
            if value.is_some() && !allowed.contains(&name) {
                return Err(PresetError::key(
                    format!("{key}.{name}"),
                    format!("does not apply to provider `{}`", kind.name()),
                ));
            }
        }

        Ok(match kind {
            ProviderKind::Oauth2 => generic(ClientAuth::Basic),

            // https://developer.xero.com/documentation/guides/oauth2/auth-flow/ :
            // Basic auth at the token endpoint, `offline_access` for a refresh token,
            // 30-minute access tokens, refresh tokens rotate and expire after 60 days unused;
            // tenants from GET https://api.xero.com/connections.
            ProviderKind::Xero => {
                let api = settings.api_url.unwrap_or("https://api.xero.com");
                ProviderProfile {
                    authorize_url: Some("https://login.xero.com/identity/connect/authorize".into()),
                    token_url: Some("https://identity.xero.com/connect/token".into()),
                    required_scopes: &["offline_access"],
                    default_lifetime: Some(Duration::from_secs(1800)),
                    idle_lifetime: days(60),
                    lookup: Some(Lookup::XeroTenants {
                        url: url(
                            &format!("{key}.api_url"),
                            &format!("{}/connections", api.trim_end_matches('/')),
                        )?,
                    }),
                    require_refresh_token: Some(OFFLINE_ACCESS),
                    rotation: Rotation::Always,
                    api_base_url: Some(api.trim_end_matches('/').to_owned()),
                    // The organisation goes in `xero-tenant-id` on every API call.
                    proxy_tenant_header: Some("xero-tenant-id"),
                    ..generic(ClientAuth::Basic)
                }
            }

            // https://developers.google.com/identity/protocols/oauth2/web-server :
            // `access_type=offline` for a refresh token, `prompt=consent` to get one again on
            // re-consent; credentials in the body. A refresh token unused for six months
            // dies (https://developers.google.com/identity/protocols/oauth2#expiration). Apps
            // in "Testing" status get refresh tokens that die 7 days after consent whatever
            // is done with them: only publishing the app avoids that.
            ProviderKind::Google => ProviderProfile {
                authorize_url: Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
                token_url: Some("https://oauth2.googleapis.com/token".into()),
                authorize_params: &[("access_type", "offline"), ("prompt", "consent")],
                idle_lifetime: days(180),
                require_refresh_token: Some("Google issues one only with access_type=offline and prompt=consent (the preset sends both); remove the app's access at https://myaccount.google.com/permissions and consent again"),
                rotation: Rotation::Never,
                api_base_url: Some("https://www.googleapis.com".into()),
                ..generic(ClientAuth::Post)
            },

            // https://support.exactonline.com/community/s/knowledge-base#All-All-DNO-Content-oauth-eol-oauth-dev-impleovervw :
            // regional sites, credentials in the body, 10-minute access tokens, rotating
            // refresh tokens that expire after 30 days; a new access token cannot be had
            // within ~9.5 minutes of the last.
            ProviderKind::ExactOnline => {
                let region = settings.region.unwrap_or("nl");
                let domain = match region {
                    "nl" => "nl",
                    "be" => "be",
                    "de" => "de",
                    "uk" => "co.uk",
                    "us" => "com",
                    "es" => "es",
                    "fr" => "fr",
                    other => {
                        return Err(PresetError::key(
                            format!("{key}.region"),
                            format!(
                            "unknown Exact Online region `{other}` (nl, be, de, uk, us, es, fr)"
                        ),
                        ))
                    }
                };
                let base = format!("https://start.exactonline.{domain}");
                // The REST API lives on the same site; `api_url` moves only the API.
                let api = settings
                    .api_url
                    .map_or(base.as_str(), |u| u.trim_end_matches('/'));
                ProviderProfile {
                    authorize_url: Some(format!("{base}/api/oauth2/auth")),
                    token_url: Some(format!("{base}/api/oauth2/token")),
                    default_lifetime: Some(Duration::from_secs(600)),
                    idle_lifetime: days(30),
                    min_refresh_interval: Duration::from_secs(570),
                    lookup: Some(Lookup::ExactDivision {
                        url: url(
                            &format!("{key}.api_url"),
                            &format!("{api}/api/v1/current/Me?$select=CurrentDivision"),
                        )?,
                    }),
                    require_refresh_token: Some(OFFLINE_ACCESS),
                    rotation: Rotation::Always,
                    api_base_url: Some(api.to_owned()),
                    // `/api/v1/{division}/…`: the division read after consent.
                    proxy_path_values: &[Fact::Division],
                    ..generic(ClientAuth::Post)
                }
            }

            // https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow :
            // per-tenant v2.0 endpoints, `offline_access` for a refresh token, secret in the
            // body; refresh tokens last 90 days and are replaced on every use.
            ProviderKind::Microsoft => {
                let tenant = settings.tenant.unwrap_or("organizations");
                if tenant.is_empty()
                    || !tenant
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                {
                    return Err(PresetError::key(
                        format!("{key}.tenant"),
                        "a tenant id, domain, `organizations`, `common` or `consumers`",
                    ));
                }
                let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
                ProviderProfile {
                    authorize_url: Some(format!("{base}/authorize")),
                    token_url: Some(format!("{base}/token")),
                    required_scopes: &["offline_access"],
                    idle_lifetime: days(90),
                    require_refresh_token: Some(OFFLINE_ACCESS),
                    rotation: Rotation::Always,
                    api_base_url: Some("https://graph.microsoft.com".into()),
                    ..generic(ClientAuth::Post)
                }
            }

            // https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-2.0 :
            // Basic auth, `realmId` on the redirect, refresh tokens roll over (a new one at
            // least every 24 hours) and die after 100 days.
            ProviderKind::Quickbooks => {
                let api_base = match settings.environment.unwrap_or("production") {
                    "production" => "https://quickbooks.api.intuit.com",
                    "sandbox" => "https://sandbox-quickbooks.api.intuit.com",
                    other => {
                        return Err(PresetError::key(
                            format!("{key}.environment"),
                            format!("`{other}`: expected `production` or `sandbox`"),
                        ))
                    }
                };
                ProviderProfile {
                    authorize_url: Some("https://appcenter.intuit.com/connect/oauth2".into()),
                    token_url: Some(
                        "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer".into(),
                    ),
                    idle_lifetime: days(100),
                    // "5 years" maximum from the original authorization, whatever the refreshes.
                    grant_max_lifetime: days(5 * 365 + 1),
                    callback_params: &[("realmId", Fact::RealmId)],
                    require_refresh_token: Some(OFFLINE_ACCESS),
                    static_extra: vec![("api_base_url", api_base.to_owned())],
                    rotation: Rotation::Always,
                    api_base_url: Some(api_base.to_owned()),
                    // `/v3/company/{realm_id}/…`: the company from the consent's redirect.
                    proxy_path_values: &[Fact::RealmId],
                    ..generic(ClientAuth::Basic)
                }
            }

            // https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_web_server_flow.htm :
            // login/test/My Domain hosts, no `expires_in` (the session timeout applies),
            // `instance_url` in the token response, `refresh_token` scope.
            ProviderKind::Salesforce => {
                let base = match settings.domain.unwrap_or("login") {
                    "login" => "https://login.salesforce.com".to_owned(),
                    "test" => "https://test.salesforce.com".to_owned(),
                    other if other.starts_with("https://") => other.trim_end_matches('/').to_owned(),
                    other => {
                        return Err(PresetError::key(
                            format!("{key}.domain"),
                            format!("`{other}`: expected `login`, `test` or a My Domain URL (https://…my.salesforce.com)"),
                        ))
                    }
                };
                ProviderProfile {
                    authorize_url: Some(format!("{base}/services/oauth2/authorize")),
                    token_url: Some(format!("{base}/services/oauth2/token")),
                    required_scopes: &["refresh_token"],
                    default_lifetime: Some(Duration::from_secs(2 * 3600)),
                    require_refresh_token: Some(
                        "the connected app needs the refresh_token (or offline_access) scope",
                    ),
                    // The org's API is on its instance, named in every token response.
                    api_base_from_record: Some(Fact::InstanceUrl),
                    ..generic(ClientAuth::Post)
                }
            }

            // https://developers.hubspot.com/docs/api/oauth-quickstart-guide :
            // credentials in the body, 30-minute access tokens; the refresh token stays the same.
            ProviderKind::Hubspot => ProviderProfile {
                authorize_url: Some("https://app.hubspot.com/oauth/authorize".into()),
                token_url: Some("https://api.hubapi.com/oauth/v3/token".into()),
                default_lifetime: Some(Duration::from_secs(1800)),
                require_refresh_token: Some(OFFLINE_ACCESS),
                rotation: Rotation::Never,
                api_base_url: Some("https://api.hubapi.com".into()),
                ..generic(ClientAuth::Post)
            },

            // OpenID Connect Discovery 1.0 §4: `{issuer}/.well-known/openid-configuration`.
            ProviderKind::Oidc => {
                let issuer = settings.issuer.ok_or_else(|| {
                    PresetError::key(format!("{key}.issuer"), "is required for provider `oidc`")
                })?;
                ProviderProfile {
                    issuer: Some(url(&format!("{key}.issuer"), issuer)?),
                    required_scopes: &["openid"],
                    ..generic(ClientAuth::Basic)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
