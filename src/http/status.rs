//! `GET /api/connections`: every connection's state, as HTML for browsers or JSON.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::admin::{admit_browser_admin, Admission};
use super::{ApiError, AppState};
use crate::html;

/// Status of every connection: JSON for `Accept: application/json`, else an HTML page.
/// Every connection's state: JSON for `Accept: application/json`, else an HTML page.
#[utoipa::path(
    get,
    path = "/api/connections",
    tag = "status",
    params(("key" = Option<String>, Query, description = "An admin key, exchanged for the tb_admin session cookie (browsers only)")),
    responses(
        (status = 200, description = "Every connection's state (JSON, or the HTML status page; the ?key= exchange page)",
            content(
                (super::openapi::ConnectionsBody = "application/json"),
                (String = "text/html"),
            )),
        (status = 400, description = "Bad parameters, an API key in the URL, or a malformed request", body = super::openapi::ErrorBody),
        (status = 401, description = "No or wrong credential", body = super::openapi::ErrorBody),
        (status = 403, description = "A credential without the right", body = super::openapi::ErrorBody)
    ),
    security(("admin_session" = []), ("api_key" = []), ("entra" = []))
)]
pub(super) async fn connections(
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Admission::Answer(answer) = admit_browser_admin(&state, &uri, &headers).await? {
        return Ok(answer);
    }
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
                let refresh_url = state.refresh_url(&status.name);
                let mut value = serde_json::to_value(status).unwrap_or_default();
                value["authorize_url"] = url.into();
                value["refresh_url"] = refresh_url.into();
                value
            })
            .collect();
        Ok((no_store, Json(json!({ "connections": list }))).into_response())
    } else {
        let links: Vec<(String, String)> = rows
            .iter()
            .map(|(status, url)| (url.clone(), state.refresh_url(&status.name)))
            .collect();
        let cards: Vec<html::Card<'_>> = rows
            .iter()
            .zip(&links)
            .map(|((status, _), (authorize_url, refresh_url))| html::Card {
                status,
                authorize_url,
                refresh_url,
            })
            .collect();
        Ok((no_store, Html(html::connections(&cards))).into_response())
    }
}
