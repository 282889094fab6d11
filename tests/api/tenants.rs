//! Organisations (`?tenant=`): a Xero consent's tenants addressed by id or exact name on
//! `/api/refresh`, with the same token and no upstream call; unknown and ambiguous names.

use serde_json::{json, Value};

use crate::support::provider_double::xero;
use crate::support::TestApp;

#[tokio::test]
async fn a_tenant_is_addressed_by_id_or_name_with_the_same_token_and_no_upstream_call() {
    const DEMO: &str = "70784a63-d24b-46a9-a4db-0e70a274b056";
    const MAPLE: &str = "b8b7c7a1-3f5e-4d0c-9a3e-1c2d3e4f5a6b";
    const MAPLE_TWO: &str = "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
    let (double, options) = xero(vec![
        (DEMO, "Demo Company (NZ)"),
        (MAPLE, "Maple Florist"),
        (MAPLE_TWO, "Maple Florist"),
    ])
    .await;
    let app = TestApp::spawn_with(options).await;
    app.consent("xero").await;
    let plain = app.token("xero", "").await;
    assert_eq!(plain["tenants"].as_array().expect("tenants").len(), 3);
    let (calls, lookups) = (double.token_calls().len(), double.lookups());

    let by_name = app.token("xero", "?tenant=Demo%20Company%20(NZ)").await;
    assert_eq!(by_name["tenant_id"], DEMO);
    assert_eq!(by_name["tenant_name"], "Demo Company (NZ)");
    assert_eq!(
        by_name["access_token"], plain["access_token"],
        "the same token"
    );
    let by_id = app
        .token("xero", &format!("?tenant={}", MAPLE.to_uppercase()))
        .await;
    assert_eq!(by_id["tenant_id"], MAPLE);
    // POST takes it in the body, too.
    let posted: Value = app
        .http
        .post(format!("{}/api/refresh/xero", app.base))
        .header("X-API-Key", crate::support::CALLER_KEY)
        .json(&json!({"tenant": MAPLE_TWO}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(posted["tenant_id"], MAPLE_TWO);

    for (query, says, status) in [
        ("?tenant=Maple%20Florist", "several", 400),
        (
            "?tenant=Nobody%20Ltd",
            "not one this connection was granted",
            404,
        ),
    ] {
        let response = app.refresh("xero", query).await;
        assert_eq!(response.status(), status, "{query}");
        let body: Value = response.json().await.expect("json");
        let text = body["error_description"].as_str().expect("description");
        assert!(text.contains(says), "{text}");
        for choice in [
            format!("{DEMO} (Demo Company (NZ))"),
            format!("{MAPLE} (Maple Florist)"),
            format!("{MAPLE_TWO} (Maple Florist)"),
        ] {
            assert!(text.contains(&choice), "{query}: {text} lacks {choice}");
        }
        assert!(body.get("access_token").is_none());
    }
    assert_eq!(
        (double.token_calls().len(), double.lookups()),
        (calls, lookups),
        "no upstream call for any of it"
    );
}
