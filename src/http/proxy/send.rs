//! The upstream request: the caller's method, headers and body to the target with the
//! connection's bearer token; after a `401`, one forced refresh and one retry when the body
//! can be sent again.

use std::sync::Arc;

use axum::http::{header, HeaderMap, Method, StatusCode};

use super::super::code::ErrorCode;
use super::super::{ApiError, AppState};
use super::body::{caused_by, Outgoing, PROXY_MAX_BODY};
use super::target::Target;
use crate::broker::TokenRequest;
use crate::token::TokenRecord;

/// A token for `connection` from the broker, as `/api/refresh` would answer it.
pub(super) async fn token(
    state: &Arc<AppState>,
    connection: &str,
    request: TokenRequest,
) -> Result<Arc<TokenRecord>, ApiError> {
    state
        .broker
        .token(connection, request)
        .await
        .map_err(|err| ApiError::from_broker(err, state))
}

/// Sends the request; when the API refuses the token (`401`) and the body was kept, one
/// forced refresh (within the connection's refresh budget) and one retry. Otherwise the
/// API's answer, whatever it is.
pub(super) async fn with_one_retry(
    state: &Arc<AppState>,
    connection: &str,
    method: &Method,
    target: &Target,
    mut forwarded: reqwest::header::HeaderMap,
    body: Outgoing,
    record: Arc<TokenRecord>,
) -> Result<reqwest::Response, ApiError> {
    forwarded.extend(target.headers.clone());
    let (replayable, first_body) = match body {
        Outgoing::Buffered(bytes) if bytes.is_empty() => (Some(bytes), None),
        Outgoing::Buffered(bytes) => (Some(bytes.clone()), Some(reqwest::Body::from(bytes))),
        Outgoing::Streamed(stream) => (None, Some(stream)),
    };
    let upstream = once(
        state, connection, method, target, &forwarded, &record, first_body,
    )
    .await?;
    let Some(bytes) = replayable.filter(|_| upstream.status() == StatusCode::UNAUTHORIZED) else {
        return Ok(upstream);
    };
    // The API refused a token the broker thought valid (revoked, or its clock disagrees).
    let forced = TokenRequest {
        force: true,
        ..TokenRequest::default()
    };
    match token(state, connection, forced).await {
        Ok(fresh)
            if fresh.access_token.as_ref().map(|t| t.secret())
                != record.access_token.as_ref().map(|t| t.secret()) =>
        {
            tracing::info!(connection = %connection, "the API refused the access token; refreshed it and retrying once");
            let body = (!bytes.is_empty()).then(|| reqwest::Body::from(bytes));
            once(state, connection, method, target, &forwarded, &fresh, body).await
        }
        Ok(_) => Ok(upstream),
        Err(err) => {
            tracing::warn!(connection = %connection, "the API refused the access token and no new one could be had: {}", err.description);
            Ok(upstream)
        }
    }
}

/// One upstream request with `record`'s access token.
async fn once(
    state: &AppState,
    connection: &str,
    method: &Method,
    target: &Target,
    forwarded: &reqwest::header::HeaderMap,
    record: &TokenRecord,
    body: Option<reqwest::Body>,
) -> Result<reqwest::Response, ApiError> {
    let Some(access_token) = record.access_token.as_ref() else {
        return Err(ApiError::new(
            ErrorCode::ConsentRequired,
            format!("connection `{connection}` has no access token: an admin must consent"),
        ));
    };
    let mut bearer =
        reqwest::header::HeaderValue::from_str(&format!("Bearer {}", access_token.secret()))
            .map_err(|_| ApiError::provider_error("the access token cannot be sent as a header"))?;
    bearer.set_sensitive(true);
    let mut request = state
        .proxy_http
        .request(method.clone(), target.url.clone())
        .headers(HeaderMap::clone(forwarded))
        .header(header::AUTHORIZATION, bearer);
    if let Some(body) = body {
        request = request.body(body);
    }
    request.send().await.map_err(|err| {
        if caused_by::<super::super::deadline::BodyTooSlow>(&err) {
            return ApiError::invalid_request(
                "the request body could not be read (malformed, or too slow)",
            );
        }
        if caused_by::<http_body_util::LengthLimitError>(&err) {
            return ApiError::payload_too_large(format!(
                "the request body is larger than the proxy accepts ({PROXY_MAX_BODY} bytes)"
            ));
        }
        tracing::warn!(connection = %connection, timeout = err.is_timeout(), "proxied request failed");
        ApiError::new(
            ErrorCode::ProviderUnavailable,
            "the provider's API could not be reached or did not answer in time",
        )
    })
}
