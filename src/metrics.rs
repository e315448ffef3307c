//! The pod's Prometheus metrics: one scrape of the admin port describes the
//! whole pod, however many worker processes it runs.
//!
//! Two kinds of sources:
//! - the supervisor's own state (workers, restarts, drain, stop requests,
//!   backlog), kept in `prometheus` crate metrics it updates as things happen;
//! - everything measured elsewhere, read at scrape time by [`PodCollector`]:
//!   HTTP counters that each worker process writes into a shared-memory
//!   region ([`HttpRecorder`]), the listener's accept queue (`TCP_INFO`), the
//!   kernel's listen overflows, and each worker's CPU and memory (`/proc`).
//!
//! A scrape only reads: it takes no lock a worker's request path takes (the
//! workers write plain atomics), so it never slows a request. Counters stay
//! monotonic across worker restarts: a slot's HTTP counters live in the
//! supervisor's region and outlive its processes, and CPU time of exited
//! processes is carried over from `wait4`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::stop::{StopFlag, StopSource};
use crate::sys::SharedWords;

/// Most workers a pod can have (the shared region has a slot for each).
pub const MAX_WORKERS: usize = crate::config::MAX_WORKERS;

/// Upper bounds of `drover_http_request_duration_seconds`, in seconds: from
/// half a millisecond (a fast in-memory handler) to a minute (the longest
/// `/sleep`).
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

// Layout of one worker slot in the shared region, in 64-bit words.
const CODES: usize = 900; // status 100..=999
const OFF_BUCKETS: usize = CODES;
const OFF_COUNT: usize = OFF_BUCKETS + DURATION_BUCKETS.len();
const OFF_SUM_NS: usize = OFF_COUNT + 1;
/// In-flight gauges per slot, one per live process of the slot: the process
/// table hands each process a lane no other live process of its slot holds
/// (a slot has at most its current process, the one it replaces and, during
/// overlapping rolls, older ones still finishing), so the gauge of a process
/// that died mid-request can be reset without touching another's.
pub const LANES: usize = 4;
const OFF_LANES: usize = OFF_SUM_NS + 1;
/// Per lane: the process's open connections (for balancing accepts).
const OFF_CONNS: usize = OFF_LANES + LANES;
/// Per lane: 1 while the process's accept loop runs.
const OFF_ACCEPTING: usize = OFF_CONNS + LANES;
/// Failed `accept` calls on the shared socket (EMFILE and the like).
const OFF_ACCEPT_ERRORS: usize = OFF_ACCEPTING + LANES;
/// Per lane: requests the process answered (`--max-requests`); reset when
/// the lane's process is started and when it exits.
const OFF_LANE_REQUESTS: usize = OFF_ACCEPT_ERRORS + 1;
const SLOT_WORDS: usize = OFF_LANE_REQUESTS + LANES;

/// The shared region's total size in words.
pub const REGION_WORDS: usize = SLOT_WORDS * MAX_WORKERS;

/// Creates the region the workers of one pod record HTTP metrics into.
pub fn create_region() -> std::io::Result<Arc<SharedWords>> {
    SharedWords::create("drover-metrics", REGION_WORDS).map(Arc::new)
}

/// Maps the region a worker received.
pub(crate) fn open_region(fd: std::os::fd::OwnedFd) -> std::io::Result<Arc<SharedWords>> {
    let r = SharedWords::open(fd)?;
    if r.words().len() < REGION_WORDS {
        return Err(std::io::Error::other("metrics region is too small"));
    }
    Ok(Arc::new(r))
}

/// Records one worker process's requests into its slot. Cheap: a few relaxed
/// atomic adds per request, no lock, no allocation.
#[derive(Clone)]
pub struct HttpRecorder {
    region: Arc<SharedWords>,
    base: usize,
    /// None when every lane of the slot was taken: requests are counted,
    /// but not as in flight.
    lane: Option<usize>,
}

impl HttpRecorder {
    /// The recorder of a process of worker `id` holding in-flight `lane`.
    pub fn new(region: Arc<SharedWords>, id: usize, lane: Option<usize>) -> Option<HttpRecorder> {
        (id < MAX_WORKERS).then(|| HttpRecorder {
            region,
            base: id * SLOT_WORDS,
            lane: lane.filter(|&l| l < LANES),
        })
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        &self.region.words()[self.base + off]
    }

