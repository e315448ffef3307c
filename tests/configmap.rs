//! Worker contexts from a Kubernetes ConfigMap through the API (a fake API
//! server on loopback, `common::fake_kube`), watched, with rolling restarts;
//! and from a watched file laid out the way the kubelet mounts a ConfigMap.
//!
//! Every test starts the real binary on free 127.0.0.1 ports, bounds every
//! wait, and only kills processes it started.

mod common;
use common::fake_kube::FakeKube;
use common::*;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const KEY: &str = "worker-contexts.yaml";
/// Bound for one read or write on a test connection.
const IO_LIMIT: Duration = Duration::from_secs(5);
/// Bound for a change to reach the workers.
const CHANGE_LIMIT: Duration = Duration::from_secs(8);

// ---------------------------------------------------------------- helpers

/// The fake's environment plus `extra`, owned.
fn env_for(kube: &FakeKube, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = kube
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    // Whatever the test runner's environment says, the namespace is decided
    // by the test (an empty POD_NAMESPACE counts as unset).
    if !extra.iter().any(|(k, _)| *k == "POD_NAMESPACE") {
        env.push(("POD_NAMESPACE".into(), String::new()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn borrow(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Starts drover against the fake API server.
fn start_kube(kube: &FakeKube, args: &[&str], extra: &[(&str, &str)]) -> Drover {
    let env = env_for(kube, extra);
    let d = start_with(bin(), args, &borrow(&env));
    d.wait_ready();
    d
}

/// Output of a drover run that is expected to end by itself.
struct Exited {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Exited {
    fn all(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs drover with `args` and `env` to its end (bounded to `limit`),
/// capturing stdout, stderr and the exit code. Loopback free ports are
/// added for the main command (not for `check`), so that a drover that
/// wrongly starts anyway binds nothing public.
fn run_env(args: &[&str], env: &[(String, String)], limit: Duration) -> Exited {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if args.first() != Some(&"check") {
        all.extend(
            [
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--admin-host",
                "127.0.0.1",
                "--admin-port",
                "0",
            ]
            .map(String::from),
        );
    }
    all.extend(["--log-format".to_string(), "json".to_string()]);
    let mut cmd = Command::new(bin());
    cmd.args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn drover");
    // Read both pipes on threads so a chatty child never blocks.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let (o, e) = (out_t.join().unwrap(), err_t.join().unwrap());
            panic!("drover {all:?} did not exit within {limit:?}\n--- stdout\n{o}--- stderr\n{e}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Exited {
        code: status.code().unwrap_or(-1),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Asserts a start error: exit 78, the message on stderr, and nothing
/// bound or started.
fn assert_config_error(r: &Exited, needles: &[&str]) {
    assert_eq!(r.code, 78, "{}", r.all());
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}:\n{}", r.all());
    }
    assert!(
        r.stderr.contains("drover: error: "),
        "no one-line error:\n{}",
        r.all()
    );
    for never in ["worker started", "listening on", "admin server on"] {
        assert!(
            !r.stderr.contains(never),
            "{never:?} despite the error:\n{}",
            r.all()
        );
    }
}

/// One `GET /` on a fresh connection with timeouts; returns the JSON.
fn try_index(addr: SocketAddr) -> io::Result<Value> {
    let mut s = TcpStream::connect_timeout(&addr, IO_LIMIT)?;
    s.set_read_timeout(Some(IO_LIMIT))?;
    s.set_write_timeout(Some(IO_LIMIT))?;
    let r = exchange(&mut s, "GET", "/", &[], IO_LIMIT)?;
    if r.status != 200 {
        return Err(io::Error::other(format!("status {}: {}", r.status, r.body)));
    }
    serde_json::from_str(&r.body).map_err(|e| io::Error::other(format!("{e}: {}", r.body)))
}

fn index(addr: SocketAddr) -> Value {
    try_index(addr).unwrap_or_else(|e| panic!("GET / on {addr}: {e}"))
}

/// worker id -> (context, pid), from fresh connections until all `n`
/// workers answered (the last answer of each id wins). None if some worker
/// never answered in 400 requests.
fn snapshot(addr: SocketAddr, n: usize) -> Option<BTreeMap<u64, (Value, u64)>> {
    let mut seen = BTreeMap::new();
    for _ in 0..400 {
        let v = index(addr);
        let id = v["worker"].as_u64().expect("worker id");
        seen.insert(id, (v["context"].clone(), v["pid"].as_u64().expect("pid")));
        if seen.len() == n {
            // A few more, so a process on its way out shows up if it still serves.
            for _ in 0..(4 * n) {
                let v = index(addr);
                let id = v["worker"].as_u64().unwrap();
                seen.insert(id, (v["context"].clone(), v["pid"].as_u64().unwrap()));
            }
            return (seen.len() == n).then_some(seen);
        }
    }
    None
}

fn contexts_of(s: &BTreeMap<u64, (Value, u64)>) -> Vec<Value> {
    s.values().map(|(c, _)| c.clone()).collect()
}

fn pids_of(s: &BTreeMap<u64, (Value, u64)>) -> Vec<u64> {
    s.values().map(|(_, p)| *p).collect()
}

/// Waits until the workers answer with exactly `want` (worker i has
/// `want[i]`); returns the snapshot.
fn wait_contexts(d: &Drover, want: &[Value], limit: Duration) -> BTreeMap<u64, (Value, u64)> {
    let mut last = None;
    let ok = eventually(limit, || {
        let s = snapshot(d.app(), want.len());
        let good = s.as_ref().is_some_and(|s| contexts_of(s) == want);
        last = s;
        good
    });
    assert!(
        ok,
        "workers never answered {want:?}; last seen {last:?}\n{}",
        d.log_text()
    );
    last.unwrap()
}

/// Waits until `series` has the value `want` on /metrics.
fn wait_metric(d: &Drover, series: &str, want: f64) {
    let mut last = None;
    let ok = eventually(Duration::from_secs(5), || {
        last = d.metric(series);
        last == Some(want)
    });
    assert!(
        ok,
        "{series} never became {want} (last {last:?}); /metrics:\n{}",
        http(d.admin, "GET", "/metrics", &[])
            .map(|r| r.body)
            .unwrap_or_default()
    );
}

fn reloads(d: &Drover, result: &str) -> Option<f64> {
    d.metric(&format!(
        "drover_contexts_reloads_total{{result=\"{result}\"}}"
    ))
}

fn info_series(source: &str, version: &str) -> String {
    format!("drover_contexts_info{{source=\"{source}\",version=\"{version}\"}}")
}

/// The `drover_contexts_info` sample lines now exposed.
fn info_lines(d: &Drover) -> Vec<String> {
    http(d.admin, "GET", "/metrics", &[])
        .map(|r| {
            r.body
                .lines()
                .filter(|l| l.starts_with("drover_contexts_info{"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the log has a line containing `needle`.
fn wait_log(d: &Drover, needle: &str, limit: Duration) {
    assert!(
        eventually(limit, || d.log_contains(needle)),
        "the log never said {needle:?}:\n{}",
        d.log_text()
    );
}

/// Samples the workers for `period` and asserts they keep `want` contexts
/// and `pids`.
fn assert_unchanged_for(d: &Drover, want: &[Value], pids: &[u64], period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let s = snapshot(d.app(), want.len())
            .unwrap_or_else(|| panic!("a worker stopped answering:\n{}", d.log_text()));
        assert_eq!(contexts_of(&s), want, "contexts changed:\n{}", d.log_text());
        assert_eq!(
            pids_of(&s),
            pids,
            "workers were replaced:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that sends `GET /` on a fresh connection every ~10 ms until
/// stopped (or 30 s), counting successes and recording failures.
struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(usize, Vec<String>)>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let end = Instant::now() + Duration::from_secs(30);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    let at = Instant::now();
                    match try_index(addr) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{e} ({:?} for this request)", at.elapsed())),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (ok, failed)
            })
        };
        Load { stop, handle }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread")
    }
}

/// drover's content version of a contexts file (FNV-1a 64, hex), as in
/// `filewatch::content_version`.
fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A fake API server with `default/ctx` holding `yaml` under the default key.
fn kube_with(yaml: &str) -> (FakeKube, u64) {
    let kube = FakeKube::start("default");
    let rv = kube.put("default", "ctx", &[(KEY, yaml)]);
    (kube, rv)
}

// ------------------------------------------------------- 1. contexts reach

/// A three-item sequence in the ConfigMap makes three workers, worker *i*
/// getting item *i* as its context.
#[test]
fn a_sequence_gives_each_worker_its_item() {
    let (kube, rv) = kube_with("- {shard: 0}\n- {shard: 1}\n- {shard: 2, name: two}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    let s = wait_contexts(
        &d,
        &[
            json!({"shard": 0}),
            json!({"shard": 1}),
            json!({"shard": 2, "name": "two"}),
        ],
        Duration::from_secs(5),
    );
    for (id, (ctx, _)) in &s {
        assert_eq!(ctx["shard"].as_u64(), Some(*id), "{s:?}");
    }
    assert_eq!(d.metric("drover_workers_desired"), Some(3.0));
    wait_metric(&d, &info_series("configmap", &rv.to_string()), 1.0);
}

/// A mapping is the one context of every worker: with `--workers 2` both
/// workers get the same context.
#[test]
fn a_mapping_is_every_workers_context() {
    let (kube, _) = kube_with("model: small\nbatch: 8\n");
    let d = start_kube(
        &kube,
        &["--worker-contexts-configmap", "ctx", "--workers", "2"],
        &[],
    );
    let want = json!({"model": "small", "batch": 8});
    wait_contexts(&d, &[want.clone(), want], Duration::from_secs(5));
}

// ---------------------------------------------------- 2. namespace choice

/// `NS/NAME` names the namespace explicitly; it wins over POD_NAMESPACE and
/// the kubeconfig's namespace (the ConfigMap exists only in `other`).
#[test]
fn an_explicit_namespace_is_used() {
    let kube = FakeKube::start("default");
    kube.put("other", "ctx", &[(KEY, "where: other\n")]);
    let d = start_kube(
        &kube,
        &["--worker-contexts-configmap", "other/ctx"],
        &[("POD_NAMESPACE", "podns")],
    );
    assert_eq!(index(d.app())["context"], json!({"where": "other"}));
    assert!(
        kube.requests()
            .iter()
            .all(|r| !r.contains("/namespaces/") || r.contains("/namespaces/other/")),
        "{:?}",
        kube.requests()
    );
}

/// Without `NS/`, POD_NAMESPACE (the downward API's usual variable) is the
/// namespace, before the kubeconfig's.
#[test]
fn pod_namespace_env_is_the_default_namespace() {
    let kube = FakeKube::start("kcns");
    kube.put("podns", "ctx", &[(KEY, "where: podns\n")]);
    let d = start_kube(
        &kube,
        &["--worker-contexts-configmap", "ctx"],
        &[("POD_NAMESPACE", "podns")],
    );
    assert_eq!(index(d.app())["context"], json!({"where": "podns"}));
}

/// Without `NS/` or POD_NAMESPACE (and no service-account namespace file),
/// the kubeconfig context's namespace is used.
#[test]
fn the_kubeconfig_context_namespace_is_the_fallback() {
    assert!(
        !Path::new("/var/run/secrets/kubernetes.io/serviceaccount/namespace").exists(),
        "this test needs a host without a service-account namespace file"
    );
    let kube = FakeKube::start("kcns");
    kube.put("kcns", "ctx", &[(KEY, "where: kcns\n")]);
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    assert_eq!(index(d.app())["context"], json!({"where": "kcns"}));
}

// ---------------------------------------------------------- 3. start errors

/// A ConfigMap that does not exist: exit 78, the message names the
/// namespace and the name, nothing started.
#[test]
fn a_missing_configmap_is_a_config_error() {
    let kube = FakeKube::start("default");
    kube.put("default", "other", &[(KEY, "a: 1\n")]);
    let r = run_env(
        &["--worker-contexts-configmap", "ctx"],
        &env_for(&kube, &[]),
        Duration::from_secs(20),
    );
    assert_config_error(&r, &["ConfigMap default/ctx not found"]);
}

/// A ConfigMap without the key: exit 78, the message lists the keys it has
/// and points at --worker-contexts-key.
#[test]
fn a_missing_key_lists_the_keys_that_exist() {
    let kube = FakeKube::start("default");
    kube.put(
        "default",
        "ctx",
        &[("contexts.yaml", "a: 1\n"), ("app.conf", "x")],
    );
    let r = run_env(
        &["--worker-contexts-configmap", "ctx"],
        &env_for(&kube, &[]),
        Duration::from_secs(20),
    );
    assert_config_error(
        &r,
        &[
            "default/ctx",
            "\"worker-contexts.yaml\"",
            "app.conf",
            "contexts.yaml",
            "--worker-contexts-key",
        ],
    );
    // And the option does select another key.
    let d = start_kube(
        &kube,
        &[
            "--worker-contexts-configmap",
            "ctx",
            "--worker-contexts-key",
            "contexts.yaml",
        ],
        &[],
    );
    assert_eq!(index(d.app())["context"], json!({"a": 1}));
}

/// The API answers 401: exit 78, the message says the credentials were
/// rejected.
#[test]
fn unauthorized_is_a_config_error() {
    let (kube, _) = kube_with("a: 1\n");
    kube.deny(Some(401));
    let r = run_env(
        &["--worker-contexts-configmap", "ctx"],
        &env_for(&kube, &[]),
        Duration::from_secs(20),
    );
    assert_config_error(&r, &["401", "default/ctx"]);
}

/// The API answers 403: exit 78, the message says which verbs the service
/// account needs on which ConfigMap in which namespace.
#[test]
fn forbidden_names_the_verbs_and_the_object() {
    let (kube, _) = kube_with("a: 1\n");
    kube.deny(Some(403));
    let r = run_env(
        &["--worker-contexts-configmap", "ctx"],
        &env_for(&kube, &[]),
        Duration::from_secs(20),
    );
    assert_config_error(
        &r,
        &[
            "403",
            "the service account needs `get` and `watch` on configmaps named \"ctx\" in namespace \"default\"",
        ],
    );
}

/// Malformed YAML under the key: exit 78, the message names the ConfigMap,
/// the key, and the line and column.
#[test]
fn malformed_yaml_in_the_configmap_names_line_and_column() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1\n- {shard: 2}\n");
    let r = run_env(
        &["--worker-contexts-configmap", "ctx"],
        &env_for(&kube, &[]),
        Duration::from_secs(20),
    );
    assert_config_error(
        &r,
        &[
            "ConfigMap default/ctx key \"worker-contexts.yaml\"",
            "malformed YAML at line ",
            ", column ",
        ],
    );
    // The line is a real line of the document (1..=4), not a byte offset.
    let line: usize = r
        .stderr
        .split("malformed YAML at line ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no line number:\n{}", r.all()));
    assert!((1..=4).contains(&line), "line {line}:\n{}", r.all());
}

/// An unreachable API server is retried with a warning per attempt for
/// --kube-timeout, then exit 78 naming the ConfigMap.
#[test]
fn an_unreachable_api_is_retried_then_a_config_error() {
    let dir = TempDir::new("kube-closed");
    // A port that was free a moment ago and is closed now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.file(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: closed\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: closed\n    user: u\n    namespace: default\ncurrent-context: c\n"
        ),
    );
    let env = vec![
        ("KUBECONFIG".to_string(), kubeconfig.display().to_string()),
        ("HOME".to_string(), dir.path().display().to_string()),
        ("POD_NAMESPACE".to_string(), String::new()),
    ];
    let started = Instant::now();
    let r = run_env(
        &["--worker-contexts-configmap", "ctx", "--kube-timeout", "1s"],
        &env,
        Duration::from_secs(20),
    );
    let took = started.elapsed();
    assert_config_error(&r, &["ConfigMap default/ctx"]);
    let warnings: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["level"] == "WARN"
                    && v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("ConfigMap default/ctx"))
            })
        })
        .collect();
    assert!(
        warnings.len() >= 2,
        "{} warnings:\n{}",
        warnings.len(),
        r.all()
    );
    assert!(
        took < Duration::from_secs(8),
        "--kube-timeout 1s took {took:?}:\n{}",
        r.all()
    );
}

/// 500 answers to the first two GETs are retried (a warning each); the third
/// succeeds and drover serves the contexts.
#[test]
fn server_errors_at_start_are_retried() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    kube.fail_gets(2);
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 1})],
        Duration::from_secs(5),
    );
    let warnings = d
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("\"WARN\"") && l.contains("cannot read ConfigMap default/ctx"))
        .count();
    assert_eq!(warnings, 2, "{}", d.log_text());
    let gets = kube
        .requests()
        .iter()
        .filter(|r| r.contains("/configmaps/ctx"))
        .count();
    assert!(gets >= 3, "{:?}", kube.requests());
}

