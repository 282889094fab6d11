//! The HTTP edge under hostile clients, against the real binary: slow and idle connections,
//! bodies declared huge, HTTP/2, and what reaches the log.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::api_double::ApiDouble;
use crate::support::{
    free_port, memory_kib, BrokerConfig, BrokerProcess, ConsentedBroker, ADMIN_KEY, CALLER_KEY,
};

/// A broker with one (unconsented) connection, the given `[server]` settings and log level.
async fn broker(
    dir: &tempfile::TempDir,
    server: &[(&str, i64)],
    rust_log: &str,
    open_files: Option<u32>,
) -> BrokerProcess {
    let mut config = BrokerConfig::default()
        .file_store(&dir.path().join("tokens"))
        .unreached_connection("acme");
    let mut table = String::from("[server]\n");
    for (key, value) in server {
        table.push_str(&format!("{key} = {value}\n"));
    }
    config = config.tables(&table);
    let path = config.write(dir.path());
    BrokerProcess::start_limited(
        free_port(),
        &path,
        &[("RUST_LOG", rust_log.to_owned())],
        &dir.path().join("broker.log"),
        open_files,
    )
    .await
}

/// The broker never logged running out of file descriptors.
fn assert_never_out_of_files(broker: &BrokerProcess) {
    let logs = broker.logs();
    assert!(!logs.contains("Too many open files"), "{logs}");
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect")
}

