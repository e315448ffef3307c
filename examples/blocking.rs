//! A library app whose handler can block its worker's event loop, the case
//! `--worker-timeout` exists for: `GET /block?ms=N` calls
//! `std::thread::sleep` inside the handler, so nothing else of that worker
//! runs (not its other connections, not its heartbeat) until it returns.
//! Every other path answers `{"worker": ID, "pid": PID}` at once.
//!
//! ```text
//! cargo run --example blocking -- --port 8000 --workers 2 --worker-timeout 2s
//! curl localhost:8000/block?ms=60000   # that worker is killed after ~2 s
//! curl localhost:8000/                 # the other worker answers meanwhile
//! ```

use std::convert::Infallible;
use std::time::Duration;

use drover::{full, Worker};
use hyper::{Request, Response};

fn main() -> std::process::ExitCode {
    drover::run(|w: Worker<serde_json::Value>| {
        let id = w.id;
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let resp = if req.uri().path() == "/block" {
                let ms = req
                    .uri()
                    .query()
                    .and_then(|q| q.strip_prefix("ms="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(60_000);
                // Blocks the event loop on purpose: never do this in an app.
                std::thread::sleep(Duration::from_millis(ms));
                Response::new(full("unblocked\n"))
            } else {
                let body = format!("{{\"worker\":{id},\"pid\":{}}}\n", std::process::id());
                Response::new(full(body))
            };
            async move { Ok::<_, Infallible>(resp) }
        })
    })
}
