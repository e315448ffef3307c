//! Rolls that are rolling and safe for any app (issue 11): a worker counts
//! as up only once it really serves (`--worker-ready auto`: READY=1, or
//! seen accepting on the shared socket), a roll replaces one worker at a
//! time and halts on a replacement that fails, sd_notify works for clients
//! that take `NOTIFY_SOCKET` as a path, and the drain never waits on a queue
//! nobody empties.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

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

/// One answer: its latency, and its JSON body unless it failed.
type Answer = (Duration, Option<serde_json::Value>);

/// Steady load: `GET /` on a new connection every 10 ms from 2 threads;
/// every answer's latency and JSON body are kept.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Answer>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
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
                        let r = http(addr, "GET", "/", &[])
                            .ok()
                            .filter(|r| r.status == 200)
                            .map(|r| r.json());
                        results.lock().unwrap().push((t0.elapsed(), r));
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

    fn snapshot(&self) -> Vec<Answer> {
        self.results.lock().unwrap().clone()
    }

    /// (answers, failures, max latency).
    fn finish(self) -> (Vec<serde_json::Value>, usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let r = self.results.lock().unwrap();
        let failed = r.iter().filter(|(_, a)| a.is_none()).count();
        let max = r.iter().map(|(l, _)| *l).max().unwrap_or_default();
        (
            r.iter().filter_map(|(_, a)| a.clone()).collect(),
            failed,
            max,
        )
    }
}

fn rewrite(file: &std::path::Path, content: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, content).unwrap();
    std::fs::rename(&next, file).unwrap();
}

