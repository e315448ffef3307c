//! Test harness: starts the real `drover` binary on free loopback ports,
//! reads its JSON log, and talks HTTP/1.1 to it over real sockets.
//! Every wait is bounded; a `Drover` kills the process it started when
//! dropped (its workers die with it through their parent-death signal).
#![allow(dead_code)]

pub mod fake_kube;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Path of the binary under test: `DROVER_TEST_BIN` if set (to show that a
/// test fails against another build, e.g. the one before a fix), else the
/// one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("DROVER_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_drover")))
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("drover-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running drover.
pub struct Drover {
    pub child: Option<Child>,
    pub pid: u32,
    pub log: Arc<Mutex<Vec<String>>>,
    pub app: Option<SocketAddr>,
    pub admin: SocketAddr,
    status: Option<ExitStatus>,
}

/// Starts drover with `args` (ports default to 0 on 127.0.0.1) and waits
/// until its admin server and listener are logged. Does not wait for ready.
pub fn start(args: &[&str]) -> Drover {
    start_with(bin(), args, &[])
}

pub fn start_with(program: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Drover {
    let mut cmd = Command::new(program);
    let has = |flag: &str| args.contains(&flag);
    let mut full: Vec<String> = Vec::new();
    if !has("--host") && !has("--uds") {
        full.extend(["--host".into(), "127.0.0.1".into()]);
    }
    if !has("--port") && !has("--uds") {
        full.extend(["--port".into(), "0".into()]);
    }
    if !has("--admin-host") {
        full.extend(["--admin-host".into(), "127.0.0.1".into()]);
    }
    if !has("--admin-port") {
        full.extend(["--admin-port".into(), "0".into()]);
    }
    full.extend(["--log-format".into(), "json".into()]);
    // Options go before a `-- COMMAND`.
    let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
    let mut all: Vec<String> = args[..split].iter().map(|s| s.to_string()).collect();
    all.extend(full);
    all.extend(args[split..].iter().map(|s| s.to_string()));
    cmd.args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn drover");
    let pid = child.id();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("DROVER_TEST_VERBOSE").is_some() {
                    eprintln!("[drover {pid}] {line}");
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let mut d = Drover {
        child: Some(child),
        pid,
        log,
        app: None,
        admin: "127.0.0.1:0".parse().unwrap(),
        status: None,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let admin = d.log_field("admin server on ", "address");
        let app = d.log_field("listening on ", "address");
        if let Some(a) = admin {
            d.admin = a.parse().unwrap();
            d.app = app.and_then(|a| a.parse().ok());
            if d.app.is_some() || has("--uds") {
                return d;
            }
        }
        if let Some(st) = d.try_status() {
            panic!(
                "drover exited with {st:?} before starting:\n{}",
                d.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "drover did not start:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drover {
    /// The value of `field` in the first JSON log line whose message starts with `prefix`.
    pub fn log_field(&self, prefix: &str, field: &str) -> Option<String> {
        let log = self.log.lock().unwrap();
        for line in log.iter() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if v["message"].as_str().is_some_and(|m| m.starts_with(prefix)) {
                    return v[field]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| v[field].as_u64().map(|n| n.to_string()));
                }
            }
        }
        None
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn app(&self) -> SocketAddr {
        self.app.expect("a TCP listener")
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http(self.admin, "GET", "/readyz", &[]) {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "never ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                self.status = c.try_wait().unwrap();
            }
        }
        self.status
    }

    /// Waits at most `limit` for drover to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "drover did not exit within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// Pids of drover's direct children.
    pub fn children(&self) -> Vec<u32> {
        children_of(self.pid)
    }

    /// Scrapes /metrics and returns the value of the first sample line
    /// starting with `series` (name with labels as rendered).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let r = http(self.admin, "GET", "/metrics", &[]).ok()?;
        metric_value(&r.body, series)
    }

    /// The whole /metrics text (for failure messages).
    pub fn metrics_text(&self) -> String {
        http(self.admin, "GET", "/metrics", &[])
            .map(|r| r.body)
            .unwrap_or_default()
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

impl Drop for Drover {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.status.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// Direct children of `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out
}

/// Whether `pid` is alive (a zombie counts as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// Waits at most `limit` for `cond`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`), 10 s bound.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    exchange(&mut s, method, path, headers, Duration::from_secs(10))
}

/// Sends one request on `s` and reads one response.
pub fn exchange<S: Read + Write>(
    s: &mut S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    _t: Duration,
) -> std::io::Result<Resp> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" || method == "PUT" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    read_response(s)
}

pub fn read_response<S: Read>(s: &mut S) -> std::io::Result<Resp> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> std::io::Result<Resp> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("incomplete response: {text:?}"),
        )
    })?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `GET /` on the app; returns the JSON.
pub fn get_index(addr: SocketAddr) -> serde_json::Value {
    let r = http(addr, "GET", "/", &[]).expect("GET /");
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// Runs drover to completion with `args` (no port defaults) and returns
/// (exit code, stderr). Bounded to 20 s.
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return (st.code().unwrap_or(-1), format!("{out}{err}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("drover {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The multi-purpose external worker of the lifecycle tests.
pub fn lifecycle_fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lifecycle_worker.py")
        .display()
        .to_string()
}

/// drover `opts -- python3 lifecycle_worker.py flags`.
pub fn lifecycle_worker(opts: &[&str], flags: &[&str]) -> Drover {
    let fx = lifecycle_fixture();
    let mut args: Vec<&str> = opts.to_vec();
    args.extend(["--", "python3", fx.as_str()]);
    args.extend(flags);
    start(&args)
}

/// Sends `sig` to `pid` (a process the test started) with kill(1).
pub fn send_signal(pid: u32, sig: i32) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// The Python venv `tests/run` prepares (`DROVER_TEST_VENV`, else
/// `target/test-venv`), asserting (never skipping) that each program of
/// `needs` is in its `bin/`.
pub fn test_venv(needs: &[&str]) -> PathBuf {
    let dir = std::env::var_os("DROVER_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"));
    for program in needs {
        let p = dir.join("bin").join(program);
        assert!(
            p.exists(),
            "{} is missing: run tests/run, which creates the venv with what the tests need",
            p.display()
        );
    }
    dir
}

/// `target/<profile>/examples/<name>`, built here (a no-op when it is up to
/// date: `cargo test --test X` builds only that target), bounded in time.
pub fn example(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let profile_dir = bin().parent().unwrap().to_path_buf();
    let path = profile_dir.join("examples").join(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn cargo build --example {name}: {e}"));
    // Read its messages as they come, so a long error cannot fill the pipe.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = pipe.read_to_string(&mut err);
        err
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cargo build --example {name} took over 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap();
    assert!(st.success(), "cargo build --example {name} failed:\n{err}");
    assert!(path.exists(), "{} missing after the build", path.display());
    built.push((name.to_string(), path.clone()));
    path
}

/// The inodes of every socket listening on TCP `port` (one, or one per
/// worker with `--balance reuseport`), sorted.
pub fn listen_inodes(port: u16) -> Vec<u64> {
    let mut all = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(f).unwrap_or_default();
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
                all.extend(c[9].parse::<u64>().ok());
            }
        }
    }
    all.sort();
    all
}
