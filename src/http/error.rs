//! The one error type at the HTTP boundary: every failure becomes a status and a stable
//! JSON body `{"error": …, "error_description": …}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;
use crate::auth::AuthError;
use crate::broker::BrokerError;

/// An error answered as `{"error": …, "error_description": …}` (plus `authorize_url` for
/// `consent_required`).
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    error: &'static str,
    pub(super) description: String,
    authorize_url: Option<String>,
    /// Send `WWW-Authenticate: Bearer` (RFC 6750 §3) with a 401.
    challenge: bool,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        error: &'static str,
        description: impl Into<String>,
    ) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            authorize_url: None,
            challenge: false,
            retry_after: None,
        }
    }

    pub(super) fn from_broker(err: BrokerError, state: &AppState) -> Self {
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
            BrokerError::Upstream(_) | BrokerError::RefreshFailed { .. } => Self::new(
                StatusCode::BAD_GATEWAY,
                err.provider_code().unwrap_or("provider_error"),
                err.to_string(),
            ),
            BrokerError::Busy(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "refresh_in_progress",
                err.to_string(),
            ),
            BrokerError::Misconfigured { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection_misconfigured",
                err.to_string(),
            ),
            BrokerError::ForceLimited { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "force_rate_limited",
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

impl From<crate::token::TenantError> for ApiError {
    fn from(err: crate::token::TenantError) -> Self {
        match err {
            crate::token::TenantError::Unknown(why) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_tenant", why)
            }
            crate::token::TenantError::Ambiguous(why) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_request", why)
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::NotAdmin | AuthError::PrincipalNotAllowed(..) => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", err.to_string())
            }
            AuthError::KeysUnavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                err.to_string(),
            ),
            AuthError::Missing
            | AuthError::Invalid
            | AuthError::NoEntra
            | AuthError::InvalidToken(_) => {
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
