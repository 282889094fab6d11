//! The one table of the broker's error codes: each code's wire string, its HTTP status and
//! what it tells a caller. Handlers, the framework-error mapping and the OpenAPI document
//! (the `error` field's `enum`) all take their codes from here, and a test holds
//! `docs/api.md`'s error table to it (meilisearch's `error.rs` keeps one such table).

use axum::http::StatusCode;

/// A stable error code, as the `error` field of every error the broker answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Bad parameters, a malformed request, or a body that could not be read.
    InvalidRequest,
    /// No credential, or a wrong one (with `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// A credential without the right (a caller key on an admin route).
    Forbidden,
    /// A caller the connection's `callers` do not name (the message names the caller).
    CallerNotAllowed,
    /// No such connection in the configuration.
    UnknownConnection,
    /// `tenant` names no organisation the connection's consent recorded.
    UnknownTenant,
    /// No such route.
    NotFound,
    /// The connection has no proxy (no `api_base_url`, or `proxy = false`).
    NoProxy,
    /// A method the route does not take (`Allow` lists those it does).
    MethodNotAllowed,
    /// No token yet, or the grant is dead: an admin must consent (`authorize_url`).
    ConsentRequired,
    /// A body over the route's limit.
    PayloadTooLarge,
    /// A body that is not JSON where JSON is taken.
    UnsupportedMediaType,
    /// Refreshes the caller asked for beyond the connection's budget (`Retry-After`).
    ForceRateLimited,
    /// The provider refused or answered something malformed.
    ProviderError,
    /// The provider could not be reached or is down (`Retry-After`).
    ProviderUnavailable,
    /// The broker failed in a way it did not expect.
    InternalError,
    /// The token store failed (`Retry-After`).
    StoreUnavailable,
    /// Another instance holds the connection's lease too long (`Retry-After`).
    RefreshInProgress,
    /// The refresh leases' storage cannot be reached (`Retry-After`).
    LockUnavailable,
    /// The connection's provider could not be set up; retried in the background.
    ConnectionMisconfigured,
    /// The tenant's signing keys cannot be fetched: no bearer token can be checked.
    AuthUnavailable,
    /// Every connection is busy (`Retry-After: 1`).
    ServerBusy,
    /// Any other status the HTTP layer answered by itself, with that status.
    HttpError,
}

impl ErrorCode {
    /// Every code, in the order the documentation lists them.
    pub const ALL: [ErrorCode; 23] = [
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::CallerNotAllowed,
        ErrorCode::UnknownConnection,
        ErrorCode::UnknownTenant,
        ErrorCode::NotFound,
        ErrorCode::NoProxy,
        ErrorCode::MethodNotAllowed,
        ErrorCode::ConsentRequired,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::ForceRateLimited,
        ErrorCode::ProviderError,
        ErrorCode::ProviderUnavailable,
        ErrorCode::InternalError,
        ErrorCode::StoreUnavailable,
        ErrorCode::RefreshInProgress,
        ErrorCode::LockUnavailable,
        ErrorCode::ConnectionMisconfigured,
        ErrorCode::AuthUnavailable,
        ErrorCode::ServerBusy,
        ErrorCode::HttpError,
    ];

    /// The code as the `error` field writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::CallerNotAllowed => "caller_not_allowed",
            ErrorCode::UnknownConnection => "unknown_connection",
            ErrorCode::UnknownTenant => "unknown_tenant",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoProxy => "no_proxy",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ConsentRequired => "consent_required",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::ForceRateLimited => "force_rate_limited",
            ErrorCode::ProviderError => "provider_error",
            ErrorCode::ProviderUnavailable => "provider_unavailable",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::RefreshInProgress => "refresh_in_progress",
            ErrorCode::LockUnavailable => "lock_unavailable",
            ErrorCode::ConnectionMisconfigured => "connection_misconfigured",
            ErrorCode::AuthUnavailable => "auth_unavailable",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::HttpError => "http_error",
        }
    }

    /// The status the code is answered with (`HttpError`: the one the HTTP layer chose;
    /// 500 stands for it here).
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::CallerNotAllowed => StatusCode::FORBIDDEN,
            ErrorCode::UnknownConnection
            | ErrorCode::UnknownTenant
            | ErrorCode::NotFound
            | ErrorCode::NoProxy => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::ConsentRequired => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::ForceRateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ProviderError | ErrorCode::ProviderUnavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::InternalError | ErrorCode::HttpError => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::StoreUnavailable
            | ErrorCode::RefreshInProgress
            | ErrorCode::LockUnavailable
            | ErrorCode::ConnectionMisconfigured
            | ErrorCode::AuthUnavailable
            | ErrorCode::ServerBusy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The provider's failure as the broker reports it (`UpstreamError::code`).
    pub(super) fn of_provider(code: &str) -> Self {
        if code == ErrorCode::ProviderUnavailable.as_str() {
            ErrorCode::ProviderUnavailable
        } else {
            ErrorCode::ProviderError
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_with_a_client_or_server_error_status() {
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "a code listed twice");
        for code in ErrorCode::ALL {
            let status = code.status();
            assert!(
                status.is_client_error() || status.is_server_error(),
                "{code:?}"
            );
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_'),
                "{code:?}"
            );
        }
        assert_eq!(
            ErrorCode::of_provider("provider_unavailable"),
            ErrorCode::ProviderUnavailable
        );
        assert_eq!(
            ErrorCode::of_provider("invalid_client"),
            ErrorCode::ProviderError
        );
    }
}
