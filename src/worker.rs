//! A worker process of the built-in or a library app: drover's own binary,
//! re-executed by the supervisor with the listener on fd 3, its control
//! socket on fd 4 and the metrics region on fd 5 (see [`crate::control`]).
//! It serves until told to stop accepting, then finishes its in-flight work;
//! it never binds, forks or decides when to drain.

use std::os::fd::OwnedFd;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

use crate::app::{DynService, Stopper};
use crate::control::{self, ToSupervisor, ToWorker, WorkerEnd, WorkerEnv};
use crate::error::exit;
use crate::listener::ServeListener;

/// Runs this worker process to completion.
pub(crate) fn main(make: &crate::app::Factory<'_>) -> ExitCode {
    let env = match WorkerEnv::decode(|k| std::env::var(k).ok()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("drover worker: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let own = env.own.clone().unwrap_or(control::OwnWorker {
        lane: None,
        log_format: "text".into(),
        log_level: "info".into(),
        own_socket: false,
        heartbeat: None,
    });
    let format = match own.log_format.as_str() {
        "json" => crate::config::LogFormat::Json,
        _ => crate::config::LogFormat::Text,
    };
    crate::logging::init(format, &own.log_level);
    let id = env.id;
    let fds = crate::sys::inherited_fd(control::LISTEN_FD)
        .and_then(|l| Ok((l, crate::sys::inherited_fd(control::CONTROL_FD)?)));
    let (listen_fd, ctl_fd): (OwnedFd, OwnedFd) = match fds {
        Ok(f) => f,
        Err(e) => {
            eprintln!("drover worker {id}: fds 3 and 4 are not open: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let svc = match make(id, env.workers, env.context) {
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
            eprintln!("drover worker {id}: cannot start its runtime: {e}");
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    // Metrics are best effort: a worker without them still serves.
    let recorder = crate::sys::inherited_fd(control::METRICS_FD)
        .and_then(crate::metrics::open_region)
        .map_err(|e| tracing::warn!(worker = id, error = %e, "no shared metrics region"))
        .ok()
        .and_then(|region| crate::metrics::HttpRecorder::new(region, id, own.lane));
    // Peers to defer to (serve::Balance): none on a socket of its own.
    let peers = if own.own_socket { 1 } else { env.workers };
    let heartbeat = own.heartbeat;
    match rt.block_on(run(id, peers, listen_fd, ctl_fd, svc, recorder, heartbeat)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(worker = id, "{e}");
            ExitCode::from(exit::SOFTWARE)
        }
    }
}

async fn run(
    id: usize,
    workers: usize,
    listen_fd: OwnedFd,
    ctl_fd: OwnedFd,
    svc: DynService,
    recorder: Option<crate::metrics::HttpRecorder>,
    heartbeat: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let mut ctl = WorkerEnd::new(ctl_fd)?;
    let ready = ctl.sender()?;
    if let Some(every) = heartbeat {
        // A task of this event loop, the one the handlers run on: a handler
        // that blocks the loop stops the heartbeat, and the supervisor's
        // --worker-timeout kills this process.
        let beat = ctl.sender()?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !beat.send_nonblocking(ToSupervisor::Heartbeat) {
                    return;
                }
            }
        });
    }
    crate::app::install_stopper(Stopper::Worker(ctl.sender()?));
    let listener = ServeListener::from_fd(listen_fd)?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Read the control socket inside the future the accept loop polls first:
    // when a stop and new connections arrive together, the stop is seen
    // before the next accept, and the queued connections are then served by
    // the drain path rather than raced.
    let stop_accepting = async move {
        let why = loop {
            tokio::select! {
                m = ctl.recv() => match m {
                    None => break "the supervisor is gone",
                    Some(ToWorker::Draining) => crate::app::mark_draining(),
                    Some(ToWorker::StopAccepting) => break "drain",
                },
                _ = term.recv() => break "SIGTERM to this worker",
                _ = int.recv() => break "SIGINT to this worker",
            }
        };
        tracing::debug!(worker = id, "stop accepting: {why}");
    };
    let draining = crate::serve::serve(
        listener,
        tokio::sync::watch::channel(svc).1,
        recorder,
        stop_accepting,
        || {
            ready.send(ToSupervisor::Ready);
        },
        false,
        workers,
    )
    .await;
    // The supervisor enforces --graceful-timeout with SIGKILL.
    draining.finish(None).await;
    Ok(())
}
