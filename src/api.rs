//! HTTP routes (see PRODUCT.md): the router, its handlers, and the one error type that turns
//! every failure into a status and a stable JSON body. Details are logged, never echoed
//! beyond a secret-free description.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_http::trace::TraceLayer;
use url::Url;

use crate::auth::{AuthError, CallerAuth, Role};
use crate::broker::{Broker, BrokerError, TokenRequest};
use crate::entra::TokenError;
use crate::html;
use crate::provider::UpstreamError;
use crate::state::{StateError, StateSigner, BINDING_COOKIE, STATE_TTL};

/// Everything the handlers share.
pub struct AppState {
    pub broker: Arc<Broker>,
    pub auth: CallerAuth,
    pub signer: StateSigner,
    /// Base URL the broker is reached at, without a trailing slash.
    pub public_url: Url,
    /// The timer refreshes access tokens expiring within this window.
    pub prerefresh_window: Duration,
    /// Under the Functions host, which calls the timer route over loopback without a key.
    pub functions_host: bool,
}

impl AppState {
    fn authorize_url(&self, connection: &str) -> String {
        format!(
            "{}/api/authorize/{connection}",
            self.public_url.as_str().trim_end_matches('/')
        )
    }
}

/// The broker's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/api/health", get(health))
        .route("/api/authorize/{connection}", get(authorize))
        .route("/api/callback", get(callback))
        .route("/api/refresh/{connection}", get(refresh).post(refresh))
        .route("/api/connections", get(connections))
        .route("/prerefresh", post(prerefresh))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_framework_errors))
        .layer(
            // Our own span: method and path only. The default span records the full URI,
            // whose query can hold an authorization code or an admin key.
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let invocation = request
                    .headers()
                    .get("x-azure-functions-invocationid")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    invocation_id = invocation,
                )
            }),
        )
        .with_state(state)
}

/// The Functions host's readiness probe (it GETs `/` until anything answers).
async fn root() -> &'static str {
    "Token Broker\n"
}

async fn health() -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({"status": "ok"})),
    )
        .into_response()
}

