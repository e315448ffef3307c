//! The process table: the one record of every process drover started or
//! adopted, pid → [`Proc`], and the slots, which hold only what is *desired*
//! of each worker (its context, whether it was removed, its backoff). Every
//! question about the pool — how many are up, is slot 2 being replaced, what
//! is left to kill, which in-flight lane is free — is a query here, as
//! einhorn's `WorkerPool` and gunicorn's `WORKERS` are; nothing else keeps a
//! list of processes.
//!
//! Pure data: no system call, no clock (times are passed in), so a unit or
//! model test can build any state.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// A process id.
pub type Pid = i32;

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started, not up yet (`--worker-ready`).
    Starting,
    /// Up and serving.
    Ready,
    /// Up and still serving while its successor starts (a roll): it leaves
    /// once the successor is up.
    Replaced,
    /// Told to leave (stop accepting, or `--stop-signal`): SIGKILLed at
    /// `deadline`; `killed` once that happened.
    Leaving {
        /// When it gets SIGKILL.
        deadline: Instant,
        /// SIGKILL was sent; it is only waited for now.
        killed: bool,
    },
}

impl Phase {
    /// Whether the process accepts connections of its slot.
    pub fn serving(self) -> bool {
        matches!(self, Phase::Ready | Phase::Replaced)
    }
}

/// One process drover is responsible for: a worker (`slot` is Some) or a
/// descendant a worker left behind that drover adopted as child subreaper.
#[derive(Debug)]
pub struct Proc<H> {
    /// The worker it is a process of; None for an adopted leftover.
    pub slot: Option<usize>,
    /// Starts of its slot so far, this one included (1 for the first).
    pub generation: u64,
    /// Where it is in its life.
    pub phase: Phase,
    /// Its in-flight lane in the metrics region (drover's own workers).
    pub lane: Option<usize>,
    /// When it was started (or adopted).
    pub started: Instant,
    /// The context it was started with.
    pub context: serde_json::Value,
    /// Started by a roll: if it does not come up, the roll halts.
    pub for_roll: bool,
    /// It has been up (served) at some point.
    pub was_up: bool,
    /// The OS side (the control socket's end); `()` in tests.
    pub handle: H,
}

/// Capped exponential backoff of one slot's restarts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backoff {
    /// Consecutive short runs (failed starts included): the exponent.
    pub failures: u32,
}

impl Backoff {
    /// The wait before the next start, after a run of `ran_for` (zero for a
    /// start that failed): none after a healthy run, else `min`, doubling up
    /// to `max`.
    pub fn next_delay(&mut self, ran_for: Duration, limits: &BackoffLimits) -> Duration {
        if ran_for >= limits.stable_after {
            self.failures = 0;
        }
        let delay = if self.failures == 0 {
            Duration::ZERO
        } else {
            limits
                .min
                .saturating_mul(2u32.saturating_pow(self.failures - 1))
                .min(limits.max)
        };
        self.failures = (self.failures + 1).min(31);
        delay
    }
}

/// Backoff settings.
#[derive(Debug, Clone)]
pub struct BackoffLimits {
    /// The first non-zero wait.
    pub min: Duration,
    /// The longest wait.
    pub max: Duration,
    /// A run at least this long is healthy: the next restart is immediate.
    pub stable_after: Duration,
}

impl Default for BackoffLimits {
    fn default() -> Self {
        BackoffLimits {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
        }
    }
}

/// What is desired of one worker.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The context in force: its serving process runs with it, and a
    /// restart after a crash gets it.
    pub context: serde_json::Value,
    /// A new context a roll has yet to bring to this slot.
    pub target: Option<serde_json::Value>,
    /// Taken out of the pool (SIGTTOU, fewer contexts): not started again.
    pub removed: bool,
    /// Added by the contexts change in progress: removed again if it halts.
    pub added: bool,
    /// To be removed once the contexts change in progress is up.
    pub retiring: bool,
    /// When to start it (after an exit, a failed start, or at once).
    pub restart_at: Option<Instant>,
    /// Its backoff state.
    pub backoff: Backoff,
    /// Its last process exited non-zero or by a signal, or failed to start.
    pub last_failed: bool,
    /// Starts so far (the generation of its newest process).
    pub generation: u64,
}

