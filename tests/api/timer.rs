//! The timer function's route, `POST /prerefresh`, as the Functions host calls it.

use serde_json::{json, Value};

use crate::support::{connection_table, Options, TestApp};

/// A second connection to the same upstream, with per-connection timer settings.
fn beta(settings: &str) -> Options {
    Options {
        extra_config: connection_table(
            "beta",
            &[
                ("provider", "oauth2".into()),
                ("authorize_url", "${UPSTREAM}/auth".into()),
                ("token_url", "${UPSTREAM}/token".into()),
                ("client_id", "broker".into()),
                ("client_secret", "${SECRET}".into()),
                ("scopes", vec!["openid", "offline_access"].into()),
            ],
            settings,
        ),
        ..Default::default()
    }
}

fn in_seconds(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339()
}

async fn timer(app: &TestApp, payload: Value) -> Value {
    let body = crate::support::invoke_timer(&app.http, &app.base, &payload).await;
    assert_eq!(body["Outputs"], json!({}), "{body}");
    assert!(body["Logs"]
        .as_array()
        .expect("Logs")
        .iter()
        .all(Value::is_string));
    body
}

fn outcome(body: &Value, connection: &str) -> String {
    body["ReturnValue"]["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .find(|c| c["connection"] == connection)
        .map(|c| c["outcome"].as_str().expect("outcome").to_owned())
        .unwrap_or_else(|| panic!("{connection} missing from {body}"))
}

fn payload(past_due: bool, with_status: bool) -> Value {
    let status = if with_status {
        json!({"Last": "2026-11-22T08:00:00+00:00", "Next": "2026-11-22T08:05:00+00:00", "LastUpdated": "2026-11-22T08:00:00+00:00"})
    } else {
        Value::Null
    };
    json!({
        "Data": {"timer": {"Schedule": {"AdjustForDST": true}, "ScheduleStatus": status, "IsPastDue": past_due}},
        "Metadata": {"sys": {"MethodName": "prerefresh", "UtcNow": "2026-11-22T08:05:00Z", "RandGuid": "0f6f7a3c-0000-0000-0000-000000000000"}}
    })
}

#[tokio::test]
async fn refreshes_what_expires_soon_and_leaves_fresh_tokens_alone() {
    let mut app = TestApp::spawn_with(beta("")).await;
    app.consent("acme").await;
    app.consent("beta").await;
    app.stop().await;
    app.edit_stored("acme", |r| {
        r["obtained_at"] = in_seconds(120 - 3600).into();
        r["expires_at"] = in_seconds(120).into();
    });
    app.restart().await;
    let acme_before = app.stored("acme").expect("acme")["access_token"].clone();
    let beta_before = app.stored("beta").expect("beta")["access_token"].clone();

    let body = timer(&app, payload(false, true)).await;
    assert_eq!(outcome(&body, "acme"), "refreshed");
    assert_eq!(outcome(&body, "beta"), "fresh");
    assert_eq!(outcome(&body, "deny"), "skipped", "never consented");
    assert_eq!(body["ReturnValue"]["refreshed"], 1);
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    assert_ne!(
        app.stored("acme").expect("acme")["access_token"],
        acme_before
    );
    assert_eq!(
        app.stored("beta").expect("beta")["access_token"],
        beta_before
    );
    let logs = body["Logs"].as_array().expect("logs");
    assert!(
        logs.iter()
            .any(|l| l.as_str().expect("line").starts_with("acme: refreshed")),
        "{body}"
    );

    // Past due, without ScheduleStatus, or with no payload at all: nothing left to do.
    for payload in [payload(true, false), payload(false, false), Value::Null] {
        let body = timer(&app, payload).await;
        assert_eq!(body["ReturnValue"]["refreshed"], 0, "{body}");
    }
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    assert_eq!(app.upstream.grants_revoked().await, 0);
}

#[tokio::test]
async fn idle_refresh_tokens_are_exercised_before_they_die() {
    let mut app = TestApp::spawn_with(beta("refresh_token_idle_days = 60")).await;
    app.consent("acme").await;
    app.consent("beta").await;
    app.stop().await;
    // Both unused for 31 days; only beta's provider kills idle refresh tokens.
    for connection in ["acme", "beta"] {
        app.edit_stored(connection, |r| {
            r["obtained_at"] = in_seconds(-31 * 86_400).into();
        });
    }
    app.restart().await;
    let consented = app.stored_refresh_token("beta");

    let body = timer(&app, payload(false, true)).await;
    assert_eq!(outcome(&body, "beta"), "refreshed", "{body}");
    assert_eq!(outcome(&body, "acme"), "fresh");
    assert_ne!(
        app.stored_refresh_token("beta"),
        consented,
        "the refresh token rotated"
    );
    assert_eq!(app.upstream.token_requests("refresh_token").await, 1);
    let detail = body["ReturnValue"]["connections"]
        .as_array()
        .expect("list")
        .iter()
        .find(|c| c["connection"] == "beta")
        .expect("beta")["detail"]
        .as_str()
        .expect("detail")
        .to_owned();
    assert!(detail.contains("31 of its 60 idle days"), "{detail}");
}

#[tokio::test]
async fn a_provider_that_refuses_early_refresh_is_respected() {
    // Exact Online-like: 10-minute tokens, no refresh within 570 s; a 5-minute window.
    let mut options = beta("min_refresh_interval = 570");
    options
        .extra_config
        .push_str("\n[refresh]\nprerefresh_window = 300\n");
    let mut app = TestApp::spawn_with(options).await;
    app.consent("beta").await;
    app.stop().await;
    // Obtained 400 s ago, 200 s left: within the window, but too soon for the provider.
    app.edit_stored("beta", |r| {
        r["obtained_at"] = in_seconds(-400).into();
        r["expires_at"] = in_seconds(200).into();
    });
    app.restart().await;

    let body = timer(&app, payload(false, true)).await;
    assert_eq!(outcome(&body, "beta"), "skipped", "{body}");
    // Even a forced refresh serves the current token instead of calling the provider.
    let token = app.token("beta", "?force=true").await;
    assert_eq!(
        token["access_token"],
        app.stored("beta").expect("beta")["access_token"]
    );
    assert_eq!(app.upstream.token_requests("refresh_token").await, 0);
}

#[tokio::test]
async fn one_failing_connection_does_not_stop_the_others() {
    let mut app = TestApp::spawn_with(beta("")).await;
    app.consent("acme").await;
    app.consent("beta").await;
    app.stop().await;
    for connection in ["acme", "beta"] {
        app.edit_stored(connection, |r| {
            r["obtained_at"] = in_seconds(60 - 3600).into();
            r["expires_at"] = in_seconds(60).into();
        });
    }
    app.restart().await;
    // Connections run in name order: acme's token request is refused.
    app.upstream
        .fail_next(1, 401, r#"{"error":"invalid_client"}"#, "application/json")
        .await;

    let body = timer(&app, payload(false, true)).await;
    assert_eq!(outcome(&body, "acme"), "failed", "{body}");
    assert_eq!(outcome(&body, "beta"), "refreshed");
    assert_eq!(body["ReturnValue"]["failed"], 1);
    let logs = body["Logs"].as_array().expect("logs");
    assert!(
        logs.iter()
            .any(|l| l.as_str().expect("line").contains("invalid_client")),
        "{body}"
    );
}

#[tokio::test]
async fn short_lived_tokens_are_left_to_callers() {
    let mut app = TestApp::spawn().await;
    app.consent("acme").await;
    app.stop().await;
    // A 10-minute token (like Exact Online's) with 2 minutes left.
    app.edit_stored("acme", |r| {
        r["obtained_at"] = in_seconds(-480).into();
        r["expires_at"] = in_seconds(120).into();
    });
    app.restart().await;
    let body = timer(&app, payload(false, true)).await;
    assert_eq!(outcome(&body, "acme"), "fresh", "{body}");
    assert_eq!(app.upstream.token_requests("refresh_token").await, 0);
}

#[tokio::test]
async fn outside_the_functions_host_the_timer_route_needs_an_admin_key() {
    let app = TestApp::spawn().await;
    let response = app
        .http
        .post(format!("{}/prerefresh", app.base))
        .json(&payload(false, true))
        .send()
        .await
        .expect("prerefresh");
    assert_eq!(response.status(), 401);
}
