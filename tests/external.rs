//! drover with real external workers, end to end: gunicorn and uvicorn from
//! the test venv, a small socket-activation server (`fixtures/fromfd_server.py`)
//! and plain programs such as `sleep`, each started by the real binary on free
//! loopback ports (see `common`).
//!
//! Every wait is bounded. The tests only signal processes of their own tree:
//! drover, the workers it forked, and those workers' own children (a gunicorn
//! master's worker). [`Service`] kills that whole tree when a test ends, so
//! nothing is left behind even when an assertion fails half-way.
//!
//! The Python venv comes from `tests/run` (`DROVER_TEST_VENV`, default
//! `target/test-venv`); without it these tests fail and say so.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bound for any single read or write on a test connection.
const IO_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

/// The test venv with gunicorn and uvicorn (made by `tests/run`).
fn venv() -> PathBuf {
    test_venv(&["python"])
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

/// `gunicorn` with one sync worker per master serving `wsgi_app:app`.
/// Without `--bind`: gunicorn finds the socket through LISTEN_PID/LISTEN_FDS
/// itself. Without the control socket gunicorn 27 would create in `$HOME`
/// (the same path for every master).
fn gunicorn(extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        path_str(&venv().join("bin/gunicorn")),
        "--workers".into(),
        "1".into(),
        "--chdir".into(),
        path_str(&fixtures()),
        "--no-control-socket".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push("wsgi_app:app".into());
    v
}

/// `uvicorn --fd 3` serving `asgi_app:app`.
fn uvicorn() -> Vec<String> {
    vec![
        path_str(&venv().join("bin/uvicorn")),
        "--fd".into(),
        "3".into(),
        "--app-dir".into(),
        path_str(&fixtures()),
        "--no-access-log".into(),
        "asgi_app:app".into(),
    ]
}

/// `python fromfd_server.py`.
fn fromfd(extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        path_str(&venv().join("bin/python")),
        path_str(&fixtures().join("fromfd_server.py")),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// drover `opts -- cmd`, wrapped so its whole process tree dies with the test.
/// `cmd` must not contain `--host`, `--port`, `--admin-host`, `--admin-port`
/// or `--uds`: the harness looks for those in the whole argv.
fn run(opts: &[&str], cmd: &[String]) -> Service {
    let mut all: Vec<&str> = opts.to_vec();
    all.push("--");
    all.extend(cmd.iter().map(String::as_str));
    Service(start(&all))
}

/// A running drover whose process tree (its workers and their children) is
/// SIGKILLed when dropped. gunicorn's own workers do not die with their
/// master (see `sigkill_of_drover_leaves_no_gunicorn_worker_behind`), so
/// dropping the `Drover` alone would leave them serving for up to 15 s.
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

/// Kills the given pids (processes of this test's tree) when dropped.
struct KillOnDrop(Vec<u32>);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            if alive(p) {
                // SAFETY: kill(2) on a process of this test's own tree.
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
        }
    }
}

/// SIGCONTs stopped processes even if the test panics half-way.
struct Resume(Vec<u32>);
impl Drop for Resume {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: kill(2) on a process of this test's own tree.
            unsafe { libc::kill(p as i32, libc::SIGCONT) };
        }
    }
}

/// One HTTP/1.1 request on a new TCP connection, with read/write timeouts.
fn request(addr: SocketAddr, method: &str, path: &str) -> io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(IO_LIMIT))?;
    s.set_write_timeout(Some(IO_LIMIT))?;
    exchange(&mut s, method, path, &[], IO_LIMIT)
}

/// `GET /` on the app, asserting a 200 JSON answer.
fn index(addr: SocketAddr) -> serde_json::Value {
    let r = request(addr, "GET", "/").expect("GET /");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn status(addr: SocketAddr, path: &str) -> u16 {
    request(addr, "GET", path)
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
        .status
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid of this test's own process tree.
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
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

/// Children of every thread of `pid` (an orphan is reparented to a thread
/// of its subreaper, not necessarily the main one).
fn all_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Every descendant of `pid`, children first.
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

/// Live (non-zombie) direct children of drover, sorted.
fn live_children(d: &Drover) -> Vec<u32> {
    let mut v: Vec<u32> = all_children(d.pid)
        .into_iter()
        .filter(|&p| alive(p))
        .collect();
    v.sort_unstable();
    v
}

/// The pids of drover's `n` workers, once it has exactly `n` live children.
fn worker_pids(d: &Drover, n: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    let ok = eventually(Duration::from_secs(5), || {
        pids = live_children(d);
        pids.len() == n
    });
    assert!(
        ok,
        "expected {n} live workers, have {pids:?}:\n{}",
        d.log_text()
    );
    pids
}

/// Pids drover logged as "worker started", by pid → worker id.
fn started_workers(d: &Drover) -> HashMap<u32, u64> {
    let log = d.log.lock().unwrap();
    log.iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "worker started")
        .filter_map(|v| Some((v["pid"].as_u64()? as u32, v["worker"].as_u64()?)))
        .collect()
}

/// Waits until at least `n` log lines contain `needle` (gunicorn's and
/// uvicorn's own messages reach drover's stderr, hence its log).
fn wait_log_count(d: &Drover, needle: &str, n: usize, limit: Duration) {
    let count = || {
        d.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    assert!(
        eventually(limit, || count() >= n),
        "{n} log lines with {needle:?} expected within {limit:?}, have {}:\n{}",
        count(),
        d.log_text()
    );
}

/// Waits (at most 3 s) for a log line containing `needle`: the log is read
/// by a thread, so it may lag behind what drover did, even after it exited.
fn wait_log(d: &Drover, needle: &str) {
    wait_log_count(d, needle, 1, Duration::from_secs(3));
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

/// The listening TCP socket on `port` in /proc/net/tcp{,6}: (accept queue
/// length, inode).
fn listen_socket(port: u16) -> Option<(u64, u64)> {
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
                let queue = c[4]
                    .split(':')
                    .nth(1)
                    .and_then(|q| u64::from_str_radix(q, 16).ok())?;
                return Some((queue, c[9].parse().ok()?));
            }
        }
    }
    None
}

