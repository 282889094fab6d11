//! The crate's dependency direction, checked: `app → http → broker → {store, lock, provider}
//! → config → presets`, no module importing one above it, and no circle. (ARCHITECTURE.md
//! explains the layers.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its non-test code names as `crate::…`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative
            .components()
            .next()
            .expect("component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read");
        // Test modules may reach anywhere; only the code counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let deps = graph.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn modules_depend_downwards_only_and_form_no_circle() {
    let graph = module_graph();
    // Layers, top to bottom; a module may only name modules in its own layer's leaves or
    // below. Leaves of a layer never name each other.
    let layers: &[&[&str]] = &[
        &["app"],
        &["http"],
        &["html", "auth", "sign_in"],
        &["broker"],
        &[
            "store", "lock", "provider", "entra", "state", "alert", "audit",
        ],
        &["azure", "http_client", "token", "clock", "telemetry"],
        &["config"],
        &["presets"],
    ];
    let layer_of = |name: &str| {
        layers
            .iter()
            .position(|layer| layer.contains(&name))
            .unwrap_or_else(|| {
                panic!("module `{name}` is in no layer: add it to this test and to ARCHITECTURE.md")
            })
    };
    for (module, deps) in &graph {
        let own = layer_of(module);
        for dep in deps {
            let theirs = layer_of(dep);
            // The one sideways edge: `azure` (Azure SDK plumbing) builds on `http_client`.
            assert!(
                theirs > own || (own == 5 && theirs == 5 && module != dep && is_plumbing(dep)),
                "`{module}` (layer {own}) must not depend on `{dep}` (layer {theirs})"
            );
        }
    }
    assert!(
        graph["presets"].is_empty(),
        "presets is a leaf: {:?}",
        graph["presets"]
    );
    assert_eq!(
        graph["config"],
        BTreeSet::from(["presets".to_owned()]),
        "config refers to presets only"
    );
}

/// Shared plumbing a same-layer module may use.
fn is_plumbing(module: &str) -> bool {
    matches!(module, "http_client" | "azure")
}

/// Every `.rs` file under `dir`, with its module path (`broker::flight` for
/// `broker/flight.rs`, `http::proxy` for `http/proxy/mod.rs`).
fn modules_under(dir: &Path) -> Vec<(String, String)> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(base).expect("under base");
                let mut parts: Vec<String> = relative
                    .iter()
                    .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                    .collect();
                if parts
                    .last()
                    .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
                {
                    parts.pop();
                }
                let text = std::fs::read_to_string(&path).expect("read");
                out.push((parts.join("::"), text));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// Whether `text` declares `name` (a function, type, trait, constant, module or field).
fn declares(text: &str, name: &str) -> bool {
    [
        "fn ", "struct ", "enum ", "trait ", "const ", "static ", "mod ", "type ",
    ]
    .iter()
    .any(|kind| {
        text.match_indices(&format!("{kind}{name}"))
            .any(|(i, found)| {
                !text[i + found.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
            })
    }) || text.contains(&format!("pub {name}:"))
        || text.contains(&format!("pub(super) {name}:"))
        // An enum variant: `Name {`, `Name(` or `Name,` opening a line.
        || text.lines().any(|line| {
            line.trim_start()
                .strip_prefix(name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '{', '(', ',']))
        })
}

/// Every `module::item` ARCHITECTURE.md names resolves: its module path is a file of the
/// crate (or of the test support under `support::`), and each item after it is declared
/// there or in that module's own files. A renamed function or moved module fails here
/// until the page says so too.
#[test]
fn every_path_the_architecture_page_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let src = modules_under(&root.join("src"));
    let support: Vec<(String, String)> = modules_under(&root.join("tests/api/support"))
        .into_iter()
        .map(|(path, text)| {
            let path = if path.is_empty() {
                "support".to_owned()
            } else {
                format!("support::{path}")
            };
            (path, text)
        })
        .collect();
    let mut checked = 0;
    for (i, _) in page.match_indices('`') {
        let Some(len) = page[i + 1..].find('`') else {
            continue;
        };
        let path = &page[i + 1..i + 1 + len];
        let well_formed = path.contains("::")
            && path
                .split("::")
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_'));
        // Log targets (`token_broker::alert`) are names in the log, not paths.
        if !well_formed || path.starts_with("token_broker::") {
            continue;
        }
        let segments: Vec<&str> = path.split("::").collect();
        let modules = if segments[0] == "support" {
            &support
        } else {
            &src
        };
        // The longest leading run of segments that names a module — at the crate root, or
        // (a path written relative to its section) any module ending so — whose files
        // declare every item after it. A path that starts with a type (`Broker::token`) is
        // looked up in the whole crate.
        let files_of = |module: &str| -> Vec<&String> {
            modules
                .iter()
                .filter(|(m, _)| {
                    module.is_empty() || m == module || m.starts_with(&format!("{module}::"))
                })
                .map(|(_, text)| text)
                .collect()
        };
        let declared_in = |module: &str, items: &[&str]| {
            let texts = files_of(module);
            items
                .iter()
                .all(|item| texts.iter().any(|text| declares(text, item)))
        };
        let found = (1..=segments.len()).rev().any(|n| {
            let prefix = segments[..n].join("::");
            modules
                .iter()
                .filter(|(module, _)| *module == prefix || module.ends_with(&format!("::{prefix}")))
                .any(|(module, _)| declared_in(module, &segments[n..]))
        }) || (segments[0].starts_with(|c: char| c.is_ascii_uppercase())
            && declared_in("", &segments));
        assert!(
            found,
            "ARCHITECTURE.md names `{path}`, which is no module or item of the code"
        );
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} paths checked");
}
