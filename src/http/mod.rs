//! The HTTP edge: the router, the state the handlers share, and the errors the framework
//! answers itself, turned into the broker's JSON error shape. One module per route group:
//! `refresh`, `consent` (authorize and callback), `status`, `timer`; `admin` authenticates
//! admin callers; `error` maps every failure to a status and a stable JSON body (details are
//! logged, never echoed beyond a secret-free description).

mod admin;
mod audit;
mod code;
mod consent;
mod deadline;
mod error;
mod openapi;
mod proxy;
mod refresh;
mod server;
mod sign_in;
mod status;
mod timer;

pub use admin::LoginGate;
pub use code::ErrorCode;
pub use error::ApiError;
pub use openapi::document as openapi_document;
pub use server::serve;

use consent::{authorize, callback};
use refresh::{refresh_get, refresh_post};
use status::connections;
use timer::prerefresh;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;
use url::Url;

use crate::auth::CallerAuth;
use crate::broker::Broker;
use crate::state::StateSigner;

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
    /// A trial on this machine (`local_mode`): a provider-named proxy base may be loopback.
    pub local_mode: bool,
    /// Connections with a proxy, and how each forwards (from its preset).
    pub proxies: std::collections::BTreeMap<String, crate::config::ProxyConfig>,
    /// The proxy's client: no redirects, timeouts.
    pub proxy_http: reqwest::Client,
    /// `token-broker login`'s process: only its connection's consent routes are served.
    pub login: Option<LoginGate>,
    /// Who took which token (`audit = false` turns it off).
    pub audit: crate::audit::Audit,
    /// Admins signing in with Entra ID (`[auth.admin_sign_in]`).
    pub sign_in: Option<crate::sign_in::AdminSignIn>,
}

impl AppState {
    /// A cookie's name: on https with the `__Host-` prefix, which browsers accept only from a
    /// secure origin with `Path=/` and no `Domain` — so no sibling site or plain-http page
    /// can set or shadow it (RFC 6265bis §4.1.3.2). On plain http (a trial on this
    /// machine) the bare name: browsers refuse `__Host-` cookies there.
    fn cookie_name(&self, base: &str) -> String {
        if self.public_url.scheme() == "https" {
            format!("__Host-{base}")
        } else {
            base.to_owned()
        }
    }

    /// The cookies' scope: `; Path=/; Secure` on https (what `__Host-` requires), else
    /// `; Path=/api` (browsers refuse Secure cookies from a plain-http origin other than
    /// localhost).
    fn cookie_scope(&self) -> &'static str {
        if self.public_url.scheme() == "https" {
            "; Path=/; Secure"
        } else {
            "; Path=/api"
        }
    }

    /// What a pipeline's Web activity calls for `connection`'s token.
    fn refresh_url(&self, connection: &str) -> String {
        format!(
            "{}/api/refresh/{connection}",
            self.public_url.as_str().trim_end_matches('/')
        )
    }

    fn authorize_url(&self, connection: &str) -> String {
        format!(
            "{}/api/authorize/{connection}",
            self.public_url.as_str().trim_end_matches('/')
        )
    }
}

/// The most any route reads of a body: the timer's payload is a few hundred bytes, a
/// refresh's a few dozen. Bodies declared larger are refused before anything is read.
const MAX_BODY: usize = 64 * 1024;

/// Reads a body of at most `limit` bytes — call it only once the caller is authenticated.
/// Over the limit: 413; a body that cannot be read (broken chunking, too slow): 400. Both
/// in the JSON error shape.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(format!(
                "the request body is larger than this route accepts ({limit} bytes)"
            )))
        }
        Err(_) => Err(ApiError::invalid_request(
            "the request body could not be read (malformed, or too slow)",
        )),
    }
}

/// A route: its path, its handlers, and the most of a body it may be sent. The limit is part
/// of the route, not a layer over "the routes so far", so no route can be added without one.
struct Route {
    path: &'static str,
    methods: MethodRouter<Arc<AppState>>,
    max_body: usize,
}

/// Every route the broker serves, each with its body limit: a declared length over it is
/// refused with 413 before anything is read or anyone authenticated (JSON-shaped by
/// `json_framework_errors`). Handlers that read a body take less still (`read_body`).
fn routes() -> Vec<Route> {
    let route = |path, methods, max_body| Route {
        path,
        methods,
        max_body,
    };
    vec![
        route("/", get(root), MAX_BODY),
        route("/api/health", get(health), MAX_BODY),
        route("/api/authorize/{connection}", get(authorize), MAX_BODY),
        route("/api/callback", get(callback), MAX_BODY),
        route("/api/signin", get(sign_in::signed_in), MAX_BODY),
        route(
            "/api/refresh/{connection}",
            get(refresh_get).post(refresh_post),
            MAX_BODY,
        ),
        route("/api/openapi.json", get(openapi::openapi_json), MAX_BODY),
        route("/api/connections", get(connections), MAX_BODY),
        route("/prerefresh", post(prerefresh), MAX_BODY),
        // The proxy streams bodies to the API, so it takes more. Only the relayed methods
        // (`proxy::RELAYED_METHODS`): TRACE, CONNECT and the rest answer 405 with `Allow`.
        route(
            "/api/proxy/{connection}/{*path}",
            get(proxy::proxy)
                .post(proxy::proxy)
                .put(proxy::proxy)
                .patch(proxy::proxy)
                .delete(proxy::proxy),
            proxy::PROXY_MAX_BODY,
        ),
    ]
}