/// True once the server has closed `stream` (EOF or reset), reading whatever it sent first.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// `GET /api/health` on a new connection; how long it took.
async fn health(port: u16) -> Duration {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("health answers");
    assert_eq!(response.status(), 200);
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_idle_connections_are_closed_and_never_lock_out_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 128 open files for the broker, fewer than the 300 connections below: without the
    // connection cap and the eviction of idle connections, accept() would run out.
    let broker = broker(
        &dir,
        &[("header_timeout", 2), ("max_connections", 64)],
        "info",
        Some(128),
    )
    .await;
    let port = broker.port;

    let mut held = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..150 {
        // Half-sent: a request line and a header, never the blank line.
        let mut half = connect(port).await;
        half.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        held.push(half);
        // Idle keep-alive: one request answered, then silence.
        let mut idle = connect(port).await;
        idle.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await;
        held.push(idle);
        if i % 10 == 0 {
            slowest = slowest.max(health(port).await);
        }
    }
    for _ in 0..10 {
        slowest = slowest.max(health(port).await);
    }
    // The broker closes every one of them: evicted for newer ones, or at the header timeout.
    for (i, stream) in held.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, Duration::from_secs(4)).await,
            "connection {i} still open after the header timeout"
        );
    }
    slowest = slowest.max(health(port).await);
    // A generous bound for a loaded CI machine; locked out, health would time out (5 s).
    assert!(
        slowest < Duration::from_millis(500),
        "health took {slowest:?}"
    );
    eprintln!("slowest health answer during the flood: {slowest:?}");
    assert_never_out_of_files(&broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_declared_huge_are_refused_without_being_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(&dir, &[], "info", None).await;
    let port = broker.port;
    let pid = broker.pid().expect("pid");
    let before = memory_kib(pid, "VmRSS");

    // 200 unauthenticated clients, each declaring 2 MB and sending the first 64 KB of it.
    let chunk = vec![b'{'; 64 * 1024];
    let mut clients = Vec::new();
    for i in 0..200 {
        let chunk = chunk.clone();
        clients.push(tokio::spawn(async move {
            let mut stream = connect(port).await;
            let chunked = i % 2 == 1;
            let head = if chunked {
                // No declared length: refused for want of a credential, unread.
                "POST /api/refresh/acme HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned()
            } else {
                "POST /api/refresh/acme HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000\r\n\r\n".to_owned()
            };
            stream.write_all(head.as_bytes()).await.expect("head");
            let body = if chunked {
                let mut body = format!("{:x}\r\n", chunk.len()).into_bytes();
                body.extend_from_slice(&chunk);
                body
            } else {
                chunk
            };
            let _ = stream.write_all(&body).await;
            let mut answer = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
                .await
                .expect("an answer")
                .unwrap_or(0);
            let answer = String::from_utf8_lossy(&answer[..n]).to_string();
            (chunked, answer, stream)
        }));
    }
    let mut streams = Vec::new();
    for client in clients {
        let (chunked, answer, stream) = client.await.expect("join");
        let status = answer.split(' ').nth(1).unwrap_or("none").to_owned();
        if chunked {
            assert_eq!(status, "401", "{answer}");
        } else {
            assert_eq!(status, "413", "{answer}");
        }
        assert!(answer.contains("application/json"), "{answer}");
        streams.push(stream);
    }
    let during = memory_kib(pid, "VmRSS");
    drop(streams);
    let growth = during.saturating_sub(before);
    eprintln!("resident memory: {before} KiB before, {during} KiB with 200 held 2 MB bodies (+{growth} KiB)");
    assert!(growth < 20 * 1024, "+{growth} KiB");

    // An authenticated caller with an oversized body: 413, JSON.
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .header("Content-Type", "application/json")
        .body(format!(
            "{{\"min_validity\": 600, \"pad\": \"{}\"}}",
            "x".repeat(4096)
        ))
        .send()
        .await
        .expect("refresh");
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "payload_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_refused_and_no_url_query_reaches_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(&dir, &[], "trace", None).await;
    let port = broker.port;

    // HTTP/2 with prior knowledge: the connection preface, a SETTINGS frame, then a request
    // whose path carries the admin key. The broker speaks HTTP/1.1 only.
    let mut h2 = connect(port).await;
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    h2.write_all(&preface).await.expect("preface");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), h2.read_to_end(&mut answer)).await;
    // An HTTP/2 server would answer with its own SETTINGS frame (type 4 in byte 3).
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let curl = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
        .get(format!(
            "http://127.0.0.1:{port}/api/connections?key={ADMIN_KEY}"
        ))
        .send()
        .await;
    assert!(curl.is_err(), "HTTP/2 was served: {curl:?}");

    // Malformed requests with the admin key in the query, at TRACE.
    for request in [
        format!("GET /api/authorize/%ff?key={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /api/connections?key={ADMIN_KEY}&\u{1}x HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /api/connections?key={ADMIN_KEY} HTTP/9.9\r\nHost: x\r\n\r\n"),
        format!("GET /api/refresh/acme?key={ADMIN_KEY} HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"),
    ] {
        let mut stream = connect(port).await;
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
    }
    let logs = broker.logs();
    assert!(logs.contains("TRACE"), "at trace level");
    assert!(
        !logs.contains(ADMIN_KEY),
        "the admin key was logged:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_paths_and_header_values_are_cut_in_log_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(&dir, &[], "debug", None).await;
    let port = broker.port;
    let http = reqwest::Client::new();
    let long_path = format!("/api/refresh/{}", "a".repeat(60 * 1024));
    let response = http
        .get(format!("http://127.0.0.1:{port}{long_path}"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("long path");
    assert!(response.status().is_client_error());
    let response = http
        .get(format!("http://127.0.0.1:{port}/api/health"))
        .header("X-Azure-Functions-InvocationId", "id-".repeat(100 * 1024))
        .send()
        .await
        .expect("long header");
    assert!(response.status().is_success() || response.status().is_client_error());
    let logs = broker.logs();
    let longest = logs.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "a {longest}-byte log line");
    assert!(logs.contains("…(cut)"), "{logs}");
}

/// `GET /api/health` on a new connection, asked every 200 ms until it answers or `within`
/// has passed; how long after `since` it first answered. At the connection cap with every
/// connection busy, a new connection is closed at once, so the early tries fail fast.
async fn health_answers_within(port: u16, since: Instant, within: Duration) -> Option<Duration> {
    let http = reqwest::Client::new();
    while since.elapsed() < within {
        let answered = http
            .get(format!("http://127.0.0.1:{port}/api/health"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200);
        if answered {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Sends one byte of body a second on `stream` (never the whole declared length) until the
/// server answers or closes; how long that took from `since` (`None`: not within `give_up`)
/// and what it answered.
async fn trickle(
    mut stream: TcpStream,
    since: Instant,
    give_up: Duration,
) -> (Option<Duration>, String) {
    let (mut reader, mut writer) = stream.split();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut answered_at = None;
    while since.elapsed() < give_up {
        tokio::select! {
            read = reader.read(&mut buf) => {
                answered_at.get_or_insert(since.elapsed());
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
            _ = tick.tick() => {
                // Whitespace: a JSON document that never ends. A write to a closed
                // connection fails; the read above sees the close.
                let _ = writer.write_all(b" ").await;
            }
        }
    }
    (answered_at, String::from_utf8_lossy(&answer).into_owned())
}

/// `server.body_timeout` bounds a whole body, not the gap between its chunks: authenticated
/// uploads that fill the connection cap and send a byte a second (so no gap ever reaches
/// the timeout) are answered when it has passed since their headers, and health gets
/// through again. Before, they stayed open as long as they trickled (past 13 s in the
/// review) and health was refused all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trickling_uploads_are_cut_at_the_body_timeout_and_health_gets_through() {
    const CAP: usize = 8;
    const BODY_TIMEOUT: Duration = Duration::from_secs(3);
    const GIVE_UP: Duration = Duration::from_secs(15);
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(
        &dir,
        &[("body_timeout", 3), ("max_connections", CAP as i64)],
        "info",
        None,
    )
    .await;
    let port = broker.port;
    let mut uploads = Vec::new();
    let since = Instant::now();
    for _ in 0..CAP {
        let mut stream = connect(port).await;
        // Well under the route's 64 KB, so only the body's timing is at stake.
        let head = format!(
            "POST /api/refresh/acme HTTP/1.1\r\nHost: x\r\nX-API-Key: {CALLER_KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("head");
        uploads.push(tokio::spawn(trickle(stream, since, GIVE_UP)));
    }
    // Let every upload's headers in, so that all of them are requests in progress (an
    // upload still sending its headers would be evicted as idle for the health check).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = health_answers_within(port, since, GIVE_UP).await;
    // At the cap, with every connection busy, a probe still gets its answer (a few places
    // beyond the cap serve health alone), and any other request a prompt 503.
    let busy = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .expect("an answer beyond the cap");
    let during = since.elapsed();
    assert_eq!(busy.status(), 503);
    assert_eq!(busy.headers()["retry-after"], "1");
    let body: serde_json::Value = busy.json().await.expect("json");
    assert_eq!(body["error"], "server_busy", "{body}");
    // Cut at the timeout, measured from the headers; the slack is for a loaded machine.
    let bound = BODY_TIMEOUT + Duration::from_millis(2500);
    for (i, upload) in uploads.into_iter().enumerate() {
        let (answered, answer) = upload.await.expect("join");
        let answered =
            answered.unwrap_or_else(|| panic!("upload {i} still open after {GIVE_UP:?}"));
        assert!(
            answered >= BODY_TIMEOUT - Duration::from_millis(600) && answered < bound,
            "upload {i} answered after {answered:?}"
        );
        assert!(answer.starts_with("HTTP/1.1 400"), "upload {i}: {answer}");
        assert!(answer.contains("too slow"), "upload {i}: {answer}");
    }
    let health = health.unwrap_or_else(|| panic!("health refused for {GIVE_UP:?}"));
    eprintln!("health answered {health:?} after the uploads began");
    assert!(
        health < BODY_TIMEOUT - Duration::from_millis(500) && during < BODY_TIMEOUT,
        "health answered only after {health:?} (the busy answer after {during:?}): not at the cap"
    );
    // With the uploads cut, callers reach the router again (no consent yet: 409).
    let after = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/api/refresh/acme"))
        .header("X-API-Key", CALLER_KEY)
        .send()
        .await
        .expect("refresh");
    assert_eq!(after.status(), 409);
}

/// How long from `since` until a caller's `/api/refresh/acme` is answered 200 (the router,
/// not the probe lane beyond the cap); `None`: not within `within`.
async fn caller_answers_within(port: u16, since: Instant, within: Duration) -> Option<Duration> {
    let http = reqwest::Client::new();
    while since.elapsed() < within {
        let answered = http
            .get(format!("http://127.0.0.1:{port}/api/refresh/acme"))
            .header("X-API-Key", CALLER_KEY)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200);
        if answered {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// An answer the caller stops reading ends once its writes have stalled for
/// `server.write_timeout`: downloads through the proxy that fill the connection cap, each
/// read no further than its headers, are closed, and health gets through again. Before,
/// they stayed in progress for as long as their callers kept the connections open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_nobody_reads_are_closed_at_the_write_timeout() {
    const CAP: usize = 8;
    const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
    let api = ApiDouble::start().await;
    let mut setup = ConsentedBroker::start(
        3600,
        &format!("api_base_url = \"{}\"", api.base),
        &format!("[server]\nmax_connections = {CAP}\nwrite_timeout = 2"),
        &[],
    )
    .await;
    let port = setup.broker.port;
    let mut stalled = Vec::new();
    for _ in 0..CAP {
        let mut stream = connect(port).await;
        // 4 GB: far more than the socket buffers between the broker and this test hold.
        let request = format!(
            "GET /api/proxy/acme/big?bytes={} HTTP/1.1\r\nHost: x\r\nX-API-Key: {CALLER_KEY}\r\n\r\n",
            4u64 << 30
        );
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut head = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut head))
            .await
            .expect("the answer begins")
            .expect("read");
        assert!(
            head[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&head[..n])
        );
        // …and no further.
        stalled.push(stream);
    }
    let since = Instant::now();
    // A caller's request, not a probe (probes are answered beyond the cap anyway).
    let caller = caller_answers_within(port, since, Duration::from_secs(15)).await;
    let caller = caller.expect("callers refused for 15 s: the unread answers held the cap");
    eprintln!("a caller was answered {caller:?} after the last download stalled");
    // Filling the buffers takes a moment; then the write timeout.
    assert!(
        caller < WRITE_TIMEOUT + Duration::from_secs(5),
        "a caller was answered only after {caller:?}"
    );
    // Each stalled connection was closed: what is left to read is what the socket buffers
    // held when the broker gave up, then the end. (Reading one before its writes have
    // stalled for the timeout would let its answer go on: wait for all of them first.)
    tokio::time::sleep_until((since + WRITE_TIMEOUT + Duration::from_secs(3)).into()).await;
    for (i, stream) in stalled.iter_mut().enumerate() {
        let mut left = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => left += n,
                Err(_) => panic!("connection {i} neither sends nor closes"),
            }
            assert!(
                left < 256 << 20,
                "connection {i} still streaming after {left} bytes"
            );
        }
    }
    setup.broker.stop().await;
}

/// Opens `count` keep-alive connections one after another, each asking for health once and
/// then left idle; panics on the first the broker does not answer within 3 s (it could not
/// accept it).
async fn idle_connections(port: u16, count: usize) -> Vec<TcpStream> {
    let mut idle = Vec::new();
    for i in 0..count {
        let mut stream = connect(port).await;
        stream
            .write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
        let answer = match read {
            Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            _ => String::new(),
        };
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "idle connection {i} not served: {answer:?}"
        );
        idle.push(stream);
    }
    idle
}

/// A `max_connections` the open-file limit cannot hold is lowered at startup, with a
/// warning: at the lowered cap the longest-idle connection makes room, where before the
/// process ran out of descriptors first and stopped accepting anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_is_held_below_the_open_file_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 open files: the cap becomes 32 (half of so low a limit is kept for the store,
    // outgoing connections and the runtime's own descriptors).
    let broker = broker(
        &dir,
        &[("max_connections", 4096), ("header_timeout", 60)],
        "info",
        Some(64),
    )
    .await;
    let logs = broker.logs();
    assert!(
        logs.contains("server.max_connections lowered to 32")
            && logs.contains("open-file limit is 64"),
        "{logs}"
    );
    let mut idle = idle_connections(broker.port, 100).await;
    health(broker.port).await;
    assert!(
        closed_by_server(&mut idle[0], Duration::from_secs(2)).await,
        "the longest-idle connection is still open"
    );
    assert_never_out_of_files(&broker);
}

/// When `accept` fails for want of file descriptors below the cap (here the limit is
/// lowered under the running process, as if the descriptors kept back had gone to the store
/// and outgoing connections), the longest-idle connection is closed as at the cap, so
/// health checks and callers keep getting through. Before, the listener slept and retried
/// while idle connections held every descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_file_descriptors_the_longest_idle_connection_makes_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker(&dir, &[("header_timeout", 60)], "info", Some(256)).await;
    let pid = broker.pid().expect("pid");
    let pid = i32::try_from(pid).expect("a pid");
    // Soft and hard limit to 64, far under the cap (512, held at 192 for 256 files).
    rlimit::prlimit(pid, rlimit::Resource::NOFILE, Some((64, 64)), None).expect("prlimit");
    let mut idle = idle_connections(broker.port, 100).await;
    health(broker.port).await;
    assert!(
        closed_by_server(&mut idle[0], Duration::from_secs(2)).await,
        "the longest-idle connection is still open"
    );
    let logs = broker.logs();
    assert!(logs.contains("out of file descriptors"), "{logs}");
}
