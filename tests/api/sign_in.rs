//! Admins signing in with Entra ID in the browser: the real binary against the tenant
//! double's sign-in (authorize + token endpoints, PKCE verified at the token endpoint, an
//! RS256 id_token with the nonce), walked hop by hop as a browser does.

use std::collections::BTreeMap;

use url::Url;

use crate::support::azure_doubles::{Azure, ClientCredential, Forgery, User, VAULT_HOST};
use crate::support::entra::entra_table;
use crate::support::{free_port, BrokerConfig, BrokerProcess, CALLER_KEY};

/// The broker's app registration.
const CLIENT_ID: &str = "1b7c0c5e-0000-4000-8000-00000000a991";
const CLIENT_SECRET: &str = "the-sign-in-client-secret-0123";
/// Listed in `admin_principals`.
const LISTED_ADMIN: &str = "6a1f2c3d-0000-4000-8000-0000000ad111";
const ROLE_HOLDER: &str = "6a1f2c3d-0000-4000-8000-0000000ad222";
const STRANGER: &str = "6a1f2c3d-0000-4000-8000-000000000bad";

struct Setup {
    azure: Azure,
    broker: BrokerProcess,
    dir: tempfile::TempDir,
}

async fn setup(credential: ClientCredential) -> Setup {
    let azure = Azure::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let sign_in = match &credential {
        ClientCredential::Secret(secret) => format!("client_secret = \"{secret}\""),
        ClientCredential::ManagedIdentity => "client_assertion = \"managed-identity\"".to_owned(),
    };
    azure
        .sign_in
        .register(CLIENT_ID, &format!("{base}/api/signin"), credential);
    let config = BrokerConfig::default()
        .top("public_url", base.as_str())
        .auth_table(&entra_table(&azure.login_authority, &[], &[LISTED_ADMIN]))
        .auth_table(&format!(
            "[auth.admin_sign_in]\nclient_id = \"{CLIENT_ID}\"\n{sign_in}"
        ))
        .file_store(&dir.path().join("tokens"))
        .unreached_connection("acme")
        .write(dir.path());
    let mut env = vec![
        ("SSL_CERT_FILE", azure.pki.ca_file.display().to_string()),
        ("BROKER_RESOLVE", format!("{VAULT_HOST}=127.0.0.1")),
    ];
    env.extend(
        azure
            .env()
            .into_iter()
            .filter(|(name, _)| name.starts_with("IDENTITY_")),
    );
    let broker = BrokerProcess::start_on(port, &config, &env, &dir.path().join("broker.log")).await;
    Setup { azure, broker, dir }
}

impl Setup {
    /// A new browser, with `object_id` (holding `roles`) at its keyboard.
    fn browser_for(&self, object_id: &str, roles: &[&str]) -> Browser {
        self.azure.sign_in.user_at_keyboard(user(object_id, roles));
        Browser::new(&self.azure)
    }
}

/// The broker with the app registration's client secret.
async fn with_secret() -> Setup {
    setup(ClientCredential::Secret(CLIENT_SECRET.to_owned())).await
}

/// A browser: no redirects followed (each hop is looked at), cookies kept by hand, the
/// tenant double's host resolved to loopback and its CA trusted.
struct Browser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

struct Answer {
    status: u16,
    location: Option<String>,
    set_cookies: Vec<String>,
    body: String,
}

impl Browser {
    fn new(azure: &Azure) -> Self {
        let ca = std::fs::read(&azure.pki.ca_file).expect("CA");
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA pem"))
            .resolve(VAULT_HOST, "127.0.0.1:0".parse().expect("addr"))
            .build()
            .expect("client");
        Self {
            http,
            cookies: BTreeMap::new(),
        }
    }

    async fn get(&mut self, url: &str) -> Answer {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut request = self
            .http
            .get(url)
            .header("Accept", "text/html,application/xhtml+xml,*/*;q=0.8");
        if !cookie.is_empty() {
            request = request.header("Cookie", cookie);
        }
        let response = request.send().await.expect("request");
        let header = |name: &str| {
            response
                .headers()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_owned())
                .collect::<Vec<_>>()
        };
        let location = header("location").pop();
        let set_cookies = header("set-cookie");
        for set in &set_cookies {
            let pair = set.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        Answer {
            status: response.status().as_u16(),
            location,
            set_cookies,
            body: response.text().await.expect("body"),
        }
    }
}

