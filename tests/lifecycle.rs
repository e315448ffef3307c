//! The worker lifecycle at its edges (issue 10): each test pins down one rule
//! that a measured failure once broke — backoff of failed starts, a drain
//! that gives a worker's leftovers their time, never signalling what is not
//! drover's, SIGTTOU during a roll, a stop asked by a worker being replaced,
//! the in-flight gauge across overlapping rolls, forwarded signals, nothing
//! outliving drover, the worker-count limits, and `drover check` agreeing
//! with a run. Everything runs the real binary with real processes.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Lines of the JSON log whose message starts with `prefix`.
fn log_lines(d: &Drover, prefix: &str) -> Vec<serde_json::Value> {
    d.log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .collect()
}

/// Pids drover logged as started, with their worker ids.
fn started(d: &Drover) -> Vec<(u64, u32)> {
    log_lines(d, "worker started")
        .iter()
        .map(|v| {
            (
                v["worker"].as_u64().unwrap(),
                v["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

/// Waits until drover logged at least `n` starts; returns them.
fn wait_started(d: &Drover, n: usize) -> Vec<(u64, u32)> {
    wait_for(
        d,
        &format!("fewer than {n} workers started"),
        Duration::from_secs(10),
        || started(d).len() >= n,
    );
    started(d)
}

fn wait_for(d: &Drover, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    assert!(eventually(limit, &mut cond), "{what}:\n{}", d.log_text());
}

fn wait_log(d: &Drover, needle: &str, limit: Duration) {
    wait_for(d, &format!("no log line with {needle:?}"), limit, || {
        d.log_contains(needle)
    });
}

/// Start time of `pid` (field 22 of /proc/PID/stat), to tell it from a
/// later process with the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Whether `pid` still runs (a zombie counts as gone).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Every descendant of `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(q) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{q}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if ppid == Some(p) {
                out.push(q);
                todo.push(q);
            }
        }
    }
    out
}

/// Kills, when dropped, processes a test started outside drover.
struct KillOnDrop(Vec<u32>);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &p.to_string()])
                .status();
        }
    }
}

fn read_pid_file(path: &Path, limit: Duration) -> u32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if let Ok(p) = s.trim().parse() {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn exit_code(d: &mut Drover, limit: Duration) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    let st = d.wait_exit(limit);
    match st.code() {
        Some(c) => c,
        None => panic!(
            "drover was killed by signal {:?}:\n{}",
            st.signal(),
            d.log_text()
        ),
    }
}

/// Bug 1: once a worker had lived long enough to reset its backoff, a start
/// that itself failed (here: the program was removed, so execve fails) was
/// retried at once, thousands of times a second. Failed starts back off too.
#[test]
fn failed_starts_back_off_even_after_a_long_healthy_run() {
    let dir = TempDir::new("backoff");
    let script = dir.file("worker.sh", "#!/bin/sh\nexec sleep 1000\n");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = script.display().to_string();
    let mut d = start(&[
        "--workers",
        "1",
        "--graceful-timeout",
        "2s",
        "--worker-ready",
        "running",
        "--",
        &s,
    ]);
    d.wait_ready();
    let pid = wait_started(&d, 1)[0].1;
    // Long enough that the worker counts as healthy (its backoff is reset).
    std::thread::sleep(Duration::from_millis(10_500));
    std::fs::remove_file(&script).unwrap();
    send_signal(pid, 9);
    std::thread::sleep(Duration::from_secs(2));
    let failures = d
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("execve failed"))
        .count();
    // Backoff 0, 0.1, 0.2, 0.4, 0.8 s: about 5 attempts in 2 s, never hundreds.
    assert!(
        (1..=8).contains(&failures),
        "{failures} failed starts in 2 s:\n{}",
        d.log_text().lines().take(40).collect::<Vec<_>>().join("\n")
    );
    d.signal(15);
    assert_eq!(exit_code(&mut d, Duration::from_secs(10)), 0);
}

