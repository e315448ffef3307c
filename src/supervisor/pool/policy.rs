//! The pool's rules as a pure state machine over the [process table]:
//! whether and when a worker is restarted (policy and backoff, failed starts
//! included), how a roll replaces one worker at a time and halts when a
//! replacement fails, what SIGTTIN, SIGTTOU and a contexts change do to the
//! slots, when a starting worker has taken too long, what the drain tells
//! each process, when something overdue is killed, and when the pool is
//! over. Each entry point takes the time and returns [`Action`]s; the event
//! loop (`pool`) carries them out. Nothing here makes a system call, so a
//! test can drive any sequence of events (see the model test below).
//!
//! # Rolls
//! A roll (SIGHUP, a contexts change) replaces one worker at a time: the old
//! process keeps serving ([`Phase::Replaced`]) until its successor is up,
//! so a roll never lowers capacity. A change that adds workers starts them
//! at once; one that removes workers retires them only once every other
//! part of the change is up. If a process started for the roll exits before
//! it is up, cannot be started, or is not up within `--worker-ready-timeout`,
//! the roll **halts**: the replaced process serves on, workers the change
//! added leave, workers it would have removed stay, every slot keeps the
//! context in force, and the next change — or SIGHUP, which retries the
//! halted change — tries again.
//!
//! # Recycling and the watchdog
//! A worker over a limit (`--max-requests`, `--max-worker-memory`,
//! `--max-worker-lifetime`) is *recycled*: queued, then replaced by a roll of
//! that one slot, exactly as SIGHUP replaces each worker (its successor is
//! up before it leaves; a successor that fails halts the roll and the old
//! worker serves on). Queued recycles start one at a time, only when no roll
//! is in progress, and never during the drain, so recycling never takes two
//! workers out at once. A worker whose heartbeat stopped (`--worker-timeout`,
//! sd_notify's `WATCHDOG=1`) is *hung*: it is SIGKILLed with its group at
//! once and its slot restarts like after a crash.
//!
//! [process table]: super::table

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::table::{BackoffLimits, Phase, Pid, Proc, Slot, Table};
use crate::config::{Restart, MAX_WORKERS};

/// Settings the rules need.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `--restart`.
    pub restart: Restart,
    /// `--graceful-timeout`: how long a leaving process has.
    pub graceful: Duration,
    /// `--worker-ready-timeout`: how long a process may take to come up.
    pub ready_timeout: Duration,
    /// Restart backoff.
    pub backoff: BackoffLimits,
    /// In-flight lanes per slot in the metrics region.
    pub lanes: usize,
}

/// Why a worker is recycled (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `--max-requests`.
    Requests,
    /// `--max-worker-memory`.
    Memory,
    /// `--max-worker-lifetime`.
    Lifetime,
}

impl Reason {
    /// Every reason, for pre-created metrics.
    pub const ALL: [Reason; 3] = [Reason::Requests, Reason::Memory, Reason::Lifetime];

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Requests => "requests",
            Reason::Memory => "memory",
            Reason::Lifetime => "lifetime",
        }
    }
}

/// After a recycle whose successor failed, the same process is not queued
/// again for this long.
pub const RECYCLE_RETRY: Duration = Duration::from_secs(10);

/// What the event loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a process for `slot` with `context`, telling it the pod runs
    /// `workers` (then report [`Lifecycle::spawned`] or
    /// [`Lifecycle::spawn_failed`]).
    Spawn {
        /// The slot.
        slot: usize,
        /// Its context.
        context: Value,
        /// `DROVER_WORKERS`.
        workers: usize,
        /// Started for a roll (its failure halts the roll).
        for_roll: bool,
    },
    /// Tell `pid` to leave: stop accepting and finish (drover's own
    /// workers), else `--stop-signal`.
    Leave {
        /// The process.
        pid: Pid,
    },
    /// SIGKILL `pid` and its process group: its deadline passed.
    Kill {
        /// The process.
        pid: Pid,
    },
    /// Slot `slot` restarts after `delay` (log and count it).
    Restart {
        /// The slot.
        slot: usize,
        /// Its backoff.
        delay: Duration,
    },
    /// `pid` of `slot` was not up within `--worker-ready-timeout`.
    NotUp {
        /// The slot.
        slot: usize,
        /// The process.
        pid: Pid,
    },
    /// A roll finished: every worker it named was replaced and is up.
    RollDone {
        /// It applied a contexts change (now in force).
        change: bool,
    },
    /// A roll halted: a process it started for `slot` did not come up.
    RollHalted {
        /// The slot.
        slot: usize,
    },
    /// A request was refused (log it).
    Refused(&'static str),
    /// Recycling of `pid` (worker `slot`) begins: its successor starts now
    /// (log and count it).
    Recycle {
        /// The slot.
        slot: usize,
        /// The process being recycled.
        pid: Pid,
        /// Why.
        reason: Reason,
    },
    /// The successor of a recycled worker is up; the old one leaves.
    Recycled {
        /// The slot.
        slot: usize,
    },
    /// `pid` of `slot` stopped heart-beating: SIGKILL it and its group
    /// (log and count it); its slot restarts like after a crash.
    Hung {
        /// The slot.
        slot: usize,
        /// The process.
        pid: Pid,
    },
}

/// A roll in progress.
#[derive(Debug, Clone)]
struct Roll {
    /// Slots still to replace, in order (the one being replaced now is the
    /// slot with a [`Phase::Replaced`] process).
    queue: VecDeque<usize>,
    /// The contexts change it applies, if any (None: SIGHUP).
    change: Option<Change>,
    /// It recycles one worker (a SIGHUP or a change during it makes it an
    /// ordinary roll).
    recycle: bool,
}

/// A contexts change being applied.
#[derive(Debug, Clone)]
struct Change {
    contexts: Vec<Value>,
    per_worker: bool,
}

/// The pool's state: the table, the roll in progress, the drain.
#[derive(Debug)]
pub struct Lifecycle<H> {
    /// The rules' settings.
    pub policy: Policy,
    /// The one process table.
    pub table: Table<H>,
    roll: Option<Roll>,
    /// The last change whose roll halted: SIGHUP retries it.
    halted: Option<Change>,
    /// The worker count in force (`DROVER_WORKERS` of a restart).
    workers: usize,
    /// The stop flag is set: nothing is started any more.
    draining: bool,
    /// The contexts in force give one item per worker (they fix the count).
    per_worker: bool,
    /// Something was SIGKILLed, or killed by `--stop-signal`, during the
    /// drain (exit code 1).
    lost_in_drain: bool,
    /// Once accepting stopped: nothing lives past this.
    drain_deadline: Option<Instant>,
    /// Processes to recycle, in order, one at a time.
    recycles: VecDeque<(Pid, Reason)>,
    /// Processes whose recycle halted: not queued again before the time.
    recycle_retry: std::collections::BTreeMap<Pid, Instant>,
}

