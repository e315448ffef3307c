//! N worker processes sharing the listener: the event loop. It turns each
//! event (an exit, a control message, READY=1, a signal, new contexts, a
//! timer) into a call of the rules ([`policy::Lifecycle`]) and carries out
//! the [`Action`]s they return with the mechanism ([`spawn`], [`procs`]).
//! It decides nothing itself.
//!
//! # Watchdog and recycling
//! With `--worker-timeout` or a `--max-*` limit the loop also looks at the
//! workers every [`CHECK_EVERY`]: heartbeats (drover's own workers send one
//! from their event loop; external apps may send sd_notify's `WATCHDOG=1`),
//! requests answered (the metrics region), age, and the resident memory of
//! each worker's process group (every [`MEMORY_EVERY`]). A silent worker is
//! reported hung; one over a limit is queued for recycling. The rules do
//! the rest.
//!
//! # Threads
//! The loop runs on the main thread (the `block_on` future, never a spawned
//! task) and forks only from there: a worker's parent-death signal is tied
//! to the thread that forked it.
//!
//! [`procs`]: super::procs

mod accepting;
pub mod policy;
pub mod sockets;
pub mod spawn;
pub mod table;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::policy::{Action, Lifecycle, Reason};
use self::spawn::Spawner;
use super::drain::Serving;
use super::procs;
use super::Control;
use crate::config::Restart;
use crate::contexts::watch::ContextsWatch;
use crate::control::{SupervisorEnd, ToSupervisor, ToWorker};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::stop::{StopFlag, StopSource};
use sockets::Sockets;

/// Settings of the pool, from the plan.
pub struct PoolSettings {
    /// The rules' settings.
    pub policy: policy::Policy,
    /// `--stop-signal`.
    pub stop_signal: libc::c_int,
    /// External workers are up once running (`--worker-ready running`).
    pub ready_when_running: bool,
    /// The watchdog and the recycling limits.
    pub limits: Limits,
}

/// `--worker-timeout` and the recycling limits (None: off).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// `--worker-timeout`.
    pub worker_timeout: Option<Duration>,
    /// `--max-requests` and its jitter.
    pub max_requests: Option<(u64, u64)>,
    /// `--max-worker-memory`, in bytes.
    pub max_memory: Option<u64>,
    /// `--max-worker-lifetime` and its jitter.
    pub max_lifetime: Option<(Duration, Duration)>,
}

impl Limits {
    /// Whether anything is on.
    pub fn any(&self) -> bool {
        self.worker_timeout.is_some()
            || self.max_requests.is_some()
            || self.max_memory.is_some()
            || self.max_lifetime.is_some()
    }

    /// How often a worker of drover's own app sends its heartbeat: several
    /// times per timeout, at most every second.
    pub fn heartbeat(&self) -> Option<Duration> {
        self.worker_timeout
            .map(|t| (t / 5).clamp(Duration::from_millis(20), Duration::from_secs(1)))
    }
}

/// A random number in `0..=max`, different per call (jitter: no two workers
/// started together get the same limit).
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process and per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max);
    h.finish() % (max + 1)
}

/// What the pool holds of a process besides what the rules see.
#[derive(Debug, Default)]
pub struct ProcOs {
    /// The supervisor's end of its control socket (drover's own workers).
    ctl: Option<SupervisorEnd>,
    /// It had no handler for `--stop-signal` when it was sent.
    stop_unhandled: bool,
    /// When it (or a descendant) sent READY=1 (`--worker-ready auto`).
    notified_at: Option<Instant>,
    /// Its last heartbeat (drover's own workers: since its start) or
    /// `WATCHDOG=1` (external apps: None until the first).
    beat: Option<Instant>,
    /// Its `--max-requests`, jitter drawn.
    max_requests: Option<u64>,
    /// Its `--max-worker-lifetime`, jitter drawn.
    max_lifetime: Option<Duration>,
    /// Told to leave, but not yet told: its socket is its own and must be
    /// empty first (`--balance reuseport`); since when it waits.
    leave_deferred: Option<Instant>,
}

/// A message from a worker's control socket, or an sd_notify notice.
enum Message {
    Control(i32, ToSupervisor),
    Notified(i32, crate::notify::Notice),
}

/// How often the watchdog and the request and lifetime limits are checked.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How often the memory of the workers is measured (a walk of `/proc`).
const MEMORY_EVERY: Duration = Duration::from_secs(1);

/// Under `--worker-ready auto`, how long after READY=1 a worker that holds
/// the socket but is not seen accepting is taken at its word.
const NOTIFIED_GRACE: Duration = Duration::from_secs(5);

/// How often starting workers are looked at for accepting.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// How often the listener's backlog is checked when nothing else happens.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// How long the drain waits for an accept queue that does not shrink.
const QUEUE_STALL: Duration = Duration::from_secs(1);

/// How long the exit sweep may take to kill and reap what is left.
const SWEEP_LIMIT: Duration = Duration::from_secs(5);

