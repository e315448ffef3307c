//! `--balance reuseport` (issue 12): one socket per worker in a
//! `SO_REUSEPORT` group the supervisor holds, new connections steered in
//! turn over the workers that are up. What it promises over `shared`: an
//! external app's workers take turns, whatever the app does when woken; what
//! is queued on a worker's socket survives its restart and its removal.
//!
//! The rest of the suite also runs under `DROVER_BALANCE=reuseport`
//! (`tests/run`): drains, restarts, rolls, TTOU and chaos.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn venv() -> PathBuf {
    test_venv(&["uvicorn"])
}

fn uvicorn() -> Vec<String> {
    vec![
        venv().join("bin/uvicorn").display().to_string(),
        "--fd".into(),
        "3".into(),
        "--app-dir".into(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .display()
            .to_string(),
        "--no-access-log".into(),
        "asgi_app:app".into(),
    ]
}

fn with(opts: &[&str], cmd: &[String]) -> Drover {
    let mut all: Vec<&str> = opts.to_vec();
    all.push("--");
    all.extend(cmd.iter().map(String::as_str));
    start(&all)
}

/// Reads one HTTP/1.1 response with a Content-Length from a keep-alive
/// connection; returns its body.
fn read_one(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return buf[end + 4..end + 4 + len].to_vec();
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `n` keep-alive connections opened `gap` apart (as a proxy grows its
/// pool with the traffic), kept open; returns them with the worker id that
/// answered a first `GET /` on each.
fn open_pool(addr: SocketAddr, n: usize, gap: Duration) -> Vec<(TcpStream, u64)> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let v: serde_json::Value = serde_json::from_slice(&read_one(&mut s)).unwrap();
            std::thread::sleep(gap);
            (s, v["worker"].as_u64().unwrap())
        })
        .collect()
}

/// `GET /` on a new connection, bounded to 10 s.
fn get(addr: SocketAddr) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    exchange(&mut s, "GET", "/", &[], Duration::from_secs(10))
}

fn get_json(addr: SocketAddr) -> serde_json::Value {
    let r = get(addr).expect("GET /");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn per_worker(pool: &[(TcpStream, u64)]) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for (_, w) in pool {
        *m.entry(*w).or_default() += 1;
    }
    m
}

fn worker_pids(d: &Drover, n: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            pids = d.children();
            pids.len() == n
        }),
        "expected {n} workers, have {pids:?}"
    );
    pids
}