    /// A request started.
    pub fn start(&self) {
        if let Some(lane) = self.lane {
            self.word(OFF_LANES + lane).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection was accepted.
    pub fn conn_opened(&self) {
        if let Some(lane) = self.lane {
            self.word(OFF_CONNS + lane).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection closed.
    pub fn conn_closed(&self) {
        if let Some(lane) = self.lane {
            self.word(OFF_CONNS + lane).fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// This process's accept loop runs (or stopped).
    pub fn set_accepting(&self, on: bool) {
        if let Some(lane) = self.lane {
            self.word(OFF_ACCEPTING + lane)
                .store(u64::from(on), Ordering::Relaxed);
        }
    }

    /// Open connections of worker `slot`'s processes, if any of them is
    /// accepting now; None otherwise (it cannot take a connection).
    pub fn accepting_conns(&self, slot: usize) -> Option<u64> {
        let w = self
            .region
            .words()
            .get(slot * SLOT_WORDS..(slot + 1) * SLOT_WORDS)?;
        let accepting = w[OFF_ACCEPTING..OFF_ACCEPTING + LANES]
            .iter()
            .any(|a| a.load(Ordering::Relaxed) != 0);
        accepting.then(|| {
            w[OFF_CONNS..OFF_CONNS + LANES]
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum()
        })
    }

    /// This worker's slot.
    pub fn slot(&self) -> usize {
        self.base / SLOT_WORDS
    }

    /// Accepting a connection failed (EMFILE, ENFILE, ENOBUFS, ...).
    pub fn accept_error(&self) {
        self.word(OFF_ACCEPT_ERRORS).fetch_add(1, Ordering::Relaxed);
    }

    /// A request finished with `status` after `elapsed`.
    pub fn finish(&self, status: u16, elapsed: Duration) {
        if let Some(lane) = self.lane {
            self.word(OFF_LANES + lane).fetch_sub(1, Ordering::Relaxed);
            self.word(OFF_LANE_REQUESTS + lane)
                .fetch_add(1, Ordering::Relaxed);
        }
        let code = usize::from(status.clamp(100, 999)) - 100;
        self.word(code).fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(b) = DURATION_BUCKETS.iter().position(|&ub| secs <= ub) {
            self.word(OFF_BUCKETS + b).fetch_add(1, Ordering::Relaxed);
        }
        self.word(OFF_COUNT).fetch_add(1, Ordering::Relaxed);
        self.word(OFF_SUM_NS).fetch_add(
            elapsed.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }
}

/// The supervisor's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `drover_workers_desired`.
    pub workers_desired: IntGauge,
    /// `drover_workers_running`.
    pub workers_running: IntGauge,
    /// `drover_worker_restarts_total{worker}`.
    pub worker_restarts: IntCounterVec,
    /// `drover_draining`.
    pub draining: IntGauge,
    /// `drover_stop_requests_total{source}`, synced from the stop flag.
    stop_requests: IntCounterVec,
    /// `drover_listen_backlog`.
    pub listen_backlog: IntGauge,
    /// `drover_contexts_reloads_total{result}`.
    pub contexts_reloads: IntCounterVec,
    /// `drover_rolls_total{result}`: rolling restarts, `success` or `halted`.
    pub rolls: IntCounterVec,
    /// `drover_contexts_info{source,version}`: 1 for the contexts in force.
    contexts_info: IntGaugeVec,
    /// `drover_worker_timeouts_total{worker}`: workers killed by the
    /// watchdog (`--worker-timeout`, sd_notify `WATCHDOG=1`).
    pub worker_timeouts: IntCounterVec,
    /// `drover_worker_recycles_total{worker,reason}`.
    pub worker_recycles: IntCounterVec,
    flag: StopFlag,
    /// What is read at scrape time.
    pub pod: Arc<PodCollector>,
}

impl Metrics {
    /// Registers every metric. `http` is the workers' shared region (built-in
    /// and library apps only).
    pub fn new(flag: StopFlag, http: Option<Arc<SharedWords>>) -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let pod = Arc::new(PodCollector::new(http));
        registry
            .register(Box::new(SharedCollector(pod.clone())))
            .expect("unique metrics");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metrics");
        let m = Metrics {
            workers_desired: gauge(
                "drover_workers_desired",
                "Number of workers the pod should run.",
            ),
            workers_running: gauge(
                "drover_workers_running",
                "Number of worker processes currently running.",
            ),
            worker_restarts: counter(
                "drover_worker_restarts_total",
                "Times each worker was restarted after it exited.",
                "worker",
            ),
            draining: gauge(
                "drover_draining",
                "1 once a stop was requested and the pod drains, else 0.",
            ),
            stop_requests: counter(
                "drover_stop_requests_total",
                "Stop requests received, repeats included, by source.",
                "source",
            ),
            listen_backlog: gauge(
                "drover_listen_backlog",
                "Effective listen(2) backlog of the shared socket (after the somaxconn cap).",
            ),
            contexts_reloads: counter(
                "drover_contexts_reloads_total",
                "Worker contexts changes read from the watched source, by result (success: valid and taken; failure: invalid or unreadable, ignored).",
                "result",
            ),
            rolls: counter(
                "drover_rolls_total",
                "Rolling restarts (SIGHUP, contexts changes) by result: success (every worker replaced and up) or halted (a new worker did not come up; the old ones serve on).",
                "result",
            ),
            contexts_info: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "drover_contexts_info",
                        "The worker contexts in force: their source and version (ConfigMap resourceVersion or file content hash).",
                    ),
                    &["source", "version"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            worker_timeouts: counter(
                "drover_worker_timeouts_total",
                "Workers killed and replaced because their heartbeat stopped (--worker-timeout, or sd_notify WATCHDOG=1 not repeated within WATCHDOG_USEC), by worker.",
                "worker",
            ),
            worker_recycles: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "drover_worker_recycles_total",
                        "Workers replaced gracefully for reaching a limit, by worker and reason (requests: --max-requests, memory: --max-worker-memory, lifetime: --max-worker-lifetime).",
                    ),
                    &["worker", "reason"],
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            registry,
            flag,
            pod,
        };
        for r in ["success", "failure"] {
            m.contexts_reloads.with_label_values(&[r]);
        }
        for r in ["success", "halted"] {
            m.rolls.with_label_values(&[r]);
        }
        for s in StopSource::ALL {
            m.stop_requests.with_label_values(&[s.as_str()]);
        }
        m
    }

    /// Records the contexts now in force.
    pub fn set_contexts(&self, source: &str, version: &str) {
        self.contexts_info.reset();
        self.contexts_info
            .with_label_values(&[source, version])
            .set(1);
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        for s in StopSource::ALL {
            let c = self.stop_requests.with_label_values(&[s.as_str()]);
            let now = self.flag.requests(s);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
        self.draining.set(i64::from(self.flag.is_set()));
        let mut out = Vec::with_capacity(8192);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Per-slot process bookkeeping for CPU and memory.
#[derive(Default)]
struct Procs {
    /// The live worker processes as (slot, pid): a copy of the process
    /// table's view, published by its owner after every change (see
    /// [`PodCollector::publish`]); never edited here.
    live: Arc<[(usize, i32)]>,
    /// CPU seconds of each slot's exited processes.
    cpu_base: Vec<f64>,
    /// Highest CPU total reported per slot (keeps the counter monotonic).
    cpu_shown: Vec<f64>,
    /// Slots that have ever run a process.
    slots: usize,
}

impl Procs {
    fn grow(&mut self, slots: usize) {
        self.slots = self.slots.max(slots);
        if self.cpu_base.len() < self.slots {
            self.cpu_base.resize(self.slots, 0.0);
            self.cpu_shown.resize(self.slots, 0.0);
        }
    }
}

/// Reads, at scrape time, what lives outside the supervisor's registry.
pub struct PodCollector {
    http: Option<Arc<SharedWords>>,
    /// A duplicate of the listening socket for `TCP_INFO`; dropped when
    /// accepting stops, so that it never keeps the socket open.
    /// Duplicates of the workers' sockets (one, or one per slot with
    /// `--balance reuseport`).
    listener: Mutex<Vec<std::os::fd::OwnedFd>>,
    procs: Mutex<Procs>,
    descs: Vec<Desc>,
}

struct SharedCollector(Arc<PodCollector>);

impl Collector for SharedCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

const FAMILIES: [(&str, &str); 11] = [
    ("drover_http_requests_total", "HTTP requests answered, by worker and status code."),
    ("drover_http_request_duration_seconds", "Time to answer HTTP requests, all workers of the pod."),
    ("drover_http_requests_in_flight", "HTTP requests being answered now, all workers of the pod."),
    ("drover_listen_queue_length", "Connections waiting in the listening socket's accept queue now (with --balance reuseport, in every worker's socket's, summed)."),
    ("drover_listen_overflows_total", "Times the kernel dropped a connection because an accept queue was full (TcpExt ListenOverflows of the pod's network namespace)."),
    ("drover_worker_cpu_seconds_total", "CPU time used by each worker's processes, restarts included."),
    ("drover_worker_resident_memory_bytes", "Resident memory of each worker's current process."),
    ("drover_listen_queue_limit", "Accept-queue limit of the listening socket as the kernel enforces it (per socket with --balance reuseport)."),
    ("drover_accept_errors_total", "Times accepting a connection on the shared socket failed (EMFILE, ENFILE, ENOBUFS, ...), by worker."),
    ("drover_admin_connections_evicted_total", "Admin connections closed to make room for a new one (at the cap of open connections, or out of file descriptors): someone holds many connections to the admin port."),
    ("drover_admin_accept_errors_total", "Times accepting a connection on the admin port failed (EMFILE, ENFILE, ...)."),
];

impl PodCollector {
    fn new(http: Option<Arc<SharedWords>>) -> PodCollector {
        let descs = FAMILIES
            .iter()
            .map(|(name, help)| {
                Desc::new(name.to_string(), help.to_string(), vec![], HashMap::new())
                    .expect("valid desc")
            })
            .collect();
        PodCollector {
            http,
            listener: Mutex::new(Vec::new()),
            procs: Mutex::new(Procs::default()),
            descs,
        }
    }

    /// Watches the accept queue of `fd` (a duplicate the collector owns).
    pub fn watch_listener(&self, fd: std::os::fd::OwnedFd) {
        self.listener.lock().expect("not poisoned").push(fd);
    }

    /// Stops watching the listener (accepting stops: the duplicate must go).
    pub fn forget_listener(&self) {
        self.listener.lock().expect("not poisoned").clear();
    }

    /// The live worker processes now, as (slot, pid): the process table's
    /// owner publishes this after every change.
    pub fn publish(&self, live: Arc<[(usize, i32)]>) {
        let mut p = self.procs.lock().expect("not poisoned");
        let slots = live.iter().map(|&(s, _)| s + 1).max().unwrap_or(0);
        p.grow(slots);
        p.live = live;
    }

    /// A process of worker `slot` exited after using `cpu_seconds`; `lane`
    /// is its in-flight lane, reset in case it died mid-request.
    pub fn process_exited(&self, slot: usize, cpu_seconds: f64, lane: Option<usize>) {
        let mut p = self.procs.lock().expect("not poisoned");
        p.grow(slot + 1);
        p.cpu_base[slot] += cpu_seconds;
        if let (Some(http), Some(lane)) = (&self.http, lane) {
            if slot < MAX_WORKERS && lane < LANES {
                let w = &http.words()[slot * SLOT_WORDS..(slot + 1) * SLOT_WORDS];
                for off in [OFF_LANES, OFF_CONNS, OFF_ACCEPTING, OFF_LANE_REQUESTS] {
                    w[off + lane].store(0, Ordering::Relaxed);
                }
            }
        }
    }

    /// Requests answered by the process of `slot` holding `lane` (None
    /// without the HTTP region).
    pub fn lane_requests(&self, slot: usize, lane: usize) -> Option<u64> {
        let http = self.http.as_ref()?;
        (slot < MAX_WORKERS && lane < LANES).then(|| {
            http.words()[slot * SLOT_WORDS + OFF_LANE_REQUESTS + lane].load(Ordering::Relaxed)
        })
    }

    /// A process of `slot` is about to start on `lane`: its request count
    /// starts at 0.
    pub fn lane_started(&self, slot: usize, lane: Option<usize>) {
        if let (Some(http), Some(lane)) = (&self.http, lane) {
            if slot < MAX_WORKERS && lane < LANES {
                http.words()[slot * SLOT_WORDS + OFF_LANE_REQUESTS + lane]
                    .store(0, Ordering::Relaxed);
            }
        }
    }

    /// The in-process app records into slot 0 like a worker would.
    pub fn region(&self) -> Option<Arc<SharedWords>> {
        self.http.clone()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::with_capacity(FAMILIES.len());
        let (slots, cpu, rss) = self.worker_usage();
        if let Some(http) = &self.http {
            out.extend(http_families(http.words(), slots.max(1)));
        }
        {
            use std::os::fd::AsRawFd;
            // Summed over the sockets; the limit is per socket (each has the
            // backlog), the smallest one if an app changed one.
            let mut seen: Option<(u32, u32)> = None;
            for fd in self.listener.lock().expect("not poisoned").iter() {
                if let Some((q, l)) = crate::sys::listen_queue(fd.as_raw_fd()) {
                    seen = Some(seen.map_or((q, l), |(sq, sl)| (sq + q, sl.min(l))));
                }
            }
            if let Some((queued, limit)) = seen {
                out.push(gauge_family(FAMILIES[3], vec![(vec![], f64::from(queued))]));
                out.push(gauge_family(FAMILIES[7], vec![(vec![], f64::from(limit))]));
            }
        }
        let (evicted, admin_errors) = crate::admin::counters();
        out.push(family(
            FAMILIES[9],
            MetricType::COUNTER,
            vec![(vec![], evicted as f64)],
        ));
        out.push(family(
            FAMILIES[10],
            MetricType::COUNTER,
            vec![(vec![], admin_errors as f64)],
        ));
        if let Some(n) = listen_overflows() {
            out.push(family(
                FAMILIES[4],
                MetricType::COUNTER,
                vec![(vec![], n as f64)],
            ));
        }
        if !cpu.is_empty() {
            out.push(family(FAMILIES[5], MetricType::COUNTER, cpu));
            out.push(gauge_family(FAMILIES[6], rss));
        }
        out
    }

    /// (slots, cpu per worker, rss per worker).
    #[allow(clippy::type_complexity)]
    fn worker_usage(
        &self,
    ) -> (
        usize,
        Vec<(Vec<(&'static str, String)>, f64)>,
        Vec<(Vec<(&'static str, String)>, f64)>,
    ) {
        let mut p = self.procs.lock().expect("not poisoned");
        let slots = p.slots;
        let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as f64;
        let mut cpu = p.cpu_base.clone();
        let mut rss = vec![0.0; slots];
        for &(slot, pid) in p.live.iter() {
            if let Some((ticks, pages)) = proc_usage(pid) {
                cpu[slot] += ticks / tick;
                rss[slot] += pages * page;
            }
        }
        for (shown, now) in p.cpu_shown.iter_mut().zip(cpu.iter_mut()) {
            *now = now.max(*shown);
            *shown = *now;
        }
        let label = |i: usize| vec![("worker", i.to_string())];
        (
            slots,
            cpu.into_iter()
                .enumerate()
                .map(|(i, v)| (label(i), v))
                .collect(),
            rss.into_iter()
                .enumerate()
                .map(|(i, v)| (label(i), v))
                .collect(),
        )
    }
}

/// (utime+stime+cutime+cstime in ticks, resident pages) of a live process,
/// from one read of `/proc/<pid>/stat` (the scrape's per-worker cost).
fn proc_usage(pid: i32) -> Option<(f64, f64)> {
    let mut buf = [0u8; 1024];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
        f.read(&mut buf).ok()?
    };
    let stat = std::str::from_utf8(&buf[..n]).ok()?;
    // Fields after the command name, which may contain spaces and ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_ascii_whitespace();
    // rest's first field is field 3 (state); utime..cstime are fields 14-17,
    // rss is field 24.
    let ticks: f64 = f
        .by_ref()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse::<f64>().ok())
        .sum();
    let pages: f64 = f.nth(6)?.parse().ok()?;
    Some((ticks, pages))
}

/// TcpExt ListenOverflows of this network namespace.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn http_families(words: &[AtomicU64], slots: usize) -> Vec<MetricFamily> {
    let slots = slots.min(MAX_WORKERS);
    let mut requests = Vec::new();
    let mut accept_errors = Vec::new();
    let mut buckets = [0u64; DURATION_BUCKETS.len()];
    let (mut count, mut sum_ns, mut in_flight) = (0u64, 0u64, 0i64);
    for slot in 0..slots {
        let w = &words[slot * SLOT_WORDS..(slot + 1) * SLOT_WORDS];
        for (code, c) in w[..CODES].iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            if n > 0 {
                requests.push((
                    vec![
                        ("code", (code + 100).to_string()),
                        ("worker", slot.to_string()),
                    ],
                    n as f64,
                ));
            }
        }
        for (b, c) in buckets.iter_mut().zip(&w[OFF_BUCKETS..OFF_COUNT]) {
            *b += c.load(Ordering::Relaxed);
        }
        accept_errors.push((
            vec![("worker", slot.to_string())],
            w[OFF_ACCEPT_ERRORS].load(Ordering::Relaxed) as f64,
        ));
        count += w[OFF_COUNT].load(Ordering::Relaxed);
        sum_ns += w[OFF_SUM_NS].load(Ordering::Relaxed);
        in_flight += w[OFF_LANES..OFF_LANES + LANES]
            .iter()
            .map(|l| l.load(Ordering::Relaxed) as i64)
            .sum::<i64>();
    }
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let mut hb = Vec::with_capacity(DURATION_BUCKETS.len());
    for (ub, n) in DURATION_BUCKETS.iter().zip(buckets) {
        cumulative += n;
        let mut b = proto::Bucket::default();
        b.set_upper_bound(*ub);
        b.set_cumulative_count(cumulative);
        hb.push(b);
    }
    // Requests are counted before their bucket; keep +Inf >= every bucket.
    h.set_sample_count(count.max(cumulative));
    h.set_sample_sum(sum_ns as f64 / 1e9);
    h.set_bucket(hb);
    let mut m = proto::Metric::default();
    m.set_histogram(h);
    let mut hist = MetricFamily::default();
    hist.set_name(FAMILIES[1].0.into());
    hist.set_help(FAMILIES[1].1.into());
    hist.set_field_type(MetricType::HISTOGRAM);
    hist.set_metric(vec![m]);
    vec![
        family(FAMILIES[0], MetricType::COUNTER, requests),
        hist,
        gauge_family(FAMILIES[2], vec![(vec![], in_flight.max(0) as f64)]),
        family(FAMILIES[8], MetricType::COUNTER, accept_errors),
    ]
}

fn gauge_family(f: (&str, &str), samples: Vec<(Vec<(&'static str, String)>, f64)>) -> MetricFamily {
    family(f, MetricType::GAUGE, samples)
}

fn family(
    f: (&str, &str),
    kind: MetricType,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
) -> MetricFamily {
    let mut fam = MetricFamily::default();
    fam.set_name(f.0.into());
    fam.set_help(f.1.into());
    fam.set_field_type(kind);
    let metrics = samples
        .into_iter()
        .map(|(labels, v)| {
            let mut m = proto::Metric::default();
            m.set_label(
                labels
                    .into_iter()
                    .map(|(k, val)| {
                        let mut l = proto::LabelPair::default();
                        l.set_name(k.into());
                        l.set_value(val);
                        l
                    })
                    .collect(),
            );
            match kind {
                MetricType::COUNTER => {
                    let mut c = proto::Counter::default();
                    c.set_value(v);
                    m.set_counter(c);
                }
                _ => {
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                }
            }
            m
        })
        .collect();
    fam.set_metric(metrics);
    fam
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_requests_render_per_worker_and_pod_wide() {
        let region = create_region().unwrap();
        let a = HttpRecorder::new(region.clone(), 0, Some(0)).unwrap();
        let b = HttpRecorder::new(region.clone(), 1, Some(1)).unwrap();
        // A second process of worker 1 on another lane, one request in flight.
        let b2 = HttpRecorder::new(region.clone(), 1, Some(2)).unwrap();
        b2.start();
        for _ in 0..3 {
            a.start();
            a.finish(200, Duration::from_micros(300));
        }
        b.start();
        b.finish(404, Duration::from_millis(30));
        b.start(); // still in flight
        let pod = PodCollector::new(Some(region));
        pod.publish(vec![(0, 1), (1, 2), (1, 3)].into());
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&pod.collect(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("drover_http_requests_total{code=\"200\",worker=\"0\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("drover_http_requests_total{code=\"404\",worker=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("drover_http_request_duration_seconds_bucket{le=\"0.0005\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("drover_http_request_duration_seconds_bucket{le=\"0.05\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("drover_http_request_duration_seconds_count 4"),
            "{text}"
        );
        assert!(text.contains("drover_http_requests_in_flight 2"), "{text}");
        // A process of worker 1 dies mid-request: its in-flight lane resets,
        // the other process's lane is untouched.
        pod.publish(vec![(0, 1), (1, 3)].into());
        pod.process_exited(1, 0.5, Some(1));
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&pod.collect(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("drover_http_requests_in_flight 1"), "{text}");
        assert!(
            text.contains("drover_worker_cpu_seconds_total{worker=\"1\"} 0.5"),
            "{text}"
        );
    }
}
