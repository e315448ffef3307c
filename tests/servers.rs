//! Real servers behind drover (issue 11; the README's "Real servers behind
//! drover" table): each one is started the way the table says, as
//! `drover --workers 2 -- <cmd>` with the default `--worker-ready auto`.
//!
//! For each server: it comes up (the test checks *how*: `READY=1` on
//! `$NOTIFY_SOCKET`, or seen accepting), it serves, and a SIGTERM drain with
//! one slow request in flight completes that request, or, for the servers
//! that cannot (daphne; stdlib `http.server` and waitress without a handler
//! for the stop signal), the documented failure is asserted. Then a SIGHUP
//! under steady load with an app that takes 2 s to boot, for gunicorn,
//! uvicorn, hypercorn and puma: no failed request, max latency < 100 ms, and
//! the roll takes about N × 2 s. And `--worker-ready notify` with puma and
//! with a Python sd_notify client (PyPI `sdnotify`).
//!
//! Everything comes from `tests/run`: the Python servers in the venv
//! (`DROVER_TEST_VENV`, default `target/test-venv`), Debian's `puma` and
//! `ruby-sd-notify`, and `node`. A missing one fails the test and says so.
//! Every wait is bounded; [`Service`] kills the whole process tree when a
//! test ends, even half-way.

mod common;
use common::*;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IO_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn venv() -> PathBuf {
    test_venv(&["python"])
}

/// A program from the venv (`gunicorn`, `uvicorn`, `python`, ...).
fn venv_bin(name: &str) -> String {
    let p = venv().join("bin").join(name);
    assert!(p.exists(), "{} is missing: run tests/run", p.display());
    p.display().to_string()
}

/// A program from the system (`puma`, `node`), which tests/run installs.
fn system_bin(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
        .unwrap_or_default();
    found
        .unwrap_or_else(|| panic!("`{name}` is not on PATH: run tests/run, which installs it"))
        .display()
        .to_string()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn servers_dir() -> String {
    fixtures().join("servers").display().to_string()
}

fn fixture(name: &str) -> String {
    fixtures().join("servers").join(name).display().to_string()
}

/// `PYTHONPATH` for the fixture apps (`slowboot`, `asgi_app`, `wsgi_app`).
fn pythonpath() -> String {
    format!("{}:{}", servers_dir(), fixtures().display())
}

/// A running drover whose whole process tree is SIGKILLed when dropped.
struct Service(Drover);

impl Deref for Service {
    type Target = Drover;
    fn deref(&self) -> &Drover {
        &self.0
    }
}

impl DerefMut for Service {
    fn deref_mut(&mut self) -> &mut Drover {
        &mut self.0
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let tree = descendants(self.0.pid);
        if self.0.try_status().is_none() {
            self.0.signal(libc::SIGKILL);
        }
        for p in tree {
            // SAFETY: kill(2) on a descendant of this test's own drover.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
    }
}

fn all_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in all_children(p) {
            if !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// drover `opts -- cmd` with `env`, on free loopback ports.
fn run(opts: &[&str], cmd: &[String], env: &[(&str, &str)]) -> Service {
    let mut all: Vec<&str> = opts.to_vec();
    all.push("--");
    all.extend(cmd.iter().map(String::as_str));
    let pp = pythonpath();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("PYTHONPATH", pp.as_str()));
    Service(start_with(bin(), &all, &env))
}

fn request(addr: SocketAddr, path: &str) -> io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(IO_LIMIT))?;
    s.set_write_timeout(Some(IO_LIMIT))?;
    exchange(&mut s, "GET", path, &[], IO_LIMIT)
}

fn log_count(d: &Drover, prefix: &str) -> usize {
    d.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .count()
}

fn wait_for(d: &Drover, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    assert!(eventually(limit, &mut cond), "{what}:\n{}", d.log_text());
}

fn measure(what: &str, value: impl std::fmt::Debug) {
    eprintln!("[measure] {what}: {value:?}");
}

/// The listening socket on `port`: its accept queue length.
fn accept_queue(port: u16) -> Option<u64> {
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let c: Vec<&str> = line.split_whitespace().collect();
            if c.len() < 10 || c[3] != "0A" {
                continue;
            }
            let local = c[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local == Some(port) {
                return c[4]
                    .split(':')
                    .nth(1)
                    .and_then(|q| u64::from_str_radix(q, 16).ok());
            }
        }
    }
    None
}