/// `n` × `GET /sleep?ms=N`, each on its own connection in a thread; returns
/// once every request is written and the kernel's accept queue is empty
/// (every connection is in an app process), plus a moment for the app to
/// hand it to a handler.
fn slow_requests(addr: SocketAddr, n: usize, ms: u64) -> Vec<JoinHandle<io::Result<Resp>>> {
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_read_timeout(Some(IO_LIMIT))?;
                s.set_write_timeout(Some(IO_LIMIT))?;
                s.write_all(
                    format!(
                        "GET /sleep?ms={ms} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )?;
                let _ = tx.send(());
                read_response(&mut s)
            })
        })
        .collect();
    drop(tx);
    for i in 0..n {
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("slow request {i} was not sent: {e}"));
    }
    let mut q = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            q = listen_socket(addr.port()).map(|(q, _)| q);
            q == Some(0)
        }),
        "the app never accepted the slow requests (accept queue {q:?})"
    );
    std::thread::sleep(Duration::from_millis(300));
    handles
}

/// Asks `GET /` until one answer satisfies `want`; every process that answers
/// otherwise is SIGSTOPped (and resumed when this returns), so the next
/// connection must go to another process. At most `max` processes are paused.
fn answer_where(
    d: &Drover,
    max: usize,
    mut want: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut paused = Resume(Vec::new());
    let mut seen = Vec::new();
    loop {
        let v = index(d.app());
        if want(&v) {
            return v;
        }
        let pid = v["pid"].as_u64().unwrap() as u32;
        seen.push(v);
        assert!(
            paused.0.len() < max && !paused.0.contains(&pid),
            "no wanted answer after pausing {:?}; answers {seen:?}:\n{}",
            paused.0,
            d.log_text()
        );
        send_signal(pid, libc::SIGSTOP);
        paused.0.push(pid);
        assert!(
            eventually(Duration::from_secs(2), || proc_state(pid) == Some('T')),
            "{pid} did not stop"
        );
    }
}

/// The `GET /` answer of each of `n` serving processes, by worker id: each
/// process that answers is paused, so the next answer comes from another one.
/// Waits as long as a process takes to boot (its connection waits queued).
fn identities(d: &Drover, n: usize) -> BTreeMap<u64, serde_json::Value> {
    let mut seen = BTreeMap::new();
    let mut by_pid = BTreeSet::new();
    let _ = answer_where(d, n, |v| {
        let id = v["worker"]
            .as_u64()
            .unwrap_or_else(|| panic!("no worker id in {v}"));
        let pid = v["pid"].as_u64().unwrap();
        assert!(by_pid.insert(pid), "pid {pid} answered twice: {v}");
        if let Some(prev) = seen.insert(id, v.clone()) {
            panic!("two processes answer as worker {id}: {prev} and {v}");
        }
        seen.len() == n
    });
    seen
}

/// Sequential `GET /` requests on fresh connections every `every`, in a
/// thread, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Default, Clone)]
struct LoadReport {
    ok: usize,
    failures: Vec<String>,
    max_latency: Duration,
    /// (when it was answered, the JSON answer).
    answers: Vec<(Instant, serde_json::Value)>,
}

impl Load {
    fn start(addr: SocketAddr, every: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let handle = {
            let (stop, report) = (stop.clone(), report.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = request(addr, "GET", "/");
                    let took = t.elapsed();
                    let mut rep = report.lock().unwrap();
                    rep.max_latency = rep.max_latency.max(took);
                    match r {
                        Ok(r) if r.status == 200 => {
                            rep.ok += 1;
                            rep.answers.push((Instant::now(), r.json()));
                        }
                        Ok(r) => rep
                            .failures
                            .push(format!("status {}: {}", r.status, r.body)),
                        Err(e) => rep.failures.push(format!("{e}")),
                    }
                    drop(rep);
                    std::thread::sleep(every);
                }
            })
        };
        Load {
            stop,
            report,
            handle: Some(handle),
        }
    }

    fn snapshot(&self) -> LoadReport {
        self.report.lock().unwrap().clone()
    }

    fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().expect("load thread");
        }
        self.snapshot()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether a connection to `addr` is refused.
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

/// Whether `n` appears in `text` as a number of its own.
fn has_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|t| t == n.to_string())
}

/// Explicit loopback listener and admin addresses on free ports.
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

/// A contexts file with one `{shard: i}` item per worker.
fn shard_contexts(dir: &TempDir, n: usize) -> PathBuf {
    let yaml: String = (0..n).map(|i| format!("- {{shard: {i}}}\n")).collect();
    dir.file("ctx.yaml", &yaml)
}

/// Prints a measurement (shown with `--nocapture`).
fn measure(what: &str, value: impl std::fmt::Debug) {
    eprintln!("[measure] {what}: {value:?}");
}

// -------------------------------------------- 1-3: one socket, N programs