impl Slot {
    /// A slot to start at `now`.
    pub fn new(context: serde_json::Value, now: Instant) -> Slot {
        Slot {
            context,
            target: None,
            removed: false,
            added: false,
            retiring: false,
            restart_at: Some(now),
            backoff: Backoff::default(),
            last_failed: false,
            generation: 0,
        }
    }
}

impl Slot {
    /// A removed slot back in the pool, to be started at `now` (its
    /// generation count goes on).
    pub fn revive(&mut self, context: serde_json::Value, now: Instant) {
        let generation = self.generation;
        *self = Slot::new(context, now);
        self.generation = generation;
    }
}

/// The slots and the processes.
#[derive(Debug)]
pub struct Table<H> {
    /// Worker `i` is `slots[i]`; removed slots stay (their index is an id).
    pub slots: Vec<Slot>,
    /// Every live (unreaped) process drover answers for.
    pub procs: BTreeMap<Pid, Proc<H>>,
}

impl<H> Table<H> {
    /// A table with one slot per context, all due at `now`.
    pub fn new(contexts: &[serde_json::Value], now: Instant) -> Table<H> {
        Table {
            slots: contexts.iter().map(|c| Slot::new(c.clone(), now)).collect(),
            procs: BTreeMap::new(),
        }
    }

    /// Slots still in the pool.
    pub fn active_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&i| !self.slots[i].removed)
    }

    /// The number of workers desired.
    pub fn desired(&self) -> usize {
        self.active_slots().count()
    }

    /// The processes of `slot`.
    pub fn of_slot(&self, slot: usize) -> impl Iterator<Item = (Pid, &Proc<H>)> + '_ {
        self.procs
            .iter()
            .filter(move |(_, p)| p.slot == Some(slot))
            .map(|(&pid, p)| (pid, p))
    }

    /// The slot's current process: the one starting or up, not replaced and
    /// not leaving. There is at most one.
    pub fn current(&self, slot: usize) -> Option<Pid> {
        self.of_slot(slot)
            .find(|(_, p)| matches!(p.phase, Phase::Starting | Phase::Ready))
            .map(|(pid, _)| pid)
    }

    /// The slot's replaced process, still serving while its successor starts.
    pub fn replaced(&self, slot: usize) -> Option<Pid> {
        self.of_slot(slot)
            .find(|(_, p)| p.phase == Phase::Replaced)
            .map(|(pid, _)| pid)
    }

    /// Whether some process of `slot` serves.
    pub fn serves(&self, slot: usize) -> bool {
        self.of_slot(slot).any(|(_, p)| p.phase.serving())
    }

    /// Every active slot is served (what `/readyz` reports).
    pub fn all_up(&self) -> bool {
        self.active_slots().all(|s| self.serves(s))
    }

    /// Worker processes alive, leaving ones included (not adopted leftovers).
    pub fn workers_alive(&self) -> usize {
        self.procs.values().filter(|p| p.slot.is_some()).count()
    }

    /// A lane of `slot` that no live process of the slot holds.
    pub fn free_lane(&self, slot: usize, lanes: usize) -> Option<usize> {
        (0..lanes).find(|&l| !self.of_slot(slot).any(|(_, p)| p.lane == Some(l)))
    }

    /// The earliest pending deadline: a leaving process not yet killed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.procs
            .values()
            .filter_map(|p| match p.phase {
                Phase::Leaving {
                    deadline,
                    killed: false,
                } => Some(deadline),
                _ => None,
            })
            .min()
    }

    /// (slot, pid) of every worker process, for the metrics.
    pub fn view(&self) -> Vec<(usize, Pid)> {
        self.procs
            .iter()
            .filter_map(|(&pid, p)| p.slot.map(|s| (s, pid)))
            .collect()
    }
}
