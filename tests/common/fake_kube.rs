//! A fake Kubernetes API server on 127.0.0.1 for the ConfigMap tests. It
//! speaks the real API's JSON for what drover uses: `GET` of one ConfigMap
//! (`/api/v1/namespaces/{ns}/configmaps/{name}`), and the watch of the
//! collection (`?watch=true&fieldSelector=metadata.name=...&resourceVersion=...`)
//! as a chunked stream of newline-delimited `ADDED`/`MODIFIED`/`DELETED`/
//! `ERROR` events. It answers 404/401/403 with `Status` bodies, can fail GETs
//! with 500, drop open watches, and expire old resource versions (410 Gone).
//! It writes a kubeconfig pointing at itself.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::TempDir;

/// The token the fake's kubeconfig carries and the fake requires.
pub const TOKEN: &str = "fake-token";

#[derive(Default)]
struct State {
    /// (namespace, name) -> (data, resourceVersion)
    objects: HashMap<(String, String), (BTreeMap<String, String>, u64)>,
    /// Last resourceVersion handed out.
    rv: u64,
    /// Watch events: (resourceVersion, namespace, name, JSON line).
    events: Vec<(u64, String, String, String)>,
    /// GETs answer this code (401, 403) with a Status.
    deny: Option<u16>,
    /// The next this many GETs answer 500.
    fail_gets: u32,
    /// Open watches end abruptly when this changes.
    drop_generation: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    expire_below: u64,
    /// Open watches send 410 and end when this changes.
    expire_generation: u64,
    /// Every request line seen.
    requests: Vec<String>,
}

/// A running fake API server.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    dir: TempDir,
    pub kubeconfig: PathBuf,
}

impl FakeKube {
    /// Starts the fake; its kubeconfig's context namespace is `namespace`.
    pub fn start(namespace: &str) -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        let _ = serve(conn, &state, &stop);
                    });
                }
            });
        }
        let dir = TempDir::new("kube");
        let kubeconfig = dir.file(
            "kubeconfig",
            &format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n"
            ),
        );
        FakeKube {
            addr,
            state,
            stop,
            dir,
            kubeconfig,
        }
    }

    /// Environment for a drover that should use this fake.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KUBECONFIG", self.kubeconfig.display().to_string()),
            ("HOME", self.dir.path().display().to_string()),
        ]
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (m, cv) = &*self.state;
        let r = f(&mut m.lock().unwrap());
        cv.notify_all();
        r
    }

    /// Creates or replaces a ConfigMap; returns its new resourceVersion.
    pub fn put(&self, ns: &str, name: &str, data: &[(&str, &str)]) -> u64 {
        self.with(|s| {
            s.rv += 1;
            let rv = s.rv;
            let data: BTreeMap<String, String> = data
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let key = (ns.to_string(), name.to_string());
            let kind = if s.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            let obj = configmap(ns, name, &data, rv);
            s.objects.insert(key, (data, rv));
            let line = json!({"type": kind, "object": obj}).to_string();
            s.events.push((rv, ns.to_string(), name.to_string(), line));
            rv
        })
    }

    /// Deletes a ConfigMap (a DELETED event).
    pub fn delete(&self, ns: &str, name: &str) {
        self.with(|s| {
            if let Some((data, _)) = s.objects.remove(&(ns.to_string(), name.to_string())) {
                s.rv += 1;
                let obj = configmap(ns, name, &data, s.rv);
                let line = json!({"type": "DELETED", "object": obj}).to_string();
                let rv = s.rv;
                s.events.push((rv, ns.to_string(), name.to_string(), line));
            }
        })
    }

    /// GETs answer `code` (401 or 403) from now on; None restores them.
    pub fn deny(&self, code: Option<u16>) {
        self.with(|s| s.deny = code)
    }

    /// The next `n` GETs answer 500.
    pub fn fail_gets(&self, n: u32) {
        self.with(|s| s.fail_gets = n)
    }

    /// Every open watch connection is cut (no final chunk).
    pub fn drop_watches(&self) {
        self.with(|s| s.drop_generation += 1)
    }

    /// Every resourceVersion seen so far expires: open watches get an
    /// `ERROR` event with 410 Gone and end, and new watches from an old
    /// version get the same.
    pub fn expire_watches(&self) {
        self.with(|s| {
            s.expire_below = s.rv + 1;
            s.expire_generation += 1;
        })
    }

    /// Request lines received so far (method and path with query).
    pub fn requests(&self) -> Vec<String> {
        self.with(|s| s.requests.clone())
    }

    /// Number of watch requests received so far.
    pub fn watches(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains("watch=true"))
            .count()
    }

    /// Waits until at least `n` watch requests have arrived.
    pub fn wait_watches(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.watches() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.with(|s| s.drop_generation += 1);
        let _ = TcpStream::connect(self.addr);
    }
}