/// The pool: the rules' state and the OS handles they act on.
pub struct Pool {
    lc: Lifecycle<ProcOs>,
    spawner: Spawner,
    /// The supervisor's copy of the workers' socket(s): kept to start
    /// replacements, closed when accepting stops.
    sockets: Option<Sockets>,
    settings: PoolSettings,
    flag: StopFlag,
    metrics: Metrics,
    /// What `/readyz` reads.
    workers_up: Arc<AtomicBool>,
    sigchld: Signal,
    messages_tx: mpsc::UnboundedSender<Message>,
    messages: mpsc::UnboundedReceiver<Message>,
    /// (source, version) of the contexts change being rolled: reported in
    /// force (`drover_contexts_info`) once its roll is done.
    pending_version: Option<(&'static str, String)>,
    /// The notify socket's private directory, removed with the pool.
    notify_dir: Option<crate::notify::NotifyDir>,
    /// Whether workers count as up once seen accepting.
    detect: bool,
    /// A worker's own backlog was overridden once (it is said only once).
    backlog_reapplied: bool,
    /// The watchdog's and the limits' clock.
    checks: tokio::time::Interval,
    /// When memory was last measured.
    memory_at: Option<Instant>,
}

impl Pool {
    /// A pool that will start one worker per context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: PoolSettings,
        contexts: &[serde_json::Value],
        per_worker: bool,
        spawner: Spawner,
        sockets: Sockets,
        flag: StopFlag,
        metrics: Metrics,
        workers_up: Arc<AtomicBool>,
        sigchld: Signal,
    ) -> Pool {
        let mut spawner = spawner;
        spawner.heartbeat = settings.limits.heartbeat();
        spawner.watchdog_usec = settings
            .limits
            .worker_timeout
            .map(|t| t.as_micros().min(u128::from(u64::MAX)) as u64);
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let lc = Lifecycle::new(
            settings.policy.clone(),
            contexts,
            per_worker,
            Instant::now(),
        );
        Pool {
            lc,
            spawner,
            sockets: Some(sockets),
            settings,
            flag,
            metrics,
            workers_up,
            sigchld,
            messages_tx,
            messages,
            pending_version: None,
            notify_dir: None,
            detect: false,
            backlog_reapplied: false,
            checks: {
                let mut i = tokio::time::interval(CHECK_EVERY);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            },
            memory_at: None,
        }
    }