// ------------------------------------------------------ 4. rolling restart

/// A MODIFIED event rolls the workers onto the new contexts, one at a time,
/// while a client opening a fresh connection every ~10 ms sees no failure;
/// the reload is counted and the info metric carries the new
/// resourceVersion. Three changes in a row, under the same load, so that
/// six worker replacements happen while requests keep coming.
#[test]
fn a_change_rolls_the_workers_without_failed_requests() {
    let (kube, rv0) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    let mut before = wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 1})],
        Duration::from_secs(5),
    );
    wait_metric(&d, &info_series("configmap", &rv0.to_string()), 1.0);
    assert!(
        kube.wait_watches(1, Duration::from_secs(5)),
        "{:?}",
        kube.requests()
    );

    let load = Load::start(d.app());
    std::thread::sleep(Duration::from_millis(200));
    for round in 1..=3u64 {
        let (a, b) = (10 * round, 10 * round + 1);
        let rv = kube.put(
            "default",
            "ctx",
            &[(KEY, &format!("- {{shard: {a}}}\n- {{shard: {b}}}\n"))],
        );
        let after = wait_contexts(
            &d,
            &[json!({"shard": a}), json!({"shard": b})],
            CHANGE_LIMIT,
        );
        let count = |needle: &str| {
            d.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
        };
        let done = eventually(Duration::from_secs(5), || {
            count("rolling restart done") >= round as usize
                && count("replaced worker exited") >= 2 * round as usize
        });
        assert!(
            done,
            "round {round}: the roll did not finish:\n{}",
            d.log_text()
        );
        for (id, (_, pid)) in &after {
            assert_ne!(
                Some(pid),
                before.get(id).map(|(_, p)| p),
                "round {round}: worker {id} kept its pid"
            );
        }
        let mut children = d.children();
        children.sort();
        let mut new_pids: Vec<u32> = pids_of(&after).iter().map(|p| *p as u32).collect();
        new_pids.sort();
        assert_eq!(
            children, new_pids,
            "drover's children are not the new workers"
        );
        wait_metric(
            &d,
            "drover_contexts_reloads_total{result=\"success\"}",
            round as f64,
        );
        assert_eq!(reloads(&d, "failure"), Some(0.0));
        wait_metric(&d, &info_series("configmap", &rv.to_string()), 1.0);
        assert_eq!(info_lines(&d).len(), 1, "{:?}", info_lines(&d));
        before = after;
        // Requests keep flowing between rolls too.
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rolling restarts: {failed:?}\n{}",
        failed.len(),
        ok + failed.len(),
        d.log_text()
    );
    assert!(ok >= 50, "only {ok} requests were made");
    eprintln!("{ok} requests during three rolling restarts, none failed");
}

