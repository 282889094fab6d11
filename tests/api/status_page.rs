//! The status page in a real browser (Debian's chromium, driven by Selenium from
//! `tests/browser/status_page.py`): an admin signs in, sees every card, reconnects a
//! connection with the keyboard through the strict test upstream, lands back on the status
//! page and sees it connected with a new forecast; the page fits a phone and follows the dark
//! scheme. Screenshots are kept in `target/artifacts/`.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::provider_double::xero;
use crate::support::{Options, TestApp, ADMIN_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_reconnects_a_connection_from_the_status_page_in_a_real_browser() {
    let (_xero, xero_config) = xero(vec![
        ("70784a63-d24b-46a9-a4db-0e70a274b056", "Demo Company (NZ)"),
        ("b8b7c7a1-3f5e-4d0c-9a3e-1c2d3e4f5a6b", "Maple Florist"),
    ])
    .await;
    let app = TestApp::spawn_with(Options {
        acme_extra: "refresh_token_idle_days = 30".to_owned(),
        extra_config: xero_config.extra_config,
        ..Default::default()
    })
    .await;
    app.consent("xero").await;
    app.consent("acme").await;
    let consented = app.stored("acme").expect("acme")["consented_at"].clone();
    let codes = app.upstream.token_requests("authorization_code").await;
    // A second apart, so the new forecast differs from the old.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    let python =
        std::env::var("TEST_PYTHON").expect("TEST_PYTHON: run the tests through scripts/test");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/status_page.py");
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .args([&app.base, ADMIN_KEY, "acme"])
        .arg(&out)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run the browser");
    assert!(
        output.status.success(),
        "the browser walk failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).expect("report"))
            .expect("json");

    // Signed in, and the key left the address.
    assert!(
        !report["signed_in_url"]
            .as_str()
            .expect("url")
            .contains("key="),
        "{report}"
    );
    assert_eq!(report["title"], "Connections · Token Broker");
    assert_eq!(report["lang"], "en");
    assert_eq!(report["scripts"], 0, "the page works without JavaScript");

    // Every connection has a card, in plain words, with its Web activity URL.
    let card = |when: &str, id: &str| -> Value {
        report[when]
            .as_array()
            .expect("cards")
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no card {id} {when}: {report}"))
    };
    for id in ["c-acme", "c-deny", "c-xero"] {
        let card = card("before", id);
        let name = id.trim_start_matches("c-");
        assert_eq!(
            card["refresh_url"],
            format!("{}/api/refresh/{name}", app.base)
        );
        assert_eq!(card["url_label"], "Web activity URL");
        assert!(
            !card["button_href"].as_str().expect("href").contains("key"),
            "a reconnect link carries no key: {card}"
        );
    }
    assert!(card("before", "c-deny")["state"]
        .as_str()
        .expect("state")
        .starts_with("Not connected yet."));
    let xero_card = card("before", "c-xero");
    assert!(xero_card["state"]
        .as_str()
        .expect("state")
        .starts_with("Connected."));
    let xero_text = xero_card["text"].as_str().expect("text");
    assert!(
        xero_text.contains("Demo Company (NZ)") && xero_text.contains("Maple Florist"),
        "{xero_text}"
    );
    assert!(
        xero_card["forecast"]
            .as_str()
            .expect("forecast")
            .contains("unused for 60 days"),
        "{xero_card}"
    );
    let before = card("before", "c-acme");
    assert_eq!(before["button"], "Reconnect acme");
    assert_eq!(
        report["focused_is_button"], true,
        "keyboard focus reaches it"
    );

    // The consent went through, and the page shows the new grant.
    assert_eq!(report["callback_heading"], "Connected");
    let after = card("after", "c-acme");
    assert!(after["state"]
        .as_str()
        .expect("state")
        .starts_with("Connected."));
    assert_ne!(after["forecast"], before["forecast"], "a new forecast");
    assert!(after["forecast"]
        .as_str()
        .expect("forecast")
        .contains("unused for 30 days"));
    assert_eq!(
        app.upstream.token_requests("authorization_code").await,
        codes + 1
    );
    assert_ne!(app.stored("acme").expect("acme")["consented_at"], consented);

    // No secret anywhere in the HTML.
    let token = app.token("acme", "").await;
    for page in ["page_source_before", "page_source_after"] {
        let html = report[page].as_str().expect("html");
        for secret in [
            ADMIN_KEY.to_owned(),
            token["access_token"].as_str().expect("token").to_owned(),
            app.stored_refresh_token("acme"),
            app.stored_refresh_token("xero"),
        ] {
            assert!(!html.contains(&secret), "{page} holds a secret");
        }
    }

    // A phone and the dark scheme.
    assert!(
        report["phone_overflow"].as_i64().expect("overflow") <= 0,
        "wider than a phone: {}",
        report["phone_overflow"]
    );
    assert_ne!(report["dark_background"], "rgb(255, 255, 255)");
    for shot in [
        "status-page.png",
        "status-page-phone.png",
        "status-page-dark.png",
    ] {
        let bytes = std::fs::read(out.join(shot)).expect("screenshot");
        assert!(bytes.starts_with(b"\x89PNG"), "{shot}");
    }
}