/// One sign-in, from opening `path` on the broker to the page it ends on.
struct Walk {
    /// Where the broker sent the browser to sign in.
    authorize: Url,
    /// Entra ID's redirect back to the broker.
    back: String,
    /// The broker's answer to it.
    signed_in: Answer,
    /// The page first asked for, opened again from the "signed in" page (when it said so).
    landed: Option<Answer>,
}

async fn sign_in_walk(browser: &mut Browser, broker: &str, path: &str) -> Walk {
    let first = browser.get(&format!("{broker}{path}")).await;
    assert_eq!(first.status, 302, "{path}: {}", first.body);
    let authorize = Url::parse(first.location.as_deref().expect("to Entra ID")).expect("url");
    let at_entra = browser.get(authorize.as_str()).await;
    assert_eq!(
        at_entra.status, 303,
        "the double signs in: {}",
        at_entra.body
    );
    let back = at_entra.location.expect("back to the broker");
    let signed_in = browser.get(&back).await;
    let landed = match signed_in.status {
        200 => {
            let target = signed_in
                .body
                .split("url=")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .expect("the page goes on")
                .replace("&amp;", "&");
            Some(browser.get(&format!("{broker}{target}")).await)
        }
        _ => None,
    };
    Walk {
        authorize,
        back,
        signed_in,
        landed,
    }
}

