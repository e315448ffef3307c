//! drover: a container entrypoint and pre-fork supervisor for Kubernetes.
//!
//! It binds **one** listening socket before any worker exists, runs the app
//! in-process or as N worker processes that all accept on that socket, serves
//! an admin port (`POST /admin/stop`, `/metrics`, `/healthz`, `/readyz`), and
//! stops through **one** flag, whoever asks: readiness drops, in-flight work
//! finishes, the pod exits. `DESIGN.md` is the contract.
//!
//! # Using it as a library
//! ```no_run
//! use drover::{full, Worker};
//! use hyper::{Request, Response};
//!
//! #[derive(serde::Deserialize)]
//! struct Ctx { greeting: String }
//!
//! fn main() -> std::process::ExitCode {
//!     drover::run(|w: Worker<Ctx>| {
//!         let hello = format!("{} from worker {}\n", w.context.greeting, w.id);
//!         hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
//!             let body = full(hello.clone());
//!             async move { Ok::<_, std::convert::Infallible>(Response::new(body)) }
//!         })
//!     })
//! }
//! ```
//!
//! # Layout
//! - [`config`]: the command line and its `DROVER_*` environment twins.
//! - `plan`: a checked configuration, typed per owner (listen, admin, drain,
//!   pool policies), before anything starts (`drover check`).
//! - [`contexts`]: worker contexts, the YAML rules and the worker count;
//!   `contexts::configmap` (the ConfigMap through the API, watched),
//!   `contexts::file` (a watched file), `contexts::watch` (changes, checked).
//! - [`control`]: the supervisor–worker contract, both ends (environment,
//!   control messages). A leaf.
//! - `supervisor`: signals, the one drain, in-process mode, and the pool
//!   (`supervisor::pool`: process table, rules, spawn mechanism, event loop).
//! - `listener`: the one shared socket, its backlog and the end of accepting.
//! - `worker`: a worker process of the built-in or a library app.
//! - `serve`: serving HTTP on the listener and finishing in-flight work.
//! - [`stop`]: the one stop flag.
//! - `admin`: the admin endpoints.
//! - `metrics`: the Prometheus metrics.
//! - [`app`]: the library API ([`Worker`], [`run`], [`stop()`], [`is_draining`]).
//! - [`builtin`]: the built-in app, written on that API.
//! - `client`: `drover stop`.
//! - [`cgroup`]: `--workers auto`.
//! - `install`: `drover install DIR`, the copy for an initContainer.
//! - [`error`]: errors and the one mapping to exit codes.
//! - `sys`: the only `unsafe` code (fork, exec, dup2, prctl, signal masks).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod admin;
pub mod app;
pub mod builtin;
pub mod cgroup;
mod client;
pub mod config;
pub mod contexts;
pub mod control;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
mod install;
mod listener;
mod logging;
mod metrics;
mod notify;
mod plan;
mod serve;
pub mod stop;
mod supervisor;
mod sys;
mod worker;

use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use hyper::body::Incoming;
use hyper::{Request, Response};

pub use app::{full, Body, BoxError, Worker};
pub use app::{is_draining, stop};
pub use error::{exit, Error, Result};

/// Runs drover with `factory` as the app: parses the command line, then
/// supervises (or, in a worker process, serves). The factory is called once
/// per worker process with that worker's typed context. Returns the exit code
/// `main` should return.
pub fn run<C, F, S, B>(factory: F) -> ExitCode
where
    C: serde::de::DeserializeOwned,
    F: Fn(Worker<C>) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let erased = app::erase(&factory);
    let validate: std::sync::Arc<app::Validate> =
        std::sync::Arc::new(|id: usize, raw: &serde_json::Value| {
            app::typed_context::<C>(id, raw).map(|_: C| ())
        });

    if control::is_worker() {
        return worker::main(&erased);
    }
    // Before anything else (no thread exists yet): a signal that arrives
    // before its handler is installed waits instead of killing drover.
    supervisor::signals::block_early();

    // Kubernetes injects `DROVER_PORT=tcp://<ip>:<port>` into every pod of
    // a namespace holding a Service named `drover` (service links), which is
    // also `--port`'s variable. Such a value is not the user's: ignore it.
    let service_link = std::env::var("DROVER_PORT")
        .ok()
        .filter(|v| v.starts_with("tcp://") || v.starts_with("udp://"));
    if service_link.is_some() {
        // Still single-threaded here: no other thread reads the environment.
        std::env::remove_var("DROVER_PORT");
    }
    let cli = match config::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let result = match cli.command {
        Some(config::Command::Stop(args)) => {
            supervisor::signals::unblock();
            client::stop(args).map(|()| {
                println!("stop accepted: drover is draining");
                exit::OK
            })
        }
        Some(config::Command::Install { dir }) => {
            supervisor::signals::unblock();
            install::install(&dir).map(|p| {
                println!("installed {}", p.display());
                exit::OK
            })
        }
        Some(config::Command::Check(args)) => {
            supervisor::signals::unblock();
            logging::init(args.log_format, &args.log_level);
            warn_service_link(&service_link);
            plan::load(*args, &*validate).map(|p| {
                print!("{}", plan::describe(&p));
                exit::OK
            })
        }
        None => {
            logging::init(cli.run.log_format, &cli.run.log_level);
            warn_service_link(&service_link);
            plan::load(cli.run, &*validate).and_then(|p| supervisor::run(p, &erased, validate))
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Errors are user-facing: one line naming what was wrong.
            eprintln!("drover: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn warn_service_link(value: &Option<String>) {
    if let Some(v) = value {
        tracing::warn!(
            "ignoring DROVER_PORT={v}: a Kubernetes service link for a Service named drover, not a port (set enableServiceLinks: false)"
        );
    }
}