/// One `GET /sleep?ms=N` in a thread; returns once it is written and the
/// accept queue is empty (an app process has it), plus a moment for the app
/// to hand it to a handler.
fn slow_request(addr: SocketAddr, ms: u64) -> JoinHandle<io::Result<Resp>> {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(IO_LIMIT))?;
        s.set_write_timeout(Some(IO_LIMIT))?;
        s.write_all(
            format!("GET /sleep?ms={ms} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        let _ = tx.send(());
        read_response(&mut s)
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the slow request was not sent");
    let mut q = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            q = accept_queue(addr.port());
            q == Some(0)
        }),
        "the app never accepted the slow request (accept queue {q:?})"
    );
    std::thread::sleep(Duration::from_millis(300));
    h
}

/// How a worker came up under `--worker-ready auto`.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Up {
    /// It says `READY=1` on `$NOTIFY_SOCKET` (under `auto` drover then also
    /// waits to see it accepting).
    Notify,
    /// Seen accepting on the shared socket (/proc), without READY=1.
    Accepting,
    /// Either (puma accepts a moment before it says READY=1).
    Either,
}

/// Waits until `/readyz` is 200 (at most `limit`), and checks that every
/// worker came up the way `how` says, and none the other way.
fn ready_by(d: &Drover, how: Up, workers: usize, limit: Duration) {
    wait_for(d, "never ready", limit, || {
        http(d.admin, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200)
    });
    // drover's log is read by a thread: it may lag behind /readyz.
    let counts = || {
        let notified = log_count(d, "worker reported READY=1");
        let accepting = log_count(d, "worker is accepting: up");
        match how {
            Up::Notify => (notified, 0, notified, accepting),
            Up::Accepting => (accepting, notified, notified, accepting),
            Up::Either => (notified.max(accepting), 0, notified, accepting),
        }
    };
    eventually(Duration::from_secs(3), || counts().0 >= workers);
    let (want, other, notified, accepting) = counts();
    assert!(
        want >= workers && other == 0,
        "expected {workers} workers up by {how:?}; READY=1: {notified}, accepting: {accepting}\n{}",
        d.log_text()
    );
}

/// `GET /` answers 200 JSON with a pid.
fn serves(d: &Drover) -> serde_json::Value {
    let r = request(d.app(), "/").unwrap_or_else(|e| panic!("GET /: {e}\n{}", d.log_text()));
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert!(v["pid"].as_u64().is_some(), "{v}");
    v
}

/// What a SIGTERM drain with one 1.5 s request in flight gave: the slow
/// request's answer, drover's exit code, and how long the drain took.
struct Drain {
    slow: io::Result<Resp>,
    code: Option<i32>,
    took: Duration,
}

fn drain_with_one_slow_request(d: &mut Service) -> Drain {
    let tree = descendants(d.pid);
    let slow = slow_request(d.app(), 1500);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let slow = slow.join().unwrap();
    let code = d.wait_exit(Duration::from_secs(15)).code();
    let took = t0.elapsed();
    let left: Vec<_> = tree.iter().filter(|&&p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "outlived drover: {left:?}\n{}",
        d.log_text()
    );
    Drain { slow, code, took }
}

/// The drain lost nothing: the slow request answered 200 and drover exited 0.
fn assert_clean_drain(d: &Drover, dr: &Drain, name: &str) {
    let r = dr.slow.as_ref().unwrap_or_else(|e| {
        panic!(
            "{name}: the in-flight request failed: {e}\n{}",
            d.log_text()
        )
    });
    assert_eq!(r.status, 200, "{name}: {r:?}");
    assert!(r.body.contains("1500"), "{name}: {r:?}");
    assert_eq!(dr.code, Some(0), "{name}:\n{}", d.log_text());
    measure(
        &format!("{name}: SIGTERM → drover exit, 1.5 s request in flight"),
        dr.took,
    );
}