impl<H> Lifecycle<H> {
    /// A pool of one slot per context, all to be started at `now`.
    pub fn new(policy: Policy, contexts: &[Value], per_worker: bool, now: Instant) -> Self {
        Lifecycle {
            policy,
            table: Table::new(contexts, now),
            roll: None,
            halted: None,
            workers: contexts.len(),
            draining: false,
            per_worker,
            lost_in_drain: false,
            drain_deadline: None,
            recycles: VecDeque::new(),
            recycle_retry: Default::default(),
        }
    }

    /// Whether a recycle is in progress.
    pub fn recycling(&self) -> bool {
        self.roll.as_ref().is_some_and(|r| r.recycle)
    }

    /// Asks for `pid` to be recycled for `reason`: queued if it is a worker
    /// that is up and not already queued; true if it was queued now.
    pub fn recycle(&mut self, pid: Pid, reason: Reason, now: Instant) -> bool {
        if self.draining || self.recycles.iter().any(|&(q, _)| q == pid) {
            return false;
        }
        if self.recycle_retry.get(&pid).is_some_and(|&t| t > now) {
            return false;
        }
        let Some(p) = self.table.procs.get(&pid) else {
            return false;
        };
        if p.phase != Phase::Ready || p.slot.is_none() {
            return false;
        }
        self.recycles.push_back((pid, reason));
        true
    }

    /// Whether `pid` is queued for recycling or being recycled.
    pub fn recycle_pending(&self, pid: Pid) -> bool {
        self.recycles.iter().any(|&(q, _)| q == pid)
            || (self.recycling()
                && self
                    .table
                    .procs
                    .get(&pid)
                    .is_some_and(|p| p.phase == Phase::Replaced))
    }

    /// `pid` stopped heart-beating (`--worker-timeout`, `WATCHDOG=1`): a
    /// worker that serves is killed now, and its slot restarts as after a
    /// crash (a replaced one's successor is already there).
    pub fn hung(&mut self, pid: Pid, now: Instant) -> Vec<Action> {
        let Some(p) = self.table.procs.get_mut(&pid) else {
            return vec![];
        };
        let Some(slot) = p.slot else { return vec![] };
        if !p.phase.serving() || self.draining {
            return vec![];
        }
        let was = p.phase;
        p.phase = Phase::Leaving {
            deadline: now,
            killed: true,
        };
        let ran = now.saturating_duration_since(p.started);
        self.recycles.retain(|&(q, _)| q != pid);
        let mut actions = vec![Action::Hung { slot, pid }];
        if was == Phase::Ready {
            actions.extend(self.failed(slot, ran, true, now));
        }
        actions
    }

    /// Starts the next queued recycle, when no roll is in progress.
    fn start_recycle(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.draining || self.roll.is_some() {
            return;
        }
        let replacing = (0..self.table.slots.len()).any(|i| self.table.replaced(i).is_some());
        if replacing {
            return;
        }
        while let Some((pid, reason)) = self.recycles.pop_front() {
            let Some(p) = self.table.procs.get(&pid) else {
                continue;
            };
            let Some(slot) = p.slot else { continue };
            if p.phase != Phase::Ready
                || self.table.slots[slot].removed
                || self.recycle_retry.get(&pid).is_some_and(|&t| t > now)
            {
                continue;
            }
            self.roll = Some(Roll {
                queue: VecDeque::from([slot]),
                change: None,
                recycle: true,
            });
            actions.push(Action::Recycle { slot, pid, reason });
            return;
        }
    }

    /// Whether a roll is in progress.
    pub fn rolling(&self) -> bool {
        self.roll.is_some()
    }

    /// Whether a contexts change is being rolled out.
    fn changing(&self) -> bool {
        self.roll.as_ref().is_some_and(|r| r.change.is_some())
    }

    /// Whether the drain has begun.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether something was killed during the drain.
    pub fn killed_in_drain(&self) -> bool {
        self.lost_in_drain
    }

    /// The drain lost work some other way (a worker killed by its stop
    /// signal): the exit code is 1.
    pub fn note_lost_work(&mut self) {
        self.lost_in_drain |= self.draining;
    }

    /// A process for `slot` was started as `pid` with `context`; `ready`
    /// when it counts as up at once (`--worker-ready running`).
    #[allow(clippy::too_many_arguments)]
    pub fn spawned(
        &mut self,
        slot: usize,
        pid: Pid,
        context: Value,
        for_roll: bool,
        lane: Option<usize>,
        ready: bool,
        handle: H,
        now: Instant,
    ) {
        let s = &mut self.table.slots[slot];
        s.generation += 1;
        s.restart_at = None;
        let generation = s.generation;
        self.table.procs.insert(
            pid,
            Proc {
                slot: Some(slot),
                generation,
                phase: if ready { Phase::Ready } else { Phase::Starting },
                lane,
                started: now,
                context,
                for_roll,
                was_up: ready,
                handle,
            },
        );
    }

    /// A start of `slot` failed (fork or exec): it counts as a run of no
    /// length, so it backs off like a crash (it was once retried at once).
    pub fn spawn_failed(&mut self, slot: usize, for_roll: bool, now: Instant) -> Vec<Action> {
        let mut actions = vec![];
        if for_roll {
            actions.extend(self.halt(slot, now));
        }
        actions.extend(self.failed(slot, Duration::ZERO, true, now));
        actions
    }

    /// The current process of `slot` ended (or never began) after `ran`:
    /// restart it, with backoff, if the policy says so.
    fn failed(&mut self, slot: usize, ran: Duration, failed: bool, now: Instant) -> Vec<Action> {
        let s = &mut self.table.slots[slot];
        s.last_failed = failed;
        let restart = match self.policy.restart {
            Restart::Always => true,
            Restart::OnFailure => failed,
            Restart::Never => false,
        };
        if !restart || self.draining || s.removed || self.table.current(slot).is_some() {
            return vec![];
        }
        let s = &mut self.table.slots[slot];
        let delay = s.backoff.next_delay(ran, &self.policy.backoff);
        s.restart_at = Some(now + delay);
        vec![Action::Restart { slot, delay }]
    }

    /// Lanes a new process of `slot` may take.
    pub fn free_lane(&self, slot: usize) -> Option<usize> {
        self.table.free_lane(slot, self.policy.lanes)
    }

