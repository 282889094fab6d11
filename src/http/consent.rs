//! `GET /api/authorize/{connection}` and `GET /api/callback`: the consent in the admin's
//! browser, and the provider's redirect back.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::Uri;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::admin::{admit_browser_admin, browser_binding, cookie, Admission};
use super::code::ErrorCode;
use super::{ApiError, AppState};
use crate::broker::BrokerError;
use crate::html;
use crate::provider::UpstreamError;
use crate::state::{StateError, BINDING_COOKIE};

/// Starts a consent: redirects the admin's browser to the provider. With `?key=<admin key>`
/// it first trades the key for an admin session cookie and goes on without it.
#[utoipa::path(
    get,
    path = "/api/authorize/{connection}",
    tag = "consent",
    params(
        ("connection" = String, Path, description = "The connection's name from the config"),
        ("key" = Option<String>, Query, description = "An admin key, exchanged for the tb_admin session cookie (browsers only)"),
    ),
    responses(
        (status = 302, description = "To the provider's consent page (Location); sets the browser-binding cookie"),
        (status = 200, description = "The ?key= exchange: sets tb_admin and goes on without the key", content_type = "text/html", body = String),
        (status = 400, description = "Bad parameters, an API key in the URL, or a malformed request", body = super::openapi::ErrorBody),
        (status = 401, description = "No or wrong credential", body = super::openapi::ErrorBody),
        (status = 403, description = "A credential without the right", body = super::openapi::ErrorBody),
        (status = 404, description = "No such connection", body = super::openapi::ErrorBody),
        (status = 503, description = "Store, lease or connection setup unavailable (Retry-After)", body = super::openapi::ErrorBody)
    ),
    security(("admin_session" = []), ("api_key" = []), ("entra" = []), ())
)]
pub(super) async fn authorize(
    State(state): State<Arc<AppState>>,
    Path(connection): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if state
        .login
        .as_ref()
        .is_some_and(|gate| gate.connection() != connection)
    {
        // `login` serves one connection's consent, and no other.
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "this login serves only its own connection's consent",
        ));
    }
    let admin = match admit_browser_admin(&state, &uri, &headers).await? {
        Admission::Admin(admin) => admin,
        Admission::Answer(answer) => return Ok(answer),
    };
    let provider = state
        .broker
        .provider(&connection)
        .map_err(|err| ApiError::from_broker(err, &state))?;

    let (binding, cookie) = browser_binding(&state, &headers);
    let issued = state
        .signer
        .issue_by(&connection, Some(&admin), &binding, state.broker.now());
    let location = provider.authorize_url(issued.state, &issued.verifier);

    tracing::info!(connection = %connection, admin = %admin, "redirecting admin to the provider's consent page");
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

#[derive(Deserialize, Default)]
pub(super) struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// A browser-facing result: an HTML page with a status. `no-referrer`: the callback URL
/// holds an authorization code, and no link on the page should pass it on.
pub(super) fn page(status: StatusCode, title: &str, message: &str) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html::page_back(title, message)),
    )
        .into_response()
}

/// The provider's redirect back: checks `state`, exchanges the code, stores the tokens, and
/// shows the admin a page (never a token).
#[utoipa::path(
    get,
    path = "/api/callback",
    tag = "consent",
    params(
        // What RFC 6749 §4.1.2 sends back: always the state the broker issued, and a code
        // or an error. None of them is ever empty; without a state the answer is a 400.
        ("code" = Option<String>, Query, min_length = 1, description = "The authorization code (or `error`)"),
        ("state" = String, Query, min_length = 1, description = "The broker's signed state, as issued by /api/authorize (any other value is a 400)"),
        ("error" = Option<String>, Query, min_length = 1, description = "The provider's refusal (or `code`)"),
        ("error_description" = Option<String>, Query, min_length = 1, description = "The provider's explanation"),
    ),
    responses(
        (status = 200, description = "Connected", content_type = "text/html", body = String),
        (status = 400, description = "A bad, expired, replayed or unbound state, a refusal, or a code the provider refused", content_type = "text/html", body = String),
        (status = 404, description = "The state names a connection no longer configured", content_type = "text/html", body = String),
        (status = 409, description = "The provider issued no refresh token", content_type = "text/html", body = String),
        (status = 429, description = "Too many requests", content_type = "text/html", body = String),
        (status = 500, description = "An internal failure", content_type = "text/html", body = String),
        (status = 502, description = "The provider failed", content_type = "text/html", body = String),
        (status = 503, description = "Storage unavailable", content_type = "text/html", body = String),
    ),
    security(())
)]
pub(super) async fn callback(
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
        cookie(&headers, &state.cookie_name(BINDING_COOKIE)),
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
    let mut from_callback = crate::token::Facts::default();
    if let Ok(provider) = state.broker.provider(&connection) {
        let pairs: Vec<(String, String)> = query
            .as_deref()
            .and_then(|q| serde_urlencoded::from_str(q).ok())
            .unwrap_or_default();
        for (param, fact) in provider.callback_params {
            if let Some((_, value)) = pairs.iter().find(|(k, _)| k == param) {
                from_callback.set_text(*fact, value.clone());
            }
        }
    }
    match state
        .broker
        .complete_consent(&connection, code, redeemed.verifier, from_callback)
        .await
    {
        Ok(record) => {
            // The admin who began it, as the signed state names them.
            super::audit::issued(
                &state,
                &headers,
                &crate::auth::Caller::Key {
                    name: redeemed.admin.clone().unwrap_or_else(|| "admin".to_owned()),
                    admin: true,
                },
                &connection,
                "/api/callback",
                None,
                crate::audit::Source::Consent,
                &record,
            );
            page(
            StatusCode::OK,
            "Connected",
            &format!("`{connection}` is connected. Pipelines can now get tokens from /api/refresh/{connection}. You can close this window."),
        )
        }
        Err(BrokerError::Upstream(UpstreamError::InvalidGrant { description })) => {
            // The provider refused the code the browser brought back (forged, spent or
            // expired): the browser's input was bad, not the gateway.
            let detail = UpstreamError::InvalidGrant { description }.to_string();
            tracing::warn!(connection = %connection, "the provider refused the authorization code");
            page(
                StatusCode::BAD_REQUEST,
                "Not connected",
                &format!("The provider refused the authorization code for `{connection}` ({detail}). Nothing was stored. Open the authorize link again to start over."),
            )
        }
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

pub(super) fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}
