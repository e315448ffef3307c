//! A library app: each worker greets with its own context, and
//! `POST /shutdown` stops the whole service like mpservice's `stop_server`.
//!
//! ```text
//! printf -- '- {greeting: hello}\n- {greeting: bonjour}\n' > /tmp/ctx.yaml
//! cargo run --example greeter -- --port 8000 --worker-contexts-file /tmp/ctx.yaml
//! curl localhost:8000/ ; curl -X POST localhost:8000/shutdown
//! ```

use std::convert::Infallible;

use drover::{full, Worker};
use hyper::{Method, Request, Response, StatusCode};

#[derive(serde::Deserialize)]
struct Context {
    greeting: String,
}

fn main() -> std::process::ExitCode {
    drover::run(|w: Worker<Context>| {
        let hello = format!(
            "{} from worker {} of {}\n",
            w.context.greeting, w.id, w.workers
        );
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let resp = match (req.method(), req.uri().path()) {
                (&Method::POST, "/shutdown") => {
                    drover::stop();
                    let mut r = Response::new(full("stopping\n"));
                    *r.status_mut() = StatusCode::ACCEPTED;
                    r
                }
                _ => Response::new(full(hello.clone())),
            };
            async move { Ok::<_, Infallible>(resp) }
        })
    })
}
