//! The listener's two clocks on a request: a deadline for its whole body
//! (`server.body_timeout`) and a limit on how long an answer's writes may stall
//! (`server.write_timeout`).
//!
//! A per-chunk idle timer (tower-http's `RequestBodyTimeoutLayer`, used before) lets a body
//! that sends a byte just inside the timer live for as long as its sender likes, holding a
//! connection that counts as busy at the cap. [`BodyDeadline`] instead fixes one instant,
//! when the request's headers are in, by which the last byte must have arrived.
//!
//! On the way out, an answer the caller stops reading would sit in hyper's write buffer
//! forever, and its connection with it. [`WriteStall`] wraps the socket: once a write can make
//! no progress (the socket's buffer is full), it fails after `write_timeout` unless a byte
//! goes out in between; hyper then drops the connection and the answer with it. Slow readers
//! are fine, as long as they take a byte now and then.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::BoxError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Why a request body ended early: it was not all in by its deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within server.body_timeout")]
pub(super) struct BodyTooSlow;

/// A request body that must end by a fixed instant (see the module's doc); past it, the next
/// poll yields [`BodyTooSlow`] whether or not bytes are still arriving.
pub(super) struct BodyDeadline<B> {
    body: B,
    deadline: Instant,
    /// Set the first time the body has nothing to give, so that a body read at once (most
    /// are empty or a few bytes) never registers a timer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> BodyDeadline<B> {
    /// `body`, which must end by `deadline`.
    pub(super) fn until(body: B, deadline: Instant) -> Self {
        Self {
            body,
            deadline,
            timer: None,
        }
    }
}

impl<B> hyper::body::Body for BodyDeadline<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // Checked before every frame: a steady trickle never leaves the body pending long
        // enough for the timer alone to catch it.
        if Instant::now() >= this.deadline {
            return Poll::Ready(Some(Err(BodyTooSlow.into())));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Some(Err(BodyTooSlow.into())))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket whose writes fail once they have made no progress for `limit`
/// (see the module's doc). Reads pass through: how long a request may take to arrive is the
/// header and body deadlines' business.
pub(super) struct WriteStall<S> {
    io: S,
    limit: Duration,
    /// Armed when a write finds the socket full, disarmed by any write that goes through;
    /// kept once made, and reset, since a slow reader stalls often.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<S> WriteStall<S> {
    pub(super) fn new(io: S, limit: Duration) -> Self {
        Self {
            io,
            limit,
            timer: None,
            armed: false,
        }
    }

    /// What a write's `result` means under the limit: progress disarms the timer; no
    /// progress arms it (once) and, when it has run out, is an error.
    fn judge<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if result.is_ready() {
            self.armed = false;
            return result;
        }
        let deadline = Instant::now() + self.limit;
        let timer = match self.timer.as_mut() {
            Some(timer) => {
                if !self.armed {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the caller read nothing for server.write_timeout",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.judge(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.judge(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.judge(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    /// A body fed by the test, a chunk at a time.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, axum::body::Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, std::io::Error>(chunk), rx))
        });
        (tx, axum::body::Body::from_stream(chunks))
    }

    fn byte() -> Bytes {
        Bytes::from_static(b" ")
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_trickling_inside_any_gap_is_cut_at_the_deadline() {
        let (tx, body) = channel_body();
        let mut body = BodyDeadline::until(body, Instant::now() + Duration::from_secs(3));
        let started = Instant::now();
        let feeder = tokio::spawn(async move {
            // A byte a second, for longer than the deadline: every gap is well inside it.
            for _ in 0..10 {
                if tx.send(byte()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut read = 0;
        let err = loop {
            match body.frame().await {
                Some(Ok(_)) => read += 1,
                Some(Err(err)) => break err,
                None => panic!("the body ended"),
            }
        };
        assert!(err.is::<BodyTooSlow>(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(read, 3, "the bytes sent at 0, 1 and 2 s");
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_in_time_is_whole() {
        let (tx, body) = channel_body();
        let body = BodyDeadline::until(body, Instant::now() + Duration::from_secs(3));
        tokio::spawn(async move {
            for _ in 0..5 {
                let _ = tx.send(byte()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let bytes = body.collect().await.expect("in time").to_bytes();
        assert_eq!(&bytes[..], b"     ");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_sent_steadily_past_the_deadline_is_cut_too() {
        // Never pending: the check before each frame catches it, not the timer.
        let mut body = BodyDeadline::until(
            http_body_util::Full::new(Bytes::from_static(b"x")),
            Instant::now() + Duration::from_secs(3),
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        let err = body.frame().await.expect("a frame").expect_err("late");
        assert!(err.is::<BodyTooSlow>());
    }

    #[tokio::test(start_paused = true)]
    async fn writes_fail_once_nothing_is_taken_for_the_limit() {
        let (near, mut far) = tokio::io::duplex(1024);
        let mut near = WriteStall::new(near, Duration::from_secs(60));
        let chunk = [0u8; 1024];
        near.write_all(&chunk).await.expect("the buffer takes it");
        // A slow reader: a little every 50 s keeps the answer going.
        for _ in 0..3 {
            let writing = near.write_all(&chunk[..100]);
            tokio::pin!(writing);
            tokio::select! {
                _ = &mut writing => panic!("written into a full buffer"),
                () = tokio::time::sleep(Duration::from_secs(50)) => {}
            }
            let mut taken = [0u8; 100];
            tokio::io::AsyncReadExt::read_exact(&mut far, &mut taken)
                .await
                .expect("read");
            writing.await.expect("progress again");
        }
        // A reader that stops: the write fails after the limit.
        let started = Instant::now();
        let err = near.write_all(&chunk).await.expect_err("stalled");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }
}
