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
    // a query can hold an admin key or an authorization code. (The audit trail does not go
    // through this filter at all: see [`audit`].)
    let filter = ["h2=info", "hyper=info", "hyper_util=info"]
        .iter()
        .filter_map(|directive| directive.parse().ok())
        .fold(filter, EnvFilter::add_directive);
    let json = std::env::var("BROKER_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colour only for a person at a terminal: escape codes in a log file or in Application
    // Insights' `traces` would break every search for `state=…`.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (audit_writer, guard) = Batched::start();
    let _ = AUDIT_SINK.set(AuditSink {
        json,
        writer: audit_writer,
    });
    // A second init (tests) is harmless, hence `try_init`.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer(json, ansi))
        .try_init();
    guard
}

/// Every line (the audit trail's are written by [`audit`]), as text or JSON, to stderr.
fn layer<S>(json: bool, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let layer = fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    if json {
        layer.json().boxed()
    } else {
        layer.boxed()
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
                // Two buffers, swapped: the loggers append to one while this thread writes
                // the other, and neither is allocated anew.
                let mut lines = Vec::with_capacity(BATCH_MAX);
                loop {
                    lines.clear();
                    let stop = {
                        let guard = pending.lock().unwrap_or_else(|p| p.into_inner());
                        let (mut guard, _) = ready
                            .wait_timeout_while(guard, BATCH_EVERY, |p| {
                                !p.stop && p.lines.len() < BATCH_MAX
                            })
                            .unwrap_or_else(|p| p.into_inner());
                        std::mem::swap(&mut guard.lines, &mut lines);
                        guard.stop
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

impl Batched {
    /// Appends `bytes` for the thread to write.
    fn append(&self, bytes: &[u8]) {
        let (pending, ready) = &*self.0;
        let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.lines.extend_from_slice(bytes);
        if pending.lines.len() >= BATCH_MAX {
            ready.notify_one();
        }
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

/// A field's value on an audit line.
#[derive(Clone, Copy)]
pub enum AuditValue<'a> {
    Str(&'a str),
    /// Text the broker wrote itself (a route template, a hex fingerprint, a timestamp):
    /// printable ASCII without `"` or `\\`, written without looking for what to escape.
    Plain(&'a str),
    U64(u64),
}

/// Where audit lines go once [`init`] has run: the batch buffer, as text or JSON.
struct AuditSink {
    json: bool,
    writer: Batched,
}

static AUDIT_SINK: std::sync::OnceLock<AuditSink> = std::sync::OnceLock::new();

/// Writes one audit line, `message` and the `fields` that have a value, in the shape `fmt`
/// gives every other line — JSON `{"timestamp":…,"level":"INFO","fields":{"message":
/// "token_issued",…},"target":"token_broker::audit"}`, or text `{timestamp}  INFO
/// token_broker::audit: token_issued connection="acme" …` — but formatted here, by hand,
/// and not through `tracing`: its fields are a handful of strings and numbers, and the
/// event's way through the subscriber (the callsite, the per-layer filters, a visitor per
/// field through `Debug`, the time formatter) was most of what a cached handout cost with
/// the trail on (BENCHMARKS.md). Before [`init`] (unit tests), the line goes to `tracing`.
pub fn audit(message: &str, fields: &[(&str, Option<AuditValue<'_>>)]) {
    let Some(sink) = AUDIT_SINK.get() else {
        let mut line = String::new();
        format_audit(&mut line, false, |_| {}, message, fields);
        tracing::info!(target: AUDIT, "{}", line.trim());
        return;
    };
    LINE.with_borrow_mut(|line| {
        line.clear();
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let now = |line: &mut String| STAMP.with_borrow_mut(|stamp| stamp.write(line, since_epoch));
        format_audit(line, sink.json, now, message, fields);
        sink.writer.append(line.as_bytes());
    });
}

thread_local! {
    /// The line being written: one buffer per thread, kept, so a line costs no allocation.
    static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(512));
    static STAMP: std::cell::RefCell<Stamp> = const { std::cell::RefCell::new(Stamp { second: i64::MIN, prefix: String::new() }) };
}

/// The time as `fmt` writes it (RFC 3339, UTC, microseconds), its date and second formatted
/// once a second per thread.
struct Stamp {
    second: i64,
    /// `2026-12-06T21:05:03.`
    prefix: String,
}

impl Stamp {
    /// Writes the instant `since_epoch` after 1970-01-01 (the clock without a calendar: the
    /// date is worked out once a second).
    fn write(&mut self, line: &mut String, since_epoch: Duration) {
        let second = i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX);
        if second != self.second {
            self.second = second;
            self.prefix = chrono::DateTime::from_timestamp(second, 0)
                .unwrap_or_default()
                .format("%Y-%m-%dT%H:%M:%S.")
                .to_string();
        }
        let micros = since_epoch.subsec_micros();
        line.push_str(&self.prefix);
        for divisor in [100_000, 10_000, 1_000, 100, 10, 1] {
            line.push(char::from(b'0' + (micros / divisor % 10) as u8));
        }
        line.push('Z');
    }
}

/// One audit line into `line`.
fn format_audit(
    line: &mut String,
    json: bool,
    now: impl FnOnce(&mut String),
    message: &str,
    fields: &[(&str, Option<AuditValue<'_>>)],
) {
    use std::fmt::Write;
    if json {
        line.push_str("{\"timestamp\":\"");
        now(line);
        line.push_str("\",\"level\":\"INFO\",\"fields\":{\"message\":");
        push_json_str(line, message);
    } else {
        now(line);
        line.push_str("  INFO ");
        line.push_str(AUDIT);
        line.push_str(": ");
        line.push_str(message);
    }
    for (name, value) in fields {
        let Some(value) = value else { continue };
        if json {
            line.push(',');
            push_json_str(line, name);
            line.push(':');
        } else {
            line.push(' ');
            line.push_str(name);
            line.push('=');
        }
        match value {
            AuditValue::Str(text) if json => push_json_str(line, text),
            AuditValue::Str(text) => push_debug_str(line, text),
            AuditValue::Plain(text) => {
                debug_assert!(plain(text), "not plain: {text:?}");
                line.push('"');
                line.push_str(text);
                line.push('"');
            }
            AuditValue::U64(n) => {
                let _ = write!(line, "{n}");
            }
        }
    }
    if json {
        line.push_str("},\"target\":\"");
        line.push_str(AUDIT);
        line.push_str("\"}");
    }
    line.push('\n');
}

/// `value` quoted as `Debug` quotes it (what `fmt`'s text lines show), without `Debug`'s
/// character-by-character escaping when nothing needs escaping.
fn push_debug_str(line: &mut String, value: &str) {
    if plain(value) {
        line.push('"');
        line.push_str(value);
        line.push('"');
    } else {
        use std::fmt::Write;
        let _ = write!(line, "{value:?}");
    }
}

/// Whether `value` is printable ASCII without `"` or `\\`: quoted as it is in JSON and in
/// `Debug`. Every byte is looked at, without a branch per byte, so it vectorises.
fn plain(value: &str) -> bool {
    value.bytes().fold(true, |plain, b| {
        plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    })
}

/// `value` as a JSON string.
fn push_json_str(line: &mut String, value: &str) {
    line.push('"');
    if plain(value) {
        line.push_str(value);
        line.push('"');
        return;
    }
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

    #[test]
    fn audit_lines_have_the_shape_of_every_other_line_and_escape_what_callers_sent() {
        use super::{format_audit, AuditValue};
        let fields = [
            ("connection", Some(AuditValue::Str("acme"))),
            ("app_id", None),
            (
                "route",
                Some(AuditValue::Plain("/api/refresh/{connection}")),
            ),
            ("invocation_id", Some(AuditValue::Str("a\"b\\c"))),
            ("status", Some(AuditValue::U64(403))),
        ];
        let stamp = |line: &mut String| line.push_str("2026-12-06T21:05:03.000042Z");
        let mut json = String::new();
        format_audit(&mut json, true, stamp, "token_refused", &fields);
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("one JSON line");
        assert!(json.ends_with("}\n") && json.matches('\n').count() == 1);
        assert_eq!(parsed["target"], "token_broker::audit");
        assert_eq!(parsed["level"], "INFO");
        assert_eq!(parsed["timestamp"], "2026-12-06T21:05:03.000042Z");
        assert_eq!(parsed["fields"]["message"], "token_refused");
        assert_eq!(parsed["fields"]["invocation_id"], "a\"b\\c");
        assert_eq!(parsed["fields"]["status"], 403);
        assert!(
            parsed["fields"].get("app_id").is_none(),
            "no value, no field"
        );

        let mut text = String::new();
        format_audit(&mut text, false, stamp, "token_refused", &fields);
        assert_eq!(
            text,
            "2026-12-06T21:05:03.000042Z  INFO token_broker::audit: token_refused \
             connection=\"acme\" route=\"/api/refresh/{connection}\" \
             invocation_id=\"a\\\"b\\\\c\" status=403\n"
        );
    }

    #[test]
    fn the_audit_clock_writes_what_chrono_writes() {
        let mut stamp = super::Stamp {
            second: i64::MIN,
            prefix: String::new(),
        };
        // Within a second, across seconds, days and a year's end.
        for micros in [
            1_796_598_303_000_042_i64,
            1_796_598_303_999_999,
            1_796_598_304_000_000,
            1_796_684_703_500_000,
            1_798_761_599_999_999,
            1_798_761_600_000_001,
        ] {
            let mut line = String::new();
            let since_epoch = std::time::Duration::from_micros(micros as u64);
            stamp.write(&mut line, since_epoch);
            let chrono = chrono::DateTime::from_timestamp_micros(micros)
                .expect("instant")
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(line, chrono);
        }
    }
}