/// The errors axum answers by itself (405 for a method a route lacks, 413 for a body over
/// the limit, 400 for a path it cannot decode) come as plain text or an empty body; they
/// get the broker's JSON error shape here, keeping their headers (`Allow` on a 405). Their
/// own text is not echoed: it can quote the request.
async fn json_framework_errors(response: Response) -> Response {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // The broker's own errors are JSON; the browser pages are HTML.
    if !(status.is_client_error() || status.is_server_error())
        || content_type.starts_with("application/json")
        || content_type.starts_with("text/html")
    {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let (error, description) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            (
                "method_not_allowed",
                format!("this route does not accept that method (allowed: {allowed})"),
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than this route accepts".to_owned(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "send the body as application/json".to_owned(),
        ),
        StatusCode::BAD_REQUEST => (
            "invalid_request",
            "the request path or parameters could not be read".to_owned(),
        ),
        other => (
            "http_error",
            other.canonical_reason().unwrap_or("error").to_owned(),
        ),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let body = json!({"error": error, "error_description": description}).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

/// An error answered as `{"error": …, "error_description": …}` (plus `authorize_url` for
/// `consent_required`).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: &'static str,
    description: String,
    authorize_url: Option<String>,
    /// Send `WWW-Authenticate: Bearer` (RFC 6750 §3) with a 401.
    challenge: bool,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            authorize_url: None,
            challenge: false,
            retry_after: None,
        }
    }

    fn from_broker(err: BrokerError, state: &AppState) -> Self {
        let retry_after = err.retry_after();
        let mut error = Self::from_broker_error(err, state);
        error.retry_after = retry_after;
        error
    }

    fn from_broker_error(err: BrokerError, state: &AppState) -> Self {
        match err {
            BrokerError::UnknownConnection(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_connection", err.to_string())
            }
            BrokerError::ConsentRequired { ref connection, .. } => Self {
                authorize_url: Some(state.authorize_url(connection)),
                ..Self::new(StatusCode::CONFLICT, "consent_required", err.to_string())
            },
            BrokerError::Upstream(ref upstream) => {
                let error = match upstream {
                    UpstreamError::Unavailable { .. }
                    | UpstreamError::Unreachable(_)
                    | UpstreamError::Transport(_) => "provider_unavailable",
                    _ => "provider_error",
                };
                Self::new(StatusCode::BAD_GATEWAY, error, err.to_string())
            }
            BrokerError::RefreshFailed { code, .. } => {
                Self::new(StatusCode::BAD_GATEWAY, code, err.to_string())
            }
            BrokerError::Busy(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "refresh_in_progress",
                err.to_string(),
            ),
            BrokerError::LockUnavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "lock_unavailable",
                "the refresh lease cannot be taken (storage unavailable); try again shortly",
            ),
            BrokerError::Internal(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                err.to_string(),
            ),
            BrokerError::Store(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the token store is unavailable; try again shortly",
            ),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::NotAdmin | AuthError::PrincipalNotAllowed(..) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", err.to_string())
            }
            AuthError::Token(TokenError::KeysUnavailable(_)) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                err.to_string(),
            ),
            AuthError::Missing
            | AuthError::Invalid
            | AuthError::NoEntra
            | AuthError::Token(TokenError::Invalid(_)) => {
                let mut error =
                    Self::new(StatusCode::UNAUTHORIZED, "unauthorized", err.to_string());
                error.challenge = true;
                error
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = self.error, description = %self.description, "request failed");
        } else {
            tracing::info!(
                status = self.status.as_u16(),
                error = self.error,
                "request refused"
            );
        }
        let mut body = json!({"error": self.error, "error_description": self.description});
        if let Some(url) = self.authorize_url {
            body["authorize_url"] = url.into();
        }
        let mut response = (self.status, Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Parameters of `/api/refresh`, from the query or a JSON body. Unknown parameters are
/// ignored: the Functions host passes its own (`code=`, the function key) through.
#[derive(Debug, Default, Deserialize)]
struct RefreshParams {
    min_validity: Option<u64>,
    force: Option<bool>,
    /// An API key in the query is refused below, but named here so the error says why.
    key: Option<String>,
}

async fn refresh(
    State(state): State<Arc<AppState>>,
    Path(connection): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Parameters before the key, so that a key sent in the URL gets a helpful 400.
    let mut params: RefreshParams = Query::try_from_uri(&uri).map(|Query(p)| p).map_err(|err| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", err.body_text())
    })?;
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
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json (or no body)",
            ));
        }
        let from_body: RefreshParams = serde_json::from_slice(&body).map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("the body must be a JSON object like {{\"min_validity\": 600, \"force\": false}} ({})", json_problem(&err)),
            )
        })?;
        params.min_validity = from_body.min_validity.or(params.min_validity);
        params.force = from_body.force.or(params.force);
    }
    if params.key.is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "send the API key in the X-API-Key header, not in the URL",
        ));
    }
    state
        .auth
        .authenticate(&headers, None, Role::Caller)
        .await?;
    let request = TokenRequest {
        min_validity: params.min_validity.map(Duration::from_secs),
        force: params.force.unwrap_or(false),
    };
    let record = state
        .broker
        .token(&connection, request)
        .await
        .map_err(|err| ApiError::from_broker(err, &state))?;
    let body = record.to_response(state.broker.now()).ok_or_else(|| {
        ApiError::from_broker(
            BrokerError::ConsentRequired {
                reason: format!("connection `{connection}` has no access token"),
                connection: connection.clone(),
            },
            &state,
        )
    })?;
    Ok((
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        Json(body),
    )
        .into_response())
}

/// serde_json messages can quote the input; name only the kind of problem.
fn json_problem(err: &serde_json::Error) -> &'static str {
    match err.classify() {
        serde_json::error::Category::Data => "unexpected field or value",
        _ => "not valid JSON",
    }
}