/// gunicorn as the worker command: with a contexts file of three items,
/// drover runs three gunicorn masters (its children), each with one sync
/// worker of its own; each answers from a distinct pid with its own worker
/// id, `DROVER_WORKERS=3` and exactly its own item of the contexts.
#[test]
fn gunicorn_workers_answer_with_their_own_context() {
    let dir = TempDir::new("gunicorn-ctx");
    let ctx = shard_contexts(&dir, 3);
    let d = run(
        &[
            "--workers",
            "3",
            "--worker-contexts-file",
            ctx.to_str().unwrap(),
        ],
        &gunicorn(&[]),
    );
    let masters = worker_pids(&d, 3);
    let seen = identities(&d, 3);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    let started = started_workers(&d);
    let mut parents = BTreeSet::new();
    for (id, v) in &seen {
        assert_eq!(v["context"], serde_json::json!({ "shard": id }), "{v}");
        assert_eq!(v["workers"].as_u64(), Some(3), "{v}");
        let pid = v["pid"].as_u64().unwrap() as u32;
        let master = v["ppid"].as_u64().unwrap() as u32;
        assert!(
            masters.contains(&master),
            "worker {id} (pid {pid}) is not the child of a gunicorn master drover started ({masters:?})"
        );
        assert!(!masters.contains(&pid), "the master itself answered: {v}");
        assert_eq!(
            started.get(&master),
            Some(id),
            "master {master} was not started as worker {id}"
        );
        assert!(parents.insert(master), "two answers from master {master}");
    }
}

/// uvicorn (`--fd 3`) as the worker command: two workers, each a direct
/// child of drover, answer from distinct pids with their own id and context.
#[test]
fn uvicorn_workers_answer_with_their_own_context() {
    let dir = TempDir::new("uvicorn-ctx");
    let ctx = shard_contexts(&dir, 2);
    let d = run(
        &["--worker-contexts-file", ctx.to_str().unwrap()],
        &uvicorn(),
    );
    let pids = worker_pids(&d, 2);
    let seen = identities(&d, 2);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    let started = started_workers(&d);
    for (id, v) in &seen {
        assert_eq!(v["context"], serde_json::json!({ "shard": id }), "{v}");
        let pid = v["pid"].as_u64().unwrap() as u32;
        assert!(pids.contains(&pid), "{pid} is not a child of drover");
        assert_eq!(started.get(&pid), Some(id), "{v}");
    }
}

/// A plain socket-activation server (`fromfd_server.py`, which exits 3 unless
/// LISTEN_PID is its own pid and LISTEN_FDS=1): each of two workers answers
/// with its own id and context, and saw `LISTEN_PID` equal to its own pid,
/// `LISTEN_FDNAMES=http` and `DROVER_STOP_FD=4`.
#[test]
fn fromfd_server_workers_get_the_socket_activation_environment() {
    let dir = TempDir::new("fromfd-ctx");
    let ctx = shard_contexts(&dir, 2);
    let d = run(
        &["--worker-contexts-file", ctx.to_str().unwrap()],
        &fromfd(&[]),
    );
    let pids = worker_pids(&d, 2);
    let seen = identities(&d, 2);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    for (id, v) in &seen {
        let pid = v["pid"].as_u64().unwrap();
        assert!(
            pids.contains(&(pid as u32)),
            "{pid} is not a child of drover"
        );
        assert_eq!(v["context"], serde_json::json!({ "shard": id }), "{v}");
        assert_eq!(v["listen_pid"], serde_json::json!(pid.to_string()), "{v}");
        assert_eq!(v["listen_fdnames"], "http", "{v}");
        assert_eq!(v["stop_fd"], "4", "{v}");
    }
    assert!(
        !d.log_contains("exited on its own"),
        "a worker exited (wrong LISTEN_PID?):\n{}",
        d.log_text()
    );
}

// ------------------------------------------------------ 4: leaked descriptors

/// The descriptors a worker holds right after exec: (fd number → link target).
fn fds_of(pid: u32) -> BTreeMap<u32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Asserts each worker (`sleep`, which opens nothing) holds exactly fds
/// 0, 1, 2, 3 (the app's listening socket) and 4 (a socket: the stop fd).
fn assert_exact_worker_fds(d: &Drover) {
    let pids = worker_pids(d, 2);
    wait_log_count(d, "\"worker started\"", 2, Duration::from_secs(5));
    // One listening socket, or one per worker with --balance reuseport.
    let inodes = listen_inodes(d.app().port());
    assert!(!inodes.is_empty(), "no listening socket on the app's port");
    for pid in pids {
        let fds = fds_of(pid);
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4],
            "descriptors of worker {pid}: {fds:?}"
        );
        assert!(
            inodes.iter().any(|i| fds[&3] == format!("socket:[{i}]")),
            "fd 3 of {pid} is {}, not a listening socket of the app's port {inodes:?}",
            fds[&3]
        );
        assert!(
            fds[&4].starts_with("socket:") && fds[&4] != fds[&3],
            "fd 4 of {pid}: {fds:?}"
        );
    }
}

/// A worker gets exactly fds 0-4: no descriptor of drover's own (admin
/// socket, epoll, control sockets of other workers) leaks into it.
#[test]
fn worker_holds_exactly_fds_0_to_4() {
    let d = run(&["--workers", "2"], &["/bin/sleep".into(), "30".into()]);
    assert_exact_worker_fds(&d);
}

