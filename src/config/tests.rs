//! Configuration parsing and validation: every error names its key.

use super::*;

fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

const MINIMAL: &str = r#"
    [auth]
    api_keys = ["${API_KEY}"]

    [connections.acme]
    provider = "oauth2"
    authorize_url = "https://id.acme.example/auth"
    token_url = "https://id.acme.example/token"
    client_id = "${ACME_CLIENT_ID}"
    client_secret = "${ACME_CLIENT_SECRET}"
    client_auth = "post"
    scopes = ["openid", "offline_access"]
    authorize_params = { prompt = "consent" }
"#;

const ENV: &[(&str, &str)] = &[
    ("API_KEY", "0123456789abcdef-key"),
    ("ACME_CLIENT_ID", "client-1"),
    ("ACME_CLIENT_SECRET", "sec"),
];

fn parse_err(text: &str, vars: &'static [(&'static str, &'static str)]) -> String {
    Config::parse(text, &env_of(vars))
        .expect_err("config should be rejected")
        .to_string()
}

#[test]
fn the_defaults_leave_the_timer_ahead_of_callers_and_a_tie_is_warned_about() {
    let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid config");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    let tie = format!("[refresh]\nmin_validity = 900\nprerefresh_window = 900\n{MINIMAL}");
    let config = Config::parse(&tie, &env_of(ENV)).expect("valid config");
    assert_eq!(config.warnings.len(), 1);
    assert!(config.warnings[0].contains("refresh.prerefresh_window"));
}

#[test]
fn expands_environment_and_applies_defaults() {
    let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid config");
    let acme = &config.connections["acme"];
    assert_eq!(acme.client_id, "client-1");
    assert_eq!(acme.client_auth, ClientAuth::Post);
    assert_eq!(acme.authorize_params["prompt"], "consent");
    assert_eq!(config.refresh.min_validity, Duration::from_secs(300));
    assert_eq!(
        config.store,
        StoreConfig::File {
            dir: PathBuf::from(".tokens")
        }
    );
    assert!(config.public_url.is_none());
}

#[test]
fn unset_variable_names_key_and_variable() {
    let err = parse_err(MINIMAL, &[("API_KEY", "0123456789abcdef-key")]);
    assert!(err.contains("connections.acme.client_id"), "{err}");
    assert!(err.contains("ACME_CLIENT_ID"), "{err}");
}

#[test]
fn unknown_provider_names_key() {
    let err = parse_err(&MINIMAL.replace("\"oauth2\"", "\"oauth3\""), ENV);
    assert!(err.contains("connections.acme.provider"), "{err}");
}

#[test]
fn misspelt_field_names_key() {
    let err = parse_err(&MINIMAL.replace("client_auth", "client_ath"), ENV);
    assert!(err.contains("client_ath"), "{err}");
}

#[test]
fn malformed_url_names_key() {
    let err = parse_err(
        &MINIMAL.replace("https://id.acme.example/token", "not a url"),
        ENV,
    );
    assert!(err.contains("connections.acme.token_url"), "{err}");
}

#[test]
fn missing_client_id_names_key() {
    let text = MINIMAL.replace("client_id = \"${ACME_CLIENT_ID}\"", "");
    let err = parse_err(&text, ENV);
    assert!(err.contains("connections.acme.client_id"), "{err}");
}

#[test]
fn refuses_to_run_without_auth_unless_anonymous_is_explicit() {
    let text = MINIMAL.replace("api_keys = [\"${API_KEY}\"]", "");
    let err = parse_err(&text, ENV);
    assert!(err.contains("`auth`"), "{err}");
    let text = MINIMAL.replace("api_keys = [\"${API_KEY}\"]", "allow_anonymous = true");
    assert!(Config::parse(&text, &env_of(ENV)).is_ok());
}

