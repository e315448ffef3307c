//! The admin server (default `0.0.0.0:8001`), served by the supervisor.
//!
//! | endpoint | methods | answer |
//! |---|---|---|
//! | `/admin/stop` | POST | 202, drain begins (again: 202, nothing new); 405 otherwise; 401 without the configured bearer token; 403 for a caller other than the pod itself when no token is configured |
//! | `/healthz` | GET, HEAD | 200 while the supervisor lives, draining included |
//! | `/readyz` | GET, HEAD | 200 when every worker is up and nothing drains; 503 otherwise |
//! | `/metrics` | GET, HEAD | Prometheus text format |
//!
//! [`route`] is the whole request handling, a function of the request, the
//! peer and the state: no socket, so the unit tests and the fuzz target call
//! it directly. This module never starts or stops a worker itself: it sets
//! the stop flag.
//!
//! # Staying available under abuse
//! The port answers the kubelet's probes, so whoever can connect to it (the
//! chart's Service exposes it to every pod of the cluster) must not be able
//! to starve it. Idle connections, slowloris headers and keep-alive
//! connections that never send again all cost the same: one open
//! connection. So:
//! - accepting never waits for a free slot: a cap that blocks `accept`
//!   leaves the legitimate probe in the kernel's queue behind the attacker;
//! - at most [`MAX_CONNECTIONS`] are open; a new connection beyond it
//!   closes the **oldest** one. A probe sends its request as it connects
//!   and is answered in microseconds, so it is never the oldest for long;
//!   an attacker's connections evict each other;
//! - out of file descriptors (`EMFILE`), the oldest connection is closed
//!   too, so that the one waiting in the accept queue gets its descriptor;
//! - request headers must arrive within [`HEADER_READ_TIMEOUT`] and fit in
//!   [`MAX_HEADER_BYTES`]; no body is ever read (a stop request announcing
//!   more than [`MAX_BODY_BYTES`] is refused);
//! - the accept queue is [`LISTEN_BACKLOG`] deep (capped by somaxconn), so
//!   a burst of connects is not dropped while the loop catches up.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::logging::Throttle;
use crate::stop::{StopFlag, StopSource};

/// Time a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest body a stop request may announce.
pub const MAX_BODY_BYTES: u64 = 1024;
/// Connections open at once; one more closes the oldest.
pub const MAX_CONNECTIONS: usize = 512;
/// `listen(2)` backlog of the admin port.
pub const LISTEN_BACKLOG: i32 = 1024;
/// Largest admin token file.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// Admin connections closed to make room for a new one.
static EVICTED: AtomicU64 = AtomicU64::new(0);
/// Failed accepts on the admin port.
static ACCEPT_ERRORS: AtomicU64 = AtomicU64::new(0);

/// (connections evicted, failed accepts) since start, for the metrics:
/// `drover_admin_connections_evicted_total`, `drover_admin_accept_errors_total`.
pub fn counters() -> (u64, u64) {
    (
        EVICTED.load(Ordering::Relaxed),
        ACCEPT_ERRORS.load(Ordering::Relaxed),
    )
}

/// What the admin endpoints read.
pub struct AdminState {
    /// The pod's stop flag.
    pub flag: StopFlag,
    /// Whether every worker is up (the supervisor keeps it current).
    pub workers_up: Arc<AtomicBool>,
    /// The bearer token, if `--admin-token-file` was given.
    pub token: Option<Token>,
    /// Renders `/metrics`.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
}

/// The admin bearer token: read from `--admin-token-file` at start and
/// again whenever the file changes (a Secret volume's `..data` swap, or a
/// rewrite), so that a rotated Secret takes effect without a restart.
/// Cheap to clone; every clone sees the current token.
#[derive(Clone)]
pub struct Token {
    path: Option<PathBuf>,
    current: Arc<RwLock<Vec<u8>>>,
    watching: Arc<std::sync::Once>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Token").field("path", &self.path).finish()
    }
}