/// A descriptor drover itself inherited without close-on-exec (fd 9, opened
/// by the shell that execs drover) is not passed on: the workers still hold
/// exactly fds 0-4.
#[test]
fn descriptor_inherited_by_drover_does_not_reach_workers() {
    let args = [
        "-c",
        "exec 9</dev/null; exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_drover"),
        "--workers",
        "2",
        "--",
        "/bin/sleep",
        "30",
    ];
    // `start_with` puts the port options before the `--`.
    let d = Service(start_with("/bin/bash".into(), &args, &[]));
    // Precondition: drover (the shell exec'd it, same pid) holds fd 9, inheritable.
    let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/9", d.pid))
        .unwrap_or_else(|e| panic!("drover has no fd 9: {e}"));
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .expect("flags in fdinfo");
    assert_eq!(
        flags & libc::O_CLOEXEC as u32,
        0,
        "precondition: drover's fd 9 must not be close-on-exec"
    );
    assert_exact_worker_fds(&d);
}

// ------------------------------------------------ 5: a worker is SIGKILLed

/// `kill -9` of one gunicorn master (a drover worker) while a client sends a
/// request every 20 ms: the service keeps answering, a new master replaces
/// it within 3 s, `drover_worker_restarts_total` counts 1 for that worker
/// (none for the other), and the replacement serves as the same worker id.
///
/// No request may fail: the killed process is the master, which never
/// handles a request itself. Its sync worker is not killed with it: it
/// finishes what it accepted (as an orphan it may even serve one more, see
/// `children_of_a_killed_worker_do_not_keep_serving`), and the other master
/// keeps accepting from the shared socket meanwhile.
#[test]
fn sigkilled_gunicorn_master_is_replaced_while_the_service_keeps_answering() {
    let d = run(&["--workers", "2"], &gunicorn(&[]));
    let before = worker_pids(&d, 2);
    let seen = identities(&d, 2);
    let victim = before[0];
    let id = *started_workers(&d)
        .get(&victim)
        .expect("victim's worker id");
    let orphan = seen[&id]["pid"].as_u64().unwrap() as u32;

    let load = Load::start(d.app(), Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(200));
    let killed_at = Instant::now();
    send_signal(victim, libc::SIGKILL);
    let mut now = Vec::new();
    let ok = eventually(Duration::from_secs(3), || {
        now = live_children(&d)
            .into_iter()
            .filter(|p| started_workers(&d).contains_key(p))
            .collect();
        now.len() == 2 && !now.contains(&victim)
    });
    assert!(
        ok,
        "no replacement for worker {id} within 3 s; workers {now:?}:\n{}",
        d.log_text()
    );
    let fresh: Vec<u32> = now
        .iter()
        .copied()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(fresh.len(), 1, "before {before:?}, now {now:?}");
    let fresh = fresh[0];
    measure(
        "gunicorn master SIGKILL → replacement started",
        killed_at.elapsed(),
    );
    assert_eq!(started_workers(&d).get(&fresh), Some(&id));
    wait_metric(
        &d,
        &format!("drover_worker_restarts_total{{worker=\"{id}\"}}"),
        1.0,
        Duration::from_secs(3),
    );
    let other = 1 - id;
    let c = d.metric(&format!(
        "drover_worker_restarts_total{{worker=\"{other}\"}}"
    ));
    assert!(
        matches!(c, None | Some(0.0)),
        "worker {other} counted: {c:?}"
    );

    // The service answers within 3 s of the kill (it never stopped).
    assert!(
        eventually(Duration::from_secs(3), || load
            .snapshot()
            .answers
            .iter()
            .any(|(t, _)| *t > killed_at)),
        "no answer after the kill"
    );
    std::thread::sleep(Duration::from_millis(500));
    let rep = load.finish();
    let by_orphan = rep
        .answers
        .iter()
        .filter(|(t, v)| *t > killed_at && v["pid"].as_u64() == Some(u64::from(orphan)))
        .count();
    measure(
        "requests answered by the killed master's orphaned worker",
        by_orphan,
    );
    measure(
        "load: ok / failed / max latency",
        (rep.ok, rep.failures.len(), rep.max_latency),
    );
    assert!(
        rep.failures.is_empty(),
        "{} of {} requests failed around the kill: {:?}",
        rep.failures.len(),
        rep.ok + rep.failures.len(),
        rep.failures
    );

    // The replacement serves as worker `id`.
    let v = answer_where(&d, 3, |v| v["ppid"].as_u64() == Some(u64::from(fresh)));
    assert_eq!(v["worker"].as_u64(), Some(id), "{v}");
}

/// A worker that dies leaves nothing serving in its name: when a gunicorn
/// master is SIGKILLed, its own sync worker (now an orphan adopted by
/// drover, still holding the listening socket and `DROVER_WORKER_ID`) must
/// not keep accepting next to the replacement with the same worker id and
/// context. Today drover adopts and reaps it but never signals it; it
/// serves until its wait loop notices the new parent (up to gunicorn's
/// `--timeout`/2 = 15 s, or right after its next request).
#[test]
fn children_of_a_killed_worker_do_not_keep_serving() {
    let d = run(&["--workers", "2"], &gunicorn(&[]));
    let masters = worker_pids(&d, 2);
    let seen = identities(&d, 2);
    let victim = masters[0];
    let id = started_workers(&d)[&victim];
    let orphan = seen[&id]["pid"].as_u64().unwrap() as u32;
    let _cleanup = KillOnDrop(vec![orphan]);
    send_signal(victim, libc::SIGKILL);
    let ok = eventually(Duration::from_secs(2), || !alive(orphan));
    assert!(
        ok,
        "gunicorn worker {orphan} of the killed master {victim} (worker {id}) is alive 2 s later, \
         a child of drover: {}",
        all_children(d.pid).contains(&orphan)
    );
}

// ------------------------------------------- 6: drain with requests in flight

