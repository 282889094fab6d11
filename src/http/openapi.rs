//! The OpenAPI 3.1 document, served at `/api/openapi.json` and checked in as
//! `openapi.json` (a test fails when they differ): the paths come from the `#[utoipa::path]`
//! annotations on the handlers, the schemas from the types below, which describe the JSON
//! the handlers build. Schemathesis checks every answer of the running binary against it.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The broker's error answer: a stable code, and a description for people (never a secret).
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// A stable code, one of the broker's table (`ErrorCode`; the `enum` lists them).
    error: String,
    error_description: String,
    /// With `consent_required`: where an admin consents (again).
    #[schema(nullable = false)]
    authorize_url: Option<String>,
}

/// A valid access token. Providers' extra non-secret fields callers need (Salesforce
/// `instance_url`, Xero `tenants`, Exact `division`, QuickBooks `realm_id`) come alongside.
#[derive(Serialize, ToSchema)]

pub(super) struct TokenBody {
    access_token: String,
    /// `Bearer`, as the provider says.
    token_type: String,
    /// Seconds of life left.
    expires_in: u64,
    #[schema(format = DateTime, nullable = false)]
    expires_at: Option<String>,
    #[schema(nullable = false)]
    scope: Option<String>,
    /// The organisation: with `?tenant=`, or when the consent covers exactly one Xero
    /// organisation.
    #[schema(nullable = false)]
    tenant_id: Option<String>,
    /// Its name, with `?tenant=`, when the provider gives one.
    #[schema(nullable = false)]
    tenant_name: Option<String>,
}

/// `POST /api/refresh` parameters, as a JSON body (the query works too).
#[derive(Serialize, ToSchema)]
pub(super) struct RefreshBody {
    /// Seconds of life the token must have left (at most 3600).
    #[schema(minimum = 0, maximum = 3600, nullable = false)]
    min_validity: Option<u64>,
    /// Refresh even if the current token is good enough (rate-limited per connection).
    #[schema(nullable = false)]
    force: Option<bool>,
    /// An organisation the consent covers, by id or exact name.
    #[schema(nullable = false)]
    tenant: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct HealthBody {
    /// Always `ok`.
    status: String,
}

/// One connection on the status page.
#[derive(Serialize, ToSchema)]
pub(super) struct ConnectionRow {
    name: String,
    /// The provider preset's name (`xero`, `oauth2`, `oidc`, ...: docs/configuration.md
    /// lists them).
    provider: String,
    /// `connected`, `consent_required`, `failing` or `misconfigured`.
    state: String,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
    #[schema(format = DateTime)]
    last_refresh: Option<String>,
    #[schema(format = DateTime)]
    consented_at: Option<String>,
    last_error: Option<String>,
    #[schema(format = DateTime)]
    last_error_at: Option<String>,
    /// Where an admin (re)connects it.
    authorize_url: String,
    /// What a pipeline's Web activity calls for this connection's token.
    refresh_url: String,
    /// The organisations the consent covers (Xero tenants, the QuickBooks company, the
    /// Exact Online division); `?tenant=` picks one.
    tenants: Vec<TenantRow>,
    /// When the grant will end, as far as anyone knows; null before the first consent.
    forecast: Option<ForecastBody>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TenantRow {
    id: String,
    /// Absent when the provider gives no name.
    name: Option<String>,
}

/// A connection's expiry forecast. Unknown dates are null, never guessed.
#[derive(Serialize, ToSchema)]
pub(super) struct ForecastBody {
    #[schema(format = DateTime)]
    access_token_expires_at: Option<String>,
    /// When the grant ends if nothing changes (the earliest of the dates below).
    #[schema(format = DateTime)]
    grant_expires_at: Option<String>,
    /// `refresh_token_idle`, `provider_limit` or `configured_lifetime`.
    grant_expiry_reason: Option<String>,
    /// Last successful refresh + the provider's idle lifetime.
    #[schema(format = DateTime)]
    refresh_token_idle_deadline: Option<String>,
    /// When the timer uses an idle refresh token again (half its idle lifetime).
    #[schema(format = DateTime)]
    keep_alive_at: Option<String>,
    /// Consent + `grant_lifetime_days` or the provider's documented cap.
    #[schema(format = DateTime)]
    grant_lifetime_deadline: Option<String>,
    /// The forecast in plain words.
    summary: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ConnectionsBody {
    connections: Vec<ConnectionRow>,
}

/// The timer's answer in the Functions host's shape.
#[derive(Serialize, ToSchema)]
#[allow(non_snake_case)]
pub(super) struct TimerBody {
    Outputs: serde_json::Map<String, serde_json::Value>,
    Logs: Vec<String>,
    ReturnValue: TimerReturn,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TimerReturn {
    refreshed: u64,
    failed: u64,
    connections: Vec<TimerConnection>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TimerConnection {
    connection: String,
    /// `refreshed`, `fresh`, `skipped` or `failed`.
    outcome: String,
    detail: String,
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// The three ways to authenticate.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "A caller key (auth.api_keys) for /api/refresh, or an admin key (auth.admin_keys) for every route.",
            ))),
        );
        components.add_security_scheme(
            "entra",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A Microsoft Entra ID access token for the broker's audience (auth.entra.audiences, e.g. api://{tenant id}/token-broker-{env}), from an allowed principal such as Data Factory's managed identity (Web activity authentication MSI, resource = that audience).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                "tb_admin",
                "The admin session a browser gets in exchange for ?key=<admin key> on a browser route (named __Host-tb_admin when the broker is reached over https); it ends when the admin keys change.",
            ))),
        );
    }
}

