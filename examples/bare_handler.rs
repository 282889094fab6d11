//! The benchmark's yardstick (`scripts/bench`, BENCHMARKS.md): a bare axum handler that
//! answers `GET /api/refresh/{connection}` with fixed bytes — the body a cached
//! `/api/refresh` gave, from `BARE_BODY` — and the same headers, on `127.0.0.1:$PORT`,
//! started as a process of its own like the broker. Not part of the product.

use axum::http::header;
use axum::routing::get;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let body = std::env::var("BARE_BODY").unwrap_or_else(|_| "{}".to_owned());
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(7072);
    let app = axum::Router::new().route(
        "/api/refresh/{connection}",
        get(move || {
            let body = body.clone();
            async move {
                (
                    [
                        (header::CONTENT_TYPE, "application/json"),
                        (header::CACHE_CONTROL, "no-store"),
                        (header::PRAGMA, "no-cache"),
                    ],
                    body,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await
}
