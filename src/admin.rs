//! The admin server (default `0.0.0.0:8001`), served by the supervisor.
//!
//! | endpoint | methods | answer |
//! |---|---|---|
//! | `/admin/stop` | POST | 202, drain begins (again: 202, nothing new); 405 otherwise; 401 without the configured bearer token; 403 for a non-loopback caller when no token is configured |
//! | `/healthz` | GET, HEAD | 200 while the supervisor lives, draining included |
//! | `/readyz` | GET, HEAD | 200 when every worker is up and nothing drains; 503 otherwise |
//! | `/metrics` | GET, HEAD | Prometheus text format |
//!
//! It must stay responsive whatever clients do: each connection is its own
//! task, request headers must arrive within [`HEADER_READ_TIMEOUT`], headers
//! are capped at [`MAX_HEADER_BYTES`], no body is ever read (a stop request
//! announcing more than [`MAX_BODY_BYTES`] is refused), and at most
//! [`MAX_CONNECTIONS`] connections are served at once.
//! This module never starts or stops a worker itself: it sets the stop flag.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::stop::{StopFlag, StopSource};

/// Time a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest body a stop request may announce.
pub const MAX_BODY_BYTES: u64 = 1024;
/// Connections served at once; more wait in the kernel's queue.
pub const MAX_CONNECTIONS: usize = 256;

/// What the admin endpoints read.
pub struct AdminState {
    /// The pod's stop flag.
    pub flag: StopFlag,
    /// Whether every worker is up (the supervisor keeps it current).
    pub workers_up: Arc<AtomicBool>,
    /// The bearer token, if `--admin-token-file` was given.
    pub token: Option<Vec<u8>>,
    /// Renders `/metrics`.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
}

/// Binds the admin listener; a failure is a configuration error.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let fail = |reason: String| Error::Listen {
        addr: if bare.contains(':') {
            format!("[{bare}]:{port} (admin)")
        } else {
            format!("{bare}:{port} (admin)")
        },
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| {
            fail(format!(
                "`{host}` is not an address or a resolvable host name ({e})"
            ))
        })?
        .collect();
    let addr = *addrs.first().ok_or_else(|| fail("no address".into()))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| fail(e.to_string()))?;
    let _ = socket.set_reuse_address(true);
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into()).map_err(|e| {
        fail(if e.kind() == std::io::ErrorKind::AddrInUse {
            "address already in use (another process listens on it)".into()
        } else {
            e.to_string()
        })
    })?;
    socket.listen(128).map_err(|e| fail(e.to_string()))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    TcpListener::from_std(socket.into()).map_err(|e| fail(e.to_string()))
}

/// Serves the admin endpoints until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    loop {
        let permit = match slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let resp = route(&state, peer, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}

fn route(state: &AdminState, peer: SocketAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let get = |m: &Method| m == Method::GET || m == Method::HEAD;
    match req.uri().path() {
        "/admin/stop" => {
            if req.method() != Method::POST {
                return method_not_allowed("POST");
            }
            if let Some(denied) = authorize(state, peer, req) {
                return denied;
            }
            let announced = req
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            if announced > MAX_BODY_BYTES {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "a stop request needs no body\n",
                );
            }
            if state.flag.request(StopSource::Http) {
                tracing::info!(%peer, "stop requested over HTTP");
            }
            text(StatusCode::ACCEPTED, "draining\n")
        }
        "/healthz" if get(req.method()) => text(StatusCode::OK, "ok\n"),
        "/readyz" if get(req.method()) => {
            if state.flag.is_set() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !state.workers_up.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "workers starting\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" if get(req.method()) => {
            let mut r = Response::new(Full::new(Bytes::from((state.metrics)())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" | "/readyz" | "/metrics" => method_not_allowed("GET, HEAD"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// None when the caller may stop; else the refusal.
fn authorize(
    state: &AdminState,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Option<Response<Full<Bytes>>> {
    match &state.token {
        Some(token) => {
            let given = req
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.as_bytes())
                .and_then(|v| {
                    // The scheme name is case-insensitive (RFC 9110 11.1).
                    let (scheme, rest) = v.split_at_checked(7)?;
                    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
                })
                .unwrap_or(b"");
            if bool::from(given.ct_eq(token.as_slice())) {
                None
            } else {
                let mut r = text(
                    StatusCode::UNAUTHORIZED,
                    "a valid bearer token is required\n",
                );
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(r)
            }
        }
        None if is_loopback(peer.ip()) => None,
        None => Some(text(
            StatusCode::FORBIDDEN,
            "stop requests are only permitted from localhost unless --admin-token-file is set\n",
        )),
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

fn text(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_includes_v4_mapped() {
        assert!(is_loopback("127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
    }
}
