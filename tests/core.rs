//! Core behaviour of drover, end to end: the real binary, real sockets, real
//! processes and signals. Each test starts its own drover on free loopback
//! ports (see `common`), bounds every wait, and only signals processes it
//! started (drover itself or the workers drover forked for that test).

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound for any single read or write on a test connection.
const IO_LIMIT: Duration = Duration::from_secs(10);
/// Bound on how many fresh connections we make while looking for a worker.
const MAX_TRIES: usize = 500;

// ---------------------------------------------------------------- helpers

/// One HTTP/1.1 request on a new TCP connection, with read/write timeouts
/// (the harness's `http` has none on the read side).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(IO_LIMIT))?;
    s.set_write_timeout(Some(IO_LIMIT))?;
    exchange(&mut s, method, path, headers, IO_LIMIT)
}

/// `GET /` on the app, asserting a 200 JSON answer.
fn index(addr: SocketAddr) -> serde_json::Value {
    let r = request(addr, "GET", "/", &[]).expect("GET /");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn status(addr: SocketAddr, method: &str, path: &str) -> u16 {
    request(addr, method, path, &[])
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
        .status
}

/// `POST /admin/stop` from loopback without a token; asserts 202.
fn admin_stop(d: &Drover) {
    let r = request(d.admin, "POST", "/admin/stop", &[]).expect("POST /admin/stop");
    assert_eq!(r.status, 202, "{r:?}");
}

/// Makes fresh-connection `GET /` requests until `done` says enough was
/// seen (at most [`MAX_TRIES`]); returns every answer by worker id.
fn collect_workers(
    addr: SocketAddr,
    mut done: impl FnMut(&BTreeMap<u64, serde_json::Value>) -> bool,
) -> BTreeMap<u64, serde_json::Value> {
    let mut seen = BTreeMap::new();
    for _ in 0..MAX_TRIES {
        let v = index(addr);
        let id = v["worker"]
            .as_u64()
            .unwrap_or_else(|| panic!("no worker id in {v}"));
        seen.insert(id, v);
        if done(&seen) {
            break;
        }
    }
    seen
}

/// The pids of drover's `n` worker processes, once it has exactly `n` live children.
fn worker_pids(d: &Drover, n: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    let ok = eventually(Duration::from_secs(5), || {
        pids = d.children().into_iter().filter(|&p| alive(p)).collect();
        pids.len() == n
    });
    assert!(
        ok,
        "expected {n} live workers, have {pids:?}:\n{}",
        d.log_text()
    );
    pids.sort_unstable();
    pids
}

/// Waits until `/metrics` shows `series` with `value`.
fn wait_metric(d: &Drover, series: &str, value: f64, limit: Duration) {
    let mut last = None;
    let ok = eventually(limit, || {
        last = d.metric(series);
        last == Some(value)
    });
    assert!(
        ok,
        "{series} never became {value} (last {last:?}):\n{}",
        d.log_text()
    );
}

/// `GET /sleep?ms=N` on its own connection, in a thread.
fn slow_request(addr: SocketAddr, ms: u64) -> JoinHandle<io::Result<Resp>> {
    std::thread::spawn(move || request(addr, "GET", &format!("/sleep?ms={ms}"), &[]))
}

/// The process state letter from /proc (R, S, T, Z, ...).
fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (a worker of its own drover).
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
}

/// Whether a connection to `addr` is refused.
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

/// A port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `n` appears in `text` as a number of its own (not inside another).
fn has_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|t| t == n.to_string())
}

/// The line drover prints for a fatal error (the last non-empty line).
fn error_line(out: &str) -> &str {
    out.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

/// Asserts a configuration error: exit 78, nothing bound, no worker started.
fn assert_config_error(args: &[&str], needles: &[&str]) -> String {
    let (code, out) = run_to_exit(args);
    assert_eq!(code, 78, "drover {args:?} should exit 78:\n{out}");
    for n in needles {
        assert!(
            out.contains(n),
            "message of drover {args:?} should mention {n:?}:\n{out}"
        );
    }
    assert!(!out.contains("worker started"), "a worker started:\n{out}");
    out
}

/// Asserts a usage error: exit 64 and a message naming the option.
fn assert_usage_error(args: &[&str], needles: &[&str]) {
    let (code, out) = run_to_exit(args);
    assert_eq!(code, 64, "drover {args:?} should exit 64:\n{out}");
    for n in needles {
        assert!(
            out.contains(n),
            "message of drover {args:?} should mention {n:?}:\n{out}"
        );
    }
}

/// Explicit loopback listener and admin addresses on free ports, for runs
/// that might get as far as binding.
const LOOPBACK: [&str; 8] = [
    "--host",
    "127.0.0.1",
    "--port",
    "0",
    "--admin-host",
    "127.0.0.1",
    "--admin-port",
    "0",
];

fn with_loopback<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = args.to_vec();
    v.extend(LOOPBACK);
    v
}

