//! The proxy benchmark's yardstick (`scripts/bench proxy`, BENCHMARKS.md): a bare axum +
//! reqwest forwarding proxy — what the broker's `/api/proxy/{connection}/{*path}` does with
//! none of its checks — on `127.0.0.1:$PORT`, started as a process of its own like the
//! broker: `GET /api/proxy/{connection}/{*path}` goes to `$UPSTREAM/{path}?{query}` with
//! `Authorization: Bearer $BARE_TOKEN`, and the answer's status, headers and streamed body
//! come back. Not part of the product.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, Uri};
use axum::response::Response;
use axum::routing::get;

#[derive(Clone)]
struct Forward {
    http: reqwest::Client,
    upstream: String,
    bearer: String,
}

async fn forward(
    State(forward): State<Forward>,
    Path((_, path)): Path<(String, String)>,
    uri: Uri,
) -> Response {
    let mut url = format!("{}/{path}", forward.upstream);
    if let Some(query) = uri.query() {
        url.push('?');
        url.push_str(query);
    }
    let Ok(upstream) = forward
        .http
        .get(url)
        .header(header::AUTHORIZATION, &forward.bearer)
        .send()
        .await
    else {
        return Response::builder()
            .status(502)
            .body(Body::empty())
            .unwrap_or_default();
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7073);
    let state = Forward {
        http: reqwest::Client::new(),
        upstream: std::env::var("UPSTREAM").unwrap_or_default(),
        bearer: format!("Bearer {}", std::env::var("BARE_TOKEN").unwrap_or_default()),
    };
    let app = axum::Router::new()
        .route("/api/proxy/{connection}/{*path}", get(forward))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await
}