fn configmap(ns: &str, name: &str, data: &BTreeMap<String, String>, rv: u64) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "resourceVersion": rv.to_string(),
            "uid": format!("00000000-0000-0000-0000-{:012}", name.len()),
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "data": data,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(conn: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Internal Server Error",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn serve(
    mut conn: TcpStream,
    state: &Arc<(Mutex<State>, Condvar)>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let request_line = line.trim().to_string();
    let mut authorized = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") && v.trim() == format!("Bearer {TOKEN}") {
                authorized = true;
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let (m, cv) = &**state;
    m.lock()
        .unwrap()
        .requests
        .push(format!("{method} {target}"));

    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // api v1 namespaces {ns} configmaps [{name}]
    if method != "GET"
        || segs.len() < 5
        || segs[..2] != ["api", "v1"]
        || segs[2] != "namespaces"
        || segs[4] != "configmaps"
    {
        return respond(
            &mut conn,
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let ns = segs[3].to_string();
    if !authorized {
        return respond(&mut conn, 401, &status(401, "Unauthorized", "Unauthorized"));
    }
    if segs.len() == 6 {
        let name = segs[5].to_string();
        let mut s = m.lock().unwrap();
        if let Some(code) = s.deny {
            let (reason, msg) = if code == 403 {
                ("Forbidden", format!("configmaps \"{name}\" is forbidden: User \"system:serviceaccount:{ns}:drover\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""))
            } else {
                ("Unauthorized", "Unauthorized".to_string())
            };
            drop(s);
            return respond(&mut conn, code, &status(code, reason, &msg));
        }
        if s.fail_gets > 0 {
            s.fail_gets -= 1;
            drop(s);
            return respond(
                &mut conn,
                500,
                &status(500, "InternalError", "etcdserver: request timed out"),
            );
        }
        return match s.objects.get(&(ns.clone(), name.clone())) {
            Some((data, rv)) => {
                let body = configmap(&ns, &name, data, *rv);
                drop(s);
                respond(&mut conn, 200, &body)
            }
            None => {
                drop(s);
                respond(
                    &mut conn,
                    404,
                    &json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("configmaps \"{name}\" not found"), "reason": "NotFound",
                        "details": {"name": name, "kind": "configmaps"}, "code": 404
                    }),
                )
            }
        };
    }
    // The collection: only watches are served.
    if query_param(query, "watch") != Some("true") && query_param(query, "watch") != Some("1") {
        return respond(
            &mut conn,
            403,
            &status(403, "Forbidden", "list is not granted"),
        );
    }
    let name = query_param(query, "fieldSelector")
        .map(|f| f.replace("%3D", "=").replace("%3d", "="))
        .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string))
        .unwrap_or_default();
    let mut from: u64 = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
    let chunk = |conn: &mut TcpStream, line: &str| -> std::io::Result<()> {
        let data = format!("{line}\n");
        write!(conn, "{:x}\r\n{data}\r\n", data.len())?;
        conn.flush()
    };
    let (drop_gen, expire_gen) = {
        let s = m.lock().unwrap();
        (s.drop_generation, s.expire_generation)
    };
    let gone = |from: u64| {
        status(410, "Expired", &format!("too old resource version: {from}")).to_string()
    };
    if from != 0 && from < m.lock().unwrap().expire_below {
        chunk(&mut conn, &json!({"type": "ERROR", "object": serde_json::from_str::<Value>(&gone(from)).unwrap()}).to_string())?;
        return conn.write_all(b"0\r\n\r\n");
    }
    let mut s = m.lock().unwrap();
    if from == 0 {
        // No resourceVersion: like the real server, the current state first
        // (a synthetic ADDED), then changes after it.
        if let Some((data, rv)) = s.objects.get(&(ns.clone(), name.clone())) {
            let line =
                json!({"type": "ADDED", "object": configmap(&ns, &name, data, *rv)}).to_string();
            from = *rv;
            drop(s);
            chunk(&mut conn, &line)?;
            s = m.lock().unwrap();
        } else {
            from = s.rv;
        }
    }
    loop {
        if stop.load(Ordering::Relaxed) || s.drop_generation != drop_gen {
            // Cut the connection mid-stream.
            drop(s);
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        if s.expire_generation != expire_gen {
            drop(s);
            chunk(&mut conn, &json!({"type": "ERROR", "object": serde_json::from_str::<Value>(&gone(from)).unwrap()}).to_string())?;
            return conn.write_all(b"0\r\n\r\n");
        }
        let pending: Vec<(u64, String)> = s
            .events
            .iter()
            .filter(|(rv, n_ns, n, _)| *rv > from && *n_ns == ns && *n == name)
            .map(|(rv, _, _, l)| (*rv, l.clone()))
            .collect();
        if !pending.is_empty() {
            drop(s);
            for (rv, line) in pending {
                chunk(&mut conn, &line)?;
                from = rv;
            }
            s = m.lock().unwrap();
            continue;
        }
        s = cv.wait_timeout(s, Duration::from_millis(50)).unwrap().0;
    }
}
