//! A provider's API, as the proxy (`/api/proxy/{connection}/…`) meets it: a paged resource
//! under `/v2` with `Link` headers, endpoints that refuse tokens, an upload that reports
//! what arrived, and a large download generated as it streams. It records what it saw of
//! every request, and puts a secret marker in its bodies and cookies for the leak tests.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::json;

/// What the API double saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path_and_query: String,
    pub authorization: Option<String>,
    pub caller_key: bool,
    pub cookie: bool,
    pub body_len: usize,
    /// Every request header's name, lower-cased.
    pub header_names: Vec<String>,
}

/// The running double (stopped with the test's runtime).
pub struct ApiDouble {
    /// `http://127.0.0.1:{port}/v2`: the base a connection's `api_base_url` names.
    pub base: String,
    /// A random string in every page and cookie the double sends: never to be logged.
    pub marker: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// The byte at `offset` of a large download: a pattern the reader can check.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A checksum of an upload, as the double reports it.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |sum, b| {
        sum.wrapping_mul(31).wrapping_add(u64::from(*b))
    })
}

impl ApiDouble {
    /// Routes:
    /// - `GET /v2/invoices?page=N` (1..=3): a page with a `Link` to the next one (absolute
    ///   URL into the API), an `x-continuation` header and a `Set-Cookie`;
    /// - `/v2/flaky`: refuses the first request with 401, then answers 200;
    /// - `/v2/always401`: always 401 (`no`);
    /// - `/v2/busy`: 429 with `Retry-After: 7`; `/v2/down`: 503 with `Retry-After: 30`;
    /// - `POST /v2/upload`: answers the body's length and checksum;
    /// - `GET /v2/big?bytes=N`: N bytes of [`pattern_byte`], generated as they stream;
    /// - `/v2/company/{id}/…`: echoes the path (for placeholders).
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let marker = super::random("api-body-secret");
        let record = Arc::clone(&seen);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}/v2", listener.local_addr().expect("addr"));
        let link_base = base.clone();
        let page_marker = marker.clone();
        let app = axum::Router::new().fallback(
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let record = Arc::clone(&record);
                let link_base = link_base.clone();
                let marker = page_marker.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let path_and_query = uri
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    let tries = {
                        let mut seen = record.lock().expect("lock");
                        seen.push(Seen {
                            path_and_query,
                            authorization: header("authorization"),
                            caller_key: headers.contains_key("x-api-key"),
                            cookie: headers.contains_key("cookie"),
                            body_len: body.len(),
                            header_names: headers.keys().map(|n| n.as_str().to_owned()).collect(),
                        });
                        seen.iter()
                            .filter(|s| s.path_and_query == uri.path())
                            .count()
                    };
                    let path = uri.path();
                    match path {
                        // Refuses the first token it sees, then takes any.
                        "/v2/flaky" if tries == 1 => {
                            return (StatusCode::UNAUTHORIZED, "expired").into_response()
                        }
                        "/v2/flaky" => return axum::Json(json!({"ok": true})).into_response(),
                        "/v2/always401" => return (StatusCode::UNAUTHORIZED, "no").into_response(),
                        "/v2/busy" => {
                            return (
                                StatusCode::TOO_MANY_REQUESTS,
                                [("retry-after", "7"), ("x-rate-limit-problem", "minute")],
                                "slow down",
                            )
                                .into_response()
                        }
                        "/v2/down" => {
                            return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "30")], "maintenance")
                                .into_response()
                        }
                        "/v2/upload" => {
                            return axum::Json(json!({
                                "length": body.len(),
                                "checksum": checksum(&body),
                            }))
                            .into_response()
                        }
                        "/v2/big" => {
                            let total: u64 = uri
                                .query()
                                .and_then(|q| q.strip_prefix("bytes="))
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0);
                            return big(total).into_response();
                        }
                        _ if path.starts_with("/v2/company/") => {
                            return axum::Json(json!({"path": path})).into_response()
                        }
                        "/v2/invoices" => {}
                        _ => return (StatusCode::NOT_FOUND, "no such resource").into_response(),
                    }
                    let page: u32 = uri
                        .query()
                        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("page=")))
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(1);
                    let mut response = axum::Json(json!({
                        "page": page,
                        "items": [page * 10, page * 10 + 1],
                        "note": marker,
                    }))
                    .into_response();
                    let headers = response.headers_mut();
                    headers.insert(
                        "set-cookie",
                        format!("session={marker}").parse().expect("header"),
                    );
                    headers.insert(
                        "x-continuation",
                        format!("c{page}").parse().expect("header"),
                    );
                    if page < 3 {
                        let link = format!(
                            "<{link_base}/invoices?page={}>; rel=\"next\", <https://docs.example/paging>; rel=\"help\"",
                            page + 1
                        );
                        headers.insert("link", link.parse().expect("header"));
                    }
                    response
                }
            },
        );
        // Uploads of any size: the proxy's limit is under test, not the double's.
        let app = app.layer(axum::extract::DefaultBodyLimit::disable());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, marker, seen }
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// `total` bytes of the pattern in 64 KB chunks, made as the reader takes them: the double
/// itself holds no more than a chunk.
fn big(total: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunks = futures_util::stream::unfold(0u64, move |offset| async move {
        if offset >= total {
            return None;
        }
        let len = CHUNK.min(total - offset);
        let chunk: Vec<u8> = (offset..offset + len).map(pattern_byte).collect();
        Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), offset + len))
    });
    Body::from_stream(chunks)
}
