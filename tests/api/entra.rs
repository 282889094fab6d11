//! Entra ID bearer tokens (how Data Factory's managed identity calls the broker), checked by
//! the real binary against an Entra JWKS double.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

use crate::support::azure_doubles::{Azure, TENANT};
use crate::support::entra::{claims_from, entra_table, sign, sign_with};
use crate::support::{free_port, BrokerConfig, BrokerProcess};
const ADF: &str = "6a1f2c3d-0000-4000-8000-00000000adf1";
const ADMIN: &str = "6a1f2c3d-0000-4000-8000-0000000ad111";
const STRANGER: &str = "6a1f2c3d-0000-4000-8000-000000000bad";

struct Setup {
    azure: Azure,
    broker: BrokerProcess,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let azure = Azure::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Callers authenticate with Entra ID tokens only: no API keys.
    let config = BrokerConfig::default()
        .without_auth("api_keys")
        .auth_table(&entra_table(&azure.login_authority, &[ADF], &[ADMIN]))
        .file_store(&dir.path().join("tokens"))
        .unreached_connection("acme")
        .write(dir.path());
    let env = vec![
        ("SSL_CERT_FILE", azure.pki.ca_file.display().to_string()),
        (
            "BROKER_RESOLVE",
            format!("{}=127.0.0.1", crate::support::azure_doubles::VAULT_HOST),
        ),
    ];
    let broker =
        BrokerProcess::start_on(free_port(), &config, &env, &dir.path().join("broker.log")).await;
    Setup {
        azure,
        broker,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Setup {
    /// The broker's status for `path` with `token` as the bearer (the body goes to stderr,
    /// for failing runs).
    async fn status(&self, path: &str, token: &str) -> u16 {
        let response = self
            .http
            .get(format!("{}{path}", self.broker.base))
            .bearer_auth(token)
            .header("Accept", "application/json")
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        if status == 401 {
            let challenge = response.headers().get("www-authenticate").cloned();
            assert_eq!(
                challenge.as_ref().map(|v| v.to_str().expect("ascii")),
                Some("Bearer")
            );
        }
        eprintln!(
            "{path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_tokens_from_allowed_principals_are_accepted() {
    let setup = setup().await;
    let claims = |oid| claims_from(&setup.azure.login_authority, oid);
    // Authenticated: the 409 says "no token yet", not "who are you".
    assert_eq!(
        setup.status("/api/refresh/acme", &sign(&claims(ADF))).await,
        409
    );
    // v1 tokens (resource-style) from the same tenant are accepted too.
    let mut v1 = claims(ADF);
    v1["iss"] = format!("https://sts.windows.net/{TENANT}/").into();
    assert_eq!(setup.status("/api/refresh/acme", &sign(&v1)).await, 409);
    // Admin routes need an admin principal.
    assert_eq!(
        setup.status("/api/connections", &sign(&claims(ADF))).await,
        403
    );
    assert_eq!(
        setup
            .status("/api/connections", &sign(&claims(ADMIN)))
            .await,
        200
    );
    // The key set was fetched once and cached.
    assert_eq!(setup.azure.shared.count("jwks"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused() {
    let setup = setup().await;
    let claims = |oid| claims_from(&setup.azure.login_authority, oid);
    let route = "/api/refresh/acme";
    let now = chrono::Utc::now().timestamp();

    let mut expired = claims(ADF);
    expired["exp"] = (now - 3600).into();
    let mut audience = claims(ADF);
    audience["aud"] = "https://management.azure.com".into();
    let mut issuer = claims(ADF);
    issuer["iss"] = format!("{}/another-tenant/v2.0", setup.azure.login_authority).into();
    let mut tenant = claims(ADF);
    tenant["tid"] = "00000000-0000-0000-0000-000000000000".into();
    let mut no_oid = claims(ADF);
    no_oid.as_object_mut().expect("object").remove("oid");
    // Not valid for another hour (beyond the 5 minutes of clock skew allowed).
    let mut not_yet = claims(ADF);
    not_yet["nbf"] = (now + 3600).into();
    not_yet["iat"] = (now + 3600).into();
    for (what, claims) in [
        ("not yet valid", not_yet),
        ("expired", expired),
        ("wrong audience", audience),
        ("wrong issuer", issuer),
        ("wrong tenant", tenant),
        ("no oid", no_oid),
    ] {
        assert_eq!(setup.status(route, &sign(&claims)).await, 401, "{what}");
    }

    // Forged: signed by a key the tenant does not publish, under a published or unknown kid.
    let untrusted = include_bytes!("../fixtures/entra-untrusted-key.pem");
    assert_eq!(
        setup
            .status(route, &sign_with(&claims(ADF), untrusted, "test-key-1"))
            .await,
        401
    );
    assert_eq!(
        setup
            .status(route, &sign_with(&claims(ADF), untrusted, "other-kid"))
            .await,
        401
    );
    // An HMAC token "signed" with the public key, and garbage.
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims(ADF),
        &EncodingKey::from_secret(include_bytes!("../fixtures/entra-jwks.json")),
    )
    .expect("sign");
    assert_eq!(setup.status(route, &hs).await, 401);
    assert_eq!(setup.status(route, "not-a-jwt").await, 401);

    // A valid token from a principal that is not allowed: 403.
    assert_eq!(setup.status(route, &sign(&claims(STRANGER))).await, 403);
    // Unknown kids refetch the key set at most once a minute: a burst of them (an attacker's
    // cheap way to make the broker hammer Entra ID) costs no more fetches.
    let fetched = setup.azure.shared.count("jwks");
    for i in 0..5 {
        let kid = format!("unknown-kid-{i}");
        assert_eq!(
            setup
                .status(route, &sign_with(&claims(ADF), untrusted, &kid))
                .await,
            401
        );
    }
    assert!(fetched >= 1, "the key set was fetched");
    assert!(
        setup.azure.shared.count("jwks") <= fetched + 1,
        "{} fetches after {fetched}",
        setup.azure.shared.count("jwks")
    );
}