    /// `pid` says it is up. A process started with its slot's new context
    /// puts that context in force.
    pub fn ready(&mut self, pid: Pid) {
        let Some(p) = self.table.procs.get_mut(&pid) else {
            return;
        };
        if p.phase != Phase::Starting {
            return;
        }
        p.phase = Phase::Ready;
        p.was_up = true;
        if let Some(slot) = p.slot {
            let s = &mut self.table.slots[slot];
            if s.target.as_ref() == Some(&p.context) {
                s.context = s.target.take().expect("just compared");
            }
        }
    }

    /// Whether a [`Action::Spawn`] for `slot` still stands (an action
    /// carried out earlier in the same batch may have removed the slot).
    pub fn wants_spawn(&self, slot: usize) -> bool {
        !self.draining && !self.table.slots[slot].removed && self.table.current(slot).is_none()
    }

    /// `pid` was reaped; returns its entry (None if it was not in the table)
    /// and what follows.
    pub fn exited(
        &mut self,
        pid: Pid,
        failed: bool,
        now: Instant,
    ) -> (Option<Proc<H>>, Vec<Action>) {
        let Some(proc) = self.table.procs.remove(&pid) else {
            return (None, vec![]);
        };
        self.recycle_retry.remove(&pid);
        self.recycles.retain(|&(q, _)| q != pid);
        let mut actions = vec![];
        if let Some(slot) = proc.slot {
            if proc.phase == Phase::Starting && proc.for_roll {
                actions.extend(self.halt(slot, now));
            }
            if matches!(proc.phase, Phase::Starting | Phase::Ready) {
                let ran = now.saturating_duration_since(proc.started);
                actions.extend(self.failed(slot, ran, failed, now));
            }
        }
        (Some(proc), actions)
    }

    /// A descendant a worker left behind became drover's child: it is told
    /// to leave and has `--graceful-timeout` (in a drain: at most until the
    /// drain's deadline).
    pub fn adopt(&mut self, pid: Pid, handle: H, now: Instant) -> Vec<Action> {
        if self.table.procs.contains_key(&pid) {
            return vec![];
        }
        let mut deadline = now + self.policy.graceful;
        if let Some(d) = self.drain_deadline {
            deadline = deadline.min(d);
        }
        self.table.procs.insert(
            pid,
            Proc {
                slot: None,
                generation: 0,
                phase: Phase::Leaving {
                    deadline,
                    killed: false,
                },
                lane: None,
                started: now,
                context: Value::Null,
                for_roll: false,
                was_up: false,
                handle,
            },
        );
        vec![Action::Leave { pid }]
    }

    /// SIGHUP: replace every worker, one at a time; after a halted change,
    /// try that change again.
    pub fn hup(&mut self, now: Instant) -> Vec<Action> {
        if self.draining {
            return vec![];
        }
        if let Some(change) = self.halted.take() {
            return self.contexts_changed(&change.contexts, change.per_worker, now);
        }
        let queue = self.table.active_slots().collect();
        match &mut self.roll {
            // A change (or a recycle) in progress goes on, now over every
            // worker.
            Some(r) => {
                r.queue = queue;
                r.recycle = false;
            }
            None => {
                self.roll = Some(Roll {
                    queue,
                    change: None,
                    recycle: false,
                })
            }
        }
        vec![]
    }

    /// SIGTTIN: one more worker (gunicorn's convention).
    pub fn add_worker(&mut self, now: Instant) -> Vec<Action> {
        if self.draining {
            return vec![];
        }
        if self.per_worker {
            return vec![Action::Refused(
                "SIGTTIN ignored: the contexts give one item per worker, so they fix the count",
            )];
        }
        if self.changing() {
            return vec![Action::Refused(
                "SIGTTIN ignored: a contexts change is being rolled out",
            )];
        }
        if self.table.desired() >= MAX_WORKERS {
            return vec![Action::Refused(
                "SIGTTIN ignored: 1024 workers is the most one drover runs",
            )];
        }
        let context = self.table.slots[0].context.clone();
        match self.table.slots.iter().position(|s| s.removed) {
            Some(i) => self.table.slots[i].revive(context, now),
            None => self.table.slots.push(Slot::new(context, now)),
        }
        self.workers = self.table.desired();
        vec![]
    }

    /// SIGTTOU: one worker fewer, never below one.
    pub fn remove_worker(&mut self, now: Instant) -> Vec<Action> {
        if self.draining {
            return vec![];
        }
        if self.per_worker {
            return vec![Action::Refused(
                "SIGTTOU ignored: the contexts give one item per worker, so they fix the count",
            )];
        }
        if self.changing() {
            return vec![Action::Refused(
                "SIGTTOU ignored: a contexts change is being rolled out",
            )];
        }
        let active: Vec<usize> = self.table.active_slots().collect();
        if active.len() <= 1 {
            return vec![Action::Refused(
                "SIGTTOU ignored: one worker is the minimum",
            )];
        }
        let a = self.remove_slot(active[active.len() - 1], now);
        self.workers = self.table.desired();
        a
    }

    /// Takes `slot` out of the pool: every process of it leaves, the one
    /// being replaced and its successor alike.
    fn remove_slot(&mut self, slot: usize, now: Instant) -> Vec<Action> {
        let s = &mut self.table.slots[slot];
        s.removed = true;
        s.added = false;
        s.retiring = false;
        s.target = None;
        s.restart_at = None;
        if let Some(r) = &mut self.roll {
            r.queue.retain(|&q| q != slot);
        }
        let deadline = now + self.policy.graceful;
        self.leave_where(|p| p.slot == Some(slot), deadline)
    }

    /// Every process matching `which` that is not leaving yet leaves, with
    /// `deadline` (an earlier deadline already set is kept).
    fn leave_where(&mut self, which: impl Fn(&Proc<H>) -> bool, deadline: Instant) -> Vec<Action> {
        let mut actions = vec![];
        for (&pid, p) in self.table.procs.iter_mut().filter(|(_, p)| which(p)) {
            match &mut p.phase {
                Phase::Leaving { deadline: d, .. } => *d = (*d).min(deadline),
                phase => {
                    *phase = Phase::Leaving {
                        deadline,
                        killed: false,
                    };
                    actions.push(Action::Leave { pid });
                }
            }
        }
        actions
    }