/// SIGCONTs stopped workers even if the test panics half-way.
struct Resume(Vec<u32>);
impl Drop for Resume {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: kill(2) on a worker of this test's own drover.
            unsafe { libc::kill(p as i32, libc::SIGCONT) };
        }
    }
}

// ------------------------------------------------- 1, 2: workers, contexts

/// A YAML sequence of three contexts and no `--workers` runs three worker
/// processes: three distinct pids, all children of drover, each answering
/// with its own id and exactly its own item of the sequence.
#[test]
fn context_sequence_runs_one_worker_process_per_item_with_its_own_context() {
    let dir = TempDir::new("ctx-seq");
    let f = dir.file("ctx.yaml", "- {shard: 0}\n- {shard: 1}\n- {shard: 2}\n");
    let d = start(&["--worker-contexts-file", f.to_str().unwrap()]);
    d.wait_ready();
    let seen = collect_workers(d.app(), |s| s.len() == 3);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "worker ids seen in {MAX_TRIES} requests"
    );
    let children = d.children();
    let mut pids = BTreeSet::new();
    for (id, v) in &seen {
        let pid = v["pid"].as_u64().unwrap() as u32;
        assert_ne!(pid, d.pid, "worker {id} runs inside the supervisor");
        assert!(
            children.contains(&pid),
            "worker {id} (pid {pid}) is not a child of drover {}: {children:?}",
            d.pid
        );
        assert!(pids.insert(pid), "two workers share pid {pid}");
        assert_eq!(
            v["context"],
            serde_json::json!({ "shard": id }),
            "context of worker {id}"
        );
    }
    assert_eq!(d.metric("drover_workers_running"), Some(3.0));
}

/// A YAML mapping (not a sequence) is the one context of every worker:
/// with `--workers 2` both workers answer with that same mapping.
#[test]
fn context_mapping_is_shared_by_every_worker() {
    let dir = TempDir::new("ctx-map");
    let f = dir.file("ctx.yaml", "model: small\nbatch: 8\n");
    let d = start(&[
        "--workers",
        "2",
        "--worker-contexts-file",
        f.to_str().unwrap(),
    ]);
    d.wait_ready();
    let seen = collect_workers(d.app(), |s| s.len() == 2);
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![0, 1],
        "worker ids seen in {MAX_TRIES} requests"
    );
    assert_ne!(seen[&0]["pid"], seen[&1]["pid"]);
    for v in seen.values() {
        assert_eq!(
            v["context"],
            serde_json::json!({"model": "small", "batch": 8}),
            "{v}"
        );
    }
}

/// `--workers 1` serves in the supervisor process itself: `GET /` reports
/// drover's own pid, and drover has no child process.
#[test]
fn one_worker_runs_in_process_without_children() {
    let d = start(&["--workers", "1"]);
    d.wait_ready();
    let v = index(d.app());
    assert_eq!(v["pid"].as_u64(), Some(u64::from(d.pid)), "{v}");
    assert_eq!(v["worker"].as_u64(), Some(0), "{v}");
    assert_eq!(d.children(), Vec::<u32>::new(), "drover has children");
}

// ------------------------------------------------------------ 3, 4: admin