/// SIGTERM to drover with four 1.5 s requests in flight: each completes with
/// 200, drover exits 0, the workers logged `worker_log`, the port is closed
/// and the whole tree is gone. Returns how long drover took to exit.
fn sigterm_drains(d: &mut Service, worker_log: &str) -> Duration {
    let app = d.app();
    let tree = descendants(d.pid);
    let slow = slow_requests(app, 4, 1500);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    for (i, h) in slow.into_iter().enumerate() {
        let r = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight request {i} failed: {e}\n{}", d.log_text()));
        assert_eq!(r.status, 200, "in-flight request {i}: {r:?}");
        assert!(r.body.contains("1500"), "in-flight request {i}: {r:?}");
    }
    let st = d.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
    wait_log(d, worker_log);
    assert!(
        refused(app),
        "the app port still accepts after drover exited"
    );
    let left: Vec<_> = tree.iter().filter(|&&p| alive(p)).collect();
    assert!(left.is_empty(), "outlived drover: {left:?}");
    took
}

/// SIGTERM (the default `--stop-signal TERM`, gunicorn's graceful shutdown)
/// with four 1.5 s requests in flight in two gunicorn masters (gthread, 4
/// threads each): all four complete with 200, drover exits 0, the port is
/// closed and every process of the tree is gone.
#[test]
fn sigterm_drains_gunicorn_without_losing_in_flight_requests() {
    let mut d = run(&["--workers", "2"], &gunicorn(&["--threads", "4"]));
    wait_log_count(&d, "Booting worker with pid", 2, Duration::from_secs(10));
    let took = sigterm_drains(&mut d, "Handling signal: term");
    measure(
        "gunicorn: SIGTERM → drover exit, 1.5 s requests in flight",
        took,
    );
}

/// The same for uvicorn (SIGTERM is its graceful shutdown): four 1.5 s
/// requests in flight in two uvicorn workers complete with 200, exit 0.
#[test]
fn sigterm_drains_uvicorn_without_losing_in_flight_requests() {
    let mut d = run(&["--workers", "2"], &uvicorn());
    wait_log_count(
        &d,
        "Application startup complete",
        2,
        Duration::from_secs(10),
    );
    let took = sigterm_drains(&mut d, "Shutting down");
    measure(
        "uvicorn: SIGTERM → drover exit, 1.5 s requests in flight",
        took,
    );
}

/// `--stop-signal QUIT` reaches gunicorn as SIGQUIT, its *quick* shutdown:
/// gunicorn logs it, drops a 4 s request in flight, and drover exits long
/// before that request could have finished. (Not lossless, by gunicorn's
/// design; use the default TERM for a graceful drain.)
#[test]
fn stop_signal_quit_is_delivered_to_gunicorn() {
    let mut d = run(&["--workers", "1", "--stop-signal", "QUIT"], &gunicorn(&[]));
    wait_log_count(&d, "Booting worker with pid", 1, Duration::from_secs(10));
    let slow = slow_requests(d.app(), 1, 4000);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(3));
    let took = t0.elapsed();
    // gunicorn says it got SIGQUIT.
    wait_log(&d, "Handling signal: quit");
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    measure("gunicorn --stop-signal QUIT: SIGTERM → drover exit", took);
    measure("gunicorn --stop-signal QUIT: drover exit status", st);
    let r = slow.into_iter().next().unwrap().join().unwrap();
    measure(
        "gunicorn --stop-signal QUIT: the in-flight 4 s request",
        r.as_ref().map(|r| r.status).map_err(|e| e.to_string()),
    );
}

// --------------------------------------------- 7: a worker asks to stop all

/// A gunicorn app that writes one byte to `DROVER_STOP_FD` (`GET /stop`)
/// stops the whole service: `/readyz` turns 503, the stop is counted as
/// `source="worker"`, drover exits 0 and every process it started (gunicorn
/// masters and their workers) is gone.
#[test]
fn stop_fd_written_by_a_gunicorn_app_stops_the_whole_tree() {
    let mut d = run(&["--workers", "2", "--drain-delay", "1s"], &gunicorn(&[]));
    worker_pids(&d, 2);
    let _ = identities(&d, 2);
    let tree = descendants(d.pid);
    assert_eq!(tree.len(), 4, "two masters with one worker each: {tree:?}");
    // Up once drover has seen each worker accept (a look every 20 ms).
    assert!(
        eventually(Duration::from_secs(5), || status(d.admin, "/readyz") == 200),
        "{}",
        d.log_text()
    );

    let r = request(d.app(), "GET", "/stop").expect("GET /stop");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["stopping"], serde_json::json!(true), "{r:?}");
    assert!(
        eventually(Duration::from_millis(800), || status(d.admin, "/readyz")
            == 503),
        "readyz did not turn 503:\n{}",
        d.log_text()
    );
    let m = request(d.admin, "GET", "/metrics").unwrap().body;
    let worker = metric_value(&m, "drover_stop_requests_total{source=\"worker\"}");
    assert!(worker.is_some_and(|n| n >= 1.0), "{m}");
    assert_eq!(metric_value(&m, "drover_draining"), Some(1.0), "{m}");
    let t0 = Instant::now();
    let st = d.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
    measure(
        "gunicorn: stop via DROVER_STOP_FD, drain delay 1 s → exit",
        t0.elapsed(),
    );
    let left: Vec<_> = tree.iter().filter(|&&p| alive(p)).collect();
    assert!(left.is_empty(), "outlived drover: {left:?}");
}

// --------------------------------------------------- 8: rolling restart (HUP)