/// The drain cut the request in flight and drover says the app lost it:
/// exit 1 and the "killed by --stop-signal" error.
fn assert_killed_by_stop_signal(d: &Drover, dr: &Drain, name: &str) {
    assert!(
        dr.slow.as_ref().map_or(true, |r| r.status != 200),
        "{name}: the in-flight request was answered: {:?}",
        dr.slow
    );
    assert_eq!(dr.code, Some(1), "{name}:\n{}", d.log_text());
    assert!(
        eventually(Duration::from_secs(3), || d
            .log_contains("worker was killed by --stop-signal")),
        "{name}: no 'killed by --stop-signal' error:\n{}",
        d.log_text()
    );
}

// ------------------------------------------------------- the server commands

fn gunicorn(app: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        venv_bin("gunicorn"),
        "--workers".into(),
        "1".into(),
        "--no-control-socket".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(app.into());
    v
}

fn uvicorn(app: &str) -> Vec<String> {
    [&venv_bin("uvicorn"), "--fd", "3", "--no-access-log", app]
        .map(String::from)
        .to_vec()
}

fn hypercorn(app: &str) -> Vec<String> {
    [&venv_bin("hypercorn"), "--bind", "fd://3", app]
        .map(String::from)
        .to_vec()
}

fn puma(extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        system_bin("puma"),
        "--bind-to-activated-sockets".into(),
        "only".into(),
        "--config".into(),
        fixture("puma.rb"),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(fixture("config.ru"));
    v
}