// ------------------------------------------------------ 5. invalid updates

/// Malformed YAML, a sequence whose length disagrees with an explicit
/// `--workers`, and an update without the key are logged, counted as failed
/// reloads and ignored: the workers keep their contexts and pids. A later
/// valid change is applied.
#[test]
fn invalid_updates_are_ignored_and_a_later_valid_one_is_applied() {
    let (kube, rv0) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(
        &kube,
        &["--worker-contexts-configmap", "ctx", "--workers", "2"],
        &[],
    );
    let want = [json!({"shard": 0}), json!({"shard": 1})];
    let before = wait_contexts(&d, &want, Duration::from_secs(5));
    let pids = pids_of(&before);
    assert!(kube.wait_watches(1, Duration::from_secs(5)));

    kube.put("default", "ctx", &[(KEY, "- {shard: 10}\n- {shard: 11\n")]);
    wait_metric(&d, "drover_contexts_reloads_total{result=\"failure\"}", 1.0);
    wait_log(&d, "malformed YAML at line", Duration::from_secs(2));
    assert_unchanged_for(&d, &want, &pids, Duration::from_millis(300));

    kube.put("default", "ctx", &[(KEY, "[a, b, c]\n")]);
    wait_metric(&d, "drover_contexts_reloads_total{result=\"failure\"}", 2.0);
    wait_log(&d, "--workers is 2", Duration::from_secs(2));
    assert_unchanged_for(&d, &want, &pids, Duration::from_millis(300));

    // The key removed from the ConfigMap: also a failed reload.
    kube.put(
        "default",
        "ctx",
        &[("other.yaml", "- {shard: 9}\n- {shard: 9}\n")],
    );
    wait_metric(&d, "drover_contexts_reloads_total{result=\"failure\"}", 3.0);
    wait_log(&d, "has no key", Duration::from_secs(2));
    assert_unchanged_for(&d, &want, &pids, Duration::from_millis(300));
    assert_eq!(reloads(&d, "success"), Some(0.0));
    // The info metric still names the contexts in force.
    assert_eq!(
        d.metric(&info_series("configmap", &rv0.to_string())),
        Some(1.0),
        "{:?}",
        info_lines(&d)
    );

    let rv = kube.put("default", "ctx", &[(KEY, "[{shard: 20}, {shard: 21}]\n")]);
    let after = wait_contexts(
        &d,
        &[json!({"shard": 20}), json!({"shard": 21})],
        CHANGE_LIMIT,
    );
    assert!(pids_of(&after).iter().all(|p| !pids.contains(p)));
    wait_metric(&d, "drover_contexts_reloads_total{result=\"success\"}", 1.0);
    assert_eq!(reloads(&d, "failure"), Some(3.0));
    wait_metric(&d, &info_series("configmap", &rv.to_string()), 1.0);
}

