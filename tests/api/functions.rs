//! The Azure Functions app: the packaged app started and spoken to as the Functions host does
//! (Core Tools cannot be installed here), and the static contract between function.json,
//! host.json, the settings, the infrastructure and the Data Factory example.
//!
//! Long on purpose: the static contract checks and the host-protocol run share helpers.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;

use serde_json::{json, Value};
use tokio::process::Command;

use crate::support::{
    consent, free_port, wait_ready, BrokerConfig, Upstream, ADMIN_KEY, CALLER_KEY,
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()))
}

/// Function folder name → function.json, from the repository root (which is the app).
fn functions() -> Vec<(String, Value)> {
    let mut functions = Vec::new();
    for entry in std::fs::read_dir(root()).expect("repository root") {
        let path = entry.expect("entry").path();
        let function_json = path.join("function.json");
        if function_json.is_file() {
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            functions.push((name, read_json(&function_json)));
        }
    }
    functions.sort_by(|a, b| a.0.cmp(&b.0));
    functions
}

/// The HTTP functions: (name, route, methods, authLevel).
fn http_functions() -> Vec<(String, String, Vec<String>, String)> {
    functions()
        .into_iter()
        .filter_map(|(name, function)| {
            let bindings = function["bindings"].as_array().expect("bindings").clone();
            let trigger = bindings
                .iter()
                .find(|b| b["type"] == "httpTrigger")?
                .clone();
            let inputs = bindings.iter().filter(|b| b["direction"] == "in").count();
            let http_out = bindings
                .iter()
                .filter(|b| b["direction"] == "out" && b["type"] == "http")
                .count();
            // Proxying applies only to exactly one httpTrigger in and one http out.
            assert_eq!(
                (inputs, http_out, bindings.len()),
                (1, 1, 2),
                "{name}: {function}"
            );
            let methods = trigger["methods"]
                .as_array()
                .expect("methods")
                .iter()
                .map(|m| m.as_str().expect("method").to_owned())
                .collect();
            Some((
                name,
                trigger["route"].as_str().expect("route").to_owned(),
                methods,
                trigger["authLevel"]
                    .as_str()
                    .expect("explicit authLevel")
                    .to_owned(),
            ))
        })
        .collect()
}

#[test]
fn function_json_files_declare_every_route_and_the_timer() {
    let names: Vec<String> = functions().into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            "authorize",
            "callback",
            "connections",
            "health",
            "openapi",
            "prerefresh",
            "proxy",
            "refresh"
        ]
    );
    let http = http_functions();
    let auth_of = |name: &str| {
        http.iter()
            .find(|f| f.0 == name)
            .map(|f| f.3.clone())
            .expect("function")
    };
    // The provider's redirect and the probes carry no key.
    assert_eq!(auth_of("callback"), "anonymous");
    assert_eq!(auth_of("health"), "anonymous");
    for (name, route, _, _) in &http {
        assert!(
            !route.starts_with("api/"),
            "{name}: routes are relative to routePrefix"
        );
    }

    let (_, timer) = functions()
        .into_iter()
        .find(|(name, _)| name == "prerefresh")
        .expect("prerefresh");
    let binding = &timer["bindings"][0];
    assert_eq!(binding["type"], "timerTrigger");
    assert_eq!(binding["schedule"], "%PREREFRESH_SCHEDULE%");
    assert_eq!(binding["runOnStartup"], false);
    assert_eq!(timer["bindings"].as_array().expect("bindings").len(), 1);

    let host = read_json(&root().join("host.json"));
    assert_eq!(host["version"], "2.0");
    assert_eq!(host["extensionBundle"]["version"], "[4.*, 5.0.0)");
    assert_eq!(host["customHandler"]["enableProxyingHttpRequest"], true);
    assert_eq!(host["extensions"]["http"]["routePrefix"], "api");
}

/// Whether the concrete `path` (below the route prefix, no leading slash) matches a function
/// route template as the host's ASP.NET routing reads it: literal segments, `{name}` (one
/// segment; a `:constraint` is ignored here), and a final `{*rest}` (one or more segments).
fn route_matches(template: &str, path: &str) -> bool {
    let template: Vec<&str> = template.split('/').collect();
    let path: Vec<&str> = path.split('/').collect();
    for (i, part) in template.iter().enumerate() {
        if part.starts_with("{*") && part.ends_with('}') {
            return i == template.len() - 1 && path.len() > i;
        }
        let Some(segment) = path.get(i) else {
            return false;
        };
        let is_parameter = part.starts_with('{') && part.ends_with('}');
        if segment.is_empty() || (!is_parameter && !part.eq_ignore_ascii_case(segment)) {
            return false;
        }
    }
    template.len() == path.len()
}

