//! Hung workers and recycling (issue 14): `--worker-timeout` kills a worker
//! whose event loop stopped (drover's own workers: their heartbeat; external
//! apps: sd_notify's `WATCHDOG=1`), and `--max-requests`,
//! `--max-worker-memory` and `--max-worker-lifetime` replace a worker through
//! the same one-at-a-time roll as SIGHUP, without failing a request.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The tests that put load on the pod run one at a time: on a small shared
/// machine two of them at once would measure each other.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn json_lines(d: &Drover) -> Vec<serde_json::Value> {
    d.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn messages(d: &Drover, prefix: &str) -> Vec<serde_json::Value> {
    json_lines(d)
        .into_iter()
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .collect()
}

fn wait_for(d: &Drover, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    assert!(eventually(limit, &mut cond), "{what}:\n{}", d.log_text());
}

/// Sum of a counter over every label set whose labels contain `labels`.
fn metric_sum(d: &Drover, name: &str, labels: &str) -> f64 {
    d.metrics_text()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Steady load: `GET /` on a new connection from `threads` threads, each
/// pausing `pause` between requests. Counts answers and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<Mutex<Vec<serde_json::Value>>>,
    failed: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match http(addr, "GET", "/", &[]) {
                            Ok(r) if r.status == 200 => ok.lock().unwrap().push(r.json()),
                            Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status)),
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn answered(&self) -> usize {
        self.ok.lock().unwrap().len()
    }

    /// (answers, failures).
    fn finish(self) -> (Vec<serde_json::Value>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let ok = std::mem::take(&mut *self.ok.lock().unwrap());
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (ok, failed)
    }
}

/// Recycles happen one at a time: in the log, every "recycling worker" is
/// followed by its "successor is up" before the next one begins. Returns
/// how many there were.
fn recycles_one_at_a_time(d: &Drover) -> usize {
    let mut open: Option<serde_json::Value> = None;
    let mut n = 0;
    for v in json_lines(d) {
        let m = v["message"].as_str().unwrap_or("");
        if m.starts_with("recycling worker") {
            assert!(
                open.is_none(),
                "two recycles at once: {open:?} then {v}\n{}",
                d.log_text()
            );
            open = Some(v);
            n += 1;
        } else if m.starts_with("recycled worker's successor is up") {
            let o = open.take().expect("a successor without a recycle");
            assert_eq!(o["worker"], v["worker"]);
        }
    }
    n
}

/// The sum of the resident memory of `pid`'s descendants, in bytes.
fn tree_rss(pid: u32) -> u64 {
    let mut total = 0;
    let mut todo = children_of(pid);
    while let Some(p) = todo.pop() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/statm")) {
            let pages: u64 = s
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            total += pages * 4096;
        }
        todo.extend(children_of(p));
    }
    total
}

fn fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/recycle_worker.py")
        .display()
        .to_string()
}

/// `target/<profile>/examples/blocking`, built when needed.
fn blocking_example() -> PathBuf {
    example("blocking")
}

/// Runs `args` to completion with `env`; (exit code, output). Bounded.
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// (arguments, environment, what the error must say).
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

