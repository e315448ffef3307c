//! Serving HTTP on the shared listener, in a worker process or in-process,
//! and the app side of the drain: stop accepting, serve what the kernel had
//! already queued, then let in-flight requests finish while keep-alive
//! connections close after their current response.
//!
//! # Why not hyper's own graceful shutdown
//! hyper closes, on `graceful_shutdown`, every connection that is idle or has
//! not been read from yet, even when the client's request already sits in the
//! socket buffer; a connection taken from the accept queue during the drain
//! would be closed unanswered. So the drain here works from the outside:
//! every response produced once draining carries `Connection: close` (hyper
//! then closes after writing it), and a connection is shut only after it has
//! been quiet, with no request in flight and nothing read, for [`IDLE_GRACE`].
//!
//! HTTP/1.1 only, for the same reason: hyper-util's auto (h1/h2) connection
//! drops a connection whose protocol it has not read yet on shutdown.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

use crate::app::DynService;
use crate::listener::{ServeListener, Stream};
use crate::metrics::HttpRecorder;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// During a drain, a connection quiet for this long (nothing read, nothing in
/// flight) is closed.
const IDLE_GRACE: Duration = Duration::from_millis(100);

/// Accepts and serves connections until `stop_accepting` resolves; then
/// accepts whatever is already queued, closes this process's copy of the
/// listener and returns the handle that finishes the in-flight work.
/// `on_accepting` runs once the accept loop is running (worker readiness).
///
/// `sole_owner` says whether this process is the only one serving the socket
/// (in-process mode): only then may it run `listen(fd, 0)`, which acts on the
/// socket of every process. A worker leaving alone during a rolling restart
/// must not throttle the socket its replacement serves; in a full drain the
/// supervisor has already done it.
pub async fn serve(
    listener: ServeListener,
    svc: watch::Receiver<DynService>,
    recorder: Option<HttpRecorder>,
    stop_accepting: impl Future<Output = ()>,
    on_accepting: impl FnOnce(),
    sole_owner: bool,
    peers: usize,
) -> Draining {
    let mut balance = Balance::new(recorder.clone(), if sole_owner { 1 } else { peers });
    let server = Server::new(svc, recorder);
    tokio::pin!(stop_accepting);
    balance.accepting(true);
    on_accepting();
    let mut defer = || balance.defer();
    let mut accept_failures = crate::logging::Throttle::default();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop_accepting => break,
            conn = listener.accept(&mut defer) => match conn {
                Ok(stream) => server.spawn(stream),
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning;
                    // the connection stays queued in the kernel meanwhile.
                    // Counted every time, logged at most once a second.
                    if let Some(r) = &server.recorder {
                        r.accept_error();
                    }
                    if let Some(n) = accept_failures.hit() {
                        tracing::warn!(error = %e, count = n, "accept failed ({n} times since the last report)");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    balance.accepting(false);
    if sole_owner {
        listener.stop_new();
    }
    // From here on every response closes its connection.
    server.shared.draining.send_replace(true);
    let queued = listener.drain_queue();
    if !queued.is_empty() {
        tracing::debug!(
            count = queued.len(),
            "serving connections queued before accept stopped"
        );
    }
    for stream in queued {
        server.spawn(stream);
    }
    Draining {
        shared: server.shared,
    }
}

/// Spreads connections over the worker processes that share the socket.
///
/// Every worker's event loop is woken when a connection arrives, and the one
/// woken first would accept until the queue is empty: with a small pool of
/// keep-alive connections (an ingress, a mesh) one worker would serve them
/// all on one core. So, when a connection waits, a worker that holds more
/// open connections than the least busy *accepting* worker leaves it for a
/// millisecond, again and again while that stays so, but for at most
/// [`DEFER_PER_CONN`] per connection it holds more than that worker (capped
/// at [`MAX_DEFER`]): a peer that is slow to take the connection (its CPU
/// busy, its loop blocked) must not add more latency than that. Each
/// worker's count lives in the shared metrics region, next to its in-flight
/// gauge.
struct Balance {
    recorder: Option<HttpRecorder>,
    peers: usize,
    deferred: u32,
}

/// How long a worker leaves a waiting connection to others, per connection
/// it holds more than the least busy accepting worker.
const DEFER_PER_CONN: u32 = 10;
/// The most a worker leaves a waiting connection to others, in ms.
const MAX_DEFER: u32 = 50;

impl Balance {
    fn new(recorder: Option<HttpRecorder>, peers: usize) -> Balance {
        Balance {
            recorder,
            peers,
            deferred: 0,
        }
    }

    fn accepting(&self, on: bool) {
        if let Some(r) = &self.recorder {
            r.set_accepting(on);
        }
    }

    /// Whether to leave the waiting connection to a less busy worker now.
    fn defer(&mut self) -> Option<Duration> {
        let r = self.recorder.as_ref().filter(|_| self.peers > 1)?;
        let me = r.slot();
        let mine = r.accepting_conns(me).unwrap_or(0);
        let least = (0..self.peers)
            .filter(|&s| s != me)
            .filter_map(|s| r.accepting_conns(s))
            .min();
        match least {
            Some(l) if mine > l => {
                let allowed =
                    ((mine - l).min(u64::from(MAX_DEFER)) as u32 * DEFER_PER_CONN).min(MAX_DEFER);
                if self.deferred >= allowed {
                    self.deferred = 0;
                    return None;
                }
                self.deferred += 1;
                Some(Duration::from_millis(1))
            }
            _ => {
                self.deferred = 0;
                None
            }
        }
    }
}

/// State shared by the accept loop and every connection of one process.
struct Shared {
    /// Set when accepting stops: the drain has begun for connections.
    draining: watch::Sender<bool>,
    /// Connections still open.
    open: AtomicUsize,
    /// Notified when `open` drops to zero.
    all_closed: Notify,
}

struct Server {
    builder: http1::Builder,
    /// The service new connections get (replaced when contexts change in-process).
    svc: watch::Receiver<DynService>,
    recorder: Option<HttpRecorder>,
    shared: Arc<Shared>,
}

impl Server {
    fn new(svc: watch::Receiver<DynService>, recorder: Option<HttpRecorder>) -> Server {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(64 * 1024);
        Server {
            builder,
            svc,
            recorder,
            shared: Arc::new(Shared {
                draining: watch::Sender::new(false),
                open: AtomicUsize::new(0),
                all_closed: Notify::new(),
            }),
        }
    }

    fn spawn(&self, stream: Stream) {
        let conn_state = Arc::new(ConnState::default());
        let io = Tracked {
            inner: stream,
            state: conn_state.clone(),
        };
        let svc = ConnService {
            inner: self.svc.borrow().clone(),
            recorder: self.recorder.clone(),
            state: conn_state.clone(),
            draining: self.shared.draining.subscribe(),
        };
        let conn = self.builder.serve_connection(TokioIo::new(io), svc);
        let shared = self.shared.clone();
        let mut draining = shared.draining.subscribe();
        shared.open.fetch_add(1, Ordering::AcqRel);
        let recorder = self.recorder.clone();
        if let Some(r) = &recorder {
            r.conn_opened();
        }
        tokio::spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = draining.wait_for(|d| *d) => None,
            };
            let result = match ended {
                Some(r) => r,
                None => {
                    // Draining: busy connections close after their current
                    // response (Connection: close); quiet ones are shut once
                    // they have stayed quiet for IDLE_GRACE.
                    loop {
                        conn_state.active.store(false, Ordering::Release);
                        tokio::select! {
                            r = conn.as_mut() => break r,
                            _ = tokio::time::sleep(IDLE_GRACE) => {
                                let quiet = !conn_state.active.load(Ordering::Acquire)
                                    && conn_state.in_flight.load(Ordering::Acquire) == 0;
                                if quiet {
                                    conn.as_mut().graceful_shutdown();
                                    break conn.as_mut().await;
                                }
                            }
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            if let Some(r) = &recorder {
                r.conn_closed();
            }
            if shared.open.fetch_sub(1, Ordering::AcqRel) == 1 {
                shared.all_closed.notify_waiters();
            }
        });
    }
}

/// What the drain needs to know of one connection.
#[derive(Default)]
struct ConnState {
    /// Requests being answered.
    in_flight: AtomicUsize,
    /// Bytes were read since the drain last looked.
    active: AtomicBool,
}

/// The connection's IO, noting every read that brings bytes.
struct Tracked {
    inner: Stream,
    state: Arc<ConnState>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.active.store(true, Ordering::Release);
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The app's service as one connection sees it: counts requests in flight
/// and, once draining, asks hyper to close the connection after the response.
struct ConnService {
    inner: DynService,
    recorder: Option<HttpRecorder>,
    state: Arc<ConnState>,
    draining: watch::Receiver<bool>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = hyper::Response<crate::app::Body>;
    type Error = crate::app::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.state.in_flight.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        if let Some(r) = &self.recorder {
            r.start();
        }
        let fut = self.inner.call(req);
        let state = self.state.clone();
        let draining = self.draining.clone();
        let recorder = self.recorder.clone();
        Box::pin(async move {
            let result = fut.await;
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
            state.active.store(true, Ordering::Release);
            if let Some(r) = &recorder {
                // A service error becomes a 500 from hyper's point of view.
                let code = result.as_ref().map_or(500, |r| r.status().as_u16());
                r.finish(code, started.elapsed());
            }
            let mut resp = result?;
            if *draining.borrow() {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(resp)
        })
    }
}

/// In-flight connections after accepting stopped.
pub struct Draining {
    shared: Arc<Shared>,
}

impl Draining {
    /// Waits until every connection has closed (busy ones after their
    /// current response). Returns false if `timeout` ran out first.
    pub async fn finish(self, timeout: Option<Duration>) -> bool {
        let shared = self.shared;
        let all = async {
            loop {
                let notified = shared.all_closed.notified();
                if shared.open.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, all).await.is_ok(),
            None => {
                all.await;
                true
            }
        }
    }
}