/// Each built-in worker accepts on a socket of its own, all in one group
/// on the port, and connections opened one after the other go to the
/// workers in turn: 12 connections, 3 per worker exactly.
#[test]
fn builtin_workers_each_get_a_socket_and_take_connections_in_turn() {
    let mut d = start(&["--workers", "4", "--balance", "reuseport"]);
    d.wait_ready();
    let inodes = listen_inodes(d.app().port());
    assert_eq!(inodes.len(), 4, "one listening socket per worker");
    let mut fd3: Vec<u64> = worker_pids(&d, 4)
        .iter()
        .map(|pid| {
            let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
            let link = link.to_string_lossy().to_string();
            link.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .parse()
                .unwrap()
        })
        .collect();
    fd3.sort();
    assert_eq!(fd3, inodes, "fd 3 of the workers");

    let pool = open_pool(d.app(), 12, Duration::from_millis(30));
    let split = per_worker(&pool);
    assert_eq!(
        split.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3, 3],
        "connections per worker: {split:?}"
    );
    drop(pool);
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// uvicorn's workers each accept until their queue is empty when woken: on
/// one shared socket the first woken takes a whole pool. With a socket per
/// worker, a pool of 16 keep-alive connections that grows over time spreads
/// 4 / 4 / 4 / 4, and the requests on it with it.
#[test]
fn uvicorn_workers_share_a_keep_alive_pool_evenly() {
    let mut d = with(&["--workers", "4", "--balance", "reuseport"], &uvicorn());
    d.wait_ready();
    let mut pool = open_pool(d.app(), 16, Duration::from_millis(20));
    let split = per_worker(&pool);
    assert_eq!(
        split.values().copied().collect::<Vec<_>>(),
        vec![4, 4, 4, 4],
        "connections per worker: {split:?}"
    );
    // The requests follow the connections: 50 more on each.
    let mut answered: BTreeMap<u64, usize> = BTreeMap::new();
    for (s, _) in pool.iter_mut() {
        for _ in 0..50 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let v: serde_json::Value = serde_json::from_slice(&read_one(s)).unwrap();
            *answered.entry(v["worker"].as_u64().unwrap()).or_default() += 1;
        }
    }
    let total: usize = answered.values().sum();
    let busiest = *answered.values().max().unwrap() as f64 / total as f64;
    assert!(busiest <= 0.3125, "requests per worker {answered:?}");
    drop(pool);
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// Fresh-connection `GET /` requests in a loop until stopped: (ok, failed).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(addr: SocketAddr, every: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let handle = std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match get(addr) {
                    Ok(r) if r.status == 200 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{other:?}"));
                    }
                }
                std::thread::sleep(every);
            }
            errors
        });
        Load {
            stop,
            ok,
            failed,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (usize, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.handle.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// TTOU takes a worker out: steering leaves its socket first, and the worker
/// is told to stop only once its socket's queue is empty, so nothing queued
/// there is reset. Under steady load, two TTOUs and a TTIN lose nothing.
#[test]
fn ttou_and_ttin_under_load_lose_nothing() {
    let mut d = with(&["--workers", "3", "--balance", "reuseport"], &uvicorn());
    d.wait_ready();
    let loads: Vec<Load> = (0..2)
        .map(|_| Load::start(d.app(), Duration::from_millis(2)))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    d.signal(libc::SIGTTOU);
    std::thread::sleep(Duration::from_millis(700));
    d.signal(libc::SIGTTOU);
    assert!(
        eventually(Duration::from_secs(10), || {
            d.metric("drover_workers_running") == Some(1.0)
        }),
        "workers running: {:?}",
        d.metric("drover_workers_running")
    );
    d.signal(libc::SIGTTIN);
    assert!(
        eventually(Duration::from_secs(10), || {
            d.metric("drover_workers_running") == Some(2.0)
                && http(d.admin, "GET", "/readyz", &[]).map(|r| r.status).ok() == Some(200)
        }),
        "TTIN did not bring a second worker up"
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut ok = 0;
    for l in loads {
        let (o, failed, errors) = l.finish();
        assert_eq!(failed, 0, "failed requests: {errors:?}\n{}", d.log_text());
        ok += o;
    }
    assert!(ok > 100, "only {ok} requests answered");
    // Both workers that are left take connections again.
    let pool = open_pool(d.app(), 4, Duration::from_millis(30));
    assert_eq!(per_worker(&pool).len(), 2, "{:?}", per_worker(&pool));
    drop(pool);
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// A connection queued on a worker's socket is not lost with the worker: a
/// worker is stopped (SIGSTOP), one connection lands on its socket and
/// waits (steering then passes the socket by), the worker is SIGKILLed, and
/// its replacement, on the same socket, answers that connection.
#[test]
fn a_connection_queued_on_a_dead_workers_socket_is_served_by_its_replacement() {
    let mut d = with(&["--workers", "2", "--balance", "reuseport"], &uvicorn());
    d.wait_ready();
    let pids = worker_pids(&d, 2);
    let victim = get_json(d.app());
    let victim_id = victim["worker"].as_u64().unwrap();
    let victim_pid = victim["pid"].as_u64().unwrap() as u32;
    assert!(pids.contains(&victim_pid));
    send_signal(victim_pid, libc::SIGSTOP);
    // Connections one at a time until one waits: the victim's turn.
    let addr = d.app();
    let mut waiting = None;
    for _ in 0..8 {
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            (get(addr), t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        if !t.is_finished() {
            waiting = Some(t);
            break;
        }
        let (r, _) = t.join().unwrap();
        let v = r.unwrap().json();
        assert_ne!(
            v["worker"].as_u64(),
            Some(victim_id),
            "the stopped worker answered: {v}"
        );
    }
    let waiting = waiting.expect("no connection went to the stopped worker's socket");
    // From now on steering passes the stopped worker's socket by.
    for _ in 0..6 {
        let v = get_json(d.app());
        assert_ne!(v["worker"].as_u64(), Some(victim_id), "{v}");
    }
    send_signal(victim_pid, libc::SIGKILL);
    let (r, took) = waiting.join().unwrap();
    let r = r.expect("the queued connection is served, not reset");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["worker"].as_u64(), Some(victim_id), "{v}");
    assert_ne!(v["pid"].as_u64(), Some(u64::from(victim_pid)), "{v}");
    eprintln!("queued connection answered by the replacement after {took:?}");
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

/// Unix sockets have no SO_REUSEPORT group: a clear configuration error, in
/// `drover check` as in a run; `check` shows the mode.
#[test]
fn reuseport_needs_tcp_and_check_names_it() {
    let dir = TempDir::new("reuseport-uds");
    let uds = dir.path().join("app.sock");
    let uds = uds.to_str().unwrap();
    for sub in [&["check"][..], &[][..]] {
        let mut args: Vec<&str> = sub.to_vec();
        args.extend([
            "--workers",
            "2",
            "--balance",
            "reuseport",
            "--uds",
            uds,
            "--admin-port",
            "0",
        ]);
        let (code, out) = run_to_exit(&args);
        assert_eq!(code, 78, "{args:?}: {out}");
        assert!(
            out.contains("--balance reuseport needs a TCP listener"),
            "{out}"
        );
    }
    let (code, out) = run_to_exit(&["check", "--workers", "2", "--balance", "reuseport"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("balance: reuseport"), "{out}");
    let (code, out) = run_to_exit(&["check", "--workers", "2", "--balance", "roundrobin"]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("shared") && out.contains("reuseport"), "{out}");
}

/// A worker removed by TTOU waits for its socket to empty before it is told
/// to stop; a drain that starts meanwhile must still tell it (not leave it
/// to SIGKILL at --graceful-timeout): exit 0, well before the timeout.
#[test]
fn a_drain_right_after_ttou_still_stops_the_removed_worker() {
    let mut d = with(
        &[
            "--workers",
            "2",
            "--balance",
            "reuseport",
            "--graceful-timeout",
            "8s",
        ],
        &uvicorn(),
    );
    d.wait_ready();
    d.signal(libc::SIGTTOU);
    // The drain starts while the removed worker still waits (at least 20 ms
    // for handshakes steered to its socket).
    assert!(eventually(Duration::from_secs(5), || d
        .log_contains("SIGTTOU: removing a worker")));
    d.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let code = d.wait_exit(Duration::from_secs(15)).code();
    assert_eq!(code, Some(0), "{}", d.log_text());
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "drain took {:?}",
        t0.elapsed()
    );
}
