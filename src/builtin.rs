//! The built-in app, written on the public library API only:
//! - `GET /` answers `{"worker": i, "pid": p, "context": <the worker's context>}`;
//! - `GET /sleep?ms=N` answers after N milliseconds (at most [`MAX_SLEEP_MS`]),
//!   to make draining observable;
//! - `GET /work?ms=N` burns N milliseconds of CPU (at most [`MAX_WORK_MS`])
//!   on the worker's event loop, a CPU-bound handler for measuring how work
//!   spreads over workers;
//! - `POST /stop` stops the whole service through [`crate::stop()`], the way a
//!   library app's handler would.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::app::Worker;

/// Longest `/sleep` honoured.
pub const MAX_SLEEP_MS: u64 = 60_000;
/// Longest `/work` honoured.
pub const MAX_WORK_MS: u64 = 1_000;

/// The `ms=N` of a query.
fn ms_param(req: &Request<Incoming>) -> Option<Result<u64, std::num::ParseIntError>> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .map(|v| v.parse::<u64>())
}

/// The built-in app's service for one worker.
#[derive(Clone)]
pub struct Builtin {
    /// The `/` answer, rendered once per worker.
    index: Bytes,
}

/// The service factory of the built-in app.
pub fn app(worker: Worker<serde_json::Value>) -> Builtin {
    let body = serde_json::json!({
        "worker": worker.id,
        "pid": std::process::id(),
        "context": worker.context,
    });
    let mut index = serde_json::to_vec(&body).unwrap_or_default();
    index.push(b'\n');
    Builtin {
        index: index.into(),
    }
}

fn json(code: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

type Fut = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Builtin {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Fut;

    fn call(&self, req: Request<Incoming>) -> Fut {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/") => {
                let r = json(StatusCode::OK, self.index.clone());
                Box::pin(async move { Ok(r) })
            }
            (&Method::GET, "/work") => {
                let r = match ms_param(&req) {
                    Some(Ok(ms)) => {
                        let ms = ms.min(MAX_WORK_MS);
                        // Busy, on purpose: this is the CPU-bound handler.
                        let until = std::time::Instant::now() + Duration::from_millis(ms);
                        let mut x = 0u64;
                        while std::time::Instant::now() < until {
                            for i in 0..1000u64 {
                                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                            }
                        }
                        json(StatusCode::OK, format!("{{\"worked_ms\":{ms}}}\n").into())
                    }
                    _ => json(
                        StatusCode::BAD_REQUEST,
                        Bytes::from_static(b"{\"error\":\"use /work?ms=N\"}\n"),
                    ),
                };
                Box::pin(async move { Ok(r) })
            }
            (&Method::GET, "/sleep") => {
                let ms = ms_param(&req);
                match ms {
                    Some(Ok(ms)) => Box::pin(async move {
                        let ms = ms.min(MAX_SLEEP_MS);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(json(
                            StatusCode::OK,
                            format!("{{\"slept_ms\":{ms}}}\n").into(),
                        ))
                    }),
                    _ => {
                        let r = json(
                            StatusCode::BAD_REQUEST,
                            Bytes::from_static(b"{\"error\":\"use /sleep?ms=N\"}\n"),
                        );
                        Box::pin(async move { Ok(r) })
                    }
                }
            }
            (&Method::POST, "/stop") => {
                let ok = crate::stop();
                let r = json(
                    StatusCode::ACCEPTED,
                    Bytes::from(format!("{{\"stopping\":{ok}}}\n")),
                );
                Box::pin(async move { Ok(r) })
            }
            _ => {
                let r = json(
                    StatusCode::NOT_FOUND,
                    Bytes::from_static(b"{\"error\":\"not found\"}\n"),
                );
                Box::pin(async move { Ok(r) })
            }
        }
    }
}
