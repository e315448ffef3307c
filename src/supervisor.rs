//! The supervisor: binds, starts the workers, serves the admin port, reaps
//! every child, restarts workers that die, and runs the drain when the stop
//! flag is set. It is the only module that decides *when* things happen; the
//! *how* of each step lives in `listener`, `sys`, `serve` and `admin`.
//!
//! # The drain (DESIGN.md "The stop, step by step")
//! 1. The flag is set: `/readyz` answers 503 at once; drover's own workers
//!    are told (`D`) in the same turn of the event loop.
//! 2. Everything keeps serving for `--drain-delay`. Nothing is restarted any
//!    more.
//! 3. `listen(fd, 0)` on the shared socket, the supervisor closes its copy,
//!    drover's workers get `A` (accept what is queued, close, finish), external
//!    workers get `--stop-signal`.
//! 4. After `--graceful-timeout`, SIGKILL to each remaining worker's process
//!    group.
//! 5. Exit 0, or 1 if anything was killed.
//!
//! # Threads
//! The supervisor runs a current-thread tokio runtime on the main thread and
//! forks only from that thread (the `block_on` future, never a spawned task),
//! because a worker's parent-death signal is tied to the thread that forked
//! it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::admin::{self, AdminState};
use crate::app::{Factory, Validate};
use crate::config::Restart;
use crate::config::WorkerReady;
use crate::contexts::watch::ContextsWatch;
use crate::error::{exit, Error, Result};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::plan::{AppKind, Plan};
use crate::stop::{self, StopFlag, StopSource, Stopper};
use crate::worker;

/// Shortest and longest wait before restarting a worker that keeps dying.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A worker that ran this long is healthy: its next restart is immediate.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How long to wait for SIGKILLed workers to be reaped.
const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// Runs a plan to the end; returns the process exit code.
pub fn run(plan: Plan, factory: &Factory<'_>, validate: Arc<Validate>) -> Result<u8> {
    let listener = match &plan.args.uds {
        Some(path) => Listener::bind_unix(path, plan.args.backlog)?,
        None => Listener::bind_tcp(&plan.args.host, plan.args.port, plan.args.backlog)?,
    };
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
    let metrics = Metrics::new(flag.clone(), region);
    if let Ok(dup) = listener.try_clone_fd() {
        metrics.pod.watch_listener(dup);
    }
    metrics.workers_desired.set(plan.workers() as i64);
    let watch = ContextsWatch::start(&plan, validate, metrics.clone());
    metrics
        .listen_backlog
        .set(i64::from(listener.effective_backlog));
    let workers_up = Arc::new(AtomicBool::new(false));

    let admin_listener = admin::bind(&plan.args.admin_host, plan.args.admin_port).await?;
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

    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT handler", e))?;
    {
        let flag = flag.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if flag.request(StopSource::Signal) {
                    tracing::info!("{name} received: draining");
                } else {
                    tracing::info!("{name} received again: already draining");
                }
            }
        });
    }

    if plan.in_process() {
        // No worker process to restart, add or remove: say so rather than
        // letting SIGHUP's default action kill the pod.
        for (kind, name) in [
            (SignalKind::hangup(), "SIGHUP"),
            (SignalKind::from_raw(libc::SIGTTIN), "SIGTTIN"),
            (SignalKind::from_raw(libc::SIGTTOU), "SIGTTOU"),
        ] {
            let mut s = signal(kind).map_err(|e| Error::io("signal handler", e))?;
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    tracing::info!("{name} ignored: the app runs in-process (--workers 1), there is no worker process");
                }
            });
        }
        in_process(plan, listener, factory, flag, metrics, workers_up, watch).await
    } else {
        let sigchld = signal(SignalKind::child()).map_err(|e| Error::io("SIGCHLD handler", e))?;
        if let Err(e) = crate::sys::set_child_subreaper() {
            tracing::warn!(error = %e, "cannot become a child subreaper; orphans of workers go to init");
        }
        let mut pool = Pool::new(plan, listener, flag, metrics, workers_up, sigchld, watch);
        pool.run().await
    }
}

