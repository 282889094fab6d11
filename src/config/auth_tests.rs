//! `[auth.admin_sign_in]`: what it needs, and what it refuses (each error naming its key).

use super::*;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const APP: &str = "1b7c0c5e-0000-4000-8000-0000000000a1";

fn config(auth: &str) -> Result<Config, ConfigError> {
    let text = format!(
        r#"
        [auth]
        admin_keys = ["break-glass-key-0123456789"]
        {auth}

        [connections.acme]
        provider = "oauth2"
        authorize_url = "https://id.acme.example/auth"
        token_url = "https://id.acme.example/token"
        client_id = "client-1"
        client_secret = "secret-1"
        "#
    );
    Config::parse(&text, &|name| {
        (name == "SIGN_IN_SECRET").then(|| "a-client-secret-of-the-app".to_owned())
    })
}

fn entra(extra: &str) -> String {
    format!("[auth.entra]\ntenant_id = \"{TENANT}\"\n{extra}\n")
}

fn app() -> String {
    APP.to_owned()
}

#[test]
fn sign_in_alone_needs_neither_audiences_nor_principals() {
    let text = format!(
        "{}[auth.admin_sign_in]\nclient_id = \"{}\"\nclient_secret = \"${{SIGN_IN_SECRET}}\"",
        entra(""),
        app()
    );
    let config = config(&text).expect("valid");
    let sign_in = config.auth.admin_sign_in.expect("sign-in");
    assert_eq!(sign_in.client_id, app());
    assert!(matches!(sign_in.credential, SignInCredential::Secret(_)));
    assert!(
        config.warnings.iter().all(|w| !w.contains("auth.entra")),
        "the app role admits: {:?}",
        config.warnings
    );
    // Without sign-in, the same [auth.entra] names nobody and no audience.
    let error = config_err(&entra(""));
    assert!(error.contains("auth.entra.audiences"), "{error}");
}

#[test]
fn the_managed_identity_is_a_credential_without_a_secret() {
    let text = format!(
        "{}[auth.admin_sign_in]\nclient_id = \"{}\"\nclient_assertion = \"managed-identity\"\n\
         managed_identity_client_id = \"{}\"",
        entra(""),
        app(),
        app()
    );
    let config = config(&text).expect("valid");
    assert!(matches!(
        config.auth.admin_sign_in.expect("sign-in").credential,
        SignInCredential::ManagedIdentity(Some(_))
    ));
}

fn config_err(auth: &str) -> String {
    config(auth).expect_err("refused").to_string()
}

#[test]
fn sign_in_refuses_what_would_admit_nobody_or_leak() {
    let sign_in = |body: &str| format!("{}[auth.admin_sign_in]\n{body}", entra(""));
    let cases = [
        // No tenant.
        (
            format!("[auth.admin_sign_in]\nclient_id = \"{}\"\nclient_secret = \"${{SIGN_IN_SECRET}}\"", app()),
            "auth.admin_sign_in",
            "[auth.entra]",
        ),
        (
            sign_in("client_id = \"broker\"\nclient_secret = \"${SIGN_IN_SECRET}\""),
            "auth.admin_sign_in.client_id",
            "GUID",
        ),
        (
            sign_in(&format!("client_id = \"{}\"", app())),
            "auth.admin_sign_in",
            "client_secret",
        ),
        (
            sign_in(&format!(
                "client_id = \"{}\"\nclient_secret = \"${{SIGN_IN_SECRET}}\"\nclient_assertion = \"managed-identity\"",
                app()
            )),
            "auth.admin_sign_in",
            "not both",
        ),
        (
            sign_in(&format!("client_id = \"{}\"\nclient_assertion = \"certificate\"", app())),
            "auth.admin_sign_in.client_assertion",
            "managed-identity",
        ),
        (
            sign_in(&format!("client_id = \"{}\"\nclient_secret = \"short\"", app())),
            "auth.admin_sign_in.client_secret",
            "16 characters",
        ),
        (
            sign_in(&format!(
                "client_id = \"{}\"\nclient_secret = \"replace-with-the-app-secret\"",
                app()
            )),
            "auth.admin_sign_in.client_secret",
            "placeholder",
        ),
        // Bearer tokens for listed callers still need an audience.
        (
            format!(
                "{}[auth.admin_sign_in]\nclient_id = \"{}\"\nclient_secret = \"${{SIGN_IN_SECRET}}\"",
                entra("allowed_principals = [\"6a1f2c3d-0000-4000-8000-00000000adf1\"]"),
                app()
            ),
            "auth.entra.audiences",
            "audience",
        ),
    ];
    for (text, key, words) in cases {
        let error = config_err(&text);
        assert!(
            error.contains(key) && error.contains(words),
            "{key} / {words}: {error}"
        );
        assert!(!error.contains("a-client-secret-of-the-app"), "{error}");
    }
}