/// Bug 2: when a worker exits during a drain, what it left in its process
/// group gets `--stop-signal` and the rest of `--graceful-timeout` — not a
/// SIGKILL a millisecond later — and drover exits 0 only if they finished.
#[test]
fn a_drain_gives_a_workers_leftover_children_their_graceful_time() {
    let dir = TempDir::new("leftover");
    let marker = dir.0.join("done");
    let m = marker.display().to_string();
    let mut d = lifecycle_worker(
        &[
            "--workers",
            "1",
            "--graceful-timeout",
            "10s",
            "--worker-ready",
            "notify",
        ],
        &["--child-term-grace", "1.0", "--marker", &m],
    );
    d.wait_ready();
    let t0 = Instant::now();
    d.signal(15);
    let code = exit_code(&mut d, Duration::from_secs(15));
    assert!(
        marker.exists(),
        "the leftover child was killed before it finished (exit {code} after {:?}):\n{}",
        t0.elapsed(),
        d.log_text()
    );
    assert_eq!(code, 0, "{}", d.log_text());
}

/// Bug 2, the other half: a leftover that outlives `--graceful-timeout` is
/// killed, and that makes the exit code 1.
#[test]
fn a_leftover_killed_at_the_drain_deadline_makes_the_exit_code_1() {
    let mut d = lifecycle_worker(
        &[
            "--workers",
            "1",
            "--graceful-timeout",
            "1s",
            "--worker-ready",
            "notify",
        ],
        &["--child-ignore-term"],
    );
    d.wait_ready();
    let worker = wait_started(&d, 1)[0].1;
    wait_for(
        &d,
        "the fixture's child never started",
        Duration::from_secs(5),
        || descendants(worker).len() == 1,
    );
    let tree = descendants(worker);
    d.signal(15);
    assert_eq!(
        exit_code(&mut d, Duration::from_secs(10)),
        1,
        "{}",
        d.log_text()
    );
    assert!(!running(tree[0]), "the leftover outlived drover");
}

/// Bug 3: drover must never signal a process group that is no longer its
/// own. A worker's group is remembered after the worker exited; here its
/// pid (and so the group id) is given to an unrelated process of the test,
/// which leads a group of that id. drover's exit must leave it alone.
#[test]
fn an_exited_workers_group_id_reused_by_a_stranger_is_never_signalled() {
    assert!(
        std::fs::metadata("/proc/sys/kernel/ns_last_pid").is_ok(),
        "this test steers pid allocation through /proc/sys/kernel/ns_last_pid (root)"
    );
    // Worker 1 exits 0 at once and is not restarted; worker 0 keeps drover up.
    let dir = TempDir::new("reuse");
    let script = dir.file(
        "w.sh",
        "#!/bin/sh\nif [ \"$DROVER_WORKER_ID\" = 1 ]; then exit 0; fi\nexec sleep 1000\n",
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let s = script.display().to_string();
    let mut d = start(&[
        "--workers",
        "2",
        "--restart",
        "on-failure",
        "--graceful-timeout",
        "2s",
        "--",
        &s,
    ]);
    wait_log(&d, "worker exited on its own", Duration::from_secs(10));
    let gone = started(&d).iter().find(|(w, _)| *w == 1).unwrap().1;
    // Make the next pid be `gone` and start a process that leads group `gone`.
    let mut stranger = None;
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (gone - 1).to_string()).unwrap();
        let child = std::process::Command::new("setsid")
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        if child.id() == gone {
            stranger = Some(child);
            break;
        }
        let mut c = child;
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut stranger = stranger.expect("could not reuse the pid within 50 tries");
    let _guard = KillOnDrop(vec![stranger.id()]);
    // setsid(1) forks when it is a group leader: wait for the session.
    std::thread::sleep(Duration::from_millis(100));
    d.signal(15);
    exit_code(&mut d, Duration::from_secs(10));
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "drover killed an unrelated process group that reused a worker's id:\n{}",
        d.log_text()
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}