#[test]
fn route_templates_match_as_the_host_reads_them() {
    assert!(route_matches("refresh/{connection}", "refresh/acme"));
    assert!(!route_matches("refresh/{connection}", "refresh/acme/x"));
    assert!(!route_matches("refresh/{connection}", "refresh"));
    assert!(route_matches(
        "proxy/{connection}/{*path}",
        "proxy/acme/a/b/c"
    ));
    assert!(!route_matches("proxy/{connection}/{*path}", "proxy/acme"));
    assert!(route_matches("openapi.json", "openapi.json"));
    assert!(!route_matches("health", "openapi.json"));
}

/// Every operation `openapi.json` documents under `/api/` is relayed by the host: some HTTP
/// function declares its route (under host.json's `routePrefix`) and its method. A route the
/// binary serves but no function declares answers 404 once deployed.
#[test]
fn every_documented_route_and_method_is_declared_to_the_host() {
    let host = read_json(&root().join("host.json"));
    let prefix = host["extensions"]["http"]["routePrefix"]
        .as_str()
        .expect("routePrefix");
    let functions = http_functions();
    let document = read_json(&root().join("openapi.json"));
    let mut checked = 0;
    for (path, operations) in document["paths"].as_object().expect("paths") {
        let Some(below) = path.strip_prefix(&format!("/{prefix}/")) else {
            // `/` (the host's probe) and `/prerefresh` (the timer) are the host's own calls.
            continue;
        };
        // A concrete path: each `{parameter}` becomes a sample segment.
        let concrete: String = below
            .split('/')
            .map(|segment| {
                if segment.starts_with('{') {
                    "sample"
                } else {
                    segment
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in operations.as_object().expect("operations").keys() {
            let declared = functions.iter().any(|(_, route, methods, _)| {
                route_matches(route, &concrete) && methods.iter().any(|m| m == method)
            });
            assert!(
                declared,
                "{} {path} is documented but no function.json declares it: the host answers 404",
                method.to_uppercase()
            );
            checked += 1;
        }
    }
    // authorize, callback, connections, health, openapi.json, refresh ×2, proxy ×5.
    assert!(checked >= 12, "only {checked} operations checked");
}

/// Whether `.funcignore` leaves `name` (an entry of the repository root) out of a publish.
/// Handles the pattern forms the file uses: `dir/`, `prefix*`, `*suffix` and exact names.
fn funcignored(patterns: &[String], name: &str, is_dir: bool) -> bool {
    patterns.iter().any(|pattern| {
        if let Some(dir) = pattern.strip_suffix('/') {
            is_dir && name == dir
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            name.starts_with(prefix)
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            name.ends_with(suffix)
        } else {
            name == pattern
        }
    })
}

#[test]
fn the_repository_root_is_the_function_app_and_funcignore_ships_only_the_app() {
    assert!(root().join("host.json").is_file());
    assert!(root().join("local.settings.json.example").is_file());
    let function_folders: BTreeSet<String> = functions().into_iter().map(|(n, _)| n).collect();
    let patterns: Vec<String> = std::fs::read_to_string(root().join(".funcignore"))
        .expect(".funcignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    // What the host needs; the binary and broker.toml are placed at the root by the
    // documented build step.
    let shipped: BTreeSet<String> = ["host.json", "token-broker", "broker.toml"]
        .into_iter()
        .map(String::from)
        .chain(function_folders.iter().cloned())
        .collect();
    for entry in std::fs::read_dir(root()).expect("root") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.path().is_dir();
        let ignored = funcignored(&patterns, &name, is_dir);
        if shipped.contains(&name) {
            assert!(!ignored, "{name} must be published");
        } else {
            assert!(ignored, "{name} would be published: add it to .funcignore");
        }
    }
    // The executable host.json names is the one the build step puts at the root.
    let host = read_json(&root().join("host.json"));
    assert_eq!(
        host["customHandler"]["description"]["defaultExecutablePath"],
        "token-broker"
    );
    assert_eq!(host["customHandler"]["description"]["workingDirectory"], "");
}

/// The app settings named by local.settings.json.example and by the Bicep app settings.
fn settings() -> (BTreeSet<String>, String) {
    let local = read_json(&root().join("local.settings.json.example"));
    assert_eq!(local["Values"]["FUNCTIONS_WORKER_RUNTIME"], "Custom");
    let names = local["Values"]
        .as_object()
        .expect("Values")
        .keys()
        .cloned()
        .collect();
    let bicep = std::fs::read_to_string(root().join("infra/resources.bicep")).expect("bicep");
    (names, bicep)
}

#[test]
fn settings_cover_everything_the_deployed_config_reads() {
    let (local, bicep) = settings();
    let azure_config =
        std::fs::read_to_string(root().join("examples/azure.toml")).expect("azure.toml");
    let settings_only: String = azure_config
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut needed: BTreeSet<String> = settings_only
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name.to_owned()))
        .collect();
    needed.extend(
        [
            "KEY_VAULT_URL",
            "BROKER_PUBLIC_URL",
            "BROKER_CONFIG",
            "PREREFRESH_SCHEDULE",
        ]
        .map(String::from),
    );
    assert!(needed.contains("BROKER_STATE_SECRET"), "{needed:?}");
    for name in &needed {
        assert!(
            local.contains(name),
            "{name} missing from local.settings.json.example"
        );
        assert!(
            bicep.contains(&format!("name: '{name}'")),
            "{name} missing from the app settings in infra/resources.bicep"
        );
    }

    // The deployed config parses with the real parser, given those settings.
    let env = |name: &str| -> Option<String> {
        Some(match name {
            "AZURE_TENANT_ID" => "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            "KEY_VAULT_URL" => "https://kv-tb-example.vault.azure.net/".into(),
            "BROKER_PUBLIC_URL" => "https://func-tb-example.azurewebsites.net".into(),
            "FUNCTIONS_CUSTOMHANDLER_PORT" => "40000".into(),
            // What the infra writes until the factory's identity is known.
            "ADF_PRINCIPAL_ID" => "00000000-0000-0000-0000-000000000000".into(),
            other if needed.contains(other) => {
                format!("{}-value-0123456789abcdef0123456789", other.to_lowercase())
            }
            _ => return None,
        })
    };
    // As shipped, its placeholder client id is refused: the user adds their connections.
    let err = token_broker::Config::parse(&azure_config, &env)
        .expect_err("the placeholder is refused")
        .to_string();
    assert!(err.contains("connections.example.client_id"), "{err}");
    let edited = azure_config.replace("replace-with-your-client-id", "3f2b1c9e-client");
    let config =
        token_broker::Config::parse(&edited, &env).expect("examples/azure.toml, edited, is valid");
    assert!(config.functions_host);
    assert!(matches!(
        config.store,
        token_broker::config::StoreConfig::KeyVault(_)
    ));
    let entra = config.auth.entra.expect("entra");
    assert!(
        entra.allowed_principals.is_empty(),
        "the nil GUID authorizes nobody"
    );
}

#[test]
fn bicep_grants_what_the_app_needs() {
    let (_, bicep) = settings();
    for (role, id) in [
        (
            "Key Vault Secrets Officer",
            "b86a8fe4-44ce-4948-aee5-eccb2c155cd7",
        ),
        (
            "Storage Blob Data Owner",
            "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
        ),
    ] {
        assert!(bicep.contains(id), "{role} ({id}) is not assigned");
    }
    assert!(bicep.contains("enableRbacAuthorization: true"));
    assert!(bicep.contains("runtime: { name: 'custom', version: '1.0' }"));
    let azure_yaml = std::fs::read_to_string(root().join("azure.yaml")).expect("azure.yaml");
    assert!(
        azure_yaml.contains("azd-service-name: broker")
            || bicep.contains("'azd-service-name': 'broker'")
    );
    assert!(azure_yaml.contains("dist: dist "));
    assert!(azure_yaml.contains("run: scripts/package"));
}

#[test]
fn the_data_factory_example_calls_the_refresh_route_with_managed_identity() {
    let dir = root().join("infra/adf/pipeline");
    let refresh_route = http_functions()
        .into_iter()
        .find(|f| f.0 == "refresh")
        .expect("refresh function")
        .1;
    let prefix = format!("/api/{}", refresh_route.split('{').next().expect("prefix"));
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("pipelines") {
        let pipeline = read_json(&entry.expect("entry").path());
        let activities = pipeline["properties"]["activities"]
            .as_array()
            .expect("activities");
        // The Copy-through-the-proxy example is checked in proxy.rs.
        if activities.iter().all(|a| a["type"] == "Copy") {
            continue;
        }
        let get_token = activities
            .iter()
            .find(|a| a["typeProperties"]["authentication"]["type"] == "MSI")
            .expect("a Web activity with managed-identity authentication");
        assert_eq!(get_token["type"], "WebActivity");
        assert_eq!(
            get_token["policy"]["secureOutput"], true,
            "the token must stay out of run logs"
        );
        let url = get_token["typeProperties"]["url"]["value"]
            .as_str()
            .expect("url expression");
        assert!(url.contains(&prefix), "{url} does not call {prefix}");
        let name = get_token["name"].as_str().expect("name");
        let reference = format!("activity('{name}').output.access_token");
        let consumer = activities
            .iter()
            .find(|a| a.to_string().contains(&reference))
            .expect("an activity using the token");
        assert_eq!(consumer["dependsOn"][0]["activity"], name);
        assert_eq!(consumer["policy"]["secureInput"], true);
        checked += 1;
    }
    assert!(checked >= 1);
}

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