    /// New contexts: rolled to the workers whose context changed (all, if
    /// the count changed, since `DROVER_WORKERS` did), one at a time;
    /// workers the change adds start now, workers it removes leave once the
    /// rest is up. A change that arrives during a roll takes over from it.
    pub fn contexts_changed(
        &mut self,
        contexts: &[Value],
        per_worker: bool,
        now: Instant,
    ) -> Vec<Action> {
        if self.draining || contexts.is_empty() {
            return vec![];
        }
        self.halted = None;
        let mut actions = vec![];
        let resized = self.workers != contexts.len();
        // Undo what an earlier change in progress added or retired.
        for i in 0..self.table.slots.len() {
            let s = &mut self.table.slots[i];
            s.retiring = false;
            if s.added && i >= contexts.len() {
                actions.extend(self.remove_slot(i, now));
            }
        }
        let mut queue = VecDeque::new();
        for (i, ctx) in contexts.iter().enumerate() {
            match self.table.slots.get_mut(i) {
                Some(s) if s.removed => {
                    s.revive(ctx.clone(), now);
                    s.added = true;
                }
                Some(s) if s.added => {
                    // Not in force yet: its next start takes the new one.
                    if s.context != *ctx {
                        s.context = ctx.clone();
                        queue.push_back(i);
                    }
                }
                Some(s) => {
                    s.target = (s.context != *ctx || resized).then(|| ctx.clone());
                    if s.target.is_some() {
                        queue.push_back(i);
                    }
                }
                None => {
                    let mut s = Slot::new(ctx.clone(), now);
                    s.added = true;
                    self.table.slots.push(s);
                }
            }
        }
        for i in contexts.len()..self.table.slots.len() {
            let s = &mut self.table.slots[i];
            if !s.removed {
                s.retiring = true;
                s.target = None;
            }
        }
        self.roll = Some(Roll {
            queue,
            change: Some(Change {
                contexts: contexts.to_vec(),
                per_worker,
            }),
            recycle: false,
        });
        actions
    }

    /// The count the workers are told (`DROVER_WORKERS`): the change's while
    /// one is rolled, else the one in force.
    fn workers_for(&self, for_roll: bool) -> usize {
        match &self.roll {
            Some(Roll {
                change: Some(c), ..
            }) if for_roll => c.contexts.len(),
            _ => self.workers,
        }
    }

    /// Brings the pool forward at `now`: processes that are not up in time,
    /// the roll, due starts, overdue processes. Called after every event.
    pub fn settle(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = vec![];
        self.time_out_starts(now, &mut actions);
        if !self.draining {
            self.start_recycle(now, &mut actions);
            self.advance_roll(now, &mut actions);
            if self.roll.is_none() && !self.recycles.is_empty() {
                self.start_recycle(now, &mut actions);
                self.advance_roll(now, &mut actions);
            }
            for slot in 0..self.table.slots.len() {
                let s = &self.table.slots[slot];
                if s.removed || s.restart_at.is_none_or(|t| t > now) {
                    continue;
                }
                if self.table.current(slot).is_none() {
                    let s = &mut self.table.slots[slot];
                    s.restart_at = None;
                    // A start with the change's context, or of a worker the
                    // change added, is part of the roll.
                    let (context, for_roll) = match &s.target {
                        Some(t) => (t.clone(), true),
                        None => (s.context.clone(), s.added),
                    };
                    actions.push(Action::Spawn {
                        slot,
                        context,
                        workers: self.workers_for(for_roll),
                        for_roll,
                    });
                }
            }
        }
        for (&pid, p) in self.table.procs.iter_mut() {
            if let Phase::Leaving {
                deadline,
                killed: killed @ false,
            } = &mut p.phase
            {
                if *deadline <= now {
                    *killed = true;
                    self.lost_in_drain |= self.draining;
                    actions.push(Action::Kill { pid });
                }
            }
        }
        actions
    }

    /// A process still starting past `--worker-ready-timeout` is a failed
    /// start: it leaves, its slot backs off, a roll it was started for halts.
    fn time_out_starts(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let late: Vec<(Pid, usize, bool)> = self
            .table
            .procs
            .iter()
            .filter(|(_, p)| {
                p.phase == Phase::Starting && p.started + self.policy.ready_timeout <= now
            })
            .filter_map(|(&pid, p)| p.slot.map(|s| (pid, s, p.for_roll)))
            .collect();
        for (pid, slot, for_roll) in late {
            actions.push(Action::NotUp { slot, pid });
            let deadline = now + self.policy.graceful;
            self.table.procs.get_mut(&pid).expect("in the table").phase = Phase::Leaving {
                deadline,
                killed: false,
            };
            actions.push(Action::Leave { pid });
            if for_roll {
                actions.extend(self.halt(slot, now));
            }
            actions.extend(self.failed(slot, Duration::ZERO, true, now));
        }
    }

    /// A process started for the roll did not come up: the roll stops, and
    /// the pool returns to the contexts in force.
    fn halt(&mut self, slot: usize, now: Instant) -> Vec<Action> {
        let Some(roll) = self.roll.take() else {
            return vec![];
        };
        if roll.recycle {
            // The recycled process serves on; it is not queued again at once.
            if let Some(old) = self.table.replaced(slot) {
                self.recycle_retry.insert(old, now + RECYCLE_RETRY);
            }
        }
        let mut actions = vec![Action::RollHalted { slot }];
        // What the roll started and is not up yet leaves; a slot that has
        // no old process to fall back on starts again with its context in
        // force.
        let deadline = now + self.policy.graceful;
        let booting: Vec<(Pid, Option<usize>)> = self
            .table
            .procs
            .iter()
            .filter(|(_, p)| p.for_roll && p.phase == Phase::Starting)
            .map(|(&pid, p)| (pid, p.slot))
            .collect();
        for (pid, s) in booting {
            self.table.procs.get_mut(&pid).expect("in the table").phase = Phase::Leaving {
                deadline,
                killed: false,
            };
            actions.push(Action::Leave { pid });
            if let Some(s) = s {
                if self.table.replaced(s).is_none() && !self.table.slots[s].removed {
                    self.table.slots[s].restart_at.get_or_insert(now);
                }
            }
        }
        for i in 0..self.table.slots.len() {
            let s = &mut self.table.slots[i];
            s.target = None;
            s.retiring = false;
            if s.added && !s.removed {
                actions.extend(self.remove_slot(i, now));
            }
        }
        for p in self.table.procs.values_mut() {
            if p.phase == Phase::Replaced {
                p.phase = Phase::Ready;
            }
        }
        if roll.change.is_some() {
            self.halted = roll.change;
        }
        actions
    }