// -------------------------------------------------------- 6. watch recovery

/// A watch connection cut mid-stream is re-established: a later change
/// still reaches the workers, and the fake saw a second watch request.
#[test]
fn a_dropped_watch_is_recovered() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.drop_watches();
    assert!(
        kube.wait_watches(2, Duration::from_secs(5)),
        "no new watch after the drop: {:?}\n{}",
        kube.requests(),
        d.log_text()
    );
    kube.put("default", "ctx", &[(KEY, "- {shard: 5}\n- {shard: 6}\n")]);
    wait_contexts(
        &d,
        &[json!({"shard": 5}), json!({"shard": 6})],
        CHANGE_LIMIT,
    );
    assert!(kube.watches() >= 2, "{:?}", kube.requests());
}

/// A watch that ends with `410 Gone` is started over: a change made right
/// after still reaches the workers, and the fake saw a second watch.
#[test]
fn an_expired_watch_is_recovered() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.expire_watches();
    kube.put("default", "ctx", &[(KEY, "- {shard: 7}\n- {shard: 8}\n")]);
    wait_contexts(
        &d,
        &[json!({"shard": 7}), json!({"shard": 8})],
        CHANGE_LIMIT,
    );
    assert!(
        kube.wait_watches(2, Duration::from_secs(5)),
        "{:?}",
        kube.requests()
    );
    wait_log(&d, "410", Duration::from_secs(1));
}

