//! Why a token request failed, by what the broker must do about it. Never a response body:
//! a malformed body may well contain a token.

use oauth2::basic::{BasicErrorResponse, BasicErrorResponseType};
use oauth2::{RefreshToken, RequestTokenError};
use serde_json::Value;

use super::*;

/// Why a token request failed, told apart by what the broker must do about it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `invalid_grant`: the code or refresh token is dead (or was already rotated).
    #[error("the provider rejected the grant (invalid_grant){}", describe(.description))]
    InvalidGrant { description: Option<String> },
    /// Any other OAuth error response (`invalid_client`, `unauthorized_client`, ...).
    #[error("the provider answered `{error}`{}", describe(.description))]
    Rejected {
        error: String,
        description: Option<String>,
    },
    /// The provider answered 429 or 5xx; worth trying again.
    #[error("the provider's token endpoint answered HTTP {status}")]
    Unavailable { status: u16 },
    /// No connection could be made (DNS, TCP, TLS): nothing was sent, so it is retryable.
    #[error("the provider's token endpoint could not be reached: {0}")]
    Unreachable(String),
    /// The request was sent but no complete answer came (timeout, reset). Not retried: the
    /// provider may have rotated the refresh token before the answer was lost.
    #[error("no complete answer from the provider's token endpoint: {0}")]
    Transport(String),
    /// A response that is not a valid token response.
    #[error("the provider sent a malformed response ({0})")]
    Malformed(String),
    /// A malformed token response that still carried a new refresh token (kept).
    #[error(
        "the provider sent a malformed token response ({detail}); its new refresh token was kept"
    )]
    MalformedWithRefreshToken {
        detail: String,
        refresh_token: RefreshToken,
    },
    /// The consent yielded no refresh token, so the connection could not be kept alive.
    #[error("the provider issued no refresh token: {0}")]
    NoRefreshToken(&'static str),
    /// A post-consent lookup was refused.
    #[error("the provider's API answered HTTP {status} to {what}")]
    Lookup { what: String, status: u16 },
}

pub(super) fn describe(description: &Option<String>) -> String {
    match description {
        Some(d) => format!(": {d}"),
        None => String::new(),
    }
}

impl UpstreamError {
    /// The stable error code a caller sees: `provider_unavailable` when the provider is down,
    /// unreachable or gave no answer, `provider_error` for anything it answered.
    pub fn code(&self) -> &'static str {
        match self {
            UpstreamError::Unavailable { .. }
            | UpstreamError::Unreachable(_)
            | UpstreamError::Transport(_) => "provider_unavailable",
            _ => "provider_error",
        }
    }

    /// True when the request did not reach the provider's grant logic, so trying again
    /// cannot present a spent refresh token: no connection, or 429/503 (refused before
    /// processing). A 500/502/504 may come after the provider rotated the token, so it is
    /// not retried.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Unavailable { status: 429 | 503 } | UpstreamError::Unreachable(_)
        )
    }
}

pub(super) fn classify(
    err: RequestTokenError<TransportError, BasicErrorResponse>,
) -> UpstreamError {
    match err {
        RequestTokenError::ServerResponse(response) => {
            let description = response.error_description().map(|d| truncate(d, 300));
            match response.error() {
                BasicErrorResponseType::InvalidGrant => UpstreamError::InvalidGrant { description },
                other => UpstreamError::Rejected {
                    error: truncate(other.as_ref(), 100),
                    description,
                },
            }
        }
        RequestTokenError::Request(TransportError::Status(status)) => {
            UpstreamError::Unavailable { status }
        }
        RequestTokenError::Request(TransportError::Connect(message)) => {
            UpstreamError::Unreachable(message)
        }
        RequestTokenError::Request(TransportError::Send(message)) => {
            UpstreamError::Transport(message)
        }
        // The serde message can quote the offending value (possibly a token): report only
        // where the document went wrong and what kind of wrong it was.
        RequestTokenError::Parse(err, body) => {
            let kind = match err.inner().classify() {
                serde_json::error::Category::Data => "unexpected or missing field",
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    "not JSON"
                }
                serde_json::error::Category::Io => "unreadable",
            };
            let path = err.path().to_string();
            let detail = if path == "." || path.is_empty() {
                kind.to_owned()
            } else {
                format!("{kind} at `{path}`")
            };
            // A provider that rotates has spent the refresh token we sent once it answers;
            // if its answer names a new one, that must not be thrown away with the rest.
            let salvaged = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("refresh_token")?.as_str().map(str::to_owned))
                .filter(|t| !t.is_empty());
            match salvaged {
                Some(token) => UpstreamError::MalformedWithRefreshToken {
                    detail,
                    refresh_token: RefreshToken::new(token),
                },
                None => UpstreamError::Malformed(detail),
            }
        }
        RequestTokenError::Other(message) => UpstreamError::Malformed(truncate(&message, 200)),
    }
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        s.to_owned()
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}