#[derive(Deserialize)]
struct KeyParam {
    key: Option<String>,
}

/// Admin routes: a bearer token, `X-API-Key`, or for a browser `?key=`.
async fn authenticate_admin(
    state: &AppState,
    headers: &HeaderMap,
    query: &Option<String>,
) -> Result<(), ApiError> {
    Ok(state
        .auth
        .authenticate(headers, query_key(query).as_deref(), Role::Admin)
        .await?)
}

/// `?key=` — admin routes accept it because a browser cannot set headers on a link.
fn query_key(query: &Option<String>) -> Option<String> {
    query
        .as_deref()
        .and_then(|q| serde_urlencoded::from_str::<KeyParam>(q).ok())
        .and_then(|p| p.key)
}

/// Status of every connection: JSON for `Accept: application/json`, else an HTML page.
async fn connections(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate_admin(&state, &headers, &query).await?;
    let rows: Vec<_> = state
        .broker
        .statuses()
        .await
        .into_iter()
        .map(|status| {
            let url = state.authorize_url(&status.name);
            (status, url)
        })
        .collect();
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"));
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    if wants_json {
        let list: Vec<_> = rows
            .into_iter()
            .map(|(status, url)| {
                let mut value = serde_json::to_value(status).unwrap_or_default();
                value["authorize_url"] = url.into();
                value
            })
            .collect();
        Ok((no_store, Json(json!({ "connections": list }))).into_response())
    } else {
        Ok((no_store, Html(html::connections(&rows))).into_response())
    }
}

async fn authorize(
    State(state): State<Arc<AppState>>,
    Path(connection): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authenticate_admin(&state, &headers, &query).await?;
    let provider = state
        .broker
        .provider(&connection)
        .map_err(|err| ApiError::from_broker(err, &state))?;

    let binding = cookie(&headers, BINDING_COOKIE)
        .filter(|b| StateSigner::is_valid_binding(b))
        .map(str::to_owned)
        .unwrap_or_else(StateSigner::new_binding);
    let issued = state
        .signer
        .issue(&connection, &binding, state.broker.now());
    let location = provider.authorize_url(issued.state, &issued.verifier);

    let secure = if state.public_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{BINDING_COOKIE}={binding}; Path=/api; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        STATE_TTL.as_secs()
    );
    tracing::info!(connection = %connection, "redirecting admin to the provider's consent page");
    Ok((
        StatusCode::FOUND,
        [
            (header::LOCATION, location.to_string()),
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            // The authorize URL may carry the admin key in `?key=`.
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
    )
        .into_response())
}

/// The value of cookie `name` in the request, if any.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The timer function (`prerefresh/function.json`): the Functions host POSTs
/// `{"Data":{"timer":{…}},"Metadata":{…}}` and expects `{"Outputs":{},"Logs":[…],"ReturnValue":…}`.
/// Outside the Functions host (or from another machine), an admin key is needed.
async fn prerefresh(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if !(state.functions_host && peer.ip().is_loopback()) {
        authenticate_admin(&state, &headers, &query).await?;
    }
    // The payload only informs the log; a missing or odd one does not stop the run.
    let invocation: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let past_due = invocation["Data"]
        .as_object()
        .and_then(|data| data.values().find_map(|timer| timer["IsPastDue"].as_bool()))
        .unwrap_or(false);
    tracing::info!(past_due, "prerefresh run started");

    let reports = state.broker.prerefresh(state.prerefresh_window).await;
    let mut logs: Vec<String> = reports
        .iter()
        .map(|r| {
            let outcome = serde_json::to_value(r.outcome).unwrap_or_default();
            format!(
                "{}: {} ({})",
                r.connection,
                outcome.as_str().unwrap_or("?"),
                r.detail
            )
        })
        .collect();
    let count = |outcome| reports.iter().filter(|r| r.outcome == outcome).count();
    let failed = count(crate::broker::PrerefreshOutcome::Failed);
    let refreshed = count(crate::broker::PrerefreshOutcome::Refreshed);
    logs.insert(
        0,
        format!(
            "prerefresh{}: {} connection(s), {refreshed} refreshed, {failed} failed",
            if past_due { " (past due)" } else { "" },
            reports.len()
        ),
    );
    let body = json!({
        "Outputs": {},
        "Logs": logs,
        "ReturnValue": {
            "refreshed": refreshed,
            "failed": failed,
            "connections": reports,
        },
    });
    Ok(Json(body).into_response())
}