fn python(script: &str, extra: &[&str]) -> Vec<String> {
    let mut v = vec![venv_bin("python"), fixture(script)];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn node(extra: &[&str]) -> Vec<String> {
    let mut v = vec![system_bin("node"), fixture("node_server.js")];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

const TWO: [&str; 4] = ["--workers", "2", "--graceful-timeout", "10s"];
const BOOT: Duration = Duration::from_secs(20);

// ------------------------------------------------- serve, then drain: each

/// gunicorn (no `--bind`: it takes fd 3 from LISTEN_FDS) says READY=1;
/// TERM is its graceful stop.
#[test]
fn gunicorn_serves_and_drains() {
    let mut d = run(&TWO, &gunicorn("slowboot:wsgi", &[]), &[]);
    ready_by(&d, Up::Notify, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "gunicorn");
}

/// uvicorn `--fd 3` does not speak sd_notify: up once seen accepting
/// (its asyncio loop's epoll); TERM is its graceful stop.
#[test]
fn uvicorn_serves_and_drains() {
    let mut d = run(&TWO, &uvicorn("slowboot:asgi"), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "uvicorn");
}

/// hypercorn `--bind fd://3`: its (default single) worker is a spawned
/// child that accepts; seen accepting; TERM is graceful (for at most its
/// own `--graceful-timeout`, 3 s by default).
#[test]
fn hypercorn_serves_and_drains() {
    let mut d = run(&TWO, &hypercorn("slowboot:asgi"), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "hypercorn");
}

/// aiohttp: `web.run_app(app, sock=socket.socket(fileno=3))`; seen
/// accepting; run_app's TERM handling waits for the handler in flight.
#[test]
fn aiohttp_serves_and_drains() {
    let mut d = run(&TWO, &python("aiohttp_app.py", &[]), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "aiohttp");
}

/// puma `--bind-to-activated-sockets only`, with Debian's ruby-sd-notify:
/// it says READY=1 once booted (its server thread accepts a moment before,
/// so drover may see either first); TERM is its graceful stop (with
/// `raise_exception_on_sigterm false` it then exits 0).
#[test]
fn puma_serves_and_drains() {
    let mut d = run(&TWO, &puma(&[]), &[]);
    ready_by(&d, Up::Either, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "puma");
}

/// Python's stdlib `http.server` with a TERM handler (shutdown, then
/// server_close joins the request threads): seen accepting (blocked in poll
/// on the socket); the drain completes the request in flight.
#[test]
fn stdlib_http_server_with_a_term_handler_serves_and_drains() {
    let mut d = run(&TWO, &python("stdlib_server.py", &["--term-handler"]), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "stdlib http.server (TERM handler)");
}

/// Without a handler, TERM kills the stdlib server with its request in
/// flight: drover says the app lost it and exits 1.
#[test]
fn stdlib_http_server_without_a_term_handler_loses_the_request_and_drover_says_so() {
    let mut d = run(&TWO, &python("stdlib_server.py", &[]), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_killed_by_stop_signal(&d, &dr, "stdlib http.server (no handler)");
}

/// waitress has no handler for TERM (killed: drover says so, exit 1) but
/// stops on INT: `--stop-signal INT` drains the request in flight.
#[test]
fn waitress_needs_stop_signal_int() {
    let mut d = run(&TWO, &python("waitress_app.py", &[]), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_killed_by_stop_signal(&d, &dr, "waitress, --stop-signal TERM");
    drop(d);

    let mut opts = TWO.to_vec();
    opts.extend(["--stop-signal", "INT"]);
    let mut d = run(&opts, &python("waitress_app.py", &[]), &[]);
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert_clean_drain(&d, &dr, "waitress, --stop-signal INT");
}

/// daphne `--fd 3`: seen accepting; on TERM it stops its reactor and aborts
/// the request in flight ("Killed 1 pending application instances"), then
/// exits 0: the client gets no answer although drover exits 0 — the app,
/// not drover, dropped it, and nothing tells drover so.
#[test]
fn daphne_aborts_the_request_in_flight_on_term() {
    let mut d = run(
        &TWO,
        &[
            venv_bin("daphne"),
            "--fd".into(),
            "3".into(),
            "slowboot:asgi".into(),
        ],
        &[],
    );
    ready_by(&d, Up::Accepting, 2, BOOT);
    serves(&d);
    let dr = drain_with_one_slow_request(&mut d);
    assert!(
        dr.slow.as_ref().map_or(true, |r| r.status != 200),
        "daphne answered the request in flight: {:?}",
        dr.slow
    );
    assert!(
        d.log_contains("Killed 1 pending application instances"),
        "{}",
        d.log_text()
    );
    measure(
        "daphne: SIGTERM drain, in-flight request",
        dr.slow.map(|r| r.status).map_err(|e| e.to_string()),
    );
    measure("daphne: drover exit code", dr.code);
}

/// Node's `http` on `server.listen({fd: 3})`: seen accepting (libuv's
/// epoll). A keep-alive client whose request is in flight at TERM:
/// - `--naive` (`server.close()` only): the answer says `keep-alive`, the
///   connection stays open, so the server never finishes closing: drover
///   kills it at `--graceful-timeout` and exits 1;
/// - the fixture's handler (answers in flight get `Connection: close`, idle
///   connections are closed): the connection ends after that answer and the
///   drain is clean.
#[test]
fn node_http_needs_connection_close_on_in_flight_keep_alive_requests() {
    for naive in [true, false] {
        let opts = ["--workers", "2", "--graceful-timeout", "3s"];
        let mut d = run(&opts, &node(if naive { &["--naive"] } else { &[] }), &[]);
        ready_by(&d, Up::Accepting, 2, BOOT);
        serves(&d);
        let addr = d.app();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_LIMIT)).unwrap();
        s.write_all(b"GET /sleep?ms=1000 HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        assert!(eventually(Duration::from_secs(5), || accept_queue(
            addr.port()
        ) == Some(0)));
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        d.signal(libc::SIGTERM);
        let r = read_one_response(&mut s).expect("the in-flight keep-alive request");
        assert_eq!(r.status, 200, "{r:?}");
        let st = d.wait_exit(Duration::from_secs(10));
        let took = t0.elapsed();
        let close = r.header("connection").map(str::to_ascii_lowercase);
        if naive {
            assert_eq!(close.as_deref(), Some("keep-alive"), "{r:?}");
            assert_eq!(st.code(), Some(1), "{}", d.log_text());
            assert!(took >= Duration::from_secs(3), "{took:?}");
        } else {
            assert_eq!(close.as_deref(), Some("close"), "{r:?}");
            assert_eq!(st.code(), Some(0), "{}", d.log_text());
            assert!(took < Duration::from_secs(3), "{took:?}");
        }
        measure(
            &format!(
                "node ({}): SIGTERM → exit",
                if naive { "naive close()" } else { "handler" }
            ),
            (took, st.code()),
        );
    }
}

