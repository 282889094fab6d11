//! The packaged Functions app started and spoken to as the Functions host does (Core Tools
//! cannot be installed here): the readiness probe, every HTTP function's route relayed with
//! the host's headers, and timer invocations in the host's shape.

use std::path::Path;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::functions::{functions, http_functions, read_json, root};
use crate::support::{
    consent, free_port, wait_ready, BrokerConfig, Upstream, ADMIN_KEY, CALLER_KEY,
};

/// Headers the Functions host adds to what it forwards.
fn host_request(client: &reqwest::Client, method: &str, url: &str) -> reqwest::RequestBuilder {
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
    client
        .request(method, url)
        .header(
            "X-Azure-Functions-InvocationId",
            "5e5b3e9c-6d6f-4d4e-9d6c-000000000001",
        )
        .header("X-Azure-Functions-HostVersion", "4.1040.300.25317")
        .header("User-Agent", "Azure-Functions-Host/4.1040.300.25317")
        .header("X-Forwarded-Host", "func-tb-example.azurewebsites.net")
}

fn timer_payload(past_due: bool, with_status: bool) -> Value {
    json!({
        "Data": {"timer": {
            "Schedule": {"AdjustForDST": true},
            "ScheduleStatus": if with_status {
                json!({"Last": "2026-11-22T08:00:00+00:00", "Next": "2026-11-22T08:05:00+00:00", "LastUpdated": "2026-11-22T08:00:00+00:00"})
            } else { Value::Null },
            "IsPastDue": past_due
        }},
        "Metadata": {"sys": {"MethodName": "prerefresh", "UtcNow": "2026-11-22T08:05:00Z", "RandGuid": "6f1d1c1e-0000-4000-8000-000000000000"}}
    })
}