/// SIGHUP under a light steady load (a fresh-connection `GET /` every 20 ms):
/// every worker is replaced — afterwards no worker pid is one of before —
/// and not one request fails. `serving_pid` says which drover worker an
/// answer came from.
fn hup_replaces_every_worker_without_failures(
    d: &Service,
    serving_pid: impl Fn(&serde_json::Value) -> u32,
) {
    let before = worker_pids(d, 2);
    let _ = identities(d, 2);
    let load = Load::start(d.app(), Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    d.signal(libc::SIGHUP);
    let mut now = Vec::new();
    let ok = eventually(Duration::from_secs(8), || {
        now = live_children(d);
        now.len() == 2 && now.iter().all(|p| !before.contains(p))
    });
    assert!(
        ok,
        "workers before {before:?}, now {now:?}:\n{}",
        d.log_text()
    );
    assert!(
        eventually(Duration::from_secs(8), || d
            .log_contains("rolling restart done")),
        "{}",
        d.log_text()
    );
    // Until the new workers answer, then a little longer.
    let ok = eventually(Duration::from_secs(8), || {
        load.snapshot()
            .answers
            .iter()
            .any(|(_, v)| now.contains(&serving_pid(v)))
    });
    assert!(ok, "no answer from a new worker {now:?}");
    let rolled = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let rep = load.finish();
    measure("HUP → every worker replaced and serving", rolled);
    measure(
        "HUP load: ok / failed / max latency",
        (rep.ok, rep.failures.len(), rep.max_latency),
    );
    assert!(
        rep.failures.is_empty(),
        "{} of {} requests failed during the rolling restart: {:?}\n{}",
        rep.failures.len(),
        rep.ok + rep.failures.len(),
        rep.failures,
        d.log_text()
    );
    assert!(
        rep.ok >= 10,
        "too few requests to mean anything: {}",
        rep.ok
    );
    assert_eq!(live_children(d), now, "workers changed again");
}

/// SIGHUP with `fromfd_server.py` workers (SIGTERM: close the socket, finish
/// the current connection): every worker replaced, no request fails.
#[test]
fn hup_rolls_fromfd_server_workers_without_failed_requests() {
    let d = run(&["--workers", "2"], &fromfd(&[]));
    hup_replaces_every_worker_without_failures(&d, |v| v["pid"].as_u64().unwrap() as u32);
}

/// SIGHUP with gunicorn masters: every master replaced, no request fails
/// (connections wait in the shared socket's queue while masters boot).
#[test]
fn hup_rolls_gunicorn_masters_without_failed_requests() {
    let d = run(&["--workers", "2"], &gunicorn(&[]));
    hup_replaces_every_worker_without_failures(&d, |v| v["ppid"].as_u64().unwrap() as u32);
}

/// With `--worker-ready notify` an external worker is up only once it
/// sends READY=1 to `$NOTIFY_SOCKET` (gunicorn does when its master has
/// booted), so a HUP replaces gunicorn masters strictly one at a time: the
/// second replacement starts only after the first one reported READY=1.
/// (With the default `--worker-ready running`, a running process is up.)
#[test]
fn hup_replaces_gunicorn_masters_one_at_a_time() {
    let d = run(
        &["--workers", "2", "--worker-ready", "notify"],
        &gunicorn(&[]),
    );
    wait_log_count(&d, "Booting worker with pid", 2, Duration::from_secs(10));
    d.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || d
            .log_contains("rolling restart done")),
        "{}",
        d.log_text()
    );
    wait_log_count(&d, "Booting worker with pid", 4, Duration::from_secs(10));
    let log = d.log.lock().unwrap().clone();
    let hup = log
        .iter()
        .position(|l| l.contains("SIGHUP: rolling restart"))
        .expect("HUP logged");
    let starts: Vec<usize> = (hup..log.len())
        .filter(|&i| log[i].contains("\"worker started\""))
        .collect();
    assert_eq!(starts.len(), 2, "{}", log.join("\n"));
    // gunicorn says READY=1 once its master listens (its worker boots just
    // after): the next replacement must wait for that report.
    let booted_between = (starts[0]..starts[1]).any(|i| log[i].contains("worker reported READY=1"));
    assert!(
        booted_between,
        "the second master was replaced before the first replacement booted:\n{}",
        log[hup..].join("\n")
    );
}

/// `--worker-ready notify`: `/readyz` stays 503 while a worker has not said
/// READY=1 (a plain socket-activated script never does), and turns 200 once
/// every worker has (gunicorn).
#[test]
fn notify_readiness_waits_for_ready_1() {
    let silent = run(
        &["--workers", "1", "--worker-ready", "notify"],
        &fromfd(&[]),
    );
    assert!(eventually(Duration::from_secs(3), || {
        http(silent.app(), "GET", "/", &[]).map(|r| r.status).ok() == Some(200)
    }));
    assert_eq!(
        http(silent.admin, "GET", "/readyz", &[]).unwrap().status,
        503
    );
    drop(silent);
    let gunicorns = run(
        &["--workers", "2", "--worker-ready", "notify"],
        &gunicorn(&[]),
    );
    assert!(
        eventually(Duration::from_secs(10), || http(
            gunicorns.admin,
            "GET",
            "/readyz",
            &[]
        )
        .map(|r| r.status)
        .ok()
            == Some(200)),
        "{}",
        gunicorns.log_text()
    );
    assert!(gunicorns.log_contains("worker reported READY=1"));
}

// ---------------------------------------------------------- 9: zombies, exits