/// `--workers 1` with the built-in or library app: no child process.
async fn in_process(
    plan: Plan,
    listener: Listener,
    factory: &Factory<'_>,
    flag: StopFlag,
    metrics: Metrics,
    workers_up: Arc<AtomicBool>,
    mut watch: ContextsWatch,
) -> Result<u8> {
    let svc = factory(0, 1, plan.contexts[0].clone()).map_err(Error::Contexts)?;
    let (svc_tx, svc) = tokio::sync::watch::channel(svc);
    stop::install(Stopper::InProcess(flag.clone()));
    let (serving, _uds) = listener
        .into_serving()
        .map_err(|e| Error::io("cannot serve the listener", e))?;
    let args = plan.args.clone();
    let stop_accepting = {
        let flag = flag.clone();
        let pod = metrics.pod.clone();
        async move {
            let source = flag.wait().await;
            tracing::info!(source = source.as_str(), "stop requested: draining");
            tokio::time::sleep(args.drain_delay).await;
            pod.forget_listener();
            tracing::info!("no longer accepting; finishing in-flight requests");
        }
    };
    let recorder = metrics
        .pod
        .region()
        .and_then(|r| crate::metrics::HttpRecorder::new(r, 0, 0));
    metrics.pod.process_started(0, std::process::id() as i32);
    let up = || {
        metrics.workers_running.set(1);
        workers_up.store(true, Ordering::Release);
    };
    let serving = crate::serve::serve(serving, svc, recorder, stop_accepting, up, true);
    // New contexts: new connections get a service built from them (the
    // in-process form of a rolling restart); open ones finish on the old.
    let reload = async {
        loop {
            let Some(contexts) = watch.next(true).await else {
                return std::future::pending::<()>().await;
            };
            match factory(0, 1, contexts[0].clone()) {
                Ok(svc) => {
                    svc_tx.send_replace(svc);
                    tracing::info!("new connections are served with the new context");
                }
                Err(e) => tracing::error!("{e}; keeping the last good context"),
            }
        }
    };
    let draining = tokio::select! {
        d = serving => d,
        _ = reload => unreachable!("the reload loop never ends"),
    };
    let clean = draining.finish(Some(plan.args.graceful_timeout)).await;
    metrics.workers_running.set(0);
    if clean {
        tracing::info!("drained cleanly");
        Ok(exit::OK)
    } else {
        tracing::warn!(
            timeout = ?plan.args.graceful_timeout,
            "in-flight requests outlived --graceful-timeout: aborted"
        );
        Ok(exit::KILLED)
    }
}

/// A worker's place in the pool; its id is its index.
struct Slot {
    /// The running process, if any.
    pid: Option<i32>,
    /// The supervisor's end of its control socket (drover's own workers get
    /// drain messages on it).
    ctl: Option<OwnedWriteHalf>,
    /// It has said `R` (built-in) or simply runs (external command).
    ready: bool,
    /// When the current process started.
    started: Instant,
    /// Consecutive short-lived runs: the backoff exponent.
    failures: u32,
    /// When to start it again after it exited.
    restart_at: Option<Instant>,
    /// Incremented at each start, so that messages from an old process's
    /// control socket are not taken for the new one's.
    generation: u64,
    /// During a rolling restart: the process being replaced, still serving
    /// until its successor is up.
    outgoing: Option<Outgoing>,
    /// The context the next start of this slot gets.
    context: serde_json::Value,
    /// Removed by SIGTTOU: not restarted, not counted.
    removed: bool,
    /// The last process of this slot exited non-zero or by a signal.
    last_failed: bool,
}

/// A process on its way out (replaced in a rolling restart, or removed by
/// SIGTTOU). It is never restarted; the drain kills it if it lingers.
struct Outgoing {
    pid: i32,
    ctl: Option<OwnedWriteHalf>,
}

/// Messages from the workers' control sockets.
enum Event {
    Ready { id: usize, generation: u64 },
    Stop { id: usize, generation: u64 },
}

/// What a pid the supervisor started is.
#[derive(Clone, Copy)]
enum Role {
    /// The current process of slot `id`, started as `generation`.
    Active(usize, u64),
    /// Replaced or removed. While its successor starts it still serves
    /// (`deadline` None); once told to leave, `deadline` is when it gets SIGKILL.
    Leaving {
        id: usize,
        generation: u64,
        deadline: Option<Instant>,
    },
}

/// A rolling restart in progress: the slots still to replace, in order, and
/// the one being replaced now (its new process is not up yet).
#[derive(Default)]
struct Roll {
    queue: std::collections::VecDeque<usize>,
    current: Option<usize>,
}