/// Starts the packaged handler exactly as the host would: host.json's executable and
/// arguments, in the app root, with FUNCTIONS_CUSTOMHANDLER_PORT and the app settings.
async fn start_like_the_host(
    app: &Path,
    port: u16,
    settings: &[(&str, String)],
    log: &Path,
) -> tokio::process::Child {
    let host = read_json(&app.join("host.json"));
    let description = &host["customHandler"]["description"];
    let executable = app.join(description["defaultExecutablePath"].as_str().expect("path"));
    let arguments: Vec<String> = description["arguments"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().expect("arg").to_owned())
                .collect()
        })
        .unwrap_or_default();
    let workdir = app.join(description["workingDirectory"].as_str().unwrap_or(""));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let mut child = Command::new(&executable)
        .args(&arguments)
        .current_dir(&workdir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::from(log_file.try_clone().expect("log")))
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|err| panic!("starting {}: {err}", executable.display()));
    wait_ready(port, &mut child, log).await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packaged_app_speaks_the_functions_host_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let upstream =
        Upstream::start(&format!("{base}/api/callback"), "client_secret_basic", 3600).await;
    let tokens = dir.path().join("tokens");
    // Secrets from app settings, as in Azure.
    let config = BrokerConfig::default()
        .top("state_secret", "${BROKER_STATE_SECRET}")
        .auth("api_keys", vec!["${BROKER_API_KEY}".to_owned()])
        .auth("admin_keys", vec!["${BROKER_ADMIN_KEY}".to_owned()])
        .store("path", tokens.display().to_string())
        .tables(&upstream.connection_toml(
            "acme",
            &format!("client_secret = \"{}\"", upstream.client_secret),
        ))
        .write(dir.path());

    // Package it the way azd does (with the test build instead of a release build).
    let app = dir.path().join("app");
    let output = Command::new("bash")
        .arg(root().join("scripts/package"))
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_token-broker"))
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&app)
        .output()
        .await
        .expect("run scripts/package");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let host = read_json(&app.join("host.json"));
    let executable = app.join(
        host["customHandler"]["description"]["defaultExecutablePath"]
            .as_str()
            .expect("path"),
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&executable)
            .expect("the binary is where host.json says")
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "the binary must be executable");
    }
    for (name, _) in functions() {
        assert!(
            app.join(&name).join("function.json").is_file(),
            "{name} not packaged"
        );
    }
    assert!(app.join("broker.toml").is_file());

    let settings = vec![
        ("BROKER_STATE_SECRET", crate::support::random("state")),
        ("BROKER_API_KEY", CALLER_KEY.to_owned()),
        ("BROKER_ADMIN_KEY", ADMIN_KEY.to_owned()),
        ("BROKER_PUBLIC_URL", base.clone()),
        ("PREREFRESH_SCHEDULE", "0 */5 * * * *".to_owned()),
    ];
    let log = dir.path().join("handler.log");
    let mut handler = start_like_the_host(&app, port, &settings, &log).await;

    // Every HTTP function's route reaches a real handler (not the router's fallback), with
    // the host's headers, for each method it declares.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    for (name, route, methods, _) in http_functions() {
        let url = format!(
            "{base}/api/{}",
            route
                .replace("{connection}", "acme")
                .replace("{*path}", "v2/invoices")
        );
        for method in methods {
            let response = host_request(&client, &method, &url)
                .header("X-API-Key", ADMIN_KEY)
                .send()
                .await
                .expect("forwarded request");
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            let fallback = serde_json::from_str::<Value>(&body)
                .is_ok_and(|answer| answer["error"] == "not_found");
            assert!(
                !fallback,
                "{name} {method} {url}: the router has no such route ({status})"
            );
            let expected = match name.as_str() {
                "authorize" => 302,
                "callback" => 400,
                // The handler itself: this deployment has no admin sign-in configured.
                "signin" => {
                    assert!(body.contains("admin_sign_in"), "{name} {method}: {body}");
                    404
                }
                "refresh" => 409,
                // The handler itself: this connection names no API to forward to.
                "proxy" => {
                    assert!(body.contains("\"no_proxy\""), "{name} {method}: {body}");
                    404
                }
                _ => 200,
            };
            assert_eq!(status, expected, "{name} {method} {url}: {body}");
        }
    }
    // Without a credential, the app itself refuses (the host's authLevel is anonymous).
    let response = host_request(&client, "get", &format!("{base}/api/refresh/acme"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);

    // Consent through the handler, then let the access token come close to expiry.
    consent(&base, "acme").await;
    handler.kill().await.expect("stop");
    let record_path = tokens.join("acme.json");
    let mut record = read_json(&record_path);
    let now = chrono::Utc::now();
    record["obtained_at"] = (now - chrono::Duration::seconds(3540)).to_rfc3339().into();
    record["expires_at"] = (now + chrono::Duration::seconds(60)).to_rfc3339().into();
    std::fs::write(&record_path, record.to_string()).expect("edit record");
    let mut handler = start_like_the_host(&app, port, &settings, &log).await;

    // Timer invocations: POST /{function name}, from the host over loopback, no key.
    let mut refreshed = Vec::new();
    for (past_due, with_status) in [(true, true), (false, true), (false, false), (true, false)] {
        let response = host_request(&client, "post", &format!("{base}/prerefresh"))
            .json(&timer_payload(past_due, with_status))
            .send()
            .await
            .expect("timer invocation");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["Outputs"], json!({}));
        let logs = body["Logs"].as_array().expect("Logs");
        assert!(
            logs.iter().all(Value::is_string) && !logs.is_empty(),
            "{body}"
        );
        assert!(
            logs.iter()
                .any(|l| l.as_str().expect("line").starts_with("acme: ")),
            "{body}"
        );
        refreshed.push(body["ReturnValue"]["refreshed"].as_u64().expect("count"));
    }
    assert_eq!(
        refreshed,
        [1, 0, 0, 0],
        "the near-expiry token is refreshed once, then left alone"
    );
    assert_eq!(upstream.token_requests("refresh_token").await, 1);
    handler.kill().await.expect("stop");
}
