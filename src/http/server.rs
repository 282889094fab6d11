//! The listener: HTTP/1.1 only, with a deadline for a request's headers (which also closes
//! idle keep-alive connections), a deadline for its whole body and a limit on how long an
//! answer's writes may stall (both in `deadline`), and a cap on open connections.
//!
//! Written on hyper's connection builder rather than `axum::serve`, which offers none of
//! these: `axum::serve` has no header timeout, and through hyper-util's auto builder it also
//! speaks HTTP/2 (with its own, unlimited, state) whenever another crate enables that
//! feature. The Functions host and every caller speak HTTP/1.1 to the handler.
//!
//! At the cap, the connection that has waited longest without a request in progress (an
//! idle keep-alive connection, or one still sending its headers; a request is in progress
//! until its answer's body is written) is closed to make room, so
//! slow or idle clients can never lock out a caller that sends its request at once.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tower::{Service, ServiceExt};

use super::deadline::{BodyDeadline, WriteStall};
use crate::config::ServerConfig;

/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(20);

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (for at most [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    state: Arc<super::AppState>,
    limits: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut make_service = router.into_make_service_with_connect_info::<SocketAddr>();
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    // When an accept error was last logged (`Instant - Duration` could underflow on a
    // machine up for less than that, so no made-up past instant).
    let mut accept_errors_logged: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, typically: wait for connections to close
                    // rather than spin.
                    if accept_errors_logged.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %err, "accept failed; retrying");
                        accept_errors_logged = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if registry.len() >= limits.max_connections && !registry.evict_oldest_idle() {
            // Every connection is busy with a request: refuse this one.
            tracing::warn!(
                "connection limit reached with every connection busy; closing a new one"
            );
            drop(stream);
            continue;
        }
        let Ok(service) = make_service.call(peer).await;
        let (id, activity, evicted) = registry.add();
        let state = Arc::clone(&state);
        let body_timeout = limits.body_timeout;
        let service = tower::service_fn(move |request: Request<hyper::body::Incoming>| {
            let service = service.clone();
            let state = Arc::clone(&state);
            let guard = activity.begin();
            // The headers are in: from now the whole body has `body_timeout` to arrive, on
            // every route (the proxy streams it on to the API under the same deadline).
            let body_deadline = tokio::time::Instant::now() + body_timeout;
            async move {
                // A cached token is answered before the router and its layers: the request
                // the service exists for, at the cost of a few map lookups.
                let response = match super::refresh::cached_fast_path(&state, &request).await {
                    Some(response) => response,
                    None => {
                        let request = request.map(|body| {
                            axum::body::Body::new(BodyDeadline::until(body, body_deadline))
                        });
                        let Ok(response) = service.oneshot(request).await;
                        response
                    }
                };
                // The connection stays busy until the answer's body is written: a streamed
                // answer (the proxy's) must not count as an idle connection to evict.
                Ok::<_, std::convert::Infallible>(response.map(|body| Tracked {
                    body,
                    _guard: guard,
                }))
            }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .keep_alive(true)
            .serve_connection(
                TokioIo::new(WriteStall::new(stream, limits.write_timeout)),
                TowerToHyperService::new(service),
            );
        let registry = Arc::clone(&registry);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = evicted => {}
                () = async { let _ = stop.wait_for(|stop| *stop).await; } => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, connection).await;
                }
            }
            registry.remove(id);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Wait for the connections to drain.
    let deadline = Instant::now() + DRAIN;
    while registry.len() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Open connections, with when each was last active and whether a request is in progress.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    activity: Arc<Activity>,
    evict: Option<oneshot::Sender<()>>,
}

/// A connection's requests in progress and when it was last active.
struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(Arc::clone(self))
    }
}

/// Ends a request's activity when dropped (also when its future is).
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body with its request's activity: hyper drops it once the body is written
/// (or the connection is gone), and only then is the connection idle.
struct Tracked {
    body: axum::body::Body,
    _guard: ActivityGuard,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Registry {
    fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn add(&self) -> (u64, Arc<Activity>, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
        });
        let (evict, evicted) = oneshot::channel();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Entry {
                activity: Arc::clone(&activity),
                evict: Some(evict),
            },
        );
        (id, activity, evicted)
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Closes the connection idle the longest (no request in progress); false when every
    /// connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = open
            .iter()
            .filter(|(_, entry)| {
                entry.evict.is_some() && entry.activity.in_flight.load(Ordering::SeqCst) == 0
            })
            .min_by_key(|(_, entry)| {
                *entry
                    .activity
                    .since
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            })
            .map(|(id, _)| *id);
        let Some(id) = oldest else {
            return false;
        };
        // Its task removes it from the registry once closed; until then it no longer counts.
        if let Some(entry) = open.remove(&id) {
            if let Some(evict) = entry.evict {
                let _ = evict.send(());
            }
        }
        true
    }
}
