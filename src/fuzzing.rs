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
    crate::notify::says_ready(datagram)
}
