//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the parsers
//! that take input from outside the pod, each a pure function of bytes.
//! Not part of the library's API; hidden from its docs.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::admin::{AdminState, Token};
use crate::config::Workers;
use crate::stop::StopFlag;

/// The contexts' whole check, as `drover check`, the start and a reload run
/// it: parse (with the size limits and the JSON rules), then the match
/// against a worker count. Returns the per-worker contexts' JSON lengths.
pub fn contexts(text: &str, workers: Option<usize>) -> Result<Vec<usize>, String> {
    let parsed = crate::contexts::parse(text, "fuzz").map_err(|e| e.to_string())?;
    let assigned = crate::contexts::assign(
        &parsed,
        workers.map(|n| Workers::Count(n.clamp(1, crate::config::MAX_WORKERS))),
        || 2,
        "fuzz",
    )
    .map_err(|e| e.to_string())?;
    Ok(assigned
        .iter()
        .map(|c| serde_json::to_string(c).map_or(0, |s| s.len()))
        .collect())
}

/// One admin request through the route, without a socket. Returns the
/// status code and whether the stop flag ended up set.
pub fn admin<B>(req: &hyper::Request<B>, peer: SocketAddr, token: Option<&[u8]>) -> (u16, bool) {
    let state = AdminState {
        flag: StopFlag::new(),
        workers_up: Arc::new(AtomicBool::new(true)),
        token: token.map(Token::fixed),
        metrics: Box::new(String::new),
    };
    let status = crate::admin::route(&state, peer, req).status().as_u16();
    (status, state.flag.is_set())
}

/// Whether a notify datagram says `READY=1`.
pub fn notify(datagram: &[u8]) -> bool {
    let ready = crate::notify::says_ready(datagram);
    let notices = crate::notify::notices(datagram);
    assert_eq!(ready, notices.contains(&crate::notify::Notice::Ready));
    ready
}

/// The control socket's bytes as the supervisor reads them from a worker
/// (`own_worker`: drover's own; else an external command), and a worker's
/// environment as a worker decodes it: `vars` is `NAME=value` lines.
/// Returns the messages read and whether the environment decoded.
pub fn control(bytes: &[u8], own_worker: bool, vars: &str) -> (Vec<bool>, bool) {
    use crate::control::{ToSupervisor, ToWorker, WorkerEnv};
    let msgs = bytes
        .iter()
        .map(|&b| {
            let _ = ToWorker::decode(b);
            ToSupervisor::decode(b, own_worker) == ToSupervisor::Ready
        })
        .collect();
    let env: std::collections::HashMap<&str, &str> =
        vars.lines().filter_map(|l| l.split_once('=')).collect();
    let decoded = WorkerEnv::decode(|k| env.get(k).map(|v| v.to_string()));
    if let Ok(w) = &decoded {
        // What decodes encodes back to the same worker.
        let again: std::collections::HashMap<String, String> = w
            .encode()
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect();
        let round = WorkerEnv::decode(|k| again.get(k).cloned()).expect("re-encoded env decodes");
        assert_eq!(&round, w, "encode/decode round trip");
    }
    (msgs, decoded.is_ok())
}
