//! The presets' resolved endpoints and settings.

use super::*;

fn resolve(kind: ProviderKind, settings: PresetSettings<'_>) -> ProviderProfile {
    ProviderProfile::resolve(kind, &settings, "connections.t").expect("valid preset")
}

/// The documented production token endpoints (sources on each preset above).
#[test]
fn token_endpoints_and_client_authentication() {
    let cases = [
        (
            ProviderKind::Xero,
            PresetSettings::default(),
            "https://identity.xero.com/connect/token",
            ClientAuth::Basic,
        ),
        (
            ProviderKind::Google,
            PresetSettings::default(),
            "https://oauth2.googleapis.com/token",
            ClientAuth::Post,
        ),
        (
            ProviderKind::ExactOnline,
            PresetSettings {
                region: Some("us"),
                ..Default::default()
            },
            "https://start.exactonline.com/api/oauth2/token",
            ClientAuth::Post,
        ),
        (
            ProviderKind::Microsoft,
            PresetSettings {
                tenant: Some("common"),
                ..Default::default()
            },
            "https://login.microsoftonline.com/common/oauth2/v2.0/token",
            ClientAuth::Post,
        ),
        (
            ProviderKind::Quickbooks,
            PresetSettings::default(),
            "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
            ClientAuth::Basic,
        ),
        (
            ProviderKind::Salesforce,
            PresetSettings {
                domain: Some("https://acme.my.salesforce.com/"),
                ..Default::default()
            },
            "https://acme.my.salesforce.com/services/oauth2/token",
            ClientAuth::Post,
        ),
        (
            ProviderKind::Hubspot,
            PresetSettings::default(),
            "https://api.hubapi.com/oauth/v3/token",
            ClientAuth::Post,
        ),
    ];
    for (kind, settings, token_url, auth) in cases {
        let preset = resolve(kind, settings);
        assert_eq!(preset.token_url.as_deref(), Some(token_url), "{kind:?}");
        assert_eq!(preset.client_auth, auth, "{kind:?}");
    }
}

#[test]
fn timer_facts_per_preset() {
    let day = 86_400;
    let xero = resolve(ProviderKind::Xero, PresetSettings::default());
    assert_eq!(xero.idle_lifetime, Some(Duration::from_secs(60 * day)));
    let exact = resolve(ProviderKind::ExactOnline, PresetSettings::default());
    assert_eq!(exact.idle_lifetime, Some(Duration::from_secs(30 * day)));
    assert_eq!(exact.min_refresh_interval, Duration::from_secs(570));
    assert_eq!(
        exact.token_url.as_deref(),
        Some("https://start.exactonline.nl/api/oauth2/token")
    );
    let quickbooks = resolve(ProviderKind::Quickbooks, PresetSettings::default());
    assert_eq!(
        quickbooks.idle_lifetime,
        Some(Duration::from_secs(100 * day))
    );
    assert_eq!(quickbooks.callback_params, &[("realmId", Fact::RealmId)]);
}

#[test]
fn settings_are_checked() {
    let err = |kind, settings| {
        ProviderProfile::resolve(kind, &settings, "connections.t")
            .expect_err("must be refused")
            .to_string()
    };
    assert!(err(
        ProviderKind::ExactOnline,
        PresetSettings {
            region: Some("xx"),
            ..Default::default()
        }
    )
    .contains("connections.t.region"));
    assert!(err(
        ProviderKind::Xero,
        PresetSettings {
            region: Some("nl"),
            ..Default::default()
        }
    )
    .contains("does not apply"));
    assert!(err(
        ProviderKind::Salesforce,
        PresetSettings {
            domain: Some("prod"),
            ..Default::default()
        }
    )
    .contains("connections.t.domain"));
    assert!(err(ProviderKind::Oidc, PresetSettings::default()).contains("connections.t.issuer"));
    assert!(err(
        ProviderKind::Microsoft,
        PresetSettings {
            tenant: Some("a/b"),
            ..Default::default()
        }
    )
    .contains("connections.t.tenant"));
}
