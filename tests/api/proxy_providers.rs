//! The proxy with each provider's particulars: QuickBooks' realm and Exact Online's division
//! filled into the path, Salesforce's `instance_url` as the base, Xero's organisations as
//! `xero-tenant-id`, and the Data Factory example (infra/adf/) paging Xero invoices.

use serde_json::Value;

use crate::support::api_double::ApiDouble;
use crate::support::provider_double::{against_double, xero, Behaviour, ProviderDouble};
use crate::support::{Options, TestApp, CALLER_KEY};

/// A GET through the proxy of `connection` with the caller key; status and JSON body.
async fn proxied(app: &TestApp, connection: &str, path: &str) -> (u16, Value) {
    let response = app
        .http
        .get(format!("{}/api/proxy/{connection}/{path}", app.base))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("proxy");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickbooks_realm_and_exact_division_fill_the_path_from_the_consent() {
    let api = ApiDouble::start().await;
    let quickbooks = ProviderDouble::start(Behaviour {
        basic_auth: true,
        access_token_lifetime: 3600,
        redirect_extras: vec![("realmId", "9130355")],
        ..Default::default()
    })
    .await;
    let exact = ProviderDouble::start(Behaviour {
        access_token_lifetime: 600,
        ..Default::default()
    })
    .await;
    let mut options = against_double(
        "quickbooks",
        &format!("provider = \"quickbooks\"\napi_base_url = \"{}\"", api.base),
        &quickbooks,
    );
    options.extra_config += &against_double(
        "exact",
        &format!(
            "provider = \"exact-online\"\napi_url = \"{}\"\napi_base_url = \"{}\"",
            exact.url, api.base
        ),
        &exact,
    )
    .extra_config;
    let app = TestApp::spawn_with(options).await;
    app.consent("quickbooks").await;
    app.consent("exact").await;

    // Raw braces and percent-encoded ones (what a client that encodes the path sends).
    for path in [
        "company/{realm_id}/query?query=select%20*%20from%20Invoice",
        "company/%7Brealm_id%7D/query?query=select%20*%20from%20Invoice",
    ] {
        let (status, body) = proxied(&app, "quickbooks", path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["path"], "/v2/company/9130355/query");
    }
    let (status, body) = proxied(&app, "exact", "company/%7bdivision%7d/salesinvoice").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/v2/company/1234567/salesinvoice");

    // Another provider's placeholder, or one nobody fills: 400, naming the connection's own.
    let (status, body) = proxied(&app, "exact", "company/{realm_id}/x").await;
    assert_eq!(status, 400);
    assert!(
        body["error_description"]
            .as_str()
            .expect("description")
            .contains("not a placeholder this connection's proxy fills in ({division})"),
        "{body}"
    );
    let (status, body) = proxied(&app, "quickbooks", "company/{realmId}/x").await;
    assert_eq!(status, 400, "{body}");
    let sent = api.seen();
    assert_eq!(sent.len(), 3, "refused placeholders sent nothing: {sent:?}");
    assert_eq!(
        sent[0].path_and_query,
        "/v2/company/9130355/query?query=select%20*%20from%20Invoice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn salesforce_is_proxied_to_the_instance_url_its_token_response_named() {
    let api = ApiDouble::start().await;
    let double = ProviderDouble::start(Behaviour {
        no_expires_in: true,
        token_extras: serde_json::json!({"instance_url": api.base}),
        ..Default::default()
    })
    .await;
    let options = against_double("salesforce", "provider = \"salesforce\"", &double);
    // Outside local mode a provider-named base on this machine is refused (it would turn
    // the proxy against the broker's own network).
    let deployed = TestApp::spawn_with(against_double(
        "salesforce",
        "provider = \"salesforce\"",
        &double,
    ))
    .await;
    deployed.consent("salesforce").await;
    let (status, body) = proxied(&deployed, "salesforce", "invoices?page=2").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "provider_error", "{body}");
    assert!(
        api.seen().is_empty(),
        "the proxy reached a loopback instance_url"
    );

    // The double listens on loopback: a trial on this machine.
    let app = TestApp::spawn_with(Options {
        local_mode: true,
        ..options
    })
    .await;
    app.consent("salesforce").await;
    let (status, body) = proxied(&app, "salesforce", "invoices?page=2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["page"], 2);
    let token = app.token("salesforce", "").await;
    assert_eq!(
        api.seen()[0].authorization.as_deref(),
        Some(format!("Bearer {}", token["access_token"].as_str().expect("token")).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xero_organisations_are_picked_by_tenant_and_sent_as_xero_tenant_id() {
    const DEMO: &str = "70784a63-d24b-46a9-a4db-0e70a274b056";
    const OTHER: &str = "b8b7c7a1-3f5e-4d0c-9a3e-1c2d3e4f5a6b";
    let (double, options) = xero(vec![(DEMO, "Demo Company (NZ)"), (OTHER, "Maple Florist")]).await;
    let app = TestApp::spawn_with(options).await;
    app.consent("xero").await;
    let invoices = |query: &str| {
        let path = format!("api.xro/2.0/Invoices{query}");
        let app = &app;
        async move { proxied(app, "xero", &path).await }
    };

    // Two organisations and none named: 400 listing both, nothing sent.
    let (status, body) = invoices("").await;
    assert_eq!(status, 400, "{body}");
    let listed = body["error_description"].as_str().expect("description");
    assert!(
        listed.contains(&format!("{DEMO} (Demo Company (NZ))"))
            && listed.contains(&format!("{OTHER} (Maple Florist)")),
        "{listed}"
    );
    let (status, body) = invoices("?tenant=Nobody%20Ltd").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "unknown_tenant", "{body}");
    assert!(double.xero_api_tenants().is_empty());

    // By name (the parameter is the broker's: the API never sees it) and by id.
    let (status, body) = invoices("?tenant=Maple%20Florist").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["Invoices"][0]["Tenant"], OTHER);
    let (status, body) = invoices(&format!("?tenant={}", DEMO.to_uppercase())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["Invoices"][0]["Tenant"], DEMO);
    assert_eq!(
        double.xero_api_tenants(),
        vec![Some(OTHER.to_owned()), Some(DEMO.to_owned())]
    );
}

/// A file of the Data Factory example in `infra/adf/`.
fn adf_example(path: &str) -> Value {
    let path = format!("{}/infra/adf/{path}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What Data Factory does with `infra/adf/`'s linked service, dataset and Copy source,
/// played against the broker and the Xero double: the REST source's URL is the linked
/// service's base plus the dataset's relative URL, and its pagination rules
/// (`QueryParameters.page` = `RANGE:start::step`, `EndCondition:$.Invoices` = `Empty`,
/// `MaxRequestNumber`) decide the pages. The factory's Entra token is stood in for by the
/// caller key (the Entra path is the entra tests' business).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_factory_example_copies_every_page_of_xero_invoices_through_the_proxy() {
    let linked = adf_example("linkedService/TokenBrokerProxy.json");
    let dataset = adf_example("dataset/XeroInvoices.json");
    let pipeline = adf_example("pipeline/CopyXeroInvoices.json");
    let service = &linked["properties"]["typeProperties"];
    assert_eq!(linked["properties"]["type"], "RestService");
    assert_eq!(service["authenticationType"], "ManagedServiceIdentity");
    assert_eq!(
        service["aadResourceId"],
        "@{linkedService().brokerAudience}"
    );
    let template = service["url"].as_str().expect("url");
    assert_eq!(dataset["properties"]["type"], "RestResource");
    assert_eq!(
        dataset["properties"]["linkedServiceName"]["referenceName"],
        linked["name"]
    );
    let relative = dataset["properties"]["typeProperties"]["relativeUrl"]["value"]
        .as_str()
        .expect("relativeUrl");
    assert_eq!(
        relative,
        "@if(empty(dataset().tenant), 'api.xro/2.0/Invoices', concat('api.xro/2.0/Invoices?tenant=', uriComponent(dataset().tenant)))",
        "the evaluation below follows this expression"
    );
    let copy = &pipeline["properties"]["activities"][0];
    assert_eq!(copy["type"], "Copy");
    assert_eq!(copy["inputs"][0]["referenceName"], dataset["name"]);
    let source = &copy["typeProperties"]["source"];
    assert_eq!(source["type"], "RestSource");
    let rules = &source["paginationRules"];
    let range = rules["QueryParameters.page"].as_str().expect("page rule");
    let (start, step) = match range.split(':').collect::<Vec<_>>().as_slice() {
        ["RANGE", start, "", step] => (
            start.parse::<u32>().expect("start"),
            step.parse::<u32>().expect("step"),
        ),
        other => panic!("unexpected range {other:?}"),
    };
    assert_eq!(rules["EndCondition:$.Invoices"], "Empty");
    let max_requests: u32 = rules["MaxRequestNumber"]
        .as_str()
        .expect("max")
        .parse()
        .expect("number");

    const DEMO: &str = "70784a63-d24b-46a9-a4db-0e70a274b056";
    const MAPLE: &str = "b8b7c7a1-3f5e-4d0c-9a3e-1c2d3e4f5a6b";
    let (double, options) = xero(vec![(DEMO, "Demo Company (NZ)"), (MAPLE, "Maple Florist")]).await;
    let app = TestApp::spawn_with(options).await;
    app.consent("xero").await;

    // The pipeline's parameters: this broker, connection `xero`, tenant "Maple Florist".
    let base = template
        .replace("@{linkedService().brokerUrl}", &app.base)
        .replace("@{linkedService().connection}", "xero");
    let tenant: String = url::form_urlencoded::byte_serialize(b"Maple Florist").collect();
    let tenant = tenant.replace('+', "%20"); // uriComponent encodes a space as %20
    let url = format!("{base}api.xro/2.0/Invoices?tenant={tenant}");
    let mut invoices = Vec::new();
    let mut requests = 0;
    let mut page = start;
    loop {
        assert!(requests < max_requests);
        requests += 1;
        let response = app
            .http
            .get(format!("{url}&page={page}"))
            .header("X-API-Key", CALLER_KEY)
            .header("Accept", "application/json")
            .send()
            .await
            .expect("page");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        let items = body["Invoices"].as_array().expect("Invoices");
        if items.is_empty() {
            break;
        }
        invoices.extend(items.iter().cloned());
        page += step;
    }
    assert_eq!(
        requests, 3,
        "two pages and the empty one that ends the copy"
    );
    let numbers: Vec<&str> = invoices
        .iter()
        .map(|i| i["InvoiceNumber"].as_str().expect("number"))
        .collect();
    assert_eq!(numbers, ["INV-1", "INV-2"]);
    assert!(invoices.iter().all(|i| i["Tenant"] == MAPLE));
    assert_eq!(double.xero_api_tenants(), vec![Some(MAPLE.to_owned()); 3]);
}
