//! The Azure Functions app's static contract: function.json, host.json, the settings, the
//! infrastructure and the Data Factory example. The packaged app spoken to as the host does
//! is in `functions_host.rs`.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

pub(crate) fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub(crate) fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("reading {}: {err}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()))
}

/// Function folder name → function.json, from the repository root (which is the app).
pub(crate) fn functions() -> Vec<(String, Value)> {
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
pub(crate) fn http_functions() -> Vec<(String, String, Vec<String>, String)> {
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
            "refresh",
            "signin"
        ]
    );
    let http = http_functions();
    let auth_of = |name: &str| {
        http.iter()
            .find(|f| f.0 == name)
            .map(|f| f.3.clone())
            .expect("function")
    };
    // The provider's and Entra ID's redirects and the probes carry no key.
    assert_eq!(auth_of("callback"), "anonymous");
    assert_eq!(auth_of("signin"), "anonymous");
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
    // authorize, callback, signin, connections, health, openapi.json, refresh ×2, proxy ×5.
    assert!(checked >= 13, "only {checked} operations checked");
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
    assert!(config.auth.admin_sign_in.is_none());

    // The admins' sign-in, uncommented as docs/deployment.md says, is valid with the
    // setting the Bicep writes.
    assert!(bicep.contains("name: 'BROKER_SIGN_IN_CLIENT_ID'"));
    let signing_in = edited
        .replace("# [auth.admin_sign_in]", "[auth.admin_sign_in]")
        .replace("# client_id = ", "client_id = ")
        .replace("# client_assertion = ", "client_assertion = ");
    let with_client_id = |name: &str| match name {
        "BROKER_SIGN_IN_CLIENT_ID" => Some("1b7c0c5e-0000-4000-8000-00000000a991".to_owned()),
        other => env(other),
    };
    let config = token_broker::Config::parse(&signing_in, &with_client_id)
        .expect("examples/azure.toml with the admins' sign-in is valid");
    assert!(matches!(
        config.auth.admin_sign_in.expect("sign-in").credential,
        token_broker::config::SignInCredential::ManagedIdentity(None)
    ));
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