#[test]
fn reserved_authorize_params_are_rejected() {
    let text = MINIMAL.replace("prompt = \"consent\"", "state = \"x\"");
    let err = parse_err(&text, ENV);
    assert!(err.contains("authorize_params.state"), "{err}");
}

#[test]
fn public_url_from_environment_wins() {
    let text = format!("public_url = \"https://file.example/\"\n{MINIMAL}");
    let mut vars = ENV.to_vec();
    vars.push(("BROKER_PUBLIC_URL", "https://env.example/"));
    let vars: &'static [(&str, &str)] = Box::leak(vars.into_boxed_slice());
    let config = Config::parse(&text, &env_of(vars)).expect("valid");
    assert_eq!(
        config.public_url.map(|u| u.to_string()),
        Some("https://env.example/".into())
    );
}

#[test]
fn bad_connection_name_is_rejected() {
    let err = parse_err(
        &MINIMAL.replace("connections.acme", "connections.\"a b\""),
        ENV,
    );
    assert!(err.contains("connections.a b"), "{err}");
}

#[test]
fn key_vault_url_selects_the_vault_store() {
    let mut vars = ENV.to_vec();
    vars.push(("KEY_VAULT_URL", "https://my-vault.vault.azure.net/"));
    let vars: &'static [(&str, &str)] = Box::leak(vars.into_boxed_slice());
    let config = Config::parse(MINIMAL, &env_of(vars)).expect("valid");
    let StoreConfig::KeyVault(vault) = config.store else {
        panic!("expected the Key Vault store");
    };
    assert_eq!(
        vault.vault_url.as_str(),
        "https://my-vault.vault.azure.net/"
    );
    assert_eq!(vault.secret_name("my_conn"), "token-broker-my-conn");
    assert_eq!(vault.credential, CredentialKind::Auto);
}

#[test]
fn key_vault_names_are_checked() {
    let vault = "[store]\nkind = \"key-vault\"\nvault_url = \"https://v.vault.azure.net\"\n";
    let text = format!("{vault}{MINIMAL}").replace(
        "client_auth = \"post\"",
        "client_auth = \"post\"\nmirror_refresh_token_secret = \"bad_name\"",
    );
    let err = parse_err(&text, ENV);
    assert!(
        err.contains("connections.acme.mirror_refresh_token_secret"),
        "{err}"
    );

    let text = format!("{vault}{MINIMAL}\n[connections.a_b]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n[connections.a-b]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n");
    let err = parse_err(&text, ENV);
    assert!(err.contains("already used"), "{err}");

    let err = parse_err(&format!("[store]\nkind = \"key-vault\"\n{MINIMAL}"), ENV);
    assert!(err.contains("store.vault_url"), "{err}");
}

#[test]
fn vault_features_need_the_vault_store() {
    let text = MINIMAL.replace(
        "client_secret = \"${ACME_CLIENT_SECRET}\"",
        "client_secret_name = \"acme-secret\"",
    );
    let err = parse_err(&text, ENV);
    assert!(err.contains("connections.acme.client_secret_name"), "{err}");
    assert!(err.contains("Key Vault"), "{err}");
}

#[test]
fn errors_do_not_quote_values_from_the_environment() {
    let text = MINIMAL.replace(
        "client_auth = \"post\"",
        "client_auth = \"${ACME_CLIENT_SECRET}\"",
    );
    let vars: &'static [(&str, &str)] = &[
        ("API_KEY", "0123456789abcdef-key"),
        ("ACME_CLIENT_ID", "client-1"),
        ("ACME_CLIENT_SECRET", "very-secret-value"),
    ];
    let err = parse_err(&text, vars);
    assert!(err.contains("connections.acme.client_auth"), "{err}");
    assert!(!err.contains("very-secret-value"), "{err}");
}

#[test]
fn unterminated_reference_is_rejected() {
    let err = parse_err(&MINIMAL.replace("${ACME_CLIENT_ID}", "${ACME"), ENV);
    assert!(err.contains("unterminated"), "{err}");
}

