//! `/metrics` describes the whole pod: checked by real Prometheus tools
//! (`promtool`, a Prometheus server scraping drover) and a real load
//! generator (`wrk`), all installed by `tests/run`.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A tool the tests need; fails (never skips) when it is missing.
fn tool(name: &str) -> String {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("`{name}` is not installed: run tests/run, which installs it");
}

fn scrape(d: &Drover) -> String {
    let r = http(d.admin, "GET", "/metrics", &[]).expect("scrape");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4"),
        "{r:?}"
    );
    r.body
}

/// Every sample of a scrape: series (name with labels) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The series of counters (and histogram parts, which only grow).
fn is_monotonic(series: &str) -> bool {
    let name = series.split('{').next().unwrap_or(series);
    name.ends_with("_total")
        || name.ends_with("_count")
        || name.ends_with("_sum")
        || name.ends_with("_bucket")
}

fn worker_pids(d: &Drover, n: usize) -> BTreeMap<u64, u32> {
    let mut seen = BTreeMap::new();
    for _ in 0..500 {
        let v = get_index(d.app());
        seen.insert(
            v["worker"].as_u64().unwrap(),
            v["pid"].as_u64().unwrap() as u32,
        );
        if seen.len() == n {
            return seen;
        }
    }
    panic!("only saw workers {seen:?}");
}