/// The admin stop endpoint: GET is 405 with `Allow: POST` and stops nothing;
/// a loopback POST without a token is 202; at once `/readyz` turns 503 while
/// `/healthz` stays 200 during the drain delay; a repeated POST is 202 too;
/// `/metrics` shows the drain and both requests; then drover exits 0.
#[test]
fn admin_stop_drains_readiness_health_and_metrics_then_exits_zero() {
    let mut d = start(&["--workers", "2", "--drain-delay", "1s"]);
    d.wait_ready();
    let r = request(d.admin, "GET", "/admin/stop", &[]).unwrap();
    assert_eq!(r.status, 405, "{r:?}");
    assert_eq!(r.header("allow"), Some("POST"), "{r:?}");
    assert_eq!(
        status(d.admin, "GET", "/readyz"),
        200,
        "a GET must not stop"
    );
    assert_eq!(d.metric("drover_draining"), Some(0.0));

    admin_stop(&d);
    assert_eq!(
        status(d.admin, "GET", "/readyz"),
        503,
        "readyz right after the stop"
    );
    assert_eq!(
        status(d.admin, "GET", "/healthz"),
        200,
        "healthz while draining"
    );
    admin_stop(&d);
    let m = request(d.admin, "GET", "/metrics", &[]).unwrap().body;
    assert_eq!(metric_value(&m, "drover_draining"), Some(1.0), "{m}");
    assert_eq!(
        metric_value(&m, "drover_stop_requests_total{source=\"http\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        status(d.app(), "GET", "/"),
        200,
        "the app still serves during the drain delay"
    );
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

/// With `--admin-token-file`, `/admin/stop` needs `Authorization: Bearer
/// <token>` (the file's content, trailing newline trimmed): none or a wrong
/// one is 401 and does not stop; the right one is 202 and drover exits 0.
#[test]
fn admin_token_is_required_to_stop() {
    let dir = TempDir::new("token");
    let tok = dir.file("token", "s3cret\n");
    let mut d = start(&["--admin-token-file", tok.to_str().unwrap()]);
    d.wait_ready();
    let r = request(d.admin, "POST", "/admin/stop", &[]).unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    let r = request(
        d.admin,
        "POST",
        "/admin/stop",
        &[("Authorization", "Bearer wrong")],
    )
    .unwrap();
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        status(d.admin, "GET", "/readyz"),
        200,
        "a refused stop must not drain"
    );
    let r = request(
        d.admin,
        "POST",
        "/admin/stop",
        &[("Authorization", "Bearer s3cret")],
    )
    .unwrap();
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

// ------------------------------------------------ 5, 6: in-flight requests

enum StopBy {
    Http,
    Sigterm,
}

/// Four 1.5 s requests in flight, then a stop: all four complete with 200,
/// drover exits 0 within 10 s, the port then refuses, the workers are gone.
fn stop_finishes_in_flight_requests(workers: &str, how: StopBy) {
    let mut d = start(&["--workers", workers]);
    d.wait_ready();
    let n: usize = workers.parse().unwrap();
    let pids = if n == 1 {
        Vec::new()
    } else {
        worker_pids(&d, n)
    };
    let app = d.app();
    let slow: Vec<_> = (0..4).map(|_| slow_request(app, 1500)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    match how {
        StopBy::Http => admin_stop(&d),
        StopBy::Sigterm => d.signal(libc::SIGTERM),
    }
    for (i, h) in slow.into_iter().enumerate() {
        let r = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight request {i} failed: {e}\n{}", d.log_text()));
        assert_eq!(r.status, 200, "in-flight request {i}: {r:?}");
        assert!(r.body.contains("1500"), "in-flight request {i}: {r:?}");
    }
    let st = d.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(
        refused(app),
        "the app port still accepts after drover exited"
    );
    for p in pids {
        assert!(!alive(p), "worker {p} outlived drover");
    }
}

/// A stop through `POST /admin/stop` lets requests in flight in worker
/// processes finish with 200, then drover exits 0 and nothing is left.
#[test]
fn admin_stop_lets_in_flight_requests_finish_in_workers() {
    stop_finishes_in_flight_requests("2", StopBy::Http);
}

/// SIGTERM to the supervisor drains like the admin stop: in-flight requests
/// in worker processes finish with 200, exit 0, port closed, workers gone.
#[test]
fn sigterm_lets_in_flight_requests_finish_in_workers() {
    stop_finishes_in_flight_requests("2", StopBy::Sigterm);
}

/// In-process (`--workers 1`), a stop also lets in-flight requests finish
/// with 200 before drover exits 0 and the port closes.
#[test]
fn admin_stop_lets_in_flight_requests_finish_in_process() {
    stop_finishes_in_flight_requests("1", StopBy::Http);
}

/// `--graceful-timeout 500ms`: a request still running when it runs out is
/// cut off (never a 200) and drover exits 1, long before the request's 5 s.
fn graceful_timeout_kills_and_exits_one(workers: &str) {
    let mut d = start(&["--workers", workers, "--graceful-timeout", "500ms"]);
    d.wait_ready();
    let n: usize = workers.parse().unwrap();
    let pids = if n == 1 {
        Vec::new()
    } else {
        worker_pids(&d, n)
    };
    let slow = slow_request(d.app(), 5000);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    admin_stop(&d);
    let st = d.wait_exit(Duration::from_secs(4));
    assert_eq!(st.code(), Some(1), "{}", d.log_text());
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "exit took {:?}",
        t0.elapsed()
    );
    // A reset or truncated answer (an Err) is what we expect; a 200 is not.
    if let Ok(r) = slow.join().unwrap() {
        assert_ne!(r.status, 200, "the slow request completed: {r:?}");
    }
    for p in pids {
        assert!(!alive(p), "worker {p} outlived drover");
    }
}

/// With worker processes, an overdue worker is SIGKILLed and drover exits 1.
#[test]
fn graceful_timeout_kills_overdue_workers_and_exits_one() {
    graceful_timeout_kills_and_exits_one("2");
}

/// In-process, overdue requests are aborted and drover exits 1.
#[test]
fn graceful_timeout_aborts_overdue_requests_in_process_and_exits_one() {
    graceful_timeout_kills_and_exits_one("1");
}

// ------------------------------------------------------- 7, 8: supervision

/// No worker outlives the supervisor: after SIGKILL to drover, each of its
/// three workers is dead (or a zombie) within 1 s.
#[test]
fn workers_die_within_a_second_of_supervisor_sigkill() {
    let mut d = start(&["--workers", "3"]);
    d.wait_ready();
    let pids = worker_pids(&d, 3);
    d.signal(libc::SIGKILL);
    let ok = eventually(Duration::from_secs(1), || pids.iter().all(|&p| !alive(p)));
    let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
    assert!(
        ok,
        "workers still alive 1 s after the supervisor's SIGKILL: {left:?}"
    );
    let st = d.wait_exit(Duration::from_secs(5));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
}

/// A worker killed with SIGKILL is replaced: a new child pid with the same
/// worker id serves, `drover_worker_restarts_total` counts 1 for that id
/// (and nothing for the others), and `drover_workers_running` is back to 3.
#[test]
fn killed_worker_is_restarted_and_counted() {
    let d = start(&["--workers", "3"]);
    d.wait_ready();
    let before = worker_pids(&d, 3);
    let v = index(d.app());
    let victim = v["pid"].as_u64().unwrap() as u32;
    let id = v["worker"].as_u64().unwrap();
    assert!(before.contains(&victim), "{victim} not among {before:?}");
    send_signal(victim, libc::SIGKILL);

    let mut now = Vec::new();
    let ok = eventually(Duration::from_secs(5), || {
        now = d.children().into_iter().filter(|&p| alive(p)).collect();
        now.len() == 3 && !now.contains(&victim)
    });
    assert!(
        ok,
        "no replacement for worker {id} (pid {victim}); children {now:?}:\n{}",
        d.log_text()
    );
    let fresh: Vec<u32> = now
        .iter()
        .copied()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(
        fresh.len(),
        1,
        "exactly one new worker: before {before:?}, now {now:?}"
    );
    let fresh = fresh[0];

    wait_metric(
        &d,
        &format!("drover_worker_restarts_total{{worker=\"{id}\"}}"),
        1.0,
        Duration::from_secs(5),
    );
    wait_metric(&d, "drover_workers_running", 3.0, Duration::from_secs(5));
    for other in (0..3).filter(|&o| o != id) {
        let c = d.metric(&format!(
            "drover_worker_restarts_total{{worker=\"{other}\"}}"
        ));
        assert!(
            matches!(c, None | Some(0.0)),
            "worker {other} counted a restart: {c:?}"
        );
    }
    d.wait_ready();
    let seen = collect_workers(d.app(), |s| {
        s.get(&id)
            .is_some_and(|v| v["pid"].as_u64() == Some(u64::from(fresh)))
    });
    assert_eq!(
        seen[&id]["pid"].as_u64(),
        Some(u64::from(fresh)),
        "worker {id} not served by its replacement {fresh}"
    );
}

// ------------------------------------------------------ 9: the accept queue

/// Connections waiting in the kernel's accept queue when the stop comes are
/// served, not reset: with both workers SIGSTOPped, eight requests queue up;
/// after the stop (accepting has ended) the workers resume and every one of
/// the eight gets a 200; drover exits 0.
#[test]
fn connections_queued_at_stop_are_served_not_reset() {
    let mut d = start(&["--workers", "2"]);
    d.wait_ready();
    let pids = worker_pids(&d, 2);
    let _resume = Resume(pids.clone());
    for &p in &pids {
        send_signal(p, libc::SIGSTOP);
    }
    assert!(
        eventually(Duration::from_secs(2), || pids.iter().all(|&p| proc_state(
            p
        ) == Some(
            'T'
        ))),
        "workers not stopped"
    );

    let app = d.app();
    let mut conns = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect_timeout(&app, Duration::from_secs(5))
            .expect("connect while workers are stopped");
        s.set_read_timeout(Some(IO_LIMIT)).unwrap();
        s.set_write_timeout(Some(IO_LIMIT)).unwrap();
        use std::io::Write;
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .unwrap();
        conns.push(s);
    }
    admin_stop(&d);
    assert!(
        eventually(Duration::from_secs(5), || d
            .log_contains("no longer accepting")),
        "drover never stopped accepting:\n{}",
        d.log_text()
    );
    for &p in &pids {
        send_signal(p, libc::SIGCONT);
    }
    for (i, mut s) in conns.into_iter().enumerate() {
        let r = read_response(&mut s)
            .unwrap_or_else(|e| panic!("queued connection {i}: {e}\n{}", d.log_text()));
        assert_eq!(r.status, 200, "queued connection {i}: {r:?}");
        let pid = r.json()["pid"].as_u64().unwrap() as u32;
        assert!(
            pids.contains(&pid),
            "served by {pid}, not one of the workers {pids:?}"
        );
    }
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

/// Once accepting has stopped, no new connection completes, not even the
/// one Linux still lets into an empty queue after `listen(fd, 0)` (it would
/// be reset when the socket closes): with both workers held (SIGSTOP) after
/// the stop, a new connect does not complete; once drover has exited, it is
/// refused.
#[test]
fn no_new_connection_completes_after_accepting_stops() {
    let mut d = start(&["--workers", "2"]);
    d.wait_ready();
    let pids = worker_pids(&d, 2);
    let _resume = Resume(pids.clone());
    for &p in &pids {
        send_signal(p, libc::SIGSTOP);
    }
    admin_stop(&d);
    assert!(
        eventually(Duration::from_secs(5), || d
            .log_contains("no longer accepting")),
        "{}",
        d.log_text()
    );
    let app = d.app();
    match TcpStream::connect_timeout(&app, Duration::from_millis(500)) {
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a connection after the stop got {other:?}, not a dropped SYN"),
    }
    for &p in &pids {
        send_signal(p, libc::SIGCONT);
    }
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
    let e = TcpStream::connect_timeout(&app, Duration::from_secs(2)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
}

/// A Kubernetes service link (`DROVER_PORT=tcp://10.0.0.1:8000`, injected
/// for a Service named drover) is not taken for `--port`: the plan uses the
/// default port and the log says why the variable was ignored.
#[test]
fn a_kubernetes_service_link_in_drover_port_is_ignored() {
    let out = std::process::Command::new(bin())
        .arg("check")
        .env("DROVER_PORT", "tcp://10.0.0.1:8000")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("listener: 0.0.0.0:8000"), "{text}");
    assert!(
        text.contains("ignoring DROVER_PORT=tcp://10.0.0.1:8000"),
        "{text}"
    );
}

// ------------------------------------------------- 10: the library's stop()

/// `drover::stop()` called from the app's handler (`POST /stop` on the app
/// port) stops the whole service: `/readyz` turns 503, the stop is counted
/// with `source="worker"`, and drover exits 0.
fn app_stop_stops_the_service(workers: &str) {
    let mut d = start(&["--workers", workers, "--drain-delay", "1s"]);
    d.wait_ready();
    let r = request(d.app(), "POST", "/stop", &[]).unwrap();
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.json()["stopping"], serde_json::json!(true), "{r:?}");
    assert!(
        eventually(Duration::from_millis(800), || status(
            d.admin, "GET", "/readyz"
        ) == 503),
        "readyz did not turn 503 after the app's stop:\n{}",
        d.log_text()
    );
    let m = request(d.admin, "GET", "/metrics", &[]).unwrap().body;
    assert_eq!(
        metric_value(&m, "drover_stop_requests_total{source=\"worker\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "drover_stop_requests_total{source=\"http\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(metric_value(&m, "drover_draining"), Some(1.0), "{m}");
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

/// The library stop function works from a worker process.
#[test]
fn library_stop_from_a_worker_process_stops_the_service() {
    app_stop_stops_the_service("2");
}

/// The library stop function works in-process.
#[test]
fn library_stop_in_process_stops_the_service() {
    app_stop_stops_the_service("1");
}

// ------------------------------------------------------ 11: bad inputs

/// The app port already in use: exit 78, naming the address and saying so.
#[test]
fn app_port_in_use_exits_78_naming_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    assert_config_error(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            "0",
        ],
        &[&format!("127.0.0.1:{port}"), "already in use"],
    );
    drop(busy);
}

/// The admin port already in use: exit 78, naming the address, no worker started.
#[test]
fn admin_port_in_use_exits_78_naming_the_address() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    assert_config_error(
        &[
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            &port,
        ],
        &[&format!("127.0.0.1:{port}"), "already in use"],
    );
    drop(busy);
}

/// Malformed YAML contexts: exit 78, the message gives line and column, and
/// nothing was started.
#[test]
fn malformed_contexts_yaml_exits_78_with_line_and_column() {
    let dir = TempDir::new("bad-yaml");
    let f = dir.file("ctx.yaml", "- {shard: 0}\n- {shard: [1, 2}\n");
    let out = assert_config_error(
        &with_loopback(&["--worker-contexts-file", f.to_str().unwrap()]),
        &["line", "column"],
    );
    assert!(
        !out.contains("listening on"),
        "bound before checking contexts:\n{out}"
    );
}

/// Three contexts with `--workers 2`: exit 78, naming both numbers, nothing started.
#[test]
fn context_count_mismatch_exits_78_naming_both_counts() {
    let dir = TempDir::new("mismatch");
    let f = dir.file("ctx.yaml", "- {shard: 0}\n- {shard: 1}\n- {shard: 2}\n");
    let out = assert_config_error(
        &with_loopback(&[
            "--workers",
            "2",
            "--worker-contexts-file",
            f.to_str().unwrap(),
        ]),
        &[],
    );
    // Without the path, whose temp-dir name holds numbers of its own.
    let line = error_line(&out).replace(f.to_str().unwrap(), "");
    let line = line.as_str();
    assert!(
        has_number(line, 3) && has_number(line, 2),
        "message should name 3 and 2: {line}"
    );
    assert!(
        !out.contains("listening on"),
        "bound before checking contexts:\n{out}"
    );
}

/// A missing contexts file: exit 78, naming the path, nothing started.
#[test]
fn missing_contexts_file_exits_78_naming_the_path() {
    let dir = TempDir::new("no-ctx");
    let f = dir.path().join("absent.yaml");
    let out = assert_config_error(
        &with_loopback(&["--worker-contexts-file", f.to_str().unwrap()]),
        &[f.to_str().unwrap()],
    );
    assert!(
        !out.contains("listening on"),
        "bound before checking contexts:\n{out}"
    );
}

/// A missing admin token file: exit 78, naming the path.
#[test]
fn missing_admin_token_file_exits_78_naming_the_path() {
    let dir = TempDir::new("no-token");
    let f = dir.path().join("absent-token");
    assert_config_error(
        &with_loopback(&["--workers", "2", "--admin-token-file", f.to_str().unwrap()]),
        &[f.to_str().unwrap()],
    );
}

/// An external command that does not exist: exit 78 at start ("does not
/// exist"), not a crash loop of workers.
#[test]
fn nonexistent_command_exits_78() {
    assert_config_error(
        &with_loopback(&["--workers", "2", "--", "/nonexistent/prog"]),
        &["/nonexistent/prog", "does not exist"],
    );
}

/// Values that do not parse are usage errors: exit 64, naming the option.
#[test]
fn unparsable_options_exit_64() {
    assert_usage_error(&with_loopback(&["--workers", "0"]), &["--workers"]);
    assert_usage_error(
        &with_loopback(&["--drain-delay", "soon"]),
        &["--drain-delay", "soon"],
    );
    assert_usage_error(
        &with_loopback(&["--stop-signal", "KILL"]),
        &["--stop-signal", "KILL"],
    );
    assert_usage_error(
        &with_loopback(&["--backlog", "100000"]),
        &["--backlog", "100000"],
    );
}

// ---------------------------------------------------- 12: `drover stop`

/// `drover stop` (the preStop client): without the token it is refused
/// (exit 77) and drover keeps serving; with `--token-file` it exits 0 and
/// drover drains and exits 0; against a closed port it exits 69.
#[test]
fn stop_subcommand_uses_the_token_and_reports_by_exit_code() {
    let dir = TempDir::new("stop-cmd");
    let tok = dir.file("token", "s3cret\n");
    let tok = tok.to_str().unwrap();
    let mut d = start(&["--workers", "2", "--admin-token-file", tok]);
    d.wait_ready();
    let url = format!("http://127.0.0.1:{}", d.admin.port());

    let (code, out) = run_to_exit(&["stop", "--admin-url", &url]);
    assert_eq!(code, 77, "without a token:\n{out}");
    assert_eq!(
        status(d.admin, "GET", "/readyz"),
        200,
        "a refused stop must not drain"
    );

    let (code, out) = run_to_exit(&["stop", "--admin-url", &url, "--token-file", tok]);
    assert_eq!(code, 0, "with the token:\n{out}");
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );

    let closed = format!("http://127.0.0.1:{}", closed_port());
    let (code, out) = run_to_exit(&[
        "stop",
        "--admin-url",
        &closed,
        "--token-file",
        tok,
        "--timeout",
        "3s",
    ]);
    assert_eq!(code, 69, "against a closed port:\n{out}");
}

// ------------------------------------------------ 13, 14, 15: listeners

/// `--uds PATH`: HTTP over the Unix socket works (with worker processes),
/// and the socket file is removed when drover exits.
#[test]
fn unix_socket_serves_and_is_removed_on_exit() {
    let dir = TempDir::new("uds");
    let path = dir.path().join("app.sock");
    let mut d = start(&["--uds", path.to_str().unwrap(), "--workers", "2"]);
    d.wait_ready();
    assert!(path.exists(), "no socket file at {}", path.display());
    let mut s = UnixStream::connect(&path).expect("connect to the unix socket");
    s.set_read_timeout(Some(IO_LIMIT)).unwrap();
    s.set_write_timeout(Some(IO_LIMIT)).unwrap();
    let r = exchange(&mut s, "GET", "/", &[], IO_LIMIT).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json()["worker"].as_u64().is_some(), "{r:?}");
    admin_stop(&d);
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
    assert!(!path.exists(), "socket file {} left behind", path.display());
}