#[test]
fn an_entra_tenant_must_be_its_guid() {
    let with_tenant = |tenant: &str| {
        format!(
            "[auth.entra]\ntenant_id = \"{tenant}\"\naudiences = [\"api://x\"]\nallowed_principals = [\"00000000-0000-0000-0000-0000000000a1\"]\n{MINIMAL}"
        )
    };
    let err = Config::parse(&with_tenant("contoso.com"), &env_of(ENV))
        .expect_err("a domain is refused")
        .to_string();
    assert!(err.contains("auth.entra.tenant_id"), "{err}");
    assert!(err.contains("GUID"), "{err}");
    let config = Config::parse(
        &with_tenant("72f988bf-86f1-41af-91ab-2d7cd011db47"),
        &env_of(ENV),
    )
    .expect("a GUID is accepted");
    assert!(config.auth.entra.is_some());
}

#[test]
fn key_vault_names_collide_case_insensitively_and_client_secrets_never_name_a_written_secret() {
    let vault = "[store]\nkind = \"key-vault\"\nvault_url = \"https://v.vault.azure.net\"\n";
    let other = |name: &str, extra: &str| {
        format!("\n[connections.{name}]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n{extra}")
    };
    // `Acme` and `acme`: one secret in Key Vault.
    let err = parse_err(&format!("{vault}{MINIMAL}{}", other("Acme", "")), ENV);
    assert!(err.contains("case-insensitive"), "{err}");
    // A mirror named like another connection's record, in another case.
    let err = parse_err(
        &format!(
            "{vault}{MINIMAL}{}",
            other("b", "mirror_refresh_token_secret = \"TOKEN-BROKER-ACME\"")
        ),
        ENV,
    );
    assert!(
        err.contains("connections.b.mirror_refresh_token_secret"),
        "{err}"
    );
    // A client secret read from another connection's record.
    let err = parse_err(
        &format!(
            "{vault}{MINIMAL}{}",
            other("b", "client_secret_name = \"token-broker-Acme\"")
        ),
        ENV,
    );
    assert!(err.contains("connections.b.client_secret_name"), "{err}");
    // Two connections of one OAuth app may share a client secret.
    let shared = format!(
        "{vault}{}{}",
        other("b", "client_secret_name = \"app-secret\""),
        other("c", "client_secret_name = \"app-secret\"")
    );
    let shared = format!("[auth]\napi_keys = [\"0123456789abcdef-key\"]\n{shared}");
    Config::parse(&shared, &env_of(ENV)).expect("a shared client secret is fine");
}

#[test]
fn plain_http_provider_endpoints_are_refused_off_loopback() {
    let http = MINIMAL.replace(
        "https://id.acme.example/token",
        "http://id.acme.example/token",
    );
    let err = parse_err(&http, ENV);
    assert!(err.contains("connections.acme.token_url"), "{err}");
    assert!(err.contains("https"), "{err}");
    for local in [
        "http://127.0.0.1:8080/token",
        "http://localhost:8080/token",
        "http://[::1]:8080/token",
    ] {
        let text = MINIMAL.replace("https://id.acme.example/token", local);
        Config::parse(&text, &env_of(ENV)).expect("loopback http is fine");
    }
}

#[test]
fn a_refresh_token_mirror_is_refused_for_providers_that_rotate_refresh_tokens() {
    let vault = "[store]\nkind = \"key-vault\"\nvault_url = \"https://v.vault.azure.net\"\n";
    let with = |provider: &str| {
        format!(
            "{vault}{MINIMAL}\n[connections.b]\nprovider = \"{provider}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nmirror_refresh_token_secret = \"b-refresh-token\"\n"
        )
    };
    for rotating in ["xero", "exact-online", "quickbooks", "microsoft"] {
        let err = parse_err(&with(rotating), ENV);
        assert!(
            err.contains("connections.b.mirror_refresh_token_secret")
                && err.contains("rotates refresh tokens"),
            "{rotating}: {err}"
        );
    }
    // Refresh tokens that stay the same, and providers whose settings decide.
    for steady in ["google", "hubspot", "salesforce"] {
        let config = Config::parse(&with(steady), &env_of(ENV))
            .unwrap_or_else(|err| panic!("{steady}: {err}"));
        assert!(config.connections["b"]
            .mirror_refresh_token_secret
            .is_some());
    }
}