    /// One step of the roll: a replaced process leaves once its successor is
    /// up; then the next slot's process is replaced; at the end, the change
    /// is in force.
    fn advance_roll(&mut self, now: Instant, actions: &mut Vec<Action>) {
        loop {
            let Some(roll) = &mut self.roll else { return };
            let replacing = (0..self.table.slots.len())
                .find_map(|i| self.table.replaced(i).map(|pid| (i, pid)));
            if let Some((slot, old)) = replacing {
                let Some(new) = self.table.current(slot) else {
                    // Its successor is gone without a halt (it was told to
                    // leave by a newer change): the old one serves on.
                    self.table.procs.get_mut(&old).expect("in the table").phase = Phase::Ready;
                    continue;
                };
                if self.table.procs[&new].phase != Phase::Ready {
                    return; // Booting: wait for it.
                }
                let deadline = now + self.policy.graceful;
                self.table.procs.get_mut(&old).expect("in the table").phase = Phase::Leaving {
                    deadline,
                    killed: false,
                };
                if roll.recycle {
                    actions.push(Action::Recycled { slot });
                }
                actions.push(Action::Leave { pid: old });
                let s = &mut self.table.slots[slot];
                s.context = self.table.procs[&new].context.clone();
                if s.target.as_ref() == Some(&s.context) {
                    s.target = None;
                }
                continue;
            }
            let Some(slot) = roll.queue.pop_front() else {
                // A slot that is not running and will not be restarted
                // (`--restart`) takes its new context for whenever it runs.
                for i in 0..self.table.slots.len() {
                    let idle = self.table.current(i).is_none() && self.table.replaced(i).is_none();
                    let s = &mut self.table.slots[i];
                    if idle && s.restart_at.is_none() {
                        if let Some(t) = s.target.take() {
                            s.context = t;
                        }
                    }
                }
                // Replacements done: the workers the change added, and those
                // started afresh with its context, must be up.
                let waiting = self.table.active_slots().any(|i| {
                    let s = &self.table.slots[i];
                    let booting = self
                        .table
                        .current(i)
                        .is_some_and(|p| self.table.procs[&p].phase != Phase::Ready);
                    s.target.is_some() || (s.added && (booting || s.restart_at.is_some()))
                });
                if waiting {
                    return;
                }
                let roll = self.roll.take().expect("rolling");
                for i in 0..self.table.slots.len() {
                    if self.table.slots[i].retiring {
                        actions.extend(self.remove_slot(i, now));
                    }
                    let s = &mut self.table.slots[i];
                    s.added = false;
                    s.target = None;
                }
                if let Some(change) = &roll.change {
                    self.per_worker = change.per_worker;
                    self.workers = change.contexts.len();
                }
                if !roll.recycle {
                    actions.push(Action::RollDone {
                        change: roll.change.is_some(),
                    });
                }
                return;
            };
            let s = &self.table.slots[slot];
            // Removed, or already given the change's context (a restart
            // after a crash took it): nothing to do.
            if s.removed || (roll.change.is_some() && s.target.is_none()) {
                continue;
            }
            let context = {
                let s = &self.table.slots[slot];
                s.target.clone().unwrap_or_else(|| s.context.clone())
            };
            match self.table.current(slot) {
                Some(pid) if self.table.procs[&pid].phase == Phase::Ready => {
                    // Keep it serving until its successor is up.
                    self.table.procs.get_mut(&pid).expect("in the table").phase = Phase::Replaced;
                    actions.push(Action::Spawn {
                        slot,
                        context,
                        workers: self.workers_for(true),
                        for_roll: true,
                    });
                    return;
                }
                Some(pid) => {
                    // Not up yet: nothing to keep serving, so nothing to
                    // wait for; start afresh with the new context.
                    let deadline = now + self.policy.graceful;
                    self.table.procs.get_mut(&pid).expect("in the table").phase = Phase::Leaving {
                        deadline,
                        killed: false,
                    };
                    actions.push(Action::Leave { pid });
                    self.adopt_target(slot, now);
                }
                None => self.adopt_target(slot, now),
            }
        }
    }

    /// A slot with no process to keep serving starts now with its new
    /// context (its backoff goes on if it keeps failing); it is in force
    /// once that process is up.
    fn adopt_target(&mut self, slot: usize, now: Instant) {
        self.table.slots[slot].restart_at = Some(now);
    }

    /// The stop flag is set: nothing starts any more, the roll ends.
    pub fn begin_drain(&mut self) {
        self.draining = true;
        self.roll = None;
        self.recycles.clear();
        for s in &mut self.table.slots {
            s.restart_at = None;
        }
    }

    /// Accepting stops: every process that has not been told yet leaves now,
    /// and nothing lives past `deadline`.
    pub fn stop_accepting(&mut self, deadline: Instant) -> Vec<Action> {
        self.drain_deadline = Some(deadline);
        self.leave_where(|_| true, deadline)
    }

    /// SIGKILL to everything still alive (the drain ran out of time, or
    /// start-up failed).
    pub fn kill_all(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = vec![];
        for (&pid, p) in self.table.procs.iter_mut() {
            let deadline = match p.phase {
                Phase::Leaving { deadline, .. } => deadline,
                _ => now,
            };
            p.phase = Phase::Leaving {
                deadline,
                killed: true,
            };
            self.lost_in_drain |= self.draining;
            actions.push(Action::Kill { pid });
        }
        actions
    }