/// drover is the subreaper of its workers' orphans: with workers that fork a
/// grandchild (sleeps 0.2 s) and exit at once, restarted again and again
/// (`--restart always`), no child of drover stays a zombie: over 2 s of
/// sampling, no pid is seen as a zombie child of drover 300 ms apart. At
/// least one orphan must have been adopted, or the test proves nothing.
#[test]
fn orphans_of_workers_are_reaped_promptly() {
    let d = run(
        &["--workers", "2", "--restart", "always"],
        &fromfd(&["--fork-and-exit"]),
    );
    let mut zombie_since: HashMap<u32, Instant> = HashMap::new();
    let mut seen_children = BTreeSet::new();
    let mut stuck = Vec::new();
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        let now = Instant::now();
        let kids = all_children(d.pid);
        zombie_since.retain(|p, _| kids.contains(p));
        for p in kids {
            seen_children.insert(p);
            if proc_state(p) == Some('Z') {
                let since = *zombie_since.entry(p).or_insert(now);
                if now - since >= Duration::from_millis(300) {
                    stuck.push(p);
                }
            } else {
                zombie_since.remove(&p);
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        stuck.is_empty(),
        "zombie children of drover for 300 ms or more: {stuck:?}:\n{}",
        d.log_text()
    );
    // Stop, so that every "worker started" line is in the log once the
    // drain's own line is: then a child not logged as a worker is an orphan.
    let mut d = d;
    d.signal(libc::SIGTERM);
    d.wait_exit(Duration::from_secs(5));
    wait_log(&d, "stop requested: draining");
    let workers = started_workers(&d);
    let orphans: Vec<_> = seen_children
        .iter()
        .filter(|p| !workers.contains_key(p))
        .collect();
    measure(
        "worker starts / adopted orphans seen",
        (workers.len(), orphans.len()),
    );
    assert!(
        !orphans.is_empty(),
        "precondition: no orphan was adopted by drover (children {seen_children:?}, workers {workers:?})"
    );
    assert!(
        workers.len() >= 4,
        "workers were not restarted: {workers:?}"
    );
}

/// `--restart on-failure` with workers that exit 0: they are not restarted,
/// and once every worker has exited drover exits 0, saying so.
#[test]
fn restart_on_failure_exits_zero_when_every_worker_exited_zero() {
    let mut d = run(
        &["--workers", "2", "--restart", "on-failure"],
        &fromfd(&["--fork-and-exit"]),
    );
    let st = d.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
    // Once drover's last line is read, every earlier one is too.
    wait_log(&d, "every worker has exited");
    assert_eq!(started_workers(&d).len(), 2, "{}", d.log_text());
}

/// `--restart never` with a worker that exits 3: drover exits 1 once every
/// worker is gone.
#[test]
fn restart_never_exits_one_when_a_worker_failed() {
    let mut d = run(
        &["--workers", "2", "--restart", "never"],
        &[
            "/bin/sh".into(),
            "-c".into(),
            "[ \"$DROVER_WORKER_ID\" = 0 ] && exit 3; exit 0".into(),
        ],
    );
    let st = d.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{}", d.log_text());
    // Once drover's last line is read, every earlier one is too.
    wait_log(&d, "every worker has exited");
}

// -------------------------------------------------- 10: commands that cannot run

/// Runs drover with `cmd` as the worker command; asserts exit 78, that the
/// message names the program and says each of `needles`, and that nothing
/// was started.
fn assert_command_refused(cmd: &[&str], needles: &[&str]) -> String {
    let mut args: Vec<&str> = LOOPBACK.to_vec();
    args.extend(["--workers", "2", "--"]);
    args.extend(cmd);
    let (code, out) = run_to_exit(&args);
    assert_eq!(code, 78, "drover -- {cmd:?} should exit 78:\n{out}");
    for n in needles.iter().chain([&cmd[0]]) {
        assert!(
            out.contains(n),
            "message for {cmd:?} should mention {n:?}:\n{out}"
        );
    }
    assert!(!out.contains("worker started"), "a worker started:\n{out}");
    assert!(
        !out.contains("listening on"),
        "bound before checking:\n{out}"
    );
    out
}

/// A command that does not exist (a path, or a name not in PATH) exits 78
/// at start with "does not exist" / "not found" and the shell's 127.
#[test]
fn missing_command_exits_78_with_127_detail() {
    let out = assert_command_refused(&["/nonexistent/prog", "x"], &["does not exist"]);
    assert!(has_number(&out, 127), "{out}");
    let out = assert_command_refused(&["drover-no-such-command-1b3e"], &["not found"]);
    assert!(has_number(&out, 127), "{out}");
}

/// A file without execute permission (mode 0644) exits 78 with the shell's
/// 126; so does a directory.
#[test]
fn non_executable_command_exits_78_with_126_detail() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("noexec");
    let f = dir.file("app.sh", "#!/bin/sh\necho hi\n");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    // As root, access(X_OK) is still false for a file with no x bit at all.
    let out = assert_command_refused(&[f.to_str().unwrap()], &["not executable"]);
    assert!(has_number(&out, 126), "{out}");
    let out = assert_command_refused(&[dir.path().to_str().unwrap()], &["directory"]);
    assert!(has_number(&out, 126), "{out}");
}

/// A script whose interpreter does not exist passes the start-time checks
/// (it exists and is executable) but every `execve` fails with ENOENT. Like
/// a missing command, that is a configuration error: exit 78, naming the
/// script and its interpreter — not a crash loop of workers that logs only
/// "No such file or directory", and not one that ignores `--restart never`.
#[test]
fn command_whose_exec_fails_exits_78() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("bad-interp");
    let f = dir.file("app.sh", "#!/nonexistent/interp\necho hi\n");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = f.to_str().unwrap();
    let mut d = Service(start(&[
        "--workers",
        "2",
        "--restart",
        "never",
        "--",
        script,
    ]));
    let st = d.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(78), "{}", d.log_text());
    wait_log(&d, script);
    wait_log(&d, "/nonexistent/interp");
}

