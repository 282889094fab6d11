//! `/api/proxy/{connection}/{*path}`: forwards a caller's request to the connection's API
//! (`api_base_url`) with a fresh access token, so a Data Factory Copy activity can read a
//! provider's API in one step and no token enters the pipeline.
//!
//! Authenticated like `/api/refresh`. The forwarded URL is always under the configured base
//! (no traversal, no other scheme, host or port; redirects are not followed). The caller's
//! credentials, cookies and hop-by-hop headers are never forwarded; the upstream's
//! `Set-Cookie` never comes back; everything else — status, body, `Link`, `Retry-After`,
//! continuation headers — comes back untouched, the body streamed.
//!
//! # Layout
//! One behaviour per file (linkerd2-proxy's habit), the handler here:
//! authenticate → [`target`] → [`send`] (one retry after a 401) → [`relay`].
//! - `path`: the path and query as the upstream will read them, kept under the base;
//! - `placeholders`: `{realm_id}` / `{division}` from the consent;
//! - `base`: the configured base, or the provider-named one (never internal);
//! - `target`: the request's URL and provider headers for one token record;
//! - `headers`: which headers cross, both ways;
//! - `body`: the caller's body, buffered for a replay or streamed;
//! - `send`: the upstream request with the bearer token, and the one retry;
//! - `relay`: the API's answer back to the caller, links pointed at the proxy (`links`).

mod base;
mod body;
mod headers;
mod links;
mod path;
mod placeholders;
mod relay;
mod send;
mod target;

pub(super) use body::PROXY_MAX_BODY;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

use super::code::ErrorCode;
use super::{ApiError, AppState};
use crate::audit::Source;
use crate::broker::TokenRequest;

/// Marks an answer relayed from the API: the framework-error rewriting leaves it alone.
#[derive(Clone, Copy)]
pub(super) struct Relayed;

/// The methods relayed to the API (and documented): what REST APIs and a Copy activity's
/// REST source use. TRACE would echo the request — the broker's bearer token included —
/// back to the caller; CONNECT and the rest have no place in an API call.
pub(super) const RELAYED_METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// Forwards to the connection's API with a fresh access token; the API's answer comes back
/// as it is (status, body, `Link` and other headers; never `Set-Cookie`). GET, POST, PUT,
/// PATCH and DELETE are relayed (what REST APIs and a Copy activity's REST source send);
/// any other method is refused with 405 before anything leaves.
#[utoipa::path(
    method(get, post, put, patch, delete),
    path = "/api/proxy/{connection}/{path}",
    tag = "proxy",
    params(
        ("connection" = String, Path, description = "The connection's name from the config"),
        // One segment as OpenAPI writes a path parameter (the route takes several, separated
        // by `/`): no `.`/`..` segment, no backslash, no control character — those are a 400.
        ("path" = String, Path, pattern = "^[^./\\\\\\u0000-\\u001f\\u007f-\\u009f][^/\\\\\\u0000-\\u001f\\u007f-\\u009f]*$", description = "The path under the connection's api_base_url (several segments separated by `/` in practice); `.`/`..` segments, empty segments, encoded slashes, backslashes and control characters are a 400"),
        ("tenant" = Option<String>, Query, description = "Xero: the organisation (id or name) when the connection was granted several; the broker's parameter, not forwarded"),
    ),
    // Any status can come from the API itself, with any body, so no status is the
    // broker's alone: one `default` answer, described.
    responses(
        (status = "default", description = "The API's own answer, relayed untouched; or the broker's JSON error (ErrorBody): 400 a path that would leave the API or an ambiguous tenant, 401/403 the caller's credential, 404 no such connection, no proxy for it or an unknown tenant, 405 a method not relayed, 409 consent required, 413 a body over 32 MiB, 429 the refresh limit, 502 the API unreachable, 503 store, lease or setup unavailable"),
    ),
    security(("api_key" = []), ("entra" = []))
)]
pub(super) async fn proxy(
    State(state): State<Arc<AppState>>,
    Path((connection, _)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !RELAYED_METHODS.contains(&method) {
        // The router sends HEAD to GET's handler; nothing else gets here.
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            "the proxy relays GET, POST, PUT, PATCH and DELETE",
        ));
    }
    let caller = super::audit::caller_of(&state, &headers, &connection, ROUTE).await?;
    let answer = forward(&state, &connection, &caller, &method, &uri, &headers, body).await;
    if let Err(error) = &answer {
        super::audit::refused(&state, &headers, &caller, &connection, ROUTE, error);
    }
    answer
}

/// The route as the audit trail names it.
const ROUTE: &str = "/api/proxy/{connection}/{path}";

/// The authenticated part of [`proxy`]: target → send → relay.
async fn forward(
    state: &Arc<AppState>,
    connection: &str,
    caller: &crate::auth::Caller,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Everything that can be judged before a byte of the body is read or a token taken.
    let request = target::Request::read(state, connection, uri)?;
    let body = body::start_body(body).await?;
    let asked_at = state.broker.now();
    let record = send::token(state, connection, TokenRequest::default()).await?;
    let target = request.target(&record, state.local_mode)?;
    let source = Source::of(record.obtained_at, asked_at);
    super::audit::issued(
        state,
        headers,
        caller,
        connection,
        ROUTE,
        target.tenant.as_deref(),
        source,
        &record,
    );
    let upstream = send::with_one_retry(
        state,
        connection,
        method,
        &target,
        headers::forwarded_headers(headers),
        body,
        record,
    )
    .await?;
    // A line per relayed answer at DEBUG: a paged copy makes thousands, and the API's own
    // refusals are worth an INFO line.
    let status = upstream.status();
    if status.is_client_error() || status.is_server_error() {
        tracing::info!(connection = %connection, method = %method, status = status.as_u16(), "proxied; the API refused");
    } else {
        tracing::debug!(connection = %connection, method = %method, status = status.as_u16(), "proxied");
    }
    relay::answer(upstream, &target, || {
        request.proxy_prefix(&state.public_url)
    })
}