    /// When the loop must wake up next: a due start, a start that may time
    /// out, or a deadline.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let starts = self
            .table
            .slots
            .iter()
            .filter(|s| !s.removed && !self.draining)
            .filter_map(|s| s.restart_at);
        let timeouts = self
            .table
            .procs
            .values()
            .filter(|p| p.phase == Phase::Starting && p.slot.is_some())
            .map(|p| p.started + self.policy.ready_timeout);
        starts
            .chain(timeouts)
            .chain(self.table.next_deadline())
            .min()
    }

    /// With `--restart never` or `on-failure` every worker can be gone for
    /// good: then the pool is over, like tini when its child exits: exit 0 if
    /// the last run of every worker succeeded, else 1.
    pub fn over(&self) -> Option<bool> {
        let pending = self
            .table
            .slots
            .iter()
            .any(|s| !s.removed && s.restart_at.is_some());
        if pending || !self.table.procs.is_empty() || self.draining {
            return None;
        }
        Some(self.table.slots.iter().any(|s| s.last_failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn policy(restart: Restart) -> Policy {
        Policy {
            restart,
            graceful: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(60),
            backoff: BackoffLimits::default(),
            lanes: 4,
        }
    }

    /// A pool driven the way the event loop drives it: spawns succeed with
    /// fresh pids (or fail when `fail_spawns`), kills end the process at once.
    struct Harness {
        lc: Lifecycle<()>,
        now: Instant,
        next_pid: Pid,
        fail_spawns: bool,
        /// Every pid that ever left the table.
        gone: std::collections::BTreeSet<Pid>,
        /// Recycles begun.
        recycles: usize,
    }

    impl Harness {
        fn new(restart: Restart, n: usize, per_worker: bool) -> Harness {
            let now = Instant::now();
            let ctx: Vec<_> = (0..n).map(|i| json!({ "i": i })).collect();
            let mut h = Harness {
                lc: Lifecycle::new(policy(restart), &ctx, per_worker, now),
                now,
                next_pid: 100,
                fail_spawns: false,
                gone: Default::default(),
                recycles: 0,
            };
            h.settle();
            h
        }

        fn run(&mut self, actions: Vec<Action>) {
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
                        assert!(!self.lc.draining(), "spawn during a drain");
                        assert!(
                            !self.lc.table.slots[slot].removed,
                            "spawn of a removed slot"
                        );
                        assert!(
                            self.lc.table.current(slot).is_none(),
                            "spawn while slot {slot} has a current process"
                        );
                        assert!((1..=MAX_WORKERS).contains(&workers));
                        if self.fail_spawns {
                            queue.extend(self.lc.spawn_failed(slot, for_roll, self.now));
                        } else {
                            self.next_pid += 1;
                            let lane = self.lc.free_lane(slot);
                            self.lc.spawned(
                                slot,
                                self.next_pid,
                                context,
                                for_roll,
                                lane,
                                false,
                                (),
                                self.now,
                            );
                        }
                    }
                    Action::Leave { pid } | Action::Kill { pid } | Action::Hung { pid, .. } => {
                        assert!(
                            self.lc.table.procs.contains_key(&pid),
                            "{a:?}: not in the table"
                        );
                        assert!(!self.gone.contains(&pid));
                        if matches!(a, Action::Kill { .. } | Action::Hung { .. }) {
                            self.exit(pid, true);
                        }
                    }
                    Action::Recycle { slot, pid, .. } => {
                        assert!(!self.lc.draining(), "a recycle during the drain");
                        let t = &self.lc.table;
                        // Kept serving while its successor starts.
                        assert_eq!(t.replaced(slot), Some(pid), "recycle of another pid");
                        assert!(
                            (0..t.slots.len()).all(|i| i == slot || t.replaced(i).is_none()),
                            "a recycle while another worker is being replaced"
                        );
                        self.recycles += 1;
                    }
                    Action::Recycled { .. } => {}
                    Action::Restart { .. }
                    | Action::NotUp { .. }
                    | Action::RollDone { .. }
                    | Action::RollHalted { .. }
                    | Action::Refused(_) => {}
                }
            }
        }

        /// Settles as the loop does: again at once while something is due
        /// now (a restart without backoff). It must end in a few turns.
        fn settle(&mut self) {
            for _ in 0..4 {
                let a = self.lc.settle(self.now);
                self.run(a);
                if self.lc.next_wakeup().is_none_or(|t| t > self.now) {
                    return;
                }
            }
            panic!("the loop would spin: something is due now after 4 turns");
        }

        fn exit(&mut self, pid: Pid, failed: bool) {
            let (p, a) = self.lc.exited(pid, failed, self.now);
            assert!(p.is_some());
            self.gone.insert(pid);
            self.run(a);
        }

        fn pids(&self) -> Vec<Pid> {
            self.lc.table.procs.keys().copied().collect()
        }

        fn check(&self) {
            let t = &self.lc.table;
            for slot in 0..t.slots.len() {
                let live: Vec<_> = t.of_slot(slot).collect();
                let current = live
                    .iter()
                    .filter(|(_, p)| matches!(p.phase, Phase::Starting | Phase::Ready))
                    .count();
                let replaced = live
                    .iter()
                    .filter(|(_, p)| p.phase == Phase::Replaced)
                    .count();
                assert!(current <= 1, "slot {slot}: {current} current processes");
                assert!(replaced <= 1, "slot {slot}: {replaced} replaced processes");
                if replaced == 1 {
                    assert!(
                        self.lc.rolling() || self.lc.draining(),
                        "slot {slot} replaced outside a roll"
                    );
                }
                if t.slots[slot].removed || self.lc.draining() {
                    assert_eq!(
                        current + replaced,
                        0,
                        "slot {slot}: serving after removal/drain"
                    );
                }
                if current == 1 {
                    assert!(t.slots[slot].restart_at.is_none());
                }
                let lanes: Vec<_> = live.iter().filter_map(|(_, p)| p.lane).collect();
                let unique: std::collections::BTreeSet<_> = lanes.iter().collect();
                assert_eq!(
                    lanes.len(),
                    unique.len(),
                    "slot {slot}: two processes share a lane"
                );
            }
            // One worker at most is out for a roll or a recycle, and never
            // one for a recycle during the drain.
            let replaced = t
                .procs
                .values()
                .filter(|p| p.phase == Phase::Replaced)
                .count();
            assert!(replaced <= 1, "{replaced} workers replaced at once");
            if self.lc.draining() {
                assert!(!self.lc.recycling(), "recycling during the drain");
                assert!(self.lc.recycles.is_empty(), "recycles queued in the drain");
            }
            if self.lc.recycling() {
                assert!(self
                    .lc
                    .recycles
                    .iter()
                    .all(|&(q, _)| t.procs.get(&q).is_none_or(|p| p.phase != Phase::Replaced)));
            }
            for (pid, p) in &t.procs {
                if let Phase::Leaving { deadline, killed } = p.phase {
                    assert!(
                        killed || deadline > self.now,
                        "{pid} left past its deadline"
                    );
                }
            }
            assert!(t.desired() >= 1 && t.desired() <= MAX_WORKERS);
        }

        /// Lets everything settle with healthy processes; the pool must reach
        /// its desired shape and the roll must end.
        fn quiesce(&mut self) {
            self.fail_spawns = false;
            for _ in 0..200 {
                for pid in self.pids() {
                    let p = &self.lc.table.procs[&pid];
                    if matches!(p.phase, Phase::Leaving { .. }) {
                        self.exit(pid, false);
                    } else {
                        self.lc.ready(pid);
                    }
                }
                self.now += Duration::from_secs(11);
                self.settle();
                self.check();
            }
            if self.lc.draining() {
                assert!(
                    self.lc.table.procs.is_empty(),
                    "processes outlived the drain"
                );
                return;
            }
            assert!(!self.lc.rolling(), "the roll never ended: {:#?}", self.lc);
            for (i, s) in self.lc.table.slots.iter().enumerate() {
                assert!(
                    s.target.is_none() && !s.added && !s.retiring,
                    "slot {i} kept a change's state after the roll: {s:?}"
                );
            }
            let t = &self.lc.table;
            for slot in t.active_slots() {
                let ready = t
                    .of_slot(slot)
                    .filter(|(_, p)| p.phase == Phase::Ready)
                    .count();
                if self.lc.policy.restart == Restart::Always {
                    assert_eq!(ready, 1, "slot {slot} is not up");
                }
            }
            assert_eq!(t.procs.len(), t.of_slot_count_active(), "stray processes");
        }
    }

    impl<H> Table<H> {
        fn of_slot_count_active(&self) -> usize {
            self.active_slots().map(|s| self.of_slot(s).count()).sum()
        }
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Exit(usize, bool),
        Ready(usize),
        Adopt,
        Hup,
        Ttin,
        Ttou,
        Contexts(usize, bool, u8),
        Tick(u64),
        FailSpawns(bool),
        Drain,
        Recycle(usize, u8),
        Hang(usize),
    }

    fn event() -> impl Strategy<Value = Ev> {
        prop_oneof![
            4 => (any::<usize>(), any::<bool>()).prop_map(|(i, f)| Ev::Exit(i, f)),
            4 => any::<usize>().prop_map(Ev::Ready),
            1 => Just(Ev::Adopt),
            2 => Just(Ev::Hup),
            2 => Just(Ev::Ttin),
            2 => Just(Ev::Ttou),
            2 => (1usize..6, any::<bool>(), 0u8..3).prop_map(|(n, pw, v)| Ev::Contexts(n, pw, v)),
            4 => (0u64..12_000).prop_map(Ev::Tick),
            1 => any::<bool>().prop_map(Ev::FailSpawns),
            1 => Just(Ev::Drain),
            4 => (any::<usize>(), 0u8..3).prop_map(|(i, r)| Ev::Recycle(i, r)),
            1 => any::<usize>().prop_map(Ev::Hang),
        ]
    }

    fn restart() -> impl Strategy<Value = Restart> {
        prop_oneof![
            Just(Restart::Always),
            Just(Restart::OnFailure),
            Just(Restart::Never)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Random event sequences keep every invariant after every step, and
        /// the pool reaches its desired shape (or empties, after a drain).
        #[test]
        fn random_events_keep_the_invariants(
            restart in restart(),
            n in 1usize..5,
            per_worker in any::<bool>(),
            events in proptest::collection::vec(event(), 0..80),
        ) {
            let mut h = Harness::new(restart, n, per_worker);
            h.check();
            for ev in events {
                match ev {
                    Ev::Exit(i, failed) => {
                        let pids = h.pids();
                        if !pids.is_empty() {
                            h.exit(pids[i % pids.len()], failed);
                        }
                    }
                    Ev::Ready(i) => {
                        let pids = h.pids();
                        if !pids.is_empty() {
                            h.lc.ready(pids[i % pids.len()]);
                        }
                    }
                    Ev::Adopt => {
                        h.next_pid += 1;
                        let a = h.lc.adopt(h.next_pid, (), h.now);
                        h.run(a);
                    }
                    Ev::Hup => {
                        let a = h.lc.hup(h.now);
                        h.run(a);
                    }
                    Ev::Ttin => { let a = h.lc.add_worker(h.now); h.run(a); }
                    Ev::Ttou => { let a = h.lc.remove_worker(h.now); h.run(a); }
                    Ev::Contexts(n, pw, v) => {
                        let ctx: Vec<_> = (0..n).map(|i| json!({ "i": i, "v": v })).collect();
                        let a = h.lc.contexts_changed(&ctx, pw, h.now);
                        h.run(a);
                    }
                    Ev::Recycle(i, r) => {
                        let pids = h.pids();
                        if !pids.is_empty() {
                            let pid = pids[i % pids.len()];
                            let queued = h.lc.recycle(pid, Reason::ALL[r as usize], h.now);
                            if queued {
                                prop_assert!(!h.lc.draining());
                                prop_assert_eq!(h.lc.table.procs[&pid].phase, Phase::Ready);
                            }
                        }
                    }
                    Ev::Hang(i) => {
                        let pids = h.pids();
                        if !pids.is_empty() {
                            let a = h.lc.hung(pids[i % pids.len()], h.now);
                            h.run(a);
                        }
                    }
                    Ev::Tick(ms) => h.now += Duration::from_millis(ms),
                    Ev::FailSpawns(f) => h.fail_spawns = f,
                    Ev::Drain => {
                        if !h.lc.draining() {
                            h.lc.begin_drain();
                            let a = h.lc.stop_accepting(h.now + Duration::from_secs(5));
                            h.run(a);
                        }
                    }
                }
                h.settle();
                h.check();
            }
            h.quiesce();
        }
    }

    /// Bug 1: a failed start after a long healthy run backs off.
    #[test]
    fn failed_starts_back_off_after_a_healthy_run() {
        let mut h = Harness::new(Restart::Always, 1, false);
        let pid = h.pids()[0];
        h.lc.ready(pid);
        h.now += Duration::from_secs(60);
        h.fail_spawns = true;
        h.exit(pid, true);
        let mut starts = 0;
        let end = h.now + Duration::from_secs(2);
        while h.now < end {
            let before = h.lc.table.slots[0].backoff.failures;
            h.settle();
            if h.lc.table.slots[0].backoff.failures != before {
                starts += 1;
            }
            h.now =
                h.lc.next_wakeup()
                    .unwrap()
                    .max(h.now + Duration::from_millis(1));
        }
        assert!((3..=8).contains(&starts), "{starts} failed starts in 2 s");
    }

    /// Bug 4: SIGTTOU that removes the slot being replaced ends both of its
    /// processes, and the roll goes on.
    #[test]
    fn ttou_of_the_slot_being_replaced_ends_both_processes() {
        let mut h = Harness::new(Restart::Always, 2, false);
        for p in h.pids() {
            h.lc.ready(p);
        }
        let a = h.lc.hup(h.now);
        h.run(a);
        h.settle();
        // Slot 0 is being replaced; let its successor come up.
        let new0 = h.lc.table.current(0).unwrap();
        h.lc.ready(new0);
        h.settle();
        assert!(h.lc.table.replaced(1).is_some());
        let a = h.lc.remove_worker(h.now);
        assert_eq!(a.len(), 2, "both processes of slot 1 leave: {a:?}");
        h.run(a);
        h.settle();
        assert!(!h.lc.rolling());
        h.check();
    }

    /// Issue 11: a replacement that exits before it is up halts the roll;
    /// the old process serves on with the context in force, the change's
    /// other parts are undone, and SIGHUP retries the change.
    #[test]
    fn a_failed_replacement_halts_the_roll_and_hup_retries_it() {
        let mut h = Harness::new(Restart::Always, 2, true);
        for p in h.pids() {
            h.lc.ready(p);
        }
        let old = h.pids();
        let bad: Vec<_> = (0..3).map(|i| json!({ "bad": i })).collect();
        let a = h.lc.contexts_changed(&bad, true, h.now);
        h.run(a);
        h.settle();
        // Slot 0 is being replaced, slot 2 was added.
        assert_eq!(h.lc.table.replaced(0), Some(old[0]));
        assert_eq!(h.lc.table.desired(), 3);
        let new0 = h.lc.table.current(0).unwrap();
        let (_, a) = h.lc.exited(new0, true, h.now);
        assert!(a.contains(&Action::RollHalted { slot: 0 }), "{a:?}");
        h.gone.insert(new0);
        h.run(a);
        h.settle();
        assert!(!h.lc.rolling());
        assert_eq!(h.lc.table.current(0), Some(old[0]));
        assert_eq!(h.lc.table.procs[&old[0]].phase, Phase::Ready);
        assert_eq!(h.lc.table.slots[0].context, json!({ "i": 0 }));
        assert!(h.lc.table.slots[2].removed, "the added worker leaves");
        assert!(h.lc.table.all_up());
        // SIGHUP tries the change again.
        let a = h.lc.hup(h.now);
        h.run(a);
        h.settle();
        assert!(h.lc.rolling());
        assert_eq!(h.lc.table.replaced(0), Some(old[0]));
        h.check();
    }

    /// Issue 11: a process not up within the ready timeout is a failed
    /// start, and halts the roll it was started for.
    #[test]
    fn a_replacement_not_up_in_time_halts_the_roll() {
        let mut h = Harness::new(Restart::Always, 1, false);
        let p = h.pids()[0];
        h.lc.ready(p);
        let a = h.lc.hup(h.now);
        h.run(a);
        h.settle();
        let new = h.lc.table.current(0).unwrap();
        h.now += Duration::from_secs(61);
        let a = h.lc.settle(h.now);
        assert!(a.contains(&Action::NotUp { slot: 0, pid: new }), "{a:?}");
        assert!(a.contains(&Action::RollHalted { slot: 0 }), "{a:?}");
        assert_eq!(h.lc.table.current(0), Some(p));
        h.run(a);
        h.check();
    }

    /// Issue 14: two workers over a limit are recycled one after the other,
    /// each successor up before its predecessor leaves; none in a drain.
    #[test]
    fn recycles_are_queued_one_at_a_time() {
        let mut h = Harness::new(Restart::Always, 2, false);
        let old = h.pids();
        for &p in &old {
            h.lc.ready(p);
        }
        assert!(h.lc.recycle(old[0], Reason::Memory, h.now));
        assert!(h.lc.recycle(old[1], Reason::Requests, h.now));
        assert!(
            !h.lc.recycle(old[1], Reason::Requests, h.now),
            "queued twice"
        );
        h.settle();
        assert_eq!(h.recycles, 1);
        assert!(h.lc.recycling());
        assert_eq!(h.lc.table.replaced(0), Some(old[0]));
        assert_eq!(
            h.lc.table.procs[&old[1]].phase,
            Phase::Ready,
            "second waits"
        );
        let new0 = h.lc.table.current(0).unwrap();
        h.lc.ready(new0);
        let a = h.lc.settle(h.now);
        assert!(a.contains(&Action::Recycled { slot: 0 }), "{a:?}");
        assert!(a.contains(&Action::Leave { pid: old[0] }), "{a:?}");
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Recycle { slot: 1, .. })),
            "{a:?}"
        );
        assert!(!a.iter().any(|x| matches!(x, Action::RollDone { .. })));
        h.run(a);
        h.check();
        assert_eq!(h.recycles, 2);
        // A drain ends the recycle and refuses new ones.
        h.lc.begin_drain();
        assert!(!h.lc.recycling());
        assert!(!h.lc.recycle(new0, Reason::Lifetime, h.now));
    }

    /// Issue 14: a recycle whose successor fails halts like a roll; the old
    /// worker serves on and is not queued again at once. A hung worker is
    /// killed and its slot restarted.
    #[test]
    fn a_failed_recycle_halts_and_a_hung_worker_restarts() {
        let mut h = Harness::new(Restart::Always, 1, false);
        let old = h.pids()[0];
        h.lc.ready(old);
        assert!(h.lc.recycle(old, Reason::Lifetime, h.now));
        h.settle();
        let new = h.lc.table.current(0).unwrap();
        let (_, a) = h.lc.exited(new, true, h.now);
        assert!(a.contains(&Action::RollHalted { slot: 0 }), "{a:?}");
        h.gone.insert(new);
        h.run(a);
        h.settle();
        assert_eq!(h.lc.table.current(0), Some(old));
        assert!(!h.lc.recycle(old, Reason::Lifetime, h.now));
        h.now += RECYCLE_RETRY;
        assert!(h.lc.recycle(old, Reason::Lifetime, h.now));
        h.lc.recycles.clear();
        let a = h.lc.hung(old, h.now);
        assert_eq!(a[0], Action::Hung { slot: 0, pid: old });
        h.run(a);
        h.settle();
        let next = h.lc.table.current(0).expect("restarted");
        assert_ne!(next, old);
        h.check();
    }

    /// Bug 9: TTIN stops at 1024 workers.
    #[test]
    fn ttin_stops_at_the_worker_limit() {
        let mut h = Harness::new(Restart::Always, MAX_WORKERS, false);
        let a = h.lc.add_worker(h.now);
        assert!(matches!(a[..], [Action::Refused(_)]), "{a:?}");
        assert_eq!(h.lc.table.desired(), MAX_WORKERS);
    }

    /// Bug 9: a process SIGKILLed past its deadline is not killed again and
    /// again (the loop spun until it was reaped).
    #[test]
    fn a_killed_process_is_not_a_pending_deadline() {
        let mut h = Harness::new(Restart::Always, 2, false);
        for p in h.pids() {
            h.lc.ready(p);
        }
        let a = h.lc.remove_worker(h.now);
        let Action::Leave { pid } = a[0] else {
            panic!("{a:?}")
        };
        h.now += Duration::from_secs(6);
        let a = h.lc.settle(h.now);
        assert_eq!(a, vec![Action::Kill { pid }]);
        // Not reaped yet: no new kill, and no wake-up in the past.
        assert_eq!(h.lc.settle(h.now), vec![]);
        assert!(h.lc.next_wakeup().is_none_or(|t| t > h.now));
    }

    /// The drain kills nothing that finishes in time, and says so.
    #[test]
    fn a_drain_that_kills_is_reported() {
        let mut h = Harness::new(Restart::Always, 2, false);
        h.lc.begin_drain();
        let a = h.lc.stop_accepting(h.now + Duration::from_secs(5));
        assert_eq!(a.len(), 2);
        let first = h.pids()[0];
        h.exit(first, false);
        assert!(!h.lc.killed_in_drain());
        h.now += Duration::from_secs(5);
        h.settle();
        assert!(h.lc.killed_in_drain());
        assert!(h.lc.table.procs.is_empty());
    }
}
