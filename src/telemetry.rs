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
            layer(json, ansi),
            AuditLayer {
                json,
                writer: audit_writer,
            }
            .with_filter(filter_fn(|meta| meta.target() == AUDIT))
            .boxed(),
        ])
        .try_init();
    guard
}

/// Every line but the audit trail's, as text or JSON, to stderr.
fn layer<S>(json: bool, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let only = filter_fn(|meta| meta.target() != AUDIT);
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

/// Writes the audit trail's events in the shape `fmt` gives every other line — JSON
/// `{"timestamp":…,"level":"INFO","fields":{"message":"token_issued",…},"target":…}`, or text
/// `{timestamp}  INFO token_broker::audit: token_issued connection="acme" …` — but by hand:
/// its fields are a handful of strings and numbers, and `fmt`'s general machinery (a
/// visitor per field through `Debug`, its time formatter) was most of what a cached handout
/// cost with the trail on (BENCHMARKS.md).
struct AuditLayer {
    json: bool,
    writer: Batched,
}

impl<S: tracing::Subscriber> Layer<S> for AuditLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut line = String::with_capacity(384);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        if self.json {
            line.push_str("{\"timestamp\":\"");
            line.push_str(&now);
            line.push_str("\",\"level\":\"INFO\",\"fields\":{");
        } else {
            line.push_str(&now);
            line.push_str("  INFO ");
            line.push_str(AUDIT);
            line.push(':');
        }
        event.record(&mut AuditFields {
            line: &mut line,
            json: self.json,
            first: true,
        });
        if self.json {
            line.push_str("},\"target\":\"");
            line.push_str(AUDIT);
            line.push_str("\"}");
        }
        line.push('\n');
        let _ = self.writer.clone().write_all(line.as_bytes());
    }
}

/// One audit event's fields into its line.
struct AuditFields<'a> {
    line: &'a mut String,
    json: bool,
    first: bool,
}

impl AuditFields<'_> {
    fn key(&mut self, name: &str) {
        if self.json {
            if !self.first {
                self.line.push(',');
            }
            push_json_str(self.line, name);
            self.line.push(':');
        } else if name != "message" {
            self.line.push(' ');
            self.line.push_str(name);
            self.line.push('=');
        } else {
            self.line.push(' ');
        }
        self.first = false;
    }
}

impl tracing::field::Visit for AuditFields<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.key(field.name());
        if self.json {
            push_json_str(self.line, value);
        } else if field.name() == "message" {
            self.line.push_str(value);
        } else {
            use std::fmt::Write;
            let _ = write!(self.line, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        use std::fmt::Write;
        self.key(field.name());
        let _ = write!(self.line, "{value}");
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        // The message (`format_args!`) and anything not a string or a number.
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}

/// `value` as a JSON string.
fn push_json_str(line: &mut String, value: &str) {
    line.push('"');
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                use std::fmt::Write;
                let _ = write!(line, "\\u{:04x}", c as u32);
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_are_escaped() {
        let mut line = String::new();
        super::push_json_str(&mut line, "a\"b\\c\u{1}d é");
        assert_eq!(line, r#""a\"b\\c\u0001d é""#);
        let parsed: String = serde_json::from_str(&line).expect("json");
        assert_eq!(parsed, "a\"b\\c\u{1}d é");
    }
}