/// A start that fails after the Unix socket was bound (admin port in use)
/// exits 78 and does not leave the socket file behind.
#[test]
fn unix_socket_file_is_removed_when_start_fails() {
    let dir = TempDir::new("uds-fail");
    let path = dir.path().join("app.sock");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    assert_config_error(
        &[
            "--uds",
            path.to_str().unwrap(),
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            &port,
        ],
        &["already in use"],
    );
    assert!(!path.exists(), "socket file {} left behind", path.display());
    drop(busy);
}

/// `--host ::` is dual-stack: the same port answers on 127.0.0.1 and on ::1.
#[test]
fn host_any_v6_is_dual_stack() {
    let d = start(&["--host", "::"]);
    d.wait_ready();
    let port = d.app().port();
    assert!(
        d.app().ip().is_unspecified() && d.app().is_ipv6(),
        "listening on {}",
        d.app()
    );
    let v4: SocketAddr = ([127, 0, 0, 1], port).into();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    assert_eq!(status(v4, "GET", "/"), 200, "IPv4 loopback");
    assert_eq!(status(v6, "GET", "/"), 200, "IPv6 loopback");
}

/// A backlog above `net.core.somaxconn` is clamped by the kernel: drover
/// warns about somaxconn and `drover_listen_backlog` shows the effective value.
#[test]
fn backlog_above_somaxconn_is_reported_in_log_and_metric() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        somaxconn < 65535,
        "precondition: somaxconn ({somaxconn}) must be below 65535"
    );
    let d = start(&["--backlog", "65535"]);
    d.wait_ready();
    let warned = d.log.lock().unwrap().iter().any(|l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
            v["level"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("warn"))
                && l.contains("somaxconn")
        })
    });
    assert!(warned, "no warning about somaxconn:\n{}", d.log_text());
    assert_eq!(
        d.metric("drover_listen_backlog"),
        Some(f64::from(somaxconn))
    );
}

