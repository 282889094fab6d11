//! `GET`/`POST /api/refresh/{connection}`: a valid access token as a JSON object.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::code::ErrorCode;
use super::{ApiError, AppState};
use crate::audit::Source;
use crate::broker::{BrokerError, TokenRequest};

/// The most life a caller may ask a token to have left: an hour, what most providers' access
/// tokens live at most.
const MAX_MIN_VALIDITY: u64 = 3600;

/// A refresh's body is `{"min_validity": 600, "force": false}`: a few dozen bytes.
const MAX_BODY: usize = 1024;

/// Parameters of `/api/refresh`, from the query or a JSON body. Unknown parameters are
/// ignored: the Functions host passes its own (`code=`, the function key) through.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RefreshParams {
    min_validity: Option<u64>,
    force: Option<bool>,
    /// The organisation (Xero tenant, QuickBooks company, Exact Online division) by id or
    /// exact name: the answer says its `tenant_id`.
    tenant: Option<String>,
    /// An API key in the query is refused below, but named here so the error says why.
    key: Option<String>,
}

/// A valid access token for the connection.
#[utoipa::path(
    get,
    path = "/api/refresh/{connection}",
    tag = "tokens",
    params(
        ("connection" = String, Path, description = "The connection's name from the config"),
        ("min_validity" = Option<u64>, Query, minimum = 0, maximum = 3600, description = "Seconds of life the token must have left (default refresh.min_validity)"),
        ("force" = Option<bool>, Query, description = "Refresh even if the current token is good enough (rate-limited per connection)"),
        ("tenant" = Option<String>, Query, min_length = 1, description = "An organisation the consent covers (Xero tenant, QuickBooks company, Exact Online division), by id or exact name: the answer carries its tenant_id; one the consent did not record is a 404 (unknown_tenant), an ambiguous name a 400, both listing the choices"),
    ),
    responses(
        (status = 200, description = "A valid access token", body = super::openapi::TokenBody),
        (status = 400, description = "Bad parameters, an API key in the URL, or a malformed request", body = super::openapi::ErrorBody),
        (status = 401, description = "No or wrong credential", body = super::openapi::ErrorBody),
        (status = 403, description = "A credential without the right", body = super::openapi::ErrorBody),
        (status = 404, description = "No such connection (unknown_connection), or no such organisation in its consent (unknown_tenant)", body = super::openapi::ErrorBody),
        (status = 409, description = "No token yet, or the grant is dead: an admin must consent (authorize_url)", body = super::openapi::ErrorBody),
        (status = 429, description = "force=true beyond the connection's limit (Retry-After)", body = super::openapi::ErrorBody),
        (status = 502, description = "The provider refused or failed (Retry-After)", body = super::openapi::ErrorBody),
        (status = 503, description = "Store, lease or connection setup unavailable (Retry-After)", body = super::openapi::ErrorBody)
    ),
    security(("api_key" = []), ("entra" = []))
)]
pub(super) async fn refresh_get(
    state: State<Arc<AppState>>,
    connection: Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    refresh(state, connection, method, uri, headers, body).await
}