fn user(object_id: &str, roles: &[&str]) -> User {
    User {
        object_id: object_id.to_owned(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        name: "Avery".to_owned(),
    }
}

fn has_session(answer: &Answer) -> bool {
    answer
        .set_cookies
        .iter()
        .any(|c| c.starts_with("tb_admin="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_signs_in_lands_on_the_status_page_and_can_start_a_consent() {
    let setup = with_secret().await;
    let broker = setup.broker.base.clone();
    let mut browser = setup.browser_for(LISTED_ADMIN, &[]);

    // Scripts without credentials get the JSON 401 they can act on, not a sign-in page.
    let script = reqwest::Client::new()
        .get(format!("{broker}/api/connections"))
        .header("Accept", "application/json")
        .send()
        .await
        .expect("request");
    assert_eq!(script.status(), 401);

    let walk = sign_in_walk(&mut browser, &broker, "/api/connections").await;
    // The OpenID Connect request: code flow, PKCE S256, state, nonce, the registered
    // redirect URI, at the tenant's v2.0 endpoint.
    let query: BTreeMap<String, String> = walk.authorize.query_pairs().into_owned().collect();
    assert_eq!(
        walk.authorize.path(),
        format!(
            "/{}/oauth2/v2.0/authorize",
            crate::support::azure_doubles::TENANT
        )
    );
    assert_eq!(query["response_type"], "code");
    assert_eq!(query["client_id"], CLIENT_ID);
    assert_eq!(query["redirect_uri"], format!("{broker}/api/signin"));
    assert_eq!(query["code_challenge_method"], "S256");
    assert!(query["scope"].split(' ').any(|s| s == "openid"));
    assert!(query["nonce"].len() >= 32 && query["state"].len() >= 32);

    assert_eq!(walk.signed_in.status, 200, "{}", walk.signed_in.body);
    assert!(has_session(&walk.signed_in));
    let landed = walk.landed.expect("landed");
    assert_eq!(landed.status, 200, "{}", landed.body);
    assert!(
        landed.body.contains("Connections") && landed.body.contains("acme"),
        "the status page: {}",
        landed.body
    );
    assert_eq!(setup.azure.sign_in.exchanges(), ["secret"]);

    // The session starts a consent: to the provider.
    let consent = browser.get(&format!("{broker}/api/authorize/acme")).await;
    assert_eq!(consent.status, 302, "{}", consent.body);
    assert!(consent
        .location
        .as_deref()
        .is_some_and(|l| l.starts_with("https://id.example.com/")));

    // The same redirect back, again: its state is spent.
    let replayed = browser.get(&walk.back).await;
    assert_eq!(replayed.status, 400, "{}", replayed.body);
    assert!(!has_session(&replayed));

    // An admin's browser session takes no token.
    for path in ["/api/refresh/acme", "/api/proxy/acme/anything"] {
        let refused = browser.get(&format!("{broker}{path}")).await;
        assert_eq!(refused.status, 401, "{path}: {}", refused.body);
    }
    // (A caller key still works: the 409 says "no token yet", not "who are you".)
    let caller = reqwest::Client::new()
        .get(format!("{broker}/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(caller.status(), 409);

    let logs = setup.broker.logs();
    assert!(logs.contains("admin signed in with Entra ID"), "{logs}");
    let code = Url::parse(&walk.back).expect("url");
    let code: BTreeMap<String, String> = code.query_pairs().into_owned().collect();
    for secret in [CLIENT_SECRET, code["code"].as_str(), code["state"].as_str()] {
        assert!(!logs.contains(secret), "a secret in the logs");
    }
    assert!(!logs.contains("eyJ"), "no JWT in the logs");
    drop(setup.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_role_admits_and_anyone_else_gets_a_403_page_naming_no_connection() {
    let setup = with_secret().await;
    let broker = setup.broker.base.clone();

    let mut browser = setup.browser_for(ROLE_HOLDER, &["Reader", "TokenBroker.Admin"]);
    let walk = sign_in_walk(&mut browser, &broker, "/api/authorize/acme").await;
    assert_eq!(walk.signed_in.status, 200, "{}", walk.signed_in.body);
    // Back to the consent it was opening.
    let landed = walk.landed.expect("landed");
    assert_eq!(landed.status, 302, "{}", landed.body);
    assert!(landed
        .location
        .is_some_and(|l| l.starts_with("https://id.example.com/")));

    let mut browser = setup.browser_for(STRANGER, &["Reader"]);
    let walk = sign_in_walk(&mut browser, &broker, "/api/connections").await;
    assert_eq!(walk.signed_in.status, 403, "{}", walk.signed_in.body);
    assert!(!has_session(&walk.signed_in));
    assert!(walk.signed_in.body.contains("not a Token Broker admin"));
    assert!(!walk.signed_in.body.contains("acme"), "names no connection");
    // Still nobody: the status page sends them to sign in again.
    let again = browser.get(&format!("{broker}/api/connections")).await;
    assert_eq!(again.status, 302);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_with_a_forged_nonce_audience_issuer_or_key_admit_nobody() {
    let setup = with_secret().await;
    let broker = setup.broker.base.clone();
    for (forgery, reason) in [
        (Forgery::Nonce, "nonce"),
        (Forgery::Audience, "wrong audience"),
        (Forgery::Issuer, "wrong issuer"),
        (Forgery::Key, "key the tenant does not publish"),
    ] {
        setup.azure.sign_in.forge(forgery);
        let mut browser = setup.browser_for(LISTED_ADMIN, &[]);
        let walk = sign_in_walk(&mut browser, &broker, "/api/connections").await;
        assert_eq!(
            walk.signed_in.status, 401,
            "{forgery:?}: {}",
            walk.signed_in.body
        );
        assert!(!has_session(&walk.signed_in), "{forgery:?}");
        assert!(
            walk.signed_in.body.contains(reason),
            "{forgery:?}: {}",
            walk.signed_in.body
        );
    }
    // The same admin, with an honest token, is admitted: the refusals were the forgeries.
    setup.azure.sign_in.forge(Forgery::None);
    let mut browser = setup.browser_for(LISTED_ADMIN, &[]);
    let walk = sign_in_walk(&mut browser, &broker, "/api/connections").await;
    assert_eq!(walk.signed_in.status, 200, "{}", walk.signed_in.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_the_managed_identity_token_is_the_client_assertion() {
    let setup = setup(ClientCredential::ManagedIdentity).await;
    let broker = setup.broker.base.clone();
    let mut browser = setup.browser_for(LISTED_ADMIN, &[]);
    let walk = sign_in_walk(&mut browser, &broker, "/api/connections").await;
    assert_eq!(walk.signed_in.status, 200, "{}", walk.signed_in.body);
    assert_eq!(walk.landed.expect("landed").status, 200);
    // The double accepted a jwt-bearer assertion that is a token its identity endpoint
    // issued for api://AzureADTokenExchange.
    assert_eq!(setup.azure.sign_in.exchanges(), ["managed-identity"]);
    assert_eq!(setup.azure.shared.count("identity"), 1);
}
