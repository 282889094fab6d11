//! The caller's request body on its way to the API: kept for a replay when short, streamed
//! when long, bounded either way.

use axum::body::Body;

use super::super::ApiError;

/// The most of a request body kept in memory so that the request can be sent again after
/// a `401`; a longer body is streamed to the API as it arrives, and not retried.
pub(super) const REPLAY_MAX: usize = 64 * 1024;

/// The most a proxied request body may carry (bodies stream; this bounds the upload).
pub(in crate::http) const PROXY_MAX_BODY: usize = 32 * 1024 * 1024;

/// A request body on its way to the API.
pub(super) enum Outgoing {
    /// Short enough to be sent again.
    Buffered(bytes::Bytes),
    /// What was read so far, then the rest as it arrives.
    Streamed(reqwest::Body),
}

/// Reads up to [`REPLAY_MAX`] of `body`: all of it fits (most API calls: none, or a small
/// JSON document) → buffered; otherwise the bytes read and the rest become one stream.
pub(super) async fn start_body(body: Body) -> Result<Outgoing, ApiError> {
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(Outgoing::Buffered(read.freeze())),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
                if read.len() > REPLAY_MAX {
                    let head = futures_util::stream::once(std::future::ready(Ok::<
                        bytes::Bytes,
                        axum::Error,
                    >(
                        read.freeze()
                    )));
                    let stream = head.chain(body.into_data_stream());
                    return Ok(Outgoing::Streamed(reqwest::Body::wrap_stream(stream)));
                }
            }
            Some(Err(_)) => {
                return Err(ApiError::invalid_request(
                    "the request body could not be read (malformed, or too slow)",
                ))
            }
        }
    }
}

/// Whether a failed upload stopped because of the caller's body rather than the API: it
/// went over [`PROXY_MAX_BODY`] (`LengthLimitError`, a chunked body cut while streaming) or
/// missed its deadline (`BodyTooSlow`, `server.body_timeout`).
pub(super) fn caused_by<E: std::error::Error + 'static>(
    err: &(dyn std::error::Error + 'static),
) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err.is::<E>() {
            return true;
        }
        cause = err.source();
    }
    false
}