/// What `token-broker login` serves on its loopback port: the consent of its connection
/// (`authorize` refuses the others) and the callback. Everything else — tokens, status,
/// the proxy, the timer — is a 404: the process holds no credential anyone may use.
const LOGIN_ROUTES: [&str; 2] = ["/api/authorize/{connection}", "/api/callback"];

/// The broker's routes (for `login`'s process, only [`LOGIN_ROUTES`]).
pub fn router(state: Arc<AppState>) -> Router {
    let login = state.login.is_some();
    let mut router = Router::new();
    for route in routes() {
        if login && !LOGIN_ROUTES.contains(&route.path) {
            continue;
        }
        router = router.route(
            route.path,
            route
                .methods
                .layer(tower_http::limit::RequestBodyLimitLayer::new(
                    route.max_body,
                )),
        );
    }
    router
        .fallback(not_found)
        .layer(axum::middleware::map_response(error::log_errors))
        .layer(axum::middleware::map_response(json_framework_errors))
        .layer(
            // Our own span (`request_span`): the default one records the full URI.
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                request_span(request.method(), request.uri().path(), request.headers())
            }),
        )
        .with_state(state)
}

/// The header the Functions host names each invocation in (typed, not parsed per request:
/// the audit trail reads it for every handout).
const INVOCATION_ID: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-azure-functions-invocationid");

/// The Functions host's invocation id of a request, if any.
fn invocation_id(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(INVOCATION_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The INFO span of a request: method, path and the host's invocation id — never the query
/// (it can hold an authorization code or an admin key). Both fields are capped and stripped
/// of control characters: a 60 KB path must not become a 60 KB log line.
fn request_span(
    method: &axum::http::Method,
    path: &str,
    headers: &axum::http::HeaderMap,
) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %Loggable(method.as_str()),
        path = %Loggable(path),
        invocation_id = %Loggable(invocation_id(headers)),
    )
}

/// The most of a request's path or header value a log line carries.
const LOG_FIELD_MAX: usize = 200;

/// `value` for a log line: at most [`LOG_FIELD_MAX`] characters, control characters
/// replaced, and a mark when cut. Written as it is displayed (no string built first): every
/// request's span carries three.
struct Loggable<'a>(&'a str);

impl std::fmt::Display for Loggable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let mut chars = self.0.chars();
        for c in chars.by_ref().take(LOG_FIELD_MAX) {
            f.write_char(if c.is_control() { '?' } else { c })?;
        }
        if chars.next().is_some() {
            f.write_str("…(cut)")?;
        }
        Ok(())
    }
}

/// The Functions host's readiness probe (it GETs `/` until anything answers).
#[utoipa::path(get, path = "/", tag = "meta",
    responses((status = 200, description = "Anything: the broker is up", content_type = "text/plain", body = String)))]
async fn root() -> &'static str {
    "Token Broker\n"
}

/// Liveness, no authentication.
#[utoipa::path(get, path = "/api/health", tag = "meta",
    responses((status = 200, description = "Up", body = openapi::HealthBody)))]
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
    // The broker's own errors are JSON; the browser pages are HTML; the proxy relays the
    // API's answers untouched.
    if response.extensions().get::<proxy::Relayed>().is_some()
        || !(status.is_client_error() || status.is_server_error())
        || content_type.starts_with("application/json")
        || content_type.starts_with("text/html")
    {
        return response;
    }
    // Their codes come from the one table; the answer keeps the framework's status and
    // headers (`Allow` on a 405).
    let (code, description) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            let allowed = response
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            (
                ErrorCode::MethodNotAllowed,
                format!("this route does not accept that method (allowed: {allowed})"),
            )
        }
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::PayloadTooLarge,
            "the request body is larger than this route accepts".to_owned(),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json".to_owned(),
        ),
        StatusCode::BAD_REQUEST => (
            ErrorCode::InvalidRequest,
            "the request path or parameters could not be read".to_owned(),
        ),
        other => (
            ErrorCode::HttpError,
            other.canonical_reason().unwrap_or("error").to_owned(),
        ),
    };
    let (mut parts, _) = response.into_parts();
    let answer = ApiError::new(code, description).into_response();
    let (answer_parts, body) = answer.into_parts();
    for (name, value) in &answer_parts.headers {
        parts.headers.insert(name.clone(), value.clone());
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.extensions.extend(answer_parts.extensions);
    Response::from_parts(parts, body)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {method} {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route table is the document's: a route served but not documented (or the
    /// reverse) fails here, and every route carries a body limit by construction.
    #[test]
    fn every_route_is_documented_and_has_a_body_limit() {
        let document = openapi_document();
        let mut documented: Vec<String> = document["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .cloned()
            .collect();
        documented.sort();
        let mut served: Vec<String> = routes()
            .iter()
            .map(|route| route.path.replace("{*", "{"))
            .collect();
        served.sort();
        assert_eq!(served, documented);
        for route in routes() {
            assert!(
                (1..=proxy::PROXY_MAX_BODY).contains(&route.max_body),
                "{}: {}",
                route.path,
                route.max_body
            );
        }
        for path in LOGIN_ROUTES {
            assert!(routes().iter().any(|route| route.path == path), "{path}");
        }
    }
}