/// Bug 4: SIGTTOU that removes the very slot a roll is replacing must end
/// both of its processes, and later rolls must still run.
#[test]
fn sigttou_during_the_roll_of_the_removed_slot_does_not_stall_rolls() {
    let mut d = lifecycle_worker(
        &[
            "--workers",
            "2",
            "--worker-ready",
            "notify",
            "--graceful-timeout",
            "3s",
        ],
        &["--ready-after", "1.0"],
    );
    d.wait_ready();
    let first: Vec<u32> = wait_started(&d, 2).iter().map(|s| s.1).collect();
    send_signal(d.pid, 1); // HUP: replace 0, then 1
                           // Once slot 1's replacement is starting (not up yet), remove slot 1.
    wait_for(
        &d,
        "the roll never reached worker 1",
        Duration::from_secs(10),
        || started(&d).iter().filter(|s| s.0 == 1).count() == 2,
    );
    send_signal(d.pid, 22); // TTOU
    let serving = || {
        descendants(d.pid)
            .into_iter()
            .filter(|&p| running(p))
            .count()
    };
    wait_for(
        &d,
        "worker 1's processes did not both leave",
        Duration::from_secs(8),
        || serving() == 1,
    );
    assert!(
        first.iter().all(|&p| !running(p)),
        "an old worker still runs"
    );
    // A later HUP rolls through (it was stalled forever).
    let before = log_lines(&d, "rolling restart done").len();
    send_signal(d.pid, 1);
    wait_for(
        &d,
        "the next HUP did not finish",
        Duration::from_secs(8),
        || log_lines(&d, "rolling restart done").len() > before,
    );
    d.signal(15);
    assert_eq!(
        exit_code(&mut d, Duration::from_secs(10)),
        0,
        "{}",
        d.log_text()
    );
}

/// Bug 5: a stop asked by a worker that is being replaced (still serving
/// while its successor boots) stops the service.
#[test]
fn a_stop_asked_by_a_worker_being_replaced_is_honoured() {
    let mut d = lifecycle_worker(
        &[
            "--workers",
            "1",
            "--worker-ready",
            "notify",
            "--graceful-timeout",
            "5s",
        ],
        &["--ready-after", "1.5"],
    );
    d.wait_ready();
    let old = wait_started(&d, 1)[0].1;
    send_signal(d.pid, 1);
    wait_for(&d, "no replacement started", Duration::from_secs(5), || {
        started(&d).len() == 2
    });
    // Only the old process accepts while the new one boots.
    let r = http(d.app(), "POST", "/stop", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["stop"], true);
    assert!(running(old) || d.try_status().is_some());
    wait_log(
        &d,
        "worker asked to stop the service",
        Duration::from_secs(3),
    );
    assert_eq!(
        exit_code(&mut d, Duration::from_secs(10)),
        0,
        "{}",
        d.log_text()
    );
}

/// `n` slow requests on their own connections, in threads.
fn slow(addr: SocketAddr, n: usize, ms: u64) -> Vec<JoinHandle<u16>> {
    (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                http(addr, "GET", &format!("/sleep?ms={ms}"), &[])
                    .map(|r| r.status)
                    .unwrap_or(0)
            })
        })
        .collect()
}

