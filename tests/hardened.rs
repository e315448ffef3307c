//! Hardened edges (issue 13): what an attacker, a careless writer or a
//! rotated Secret does to drover, end to end with the real binary on
//! loopback. Every test bounds its time and holds at most a few hundred
//! connections; the 2000-connection figure is measured by `bench/admin_flood.py`.

mod common;
use common::*;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One request on a new connection, every step bounded by `limit`; returns
/// the response and how long the whole exchange took.
fn timed(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    limit: Duration,
) -> (io::Result<Resp>, Duration) {
    let t0 = Instant::now();
    let r = (|| {
        let mut s = TcpStream::connect_timeout(&addr, limit)?;
        s.set_read_timeout(Some(limit))?;
        s.set_write_timeout(Some(limit))?;
        exchange(&mut s, method, path, headers, limit)
    })();
    (r, t0.elapsed())
}

fn post_stop(d: &Drover, token: Option<&str>) -> u16 {
    let auth = token.map(|t| format!("Bearer {t}"));
    let h: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    timed(d.admin, "POST", "/admin/stop", &h, Duration::from_secs(5))
        .0
        .expect("POST /admin/stop")
        .status
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (drover
/// inherits it), so that a few hundred connections fit on both sides.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// A connection whose connect is started but not awaited (an attacker
/// does not wait for the handshake either).
fn open_nonblocking(addr: SocketAddr) -> Option<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    s.set_nonblocking(true).ok()?;
    match s.connect(&addr.into()) {
        Ok(()) => Some(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Some(s),
        Err(_) => None,
    }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn wait_metric(d: &Drover, series: &str, want: f64, limit: Duration) {
    let mut last = None;
    let ok = eventually(limit, || {
        last = d.metric(series);
        last == Some(want)
    });
    assert!(
        ok,
        "{series} never became {want} (last {last:?}):\n{}",
        d.log_text()
    );
}

fn reloads(d: &Drover, result: &str) -> f64 {
    d.metric(&format!(
        "drover_contexts_reloads_total{{result=\"{result}\"}}"
    ))
    .unwrap_or(-1.0)
}

fn info(version: &str) -> String {
    format!("drover_contexts_info{{source=\"file\",version=\"{version}\"}}")
}

/// Runs `drover ARGS` to its end (10 s bound); (exit code, all output).
fn run_bounded(args: &[&str]) -> (i32, String) {
    let mut child = std::process::Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
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
            panic!("drover {args:?} did not exit within 10 s (it hangs)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `drover check` and a run both refuse `args` with exit 78, saying every
/// one of `needles`, and the run starts nothing.
fn assert_refused_by_check_and_start(args: &[&str], needles: &[&str]) {
    let mut check = vec!["check"];
    check.extend_from_slice(args);
    let mut run = args.to_vec();
    run.extend_from_slice(&[
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--admin-host",
        "127.0.0.1",
        "--admin-port",
        "0",
    ]);
    for argv in [check, run] {
        let (code, out) = run_bounded(&argv);
        assert_eq!(code, 78, "drover {argv:?}:\n{out}");
        for n in needles {
            assert!(
                out.contains(n),
                "drover {argv:?} does not say {n:?}:\n{out}"
            );
        }
        assert!(!out.contains("listening on"), "started anyway:\n{out}");
    }
}

// ------------------------------------------------------ 1. admin flood

/// With 600 attacker connections held on the admin port (idle ones,
/// slowloris headers trickling in, keep-alive connections that never read
/// their answer) and 200 more opened per second, every `/healthz`,
/// `/readyz` and `/metrics` probe over 3 s answers 200 within 1 s, and so
/// does the final `POST /admin/stop` (202). Drover really held the
/// connections (its descriptor count shows them).
#[test]
fn admin_port_answers_every_probe_within_a_second_under_a_connection_flood() {
    raise_nofile();
    let d = start(&["--workers", "1"]);
    d.wait_ready();
    let admin = d.admin;
    let fds_before = fd_count(d.pid);

    let mut idle: Vec<socket2::Socket> = (0..250).filter_map(|_| open_nonblocking(admin)).collect();
    let slow: Vec<socket2::Socket> = (0..150).filter_map(|_| open_nonblocking(admin)).collect();
    let keep: Vec<socket2::Socket> = (0..200).filter_map(|_| open_nonblocking(admin)).collect();
    std::thread::sleep(Duration::from_millis(200));
    for s in &slow {
        let _ = (&*s).write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    }
    for s in &keep {
        let _ = (&*s).write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Slowloris: one more header line every 300 ms, never the end.
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in &slow {
                    let _ = (&*s).write(b"X-a: b\r\n");
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    // Churn: 200 new idle connections a second, the oldest dropped.
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = open_nonblocking(admin) {
                    held.push_back(s);
                }
                if held.len() > 200 {
                    held.pop_front();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let mut failures = Vec::new();
    let mut probes = 0;
    let mut worst = Duration::ZERO;
    let mut held_fds = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (r, took) = timed(admin, "GET", path, &[], Duration::from_secs(1));
            probes += 1;
            worst = worst.max(took);
            match r {
                Ok(r) if r.status == 200 && took < Duration::from_secs(1) => {}
                other => failures.push(format!(
                    "{path}: {:?} after {took:?}",
                    other.map(|r| r.status)
                )),
            }
        }
        held_fds = held_fds.max(fd_count(d.pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let evicted = d.metric("drover_admin_connections_evicted_total");
    let (stop_r, stop_took) = timed(admin, "POST", "/admin/stop", &[], Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let _ = trickle.join();
    let _ = churn.join();
    idle.clear();

    assert!(
        failures.is_empty(),
        "{} of {probes} probes failed (worst {worst:?}): {failures:#?}",
        failures.len()
    );
    assert_eq!(
        stop_r.as_ref().map(|r| r.status).ok(),
        Some(202),
        "stop under flood: {stop_r:?} after {stop_took:?}"
    );
    assert!(
        stop_took < Duration::from_secs(1),
        "stop took {stop_took:?}"
    );
    assert!(
        held_fds >= fds_before + 400,
        "the flood never reached drover: {held_fds} descriptors (from {fds_before})"
    );
    // The cap was reached: the oldest connections made room for new ones.
    assert!(evicted.is_some_and(|n| n >= 50.0), "evicted: {evicted:?}");
    eprintln!("{probes} probes under flood, worst {worst:?}; stop {stop_took:?}; drover held {held_fds} fds; {evicted:?} evicted");
}

// -------------------------------------------------- 2. loopback = the pod

/// Without a token, a stop from 127.0.0.6 (where Istio's sidecar delivers
/// inbound mesh traffic from) is 403 and stops nothing; from 127.0.0.1 it
/// is 202.
#[test]
fn without_a_token_a_stop_from_127_0_0_6_is_forbidden() {
    let d = start(&["--workers", "1", "--drain-delay", "1s"]);
    d.wait_ready();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let mesh: SocketAddr = "127.0.0.6:0".parse().unwrap();
    sock.bind(&mesh.into()).expect("bind 127.0.0.6");
    sock.connect_timeout(&d.admin.into(), Duration::from_secs(2))
        .unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.local_addr().unwrap().ip().to_string(), "127.0.0.6");
    let r = exchange(&mut s, "POST", "/admin/stop", &[], Duration::from_secs(5)).unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("127.0.0.1"), "{r:?}");
    assert_eq!(status_of(d.admin, "/readyz"), 200, "a refused stop drained");
    assert_eq!(post_stop(&d, None), 202);
}

fn status_of(addr: SocketAddr, path: &str) -> u16 {
    timed(addr, "GET", path, &[], Duration::from_secs(5))
        .0
        .expect("GET")
        .status
}

// ---------------------------------------------------- 3. bounded contexts

/// A worker context over 127 KiB (one environment variable is capped at
/// 128 KiB by the kernel) is refused by `check` and at start, exit 78
/// naming the limit; nothing starts, so no E2BIG at exec.
#[test]
fn a_worker_context_over_the_env_limit_is_refused_by_check_and_start() {
    let dir = TempDir::new("big-ctx");
    let f = dir.file(
        "ctx.yaml",
        &format!("- small\n- '{}'\n", "x".repeat(130 * 1024)),
    );
    assert_refused_by_check_and_start(
        &["--worker-contexts-file", f.to_str().unwrap()],
        &[
            "worker 1's context",
            "133122 bytes",
            "130048",
            "MAX_ARG_STRLEN",
        ],
    );
}

/// A document over 1 MiB is refused by `check` and at start (exit 78,
/// naming the limit) without being read into memory.
#[test]
fn a_contexts_document_over_one_mib_is_refused_by_check_and_start() {
    let dir = TempDir::new("huge-doc");
    let f = dir.file("ctx.yaml", &format!("# {}\n", "x".repeat(1024 * 1024)));
    assert_refused_by_check_and_start(
        &["--worker-contexts-file", f.to_str().unwrap()],
        &["1048579 bytes", "limit of 1048576 bytes"],
    );
}

/// At reload, a context over the limit is logged and counted as a failed
/// reload, and nothing is restarted: the workers keep their pids and
/// contexts and keep serving; a valid change afterwards is applied.
#[test]
fn a_reload_over_the_limit_is_a_counted_failure_and_restarts_nothing() {
    let dir = TempDir::new("big-reload");
    let f = dir.file("ctx.yaml", "- {shard: 0}\n- {shard: 1}\n");
    let d = start(&["--worker-contexts-file", f.to_str().unwrap()]);
    d.wait_ready();
    let mut before = d.children();
    before.sort();
    assert_eq!(before.len(), 2);
    std::fs::write(
        &f,
        format!("- {{shard: 0}}\n- '{}'\n", "x".repeat(130 * 1024)),
    )
    .unwrap();
    wait_metric(
        &d,
        "drover_contexts_reloads_total{result=\"failure\"}",
        1.0,
        Duration::from_secs(5),
    );
    assert!(d.log_contains("MAX_ARG_STRLEN"), "{}", d.log_text());
    assert_eq!(reloads(&d, "success"), 0.0);
    std::thread::sleep(Duration::from_millis(300));
    let mut after = d.children();
    after.sort();
    assert_eq!(before, after, "workers were replaced:\n{}", d.log_text());
    assert_eq!(status_of(d.admin, "/readyz"), 200);
    assert!(!d.log_contains("rolling restart"), "{}", d.log_text());
    let good = "- {shard: 5}\n- {shard: 6}\n";
    std::fs::write(&f, good).unwrap();
    wait_metric(&d, &info(&fnv(good)), 1.0, Duration::from_secs(5));
}

/// A 20 MB contexts file swapped in at runtime is refused without being
/// read (a counted failure), and `/healthz` keeps answering in well under
/// half a second meanwhile (the reload's work never runs on the event loop
/// that serves the admin port).
#[test]
fn a_huge_contexts_file_at_reload_never_freezes_the_admin_port() {
    let dir = TempDir::new("huge-reload");
    let f = dir.file("ctx.yaml", "{a: 1}\n");
    let d = start(&["--worker-contexts-file", f.to_str().unwrap()]);
    d.wait_ready();
    let mut big = String::with_capacity(20 << 20);
    big.push_str("items:\n");
    while big.len() < 20 << 20 {
        big.push_str("  - {k: [1, 2, 3], v: abcdefgh}\n");
    }
    let tmp = dir.file("ctx.tmp", &big);
    std::fs::rename(&tmp, &f).unwrap();
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let (r, took) = timed(d.admin, "GET", "/healthz", &[], Duration::from_secs(5));
        assert_eq!(r.expect("healthz").status, 200);
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        worst < Duration::from_millis(500),
        "/healthz took {worst:?} during the reload"
    );
    wait_metric(
        &d,
        "drover_contexts_reloads_total{result=\"failure\"}",
        1.0,
        Duration::from_secs(3),
    );
    assert!(d.log_contains("limit of 1048576 bytes"), "{}", d.log_text());
}

// ------------------------------------------------- 4. whole regular files

/// A FIFO as the contexts file: `check` and a run exit 78 at once naming
/// it (they used to block forever waiting for a writer).
#[test]
fn a_fifo_as_contexts_file_is_refused_at_once() {
    let dir = TempDir::new("fifo");
    let f = dir.path().join("ctx.yaml");
    mkfifo(&f);
    assert_refused_by_check_and_start(
        &["--worker-contexts-file", f.to_str().unwrap()],
        &["FIFO", "not a regular file", f.to_str().unwrap()],
    );
}

fn mkfifo(p: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A FIFO swapped in for the contexts file while running is a counted
/// failed reload, and does not block the watch: a valid file swapped in
/// afterwards is applied.
#[test]
fn a_fifo_swapped_in_at_runtime_is_a_counted_failure_and_the_watch_goes_on() {
    let dir = TempDir::new("fifo-swap");
    let f = dir.file("ctx.yaml", "{a: 1}\n");
    let d = start(&["--worker-contexts-file", f.to_str().unwrap()]);
    d.wait_ready();
    let fifo = dir.path().join("fifo.tmp");
    mkfifo(&fifo);
    std::fs::rename(&fifo, &f).unwrap();
    wait_metric(
        &d,
        "drover_contexts_reloads_total{result=\"failure\"}",
        1.0,
        Duration::from_secs(5),
    );
    assert!(d.log_contains("FIFO"), "{}", d.log_text());
    let good = "{a: 2}\n";
    let tmp = dir.file("good.tmp", good);
    std::fs::rename(&tmp, &f).unwrap();
    wait_metric(&d, &info(&fnv(good)), 1.0, Duration::from_secs(5));
    assert_eq!(get_index(d.app())["context"], serde_json::json!({"a": 2}));
}

/// A writer that truncates the file, pauses 300 ms, then writes the new
/// content (one open, like a slow `open("w")` + `write`) never gets the
/// empty file applied: over four such writes, only the four real contents
/// are ever in force, and each one is.
#[test]
fn a_truncate_then_write_never_applies_the_empty_file() {
    let dir = TempDir::new("truncate");
    let f = dir.file("ctx.yaml", "- {round: 0}\n");
    let d = start(&["--worker-contexts-file", f.to_str().unwrap()]);
    d.wait_ready();
    for round in 1..=4 {
        let text = format!("- {{round: {round}}}\n");
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&f)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        w.write_all(text.as_bytes()).unwrap();
        drop(w);
        wait_metric(&d, &info(&fnv(&text)), 1.0, Duration::from_secs(5));
    }
    let empty = fnv("");
    assert!(
        !d.log_contains(&empty),
        "the empty file was applied:\n{}",
        d.log_text()
    );
    assert_eq!(reloads(&d, "success"), 4.0, "{}", d.log_text());
    assert_eq!(
        get_index(d.app())["context"],
        serde_json::json!({"round": 4})
    );
}

// ----------------------------------------------------- 5. numbers, EMFILE

/// `.nan` and `.inf` in contexts are a configuration error naming where
/// (they used to become `null` silently).
#[test]
fn non_finite_numbers_in_contexts_are_refused_naming_where() {
    let dir = TempDir::new("nan");
    let f = dir.file("ctx.yaml", "- {rate: 1.5}\n- {rate: .nan}\n");
    assert_refused_by_check_and_start(
        &["--worker-contexts-file", f.to_str().unwrap()],
        &["$[1].rate", "not finite"],
    );
}

/// Out of file descriptors, a failing accept is logged at most once a
/// second (with a count) and counted in `drover_accept_errors_total`:
/// drover runs with 48 descriptors while 80 clients connect for 2.5 s.
#[test]
fn accept_failures_are_logged_once_a_second_and_counted() {
    let d = start_with(
        "/bin/sh".into(),
        &[
            "-c",
            "ulimit -n 48 && exec \"$0\" \"$@\"",
            bin().to_str().unwrap(),
            "--workers",
            "1",
        ],
        &[],
    );
    d.wait_ready();
    let app = d.app();
    let held: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect_timeout(&app, Duration::from_secs(1)).ok())
        .collect();
    assert!(held.len() >= 60, "only {} connected", held.len());
    std::thread::sleep(Duration::from_millis(2500));
    let lines = d
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    drop(held);
    assert!(
        (1..=4).contains(&lines),
        "{lines} accept-failure lines in 2.5 s:\n{}",
        d.log_text()
    );
    let mut count = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            count = d.metric("drover_accept_errors_total{worker=\"0\"}");
            count.is_some_and(|c| c > 10.0)
        }),
        "drover_accept_errors_total: {count:?}\n{}",
        d.log_text()
    );
}

// ----------------------------------------------------- 6. token rotation

/// Polls until `new` is accepted (202) by the stop endpoint, within 2 s of
/// `since`; then `old` is refused (401) while the drain runs.
fn assert_rotated(d: &mut Drover, old: &str, new: &str, since: Instant) {
    let mut last = 0;
    while since.elapsed() < Duration::from_secs(2) {
        last = post_stop(d, Some(new));
        if last == 202 {
            break;
        }
        assert_eq!(last, 401);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        last,
        202,
        "the new token was not accepted within 2 s:\n{}",
        d.log_text()
    );
    assert_eq!(post_stop(d, Some(old)), 401, "the old token still works");
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// `--admin-token-file` rewritten in place: within 2 s the new token stops
/// drover and the old one is refused.
#[test]
fn a_rewritten_token_file_takes_effect_within_two_seconds() {
    let dir = TempDir::new("token-rewrite");
    let f = dir.file("token", "old-token\n");
    let mut d = start(&[
        "--workers",
        "1",
        "--drain-delay",
        "2s",
        "--admin-token-file",
        f.to_str().unwrap(),
    ]);
    d.wait_ready();
    assert_eq!(post_stop(&d, Some("new-token")), 401);
    std::fs::write(&f, "new-token\n").unwrap();
    assert_rotated(&mut d, "old-token", "new-token", Instant::now());
}

/// A Secret volume's update (the kubelet's `..data` symlink swap): within
/// 2 s the new token stops drover and the old one is refused.
#[test]
fn a_kubelet_secret_swap_rotates_the_token_within_two_seconds() {
    let dir = TempDir::new("token-swap");
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_01_01")).unwrap();
    std::fs::write(root.join("..2026_01_01/token"), "old-token").unwrap();
    symlink("..2026_01_01", root.join("..data")).unwrap();
    symlink("..data/token", root.join("token")).unwrap();
    let path = root.join("token");
    let mut d = start(&[
        "--workers",
        "1",
        "--drain-delay",
        "2s",
        "--admin-token-file",
        path.to_str().unwrap(),
    ]);
    d.wait_ready();
    assert_eq!(post_stop(&d, Some("new-token")), 401);
    std::fs::create_dir(root.join("..2026_01_02")).unwrap();
    std::fs::write(root.join("..2026_01_02/token"), "new-token").unwrap();
    symlink("..2026_01_02", root.join("..data_tmp")).unwrap();
    let since = Instant::now();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01_01")).unwrap();
    assert_rotated(&mut d, "old-token", "new-token", since);
}