    /// Listens for `READY=1` from the workers (sd_notify): sets their
    /// `NOTIFY_SOCKET`. With `required` false (`--worker-ready auto`) a
    /// socket that cannot be made is a warning: workers are then up once
    /// seen accepting.
    pub fn listen_for_notify(&mut self, required: bool) -> Result<()> {
        let (socket, dir) = match crate::notify::NotifySocket::bind() {
            Ok(s) => s,
            Err(e) if !required => {
                tracing::warn!(
                    error = %e,
                    dir = %std::env::temp_dir().display(),
                    "no sd_notify socket for the workers (TMPDIR is not writable): they count as up once seen accepting"
                );
                return Ok(());
            }
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "cannot create the sd_notify socket for --worker-ready notify in {} (set TMPDIR to a writable directory)",
                        std::env::temp_dir().display()
                    ),
                    e,
                ))
            }
        };
        tracing::info!(path = %socket.env_value, "sd_notify socket for the workers' READY=1");
        self.spawner.notify_socket = Some(socket.env_value.clone());
        self.notify_dir = Some(dir);
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(socket.run(tx));
        let messages = self.messages_tx.clone();
        tokio::spawn(async move {
            while let Some((pid, notice)) = rx.recv().await {
                if messages.send(Message::Notified(pid, notice)).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    /// Counts external workers as up once they are seen accepting on the
    /// shared socket (`--worker-ready auto`).
    pub fn detect_accepting(&mut self) {
        self.detect = true;
    }

    /// Whether a worker is starting whose accepting is to be looked for.
    fn looking(&self) -> bool {
        self.detect
            && self
                .lc
                .table
                .procs
                .values()
                .any(|p| p.phase == table::Phase::Starting && p.slot.is_some())
    }

    /// Looks whether starting workers accept yet.
    fn look(&mut self) {
        if !self.detect {
            return;
        }
        let starting: Vec<(i32, usize)> = self
            .lc
            .table
            .procs
            .iter()
            .filter(|(_, p)| p.phase == table::Phase::Starting)
            .filter_map(|(&pid, p)| p.slot.map(|s| (pid, s)))
            .collect();
        for (pid, slot) in starting {
            let Some(ino) = self.sockets.as_ref().and_then(|s| s.inode(slot)) else {
                continue;
            };
            if accepting::accepting(pid, ino) {
                tracing::info!(worker = slot, pid, "worker is accepting: up");
                self.lc.ready(pid);
                continue;
            }
            // An app that said READY=1, holds the socket, and is still not
            // seen accepting a while later waits in a way drover cannot see
            // (io_uring, say): its READY=1 is taken at its word. One that
            // does not even hold the socket (puma without its socket flag
            // binds a port of its own) is never up.
            let notified = self.lc.table.procs[&pid].handle.notified_at;
            if notified.is_some_and(|t| t.elapsed() >= NOTIFIED_GRACE) && accepting::holds(pid, ino)
            {
                tracing::info!(
                    worker = slot,
                    pid,
                    "worker said READY=1 and holds the socket, though it is not seen accepting: up"
                );
                self.lc.ready(pid);
            }
        }
    }

    /// Starts every worker once: a command that cannot be executed at all is
    /// a configuration error, not a crash loop.
    pub async fn start(&mut self) -> Result<()> {
        for action in self.lc.settle(Instant::now()) {
            let Action::Spawn {
                slot,
                context,
                workers,
                for_roll,
            } = action
            else {
                continue;
            };
            if let Err(e) = self.spawn(slot, context, workers, for_roll) {
                let err = self.spawner.start_error(e);
                tracing::error!(worker = slot, "{err}");
                let actions = self.lc.kill_all(Instant::now());
                self.execute(actions);
                self.reap_until(Instant::now() + SWEEP_LIMIT).await;
                self.sweep();
                return Err(err);
            }
        }
        self.publish();
        Ok(())
    }

    /// Runs until the stop flag is set (returns who set it) or, with
    /// `--restart never`/`on-failure`, until every worker is gone for good
    /// (returns the exit code).
    pub async fn run(
        &mut self,
        control: &mut mpsc::UnboundedReceiver<Control>,
        watch: &mut ContextsWatch,
    ) -> std::result::Result<StopSource, u8> {
        let flag = self.flag.clone();
        let stopped = flag.wait();
        tokio::pin!(stopped);
        loop {
            self.settle();
            self.hold_backlog();
            self.publish();
            if let Some(failed) = self.lc.over() {
                tracing::info!(
                    restart = ?self.settings.policy.restart,
                    "every worker has exited and none is to be restarted: exiting"
                );
                self.sweep();
                return Err(if failed {
                    crate::error::exit::KILLED
                } else {
                    crate::error::exit::OK
                });
            }
            let next = self.lc.next_wakeup();
            tokio::select! {
                biased;
                source = &mut stopped => return Ok(source),
                _ = self.sigchld.recv() => self.reap(),
                Some(m) = self.messages.recv() => self.on_message(m),
                Some(c) = control.recv() => self.on_control(c),
                Some(contexts) = watch.next(false) => {
                    let per_worker = watch.per_worker;
                    self.pending_version = Some((watch.source, watch.version.clone()));
                    let actions = self.lc.contexts_changed(&contexts, per_worker, Instant::now());
                    self.execute(actions);
                    if self.lc.rolling() {
                        tracing::info!("new worker contexts: rolling restart, one worker at a time");
                    }
                }
                _ = sleep_until_opt(next) => {}
                _ = tokio::time::sleep(LOOK_EVERY), if self.looking() => self.look(),
                _ = tokio::time::sleep(Duration::from_millis(5)), if self.leaves_deferred() => self.leave_emptied(),
                _ = self.checks.tick(), if self.settings.limits.any() => self.check(),
                // An app may re-listen at any time: look now and then.
                _ = tokio::time::sleep(BACKLOG_EVERY) => {}
            }
        }
    }

    /// Applies the rules until they ask for nothing more now (a start they
    /// asked for may let a roll move on, which asks for the next step).
    /// Bounded: each turn either starts or retires a process, or backs off.
    fn settle(&mut self) {
        for _ in 0..64 {
            let actions = self.lc.settle(Instant::now());
            if actions.is_empty() {
                return;
            }
            self.execute(actions);
        }
    }

    fn on_control(&mut self, c: Control) {
        let now = Instant::now();
        let actions = match c {
            Control::Hup => {
                if !self.lc.draining() {
                    tracing::info!("SIGHUP: rolling restart, one worker at a time");
                }
                self.lc.hup(now)
            }
            Control::Ttin => {
                let before = self.lc.table.desired();
                let a = self.lc.add_worker(now);
                if self.lc.table.desired() > before {
                    tracing::info!(
                        workers = self.lc.table.desired(),
                        "SIGTTIN: adding a worker"
                    );
                }
                a
            }
            Control::Ttou => {
                let before = self.lc.table.desired();
                let a = self.lc.remove_worker(now);
                if self.lc.table.desired() < before {
                    tracing::info!(
                        workers = self.lc.table.desired(),
                        "SIGTTOU: removing a worker"
                    );
                }
                a
            }
            Control::Forward(sig) => {
                // To each worker's own process group (its pid: a worker
                // leads its group), which includes the worker itself.
                for (&pid, p) in &self.lc.table.procs {
                    if p.slot.is_some() {
                        crate::sys::kill_group(pid, sig);
                    }
                }
                tracing::debug!(signal = sig, "forwarded to every worker");
                vec![]
            }
        };
        self.execute(actions);
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::Control(pid, ToSupervisor::Ready) => self.lc.ready(pid),
            // A stop from any process of the table counts, whether it is
            // current, replaced or leaving (bug: a replaced worker's stop was
            // dropped).
            Message::Control(pid, ToSupervisor::Stop) => {
                let worker = self.lc.table.procs.get(&pid).and_then(|p| p.slot);
                if self.flag.request(StopSource::Worker) {
                    tracing::info!(?worker, pid, "worker asked to stop the service: draining");
                }
            }
            Message::Control(pid, ToSupervisor::Heartbeat) => {
                if let Some(p) = self.lc.table.procs.get_mut(&pid) {
                    p.handle.beat = Some(Instant::now());
                }
            }
            Message::Notified(pid, crate::notify::Notice::Ready) => self.on_notified_ready(pid),
            Message::Notified(pid, notice) => self.on_watchdog(pid, notice),
        }
    }

    /// `WATCHDOG=1` (or `=trigger`) from `pid` or a process under it: the
    /// worker it belongs to is alive (or asks to be killed).
    fn on_watchdog(&mut self, pid: i32, notice: crate::notify::Notice) {
        if self.settings.limits.worker_timeout.is_none() {
            return;
        }
        let Some(worker) = self.worker_of(pid) else {
            tracing::debug!(pid, "WATCHDOG from a process that is no current worker");
            return;
        };
        let p = self.lc.table.procs.get_mut(&worker).expect("in the table");
        match notice {
            crate::notify::Notice::WatchdogTrigger => {
                tracing::error!(worker = ?p.slot, pid = worker, "worker sent WATCHDOG=trigger");
                let actions = self.lc.hung(worker, Instant::now());
                self.execute(actions);
            }
            _ => {
                if p.handle.beat.is_none() {
                    tracing::info!(
                        worker = ?p.slot,
                        pid = worker,
                        "worker sent WATCHDOG=1: it must repeat it within WATCHDOG_USEC (--worker-timeout)"
                    );
                }
                p.handle.beat = Some(Instant::now());
            }
        }
    }

    /// The worker process `pid` is, or descends from.
    fn worker_of(&self, pid: i32) -> Option<i32> {
        let mut p = pid;
        for _ in 0..16 {
            if let Some(proc) = self.lc.table.procs.get(&p) {
                return proc.slot.is_some().then_some(p);
            }
            match crate::notify::parent_of(p) {
                Some(parent) if parent > 1 => p = parent,
                _ => return None,
            }
        }
        None
    }

    /// The watchdog and the recycling limits, over every serving worker.
    fn check(&mut self) {
        if self.lc.draining() {
            return;
        }
        let now = Instant::now();
        let limits = self.settings.limits.clone();
        let memory = match limits.max_memory {
            Some(_) if self.memory_at.is_none_or(|t| now >= t + MEMORY_EVERY) => {
                self.memory_at = Some(now);
                Some(procs::group_rss())
            }
            _ => None,
        };
        let mut hung = vec![];
        let mut recycle = vec![];
        for (&pid, p) in &self.lc.table.procs {
            let Some(slot) = p.slot else { continue };
            if !p.phase.serving() {
                continue;
            }
            if let (Some(timeout), Some(beat)) = (limits.worker_timeout, p.handle.beat) {
                if now.saturating_duration_since(beat) > timeout {
                    hung.push((slot, pid, now.saturating_duration_since(beat)));
                    continue;
                }
            }
            if p.phase != table::Phase::Ready || self.lc.recycle_pending(pid) {
                continue;
            }
            if let (Some(max), Some(lane)) = (p.handle.max_requests, p.lane) {
                let n = self.metrics.pod.lane_requests(slot, lane).unwrap_or(0);
                if n >= max {
                    recycle.push((
                        pid,
                        Reason::Requests,
                        format!("answered {n} requests (limit {max})"),
                    ));
                    continue;
                }
            }
            if let (Some(max), Some(rss)) = (limits.max_memory, &memory) {
                let used = rss.get(&pid).copied().unwrap_or(0);
                if used > max {
                    recycle.push((
                        pid,
                        Reason::Memory,
                        format!(
                            "its process group holds {} MiB resident (limit {} MiB)",
                            used >> 20,
                            max >> 20
                        ),
                    ));
                    continue;
                }
            }
            if let Some(max) = p.handle.max_lifetime {
                let age = now.saturating_duration_since(p.started);
                if age >= max {
                    recycle.push((
                        pid,
                        Reason::Lifetime,
                        format!("ran {age:.0?} (limit {max:.0?})"),
                    ));
                }
            }
        }
        for (slot, pid, silent) in hung {
            tracing::error!(
                worker = slot,
                pid,
                silent = ?silent,
                timeout = ?limits.worker_timeout.unwrap_or_default(),
                "worker is hung: no heartbeat within --worker-timeout; SIGKILL and replace"
            );
            let actions = self.lc.hung(pid, now);
            self.execute(actions);
        }
        for (pid, reason, why) in recycle {
            if self.lc.recycle(pid, reason, now) {
                let slot = self.lc.table.procs[&pid].slot;
                tracing::info!(worker = ?slot, pid, reason = reason.as_str(), "worker to be recycled: {why}");
            }
        }
    }

    /// A process reported `READY=1`: the worker it is (or descends from) is up.
    fn on_notified_ready(&mut self, pid: i32) {
        let mut p = pid;
        for _ in 0..16 {
            let detect = self.detect;
            if let Some(proc) = self.lc.table.procs.get_mut(&p) {
                if let Some(slot) = proc.slot {
                    if proc.phase == table::Phase::Starting {
                        tracing::info!(worker = slot, pid = p, "worker reported READY=1");
                    }
                    if detect {
                        // `auto`: READY=1 is not enough, the worker must be
                        // seen accepting (gunicorn's master says READY=1
                        // before its worker has loaded the app; puma says
                        // it after binding a port of its own).
                        proc.handle.notified_at.get_or_insert(Instant::now());
                    } else {
                        self.lc.ready(p);
                    }
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

    /// Carries out `actions` (and what they lead to).
    fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                Action::Spawn {
                    slot,
                    context,
                    workers,
                    for_roll,
                } => {
                    if !self.lc.wants_spawn(slot) {
                        continue;
                    }
                    if let Err(e) = self.spawn(slot, context, workers, for_roll) {
                        let err = self.spawner.start_error(e);
                        tracing::error!(worker = slot, "worker could not be started: {err}");
                        queue.extend(self.lc.spawn_failed(slot, for_roll, Instant::now()));
                    }
                }
                Action::Leave { pid } => self.leave(pid),
                Action::Kill { pid } => {
                    let slot = self.lc.table.procs.get(&pid).and_then(|p| p.slot);
                    match slot {
                        Some(w) => {
                            tracing::warn!(worker = w, pid, "outlived --graceful-timeout: SIGKILL")
                        }
                        None => tracing::warn!(
                            pid,
                            "a worker's leftover process outlived --graceful-timeout: SIGKILL"
                        ),
                    }
                    procs::signal_with_group(pid, libc::SIGKILL);
                }
                Action::Restart { slot, delay } => {
                    self.metrics
                        .worker_restarts
                        .with_label_values(&[&slot.to_string()])
                        .inc();
                    if self.settings.policy.restart != Restart::Never && !delay.is_zero() {
                        tracing::info!(worker = slot, delay = ?delay, "restarting worker after backoff");
                    }
                }
                Action::RollDone { change } => {
                    self.metrics.rolls.with_label_values(&["success"]).inc();
                    tracing::info!("rolling restart done");
                    if change {
                        self.on_change_in_force();
                    }
                }
                Action::RollHalted { slot } => {
                    self.metrics.rolls.with_label_values(&["halted"]).inc();
                    tracing::error!(
                        worker = slot,
                        "rolling restart halted: the new worker did not come up; the old workers keep serving with the contexts in force (SIGHUP or the next change tries again)"
                    );
                }
                Action::NotUp { slot, pid } => tracing::error!(
                    worker = slot,
                    pid,
                    timeout = ?self.settings.policy.ready_timeout,
                    "worker not up within --worker-ready-timeout: a failed start"
                ),
                Action::Refused(why) => tracing::warn!("{why}"),
                Action::Recycle { slot, pid, reason } => {
                    self.metrics
                        .worker_recycles
                        .with_label_values(&[&slot.to_string(), reason.as_str()])
                        .inc();
                    tracing::info!(
                        worker = slot,
                        pid,
                        reason = reason.as_str(),
                        "recycling worker: starting its successor; it serves until that one is up"
                    );
                }
                Action::Recycled { slot } => {
                    tracing::info!(
                        worker = slot,
                        "recycled worker's successor is up: the old one leaves"
                    );
                }
                Action::Hung { slot, pid } => {
                    self.metrics
                        .worker_timeouts
                        .with_label_values(&[&slot.to_string()])
                        .inc();
                    tracing::warn!(
                        worker = slot,
                        pid,
                        "killed hung worker (SIGKILL to its process group)"
                    );
                    procs::signal_with_group(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// Keeps `--backlog` in force: an app may call `listen()` again on the
    /// inherited socket with a backlog of its own (uvicorn 2048, gunicorn's
    /// asgi worker 100), which acts on the one socket of every worker. drover
    /// holds the socket too and applies its backlog again, saying so once.
    fn hold_backlog(&mut self) {
        let Some(sockets) = &self.sockets else { return };
        let mut effective = None;
        for l in sockets.all() {
            let Some(now) = l.kernel_backlog() else {
                return;
            };
            let want = l.effective_backlog;
            if now != want {
                match l.relisten(want) {
                    Ok(()) => {
                        if !self.backlog_reapplied {
                            self.backlog_reapplied = true;
                            tracing::warn!(
                                app_backlog = now,
                                backlog = want,
                                "a worker called listen() again with backlog {now}; drover re-applied --backlog {want} (it holds for every worker)"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot re-apply --backlog"),
                }
            }
            let b = l.kernel_backlog().unwrap_or(now);
            effective = Some(effective.map_or(b, |e: u32| e.min(b)));
        }
        if let Some(b) = effective {
            self.metrics.listen_backlog.set(i64::from(b));
        }
    }

    /// The contexts change just rolled is in force.
    fn on_change_in_force(&mut self) {
        if let Some((source, version)) = self.pending_version.take() {
            self.metrics.set_contexts(source, &version);
        }
    }

    /// Starts a process for `slot`.
    fn spawn(
        &mut self,
        slot: usize,
        context: serde_json::Value,
        workers: usize,
        for_roll: bool,
    ) -> std::io::Result<()> {
        let Some(sockets) = &mut self.sockets else {
            return Ok(());
        };
        let (fd, new) = sockets.for_slot(slot)?;
        if let Some(dup) = new {
            self.metrics.pod.watch_listener(dup);
        }
        let lane = self.lc.free_lane(slot);
        self.metrics.pod.lane_started(slot, lane);
        let tx = self.messages_tx.clone();
        let pid_cell = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let cell = pid_cell.clone();
        let started = self
            .spawner
            .spawn(fd, slot, workers, &context, lane, move |m| {
                tx.send(Message::Control(cell.load(Ordering::Acquire), m))
                    .is_ok()
            })?;
        pid_cell.store(started.pid, Ordering::Release);
        let ready = !self.spawner.own() && self.settings.ready_when_running;
        let limits = &self.settings.limits;
        let own = self.spawner.own();
        self.lc.spawned(
            slot,
            started.pid,
            context,
            for_roll,
            lane,
            ready,
            ProcOs {
                ctl: Some(started.ctl),
                stop_unhandled: false,
                notified_at: None,
                leave_deferred: None,
                // drover's own workers beat from the start; an external
                // app is watched once it sent WATCHDOG=1.
                beat: (own && limits.worker_timeout.is_some()).then(Instant::now),
                max_requests: limits
                    .max_requests
                    .filter(|_| own)
                    .map(|(n, j)| n.saturating_add(jitter(j))),
                max_lifetime: limits.max_lifetime.map(|(d, j)| {
                    d + Duration::from_millis(
                        jitter(j.as_millis().min(u128::from(u64::MAX)) as u64),
                    )
                }),
            },
            Instant::now(),
        );
        let w = slot.to_string();
        self.metrics.worker_restarts.with_label_values(&[&w]);
        if limits.worker_timeout.is_some() {
            self.metrics.worker_timeouts.with_label_values(&[&w]);
        }
        for r in Reason::ALL {
            self.metrics
                .worker_recycles
                .with_label_values(&[&w, r.as_str()]);
        }
        let generation = self.lc.table.slots[slot].generation;
        tracing::info!(
            worker = slot,
            pid = started.pid,
            generation,
            "worker started"
        );
        Ok(())
    }

    /// Tells `pid` to leave: drover's own workers stop accepting and finish;
    /// anything else gets `--stop-signal`.
    fn leave(&mut self, pid: i32) {
        // With a socket per slot, a slot whose last process leaves must
        // first take what is queued on its socket: no other worker can.
        // Steering leaves it at the next publish; the process is told once
        // the socket is empty.
        if let (Some(sockets), Some(slot)) = (
            &self.sockets,
            self.lc.table.procs.get(&pid).and_then(|p| p.slot),
        ) {
            let others = self.lc.table.of_slot(slot).any(|(q, p)| {
                q != pid && matches!(p.phase, table::Phase::Starting | table::Phase::Ready)
            });
            if sockets.per_slot() && !others {
                if let Some(p) = self.lc.table.procs.get_mut(&pid) {
                    p.handle.leave_deferred = Some(Instant::now());
                }
                return;
            }
        }
        self.tell_to_leave(pid);
    }

    /// Tells, now, `pid` to leave (see [`Pool::leave`]).
    fn tell_to_leave(&mut self, pid: i32) {
        let stop_signal = self.settings.stop_signal;
        let own = self.spawner.own();
        let Some(p) = self.lc.table.procs.get_mut(&pid) else {
            return;
        };
        p.handle.leave_deferred = None;
        match (&p.handle.ctl, p.slot, own) {
            (Some(ctl), Some(_), true) => ctl.send(ToWorker::StopAccepting),
            _ => {
                // Whether it has a handler for the signal, seen before it
                // gets it: dying of it then means it was cut off (no
                // handler), not that it re-raised it after a graceful stop
                // (uvicorn does).
                p.handle.stop_unhandled = !procs::catches(pid, stop_signal);
                procs::signal(pid, stop_signal);
            }
        }
    }

    /// Whether a process waits for its socket to empty before it is told
    /// to leave.
    fn leaves_deferred(&self) -> bool {
        self.lc
            .table
            .procs
            .values()
            .any(|p| p.handle.leave_deferred.is_some())
    }

    /// Tells the processes waiting for their socket to empty to leave, once
    /// it is (or has not emptied for [`QUEUE_STALL`]). The first 20 ms cover
    /// handshakes that were steered to it before steering left it.
    fn leave_emptied(&mut self) {
        let waiting: Vec<(i32, usize, Instant)> = self
            .lc
            .table
            .procs
            .iter()
            .filter_map(|(&pid, p)| Some((pid, p.slot?, p.handle.leave_deferred?)))
            .collect();
        for (pid, slot, since) in waiting {
            let queued = self.sockets.as_ref().map_or(0, |s| s.queued_for(slot));
            let waited = since.elapsed();
            if (queued == 0 && waited >= Duration::from_millis(20)) || waited >= QUEUE_STALL {
                self.tell_to_leave(pid);
            }
        }
    }

    /// Reaps every exited child. A worker's exit is looked at before it is
    /// reaped: what it left in its process group is told to stop while the
    /// group id is still surely its own; what it left is then adopted.
    fn reap(&mut self) {
        let mut any_worker = false;
        while let Some(pid) = procs::peek_exited() {
            let worker = self.lc.table.procs.get(&pid).and_then(|p| p.slot);
            if worker.is_some() {
                // Its group's id is still the zombie's pid: only its own
                // group can have it.
                crate::sys::kill_group(pid, self.settings.stop_signal);
                any_worker = true;
            }
            let Some(exited) = crate::sys::reap(pid) else {
                break;
            };
            self.exited(exited);
        }
        if any_worker || self.lc.table.procs.values().any(|p| p.slot.is_none()) {
            self.adopt_orphans();
        }
    }

    fn exited(&mut self, exited: crate::sys::Exited) {
        let pid = exited.pid;
        let (how, failed) = match (exited.code, exited.signal) {
            (Some(code), _) => (format!("exit code {code}"), code != 0),
            (None, sig) => (format!("signal {}", sig.unwrap_or(0)), true),
        };
        let (proc, actions) = self.lc.exited(pid, failed, Instant::now());
        match proc {
            None => tracing::debug!(pid, "reaped {how} of an orphaned descendant"),
            Some(p) => match (p.slot, p.phase) {
                (None, _) => tracing::info!(pid, "a worker's leftover process exited ({how})"),
                (Some(slot), phase) => {
                    self.metrics
                        .pod
                        .process_exited(slot, exited.cpu_seconds, p.lane);
                    let generation = p.generation;
                    let stop_signal = self.settings.stop_signal;
                    if exited.signal == Some(stop_signal)
                        && p.handle.stop_unhandled
                        && p.was_up
                        && matches!(phase, table::Phase::Leaving { .. })
                    {
                        // It had no handler for its stop signal: whatever
                        // it was serving was cut, by the app, not by drover.
                        tracing::error!(
                            worker = slot,
                            pid,
                            signal = stop_signal,
                            "worker was killed by --stop-signal (it has no handler for it): requests it was serving were lost; give the app a handler or choose another --stop-signal"
                        );
                        self.lc.note_lost_work();
                    }
                    if self.lc.draining() {
                        tracing::info!(worker = slot, pid, generation, "worker exited ({how})");
                    } else if matches!(phase, table::Phase::Leaving { .. } | table::Phase::Replaced)
                    {
                        tracing::info!(
                            worker = slot,
                            pid,
                            generation,
                            "replaced worker exited ({how})"
                        );
                    } else {
                        tracing::warn!(
                            worker = slot,
                            pid,
                            generation,
                            "worker exited on its own ({how})"
                        );
                    }
                }
            },
        }
        self.execute(actions);
    }

    /// Children of drover that are not in the table were left behind by a
    /// worker (reparented to drover, its subreaper): they get `--stop-signal`
    /// and `--graceful-timeout`.
    fn adopt_orphans(&mut self) {
        let now = Instant::now();
        for pid in procs::children() {
            if !self.lc.table.procs.contains_key(&pid) {
                tracing::info!(
                    pid,
                    "a worker left this process behind: sent it --stop-signal"
                );
                let actions = self.lc.adopt(pid, ProcOs::default(), now);
                self.execute(actions);
            }
        }
    }

    /// Reaps exits (nothing restarts: drain or start-up) until the table is
    /// empty or `until`; deadlines on the way are enforced.
    async fn reap_until(&mut self, until: Instant) {
        while !self.lc.table.procs.is_empty() && Instant::now() < until {
            let next = self.lc.next_wakeup().map_or(until, |t| t.min(until));
            tokio::select! {
                _ = self.sigchld.recv() => self.reap(),
                Some(m) = self.messages.recv() => self.on_message(m),
                _ = tokio::time::sleep_until(next) => {}
            }
            self.settle();
            self.publish();
        }
    }

    /// Nothing drover or its workers started outlives it: SIGKILL to every
    /// descendant left (children first, then the orphans that makes).
    fn sweep(&mut self) {
        for e in procs::kill_descendants(SWEEP_LIMIT) {
            let _ = self.lc.exited(e.pid, true, Instant::now());
            tracing::warn!(pid = e.pid, "killed a process left behind at exit");
        }
    }

    /// Publishes what the table says: readiness, counts, the metrics' view.
    fn publish(&self) {
        if let Some(sockets) = self.sockets.as_ref().filter(|s| s.per_slot()) {
            // The steering thread acts only when this changes.
            let t = &self.lc.table;
            let up: Vec<usize> = t
                .active_slots()
                .filter(|&s| !t.slots[s].retiring && t.serves(s))
                .collect();
            sockets.steer_over(&up);
        }
        let t = &self.lc.table;
        self.workers_up
            .store(t.all_up() && !self.lc.draining(), Ordering::Release);
        self.metrics.workers_running.set(t.workers_alive() as i64);
        self.metrics.workers_desired.set(t.desired() as i64);
        self.metrics.pod.publish(t.view().into());
    }
}

impl Serving for Pool {
    fn announce(&mut self) {
        self.lc.begin_drain();
        self.workers_up.store(false, Ordering::Release);
        if self.spawner.own() {
            for p in self.lc.table.procs.values() {
                if let Some(ctl) = &p.handle.ctl {
                    ctl.send(ToWorker::Draining);
                }
            }
        }
    }

    async fn keep_serving(&mut self, until: Instant) {
        while Instant::now() < until {
            tokio::select! {
                _ = self.sigchld.recv() => self.reap(),
                Some(m) = self.messages.recv() => self.on_message(m),
                _ = tokio::time::sleep_until(until) => {}
            }
            self.publish();
        }
    }

    async fn stop_accepting(&mut self, deadline: Instant) {
        self.metrics.pod.forget_listener();
        if let Some(l) = self.sockets.take() {
            if let Err(e) = l.stop_new() {
                tracing::warn!(error = %e, "cannot shut new connections out of the workers' socket");
            }
            if !self.spawner.own() {
                // An external worker told to stop exits without emptying the
                // accept queue (gunicorn, uvicorn): let the workers, still
                // accepting, take every queued connection first. Nothing new
                // can join the queue, so it only shrinks.
                self.wait_queue_empty(&l, deadline).await;
            }
        }
        // A removed worker still waiting for its socket to empty was waited
        // for above with the rest: it is told now (the rules see it leaving
        // already and ask for nothing more).
        let deferred: Vec<i32> = self
            .lc
            .table
            .procs
            .iter()
            .filter(|(_, p)| p.handle.leave_deferred.is_some())
            .map(|(&pid, _)| pid)
            .collect();
        for pid in deferred {
            self.tell_to_leave(pid);
        }
        let actions = self.lc.stop_accepting(deadline);
        self.execute(actions);
    }

    async fn finish(&mut self, deadline: Instant) -> bool {
        self.reap_until(deadline).await;
        self.lc.table.procs.is_empty() && !self.lc.killed_in_drain()
    }

    async fn kill_rest(&mut self) {
        let left: Vec<i32> = self.lc.table.procs.keys().copied().collect();
        if !left.is_empty() {
            tracing::warn!(pids = ?left, "outlived --graceful-timeout: SIGKILL");
        }
        let actions = self.lc.kill_all(Instant::now());
        for a in actions {
            if let Action::Kill { pid } = a {
                procs::signal_with_group(pid, libc::SIGKILL);
            }
        }
        self.reap_until(Instant::now() + SWEEP_LIMIT).await;
    }

    fn sweep(&mut self) {
        Pool::sweep(self);
        self.publish();
    }
}

impl Pool {
    /// Waits until the accept queue is empty, but only while it shrinks: a
    /// queue that has not shrunk for a while (no worker accepts: a server
    /// started without its socket flag, a hung one) must not use up
    /// `--graceful-timeout` that work in flight needs.
    async fn wait_queue_empty(&mut self, l: &Sockets, deadline: Instant) {
        let Some(first) = l.queued() else { return };
        if first == 0 {
            return;
        }
        tracing::info!(
            queued = first,
            "letting the workers accept the connections already queued"
        );
        let stall = (self.settings.policy.graceful / 4).min(QUEUE_STALL);
        let (mut last, mut moved) = (first, Instant::now());
        while Instant::now() < deadline && self.lc.table.workers_alive() > 0 {
            let now = l.queued().unwrap_or(0);
            if now == 0 {
                return;
            }
            if now < last {
                (last, moved) = (now, Instant::now());
            } else if moved.elapsed() >= stall {
                tracing::warn!(
                    queued = now,
                    "the accept queue has not shrunk for {stall:?}: no worker is accepting; stopping the workers anyway"
                );
                return;
            }
            tokio::select! {
                _ = self.sigchld.recv() => self.reap(),
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
