//! Admin authentication for the browser and admin routes: a bearer token, `X-API-Key`, or
//! for a browser `?key=`.

use axum::http::HeaderMap;
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::auth::Role;

#[derive(Deserialize)]
pub(super) struct KeyParam {
    key: Option<String>,
}

/// Admin routes: a bearer token, `X-API-Key`, or for a browser `?key=`.
pub(super) async fn authenticate_admin(
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
pub(super) fn query_key(query: &Option<String>) -> Option<String> {
    query
        .as_deref()
        .and_then(|q| serde_urlencoded::from_str::<KeyParam>(q).ok())
        .and_then(|p| p.key)
}
