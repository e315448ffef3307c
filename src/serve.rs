//! Serving HTTP on the shared listener, in a worker process or in-process,
//! and the app side of the drain: stop accepting, serve what the kernel had
//! already queued, then let in-flight requests finish while keep-alive
//! connections close after their current response.
//!
//! HTTP/1.1 only: hyper-util's auto (h1/h2) connection closes a connection
//! whose protocol it has not read yet when asked to shut down gracefully,
//! which would drop requests queued in the accept queue during a drain.

use std::future::Future;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;

use crate::app::DynService;
use crate::listener::{ServeListener, Stream};

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts and serves connections until `stop_accepting` resolves; then
/// accepts whatever is already queued, closes this process's copy of the
/// listener and returns the handle that finishes the in-flight work.
/// `on_accepting` runs once the accept loop is running (worker readiness).
pub async fn serve(
    listener: ServeListener,
    svc: DynService,
    stop_accepting: impl Future<Output = ()>,
    on_accepting: impl FnOnce(),
) -> Draining {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024);
    tokio::pin!(stop_accepting);
    on_accepting();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop_accepting => break,
            conn = listener.accept() => match conn {
                Ok(stream) => spawn_conn(&builder, &graceful, &svc, stream),
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning;
                    // the connection stays queued in the kernel meanwhile.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    // The supervisor already ran listen(fd, 0) on the shared socket; doing it
    // again here is harmless and covers the in-process case.
    listener.stop_new();
    let queued = listener.drain_queue();
    if !queued.is_empty() {
        tracing::debug!(count = queued.len(), "serving connections queued before accept stopped");
    }
    for stream in queued {
        spawn_conn(&builder, &graceful, &svc, stream);
    }
    Draining { graceful }
}

fn spawn_conn(builder: &http1::Builder, graceful: &GracefulShutdown, svc: &DynService, stream: Stream) {
    let conn = builder.serve_connection(TokioIo::new(stream), svc.clone());
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
}

/// In-flight connections after accepting stopped.
pub struct Draining {
    graceful: GracefulShutdown,
}

impl Draining {
    /// Closes keep-alive connections after their current response and waits
    /// for every in-flight request. Returns false if `timeout` ran out first.
    pub async fn finish(self, timeout: Option<Duration>) -> bool {
        let all = self.graceful.shutdown();
        match timeout {
            Some(t) => tokio::time::timeout(t, all).await.is_ok(),
            None => {
                all.await;
                true
            }
        }
    }
}