/// After a `410 Gone` while the ConfigMap itself is unchanged (its own
/// resourceVersion is now too old to watch from, as on a real API server
/// after compaction), drover must get back to a working watch: a change made
/// a few seconds later reaches the workers promptly, not only at the next
/// backed-off re-read.
#[test]
fn an_expired_watch_on_an_unchanged_configmap_gets_a_working_watch_again() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.expire_watches();
    // Time enough to get a new watch (a correct client needs one request).
    std::thread::sleep(Duration::from_millis(4500));
    let expired = d
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("410 Gone"))
        .count();
    let watches = kube.watches();
    let put_at = Instant::now();
    kube.put("default", "ctx", &[(KEY, "- {shard: 3}\n- {shard: 4}\n")]);
    let reached = eventually(Duration::from_secs(2), || {
        index(d.app())["context"]["shard"].as_u64().unwrap_or(0) >= 3
    });
    assert!(
        reached,
        "a change made 4.5 s after a 410 did not reach the workers within 2 s; \
         {expired} '410 Gone' warnings and {watches} watch requests by then: {:?}\n{}",
        kube.requests(),
        d.log_text()
    );
    eprintln!("change reached a worker after {:?}", put_at.elapsed());
}

/// The same at start: a ConfigMap whose resourceVersion is already older
/// than the API server's watch window (any ConfigMap left unchanged for a
/// while on a real cluster) must still be watched: a change reaches the
/// workers promptly.
#[test]
fn a_configmap_with_an_expired_resource_version_is_still_watched() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    kube.expire_watches();
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    std::thread::sleep(Duration::from_millis(4500));
    let expired = d
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("410 Gone"))
        .count();
    let watches = kube.watches();
    kube.put("default", "ctx", &[(KEY, "- {shard: 3}\n- {shard: 4}\n")]);
    let reached = eventually(Duration::from_secs(2), || {
        index(d.app())["context"]["shard"].as_u64().unwrap_or(0) >= 3
    });
    assert!(
        reached,
        "a change made 4.5 s after start did not reach the workers within 2 s; \
         {expired} '410 Gone' warnings and {watches} watch requests by then: {:?}\n{}",
        kube.requests(),
        d.log_text()
    );
}