/// A contexts change to contexts that make the app exit at start, under
/// steady load: the roll halts at the first replacement, no request fails,
/// the old workers keep answering with their old contexts, the failure is in
/// the log and the metrics, and the next, good change rolls through.
#[test]
fn a_bad_contexts_change_halts_the_roll_and_loses_nothing() {
    let dir = TempDir::new("bad-change");
    let file = dir.file("contexts.yaml", "- {v: 1}\n- {v: 1}\n");
    let f = file.display().to_string();
    let mut d = lifecycle_worker(
        &["--worker-contexts-file", &f, "--graceful-timeout", "5s"],
        &["--exit-if-bad", "--no-notify"],
    );
    d.wait_ready();
    let load = Load::start(d.app());
    std::thread::sleep(Duration::from_millis(300));
    rewrite(&file, "- {v: 2, bad: true}\n- {v: 2, bad: true}\n");
    wait_for(&d, "the roll did not halt", Duration::from_secs(10), || {
        log_count(&d, "rolling restart halted") == 1
    });
    // 10 s later the old workers still serve, with their old contexts.
    std::thread::sleep(Duration::from_secs(10));
    let late: Vec<_> = load.snapshot().into_iter().rev().take(50).collect();
    assert!(late
        .iter()
        .all(|(_, a)| a.as_ref().is_some_and(|a| a["context"]["v"] == 1)));
    assert_eq!(d.metric("drover_rolls_total{result=\"halted\"}"), Some(1.0));
    assert_eq!(d.metric("drover_workers_running"), Some(2.0));
    let readyz = http(d.admin, "GET", "/readyz", &[]).unwrap();
    assert_eq!(readyz.status, 200, "old workers serve: ready");
    let m = d.metrics_text();
    assert!(
        m.contains("drover_contexts_info{source=\"file\",version=\"")
            && !m.contains(&content_version(
                "- {v: 2, bad: true}\n- {v: 2, bad: true}\n"
            )),
        "contexts_info must name the version in force:\n{m}"
    );
    assert!(
        d.log_contains("exit code 1"),
        "the worker's exit status is logged"
    );
    // A good change rolls through.
    rewrite(&file, "- {v: 3}\n- {v: 3}\n");
    wait_for(
        &d,
        "the good change did not roll",
        Duration::from_secs(15),
        || log_count(&d, "rolling restart done") == 1,
    );
    assert_eq!(
        d.metric("drover_rolls_total{result=\"success\"}"),
        Some(1.0)
    );
    std::thread::sleep(Duration::from_millis(300));
    let (answers, failed, _) = load.finish();
    assert_eq!(failed, 0, "requests failed during a halted roll");
    assert_eq!(answers.last().unwrap()["context"]["v"], 3);
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// `drover check`'s content version of a text (FNV-1a), to tell versions
/// apart in `drover_contexts_info`.
fn content_version(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// HUP with an app that takes 2 s to boot and does not speak sd_notify:
/// each old worker retires only once its replacement accepts, so the
/// service never stalls (max latency < 100 ms, 0 failures) and the roll
/// takes about N × 2 s.
#[test]
fn hup_with_a_slow_booting_app_never_stalls_the_service() {
    let mut d = lifecycle_worker(&["--workers", "2"], &["--ready-after", "2", "--no-notify"]);
    d.wait_ready();
    let load = Load::start(d.app());
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    send_signal(d.pid, 1);
    wait_for(
        &d,
        "the roll did not finish",
        Duration::from_secs(15),
        || log_count(&d, "rolling restart done") == 1,
    );
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let (_, failed, max) = load.finish();
    assert_eq!(failed, 0);
    assert!(max < Duration::from_millis(100), "max latency {max:?}");
    assert!(
        took >= Duration::from_millis(3800),
        "the roll took {took:?}: not one at a time"
    );
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// The same for a contexts change.
#[test]
fn a_contexts_change_with_a_slow_booting_app_never_stalls_the_service() {
    let dir = TempDir::new("slow-change");
    let file = dir.file("contexts.yaml", "- {v: 1}\n- {v: 1}\n");
    let f = file.display().to_string();
    let mut d = lifecycle_worker(
        &["--worker-contexts-file", &f],
        &["--ready-after", "2", "--no-notify"],
    );
    d.wait_ready();
    let load = Load::start(d.app());
    std::thread::sleep(Duration::from_millis(300));
    rewrite(&file, "- {v: 2}\n- {v: 2}\n");
    wait_for(
        &d,
        "the roll did not finish",
        Duration::from_secs(15),
        || log_count(&d, "rolling restart done") == 1,
    );
    std::thread::sleep(Duration::from_millis(300));
    let (answers, failed, max) = load.finish();
    assert_eq!(failed, 0);
    assert!(max < Duration::from_millis(100), "max latency {max:?}");
    assert_eq!(answers.last().unwrap()["context"]["v"], 2);
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// A replacement that never comes up within `--worker-ready-timeout` is a
/// failed start: the roll halts and the old worker keeps serving.
#[test]
fn a_replacement_that_never_comes_up_times_out_and_halts_the_roll() {
    let dir = TempDir::new("never-up");
    let file = dir.file("contexts.yaml", "{v: 1}\n");
    let f = file.display().to_string();
    let fx = lifecycle_fixture();
    // v: 2 makes the fixture never accept (a flag read from the context).
    let mut d = start(&[
        "--worker-contexts-file", &f, "--workers", "1", "--worker-ready-timeout", "1s",
        "--graceful-timeout", "2s", "--", "sh", "-c",
        &format!(
            "case \"$DROVER_WORKER_CONTEXT\" in *2*) exec python3 {fx} --never-accept --no-notify;; \
             *) exec python3 {fx} --no-notify;; esac"
        ),
    ]);
    d.wait_ready();
    rewrite(&file, "{v: 2}\n");
    wait_for(&d, "the roll did not halt", Duration::from_secs(10), || {
        log_count(&d, "rolling restart halted") == 1
    });
    assert!(d.log_contains("--worker-ready-timeout"), "{}", d.log_text());
    let r = http(d.app(), "GET", "/", &[]).unwrap();
    assert_eq!(r.json()["context"]["v"], 1);
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// `NOTIFY_SOCKET` is a file path (mode 0700 directory), so clients that
/// take it as a path (Ruby's sd_notify, puma) work; it is removed on exit.
#[test]
fn notify_socket_is_a_path_that_path_only_clients_can_use() {
    let mut d = lifecycle_worker(
        &["--workers", "2", "--worker-ready", "notify"],
        &["--notify-path-only"],
    );
    d.wait_ready();
    let r = http(d.app(), "GET", "/", &[]).unwrap();
    assert_eq!(r.status, 200);
    let path = d
        .log_field("sd_notify socket", "path")
        .expect("the notify socket is logged");
    let dir = std::path::Path::new(&path).parent().unwrap().to_path_buf();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    d.signal(15);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// Two drovers that are each PID 1 of their own PID namespace, sharing one
/// network namespace (two containers of a pod), both start with notify.
#[test]
fn two_drovers_as_pid_1_in_one_network_namespace_both_start() {
    /// Kills the `unshare`s (and with them their drovers) even if the test
    /// fails half-way.
    struct Kids(Vec<std::process::Child>);
    impl Drop for Kids {
        fn drop(&mut self) {
            for k in &mut self.0 {
                let _ = k.kill();
                let _ = k.wait();
            }
        }
    }
    let fx = lifecycle_fixture();
    let mut kids = Vec::new();
    for _ in 0..2 {
        let child = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "--mount-proc"])
            .arg(bin())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--admin-host",
                "127.0.0.1",
                "--admin-port",
                "0",
                "--worker-ready",
                "notify",
                "--workers",
                "1",
                "--",
                "python3",
                &fx,
            ])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        kids.push(child);
    }
    // Each logs "worker reported READY=1" once its worker is up.
    let mut logs = Vec::new();
    for k in &mut kids {
        let stderr = k.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        logs.push(rx);
    }
    let mut kids = Kids(kids);
    for (k, rx) in kids.0.iter_mut().zip(&logs) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains("worker reported READY=1") => break,
                Ok(l) => seen.push(l),
                Err(_) => {}
            }
            assert!(
                Instant::now() < deadline && k.try_wait().unwrap().is_none(),
                "a drover did not come up:\n{}",
                seen.join("\n")
            );
        }
    }
    // Dropping `kids` kills each unshare; --kill-child takes its drover
    // (and so the workers) down with it.
    kids.0
        .iter_mut()
        .for_each(|k| assert!(k.try_wait().unwrap().is_none()));
}