/// Bad limits are configuration errors: one line naming the option and the
/// value, exit 78, from a run and from `drover check`, flags and env alike.
#[test]
fn bad_limits_are_config_errors() {
    let cases: &[Case] = &[
        (
            &["--max-worker-memory", "12xyz"],
            &[],
            "--max-worker-memory: `12xyz`",
        ),
        (
            &["--max-worker-memory=-1Mi"],
            &[],
            "--max-worker-memory: `-1Mi`",
        ),
        (
            &[],
            &[("DROVER_MAX_WORKER_MEMORY", "lots")],
            "--max-worker-memory: `lots`",
        ),
        (
            &["--worker-timeout", "soon"],
            &[],
            "--worker-timeout: `soon`",
        ),
        (&["--worker-timeout", "1ms"], &[], "shorter than 100ms"),
        (&["--max-requests=-5"], &[], "--max-requests: `-5`"),
        (
            &["--max-requests-jitter", "1.5"],
            &[],
            "--max-requests-jitter: `1.5`",
        ),
        (
            &["--max-worker-lifetime", "forever"],
            &[],
            "--max-worker-lifetime: `forever`",
        ),
        (
            &[],
            &[("DROVER_MAX_WORKER_LIFETIME_JITTER", "x")],
            "--max-worker-lifetime-jitter",
        ),
    ];
    for (args, env, want) in cases {
        for check in [false, true] {
            let mut all: Vec<&str> = if check { vec!["check"] } else { vec![] };
            all.extend(["--port", "0", "--admin-port", "0", "--workers", "2"]);
            all.extend(args.iter());
            let (code, out) = run_with_env(&all, env);
            assert_eq!(code, 78, "{all:?} {env:?}: {out}");
            assert!(
                out.contains(want),
                "{all:?} {env:?}: want {want:?} in {out}"
            );
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    // Good values are taken, and shown by check.
    let (code, out) = run_with_env(
        &[
            "check",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--max-worker-memory",
            "64Mi",
            "--max-requests",
            "1000",
            "--max-requests-jitter",
            "100",
            "--worker-timeout",
            "0",
        ],
        &[("DROVER_MAX_WORKER_LIFETIME", "1h")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("worker timeout off")
            && out.contains("requests 1000 (+ up to 100)")
            && out.contains("memory 67108864 bytes")
            && out.contains("lifetime 3600s"),
        "{out}"
    );
}

/// A library app whose handler blocks its event loop: that worker is
/// SIGKILLed and replaced within --worker-timeout + 1 s, while the other
/// worker keeps answering; the kill is in the log and the metric.
#[test]
fn a_blocked_worker_is_killed_and_replaced() {
    let example = blocking_example();
    let _serial = serial();
    let d = start_with(example, &["--workers", "2", "--worker-timeout", "2s"], &[]);
    d.wait_ready();
    let addr = d.app();
    let t0 = Instant::now();
    let blocked = std::thread::spawn(move || {
        let r = http(addr, "GET", "/block?ms=30000", &[]);
        (r.map(|r| r.status).map_err(|e| e.to_string()), t0.elapsed())
    });
    // Let the handler block its loop, then load the pod.
    std::thread::sleep(Duration::from_millis(300));
    let load = Load::start(addr, 1, Duration::from_millis(20));
    wait_for(
        &d,
        "the blocked worker is killed",
        Duration::from_secs(6),
        || !messages(&d, "killed hung worker").is_empty(),
    );
    let killed_after = t0.elapsed();
    let kill = &messages(&d, "killed hung worker")[0];
    let (slot, pid) = (
        kill["worker"].as_u64().unwrap(),
        kill["pid"].as_u64().unwrap(),
    );
    assert!(!messages(&d, "worker is hung").is_empty());
    // Replaced: the slot is served again (a new process started for it).
    wait_for(&d, "replaced", Duration::from_secs(3), || {
        json_lines(&d).iter().any(|v| {
            v["message"] == "worker started"
                && v["worker"].as_u64() == Some(slot)
                && v["pid"].as_u64() != Some(pid)
                && v["generation"].as_u64() == Some(2)
        }) && http(d.admin, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200)
    });
    let replaced_after = t0.elapsed();
    let (status, cut_after) = blocked.join().unwrap();
    assert!(
        status.is_err(),
        "the blocked request was cut by the kill: {status:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    assert!(failed.is_empty(), "requests failed meanwhile: {failed:?}");
    assert!(
        ok.len() >= 20,
        "the other worker kept answering: {} answers",
        ok.len()
    );
    assert!(
        ok.iter()
            .any(|a| a["pid"].as_u64() != Some(pid) && a["worker"].as_u64() != Some(slot)),
        "answers came from the other worker"
    );
    assert!(
        replaced_after <= Duration::from_secs(3),
        "replaced after {replaced_after:?} (timeout 2 s + 1 s)"
    );
    assert_eq!(
        d.metric(&format!(
            "drover_worker_timeouts_total{{worker=\"{slot}\"}}"
        )),
        Some(1.0)
    );
    let other = 1 - slot;
    assert_eq!(
        d.metric(&format!(
            "drover_worker_timeouts_total{{worker=\"{other}\"}}"
        )),
        Some(0.0)
    );
    eprintln!(
        "blocked worker {slot} (pid {pid}): killed {killed_after:?} after the block began (request cut at {cut_after:?}), replaced and ready at {replaced_after:?}; {} answers, 0 failed meanwhile",
        ok.len()
    );
}

/// An external app that sent WATCHDOG=1 and then stops is killed and
/// replaced after WATCHDOG_USEC; one that never sends it is left alone.
/// Both see WATCHDOG_USEC and their own pid as WATCHDOG_PID.
#[test]
fn sd_watchdog_kills_an_app_that_stops_pinging_and_only_that() {
    let fx = fixture();
    let pinging = start(&[
        "--workers",
        "2",
        "--worker-timeout",
        "1s",
        "--",
        "python3",
        &fx,
        "--watchdog-pings",
        "4",
    ]);
    let silent = start(&[
        "--workers",
        "2",
        "--worker-timeout",
        "1s",
        "--",
        "python3",
        &fx,
    ]);
    pinging.wait_ready();
    silent.wait_ready();
    let up = Instant::now();
    for d in [&pinging, &silent] {
        let a = get_index(d.app());
        assert_eq!(a["watchdog_usec"], "1000000", "{a}");
        assert_eq!(a["watchdog_pid_is_me"], true, "{a}");
    }
    let before: Vec<u32> = silent.children();
    // 4 pings 250 ms apart, then silence: killed about 1.75 s after start.
    wait_for(
        &pinging,
        "killed after it stopped pinging",
        Duration::from_secs(5),
        || messages(&pinging, "killed hung worker").len() >= 2,
    );
    let killed_after = up.elapsed();
    assert!(!messages(&pinging, "worker sent WATCHDOG=1").is_empty());
    wait_for(&pinging, "replaced", Duration::from_secs(3), || {
        messages(&pinging, "worker started").len() >= 4
            && http(pinging.admin, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200)
    });
    assert!(metric_sum(&pinging, "drover_worker_timeouts_total", "") >= 2.0);
    // The silent app has run well past its interval: untouched.
    let past = up + Duration::from_millis(2500);
    std::thread::sleep(past.saturating_duration_since(Instant::now()));
    assert!(
        messages(&silent, "killed hung worker").is_empty(),
        "{}",
        silent.log_text()
    );
    assert_eq!(silent.children(), before);
    assert_eq!(metric_sum(&silent, "drover_worker_timeouts_total", ""), 0.0);
    eprintln!("pinging app: both workers killed {killed_after:?} after ready (4 pings of 250 ms, WATCHDOG_USEC 1 s)");
}

/// A Python app that keeps 1 MiB more per request, under steady load, with
/// --max-worker-memory 64Mi: its workers are recycled again and again, no
/// request fails, and the pod's memory stays bounded.
#[test]
fn a_leaking_app_is_recycled_by_memory_without_a_failed_request() {
    let fx = fixture();
    let _serial = serial();
    let d = start(&[
        "--workers",
        "2",
        "--max-worker-memory",
        "64Mi",
        "--",
        "python3",
        &fx,
        "--grow-mib",
        "1",
    ]);
    d.wait_ready();
    let load = Load::start(d.app(), 2, Duration::from_millis(25));
    let end = Instant::now() + Duration::from_secs(15);
    let mut peak = 0u64;
    while Instant::now() < end {
        peak = peak.max(tree_rss(d.pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let answered = load.answered();
    let (ok, failed) = load.finish();
    let recycles = recycles_one_at_a_time(&d);
    let by_metric = metric_sum(&d, "drover_worker_recycles_total", "reason=\"memory\"");
    assert!(
        failed.is_empty(),
        "failed requests: {failed:?}\n{}",
        d.log_text()
    );
    assert!(
        recycles >= 2,
        "recycled {recycles} times:\n{}",
        d.log_text()
    );
    assert_eq!(by_metric, recycles as f64);
    // Unbounded, the pod would hold about 1 MiB per answer (~1 GiB here);
    // bounded, each worker holds at most its limit plus what it grows
    // between two checks and while its successor starts: 2 × (64 + 128)
    // MiB leaves room for a loaded machine.
    let unbounded = answered as u64;
    assert!(
        peak < 384 << 20,
        "peak {} MiB for 2 workers limited to 64 MiB",
        peak >> 20
    );
    eprintln!(
        "memory: {} answers, 0 failed, {recycles} recycles, peak {} MiB for the pod's workers (about {unbounded} MiB unbounded)",
        ok.len(),
        peak >> 20
    );
}

/// --max-requests 1000 --max-requests-jitter 100 on drover's own workers
/// under load: workers are recycled near their limit, one at a time, and no
/// request fails.
#[test]
fn max_requests_recycles_one_at_a_time_without_a_failed_request() {
    let _serial = serial();
    let d = start(&[
        "--workers",
        "2",
        "--max-requests",
        "1000",
        "--max-requests-jitter",
        "100",
    ]);
    d.wait_ready();
    let load = Load::start(d.app(), 3, Duration::ZERO);
    let end = Instant::now() + Duration::from_secs(12);
    while Instant::now() < end && messages(&d, "recycling worker").len() < 6 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "failed requests: {failed:?}\n{}",
        d.log_text()
    );
    let recycles = recycles_one_at_a_time(&d);
    assert!(
        recycles >= 2,
        "{recycles} recycles for {} answers",
        ok.len()
    );
    // Each at its own limit, 1000 plus up to 100.
    let limits: Vec<u64> = messages(&d, "worker to be recycled")
        .iter()
        .filter_map(|v| {
            let m = v["message"].as_str()?;
            m.split("(limit ")
                .nth(1)?
                .trim_end_matches(')')
                .parse()
                .ok()
        })
        .collect();
    assert!(!limits.is_empty());
    assert!(
        limits.iter().all(|l| (1000..=1100).contains(l)),
        "{limits:?}"
    );
    if limits.len() >= 3 {
        assert!(
            limits.windows(2).any(|w| w[0] != w[1]),
            "no jitter: {limits:?}"
        );
    }
    let by_metric = metric_sum(&d, "drover_worker_recycles_total", "reason=\"requests\"");
    assert_eq!(by_metric, recycles as f64);
    eprintln!(
        "max-requests: {} answers, 0 failed, {recycles} recycles one at a time, limits {limits:?}",
        ok.len()
    );
}

/// --max-worker-lifetime with jitter, for an external app: recycled by age.
#[test]
fn max_lifetime_recycles_an_external_app() {
    let fx = fixture();
    let _serial = serial();
    let d = start(&[
        "--workers",
        "2",
        "--max-worker-lifetime",
        "2s",
        "--max-worker-lifetime-jitter",
        "500ms",
        "--",
        "python3",
        &fx,
    ]);
    d.wait_ready();
    let load = Load::start(d.app(), 1, Duration::from_millis(20));
    wait_for(&d, "recycled by lifetime", Duration::from_secs(8), || {
        metric_sum(&d, "drover_worker_recycles_total", "reason=\"lifetime\"") >= 3.0
    });
    let (_, failed) = load.finish();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(recycles_one_at_a_time(&d) >= 3);
    assert_eq!(
        metric_sum(&d, "drover_worker_recycles_total", "reason=\"memory\""),
        0.0
    );
}

/// A real sd_watchdog client: puma pings the watchdog when it finds
/// `WATCHDOG_USEC` and a `WATCHDOG_PID` equal to its own pid (Ruby's
/// sd_notify checks it), every half interval: it is watched and never
/// killed. (Debian's `puma` and `ruby-sd-notify`; `tests/run` installs them.)
#[test]
fn puma_pings_the_watchdog_and_lives() {
    let puma = ["/usr/bin/puma", "/usr/local/bin/puma"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("puma is not installed (tests/run installs Debian's puma)");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/servers");
    let (config, app) = (dir.join("puma.rb"), dir.join("config.ru"));
    let d = start(&[
        "--workers",
        "2",
        "--worker-timeout",
        "2s",
        "--",
        puma,
        "--bind-to-activated-sockets",
        "only",
        "--config",
        config.to_str().unwrap(),
        app.to_str().unwrap(),
    ]);
    d.wait_ready();
    wait_for(&d, "both workers ping", Duration::from_secs(10), || {
        messages(&d, "worker sent WATCHDOG=1").len() == 2
    });
    let pids = d.children();
    // Three intervals: an app that stopped would have been killed by now.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        messages(&d, "killed hung worker").is_empty(),
        "{}",
        d.log_text()
    );
    assert_eq!(d.children(), pids);
    assert_eq!(metric_sum(&d, "drover_worker_timeouts_total", ""), 0.0);
}

/// A recycle whose successor fails follows the roll's rules: it halts, the
/// old worker serves on (no request fails, /readyz stays 200), the halt is
/// logged and counted, and the same worker is not recycled again at once.
#[test]
fn a_recycle_whose_successor_fails_halts_and_the_old_worker_serves_on() {
    let fx = fixture();
    let dir = TempDir::new("recycle-halt");
    let marker = dir.path().join("fail");
    let _serial = serial();
    let d = start(&[
        "--workers",
        "1",
        "--max-worker-lifetime",
        "1s",
        "--",
        "python3",
        &fx,
        "--exit-if-exists",
        marker.to_str().unwrap(),
    ]);
    d.wait_ready();
    let first = get_index(d.app())["pid"].as_u64().unwrap();
    std::fs::write(&marker, "").unwrap();
    let load = Load::start(d.app(), 1, Duration::from_millis(20));
    wait_for(&d, "the recycle halts", Duration::from_secs(6), || {
        d.metric("drover_rolls_total{result=\"halted\"}") == Some(1.0)
    });
    // Past the halt, the old worker serves on; not retried for 10 s.
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failed) = load.finish();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(
        ok.iter().all(|a| a["pid"].as_u64() == Some(first)),
        "served by the old worker"
    );
    assert_eq!(d.metric("drover_rolls_total{result=\"halted\"}"), Some(1.0));
    assert_eq!(
        messages(&d, "recycling worker").len(),
        1,
        "{}",
        d.log_text()
    );
    assert!(http(d.admin, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200));
}