/// N worker processes sharing the listener.
struct Pool {
    plan: Plan,
    /// The supervisor's copy of the socket: kept to start replacements, closed
    /// when accepting stops.
    listener: Option<Listener>,
    flag: StopFlag,
    metrics: Metrics,
    workers_up: Arc<AtomicBool>,
    sigchld: Signal,
    slots: Vec<Slot>,
    pids: HashMap<i32, Role>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    /// The environment every worker inherits (ours, minus what drover sets).
    base_env: Vec<(Vec<u8>, Vec<u8>)>,
    roll: Option<Roll>,
    /// The shared HTTP metrics region (built-in and library apps).
    region: Option<Arc<crate::sys::SharedWords>>,
    /// Changes of the contexts' source.
    watch: ContextsWatch,
    /// Process groups of workers that exited while members of the group
    /// (the worker's own children) lived on: told `--stop-signal`, and
    /// SIGKILLed at the deadline. An orphaned gunicorn worker must not keep
    /// serving after its master died.
    orphan_groups: HashMap<i32, Instant>,
    /// Every worker process group ever started, swept with SIGKILL when
    /// drover exits so that nothing a worker left behind outlives it.
    groups: std::collections::HashSet<i32>,
    /// `--worker-ready notify`: the `NOTIFY_SOCKET` value workers get, and
    /// the pids that reported `READY=1`.
    notify: Option<(String, mpsc::UnboundedReceiver<i32>)>,
}

