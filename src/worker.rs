//! A worker process of the built-in or a library app: drover's own binary,
//! re-executed by the supervisor with the listener on fd 3 and its control
//! socket on fd 4 (`DROVER_STOP_FD`). This module owns the worker side of the
//! control protocol; it never binds, forks or decides when to drain.
//!
//! # Control protocol (one byte per message, on the fd-4 socket pair)
//! | direction | byte | meaning |
//! |---|---|---|
//! | worker → supervisor | `R` | accepting: the worker is up |
//! | worker → supervisor | `S` | stop the whole service (library `stop()`) |
//! | supervisor → worker | `D` | the stop flag is set: draining |
//! | supervisor → worker | `A` | stop accepting now; finish in-flight work and exit |
//! | supervisor gone | EOF | stop accepting and exit |
//!
//! External commands get the same fd 4, where any byte they write means `S`.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::process::ExitCode;

use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::app::DynService;
use crate::error::exit;
use crate::listener::ServeListener;
use crate::stop::{self, Stopper};

/// Environment variable that marks a re-executed drover as a worker.
pub(crate) const ROLE_ENV: &str = "DROVER_INTERNAL_ROLE";
/// Its value for a worker.
pub(crate) const ROLE_WORKER: &str = "worker";
/// The listener's descriptor in a worker.
pub(crate) const LISTEN_FD: i32 = 3;
/// The control socket's descriptor in a worker.
pub(crate) const STOP_FD: i32 = 4;
/// The shared metrics region's descriptor (built-in and library workers only).
pub(crate) const METRICS_FD: i32 = 5;
/// Environment variable giving the worker's start generation (its metrics lane).
pub(crate) const GENERATION_ENV: &str = "DROVER_INTERNAL_GENERATION";

pub(crate) const MSG_READY: &[u8] = b"R";
pub(crate) const MSG_STOP: &[u8] = b"S";
pub(crate) const MSG_DRAINING: &[u8] = b"D";
pub(crate) const MSG_STOP_ACCEPTING: &[u8] = b"A";

/// Whether this process was started by a drover supervisor as a worker.
pub(crate) fn is_worker() -> bool {
    std::env::var_os(ROLE_ENV).is_some_and(|v| v == ROLE_WORKER)
}

/// Identity read from the environment the supervisor set.
pub(crate) struct Identity {
    pub id: usize,
    pub workers: usize,
    pub context: serde_json::Value,
}

pub(crate) fn identity() -> Result<Identity, String> {
    let num = |name: &str| -> Result<usize, String> {
        std::env::var(name)
            .map_err(|_| format!("{name} is not set"))?
            .parse()
            .map_err(|_| format!("{name} is not a number"))
    };
    let context = std::env::var("DROVER_WORKER_CONTEXT").unwrap_or_else(|_| "null".into());
    Ok(Identity {
        id: num("DROVER_WORKER_ID")?,
        workers: num("DROVER_WORKERS")?,
        context: serde_json::from_str(&context)
            .map_err(|e| format!("DROVER_WORKER_CONTEXT is not JSON: {e}"))?,
    })
}

/// Runs this worker process to completion.
pub(crate) fn main(make: &crate::app::Factory<'_>) -> ExitCode {
    let who = match identity() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("drover worker: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let fds = crate::sys::inherited_fd(LISTEN_FD)
        .and_then(|l| Ok((l, crate::sys::inherited_fd(STOP_FD)?)));
    let (listen_fd, ctl_fd): (OwnedFd, OwnedFd) = match fds {
        Ok(f) => f,
        Err(e) => {
            eprintln!("drover worker {}: fds 3 and 4 are not open: {e}", who.id);
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let svc = match make(who.id, who.workers, who.context) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // One event loop per worker process: N processes use N cores, as with
    // gunicorn's sync workers, and a worker has no threads to lose at fork.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover worker {}: cannot start its runtime: {e}", who.id);
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    // Metrics are best effort: a worker without them still serves.
    let recorder = crate::sys::inherited_fd(METRICS_FD)
        .and_then(crate::metrics::open_region)
        .map_err(|e| tracing::warn!(worker = who.id, error = %e, "no shared metrics region"))
        .ok()
        .and_then(|region| {
            let generation = std::env::var(GENERATION_ENV).ok()?.parse().ok()?;
            crate::metrics::HttpRecorder::new(region, who.id, generation)
        });
    match rt.block_on(run(who.id, listen_fd, ctl_fd, svc, recorder)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(worker = who.id, "{e}");
            ExitCode::from(exit::SOFTWARE)
        }
    }
}

async fn run(
    id: usize,
    listen_fd: OwnedFd,
    ctl_fd: OwnedFd,
    svc: DynService,
    recorder: Option<crate::metrics::HttpRecorder>,
) -> std::io::Result<()> {
    let ctl = StdUnixStream::from(ctl_fd);
    let writer = ctl.try_clone()?;
    ctl.set_nonblocking(true)?;
    let mut reader = tokio::net::UnixStream::from_std(ctl)?;
    stop::install(Stopper::Worker(writer.try_clone()?));
    let listener = ServeListener::from_fd(listen_fd)?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Read the control socket inside the future the accept loop polls first:
    // when a stop and new connections arrive together, the stop is seen
    // before the next accept, and the queued connections are then served by
    // the drain path rather than raced.
    let stop_accepting = async move {
        let mut byte = [0u8; 1];
        let why = loop {
            tokio::select! {
                r = reader.read(&mut byte) => match r {
                    Ok(0) | Err(_) => break "the supervisor is gone",
                    Ok(_) if byte == *MSG_DRAINING => stop::mark_draining(),
                    Ok(_) if byte == *MSG_STOP_ACCEPTING => break "drain",
                    Ok(_) => {}
                },
                _ = term.recv() => break "SIGTERM to this worker",
                _ = int.recv() => break "SIGINT to this worker",
            }
        };
        tracing::debug!(worker = id, "stop accepting: {why}");
    };
    let ready = || {
        use std::io::Write;
        let _ = (&writer).write_all(MSG_READY);
    };
    let draining = crate::serve::serve(
        listener,
        tokio::sync::watch::channel(svc).1,
        recorder,
        stop_accepting,
        ready,
        false,
    )
    .await;
    // The supervisor enforces --graceful-timeout with SIGKILL.
    draining.finish(None).await;
    Ok(())
}
