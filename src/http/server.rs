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
//! slow or idle clients can never lock out a caller that sends its request at once. The same
//! happens when `accept` fails for want of file descriptors, and the cap itself is held below
//! the open-file limit at startup.

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
    let max_connections = held_below_open_files(limits.max_connections);
    let mut make_service = router.into_make_service_with_connect_info::<SocketAddr>();
    let registry = Arc::new(Registry::default());
    let probes = Arc::new(AtomicUsize::new(0));
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
                    let log = accept_errors_logged
                        .is_none_or(|at| at.elapsed() > Duration::from_secs(10));
                    if log {
                        accept_errors_logged = Some(Instant::now());
                    }
                    // Listen for a close before making one, so that it cannot be missed.
                    let closed = registry.closed.notified();
                    tokio::pin!(closed);
                    closed.as_mut().enable();
                    let wait = if out_of_descriptors(&err) {
                        // Below the cap, yet every descriptor is taken (by the store, outgoing
                        // connections, or a limit lowered under the process): make room as at
                        // the cap, or idle connections would hold them all until the header
                        // timeout and nobody new would get in. The caller waits in the
                        // listen queue meanwhile.
                        let evicted = registry.evict_oldest_idle();
                        if log {
                            tracing::warn!(error = %err, evicted, "accept failed: out of file descriptors; closing the longest-idle connection to make room");
                        }
                        if evicted {
                            Duration::from_millis(100)
                        } else {
                            Duration::from_millis(20)
                        }
                    } else {
                        if log {
                            tracing::warn!(error = %err, "accept failed; retrying");
                        }
                        Duration::from_millis(20)
                    };
                    // Then try again once a connection has closed (or a little later: a
                    // request may end without closing its connection), rather than spin.
                    let _ = tokio::time::timeout(wait, closed).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if registry.len() >= max_connections && !registry.evict_oldest_idle() {
            // Every connection is busy with a request. Probes must still get their answer
            // (the Functions host and load balancers restart an instance whose health
            // check fails): a few connections beyond the cap are served for health alone.
            match ProbeSlot::take(&probes) {
                Some(slot) => serve_probe(stream, slot, limits),
                None => {
                    tracing::warn!(
                        "connection limit reached with every connection busy; closing a new one"
                    );
                    drop(stream);
                }
            }
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
            {
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
            }
            // The connection (and its socket) is dropped at the end of the block above: a
            // listener out of descriptors can accept again.
            registry.remove(id);
            registry.closed.notify_waiters();
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

/// How many connections beyond the cap may be open at once for probes (see
/// [`serve_probe`]).
const PROBE_LANE: usize = 8;

/// The longest a probe connection may take to send its request line and headers.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// One of the [`PROBE_LANE`] places beyond the cap; freed when dropped.
struct ProbeSlot(Arc<AtomicUsize>);

impl ProbeSlot {
    fn take(probes: &Arc<AtomicUsize>) -> Option<Self> {
        probes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < PROBE_LANE).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(probes)))
    }
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection accepted beyond the cap while every other one is busy: one request, read
/// within [`PROBE_HEADER_TIMEOUT`], answered without the router — `GET /api/health` and the
/// host's `GET /` as usual, anything else `503 server_busy` with `Retry-After` — then
/// closed. No body is read and no credential is looked at, so the lane costs the busy
/// instance nothing it could be made to spend.
fn serve_probe(stream: tokio::net::TcpStream, slot: ProbeSlot, limits: &ServerConfig) {
    let service = tower::service_fn(|request: Request<hyper::body::Incoming>| async move {
        let response = match (request.method(), request.uri().path()) {
            (&axum::http::Method::GET, "/api/health") => super::health().await,
            (&axum::http::Method::GET, "/") => {
                axum::response::IntoResponse::into_response(super::root().await)
            }
            _ => axum::response::IntoResponse::into_response(
                super::ApiError::new(
                    super::code::ErrorCode::ServerBusy,
                    "every connection is busy; try again shortly",
                )
                .retry_after(Duration::from_secs(1)),
            ),
        };
        Ok::<_, std::convert::Infallible>(response)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout.min(PROBE_HEADER_TIMEOUT))
        .keep_alive(false)
        .serve_connection(
            TokioIo::new(WriteStall::new(stream, limits.write_timeout)),
            TowerToHyperService::new(service),
        );
    tokio::spawn(async move {
        // However the peer behaves, the place is given back within a bound.
        let _ = tokio::time::timeout(PROBE_HEADER_TIMEOUT * 2, connection).await;
        drop(slot);
    });
}

/// `configured` connections, or fewer if the open-file limit (`RLIMIT_NOFILE`'s soft limit)
/// cannot hold them and what else the process keeps open, with a warning.
fn held_below_open_files(configured: usize) -> usize {
    let soft = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => soft,
        Err(err) => {
            tracing::warn!(error = %err, "the open-file limit could not be read; server.max_connections is kept as configured");
            return configured;
        }
    };
    let cap = cap_for_open_files(configured, soft);
    if cap < configured {
        tracing::warn!(
            configured,
            lowered = cap,
            open_files = soft,
            "server.max_connections lowered to {cap}: the open-file limit is {soft} and {} are kept for everything else (raise `ulimit -n`, or lower the setting)",
            soft.saturating_sub(cap as u64),
        );
    }
    cap
}

/// The most connections a soft limit of `open_files` descriptors leaves room for. A
/// quarter of the limit is kept back, and at least 64 (at most half of a very low limit):
/// the runtime's own descriptors (epoll, wakers, signal pipe, stdio), the store's files,
/// the log, and outgoing HTTP connections — to providers, Key Vault, Blob storage, and one
/// per proxied request in progress. Should those still run out, `accept` fails with
/// `EMFILE` and the longest-idle connection makes room, as at the cap.
fn cap_for_open_files(configured: usize, open_files: u64) -> usize {
    let reserve = (open_files / 4).max(64.min(open_files / 2));
    let room = usize::try_from(open_files.saturating_sub(reserve)).unwrap_or(usize::MAX);
    configured.min(room.max(1))
}

/// Whether an `accept` failed for want of file descriptors (the process's `EMFILE`, or the
/// system's `ENFILE`).
fn out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Open connections, with when each was last active and whether a request is in progress.
#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    /// Told each time a connection's socket has closed (a descriptor is free again).
    closed: tokio::sync::Notify,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_a_quarter_of_the_open_files_and_at_least_64() {
        // Plenty of descriptors: the setting stands.
        assert_eq!(cap_for_open_files(512, 1_048_576), 512);
        assert_eq!(cap_for_open_files(512, 1024), 512);
        // A quarter kept back.
        assert_eq!(cap_for_open_files(4096, 1024), 768);
        assert_eq!(cap_for_open_files(65_536, 20_000), 15_000);
        // At least 64 kept back…
        assert_eq!(cap_for_open_files(4096, 256), 192);
        assert_eq!(cap_for_open_files(4096, 128), 64);
        // …but no more than half of a very low limit.
        assert_eq!(cap_for_open_files(4096, 64), 32);
        assert_eq!(cap_for_open_files(4096, 2), 1);
        // No limit.
        assert_eq!(cap_for_open_files(512, u64::MAX), 512);
    }

    #[test]
    fn running_out_of_descriptors_is_told_from_other_accept_errors() {
        assert!(out_of_descriptors(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(out_of_descriptors(&std::io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!out_of_descriptors(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(!out_of_descriptors(&std::io::Error::other("other")));
    }
}