#[derive(Deserialize, Default)]
struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// A browser-facing result: an HTML page with a status. `no-referrer`: the callback URL
/// holds an authorization code, and no link on the page should pass it on.
fn page(status: StatusCode, title: &str, message: &str) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html::page(title, message)),
    )
        .into_response()
}

async fn callback(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params: CallbackParams = match query.as_deref().map(serde_urlencoded::from_str) {
        None => CallbackParams::default(),
        Some(Ok(params)) => params,
        Some(Err(_)) => {
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in failed",
                "The provider's response could not be read.",
            )
        }
    };
    let redeemed = match state.signer.redeem(
        params.state.as_deref(),
        cookie(&headers, BINDING_COOKIE),
        state.broker.now(),
    ) {
        Ok(redeemed) => redeemed,
        Err(err) => {
            tracing::warn!(reason = %err, "callback refused: bad state");
            let hint = match err {
                StateError::Expired | StateError::Replayed => {
                    " Open the authorize link again to start over."
                }
                _ => "",
            };
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in failed",
                &format!("{}.{hint}", capitalize(&err.to_string())),
            );
        }
    };
    // Single use across instances too: a replayed callback URL is refused everywhere,
    // before any code exchange.
    match state.broker.claim_state(&redeemed.nonce).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!("callback refused: state already used on another instance");
            return page(
                StatusCode::BAD_REQUEST,
                "Sign-in failed",
                &format!(
                    "{}. Open the authorize link again to start over.",
                    capitalize(&StateError::Replayed.to_string())
                ),
            );
        }
        Err(err) => {
            tracing::warn!(error = %err, "callback refused: the used-state record is unavailable");
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Sign-in failed",
                "The broker's storage is unavailable, so this sign-in cannot be checked. Open the authorize link again in a minute.",
            );
        }
    }
    let connection = redeemed.connection;
    if let Some(error) = params.error {
        tracing::warn!(connection = %connection, provider_error = %error, "provider refused consent");
        let detail = params
            .error_description
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        return page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            &format!("The provider did not grant access to `{connection}`: {error}{detail}. Nothing was stored."),
        );
    }
    let Some(code) = params.code.filter(|c| !c.is_empty()) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "The provider's response carries no authorization code.",
        );
    };
    // Provider-specific callback parameters callers need (QuickBooks `realmId`).
    let mut callback_extra = serde_json::Map::new();
    if let Ok(provider) = state.broker.provider(&connection) {
        let pairs: Vec<(String, String)> = query
            .as_deref()
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default();
        for (param, field) in provider.callback_params {
            if let Some((_, value)) = pairs.iter().find(|(k, _)| k == param) {
                callback_extra.insert((*field).to_owned(), value.clone().into());
            }
        }
    }
    match state
        .broker
        .complete_consent(&connection, code, redeemed.verifier, callback_extra)
        .await
    {
        Ok(()) => page(
            StatusCode::OK,
            "Connected",
            &format!("`{connection}` is connected. Pipelines can now get tokens from /api/refresh/{connection}. You can close this window."),
        ),
        Err(err) => {
            let status = ApiError::from_broker(err, &state);
            page(
                status.status,
                "Not connected",
                &format!("Connecting `{connection}` failed: {}", status.description),
            )
        }
    }
}

fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