impl Token {
    /// Reads the token file; a missing, unreadable, oversized, non-regular
    /// or empty file is a configuration error.
    pub fn load(path: &Path) -> Result<Token> {
        let token = read_token(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Config(format!("admin token file {} is empty", path.display()))
            } else {
                Error::ReadFile {
                    what: "admin token file",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Ok(Token {
            path: Some(path.to_path_buf()),
            current: Arc::new(RwLock::new(token)),
            watching: Arc::new(std::sync::Once::new()),
        })
    }

    /// A fixed token (tests, fuzzing).
    pub fn fixed(token: &[u8]) -> Token {
        Token {
            path: None,
            current: Arc::new(RwLock::new(token.to_vec())),
            watching: Arc::new(std::sync::Once::new()),
        }
    }

    /// Whether `given` is the current token (constant time).
    pub fn matches(&self, given: &[u8]) -> bool {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        bool::from(given.ct_eq(current.as_slice()))
    }

    /// Starts re-reading the file when it changes (once; later calls do
    /// nothing). A change that cannot be read, or is empty, is logged and
    /// the current token stays in force.
    pub fn watch(&self) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let current = self.current.clone();
        self.watching.call_once(move || {
            let initial = Ok(current.read().unwrap_or_else(|e| e.into_inner()).clone());
            let shown = path.display().to_string();
            crate::contexts::file::watch_file(
                path,
                "admin token file",
                initial,
                |p: &Path| read_token(p),
                move |got| {
                    match got {
                        Ok(t) => {
                            *current.write().unwrap_or_else(|e| e.into_inner()) = t;
                            tracing::info!("admin token file {shown} changed: the new token is in force");
                        }
                        Err(e) => tracing::error!(
                            "cannot read the changed admin token file {shown}: {e}; the current token stays in force"
                        ),
                    }
                    true
                },
                || true,
            );
        });
    }
}

/// The token in `path`: its content without surrounding whitespace (an
/// empty one is an `UnexpectedEof` error).
fn read_token(path: &Path) -> std::io::Result<Vec<u8>> {
    let raw = crate::contexts::file::read_regular(path, MAX_TOKEN_BYTES)?;
    let token = raw.trim_ascii().to_vec();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file is empty",
        ));
    }
    Ok(token)
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
        source: None,
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
    socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| fail(e.to_string()))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    TcpListener::from_std(socket.into()).map_err(|e| fail(e.to_string()))
}

/// The open connections, oldest first, each with the sender whose drop
/// closes it.
#[derive(Default)]
struct Connections {
    next: u64,
    open: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Connections {
    /// Registers a new connection, closing the oldest ones beyond the cap;
    /// returns its key and how many were closed.
    fn insert(&mut self, close: oneshot::Sender<()>) -> (u64, usize) {
        let mut evicted = 0;
        while self.open.len() >= MAX_CONNECTIONS {
            self.open.pop_first();
            evicted += 1;
        }
        let key = self.next;
        self.next += 1;
        self.open.insert(key, close);
        (key, evicted)
    }

    /// Closes the oldest connection; false if there is none.
    fn evict_oldest(&mut self) -> bool {
        self.open.pop_first().is_some()
    }
}

/// Serves the admin endpoints until the process exits; starts the token
/// file's watch.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    if let Some(t) = &state.token {
        t.watch();
    }
    let conns = Arc::new(Mutex::new(Connections::default()));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let mut accept_failures = Throttle::default();
    let mut evictions = Throttle::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                let freed = out_of_fds && conns.lock().expect("not poisoned").evict_oldest();
                ACCEPT_ERRORS.fetch_add(1, Ordering::Relaxed);
                EVICTED.fetch_add(u64::from(freed), Ordering::Relaxed);
                if let Some(n) = accept_failures.hit() {
                    tracing::warn!(
                        error = %e,
                        count = n,
                        "admin accept failed ({n} times since the last report){}",
                        if freed { "; closing the oldest admin connection" } else { "" }
                    );
                }
                if freed {
                    // Let the evicted connection's task run and close it.
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
        };
        let (close_tx, close_rx) = oneshot::channel();
        let (key, evicted) = conns.lock().expect("not poisoned").insert(close_tx);
        if evicted > 0 {
            EVICTED.fetch_add(evicted as u64, Ordering::Relaxed);
            if let Some(n) = evictions.hit() {
                tracing::warn!(
                    count = n,
                    "{MAX_CONNECTIONS} admin connections open: closed the oldest ({n} since the last report)"
                );
            }
        }
        let state = state.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let resp = route(&state, peer, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            }),
        );
        let conns = conns.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                // Evicted: the sender was dropped.
                _ = close_rx => {}
            }
            conns.lock().expect("not poisoned").open.remove(&key);
        });
    }
}