/// One response on a keep-alive connection (Content-Length bodies).
fn read_one_response(s: &mut TcpStream) -> io::Result<Resp> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return parse_response(&buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                return parse_response(&buf);
            }
        }
    }
}

// ----------------------------------------- --worker-ready notify: both clients

/// puma (Ruby's sd_notify takes NOTIFY_SOCKET as a path) comes up with
/// `--worker-ready notify`.
#[test]
fn puma_comes_up_with_worker_ready_notify() {
    let mut d = run(
        &["--workers", "2", "--worker-ready", "notify"],
        &puma(&[]),
        &[],
    );
    ready_by(&d, Up::Notify, 2, BOOT);
    serves(&d);
    d.signal(libc::SIGTERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

/// A Python app that says READY=1 through PyPI's `sdnotify` comes up with
/// `--worker-ready notify` (and is up by READY=1 under `auto` too).
#[test]
fn python_sdnotify_client_comes_up_with_worker_ready_notify() {
    for ready in ["notify", "auto"] {
        let mut d = run(
            &["--workers", "2", "--worker-ready", ready],
            &python("stdlib_server.py", &["--term-handler", "--sdnotify"]),
            &[],
        );
        ready_by(&d, Up::Notify, 2, BOOT);
        serves(&d);
        d.signal(libc::SIGTERM);
        assert_eq!(
            d.wait_exit(Duration::from_secs(10)).code(),
            Some(0),
            "{}",
            d.log_text()
        );
    }
}

// ------------------------------------- HUP under load, 2 s boot: each server

/// One answer's latency, and what went wrong if it was not a 200.
type Answer = (Duration, Option<String>);

/// Steady load: `GET /` on a new connection every 10 ms from 2 threads,
/// each answer's latency kept (as tests/rolls.rs).
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Answer>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..2)
            .map(|_| {
                let (stop, results) = (stop.clone(), results.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let t0 = Instant::now();
                        let err = match request(addr, "/") {
                            Ok(r) if r.status == 200 => None,
                            Ok(r) => Some(format!("status {}", r.status)),
                            Err(e) => Some(e.to_string()),
                        };
                        results.lock().unwrap().push((t0.elapsed(), err));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Load {
            stop,
            results,
            threads,
        }
    }

    /// (answers, failures, max latency).
    fn finish(self) -> (usize, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let r = self.results.lock().unwrap();
        let failed = r.iter().filter_map(|(_, e)| e.clone()).collect();
        let max = r.iter().map(|(l, _)| *l).max().unwrap_or_default();
        (r.len(), failed, max)
    }
}

/// The HUP tests measure latency: one at a time, so that they do not slow
/// each other down on a small machine.
static ONE_ROLL_AT_A_TIME: Mutex<()> = Mutex::new(());

/// SIGHUP under steady load with 2 workers of an app that takes 2 s to
/// boot: 0 failed requests, max latency < 100 ms, and the roll takes about
/// 2 × 2 s (one worker at a time, each retired once its replacement is up).
///
/// `closed_unanswered`: how many requests the server may close unanswered
/// (the connection closed or reset before any response: hypercorn and
/// uvicorn, see their tests).
fn hup_under_load(name: &str, cmd: &[String], how: Up, closed_unanswered: usize) {
    let _one = ONE_ROLL_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = run(&["--workers", "2"], cmd, &[("BOOT_SECONDS", "2")]);
    ready_by(&d, how, 2, BOOT);
    // Up is not yet serving for an app that says READY=1 too early.
    serves(&d);
    serves(&d);
    let load = Load::start(d.app());
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    d.signal(libc::SIGHUP);
    wait_for(
        &d,
        "the roll did not finish",
        Duration::from_secs(20),
        || log_count(&d, "rolling restart done") == 1,
    );
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (n, failed, max) = load.finish();
    measure(
        &format!("{name}: HUP, 2 s boot: roll time / requests / failed / max latency"),
        (took, n, failed.len(), max),
    );
    // Closed with no answer: EOF, or a reset when the request's bytes had
    // arrived unread (the kernel answers a close with unread data by RST).
    let unanswered = failed
        .iter()
        .filter(|e| {
            e.as_str() == "incomplete response: \"\"" || e.starts_with("Connection reset by peer")
        })
        .count();
    assert!(
        failed.len() == unanswered && unanswered <= closed_unanswered,
        "{name}: requests failed: {failed:?}\n{}",
        d.log_text()
    );
    assert!(
        max < Duration::from_millis(100),
        "{name}: max latency {max:?}:\n{}",
        d.log_text()
    );
    assert!(
        took >= Duration::from_millis(3800) && took < Duration::from_secs(12),
        "{name}: the roll took {took:?}, not about 2 × 2 s:\n{}",
        d.log_text()
    );
    assert!(n >= 100, "{name}: too few requests to mean anything: {n}");
    d.signal(libc::SIGTERM);
    assert_eq!(
        d.wait_exit(Duration::from_secs(15)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

/// uvicorn's graceful stop closes the connections it holds with no request
/// cycle yet (`H11Protocol.shutdown`: `cycle is None`), a just-accepted one
/// included: the same race as hypercorn's, rarer (one failed request in 9
/// rolls of bench/rolls.py, one in 13 runs of this test: "Connection reset
/// by peer", the request's bytes having arrived unread; uvicorn's own
/// `--workers` HUP retires workers with the same TERM). Allowed as for
/// hypercorn.
#[test]
fn hup_under_load_uvicorn_slow_boot() {
    hup_under_load("uvicorn", &uvicorn("slowboot:asgi"), Up::Accepting, 2);
}

/// hypercorn, when it stops, closes every connection it holds with no
/// request in progress (`_idle_timeout` waits for `context.terminated`),
/// including one it has just accepted and not yet read: under load, a
/// retired worker can close a request or so unanswered (seen in 2 rolls
/// of 13 here). That is hypercorn's, not drover's: allowed, at most
/// one per retired worker, and only as a connection closed (or reset) with
/// no answer.
#[test]
fn hup_under_load_hypercorn_slow_boot() {
    hup_under_load("hypercorn", &hypercorn("slowboot:asgi"), Up::Accepting, 2);
}

/// puma loads config.ru (2 s) before it binds and boots, so its READY=1
/// (or its accepting, whichever drover sees first) is honest.
#[test]
fn hup_under_load_puma_slow_boot() {
    hup_under_load("puma", &puma(&[]), Up::Either, 0);
}

/// gunicorn says READY=1 when its master has booted, before its worker
/// imports the app; with `--preload` the master imports it first, so
/// READY=1 means the app is loaded.
#[test]
fn hup_under_load_gunicorn_preload_slow_boot() {
    hup_under_load(
        "gunicorn --preload",
        &gunicorn("slowboot:wsgi", &["--preload"]),
        Up::Notify,
        0,
    );
}

/// gunicorn as it comes (no `--preload`): its READY=1 precedes the worker's
/// 2 s import. Under `auto` drover also waits to see the worker accept, so
/// the old master retires only once the new one serves (it once took READY=1
/// at its word: the roll took 0.43 s and the service stalled 1.8 s).
#[test]
fn hup_under_load_gunicorn_slow_boot() {
    hup_under_load("gunicorn", &gunicorn("slowboot:wsgi", &[]), Up::Notify, 0);
}

/// puma without `--bind-to-activated-sockets only` closes drover's socket
/// ("Closing unused activated socket") and listens on its own port, yet it
/// says READY=1. Under `auto` that is not enough: drover never sees it
/// accept on the service's socket, and it does not even hold that socket,
/// so it is never up and `/readyz` stays 503 (it once turned 200 while
/// nothing accepted).
#[test]
fn puma_without_its_socket_flag_is_never_up() {
    let cmd = vec![
        system_bin("puma"),
        "--bind".into(),
        "tcp://127.0.0.1:0".into(),
        fixture("config.ru"),
    ];
    let d = run(&["--workers", "1"], &cmd, &[]);
    // puma boots in well under a second here (its output goes to stdout);
    // past drover's 5 s grace for a READY=1 it cannot see accepting.
    std::thread::sleep(Duration::from_secs(7));
    let readyz = http(d.admin, "GET", "/readyz", &[]).unwrap().status;
    assert_eq!(
        readyz,
        503,
        "up, but nothing accepts on the socket:\n{}",
        d.log_text()
    );
}
