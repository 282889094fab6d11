//! Admin authentication for the browser and admin routes: a bearer token, `X-API-Key`, or
//! the admin-session cookie a browser gets in exchange for `?key=`.
//!
//! A key in a URL lands in the browser's history and in request logs, so `?key=` is taken
//! only on the browser routes (`/api/authorize/…`, `/api/connections`), and only once: the
//! answer sets a short-lived `HttpOnly`, `SameSite=Strict` session cookie (`Secure` when the
//! public URL is https) and sends the browser on to the same address without the key.

use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};

use super::{ApiError, AppState};
use crate::auth::Role;
use crate::html;
use crate::state::{ADMIN_COOKIE, ADMIN_SESSION_TTL};

/// Admin routes: a bearer token, `X-API-Key`, or an admin-session cookie.
pub(super) async fn authenticate_admin(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    if cookie(headers, ADMIN_COOKIE)
        .is_some_and(|session| state.signer.is_admin_session(session, state.broker.now()))
    {
        return Ok(());
    }
    Ok(state.auth.authenticate(headers, Role::Admin).await?)
}

/// The browser routes' admission: a `?key=` is exchanged at once (the answer to send is
/// returned), otherwise the caller must be an admin.
pub(super) async fn admit_browser_admin(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<Response>, ApiError> {
    if let Some(exchanged) = exchange_query_key(state, uri)? {
        return Ok(Some(exchanged));
    }
    authenticate_admin(state, headers).await?;
    Ok(None)
}

/// A browser route opened with `?key=`: checks the key and answers with the session cookie
/// and a page that goes on to the same address without it. `None` when there is no key.
fn exchange_query_key(state: &AppState, uri: &Uri) -> Result<Option<Response>, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
    let (keys, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(name, _)| name == "key");
    let Some((_, key)) = keys.into_iter().next() else {
        return Ok(None);
    };
    state.auth.check_key(Some(&key), Role::Admin)?;
    let target = match serde_urlencoded::to_string(&rest) {
        Ok(rest) if !rest.is_empty() => format!("{}?{rest}", uri.path()),
        _ => uri.path().to_owned(),
    };
    let session = state.signer.issue_admin_session(state.broker.now());
    let cookie = format!(
        "{ADMIN_COOKIE}={session}; Path=/api; Max-Age={}; HttpOnly; SameSite=Strict{}",
        ADMIN_SESSION_TTL.as_secs(),
        state.secure_cookie_attribute()
    );
    tracing::info!(
        path = uri.path(),
        "admin key exchanged for a session cookie"
    );
    Ok(Some(
        (
            StatusCode::OK,
            [
                (header::SET_COOKIE, cookie),
                (header::CACHE_CONTROL, "no-store".to_owned()),
                // The address that brought the browser here holds the key.
                (header::REFERRER_POLICY, "no-referrer".to_owned()),
            ],
            Html(html::continue_to(&target)),
        )
            .into_response(),
    ))
}

/// The value of cookie `name` in the request, if any.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}