/// Bug 6: two generations of one slot alive at once each have their own
/// in-flight lane: the exit of an old one must not zero a newer one's gauge.
#[test]
fn the_in_flight_gauge_survives_overlapping_rolls() {
    let mut d = start(&["--workers", "2", "--graceful-timeout", "10s"]);
    d.wait_ready();
    let addr = d.app();
    let in_flight = |d: &Drover| d.metric("drover_http_requests_in_flight").unwrap_or(-1.0);
    // Generation 1 of both slots serves 6 requests of 1.5 s.
    let g1 = slow(addr, 6, 1500);
    wait_for(
        &d,
        "gen 1 requests not in flight",
        Duration::from_secs(5),
        || in_flight(&d) == 6.0,
    );
    send_signal(d.pid, 1); // gen 2 replaces gen 1 (which finishes its requests)
    wait_log(&d, "rolling restart done", Duration::from_secs(5));
    send_signal(d.pid, 1); // gen 3 replaces gen 2, while gen 1 still finishes
    wait_for(
        &d,
        "second roll did not finish",
        Duration::from_secs(5),
        || log_lines(&d, "rolling restart done").len() == 2,
    );
    // Generation 3 serves 6 requests of 5 s.
    let g3 = slow(addr, 6, 5000);
    for h in g1 {
        assert_eq!(h.join().unwrap(), 200);
    }
    // Gen 1 has finished and exits; gen 3's 6 requests are still in flight.
    wait_for(&d, "gen 1 did not exit", Duration::from_secs(5), || {
        log_lines(&d, "replaced worker exited").len() >= 4
    });
    // (A lane reset by gen 1's exit would read 0 from here on.)
    assert!(
        eventually(Duration::from_secs(3), || in_flight(&d) == 6.0),
        "in flight {}: {}",
        in_flight(&d),
        d.metrics_text()
    );
    for h in g3 {
        assert_eq!(h.join().unwrap(), 200);
    }
    d.signal(15);
    assert_eq!(exit_code(&mut d, Duration::from_secs(10)), 0);
}

/// Bug 7: signals drover does not use are forwarded to every worker (as
/// tini does) and never kill drover.
#[test]
fn unused_signals_are_forwarded_to_workers_and_never_kill_drover() {
    let dir = TempDir::new("signals");
    let got = dir.0.join("signals");
    let g = got.display().to_string();
    // Ready (READY=1) only once the fixture's handlers are installed.
    let mut d = lifecycle_worker(
        &["--workers", "2", "--worker-ready", "notify"],
        &["--signals", &g],
    );
    d.wait_ready();
    for sig in [10, 12, 28] {
        // USR1, USR2, WINCH
        send_signal(d.pid, sig);
        std::thread::sleep(Duration::from_millis(100));
        assert!(d.try_status().is_none(), "signal {sig} killed drover");
    }
    wait_for(
        &d,
        "not every worker got every signal",
        Duration::from_secs(3),
        || {
            let text = std::fs::read_to_string(&got).unwrap_or_default();
            ["SIGUSR1", "SIGUSR2", "SIGWINCH"]
                .iter()
                .all(|s| text.lines().filter(|l| l == s).count() == 2)
        },
    );
    d.signal(15);
    assert_eq!(exit_code(&mut d, Duration::from_secs(10)), 0);
}