/// One handler serving several methods (the proxy's) gives each operation the handler's
/// name; OpenAPI wants operation ids unique (§4.8.10), so such ids get their method:
/// `proxy_get`, `proxy_post`, …
struct UniqueOperationIds;

impl Modify for UniqueOperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for item in openapi.paths.paths.values() {
            for (_, operation) in operations(item) {
                if let Some(id) = &operation.operation_id {
                    *seen.entry(id.clone()).or_default() += 1;
                }
            }
        }
        for item in openapi.paths.paths.values_mut() {
            for (method, operation) in operations_mut(item) {
                if let Some(id) = operation.operation_id.as_mut() {
                    if seen.get(id.as_str()).is_some_and(|count| *count > 1) {
                        *id = format!("{id}_{method}");
                    }
                }
            }
        }
    }
}

fn operations(
    item: &utoipa::openapi::path::PathItem,
) -> impl Iterator<Item = (&'static str, &utoipa::openapi::path::Operation)> {
    [
        ("get", &item.get),
        ("put", &item.put),
        ("post", &item.post),
        ("delete", &item.delete),
        ("options", &item.options),
        ("head", &item.head),
        ("patch", &item.patch),
        ("trace", &item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| Some((method, operation.as_ref()?)))
}

fn operations_mut(
    item: &mut utoipa::openapi::path::PathItem,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| Some((method, operation.as_mut()?)))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Token Broker",
        description = "Consent once in a browser, then get a fresh OAuth 2.0 access token from one URL.",
        license(name = "see the repository"),
    ),
    paths(
        super::health,
        super::root,
        openapi_json,
        super::refresh::refresh_get,
        super::refresh::refresh_post,
        super::consent::authorize,
        super::consent::callback,
        super::sign_in::signed_in,
        super::status::connections,
        super::timer::prerefresh,
        super::proxy::proxy,
    ),
    components(schemas(
        ErrorBody,
        TokenBody,
        RefreshBody,
        HealthBody,
        ConnectionsBody,
        ConnectionRow,
        TenantRow,
        ForecastBody,
        TimerBody,
        TimerReturn,
        TimerConnection
    )),
    modifiers(&Security, &UniqueOperationIds),
)]
pub(super) struct ApiDoc;

/// The document as JSON. The error codes come from the one table (`ErrorCode::ALL`):
/// `ErrorBody.error` is an `enum` of them, so a client generated from the document, and
/// Schemathesis checking every answer, know each code the broker answers.
pub fn document() -> serde_json::Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let codes: Vec<&str> = super::code::ErrorCode::ALL
        .iter()
        .map(|code| code.as_str())
        .collect();
    if let Some(error) = document
        .pointer_mut("/components/schemas/ErrorBody/properties/error")
        .and_then(|error| error.as_object_mut())
    {
        error.insert("enum".to_owned(), codes.into());
    }
    document
}

/// The OpenAPI document of this API (no authentication: it carries no secrets).
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
pub(super) async fn openapi_json() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(document())).into_response()
}