// ------------------------------------------------------------- 7. ignore

/// `--on-contexts-change ignore`: a change is logged and counted, but the
/// workers keep their contexts and pids.
#[test]
fn on_contexts_change_ignore_keeps_the_workers() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(
        &kube,
        &[
            "--worker-contexts-configmap",
            "ctx",
            "--on-contexts-change",
            "ignore",
        ],
        &[],
    );
    let want = [json!({"shard": 0}), json!({"shard": 1})];
    let before = wait_contexts(&d, &want, Duration::from_secs(5));
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.put("default", "ctx", &[(KEY, "- {shard: 10}\n- {shard: 11}\n")]);
    wait_log(&d, "--on-contexts-change ignore", Duration::from_secs(5));
    wait_metric(&d, "drover_contexts_reloads_total{result=\"success\"}", 1.0);
    assert_unchanged_for(&d, &want, &pids_of(&before), Duration::from_secs(1));
    assert!(!d.log_contains("rolling restart"), "{}", d.log_text());
}

// ------------------------------------------------------------ 8. in-process

/// In-process (`--workers 1`): a change makes new connections answer with
/// the new context, served by the same process (no restart).
#[test]
fn in_process_a_change_reaches_new_connections() {
    let (kube, _) = kube_with("model: a\n");
    let d = start_kube(
        &kube,
        &["--worker-contexts-configmap", "ctx", "--workers", "1"],
        &[],
    );
    let v = index(d.app());
    assert_eq!(v["context"], json!({"model": "a"}));
    assert_eq!(v["pid"].as_u64(), Some(u64::from(d.pid)));
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    let rv = kube.put("default", "ctx", &[(KEY, "model: b\n")]);
    let mut last = Value::Null;
    let ok = eventually(CHANGE_LIMIT, || {
        last = index(d.app());
        last["context"] == json!({"model": "b"})
    });
    assert!(ok, "last answer {last}\n{}", d.log_text());
    assert_eq!(last["pid"].as_u64(), Some(u64::from(d.pid)), "{last}");
    assert_eq!(last["worker"], 0);
    assert!(d.children().is_empty(), "{:?}", d.children());
    wait_metric(&d, "drover_contexts_reloads_total{result=\"success\"}", 1.0);
    wait_metric(&d, &info_series("configmap", &rv.to_string()), 1.0);
}