/// Bug 7, the other half: a TERM in drover's first milliseconds starts a
/// drain (exit 0); it is neither lost nor fatal. The TERM is sent the moment
/// drover's own code runs (TERM shows in its blocked or caught set) — before
/// that the kernel is still loading it, and a signal takes its default
/// action, as for any program — and then again after growing delays.
#[test]
fn a_sigterm_right_after_launch_starts_a_drain() {
    /// Whether `pid` blocks TERM, and whether it catches it (bit 15 of
    /// SigBlk and SigCgt).
    fn term_state(pid: u32) -> (bool, bool) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return (false, false);
        };
        let bit = |field: &str| {
            status.lines().any(|l| {
                l.starts_with(field)
                    && u64::from_str_radix(l.split_whitespace().nth(1).unwrap_or("0"), 16)
                        .is_ok_and(|m| m & (1 << 14) != 0)
            })
        };
        (bit("SigBlk:"), bit("SigCgt:"))
    }
    // How many TERMs arrived while drover had no handler yet: each used to
    // kill it with -15.
    let mut before_handler = 0;
    for delay_us in [0u64, 0, 0, 1_000, 5_000, 20_000] {
        let mut child = std::process::Command::new(bin())
            .args([
                "--workers",
                "2",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--admin-host",
                "127.0.0.1",
                "--admin-port",
                "0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (blocked, caught) = term_state(child.id());
            if blocked || caught {
                if delay_us == 0 && !caught {
                    before_handler += 1;
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "drover never blocks or handles TERM"
            );
        }
        std::thread::sleep(Duration::from_micros(delay_us));
        send_signal(child.id(), 15);
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "TERM after {delay_us} µs was lost"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(st.code(), Some(0), "TERM after {delay_us} µs: {st:?}");
    }
    assert!(
        before_handler > 0,
        "no TERM arrived before drover's handler existed: the test did not test"
    );
}

/// Bug 8: nothing a worker started outlives drover, not even a child that
/// left the worker's process group and session with setsid.
#[test]
fn a_setsid_grandchild_does_not_outlive_drover() {
    let dir = TempDir::new("setsid");
    let pidfile = dir.0.join("pid");
    let p = pidfile.display().to_string();
    let mut d = lifecycle_worker(
        &["--workers", "1", "--graceful-timeout", "2s"],
        &["--setsid-child", &p],
    );
    d.wait_ready();
    let escaped = read_pid_file(&pidfile, Duration::from_secs(5));
    let started_at = start_time(escaped);
    let _guard = KillOnDrop(vec![escaped]);
    d.signal(15);
    let code = exit_code(&mut d, Duration::from_secs(10));
    let survives = running(escaped) && start_time(escaped) == started_at;
    assert!(
        !survives,
        "the setsid child outlived drover (exit {code}):\n{}",
        d.log_text()
    );
}

/// Bug 9: SIGTTIN never takes the pool past the 1024 workers `--workers`
/// accepts.
#[test]
fn sigttin_past_1024_workers_is_refused() {
    let mut d = start(&[
        "--workers",
        "1024",
        "--graceful-timeout",
        "5s",
        "--worker-ready",
        "running",
        "--",
        "sleep",
        "1000",
    ]);
    d.wait_ready();
    send_signal(d.pid, 21);
    wait_log(&d, "SIGTTIN ignored", Duration::from_secs(5));
    assert_eq!(d.metric("drover_workers_desired"), Some(1024.0));
    d.signal(15);
    exit_code(&mut d, Duration::from_secs(20));
}

/// Bug 9: under `--on-contexts-change ignore`, SIGTTIN and SIGTTOU follow
/// the contexts in force (a sequence fixes the count), not the ignored ones.
#[test]
fn ttin_follows_the_contexts_in_force_when_changes_are_ignored() {
    let dir = TempDir::new("ignore");
    let file = dir.file("contexts.yaml", "- {a: 1}\n- {a: 2}\n");
    let f = file.display().to_string();
    let mut d = start(&[
        "--worker-contexts-file",
        &f,
        "--on-contexts-change",
        "ignore",
    ]);
    d.wait_ready();
    // Now a mapping (shared by every worker): ignored, the sequence stays.
    std::fs::write(dir.0.join("next.yaml"), "{a: 3}\n").unwrap();
    std::fs::rename(dir.0.join("next.yaml"), &file).unwrap();
    wait_log(&d, "--on-contexts-change ignore", Duration::from_secs(5));
    send_signal(d.pid, 21);
    wait_log(&d, "SIGTTIN ignored", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.metric("drover_workers_desired"), Some(2.0));
    d.signal(15);
    assert_eq!(exit_code(&mut d, Duration::from_secs(10)), 0);
}

/// Bug 10: `drover check` fails exactly when a run would: an unresolvable
/// host is a configuration error (78) for both.
#[test]
fn check_fails_like_a_run_on_an_unresolvable_host() {
    for host in ["no-such-host.invalid", "not an address"] {
        for admin in [false, true] {
            let flag = if admin { "--admin-host" } else { "--host" };
            let check = std::process::Command::new(bin())
                .args(["check", flag, host])
                .output()
                .unwrap();
            let mut args = vec![flag, host, "--port", "0", "--admin-port", "0"];
            if !admin {
                args.extend(["--admin-host", "127.0.0.1"]);
            } else {
                args.extend(["--host", "127.0.0.1"]);
            }
            let run = std::process::Command::new(bin())
                .args(&args)
                .output()
                .unwrap();
            assert_eq!(run.status.code(), Some(78), "run {flag} {host}");
            assert_eq!(
                check.status.code(),
                Some(78),
                "check {flag} {host}: {}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
    }
}