#[test]
fn the_nil_guid_and_empty_principals_authorize_nobody_and_other_non_guids_are_refused() {
    let with = |principal: &str| {
        format!(
            "[auth.entra]\ntenant_id = \"72f988bf-86f1-41af-91ab-2d7cd011db47\"\naudiences = [\"api://x\"]\nallowed_principals = [\"{principal}\"]\n{MINIMAL}"
        )
    };
    for nobody in ["00000000-0000-0000-0000-000000000000", ""] {
        let config = Config::parse(&with(nobody), &env_of(ENV)).expect("accepted");
        let entra = config.auth.entra.expect("entra");
        assert!(entra.allowed_principals.is_empty(), "{nobody:?}");
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("authorizes no principal")),
            "{:?}",
            config.warnings
        );
    }
    let config =
        Config::parse(&with("5F1C0000-AAAA-4BBB-8CCC-0123456789AB"), &env_of(ENV)).expect("a GUID");
    assert_eq!(
        config.auth.entra.expect("entra").allowed_principals,
        ["5f1c0000-aaaa-4bbb-8ccc-0123456789ab"],
        "lower-cased, as tokens carry object ids"
    );
    assert!(!config
        .warnings
        .iter()
        .any(|w| w.contains("authorizes no principal")));
    for bad in [
        "adf-prod",
        "replace-with-object-id",
        "{5f1c0000-aaaa-4bbb-8ccc-0123456789ab}",
    ] {
        let err = parse_err(&with(bad), ENV);
        assert!(
            err.contains("auth.entra.allowed_principals[0]"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn the_local_example_runs_in_local_mode_only() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/broker.toml"))
            .expect("examples/broker.toml");
    let config = Config::parse(&text, &|_| None).expect("the README's first command works");
    assert!(config.local_mode);
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("auth.api_keys[0]")
                && w.contains("connections.example.client_secret")),
        "{:?}",
        config.warnings
    );
    // The same file without the local-mode line: its placeholders are refused.
    let deployed = text.replace("local_mode = true", "");
    let err = Config::parse(&deployed, &|_| None)
        .expect_err("placeholders refused")
        .to_string();
    assert!(err.contains("auth.api_keys[0]"), "{err}");
    assert!(err.contains("placeholder"), "{err}");
    assert!(!err.contains("change-me"), "the value is not echoed: {err}");
}

#[test]
fn a_connection_never_takes_a_secret_name_the_deployment_keeps() {
    let vault = "[store]\nkind = \"key-vault\"\nvault_url = \"https://v.vault.azure.net\"\nsecret_prefix = \"broker-\"\n";
    let connection = |name: &str, extra: &str| {
        format!("\n[connections.{name}]\nprovider = \"oauth2\"\nauthorize_url = \"https://x.example/a\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"c\"\n{extra}")
    };
    let auth = "[auth]\napi_keys = [\"0123456789abcdef-key\"]\n";
    // `api_key` under the prefix `broker-` is the secret `broker-api-key`: the caller key.
    for (name, extra, key) in [
        ("api_key", "", "connections.api_key"),
        ("Admin-Key", "", "connections.Admin-Key"),
        ("state-secret", "", "connections.state-secret"),
        (
            "acme",
            "mirror_refresh_token_secret = \"broker-admin-key\"",
            "connections.acme.mirror_refresh_token_secret",
        ),
        (
            "acme",
            "client_secret_name = \"broker-api-key\"",
            "connections.acme.client_secret_name",
        ),
    ] {
        let text = format!("{auth}{vault}{}", connection(name, extra));
        let err = Config::parse(&text, &env_of(ENV))
            .expect_err("a deployment secret's name is refused")
            .to_string();
        assert!(err.contains(key), "{name}: {err}");
    }
    Config::parse(
        &format!("{auth}{vault}{}", connection("acme", "")),
        &env_of(ENV),
    )
    .expect("another name is fine");
}

