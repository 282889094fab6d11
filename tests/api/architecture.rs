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
        &["html", "auth"],
        &["broker"],
        &["store", "lock", "provider", "entra", "state", "alert"],
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