// ------------------------------------------------ 11: SIGKILL of the supervisor

/// SIGKILL to drover: the gunicorn masters (its workers) die within 1 s
/// through their parent-death signal, and the masters' own workers follow
/// within 2 s. Those notice their parent is gone only when their wait loop
/// wakes (every `--timeout`/2 s in gunicorn's sync worker); here `--timeout
/// 2`, so at most 1 s. See the ignored test below for gunicorn's defaults.
#[test]
fn sigkill_of_drover_takes_gunicorn_masters_and_their_workers_down() {
    let mut d = run(&["--workers", "2"], &gunicorn(&["--timeout", "2"]));
    let masters = worker_pids(&d, 2);
    let _ = identities(&d, 2);
    let tree = descendants(d.pid);
    let _cleanup = KillOnDrop(tree.clone());
    let grandchildren: Vec<u32> = tree
        .iter()
        .copied()
        .filter(|p| !masters.contains(p))
        .collect();
    assert_eq!(grandchildren.len(), 2, "tree {tree:?}");
    let t0 = Instant::now();
    d.signal(libc::SIGKILL);
    let ok = eventually(Duration::from_secs(1), || {
        masters.iter().all(|&p| !alive(p))
    });
    assert!(ok, "masters alive 1 s after drover's SIGKILL: {masters:?}");
    measure("SIGKILL drover → gunicorn masters dead", t0.elapsed());
    let ok = eventually(Duration::from_secs(2), || {
        grandchildren.iter().all(|&p| !alive(p))
    });
    assert!(
        ok,
        "gunicorn workers alive 2 s after drover's SIGKILL: {grandchildren:?}"
    );
    measure(
        "SIGKILL drover → gunicorn workers (--timeout 2) dead",
        t0.elapsed(),
    );
    let st = d.wait_exit(Duration::from_secs(5));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
}

// ------------------------------------------------------ 12: TTIN / TTOU

/// With one shared context (no contexts file), SIGTTIN adds a worker and
/// SIGTTOU removes one: `drover_workers_desired` and drover's live children
/// follow (2 → 3 → 2).
#[test]
fn ttin_adds_and_ttou_removes_a_worker() {
    let d = run(&["--workers", "2"], &["/bin/sleep".into(), "30".into()]);
    let two = worker_pids(&d, 2);
    wait_metric(&d, "drover_workers_desired", 2.0, Duration::from_secs(2));
    d.signal(libc::SIGTTIN);
    wait_metric(&d, "drover_workers_desired", 3.0, Duration::from_secs(3));
    let three = worker_pids(&d, 3);
    assert!(two.iter().all(|p| three.contains(p)), "{two:?} → {three:?}");
    wait_log(&d, "SIGTTIN: adding a worker");
    d.signal(libc::SIGTTOU);
    wait_metric(&d, "drover_workers_desired", 2.0, Duration::from_secs(3));
    let after = worker_pids(&d, 2);
    wait_log(&d, "SIGTTOU: removing a worker");
    wait_metric(&d, "drover_workers_running", 2.0, Duration::from_secs(3));
    assert!(
        after.iter().all(|p| three.contains(p)),
        "{three:?} → {after:?}"
    );
}

/// With a per-worker contexts sequence the count is fixed: SIGTTIN and
/// SIGTTOU are ignored (the log says so) and nothing changes.
#[test]
fn ttin_and_ttou_are_ignored_with_per_worker_contexts() {
    let dir = TempDir::new("ttin-seq");
    let ctx = shard_contexts(&dir, 2);
    let d = run(
        &["--worker-contexts-file", ctx.to_str().unwrap()],
        &["/bin/sleep".into(), "30".into()],
    );
    let before = worker_pids(&d, 2);
    d.signal(libc::SIGTTIN);
    assert!(
        eventually(Duration::from_secs(3), || d.log_contains("SIGTTIN ignored")),
        "{}",
        d.log_text()
    );
    d.signal(libc::SIGTTOU);
    assert!(
        eventually(Duration::from_secs(3), || d.log_contains("SIGTTOU ignored")),
        "{}",
        d.log_text()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.metric("drover_workers_desired"), Some(2.0));
    assert_eq!(live_children(&d), before);
}

// ------------------------------------------------------ 13: --restart never

/// `--restart never`: a worker killed with SIGKILL is not restarted; the
/// other one keeps serving, drover keeps running with one worker.
#[test]
fn restart_never_does_not_replace_a_killed_worker() {
    let mut d = run(&["--workers", "2", "--restart", "never"], &fromfd(&[]));
    let pids = worker_pids(&d, 2);
    let seen = identities(&d, 2);
    let victim = pids[0];
    let id = started_workers(&d)[&victim];
    let survivor = pids[1];
    send_signal(victim, libc::SIGKILL);
    assert!(
        eventually(Duration::from_secs(3), || d
            .log_contains("exited on its own")),
        "{}",
        d.log_text()
    );
    wait_metric(&d, "drover_workers_running", 1.0, Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(live_children(&d), vec![survivor], "{}", d.log_text());
    assert_eq!(started_workers(&d).len(), 2, "a worker was started again");
    let c = d.metric(&format!("drover_worker_restarts_total{{worker=\"{id}\"}}"));
    assert!(matches!(c, None | Some(0.0)), "restart counted: {c:?}");
    for _ in 0..5 {
        let v = index(d.app());
        assert_eq!(v["pid"].as_u64(), Some(u64::from(survivor)), "{v}");
    }
    assert!(d.try_status().is_none(), "drover exited:\n{}", d.log_text());
    assert_eq!(seen.len(), 2);
}