/// A valid access token for the connection; parameters in a JSON body or the query.
#[utoipa::path(
    post,
    path = "/api/refresh/{connection}",
    tag = "tokens",
    params(
        ("connection" = String, Path, description = "The connection's name from the config"),
        ("min_validity" = Option<u64>, Query, minimum = 0, maximum = 3600, description = "Seconds of life the token must have left (default refresh.min_validity)"),
        ("force" = Option<bool>, Query, description = "Refresh even if the current token is good enough (rate-limited per connection)"),
        ("tenant" = Option<String>, Query, min_length = 1, description = "An organisation the consent covers (Xero tenant, QuickBooks company, Exact Online division), by id or exact name: the answer carries its tenant_id; one the consent did not record is a 404 (unknown_tenant), an ambiguous name a 400, both listing the choices"),
    ),
    request_body(content = Option<super::openapi::RefreshBody>, content_type = "application/json", description = "Optional; the query parameters may be used instead"),
    responses(
        (status = 200, description = "A valid access token", body = super::openapi::TokenBody),
        (status = 400, description = "Bad parameters, an API key in the URL, or a malformed request", body = super::openapi::ErrorBody),
        (status = 401, description = "No or wrong credential", body = super::openapi::ErrorBody),
        (status = 403, description = "A credential without the right", body = super::openapi::ErrorBody),
        (status = 404, description = "No such connection (unknown_connection), or no such organisation in its consent (unknown_tenant)", body = super::openapi::ErrorBody),
        (status = 409, description = "No token yet, or the grant is dead: an admin must consent (authorize_url)", body = super::openapi::ErrorBody),
        (status = 413, description = "A body larger than the route takes", body = super::openapi::ErrorBody),
        (status = 415, description = "A body that is not JSON", body = super::openapi::ErrorBody),
        (status = 429, description = "force=true beyond the connection's limit (Retry-After)", body = super::openapi::ErrorBody),
        (status = 502, description = "The provider refused or failed (Retry-After)", body = super::openapi::ErrorBody),
        (status = 503, description = "Store, lease or connection setup unavailable (Retry-After)", body = super::openapi::ErrorBody)
    ),
    security(("api_key" = []), ("entra" = []))
)]
pub(super) async fn refresh_post(
    state: State<Arc<AppState>>,
    connection: Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    refresh(state, connection, method, uri, headers, body).await
}