#[test]
fn a_key_is_a_caller_key_or_an_admin_key_never_both() {
    let text = MINIMAL.replace(
        "api_keys = [\"${API_KEY}\"]",
        "api_keys = [\"other-caller-key-0123\", \"${API_KEY}\"]\nadmin_keys = [\"${API_KEY}\"]",
    );
    let err = parse_err(&text, ENV);
    assert!(err.contains("auth.admin_keys[0]"), "{err}");
    assert!(err.contains("auth.api_keys[1]"), "{err}");
    assert!(
        !err.contains("0123456789abcdef-key"),
        "the key is not echoed: {err}"
    );
}

#[test]
fn server_timeouts_default_and_stay_within_bounds() {
    let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid config");
    assert_eq!(config.server.body_timeout, Duration::from_secs(20));
    assert_eq!(config.server.write_timeout, Duration::from_secs(60));
    let set = format!("[server]\nwrite_timeout = 5\n{MINIMAL}");
    let config = Config::parse(&set, &env_of(ENV)).expect("valid config");
    assert_eq!(config.server.write_timeout, Duration::from_secs(5));
    for bad in [0, 301] {
        let err = parse_err(&format!("[server]\nwrite_timeout = {bad}\n{MINIMAL}"), ENV);
        assert!(err.contains("server.write_timeout"), "{err}");
    }
}

#[test]
fn the_webhook_secret_is_a_standard_webhooks_secret_or_refused() {
    let with = |secret: &'static str| {
        move |name: &str| match name {
            "BROKER_ALERT_WEBHOOK_SECRET" => Some(secret.to_owned()),
            other => env_of(ENV)(other),
        }
    };
    // 24 bytes, base64, behind `whsec_`.
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let config = Config::parse(MINIMAL, &with(good)).expect("a valid secret");
    assert!(config.alert_webhook_secret.is_some());
    for bad in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_not base64!",
        "whsec_c2hvcnQ=",
        "whsec_replace-with-a-secret",
    ] {
        let err = Config::parse(MINIMAL, &with(bad))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("BROKER_ALERT_WEBHOOK_SECRET"), "{bad}: {err}");
        assert!(!err.contains(bad), "the value is not echoed: {err}");
    }
    let config = Config::parse(MINIMAL, &env_of(ENV)).expect("no secret");
    assert!(config.alert_webhook_secret.is_none());
}

