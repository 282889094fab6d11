//! Admins signing in with Entra ID: a browser without credentials on an admin page is sent
//! to the tenant's sign-in ([`redirect_unsigned`]), and comes back to `GET /api/signin`
//! ([`signed_in`]), which checks the `state`, exchanges the code, verifies the id_token and,
//! for an admin, sets the admin-session cookie — the same one `?key=` buys — and goes on to
//! the page the browser first asked for. Someone who is not an admin sees a 403 page that
//! names no connection.
//!
//! The session is an admin's browser session and nothing more: `/api/refresh` and the proxy
//! never read the cookie, so it takes no token.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::admin::{browser_binding, cookie, session_cookie};
use super::consent::{capitalize, page};
use super::AppState;
use crate::entra::{TokenError, ADMIN_ROLE};
use crate::html;
use crate::sign_in::SignInError;
use crate::state::BINDING_COOKIE;

/// A request for an admin page that carries no credential at all, when admins sign in with
/// Entra ID: the redirect to the tenant's sign-in (`None` otherwise, and the route answers
/// 401 as it always did). Only for browsers (`Accept: text/html`): scripts get the JSON 401
/// they can act on.
pub(super) fn redirect_unsigned(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Response> {
    let sign_in = state.sign_in.as_ref()?;
    let browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if !browser || state.login.is_some() {
        return None;
    }
    // Back to the same page: a path of this broker's (the router matched it), with its
    // query. Signed into the `state`, so nobody can point it elsewhere.
    let return_to = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with("/api/"))
        .unwrap_or("/api/connections");
    let (binding, binding_cookie) = browser_binding(state, headers);
    let (signed, issued) = state
        .signer
        .issue_sign_in(return_to, &binding, state.broker.now());
    let location = sign_in.authorize_url(signed, &issued.nonce, &issued.verifier);
    tracing::info!(
        path = uri.path(),
        "sending an admin's browser to sign in with Entra ID"
    );
    Some(
        (
            StatusCode::FOUND,
            [
                (header::LOCATION, location.to_string()),
                (header::SET_COOKIE, binding_cookie),
                (header::CACHE_CONTROL, "no-store".to_owned()),
            ],
        )
            .into_response(),
    )
}

#[derive(Deserialize, Default)]
struct SignInParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

const FAILED: &str = "Sign-in failed";

/// Entra ID's redirect back from an admin's sign-in.
#[utoipa::path(
    get,
    path = "/api/signin",
    tag = "consent",
    params(
        ("code" = Option<String>, Query, min_length = 1, description = "The authorization code (or `error`)"),
        ("state" = String, Query, min_length = 1, description = "The broker's signed sign-in state (any other value is a 400)"),
        ("error" = Option<String>, Query, min_length = 1, description = "Entra ID's refusal (or `code`)"),
        ("error_description" = Option<String>, Query, min_length = 1, description = "Entra ID's explanation (not shown)"),
    ),
    responses(
        (status = 200, description = "Signed in as an admin: sets tb_admin and goes on to the page first asked for", content_type = "text/html", body = String),
        (status = 400, description = "A bad, expired, replayed or unbound state, a refusal, or a code Entra ID refused", content_type = "text/html", body = String),
        (status = 401, description = "The id_token did not verify", content_type = "text/html", body = String),
        (status = 403, description = "Signed in, but not an admin", content_type = "text/html", body = String),
        (status = 404, description = "Admin sign-in is not configured", content_type = "text/html", body = String),
        (status = 502, description = "Entra ID's token endpoint or the managed identity failed", content_type = "text/html", body = String),
        (status = 503, description = "The tenant's signing keys are unavailable", content_type = "text/html", body = String),
    ),
    security(())
)]
pub(super) async fn signed_in(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let Some(sign_in) = state.sign_in.as_ref().filter(|_| state.login.is_none()) else {
        return page(
            StatusCode::NOT_FOUND,
            FAILED,
            "Admins do not sign in with Entra ID here: [auth.admin_sign_in] is not configured.",
        );
    };
    let params: SignInParams = match query.as_deref().map(serde_urlencoded::from_str) {
        None => SignInParams::default(),
        Some(Ok(params)) => params,
        Some(Err(_)) => {
            return page(
                StatusCode::BAD_REQUEST,
                FAILED,
                "Entra ID's response could not be read.",
            )
        }
    };
    let redeemed = match state.signer.redeem_sign_in(
        params.state.as_deref(),
        cookie(&headers, &state.cookie_name(BINDING_COOKIE)),
        state.broker.now(),
    ) {
        Ok(redeemed) => redeemed,
        Err(err) => {
            tracing::warn!(reason = %err, "sign-in refused: bad state");
            return page(
                StatusCode::BAD_REQUEST,
                FAILED,
                &format!(
                    "{}. Open the connections page again to sign in.",
                    capitalize(&err.to_string())
                ),
            );
        }
    };
    if let Some(error) = params.error {
        // The description is Entra ID's text and may name the user: logged, not shown.
        tracing::warn!(entra_error = %error, "Entra ID did not sign the admin in");
        return page(
            StatusCode::BAD_REQUEST,
            FAILED,
            &format!("Entra ID did not sign you in ({error})."),
        );
    }
    let Some(code) = params.code.filter(|c| !c.is_empty()) else {
        return page(
            StatusCode::BAD_REQUEST,
            FAILED,
            "Entra ID's response carries no authorization code.",
        );
    };
    let id_token = match sign_in.exchange(code, redeemed.verifier).await {
        Ok(id_token) => id_token,
        Err(err) => {
            tracing::warn!(error = %err, "sign-in failed at the token endpoint");
            let status = match err {
                SignInError::Refused(_) => StatusCode::BAD_REQUEST,
                SignInError::Unavailable(_) | SignInError::Assertion(_) => StatusCode::BAD_GATEWAY,
            };
            return page(status, FAILED, &format!("{err}."));
        }
    };
    let user = match state
        .auth
        .verify_sign_in(&id_token, sign_in.client_id(), &redeemed.nonce)
        .await
    {
        Ok(user) => user,
        Err(err) => {
            tracing::warn!(reason = %err, "sign-in refused: the id_token did not verify");
            let (status, message) = match err {
                TokenError::Invalid(why) => (
                    StatusCode::UNAUTHORIZED,
                    format!("The sign-in could not be verified: {why}."),
                ),
                TokenError::KeysUnavailable(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("The tenant's signing keys could not be fetched ({why}); try again in a minute."),
                ),
            };
            return page(status, FAILED, &message);
        }
    };
    let who = user.name.as_deref().unwrap_or(&user.object_id);
    if !user.admin {
        tracing::warn!(object_id = %user.object_id, "signed in, but not an admin");
        return (
            StatusCode::FORBIDDEN,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            Html(html::page(
                "Not an admin",
                &format!(
                    "You are signed in as {who}, who is not a Token Broker admin. An admin of \
                     the broker's app registration can assign you its {ADMIN_ROLE} role."
                ),
            )),
        )
            .into_response();
    }
    tracing::info!(object_id = %user.object_id, "admin signed in with Entra ID");
    (
        StatusCode::OK,
        [
            (header::SET_COOKIE, session_cookie(&state, &user.object_id)),
            (header::CACHE_CONTROL, "no-store".to_owned()),
            // This address holds the authorization code.
            (header::REFERRER_POLICY, "no-referrer".to_owned()),
        ],
        // A page of ours that goes on: a same-site navigation, so the Strict cookie goes
        // with it (a redirect from Entra ID's cross-site one would not carry it).
        Html(html::continue_to(&redeemed.return_to)),
    )
        .into_response()
}
