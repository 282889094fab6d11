//! Tracing setup: structured logs to stderr, filtered by `RUST_LOG` (default `info`),
//! JSON lines when `BROKER_LOG_FORMAT=json`.
//!
//! The audit trail (target `token_broker::audit`) writes a line per token handed out. Written
//! in place, that was one `write` to stderr per request and cost the cached `/api/refresh`
//! path 30% of its throughput (BENCHMARKS.md). Its lines are formatted on the thread that
//! logs and appended to a buffer that a thread of its own writes out every 50 ms (or sooner
//! when it passes 256 KiB): no system call on a request's path. (`tracing-appender`'s
//! non-blocking writer was measured first: it wakes its writer thread for every line, and
//! the cached path still lost 21%.) Every other line is written at once, as before: a process
//! killed outright loses none of them, and at most the audit lines of its last 50 ms.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

const AUDIT: &str = "token_broker::audit";

/// Installs the global subscriber. Call once, at startup, and keep the guard until the
/// process ends: dropping it writes out the audit lines still queued.
pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Whatever RUST_LOG says: the HTTP libraries' own debug and trace lines can quote a
    // request's full URI (the h2 crate logs a malformed request's path, query included), and
    // a query can hold an admin key or an authorization code. And the audit trail at INFO,
    // whatever RUST_LOG says: it is not debug output, and only `audit = false` turns it off
    // (see the `audit` module).
    let filter = [
        "h2=info",
        "hyper=info",
        "hyper_util=info",
        "token_broker::audit=info",
    ]
    .iter()
    .filter_map(|directive| directive.parse().ok())
    .fold(filter, EnvFilter::add_directive);
    let json = std::env::var("BROKER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colour only for a person at a terminal: escape codes in a log file or in Application
    // Insights' `traces` would break every search for `state=…`.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (audit_writer, guard) = Batched::start();
    // A second init (tests) is harmless, hence `try_init`.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(vec![
            layer(json, ansi, BoxMakeWriter::new(std::io::stderr), false),
            layer(json, ansi, BoxMakeWriter::new(audit_writer), true),
        ])
        .try_init();
    guard
}

/// The lines of the audit trail (`audit`) or all others, as text or JSON, to `writer`.
fn layer<S>(
    json: bool,
    ansi: bool,
    writer: BoxMakeWriter,
    audit: bool,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = fmt::layer().with_ansi(ansi).with_writer(writer);
    let only = filter_fn(move |meta| (meta.target() == AUDIT) == audit);
    if json {
        layer.json().with_filter(only).boxed()
    } else {
        layer.with_filter(only).boxed()
    }
}

/// Lines gathered for [`Batched`]'s thread to write.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    stop: bool,
}

/// A writer that appends to a shared buffer, written to stderr by a thread of its own.
/// Written by hand: the crates that do this (`tracing-appender`) hand each line to a channel
/// and wake the writer for it, which is the cost this avoids.
#[derive(Clone)]
struct Batched(Arc<(Mutex<Pending>, Condvar)>);

/// Every how long the buffer is written out, and past which size sooner.
const BATCH_EVERY: Duration = Duration::from_millis(50);
const BATCH_MAX: usize = 256 * 1024;

impl Batched {
    fn start() -> (Batched, LogGuard) {
        let batched = Batched(Arc::default());
        let shared = Arc::clone(&batched.0);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let (pending, ready) = &*shared;
                loop {
                    let (lines, stop) = {
                        let guard = pending.lock().unwrap_or_else(|p| p.into_inner());
                        let (mut guard, _) = ready
                            .wait_timeout_while(guard, BATCH_EVERY, |p| {
                                !p.stop && p.lines.len() < BATCH_MAX
                            })
                            .unwrap_or_else(|p| p.into_inner());
                        (std::mem::take(&mut guard.lines), guard.stop)
                    };
                    if !lines.is_empty() {
                        // Nothing to do about a failed write to stderr: the line is lost,
                        // as it would be written in place.
                        let _ = std::io::stderr().lock().write_all(&lines);
                    }
                    if stop {
                        return;
                    }
                }
            })
            // Startup: without the thread, audit lines would pile up unwritten.
            .expect("starting the audit writer thread");
        let guard = LogGuard {
            shared: Arc::clone(&batched.0),
            thread: Some(thread),
        };
        (batched, guard)
    }
}

impl Write for Batched {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let (pending, ready) = &*self.0;
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.lines.extend_from_slice(bytes);
        if pending.lines.len() >= BATCH_MAX {
            ready.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> fmt::MakeWriter<'a> for Batched {
    type Writer = Batched;
    fn make_writer(&'a self) -> Batched {
        self.clone()
    }
}

/// Writes out the audit lines still buffered when dropped (at the end of `main`).
pub struct LogGuard {
    shared: Arc<(Mutex<Pending>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let (pending, ready) = &*self.shared;
        pending.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
