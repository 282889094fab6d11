//! OpenID Connect discovery (`provider = "oidc"`): against the real `oidc-provider`, and
//! against discovery doubles that name another issuer, plain-http endpoints, or a document
//! over the cap on a peer's answer.

use reqwest::header::LOCATION;
use serde_json::{json, Value};

use crate::support::{connection_table, settings, Options, TestApp, ADMIN_KEY};

#[tokio::test]
async fn oidc_discovery_finds_the_real_provider() {
    let options = Options {
        extra_config: connection_table(
            "idp",
            &[
                ("provider", "oidc".into()),
                ("issuer", "${UPSTREAM}".into()),
                ("client_id", "broker".into()),
                ("client_secret", "${SECRET}".into()),
                ("scopes", vec!["offline_access", "api:read"].into()),
            ],
            "",
        ),
        ..Default::default()
    };
    let app = TestApp::spawn_with(options).await;
    app.consent("idp").await;
    let body = app.token("idp", "?force=true").await;
    assert!(
        app.upstream
            .is_active(body["access_token"].as_str().expect("token"))
            .await
    );
    assert!(
        body["scope"].as_str().expect("scope").contains("openid"),
        "the preset adds openid"
    );
}

#[tokio::test]
async fn oidc_discovery_refuses_a_document_for_another_issuer() {
    let upstream = crate::support::Upstream::start(
        "http://127.0.0.1:9/api/callback",
        "client_secret_basic",
        3600,
    )
    .await;
    // The same server under another name: its document names 127.0.0.1, not localhost.
    let other_name = upstream.url.replace("127.0.0.1", "localhost");
    // The broker starts regardless (one connection's trouble never stops the others); the
    // connection answers why it cannot serve.
    let broker = crate::support::ConfiguredBroker::serve(&oidc_broker(&other_name)).await;
    let response = reqwest::Client::new()
        .get(format!("{}/api/refresh/idp", broker.base))
        .header("X-API-Key", crate::support::CALLER_KEY)
        .send()
        .await
        .expect("refresh");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "connection_misconfigured", "{body}");
    let err = body["error_description"].as_str().expect("description");
    assert!(err.contains("connections.idp.issuer"), "{err}");
    assert!(err.contains("names the issuer"), "{err}");
}

/// A discovery double at a loopback issuer, serving what `document` makes of the issuer URL.
async fn discovery_double(
    document: impl Fn(&str) -> String + Clone + Send + Sync + 'static,
) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let issuer = format!("http://{}", listener.local_addr().expect("addr"));
    let body = document(&issuer);
    let discovery = axum::Router::new().route(
        "/.well-known/openid-configuration",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    (
        issuer,
        tokio::spawn(async move { axum::serve(listener, discovery).await }),
    )
}

/// A broker's configuration with one connection, `idp`, discovering `issuer`.
fn oidc_broker(issuer: &str) -> String {
    crate::support::BrokerConfig::default()
        .connection(
            "idp",
            &settings(&[
                ("provider", "oidc"),
                ("issuer", issuer),
                ("client_id", "broker"),
            ]),
            "",
        )
        .render()
}

/// What `/api/authorize/idp` answers an admin on a broker whose `idp` connection discovers
/// `issuer`.
async fn authorize_discovered(issuer: &str) -> (u16, Option<String>, Value) {
    let broker = crate::support::ConfiguredBroker::serve(&oidc_broker(issuer)).await;
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("{}/api/authorize/idp", broker.base))
        .header("X-API-Key", ADMIN_KEY)
        .send()
        .await
        .expect("authorize");
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get(LOCATION)
        .map(|l| l.to_str().expect("ascii").to_owned());
    (
        status,
        location,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// An issuer whose discovery document names plain-http endpoints off this machine is
/// refused: the broker would send the browser there and the client secret, codes and
/// refresh tokens in clear. The connection is misconfigured; nothing is redirected.
#[tokio::test]
async fn oidc_discovery_refuses_endpoints_that_are_not_https() {
    for (authorization, token, refused) in [
        (
            "http://auth.example.invalid/authorize",
            "https://auth.example.invalid/token",
            "authorization_endpoint",
        ),
        (
            "https://auth.example.invalid/authorize",
            "http://auth.example.invalid/token",
            "token_endpoint",
        ),
    ] {
        let (issuer, served) = discovery_double(move |issuer| {
            json!({
                "issuer": issuer,
                "authorization_endpoint": authorization,
                "token_endpoint": token,
            })
            .to_string()
        })
        .await;
        let (status, location, body) = authorize_discovered(&issuer).await;
        assert_eq!(status, 503, "{refused}: {body}");
        assert_eq!(location, None);
        assert_eq!(body["error"], "connection_misconfigured", "{body}");
        let description = body["error_description"].as_str().expect("description");
        assert!(description.contains(refused), "{description}");
        assert!(description.contains("not https"), "{description}");
        served.abort();
    }
}

/// Bodies read from peers are capped (1 MiB): a discovery document padded past it is
/// refused unread beyond the cap, whether its length is declared or it streams.
#[tokio::test]
async fn a_peers_answer_over_the_cap_is_refused() {
    let (issuer, served) = discovery_double(|issuer| {
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "padding": "x".repeat(2 << 20),
        })
        .to_string()
    })
    .await;
    let (status, _, body) = authorize_discovered(&issuer).await;
    assert_eq!(status, 503, "{body}");
    let description = body["error_description"].as_str().expect("description");
    assert!(
        description.contains("larger than 1048576 bytes"),
        "{description}"
    );
    served.abort();
    // The same document under the cap is taken.
    let (issuer, served) = discovery_double(|issuer| {
        json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "padding": "x".repeat(512 << 10),
        })
        .to_string()
    })
    .await;
    let (status, location, body) = authorize_discovered(&issuer).await;
    assert_eq!(status, 302, "{body}");
    assert!(location.is_some_and(|l| l.starts_with(&format!("{issuer}/authorize"))));
    served.abort();
}
