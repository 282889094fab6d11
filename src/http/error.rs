//! The one error type at the HTTP boundary: every failure becomes a status and a stable
//! JSON body `{"error": …, "error_description": …}`, its code from the one table
//! ([`ErrorCode`]).
//!
//! Which to use where: handlers return `Result<_, ApiError>` and build errors with
//! [`ApiError::new`] or a named constructor (`invalid_request`, …); broker, auth and tenant
//! errors convert with `from_broker` / `?`. Turning an error into a response has no side
//! effects: the answer carries an [`ErrorReport`] extension, and the router's
//! `log_errors` layer writes the log line.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::code::ErrorCode;
use super::AppState;
use crate::auth::AuthError;
use crate::broker::BrokerError;

/// An error answered as `{"error": …, "error_description": …}` (plus `authorize_url` for
/// `consent_required`).
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    code: ErrorCode,
    pub(super) description: String,
    authorize_url: Option<String>,
    /// Send `WWW-Authenticate: Bearer` (RFC 6750 §3) with a 401.
    challenge: bool,
    /// Sent as `Retry-After` (whole seconds, at least 1).
    retry_after: Option<std::time::Duration>,
}

/// What an error answer says, for the log layer (never a secret: descriptions are written
/// to be shown to callers).
#[derive(Debug, Clone)]
pub(super) struct ErrorReport {
    pub(super) code: ErrorCode,
    pub(super) description: String,
}

impl ApiError {
    /// An error with `code`'s status.
    pub(super) fn new(code: ErrorCode, description: impl Into<String>) -> Self {
        Self {
            status: code.status(),
            code,
            description: description.into(),
            authorize_url: None,
            challenge: false,
            retry_after: None,
        }
    }

    /// The error's code.
    pub(super) fn code(&self) -> ErrorCode {
        self.code
    }

    /// `400 invalid_request`.
    pub(super) fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, description)
    }

    /// `413 payload_too_large`.
    pub(super) fn payload_too_large(description: impl Into<String>) -> Self {
        Self::new(ErrorCode::PayloadTooLarge, description)
    }

    /// `502 provider_error`.
    pub(super) fn provider_error(description: impl Into<String>) -> Self {
        Self::new(ErrorCode::ProviderError, description)
    }

    /// A `Retry-After` with the answer.
    pub(super) fn retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub(super) fn from_broker(err: BrokerError, state: &AppState) -> Self {
        let retry_after = err.retry_after();
        let mut error = Self::from_broker_error(err, state);
        error.retry_after = retry_after;
        error
    }

    fn from_broker_error(err: BrokerError, state: &AppState) -> Self {
        let code =
            match &err {
                BrokerError::UnknownConnection(_) => ErrorCode::UnknownConnection,
                BrokerError::ConsentRequired { connection, .. } => {
                    return Self {
                        authorize_url: Some(state.authorize_url(connection)),
                        ..Self::new(ErrorCode::ConsentRequired, err.to_string())
                    }
                }
                BrokerError::Upstream(_) | BrokerError::RefreshFailed { .. } => {
                    ErrorCode::of_provider(err.provider_code().unwrap_or_default())
                }
                BrokerError::Busy(_) => ErrorCode::RefreshInProgress,
                BrokerError::Misconfigured { .. } => ErrorCode::ConnectionMisconfigured,
                BrokerError::ForceLimited { .. } => ErrorCode::ForceRateLimited,
                BrokerError::LockUnavailable(_) => return Self::new(
                    ErrorCode::LockUnavailable,
                    "the refresh lease cannot be taken (storage unavailable); try again shortly",
                ),
                BrokerError::Internal(_) => ErrorCode::InternalError,
                BrokerError::Store(_) => {
                    return Self::new(
                        ErrorCode::StoreUnavailable,
                        "the token store is unavailable; try again shortly",
                    )
                }
            };
        Self::new(code, err.to_string())
    }
}

impl From<crate::token::TenantError> for ApiError {
    fn from(err: crate::token::TenantError) -> Self {
        match err {
            crate::token::TenantError::Unknown(why) => Self::new(ErrorCode::UnknownTenant, why),
            crate::token::TenantError::Ambiguous(why) => Self::invalid_request(why),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::NotAdmin | AuthError::PrincipalNotAllowed(..) => {
                Self::new(ErrorCode::Forbidden, err.to_string())
            }
            AuthError::KeysUnavailable(_) => Self::new(ErrorCode::AuthUnavailable, err.to_string()),
            AuthError::CallerNotAllowed(..) => {
                Self::new(ErrorCode::CallerNotAllowed, err.to_string())
            }
            AuthError::Missing
            | AuthError::Invalid
            | AuthError::NoEntra
            | AuthError::InvalidToken(_) => {
                let mut error = Self::new(ErrorCode::Unauthorized, err.to_string());
                error.challenge = true;
                error
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code.as_str(), "error_description": self.description});
        if let Some(url) = self.authorize_url {
            body["authorize_url"] = url.into();
        }
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if self.challenge {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorReport {
            code: self.code,
            description: self.description,
        });
        response
    }
}

/// The router's log line for an error answer: a server error at WARN with its description,
/// a refusal at INFO with its code. Written here, once, rather than where errors are made.
pub(super) async fn log_errors(response: Response) -> Response {
    if let Some(report) = response.extensions().get::<ErrorReport>() {
        let status = response.status().as_u16();
        if response.status().is_server_error() {
            tracing::warn!(status, error = report.code.as_str(), description = %report.description, "request failed");
        } else {
            tracing::info!(status, error = report.code.as_str(), "request refused");
        }
    }
    response
}