// ------------------------------------------------------ 16: drover check

/// `drover check` prints the plan (listener, backlog, worker count, each
/// worker's context, admin, drain) and exits 0 without serving.
#[test]
fn check_prints_the_plan_and_exits_zero() {
    let dir = TempDir::new("check");
    let f = dir.file("ctx.yaml", "- {shard: 0}\n- {shard: 1}\n- {shard: 2}\n");
    let (code, out) = run_to_exit(&[
        "check",
        "--worker-contexts-file",
        f.to_str().unwrap(),
        "--host",
        "127.0.0.1",
        "--port",
        "18123",
        "--backlog",
        "64",
        "--admin-port",
        "18124",
        "--drain-delay",
        "2s",
    ]);
    assert_eq!(code, 0, "{out}");
    let line = |word: &str| {
        out.lines()
            .find(|l| l.to_lowercase().contains(word))
            .unwrap_or_else(|| panic!("no {word} line:\n{out}"))
    };
    assert!(out.contains("127.0.0.1:18123"), "listener:\n{out}");
    assert!(has_number(line("backlog"), 64), "backlog:\n{out}");
    assert!(has_number(line("workers"), 3), "workers:\n{out}");
    assert!(line("admin").contains("18124"), "admin:\n{out}");
    assert!(line("drain").contains("2s"), "drain:\n{out}");
    for i in 0..3 {
        assert!(
            out.contains(&format!("{{\"shard\":{i}}}")),
            "context of worker {i}:\n{out}"
        );
    }
    assert!(
        !out.contains("worker started"),
        "check started workers:\n{out}"
    );
}