// ----------------------------------------------------------------- 9. check

/// `drover check` reads the ConfigMap and prints the plan: its origin and
/// resourceVersion and each worker's context; exit 0. Without the key it
/// exits 78.
#[test]
fn check_prints_the_plan_from_the_configmap() {
    let (kube, rv) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let env = env_for(&kube, &[]);
    let r = run_env(
        &["check", "--worker-contexts-configmap", "ctx"],
        &env,
        Duration::from_secs(20),
    );
    assert_eq!(r.code, 0, "{}", r.all());
    for needle in [
        format!("contexts from: ConfigMap default/ctx key \"worker-contexts.yaml\" (resourceVersion {rv}"),
        "workers: 2".to_string(),
        "  worker 0: {\"shard\":0}".to_string(),
        "  worker 1: {\"shard\":1}".to_string(),
    ] {
        assert!(r.stdout.contains(&needle), "no {needle:?}:\n{}", r.all());
    }

    let r = run_env(
        &[
            "check",
            "--worker-contexts-configmap",
            "ctx",
            "--worker-contexts-key",
            "nope.yaml",
        ],
        &env,
        Duration::from_secs(20),
    );
    assert_eq!(r.code, 78, "{}", r.all());
    assert!(
        r.stderr.contains("has no key \"nope.yaml\"")
            && r.stderr.contains(KEY)
            && r.stderr.contains("--worker-contexts-key"),
        "{}",
        r.all()
    );
    assert!(!r.stdout.contains("worker 0:"), "{}", r.all());
}

// ----------------------------------------------------------- 10. file watch

/// A file laid out like a kubelet-mounted ConfigMap (`..data` symlink to a
/// timestamped directory) is watched: the kubelet's atomic swap (new
/// directory, `..data_tmp` link renamed over `..data`, old directory
/// removed) rolls the workers onto the new contexts, and
/// `drover_contexts_info{source="file"}` follows the content hash.
#[test]
fn a_kubelet_style_configmap_volume_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let dir = TempDir::new("cm-volume");
    let root = dir.path();
    let old = "- {shard: 0}\n- {shard: 1}\n";
    let new = "- {shard: 30}\n- {shard: 31}\n";
    std::fs::create_dir(root.join("..2026_01_01")).unwrap();
    std::fs::write(root.join("..2026_01_01").join(KEY), old).unwrap();
    symlink("..2026_01_01", root.join("..data")).unwrap();
    symlink(format!("..data/{KEY}"), root.join(KEY)).unwrap();
    let path = root.join(KEY).display().to_string();

    let d = start_with(bin(), &["--worker-contexts-file", &path], &[]);
    d.wait_ready();
    let before = wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 1})],
        Duration::from_secs(5),
    );
    wait_metric(&d, &info_series("file", &fnv(old)), 1.0);

    // The kubelet's atomic update.
    std::fs::create_dir(root.join("..2026_01_02")).unwrap();
    std::fs::write(root.join("..2026_01_02").join(KEY), new).unwrap();
    symlink("..2026_01_02", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_01_01")).unwrap();

    let after = wait_contexts(
        &d,
        &[json!({"shard": 30}), json!({"shard": 31})],
        CHANGE_LIMIT,
    );
    assert!(pids_of(&after)
        .iter()
        .all(|p| !pids_of(&before).contains(p)));
    wait_metric(&d, &info_series("file", &fnv(new)), 1.0);
    assert_eq!(info_lines(&d).len(), 1, "{:?}", info_lines(&d));
    wait_metric(&d, "drover_contexts_reloads_total{result=\"success\"}", 1.0);
    assert_eq!(reloads(&d, "failure"), Some(0.0));
}

/// A plain file rewritten in place is picked up too.
#[test]
fn a_plain_file_rewritten_in_place_is_picked_up() {
    let dir = TempDir::new("cm-plain");
    let old = "- {shard: 0}\n- {shard: 1}\n";
    let new = "- {shard: 40}\n- {shard: 41}\n";
    let path = dir.file("contexts.yaml", old);
    let p = path.display().to_string();
    let d = start_with(bin(), &["--worker-contexts-file", &p], &[]);
    d.wait_ready();
    wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 1})],
        Duration::from_secs(5),
    );
    wait_metric(&d, &info_series("file", &fnv(old)), 1.0);
    std::fs::write(&path, new).unwrap();
    wait_contexts(
        &d,
        &[json!({"shard": 40}), json!({"shard": 41})],
        CHANGE_LIMIT,
    );
    wait_metric(&d, &info_series("file", &fnv(new)), 1.0);
}

// ------------------------------------------------------------- 11. deleted

