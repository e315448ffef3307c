//! The supervisor: binds, serves the admin port, turns signals into the stop
//! flag or pool controls, runs the app in-process or as a pool of worker
//! processes, and ends with the one drain. It decides *when* things happen;
//! the *how* lives in `listener`, `sys`, `serve`, `admin` and the pool's
//! mechanism.
//!
//! # Layout
//! - [`signals`]: which signals drover uses, forwards or never sees.
//! - [`drain`]: the five steps of a stop, written once.
//! - [`in_process`]: `--workers 1` with the built-in or library app.
//! - [`pool`]: N worker processes — the process table, the rules as a pure
//!   state machine, the spawn mechanism, and the event loop.
//! - [`procs`]: reaping, adoption and signals that reach only drover's own.

pub mod drain;
mod in_process;
pub mod pool;
mod procs;
pub mod signals;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::admin::{self, AdminState};
use crate::app::{Factory, Validate};
use crate::contexts::watch::ContextsWatch;
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::plan::{AppKind, Plan};
use crate::stop::StopFlag;

/// What a signal asks of the pool.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    /// SIGHUP: replace every worker, one at a time.
    Hup,
    /// SIGTTIN: one more worker.
    Ttin,
    /// SIGTTOU: one worker fewer.
    Ttou,
    /// A signal drover does not use: pass it to every worker.
    Forward(libc::c_int),
}

/// Runs a plan to the end; returns the process exit code.
pub fn run(plan: Plan, factory: &Factory<'_>, validate: Arc<Validate>) -> Result<u8> {
    let listener = Listener::bind(&plan.listen)?;
    tracing::info!(
        address = %listener.addr,
        backlog = listener.effective_backlog,
        workers = plan.workers(),
        "listening on {}", listener.addr
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the runtime", e))?;
    rt.block_on(supervise(plan, listener, factory, validate))
}

async fn supervise(
    plan: Plan,
    listener: Listener,
    factory: &Factory<'_>,
    validate: Arc<Validate>,
) -> Result<u8> {
    let flag = StopFlag::new();
    // The built-in and library apps record HTTP metrics into a region every
    // worker maps; an external command has no such metrics.
    let region = match plan.app {
        AppKind::Builtin => Some(
            crate::metrics::create_region()
                .map_err(|e| Error::io("cannot create the metrics region", e))?,
        ),
        AppKind::Command { .. } => None,
    };
    let metrics = Metrics::new(flag.clone(), region.clone());
    if let Ok(dup) = listener.try_clone_fd() {
        metrics.pod.watch_listener(dup);
    }
    metrics.workers_desired.set(plan.workers() as i64);
    for id in 0..plan.workers() {
        // Every known worker's restart counter exists from the start, at 0,
        // so that increase() sees the first restart.
        metrics
            .worker_restarts
            .with_label_values(&[&id.to_string()]);
    }
    let watch = ContextsWatch::start(&plan, validate, metrics.clone());
    metrics
        .listen_backlog
        .set(i64::from(listener.effective_backlog));
    let workers_up = Arc::new(AtomicBool::new(false));

    let admin_listener =
        admin::bind(&plan.admin.addr.ip().to_string(), plan.admin.addr.port()).await?;
    if let Ok(a) = admin_listener.local_addr() {
        tracing::info!(address = %a, "admin server on {a}");
    }
    let state = Arc::new(AdminState {
        flag: flag.clone(),
        workers_up: workers_up.clone(),
        token: plan.token.clone(),
        metrics: {
            let m = metrics.clone();
            Box::new(move || m.render())
        },
    });
    tokio::spawn(admin::serve(admin_listener, state));

    let (control_tx, mut control) = mpsc::unbounded_channel();
    signals::install(flag.clone(), control_tx)?;

    if plan.in_process() {
        return in_process::run(plan, listener, factory, flag, metrics, workers_up, watch).await;
    }
    let sigchld = signal(SignalKind::child()).map_err(|e| Error::io("SIGCHLD handler", e))?;
    if let Err(e) = crate::sys::set_child_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans of workers go to init");
    }
    let spawner = pool::spawn::Spawner::new(
        plan.app.clone(),
        region,
        (plan.log.format.as_str().to_string(), plan.log.level.clone()),
    );
    let reuseport = plan.listen.balance == crate::listener::Balance::Reuseport;
    let mut spawner = spawner;
    spawner.own_sockets = reuseport;
    let sockets = pool::sockets::Sockets::new(listener, reuseport)
        .map_err(|e| Error::io("cannot start steering the workers' sockets", e))?;
    let mut pool = pool::Pool::new(
        plan.pool_settings(),
        &plan.contexts,
        plan.contexts_per_worker(),
        spawner,
        sockets,
        flag,
        metrics,
        workers_up,
        sigchld,
    );
    if plan.notify() {
        pool.listen_for_notify(!plan.detect_accepting())?;
    }
    if plan.detect_accepting() {
        pool.detect_accepting();
    }
    pool.start().await?;
    let mut watch = watch;
    match pool.run(&mut control, &mut watch).await {
        Ok(source) => Ok(drain::run(&mut pool, source, plan.drain).await),
        Err(code) => Ok(code),
    }
}