/// A worker that never accepts: the drain does not wait for the accept
/// queue to empty until `--graceful-timeout`; the stop signal comes soon.
#[test]
fn a_worker_that_never_accepts_gets_the_stop_signal_well_before_the_timeout() {
    let mut d = lifecycle_worker(
        &[
            "--workers",
            "1",
            "--worker-ready",
            "running",
            "--graceful-timeout",
            "20s",
        ],
        &["--never-accept"],
    );
    d.wait_ready();
    // Queue a few connections nobody will accept.
    let addr = d.app();
    let _held: Vec<_> = (0..3)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    d.signal(15);
    let st = d.wait_exit(Duration::from_secs(15));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the drain waited {:?}",
        t0.elapsed()
    );
    assert_eq!(st.code(), Some(0), "{}", d.log_text());
}

/// A worker killed by `--stop-signal` itself (no handler for it, like
/// Python's stdlib server) lost whatever it was doing: drover says so and
/// exits 1.
#[test]
fn a_worker_killed_by_the_stop_signal_is_reported_and_exits_1() {
    let mut d = lifecycle_worker(&["--workers", "1"], &["--no-term-handler"]);
    d.wait_ready();
    let r = http(d.app(), "GET", "/", &[]).unwrap();
    assert_eq!(r.status, 200);
    d.signal(15);
    let st = d.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(1), "{}", d.log_text());
    assert!(
        d.log_contains("killed by --stop-signal"),
        "{}",
        d.log_text()
    );
}