/// The answer for a GET the cache can serve as it is (valid parameters, an authenticated
/// caller, no organisation to pick), or `None` to take the router's path.
async fn cached_answer(
    state: &AppState,
    connection: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Response> {
    let params: RefreshParams = match uri.query() {
        Some(_) => Query::try_from_uri(uri).ok()?.0,
        None => RefreshParams::default(),
    };
    if params.key.is_some()
        || params.tenant.is_some()
        || params.force == Some(true)
        || params
            .min_validity
            .is_some_and(|secs| secs > MAX_MIN_VALIDITY)
    {
        return None;
    }
    // A caller the connection does not serve (or none) takes the router's path to its
    // refusal, which the audit trail writes there.
    let caller = state
        .auth
        .authenticate_for(headers, connection)
        .await
        .ok()?;
    let request = TokenRequest {
        min_validity: params.min_validity.map(Duration::from_secs),
        force: false,
        internal: false,
    };
    let answer = state.broker.cached_answer(connection, request)?;
    // The line the router's path writes for a cached token (`Broker::token`), at the same
    // level: off unless asked for, and then cheap to skip.
    tracing::debug!(connection, "served from cache");
    super::audit::issued_token(
        state,
        headers,
        &caller,
        connection,
        ROUTE,
        None,
        Source::Cached,
        &answer.token_id,
        answer.expires_at.as_deref(),
    );
    // The same headers as the router's answer, without its conversions.
    let mut response = Response::new(Body::from(answer.body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Some(no_store(response))
}

/// The cached answer for a plain `GET /api/refresh/{connection}` taken before the router
/// (see `server`): only a bodiless GET whose connection is named exactly; anything else —
/// and every answer but a cached token — goes through the router as usual.
pub(super) async fn cached_fast_path<B: axum::body::HttpBody>(
    state: &AppState,
    request: &axum::http::Request<B>,
) -> Option<Response> {
    if state.login.is_some()
        || request.method() != Method::GET
        || request.headers().contains_key(header::CONTENT_LENGTH)
        || request.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    let connection = request.uri().path().strip_prefix("/api/refresh/")?;
    if connection.is_empty()
        || !connection
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    cached_answer(state, connection, request.uri(), request.headers()).await
}

/// A token's answer with the headers that keep it out of caches (both paths').
fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

async fn refresh(
    State(state): State<Arc<AppState>>,
    Path(connection): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Parameters before the key, so that a key sent in the URL gets a helpful 400.
    let params: RefreshParams = Query::try_from_uri(&uri)
        .map(|Query(p)| p)
        .map_err(|err| ApiError::invalid_request(err.body_text()))?;
    if params.key.is_some() {
        return Err(ApiError::invalid_request(
            "send the API key in the X-API-Key header, not in the URL",
        ));
    }
    // Who is asking, and whether this connection serves them, before a byte of the body
    // is read.
    let caller = super::audit::caller_of(&state, &headers, &connection, ROUTE).await?;
    let answer = serve(&state, &connection, method, &headers, body, params, &caller).await;
    if let Err(error) = &answer {
        super::audit::refused(&state, &headers, &caller, &connection, ROUTE, error);
    }
    answer
}

/// The route as the audit trail names it.
const ROUTE: &str = "/api/refresh/{connection}";

/// The authenticated part of [`refresh`]: the body's parameters, the token, the tenant.
async fn serve(
    state: &AppState,
    connection: &str,
    method: Method,
    headers: &HeaderMap,
    body: Body,
    mut params: RefreshParams,
    caller: &crate::auth::Caller,
) -> Result<Response, ApiError> {
    let body = if method == Method::POST {
        super::read_body(body, MAX_BODY).await?
    } else {
        Bytes::new()
    };
    if method == Method::POST && !body.iter().all(u8::is_ascii_whitespace) {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        // No content type is tolerated; any other than JSON is refused (curl -d labels its body
        // as a form: `curl --json` is the way).
        if content_type.is_some_and(|t| t != "application/json" && !t.ends_with("+json")) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send the body as application/json (or no body)",
            ));
        }
        // `null` is no parameters, as the document's optional body says.
        let from_body: Option<RefreshParams> = serde_json::from_slice(&body).map_err(|err| {
            ApiError::invalid_request(format!("the body must be a JSON object like {{\"min_validity\": 600, \"force\": false}} ({})", json_problem(&err)),
            )
        })?;
        let from_body = from_body.unwrap_or_default();
        params.min_validity = from_body.min_validity.or(params.min_validity);
        params.force = from_body.force.or(params.force);
        params.tenant = from_body.tenant.or(params.tenant);
    }
    if params
        .min_validity
        .is_some_and(|secs| secs > MAX_MIN_VALIDITY)
    {
        // More life than access tokens have would make every call a token request and a new
        // vault version.
        return Err(ApiError::invalid_request(format!(
            "min_validity is at most {MAX_MIN_VALIDITY} seconds"
        )));
    }
    let request = TokenRequest {
        min_validity: params.min_validity.map(Duration::from_secs),
        force: params.force.unwrap_or(false),
        internal: false,
    };
    let asked_at = state.broker.now();
    let record = state
        .broker
        .token(connection, request)
        .await
        .map_err(|err| ApiError::from_broker(err, state))?;
    // The organisation asked for, from what consent recorded: the same token either way.
    let tenant = match params.tenant.as_deref() {
        Some(wanted) => record.pick_tenant(Some(wanted))?,
        None => None,
    };
    let mut body = record.to_response(state.broker.now()).ok_or_else(|| {
        ApiError::from_broker(
            BrokerError::ConsentRequired {
                reason: format!("connection `{connection}` has no access token"),
                connection: connection.to_owned(),
            },
            state,
        )
    })?;
    let source = Source::of(record.obtained_at, asked_at);
    super::audit::issued(
        state,
        headers,
        caller,
        connection,
        ROUTE,
        tenant.as_ref().map(|t| t.id.as_str()),
        source,
        &record,
    );
    if let Some(tenant) = tenant {
        body["tenant_id"] = tenant.id.into();
        if !tenant.name.is_empty() {
            body["tenant_name"] = tenant.name.into();
        }
    }
    Ok(no_store(Json(body).into_response()))
}

/// serde_json messages can quote the input; name only the kind of problem.
pub(super) fn json_problem(err: &serde_json::Error) -> &'static str {
    match err.classify() {
        serde_json::error::Category::Data => "unexpected field or value",
        _ => "not valid JSON",
    }
}