impl Pool {
    fn new(
        plan: Plan,
        listener: Listener,
        flag: StopFlag,
        metrics: Metrics,
        workers_up: Arc<AtomicBool>,
        sigchld: Signal,
        watch: ContextsWatch,
    ) -> Pool {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let metrics_region = metrics.pod.region();
        let ours = |k: &OsStr| {
            let k = k.as_bytes();
            k.starts_with(b"LISTEN_")
                || k == worker::ROLE_ENV.as_bytes()
                || k == b"DROVER_WORKER_ID"
                || k == b"DROVER_WORKERS"
                || k == b"DROVER_WORKER_CONTEXT"
                || k == b"DROVER_STOP_FD"
                || k == b"DROVER_LOG_FORMAT"
                || k == b"DROVER_LOG_LEVEL"
                // Readiness is reported to drover, never past it to whoever
                // started drover.
                || k == b"NOTIFY_SOCKET"
        };
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !ours(k))
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        let now = Instant::now();
        let slots = plan
            .contexts
            .iter()
            .map(|c| Slot::new(c.clone(), now))
            .collect();
        Pool {
            plan,
            listener: Some(listener),
            flag,
            metrics,
            workers_up,
            sigchld,
            slots,
            pids: HashMap::new(),
            events_tx,
            events_rx,
            base_env,
            roll: None,
            region: metrics_region,
            watch,
            orphan_groups: HashMap::new(),
            groups: Default::default(),
            notify: None,
        }
    }

    async fn run(&mut self) -> Result<u8> {
        let mut hup = signal(SignalKind::hangup()).map_err(|e| Error::io("SIGHUP handler", e))?;
        let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))
            .map_err(|e| Error::io("SIGTTIN handler", e))?;
        let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))
            .map_err(|e| Error::io("SIGTTOU handler", e))?;
        if matches!(self.plan.app, AppKind::Command { .. })
            && self.plan.args.worker_ready == WorkerReady::Notify
        {
            let socket = crate::notify::NotifySocket::bind().map_err(|e| {
                Error::io("cannot bind the NOTIFY_SOCKET for --worker-ready notify", e)
            })?;
            let (tx, rx) = mpsc::unbounded_channel();
            self.notify = Some((socket.env_value.clone(), rx));
            tokio::spawn(socket.run(tx));
        }
        // The first start of every worker: a command that cannot be executed
        // at all is a configuration error, not a crash loop.
        for id in 0..self.slots.len() {
            self.slots[id].restart_at = None;
            if let Err(e) = self.start(id) {
                let err = self.start_error(e);
                tracing::error!(worker = id, "{err}");
                self.kill_everything().await;
                return Err(err);
            }
        }
        let flag = self.flag.clone();
        let stopped = flag.wait();
        tokio::pin!(stopped);
        let source = loop {
            self.start_due();
            self.advance_roll();
            self.update_readiness();
            let next = self
                .slots
                .iter()
                .filter_map(|s| s.restart_at)
                .chain(self.leaving_deadlines())
                .chain(self.orphan_groups.values().copied())
                .min();
            tokio::select! {
                biased;
                source = &mut stopped => break source,
                _ = self.sigchld.recv() => {
                    self.reap(false);
                    if let Some(code) = self.all_gone() {
                        self.sweep_groups();
                        return Ok(code);
                    }
                }
                Some(ev) = self.events_rx.recv() => self.on_event(ev),
                Some(pid) = recv_opt(self.notify.as_mut().map(|n| &mut n.1)) => self.on_notified_ready(pid),
                Some(contexts) = self.watch.next(false) => self.apply_contexts(contexts),
                _ = hup.recv() => self.rolling_restart("SIGHUP", None),
                _ = ttin.recv() => self.add_worker(),
                _ = ttou.recv() => self.remove_worker(),
                _ = sleep_until_opt(next) => self.kill_overdue(),
            }
        };
        self.drain(source).await
    }

    /// With `--restart never` or `on-failure`, the workers can all be gone
    /// for good: then drover exits like tini when its child exits, 0 if the
    /// last run of every worker succeeded, else 1.
    fn all_gone(&self) -> Option<u8> {
        let waiting = self
            .slots
            .iter()
            .any(|s| !s.removed && (s.pid.is_some() || s.restart_at.is_some()));
        if waiting || !self.pids.is_empty() {
            return None;
        }
        let failed = self.slots.iter().any(|s| s.last_failed);
        tracing::info!(
            restart = ?self.plan.args.restart,
            "every worker has exited and none is to be restarted: exiting"
        );
        Some(if failed { exit::KILLED } else { exit::OK })
    }

    /// Words for a worker that could not be started.
    fn start_error(&self, e: std::io::Error) -> Error {
        match &self.plan.app {
            AppKind::Command { program, .. } => {
                let code = match e.raw_os_error() {
                    Some(libc::ENOENT) => 127,
                    _ => 126,
                };
                let hint = if e.raw_os_error() == Some(libc::ENOENT) && program.exists() {
                    match shebang(program) {
                        Some(interp) => format!(" (its #! interpreter {interp} does not exist)"),
                        None => " (the file exists: a library or interpreter it needs is missing)"
                            .into(),
                    }
                } else if e.raw_os_error() == Some(libc::ENOEXEC) {
                    " (not a binary this system can run, and no #! line)".into()
                } else {
                    String::new()
                };
                Error::Command {
                    program: program.display().to_string(),
                    reason: format!("execve failed: {e}{hint}; a shell would exit {code}"),
                }
            }
            AppKind::Builtin => Error::io("cannot start a worker process", e),
        }
    }

    /// SIGKILL to every worker and what it started, reap them, and sweep
    /// their process groups (start-up failed, or the drain ran out of time).
    async fn kill_everything(&mut self) {
        for &pid in self.pids.keys() {
            crate::sys::kill_group(pid, libc::SIGKILL);
            crate::sys::kill(pid, libc::SIGKILL);
        }
        self.reap_until(Instant::now() + REAP_AFTER_KILL).await;
        self.sweep_groups();
    }

    /// Reaps exits (never restarting) until no worker is left or `until`.
    async fn reap_until(&mut self, until: Instant) {
        while self.alive() > 0 && Instant::now() < until {
            tokio::select! {
                _ = self.sigchld.recv() => self.reap(true),
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// A worker exited: whatever it started and left in its process group
    /// is told to stop, and killed after `--graceful-timeout`.
    fn stop_orphans(&mut self, pid: i32) {
        if crate::sys::kill_group(pid, self.plan.args.stop_signal.signo) {
            tracing::info!(
                pid,
                "the exited worker's own children live on: sent them --stop-signal"
            );
            self.orphan_groups
                .insert(pid, Instant::now() + self.plan.args.graceful_timeout);
        }
    }

    /// SIGKILL to every worker process group (drover is exiting).
    fn sweep_groups(&mut self) {
        for &g in &self.groups {
            crate::sys::kill_group(g, libc::SIGKILL);
        }
        self.reap(true);
    }

    fn leaving_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.pids.values().filter_map(|r| match r {
            Role::Leaving { deadline, .. } => *deadline,
            Role::Active(..) => None,
        })
    }

    /// Starts every slot whose restart time has come.
    fn start_due(&mut self) {
        let now = Instant::now();
        for id in 0..self.slots.len() {
            let s = &self.slots[id];
            if s.pid.is_none() && !s.removed && s.restart_at.is_some_and(|t| t <= now) {
                self.slots[id].restart_at = None;
                if let Err(e) = self.start(id) {
                    let err = self.start_error(e);
                    self.slots[id].last_failed = true;
                    if self.plan.args.restart == Restart::Never {
                        tracing::error!(worker = id, "{err}; --restart never: not retrying");
                    } else {
                        tracing::error!(worker = id, "{err}; retrying");
                        self.schedule_restart(id, true);
                    }
                }
            }
        }
    }

    fn start(&mut self, id: usize) -> std::io::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let theirs = crate::sys::high_fd(OwnedFd::from(theirs))?;
        let n = self.slots.iter().filter(|s| !s.removed).count();
        let context =
            serde_json::to_string(&self.slots[id].context).unwrap_or_else(|_| "null".into());
        let mut env = self.base_env.clone();
        let mut set = |k: &str, v: &[u8]| env.push((k.as_bytes().to_vec(), v.to_vec()));
        set("LISTEN_FDS", b"1");
        set("LISTEN_PID", b"");
        set("LISTEN_FDNAMES", b"http");
        set("DROVER_WORKER_ID", id.to_string().as_bytes());
        set("DROVER_WORKERS", n.to_string().as_bytes());
        set("DROVER_WORKER_CONTEXT", context.as_bytes());
        set("DROVER_STOP_FD", worker::STOP_FD.to_string().as_bytes());
        if let Some((notify_socket, _)) = &self.notify {
            set("NOTIFY_SOCKET", notify_socket.as_bytes());
        }
        let (program, argv): (OsString, Vec<OsString>) = match &self.plan.app {
            AppKind::Builtin => {
                set(worker::ROLE_ENV, worker::ROLE_WORKER.as_bytes());
                let format = match self.plan.args.log_format {
                    crate::config::LogFormat::Text => "text",
                    crate::config::LogFormat::Json => "json",
                };
                set("DROVER_LOG_FORMAT", format.as_bytes());
                set("DROVER_LOG_LEVEL", self.plan.args.log_level.as_bytes());
                ("/proc/self/exe".into(), std::env::args_os().collect())
            }
            AppKind::Command { program, argv } => (program.clone().into(), argv.clone()),
        };
        let generation = self.slots[id].generation + 1;
        let mut fds = vec![
            (listener.raw_fd(), worker::LISTEN_FD),
            (theirs.as_raw_fd(), worker::STOP_FD),
        ];
        if let Some(region) = &self.region {
            fds.push((region.raw_fd(), worker::METRICS_FD));
            env.push((
                worker::GENERATION_ENV.into(),
                generation.to_string().into_bytes(),
            ));
        }
        let args: Vec<&OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
        let pid = crate::sys::Spawn::new(&program, &args, &env, &fds)?.spawn()?;
        drop(theirs);

        ours.set_nonblocking(true)?;
        let (mut read, write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let builtin = matches!(self.plan.app, AppKind::Builtin);
        let slot = &mut self.slots[id];
        slot.generation = generation;
        slot.pid = Some(pid);
        slot.ctl = Some(write);
        slot.started = Instant::now();
        // An external command counts as up once it runs, or with
        // --worker-ready notify once it says READY=1.
        slot.ready = !builtin && self.notify.is_none();
        self.pids.insert(pid, Role::Active(id, generation));
        self.groups.insert(pid);
        self.metrics.pod.process_started(id, pid);
        self.count_running();
        tracing::info!(worker = id, pid, "worker started");

        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        for &b in &buf[..n] {
                            let ev = if builtin && b == worker::MSG_READY[0] {
                                Event::Ready { id, generation }
                            } else {
                                // External workers: any byte asks for a stop.
                                Event::Stop { id, generation }
                            };
                            if tx.send(ev).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(())
    }

    fn count_running(&self) {
        self.metrics.workers_running.set(self.pids.len() as i64);
        let desired = self.slots.iter().filter(|s| !s.removed).count();
        self.metrics.workers_desired.set(desired as i64);
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ready { id, generation } => {
                if self.slots[id].generation == generation && self.slots[id].pid.is_some() {
                    self.slots[id].ready = true;
                }
            }
            Event::Stop { id, generation } => {
                if self.slots[id].generation == generation && self.flag.request(StopSource::Worker)
                {
                    tracing::info!(worker = id, "worker asked to stop the service: draining");
                }
            }
        }
    }

    /// A process reported `READY=1`: the worker it is (or descends from) is up.
    fn on_notified_ready(&mut self, pid: i32) {
        let mut p = pid;
        for _ in 0..16 {
            if let Some(Role::Active(id, _)) = self.pids.get(&p) {
                let id = *id;
                if self.slots[id].pid == Some(p) && !self.slots[id].ready {
                    self.slots[id].ready = true;
                    tracing::info!(worker = id, pid = p, "worker reported READY=1");
                }
                return;
            }
            match crate::notify::parent_of(p) {
                Some(parent) if parent > 1 => p = parent,
                _ => break,
            }
        }
        tracing::debug!(pid, "READY=1 from a process that is no current worker");
    }

    /// `/readyz` is 200 when every slot serves: its process is up, or, while
    /// it is being replaced, the process it replaces still serves.
    fn update_readiness(&self) {
        let up = self
            .slots
            .iter()
            .filter(|s| !s.removed)
            .all(|s| (s.pid.is_some() && s.ready) || s.outgoing.is_some());
        self.workers_up.store(up, Ordering::Release);
    }

    /// Reaps every exited child: workers (restarted unless `draining`) and
    /// orphans of workers that were reparented to drover.
    fn reap(&mut self, draining: bool) {
        while let Some(exited) = crate::sys::reap_one() {
            let pid = exited.pid;
            let (how, failed) = match (exited.code, exited.signal) {
                (Some(code), _) => (format!("exit code {code}"), code != 0),
                (None, sig) => (format!("signal {}", sig.unwrap_or(0)), true),
            };
            let lane = match self.pids.get(&pid) {
                Some(Role::Active(_, g)) | Some(Role::Leaving { generation: g, .. }) => Some(*g),
                None => None,
            };
            self.metrics
                .pod
                .process_exited(pid, exited.cpu_seconds, lane);
            let id = match self.pids.remove(&pid) {
                None => {
                    tracing::debug!(pid, "reaped {how} of an orphaned descendant");
                    continue;
                }
                Some(Role::Leaving { id, .. }) => {
                    self.stop_orphans(pid);
                    if self.slots[id]
                        .outgoing
                        .as_ref()
                        .is_some_and(|o| o.pid == pid)
                    {
                        self.slots[id].outgoing = None;
                    }
                    self.count_running();
                    tracing::info!(worker = id, pid, "replaced worker exited ({how})");
                    continue;
                }
                Some(Role::Active(id, _)) => id,
            };
            self.stop_orphans(pid);
            self.count_running();
            let slot = &mut self.slots[id];
            slot.pid = None;
            slot.ready = false;
            slot.ctl = None;
            slot.last_failed = failed;
            if draining {
                tracing::info!(worker = id, pid, "worker exited ({how})");
                continue;
            }
            let restart = match self.plan.args.restart {
                Restart::Always => true,
                Restart::OnFailure => failed,
                Restart::Never => false,
            };
            tracing::warn!(
                worker = id,
                pid,
                restart,
                "worker exited on its own ({how})"
            );
            if restart {
                self.schedule_restart(id, true);
            }
        }
    }

    /// Plans the next start of worker `id` with capped exponential backoff;
    /// a worker that ran for a while is restarted at once.
    fn schedule_restart(&mut self, id: usize, count: bool) {
        let slot = &mut self.slots[id];
        if slot.started.elapsed() >= STABLE_AFTER {
            slot.failures = 0;
        }
        let delay = if slot.failures == 0 {
            Duration::ZERO
        } else {
            (BACKOFF_MIN * 2u32.saturating_pow(slot.failures - 1)).min(BACKOFF_MAX)
        };
        slot.failures = slot.failures.saturating_add(1).min(16);
        slot.restart_at = Some(Instant::now() + delay);
        if count {
            self.metrics
                .worker_restarts
                .with_label_values(&[&id.to_string()])
                .inc();
        }
        if !delay.is_zero() {
            tracing::info!(worker = id, delay = ?delay, "restarting worker after backoff");
        }
    }

    /// New contexts: slots are added or removed to match their count, and
    /// the workers whose context changed (all, if the count changed, since
    /// `DROVER_WORKERS` did) are replaced one at a time.
    fn apply_contexts(&mut self, contexts: Vec<serde_json::Value>) {
        let active = self.slots.iter().filter(|s| !s.removed).count();
        let resized = active != contexts.len();
        let mut changed = Vec::new();
        for (i, ctx) in contexts.iter().enumerate() {
            if i < self.slots.len() {
                if self.slots[i].removed {
                    self.slots[i].removed = false;
                    self.slots[i].restart_at = Some(Instant::now());
                } else if self.slots[i].context != *ctx || resized {
                    changed.push(i);
                }
                self.slots[i].context = ctx.clone();
            } else {
                self.slots.push(Slot::new(ctx.clone(), Instant::now()));
            }
        }
        for id in contexts.len()..self.slots.len() {
            if !self.slots[id].removed {
                self.remove_slot(id);
            }
        }
        self.count_running();
        if !changed.is_empty() {
            self.rolling_restart("new worker contexts", Some(changed));
        }
    }

    /// Starts a rolling restart of `which` workers, or of all (SIGHUP).
    fn rolling_restart(&mut self, why: &str, which: Option<Vec<usize>>) {
        let queue = which
            .unwrap_or_else(|| (0..self.slots.len()).collect())
            .into_iter()
            .filter(|&i| !self.slots[i].removed)
            .collect();
        tracing::info!("{why}: rolling restart, one worker at a time");
        let current = self.roll.take().and_then(|r| r.current);
        self.roll = Some(Roll { queue, current });
    }

    /// Moves the rolling restart on: the next slot is replaced only once the
    /// previous replacement is up.
    fn advance_roll(&mut self) {
        loop {
            let Some(roll) = &mut self.roll else { return };
            if let Some(id) = roll.current {
                let s = &self.slots[id];
                if !(s.pid.is_some() && s.ready) {
                    return; // Its replacement is not up yet.
                }
                roll.current = None;
                self.retire_outgoing(id);
                continue;
            }
            let Some(id) = roll.queue.pop_front() else {
                tracing::info!("rolling restart done");
                self.roll = None;
                return;
            };
            if self.slots[id].removed {
                continue;
            }
            if let Some(pid) = self.slots[id].pid.take() {
                // Keep the old process serving until the new one is up.
                let ctl = self.slots[id].ctl.take();
                self.slots[id].ready = false;
                self.slots[id].outgoing = Some(Outgoing { pid, ctl });
                let generation = self.slots[id].generation;
                self.pids.insert(
                    pid,
                    Role::Leaving {
                        id,
                        generation,
                        deadline: None,
                    },
                );
            }
            self.slots[id].restart_at = None;
            self.slots[id].failures = 0;
            if let Err(e) = self.start(id) {
                tracing::error!(worker = id, error = %e, "cannot start replacement worker");
                self.schedule_restart(id, false);
            }
            if let Some(r) = &mut self.roll {
                r.current = Some(id);
            }
        }
    }

    /// Asks a replaced process to finish and leave; it is killed after
    /// `--graceful-timeout`.
    fn retire_outgoing(&mut self, id: usize) {
        if let Some(o) = &self.slots[id].outgoing {
            let pid = o.pid;
            self.leave(pid, o.ctl.as_ref());
            self.mark_leaving(id, pid);
        }
    }

    /// Sends one process the "stop accepting" it would get in a drain, and
    /// marks it as leaving.
    fn leave(&self, pid: i32, ctl: Option<&OwnedWriteHalf>) {
        match &self.plan.app {
            AppKind::Builtin => {
                if let Some(w) = ctl {
                    let _ = w.try_write(worker::MSG_STOP_ACCEPTING);
                }
            }
            AppKind::Command { .. } => {
                crate::sys::kill(pid, self.plan.args.stop_signal.signo);
            }
        }
    }

    fn mark_leaving(&mut self, id: usize, pid: i32) {
        let deadline = Instant::now() + self.plan.args.graceful_timeout;
        let generation = match self.pids.get(&pid) {
            Some(Role::Active(_, g)) | Some(Role::Leaving { generation: g, .. }) => *g,
            None => 0,
        };
        self.pids.insert(
            pid,
            Role::Leaving {
                id,
                generation,
                deadline: Some(deadline),
            },
        );
    }

    /// SIGTTIN: one more worker (gunicorn's convention).
    fn add_worker(&mut self) {
        if matches!(self.plan_contexts_kind(), ContextsKind::PerWorker) {
            tracing::warn!(
                "SIGTTIN ignored: the contexts give one item per worker, so they fix the count"
            );
            return;
        }
        if let Some(id) = self.slots.iter().position(|s| s.removed) {
            self.slots[id].removed = false;
            self.slots[id].restart_at = Some(Instant::now());
            tracing::info!(worker = id, "SIGTTIN: adding a worker");
        } else {
            let context = self.slots[0].context.clone();
            self.slots.push(Slot::new(context, Instant::now()));
            tracing::info!(worker = self.slots.len() - 1, "SIGTTIN: adding a worker");
        }
        self.count_running();
    }

    /// SIGTTOU: one worker fewer (never below one).
    fn remove_worker(&mut self) {
        let active: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !self.slots[i].removed)
            .collect();
        if active.len() <= 1 {
            tracing::warn!("SIGTTOU ignored: one worker is the minimum");
            return;
        }
        if matches!(self.plan_contexts_kind(), ContextsKind::PerWorker) {
            tracing::warn!(
                "SIGTTOU ignored: the contexts give one item per worker, so they fix the count"
            );
            return;
        }
        let id = *active.last().expect("at least two");
        self.remove_slot(id);
        tracing::info!(worker = id, "SIGTTOU: removing a worker");
        self.count_running();
    }

    /// Takes worker `id` out of the pool; its process leaves gracefully.
    fn remove_slot(&mut self, id: usize) {
        let slot = &mut self.slots[id];
        slot.removed = true;
        slot.restart_at = None;
        slot.ready = false;
        if let Some(pid) = slot.pid.take() {
            let ctl = slot.ctl.take();
            self.leave(pid, ctl.as_ref());
            self.mark_leaving(id, pid);
            self.slots[id].outgoing = Some(Outgoing { pid, ctl });
        }
    }

    fn plan_contexts_kind(&self) -> ContextsKind {
        if self.watch.per_worker {
            ContextsKind::PerWorker
        } else {
            ContextsKind::Shared
        }
    }

    /// SIGKILL to leaving processes that outlived `--graceful-timeout`.
    fn kill_overdue(&mut self) {
        let now = Instant::now();
        self.orphan_groups.retain(|&g, deadline| {
            if *deadline > now {
                return true;
            }
            if crate::sys::kill_group(g, libc::SIGKILL) {
                tracing::warn!(
                    group = g,
                    "children of an exited worker outlived --graceful-timeout: SIGKILL"
                );
            }
            false
        });
        // Forget groups that have no member left.
        self.groups
            .retain(|&g| crate::sys::kill_group(g, 0) || self.pids.contains_key(&g));
        for (&pid, role) in &self.pids {
            if let Role::Leaving {
                id,
                deadline: Some(deadline),
                ..
            } = role
            {
                if *deadline <= now {
                    tracing::warn!(
                        worker = id,
                        pid,
                        "replaced worker outlived --graceful-timeout: SIGKILL"
                    );
                    crate::sys::kill_group(pid, libc::SIGKILL);
                    crate::sys::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// Waits (bounded by `deadline`) until the accept queue is empty.
    async fn wait_queue_empty(&mut self, l: &Listener, deadline: Instant) {
        let Some(first) = l.queued() else { return };
        if first == 0 {
            return;
        }
        tracing::info!(
            queued = first,
            "letting the workers accept the connections already queued"
        );
        while l.queued().unwrap_or(0) > 0 && Instant::now() < deadline && self.alive() > 0 {
            tokio::select! {
                _ = self.sigchld.recv() => self.reap(true),
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
    }

    fn alive(&self) -> usize {
        self.pids.len()
    }

    async fn drain(&mut self, source: StopSource) -> Result<u8> {
        let args = self.plan.args.clone();
        tracing::info!(source = source.as_str(), "stop requested: draining");
        self.workers_up.store(false, Ordering::Release);
        self.roll = None;
        for s in &mut self.slots {
            s.restart_at = None;
        }
        let builtin = matches!(self.plan.app, AppKind::Builtin);
        if builtin {
            for s in &self.slots {
                if let Some(w) = &s.ctl {
                    let _ = w.try_write(worker::MSG_DRAINING);
                }
            }
        }

        // 2. Keep serving for the drain delay.
        self.reap_until(Instant::now() + args.drain_delay).await;

        // 3. Stop accepting: every process still serving, replaced or not.
        let deadline = Instant::now() + args.graceful_timeout;
        self.metrics.pod.forget_listener();
        if let Some(l) = self.listener.take() {
            if let Err(e) = l.stop_new() {
                tracing::warn!(error = %e, "cannot shut new connections out of the shared socket");
            }
            if !builtin {
                // An external worker told to stop exits without emptying the
                // accept queue (gunicorn, uvicorn): let the workers, still
                // accepting, take every queued connection first. Nothing new
                // can join the queue, so it only shrinks.
                self.wait_queue_empty(&l, deadline).await;
            }
        }
        tracing::info!("no longer accepting; finishing in-flight requests");
        for s in &self.slots {
            if let Some(pid) = s.pid {
                self.leave(pid, s.ctl.as_ref());
            }
            if let Some(o) = &s.outgoing {
                // Still serving while its successor started: tell it too.
                if matches!(
                    self.pids.get(&o.pid),
                    Some(Role::Leaving { deadline: None, .. })
                ) {
                    self.leave(o.pid, o.ctl.as_ref());
                }
            }
        }

        // 4. Wait, then kill.
        self.reap_until(deadline).await;
        if self.alive() > 0 {
            let pids: Vec<i32> = self.pids.keys().copied().collect();
            tracing::warn!(
                ?pids,
                timeout = ?args.graceful_timeout,
                "workers outlived --graceful-timeout: SIGKILL"
            );
            self.kill_everything().await;
            return Ok(exit::KILLED);
        }
        // Nothing a worker started outlives drover.
        self.sweep_groups();
        tracing::info!("drained cleanly");
        Ok(exit::OK)
    }
}

enum ContextsKind {
    PerWorker,
    Shared,
}

impl Slot {
    fn new(context: serde_json::Value, now: Instant) -> Slot {
        Slot {
            pid: None,
            ctl: None,
            ready: false,
            started: now,
            failures: 0,
            restart_at: Some(now),
            generation: 0,
            outgoing: None,
            context,
            removed: false,
            last_failed: false,
        }
    }
}

/// The interpreter a script's `#!` line names, if any.
fn shebang(program: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let n = std::fs::File::open(program).ok()?.read(&mut head).ok()?;
    let line = head[..n]
        .strip_prefix(b"#!")?
        .split(|&b| b == b'\n')
        .next()?;
    let line = String::from_utf8_lossy(line);
    line.split_whitespace().next().map(str::to_string)
}

async fn recv_opt<T>(rx: Option<&mut mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