/// `promtool check metrics` finds nothing to complain about in a live scrape
/// that has every family populated (requests of several codes, a restart, a
/// stop request).
#[test]
fn promtool_finds_no_problem_in_a_live_scrape() {
    let mut d = start(&["--workers", "2", "--drain-delay", "2s"]);
    d.wait_ready();
    for path in ["/", "/", "/nope", "/sleep?ms=1"] {
        http(d.app(), "GET", path, &[]).unwrap();
    }
    http(d.admin, "POST", "/admin/stop", &[]).unwrap();
    let text = scrape(&d);
    for family in [
        "drover_workers_desired",
        "drover_workers_running",
        "drover_draining",
        "drover_stop_requests_total",
        "drover_listen_backlog",
        "drover_listen_queue_length",
        "drover_listen_overflows_total",
        "drover_http_requests_total",
        "drover_http_request_duration_seconds",
        "drover_http_requests_in_flight",
        "drover_worker_cpu_seconds_total",
        "drover_worker_resident_memory_bytes",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && findings.trim().is_empty(),
        "promtool: {findings}\n{text}"
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// HTTP metrics are recorded in each worker process and summed by the
/// supervisor: the pod's request count equals what was sent, split over the
/// workers that answered.
#[test]
fn requests_are_counted_per_worker_and_summed_over_the_pod() {
    let d = start(&["--workers", "3"]);
    d.wait_ready();
    let mut per_worker: BTreeMap<u64, u64> = BTreeMap::new();
    for _ in 0..60 {
        let v = get_index(d.app());
        *per_worker.entry(v["worker"].as_u64().unwrap()).or_default() += 1;
    }
    let s = samples(&scrape(&d));
    for (w, n) in &per_worker {
        let key = format!("drover_http_requests_total{{code=\"200\",worker=\"{w}\"}}");
        assert_eq!(s.get(&key).copied(), Some(*n as f64), "{key} in {s:?}");
    }
    let total: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("drover_http_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 60.0);
    assert_eq!(s["drover_http_request_duration_seconds_count"], 60.0);
    assert_eq!(s["drover_http_requests_in_flight"], 0.0);
    assert_eq!(s["drover_workers_running"], 3.0);
}

/// After `kill -9` of a worker its restart counter is 1, and no counter of
/// the pod went backwards: the dead worker's requests are still counted.
#[test]
fn a_killed_worker_is_counted_and_no_counter_goes_backwards() {
    let d = start(&["--workers", "2"]);
    d.wait_ready();
    let pids = worker_pids(&d, 2);
    for _ in 0..40 {
        get_index(d.app());
    }
    let before = samples(&scrape(&d));
    let (&victim_id, &victim) = pids.iter().next().unwrap();
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(5), || {
            let c = d.children();
            c.len() == 2 && !c.contains(&victim)
        }),
        "no replacement for worker {victim_id}"
    );
    d.wait_ready();
    let after = samples(&scrape(&d));
    assert_eq!(
        after
            .get(&format!(
                "drover_worker_restarts_total{{worker=\"{victim_id}\"}}"
            ))
            .copied(),
        Some(1.0),
        "{after:?}"
    );
    for (series, v) in before.iter().filter(|(k, _)| is_monotonic(k)) {
        let now = after.get(series).copied().unwrap_or(f64::NAN);
        assert!(now >= *v, "{series} went from {v} to {now}");
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn prom_query(prom: SocketAddr, query: &str) -> Option<f64> {
    let enc: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let r = http(prom, "GET", &format!("/api/v1/query?query={enc}"), &[]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// A real Prometheus server scraping the admin port sees the pod: the worker
/// count, the sum of requests over workers equal to what the test sent, and
/// `drover_draining` turning 1 after a stop request.
#[test]
fn a_prometheus_server_scrapes_the_whole_pod() {
    let mut d = start(&["--workers", "2", "--drain-delay", "3s"]);
    d.wait_ready();
    let dir = TempDir::new("prom");
    let port = free_port();
    let config = dir.file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\nscrape_configs:\n  - job_name: drover\n    static_configs:\n      - targets: ['{}']\n",
            d.admin
        ),
    );
    let prom = Killed(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..25 {
        get_index(d.app());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = (
            prom_query(addr, "drover_workers_running"),
            prom_query(addr, "sum(drover_http_requests_total)"),
        );
        if last == (Some(2.0), Some(25.0)) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus saw {last:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(prom_query(addr, "drover_draining"), Some(0.0));
    assert_eq!(
        http(d.admin, "POST", "/admin/stop", &[]).unwrap().status,
        202
    );
    assert!(
        eventually(Duration::from_secs(3), || prom_query(
            addr,
            "drover_draining"
        ) == Some(1.0)),
        "Prometheus never saw drover_draining 1"
    );
    assert_eq!(
        prom_query(addr, "drover_stop_requests_total{source=\"http\"}"),
        Some(1.0)
    );
    drop(prom);
    assert_eq!(d.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// The accept-queue gauge reads the kernel: with the workers held (SIGSTOP)
/// and wrk hammering a backlog of 8, it rises above 0 (and the kernel counts
/// overflows); once the workers run again it returns to 0.
#[test]
fn accept_queue_gauge_follows_the_kernel_under_wrk() {
    let d = start(&["--workers", "2", "--backlog", "8"]);
    d.wait_ready();
    let pids: Vec<u32> = worker_pids(&d, 2).values().copied().collect();
    assert_eq!(d.metric("drover_listen_queue_length"), Some(0.0));
    assert_eq!(d.metric("drover_listen_backlog"), Some(8.0));
    struct Resume(Vec<u32>);
    impl Drop for Resume {
        fn drop(&mut self) {
            for &p in &self.0 {
                unsafe { libc::kill(p as i32, libc::SIGCONT) };
            }
        }
    }
    let resume = Resume(pids.clone());
    for &p in &pids {
        unsafe { libc::kill(p as i32, libc::SIGSTOP) };
    }
    let overflows_before = d.metric("drover_listen_overflows_total").unwrap();
    let wrk = Killed(
        Command::new(tool("wrk"))
            .args(["-t", "2", "-c", "64", "-d", "3s", "--timeout", "5s"])
            .arg(format!("http://{}/", d.app()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wrk"),
    );
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline && peak < 8.0 {
        peak = peak.max(d.metric("drover_listen_queue_length").unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        peak > 0.0,
        "the queue gauge never rose while the workers were stopped"
    );
    // One socket; or, run with DROVER_BALANCE=reuseport (tests/run), one
    // per worker, and the gauge sums them.
    let sockets = if std::env::var("DROVER_BALANCE").as_deref() == Ok("reuseport") {
        2.0
    } else {
        1.0
    };
    assert!(
        peak <= 9.0 * sockets,
        "queue {peak} beyond backlog 8 (+1) on each of {sockets} socket(s)"
    );
    assert!(
        eventually(Duration::from_secs(2), || d
            .metric("drover_listen_overflows_total")
            .unwrap_or(0.0)
            > overflows_before),
        "the kernel's listen overflows did not grow"
    );
    drop(resume);
    drop(wrk);
    assert!(
        eventually(Duration::from_secs(5), || d
            .metric("drover_listen_queue_length")
            == Some(0.0)),
        "the queue gauge did not return to 0"
    );
    // Still serving.
    let _ = TcpStream::connect(d.app()).unwrap();
    assert_eq!(get_index(d.app())["context"], serde_json::Value::Null);
}

/// Every worker's restart counter exists from the start, at 0 (Prometheus'
/// own guidance: a series that appears only with its first increment hides
/// that increment from `increase()`), and so does one added by SIGTTIN.
#[test]
fn restart_counters_exist_at_zero_for_every_worker() {
    let d = start(&["--workers", "3"]);
    d.wait_ready();
    for w in 0..3 {
        let series = format!("drover_worker_restarts_total{{worker=\"{w}\"}}");
        assert_eq!(d.metric(&series), Some(0.0), "{series}\n{}", scrape(&d));
    }
    assert_eq!(d.metric("drover_rolls_total{result=\"halted\"}"), Some(0.0));
    assert_eq!(
        d.metric("drover_rolls_total{result=\"success\"}"),
        Some(0.0)
    );
    d.signal(libc::SIGTTIN);
    assert!(
        eventually(Duration::from_secs(5), || d
            .metric("drover_worker_restarts_total{worker=\"3\"}")
            == Some(0.0)),
        "{}",
        scrape(&d)
    );
}
