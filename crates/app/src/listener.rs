//! The HTTP listener: accepts connections up to a limit and serves each with
//! hyper's HTTP/1 connection, bounded in time:
//!
//! - **header read timeout**: a request head must arrive complete within this
//!   bound, counted from when the server starts waiting for it (right after the
//!   accept, or after the previous response on a kept-alive connection); hyper
//!   enforces it, and a connection that sends a partial head, or nothing, is
//!   closed when it passes;
//! - **idle timeout**: a connection on which no byte moves in either direction
//!   for this long is closed (a request in flight is answered first, then the
//!   connection closes instead of being kept alive; if it still moves nothing
//!   for a request timeout more, it is dropped);
//! - **maximum connections**: past it, new connections wait in the kernel's
//!   accept queue until one closes;
//! - **lingering close**: a connection closed while the client still sends (an
//!   answer given before the body was read) reads and drops the rest for up to
//!   2 s, so the answer is not lost to a reset (see `linger`).
//!
//! On shutdown it stops accepting, lets every connection finish its request in
//! flight (kept-alive connections close after it), and returns when all are
//! closed. This is what `axum::serve` does, plus the three bounds it does not
//! offer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use scaleshop_web::observe::Observe;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

/// The bounds of the listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// The bound of one request (a closing connection gets this long on top
    /// of the idle timeout to finish its answer).
    pub request_timeout: Duration,
}

/// Serves `service` on `listener` until `stop` turns true, then drains: returns
/// once every connection is closed.
pub async fn run(
    listener: TcpListener,
    service: Observe,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a receiver; `closed()` resolves when all are gone.
    let (open_tx, _) = watch::channel(());
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = stopped(&mut stop) => break,
        };
        // The semaphore is never closed.
        let Ok(slot) = slot else { break };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let service = service.for_peer(peer);
        let stop = stop.clone();
        let open = open_tx.subscribe();
        tokio::spawn(async move {
            serve_connection(stream, peer, service, limits, stop).await;
            drop(open);
            drop(slot);
        });
    }
    drop(listener);
    open_tx.closed().await;
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Connection errors (the peer gave up before the accept) are the peer's; other
/// errors (out of file descriptors, ...) are the machine's: wait a little, as
/// `axum::serve` does, rather than spin.
async fn accept_failed(error: &io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    service: Observe,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let closed = Arc::new(parking_lot::Mutex::new(None));
    let io = TokioIo::new(Tracked {
        inner: Some(stream),
        activity: activity.clone(),
        closed: closed.clone(),
    });
    let service = TowerToHyperService::new(
        service.map_request(|request: hyper::Request<Incoming>| request.map(Body::new)),
    );
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    let mut check_idle = Box::pin(tokio::time::sleep(limits.idle_timeout));
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                let socket = closed.lock().take();
                if let Some(socket) = socket {
                    linger(socket).await;
                }
                return;
            }
            () = stopped(&mut stop), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            () = check_idle.as_mut() => {
                let idle_since = activity.last();
                let idle_for = Instant::now().saturating_duration_since(idle_since);
                // Once closing, a connection still silent after a whole request's
                // time (a client that stopped reading its answer) is dropped.
                let bound = if closing {
                    limits.idle_timeout + limits.request_timeout
                } else {
                    limits.idle_timeout
                };
                if idle_for < bound {
                    check_idle.as_mut().reset(idle_since + bound);
                } else if closing {
                    tracing::debug!(%peer, "dropping a connection that stopped moving");
                    return;
                } else {
                    tracing::debug!(%peer, "closing an idle connection");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                    check_idle.as_mut().reset(Instant::now() + limits.idle_timeout + limits.request_timeout);
                }
            }
        }
    }
}

/// When a byte last moved on a connection, as an offset from its start (one
/// atomic store per read or write that moved bytes).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// How long, and how many bytes at most, a closed connection's socket keeps
/// reading what the client still sends (see [`linger`]).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: u64 = 16 << 20;

/// A lingering close. A connection may close with bytes of the client's still
/// unread (an answer given before the request's body was read: a 413, a 401);
/// closing a socket with unread bytes sends a reset, and a reset can make the
/// peer's kernel drop the answer it has not read yet (a gateway in between then
/// has nothing to pass on). So once the answer is out and the socket is shut
/// for writing, what still comes is read and dropped until the client closes,
/// bounded by [`LINGER`] and [`LINGER_BYTES`].
async fn linger(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8 * 1024];
    let mut drained = 0u64;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => drained += n as u64,
            }
        }
    })
    .await;
}

/// A stream that notes when bytes move through it. Once shut for writing, it
/// hands the socket to `closed` for a lingering close.
struct Tracked {
    inner: Option<TcpStream>,
    activity: Arc<Activity>,
    closed: Arc<parking_lot::Mutex<Option<TcpStream>>>,
}

impl Tracked {
    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.inner
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match this.stream() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.stream() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.stream() {
            Ok(stream) => stream.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        };
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Shuts the socket for writing (the answer is complete), then hands it
    /// over for a lingering close.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(stream) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let shut = std::task::ready!(Pin::new(stream).poll_shutdown(cx));
        if shut.is_ok() {
            *this.closed.lock() = this.inner.take();
        }
        Poll::Ready(shut)
    }
}