/// Answers one admin request from `peer`. Reads the headers only, never the
/// body; the only effect is setting the stop flag.
pub fn route<B>(state: &AdminState, peer: SocketAddr, req: &Request<B>) -> Response<Full<Bytes>> {
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
fn authorize<B>(
    state: &AdminState,
    peer: SocketAddr,
    req: &Request<B>,
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
            if token.matches(given) {
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
        None if is_pod_itself(peer.ip()) => None,
        None => Some(text(
            StatusCode::FORBIDDEN,
            "stop requests are only permitted from the pod itself (127.0.0.1, ::1) unless --admin-token-file is set\n",
        )),
    }
}

/// Whether `ip` is the pod itself: exactly 127.0.0.1, ::1, or
/// ::ffff:127.0.0.1. Not the rest of 127.0.0.0/8: a service mesh's sidecar
/// (Istio) delivers inbound traffic from 127.0.0.6, so any mesh client
/// would count as local.
fn is_pod_itself(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped() == Some(Ipv4Addr::LOCALHOST)
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

    fn state(token: Option<&[u8]>) -> AdminState {
        AdminState {
            flag: StopFlag::new(),
            workers_up: Arc::new(AtomicBool::new(true)),
            token: token.map(Token::fixed),
            metrics: Box::new(|| "drover_draining 0\n".to_string()),
        }
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const LOCAL: &str = "127.0.0.1:40000";
    const REMOTE: &str = "10.1.2.3:40000";
    const MESH: &str = "127.0.0.6:40000";

    fn call(s: &AdminState, peer: &str, method: &str, path: &str, h: &[(&str, &str)]) -> u16 {
        route(s, peer.parse().unwrap(), &req(method, path, h))
            .status()
            .as_u16()
    }

    #[test]
    fn the_pod_itself_is_exactly_one_address_per_family() {
        assert!(is_pod_itself("127.0.0.1".parse().unwrap()));
        assert!(is_pod_itself("::1".parse().unwrap()));
        assert!(is_pod_itself("::ffff:127.0.0.1".parse().unwrap()));
        for other in [
            "127.0.0.6",
            "127.1.2.3",
            "::ffff:127.0.0.6",
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
            "::",
        ] {
            assert!(!is_pod_itself(other.parse().unwrap()), "{other}");
        }
    }

    #[test]
    fn probes_answer_get_and_head_and_refuse_other_methods_with_allow() {
        let s = state(None);
        for path in ["/healthz", "/readyz", "/metrics"] {
            for m in ["GET", "HEAD"] {
                assert_eq!(call(&s, REMOTE, m, path, &[]), 200, "{m} {path}");
            }
            for m in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
                let r = route(&s, REMOTE.parse().unwrap(), &req(m, path, &[]));
                assert_eq!(r.status(), 405, "{m} {path}");
                assert_eq!(r.headers()[ALLOW], "GET, HEAD");
            }
        }
        assert!(!s.flag.is_set());
    }

    #[test]
    fn metrics_is_the_prometheus_text_format() {
        let s = state(None);
        let r = route(&s, REMOTE.parse().unwrap(), &req("GET", "/metrics", &[]));
        assert!(r.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
    }

    #[test]
    fn readyz_follows_the_workers_and_the_drain_healthz_does_not() {
        let s = state(None);
        s.workers_up.store(false, Ordering::Release);
        assert_eq!(call(&s, REMOTE, "GET", "/readyz", &[]), 503);
        s.workers_up.store(true, Ordering::Release);
        assert_eq!(call(&s, REMOTE, "GET", "/readyz", &[]), 200);
        s.flag.request(StopSource::Signal);
        assert_eq!(call(&s, REMOTE, "GET", "/readyz", &[]), 503);
        assert_eq!(call(&s, REMOTE, "GET", "/healthz", &[]), 200);
    }

    #[test]
    fn unknown_paths_are_404_and_query_strings_do_not_matter() {
        let s = state(None);
        for p in [
            "/",
            "/admin",
            "/admin/stop/",
            "/healthz/x",
            "/HEALTHZ",
            "//healthz",
            "/admin/../healthz",
        ] {
            assert_eq!(call(&s, LOCAL, "GET", p, &[]), 404, "{p}");
        }
        assert_eq!(call(&s, LOCAL, "GET", "/healthz?x=1", &[]), 200);
        assert_eq!(call(&s, LOCAL, "POST", "/admin/stop/", &[]), 404);
        assert!(!s.flag.is_set());
    }

    #[test]
    fn stop_is_post_only() {
        let s = state(None);
        for m in ["GET", "HEAD", "PUT", "DELETE"] {
            let r = route(&s, LOCAL.parse().unwrap(), &req(m, "/admin/stop", &[]));
            assert_eq!(r.status(), 405, "{m}");
            assert_eq!(r.headers()[ALLOW], "POST");
        }
        assert!(!s.flag.is_set());
    }

    #[test]
    fn without_a_token_only_the_pod_itself_may_stop() {
        for peer in [REMOTE, MESH, "[::ffff:127.0.0.6]:1", "[fe80::1]:1"] {
            let s = state(None);
            assert_eq!(call(&s, peer, "POST", "/admin/stop", &[]), 403, "{peer}");
            assert!(!s.flag.is_set(), "{peer}");
        }
        for peer in [LOCAL, "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            let s = state(None);
            assert_eq!(call(&s, peer, "POST", "/admin/stop", &[]), 202, "{peer}");
            assert!(s.flag.is_set(), "{peer}");
            // Again: 202, nothing new.
            assert_eq!(call(&s, peer, "POST", "/admin/stop", &[]), 202, "{peer}");
            assert_eq!(s.flag.requests(StopSource::Http), 2);
        }
    }

    #[test]
    fn with_a_token_everyone_needs_it_loopback_included() {
        let s = state(Some(b"s3cret"));
        for (peer, auth) in [
            (LOCAL, None),
            (LOCAL, Some("Bearer wrong")),
            (REMOTE, Some("Bearer s3cre")),
            (REMOTE, Some("Bearer s3cret2")),
            (REMOTE, Some("Basic s3cret")),
            (REMOTE, Some("Bearer")),
            (REMOTE, Some("s3cret")),
            (MESH, Some("Bearer  s3cret")),
        ] {
            let h: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
            let r = route(&s, peer.parse().unwrap(), &req("POST", "/admin/stop", &h));
            assert_eq!(r.status(), 401, "{peer} {auth:?}");
            assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer");
            assert!(!s.flag.is_set());
        }
        for auth in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
            assert_eq!(
                call(
                    &s,
                    REMOTE,
                    "POST",
                    "/admin/stop",
                    &[("authorization", auth)]
                ),
                202
            );
        }
        assert!(s.flag.is_set());
    }

    #[test]
    fn a_stop_announcing_a_body_is_refused_before_stopping() {
        let s = state(None);
        let h = [("content-length", "1025")];
        assert_eq!(call(&s, LOCAL, "POST", "/admin/stop", &h), 413);
        assert!(!s.flag.is_set());
        let h = [("content-length", "1024")];
        assert_eq!(call(&s, LOCAL, "POST", "/admin/stop", &h), 202);
        // Unauthorized callers learn nothing about the body limit.
        let s = state(None);
        assert_eq!(
            call(
                &s,
                REMOTE,
                "POST",
                "/admin/stop",
                &[("content-length", "99999")]
            ),
            403
        );
    }

    #[test]
    fn a_new_connection_beyond_the_cap_closes_the_oldest() {
        let mut c = Connections::default();
        let mut receivers = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (tx, rx) = oneshot::channel();
            assert_eq!(c.insert(tx).1, 0);
            receivers.push(rx);
        }
        let (tx, mut newest) = oneshot::channel();
        let (key, evicted) = c.insert(tx);
        assert_eq!((key, evicted), (MAX_CONNECTIONS as u64, 1));
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        // The oldest was told to close (its sender dropped), the next was not.
        assert!(matches!(
            receivers[0].try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            receivers[1].try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert!(matches!(
            newest.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert!(c.evict_oldest());
        assert!(matches!(
            receivers[1].try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    #[test]
    fn a_token_file_is_trimmed_and_an_empty_one_is_refused() {
        let d = std::env::temp_dir().join(format!("drover-unit-token-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("token");
        std::fs::write(&p, "  abc\n").unwrap();
        let t = Token::load(&p).unwrap();
        assert!(t.matches(b"abc") && !t.matches(b"abc\n"));
        assert!(!format!("{t:?}").contains("abc"));
        std::fs::write(&p, "\n").unwrap();
        let e = Token::load(&p).unwrap_err();
        assert!(e.to_string().contains("is empty"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::CONFIG);
        let _ = std::fs::remove_dir_all(&d);
    }
}