/// `drover check` finds the same configuration errors as a run: a count
/// mismatch exits 78.
#[test]
fn check_with_count_mismatch_exits_78() {
    let dir = TempDir::new("check-bad");
    let f = dir.file("ctx.yaml", "- {shard: 0}\n- {shard: 1}\n- {shard: 2}\n");
    let (code, out) = run_to_exit(&[
        "check",
        "--workers",
        "2",
        "--worker-contexts-file",
        f.to_str().unwrap(),
    ]);
    assert_eq!(code, 78, "{out}");
    let line = error_line(&out).replace(f.to_str().unwrap(), "");
    assert!(
        has_number(&line, 3) && has_number(&line, 2),
        "message should name 3 and 2: {line}"
    );
}

// ------------------------------------------------- 17: a library app

/// `target/<profile>/examples/greeter`, built when needed.
fn greeter() -> PathBuf {
    example("greeter")
}

/// Runs `program` to completion (bounded to 20 s); returns (code, output).
fn run_program_to_exit(program: &Path, args: &[&str]) -> (i32, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return (st.code().unwrap_or(-1), out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program:?} {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A library app (examples/greeter.rs) gets its typed context per worker —
/// both greetings are served — and its handler's `drover::stop()` (`POST
/// /shutdown`) stops the whole service with exit 0.
#[test]
fn library_example_greets_per_worker_and_stops_itself() {
    let dir = TempDir::new("greeter");
    let f = dir.file("ctx.yaml", "- {greeting: hello}\n- {greeting: bonjour}\n");
    let mut d = start_with(
        greeter(),
        &["--worker-contexts-file", f.to_str().unwrap()],
        &[],
    );
    d.wait_ready();
    let app = d.app();
    let mut bodies = BTreeSet::new();
    for _ in 0..MAX_TRIES {
        let r = request(app, "GET", "/", &[]).expect("GET /");
        assert_eq!(r.status, 200, "{r:?}");
        bodies.insert(r.body);
        if bodies.len() >= 2 {
            break;
        }
    }
    assert!(
        bodies
            .iter()
            .any(|b| b.starts_with("hello") && b.contains("worker 0")),
        "{bodies:?}"
    );
    assert!(
        bodies
            .iter()
            .any(|b| b.starts_with("bonjour") && b.contains("worker 1")),
        "{bodies:?}"
    );
    let r = request(app, "POST", "/shutdown", &[]).unwrap();
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(
        d.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "{}",
        d.log_text()
    );
}

/// A context that does not fit the library app's context type is a
/// configuration error (exit 78) mentioning the context, before anything runs.
#[test]
fn library_example_rejects_a_context_of_the_wrong_shape() {
    let dir = TempDir::new("greeter-bad");
    let f = dir.file("ctx.yaml", "- {nope: 1}\n");
    let mut args = vec!["--worker-contexts-file", f.to_str().unwrap()];
    args.extend(LOOPBACK);
    let (code, out) = run_program_to_exit(&greeter(), &args);
    assert_eq!(code, 78, "{out}");
    assert!(error_line(&out).contains("context"), "{out}");
    assert!(
        !out.contains("listening on"),
        "bound before checking contexts:\n{out}"
    );
}