#[test]
fn keys_have_names_and_connections_name_their_callers() {
    let named = MINIMAL.replace(
        "api_keys = [\"${API_KEY}\"]",
        "api_keys = { finance = \"${API_KEY}\", ops = \"other-caller-key-0123\" }\n\
         admin_keys = [\"the-admin-key-0123456\"]",
    );
    let with_callers = |callers: &str| {
        named.replace(
            "[connections.acme]",
            &format!("[connections.acme]\ncallers = {callers}"),
        )
    };
    let config = Config::parse(&with_callers("[\"finance\"]"), &env_of(ENV)).expect("valid");
    let names: Vec<&str> = config
        .auth
        .api_keys
        .iter()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["finance", "ops"]);
    assert_eq!(
        config.auth.admin_keys[0].name, "admin-key-1",
        "a plain list is named in order"
    );
    assert_eq!(
        config.connections["acme"].callers.as_deref(),
        Some(&["finance".to_owned()][..])
    );
    // A plain list of caller keys: key-1, key-2, …
    let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid");
    assert_eq!(config.auth.api_keys[0].name, "key-1");
    assert_eq!(config.connections["acme"].callers, None);

    for (callers, says) in [
        ("[\"finanse\"]", "callers[0]`: `finanse` is neither a key's name nor an object id (a GUID): the keys are named finance, ops, admin-key-1"),
        ("[\"finance\", \"6d3a1c4e-0000-4000-8000-00000000adf1\"]", "callers[1]`: names the object id 6d3a1c4e-0000-4000-8000-00000000adf1, which auth.entra does not admit"),
        ("[]", "callers`: lists nobody"),
    ] {
        let err = parse_err(&with_callers(callers), ENV);
        assert!(err.contains(says), "{callers}: {err}");
        assert!(!err.contains("0123456789abcdef-key"), "no key echoed: {err}");
    }
    for (keys, says) in [
        (
            "api_keys = { ops = \"${API_KEY}\" }\nadmin_keys = { ops = \"the-admin-key-0123456\" }",
            "auth.admin_keys.ops`: names a key `ops` as auth.api_keys.ops does",
        ),
        (
            "api_keys = { \"6d3a1c4e-0000-4000-8000-00000000adf1\" = \"${API_KEY}\" }",
            "auth.api_keys.6d3a1c4e-0000-4000-8000-00000000adf1`: a key's name is",
        ),
        (
            "api_keys = { \"fin ance\" = \"${API_KEY}\" }",
            "a key's name is 1-64 letters",
        ),
        (
            "api_keys = { a = \"${API_KEY}\", b = \"${API_KEY}\" }",
            "auth.api_keys.b`: is the same key as auth.api_keys.a",
        ),
        ("api_keys = { short = \"tiny\" }", "auth.api_keys.short"),
    ] {
        let err = parse_err(&MINIMAL.replace("api_keys = [\"${API_KEY}\"]", keys), ENV);
        assert!(err.contains(says), "{keys}: {err}");
        assert!(
            !err.contains("0123456789abcdef-key"),
            "no key echoed: {err}"
        );
    }
}

#[test]
fn several_callers_and_a_connection_open_to_all_of_them_is_warned_about() {
    let two_keys = MINIMAL.replace(
        "api_keys = [\"${API_KEY}\"]",
        "api_keys = [\"${API_KEY}\", \"other-caller-key-0123\"]",
    );
    let config = Config::parse(&two_keys, &env_of(ENV)).expect("valid");
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("2 caller identities") && w.contains("acme")),
        "{:?}",
        config.warnings
    );
    let scoped = two_keys.replace(
        "[connections.acme]",
        "[connections.acme]\ncallers = [\"key-1\"]",
    );
    let config = Config::parse(&scoped, &env_of(ENV)).expect("valid");
    assert!(!config
        .warnings
        .iter()
        .any(|w| w.contains("caller identities")));
    let config = Config::parse(MINIMAL, &env_of(ENV)).expect("valid");
    assert!(
        !config
            .warnings
            .iter()
            .any(|w| w.contains("caller identities")),
        "one caller"
    );
}

#[test]
fn state_secret_is_one_key_or_a_rotation_list() {
    let with = |value: &str| format!("state_secret = {value}\n{MINIMAL}");
    let (new, old) = ("n".repeat(32), "o".repeat(32));
    let config =
        Config::parse(&with(&format!("[\"{new}\", \"{old}\"]")), &env_of(ENV)).expect("list");
    assert_eq!(config.state_secret.len(), 2);
    let config = Config::parse(&with(&format!("\"{new}\"")), &env_of(ENV)).expect("one");
    assert_eq!(config.state_secret.len(), 1);
    let err = parse_err(&with(&format!("[\"{new}\", \"short\"]")), ENV);
    assert!(
        err.contains("`state_secret[1]`: must be at least 32"),
        "{err}"
    );
    let err = parse_err(&with("[]"), ENV);
    assert!(err.contains("lists no key"), "{err}");
}