/// A DELETED event leaves the workers as they are: still serving, same
/// contexts, same pids.
#[test]
fn a_deleted_configmap_leaves_the_workers_alone() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    let want = [json!({"shard": 0}), json!({"shard": 1})];
    let before = wait_contexts(&d, &want, Duration::from_secs(5));
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.delete("default", "ctx");
    wait_log(&d, "was deleted", Duration::from_secs(5));
    assert_unchanged_for(&d, &want, &pids_of(&before), Duration::from_secs(1));
    assert_eq!(reloads(&d, "success"), Some(0.0));
    assert!(!d.log_contains("rolling restart"), "{}", d.log_text());
    // Created again (ADDED): its contexts are applied.
    kube.put("default", "ctx", &[(KEY, "- {shard: 50}\n- {shard: 51}\n")]);
    wait_contexts(
        &d,
        &[json!({"shard": 50}), json!({"shard": 51})],
        CHANGE_LIMIT,
    );
}

// ------------------------------------------------------------ more rolling

/// Only the workers whose context changed are replaced: changing item 1
/// replaces worker 1 and leaves worker 0's process alone.
#[test]
fn only_the_workers_whose_context_changed_are_replaced() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    let before = wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 1})],
        Duration::from_secs(5),
    );
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.put("default", "ctx", &[(KEY, "- {shard: 0}\n- {shard: 61}\n")]);
    let after = wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 61})],
        CHANGE_LIMIT,
    );
    assert_eq!(
        after[&0].1,
        before[&0].1,
        "worker 0 was replaced:\n{}",
        d.log_text()
    );
    assert_ne!(after[&1].1, before[&1].1);
}

/// A MODIFIED event that leaves the key's value as it was (another key
/// changed) restarts nothing and counts no reload.
#[test]
fn a_change_elsewhere_in_the_configmap_restarts_nothing() {
    let yaml = "- {shard: 0}\n- {shard: 1}\n";
    let (kube, _) = kube_with(yaml);
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    let want = [json!({"shard": 0}), json!({"shard": 1})];
    let before = wait_contexts(&d, &want, Duration::from_secs(5));
    assert!(kube.wait_watches(1, Duration::from_secs(5)));
    kube.put("default", "ctx", &[(KEY, yaml), ("unrelated", "x")]);
    // Then a real change, so we know the first one was seen before it.
    kube.put(
        "default",
        "ctx",
        &[(KEY, "- {shard: 0}\n- {shard: 71}\n"), ("unrelated", "x")],
    );
    let after = wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 71})],
        CHANGE_LIMIT,
    );
    assert_eq!(after[&0].1, before[&0].1, "{}", d.log_text());
    wait_metric(&d, "drover_contexts_reloads_total{result=\"success\"}", 1.0);
    assert_eq!(
        d.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("rolling restart, one worker at a time"))
            .count(),
        1,
        "{}",
        d.log_text()
    );
}

/// Without `--workers`, the sequence's length is the worker count, also
/// after a change: 2 items -> 3 workers -> 2 workers.
#[test]
fn the_worker_count_follows_the_sequence_length() {
    let (kube, _) = kube_with("- {shard: 0}\n- {shard: 1}\n");
    let d = start_kube(&kube, &["--worker-contexts-configmap", "ctx"], &[]);
    wait_contexts(
        &d,
        &[json!({"shard": 0}), json!({"shard": 1})],
        Duration::from_secs(5),
    );
    assert!(kube.wait_watches(1, Duration::from_secs(5)));

    kube.put(
        "default",
        "ctx",
        &[(KEY, "[{shard: 80}, {shard: 81}, {shard: 82}]\n")],
    );
    let three = wait_contexts(
        &d,
        &[
            json!({"shard": 80}),
            json!({"shard": 81}),
            json!({"shard": 82}),
        ],
        CHANGE_LIMIT,
    );
    wait_metric(&d, "drover_workers_desired", 3.0);
    let mut pids: Vec<u32> = pids_of(&three).iter().map(|p| *p as u32).collect();
    pids.sort();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = d.children();
            c.sort();
            c == pids
        }),
        "children {:?}, workers {pids:?}\n{}",
        d.children(),
        d.log_text()
    );

    kube.put("default", "ctx", &[(KEY, "[{shard: 90}, {shard: 91}]\n")]);
    let two = wait_contexts(
        &d,
        &[json!({"shard": 90}), json!({"shard": 91})],
        CHANGE_LIMIT,
    );
    wait_metric(&d, "drover_workers_desired", 2.0);
    let mut pids: Vec<u32> = pids_of(&two).iter().map(|p| *p as u32).collect();
    pids.sort();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut c = d.children();
            c.sort();
            c == pids
        }),
        "children {:?}, workers {pids:?}\n{}",
        d.children(),
        d.log_text()
    );
    d.wait_ready();
}
