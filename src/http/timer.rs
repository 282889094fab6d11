//! `POST /prerefresh`: the Functions host's timer invocation.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::admin::authenticate_admin;
use super::{ApiError, AppState};

/// The timer function (`prerefresh/function.json`): the Functions host POSTs
/// `{"Data":{"timer":{…}},"Metadata":{…}}` and expects `{"Outputs":{},"Logs":[…],"ReturnValue":…}`.
/// Outside the Functions host (or from another machine), an admin key is needed.
/// The timer run (the Functions host's invocation): refreshes what is about to expire.
#[utoipa::path(
    post,
    path = "/prerefresh",
    tag = "timer",
    request_body(content = Option<Object>, content_type = "application/json", description = "The host's timer payload (only informs the log)"),
    responses(
        (status = 200, description = "A line per connection, in the host's shape", body = super::openapi::TimerBody),
        (status = 400, description = "Bad parameters, an API key in the URL, or a malformed request", body = super::openapi::ErrorBody),
        (status = 401, description = "No or wrong credential", body = super::openapi::ErrorBody),
        (status = 403, description = "A credential without the right", body = super::openapi::ErrorBody),
        (status = 413, description = "A body larger than the route takes", body = super::openapi::ErrorBody)
    ),
    security(("api_key" = []), ("entra" = []), ("admin_session" = []))
)]
pub(super) async fn prerefresh(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !(state.functions_host && peer.ip().is_loopback()) {
        authenticate_admin(&state, &headers).await?;
    }
    // The host's timer payload: a few hundred bytes.
    let body = super::read_body(body, 16 * 1024).await?;
    // The payload only informs the log: what is inside the object may be odd (the host
    // sends `ScheduleStatus: null` at times) without stopping the run. But a body that is
    // not a JSON object at all is not the host's invocation (the document says object or
    // nothing): refused rather than guessed at.
    let invocation: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::invalid_request(format!(
                "the body must be the host's invocation, a JSON object ({})",
                super::refresh::json_problem(&err)
            ))
        })?
    };
    if !(invocation.is_object() || invocation.is_null()) {
        return Err(ApiError::invalid_request(
            "the body must be the host's invocation, a JSON object",
        ));
    }
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
