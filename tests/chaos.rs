//! Bounded chaos with real processes: for about 15 s a random mix of SIGHUP,
//! SIGTTIN, SIGTTOU, `kill -9` of workers and contexts changes (counts and
//! kinds included) hits a drover under steady load; then it must settle to
//! its desired shape, drain on SIGTERM with exit 0, and leave no process of
//! its tree behind. A request may fail only if it was on a worker killed
//! with `kill -9`. The seed is printed, and `DROVER_CHAOS_SEED` replays it.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// xorshift64*: small, seedable, good enough to pick events.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn stat_fields(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ppid = f.next()?.parse().ok()?;
    let start = rest.split_whitespace().nth(19)?.parse().ok()?;
    Some((ppid, start))
}

/// Every live descendant of `root`, as (pid, start time).
fn tree(root: u32) -> BTreeSet<(u32, u64)> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
            if let Some((ppid, start)) = stat_fields(pid) {
                all.push((pid, ppid, start));
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, start) in &all {
            if ppid == p && out.insert((pid, start)) {
                frontier.push(pid);
            }
        }
    }
    out
}

fn kill(pid: u32, sig: i32) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Steady load: `GET /` on new connections from `threads` threads.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match http(addr, "GET", "/", &[]) {
                            Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
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

    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn contexts_yaml(rng: &mut Rng, version: u64) -> String {
    match rng.below(3) {
        // A sequence fixes the count (1 to 4 workers).
        0 => (0..1 + rng.below(4))
            .map(|i| format!("- {{v: {version}, i: {i}}}\n"))
            .collect(),
        // A mapping: every worker's context.
        1 => format!("{{v: {version}}}\n"),
        // Invalid: must be ignored (counted as a failed reload).
        _ => "[unclosed\n".to_string(),
    }
}

#[test]
fn random_lifecycle_events_under_load_keep_every_guarantee() {
    let seed = std::env::var("DROVER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("chaos seed: {seed} (DROVER_CHAOS_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let dir = TempDir::new("chaos");
    let file = dir.file("contexts.yaml", "- {v: 0}\n- {v: 0}\n- {v: 0}\n");
    let f = file.display().to_string();
    // No --workers: a sequence sets the count, a mapping means one worker
    // (and SIGTTIN/SIGTTOU may change it).
    let mut d = start(&["--worker-contexts-file", &f, "--graceful-timeout", "5s"]);
    d.wait_ready();
    let load = Load::start(d.app(), 3);
    let mut seen = tree(d.pid);
    let mut kills = 0usize;
    let end = Instant::now() + Duration::from_secs(15);
    let mut version = 0;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        seen.extend(tree(d.pid));
        match rng.below(6) {
            0 => kill(d.pid, 1),  // HUP
            1 => kill(d.pid, 21), // TTIN
            2 => kill(d.pid, 22), // TTOU
            3 => {
                let kids = d.children();
                if !kids.is_empty() {
                    kill(kids[rng.below(kids.len() as u64) as usize], 9);
                    kills += 1;
                }
            }
            _ => {
                version += 1;
                let next = dir.0.join("next.yaml");
                std::fs::write(&next, contexts_yaml(&mut rng, version)).unwrap();
                std::fs::rename(&next, &file).unwrap();
            }
        }
        assert!(
            d.try_status().is_none(),
            "drover exited during chaos:\n{}",
            d.log_text()
        );
    }
    // Settles: every desired worker runs and is up.
    let settled = eventually(Duration::from_secs(20), || {
        let desired = d.metric("drover_workers_desired");
        let running = d.metric("drover_workers_running");
        let ready = http(d.admin, "GET", "/readyz", &[]).is_ok_and(|r| r.status == 200);
        ready && desired.is_some() && desired == running
    });
    assert!(
        settled,
        "did not settle (seed {seed}): desired {:?}, running {:?}\n{}",
        d.metric("drover_workers_desired"),
        d.metric("drover_workers_running"),
        d.log_text()
    );
    seen.extend(tree(d.pid));
    let (ok, failed) = load.finish();
    assert!(ok > 100, "too little load got through: {ok}");
    // Only requests on a worker killed with -9 may fail: at most one per
    // load thread per kill.
    assert!(
        failed <= kills * 3,
        "{failed} failed requests with {kills} kill -9 (seed {seed})"
    );
    d.signal(15);
    let st = d.wait_exit(Duration::from_secs(15));
    assert_eq!(st.code(), Some(0), "seed {seed}:\n{}", d.log_text());
    // Nothing of the tree is left, by pid and start time.
    std::thread::sleep(Duration::from_millis(100));
    let left: Vec<_> = seen
        .iter()
        .filter(|(pid, start)| stat_fields(*pid).is_some_and(|(_, s)| s == *start))
        .collect();
    assert!(left.is_empty(), "left behind (seed {seed}): {left:?}");
    eprintln!("chaos: {ok} ok, {failed} failed, {kills} kill -9, {version} contexts changes");
}
