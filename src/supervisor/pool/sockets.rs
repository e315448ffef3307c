//! The sockets the workers accept on (`--balance`):
//!
//! - `shared`: the one listener, fd 3 of every worker. Whoever accepts first
//!   takes a connection; drover's own workers defer to less busy peers
//!   (`serve::Balance`), an external app's do not (the worker woken first
//!   accepts until the queue is empty).
//! - `reuseport`: one socket per worker slot in a `SO_REUSEPORT` group that
//!   the supervisor binds and holds (slot *i* gets socket *i* as fd 3, and
//!   its replacements get the same socket, so what is queued on it survives a
//!   restart). A steering thread ([`Steer`]) attaches a one-instruction
//!   classic BPF program, `ret #i`, to the group, and moves it on to the next
//!   worker that is up each time a connection lands on socket *i*: new
//!   connections go round-robin over the workers that are up, whatever the
//!   app does when woken. A worker that is not up (starting, restarting,
//!   leaving) or whose socket holds a connection it has not accepted yet
//!   (busy, hung) is skipped. No byte passes through the supervisor; the
//!   cost is one wake-up and one `setsockopt` of the supervisor per new
//!   connection.
//!
//! Sockets of a group are never closed before the pod exits (closing one
//! would reset what is queued on it, and move the group's last socket to its
//! index); a removed slot's socket stays, unsteered, for the next TTIN.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::listener::Listener;

/// The workers' sockets.
pub enum Sockets {
    /// One socket for every worker.
    Shared(Listener),
    /// One socket per slot, steered.
    Group {
        /// Index = slot = index in the kernel's group.
        socks: Vec<Listener>,
        /// The steering thread.
        steer: Steer,
    },
}

impl Sockets {
    /// The sockets for `listener` (bound with `SO_REUSEPORT` when
    /// `reuseport`).
    pub fn new(listener: Listener, reuseport: bool) -> io::Result<Sockets> {
        if !reuseport {
            return Ok(Sockets::Shared(listener));
        }
        let steer = Steer::start(listener.try_clone_fd()?)?;
        Ok(Sockets::Group {
            socks: vec![listener],
            steer,
        })
    }

    /// Whether each slot has a socket of its own.
    pub fn per_slot(&self) -> bool {
        matches!(self, Sockets::Group { .. })
    }

    /// The socket of `slot`, made (joined to the group) if it is new; the
    /// second value is a duplicate of a new socket's descriptor (for the
    /// metrics to watch its queue).
    pub fn for_slot(&mut self, slot: usize) -> io::Result<(RawFd, Option<OwnedFd>)> {
        match self {
            Sockets::Shared(l) => Ok((l.raw_fd(), None)),
            Sockets::Group { socks, steer } => {
                let mut new = None;
                while socks.len() <= slot {
                    let s = socks[0].join()?;
                    steer.add(s.try_clone_fd()?);
                    new = Some(s.try_clone_fd()?);
                    socks.push(s);
                }
                Ok((socks[slot].raw_fd(), new))
            }
        }
    }

    /// The inode of the socket `slot` accepts on (if it has one yet).
    pub fn inode(&self, slot: usize) -> Option<u64> {
        match self {
            Sockets::Shared(l) => super::accepting::inode(l),
            Sockets::Group { socks, .. } => socks.get(slot).and_then(super::accepting::inode),
        }
    }

    /// Every socket.
    pub fn all(&self) -> &[Listener] {
        match self {
            Sockets::Shared(l) => std::slice::from_ref(l),
            Sockets::Group { socks, .. } => socks,
        }
    }

    /// Connections waiting on `slot`'s socket (0 when it has none).
    pub fn queued_for(&self, slot: usize) -> u32 {
        match self {
            Sockets::Shared(l) => l.queued().unwrap_or(0),
            Sockets::Group { socks, .. } => socks.get(slot).and_then(Listener::queued).unwrap_or(0),
        }
    }

    /// Connections waiting on every socket.
    pub fn queued(&self) -> Option<u32> {
        let mut any = None;
        for l in self.all() {
            if let Some(q) = l.queued() {
                any = Some(any.unwrap_or(0) + q);
            }
        }
        any
    }

    /// Steers new connections round-robin over `up` (slots, in order);
    /// nothing changes while `up` is empty.
    pub fn steer_over(&self, up: &[usize]) {
        if let Sockets::Group { steer, .. } = self {
            steer.set(up);
        }
    }

    /// Shuts new connections out of every socket, keeping what is queued
    /// (see `listener`), and ends the steering.
    pub fn stop_new(&self) -> io::Result<()> {
        if let Sockets::Group { steer, .. } = self {
            steer.stop();
        }
        let mut first = Ok(());
        for l in self.all() {
            if let Err(e) = l.stop_new() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// What the pool tells the steering thread.
#[derive(Default)]
struct Shared {
    /// Sockets to add to its epoll set (index = position in the group).
    added: Vec<OwnedFd>,
    /// The slots to steer over, in order.
    up: Vec<usize>,
    /// Whether `up` changed since the thread last looked.
    changed: bool,
    /// End the thread.
    stop: bool,
}

/// The steering thread's handle: it moves the group's `ret #i` program on
/// to the next up worker each time a connection lands on socket *i*.
pub struct Steer {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<EventFd>,
}

/// The epoll key of the wake-up eventfd.
const WAKE: u64 = u64::MAX;

impl Steer {
    fn start(first: OwnedFd) -> io::Result<Steer> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        ep.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let shared = Arc::new(Mutex::new(Shared {
            added: vec![first],
            ..Shared::default()
        }));
        let (s, w) = (shared.clone(), wake.clone());
        std::thread::Builder::new()
            .name("drover-steer".into())
            .spawn(move || steer_loop(ep, s, w))?;
        let steer = Steer { shared, wake };
        steer.poke();
        Ok(steer)
    }

    fn add(&self, fd: OwnedFd) {
        self.shared.lock().expect("not poisoned").added.push(fd);
        self.poke();
    }

    fn set(&self, up: &[usize]) {
        let mut s = self.shared.lock().expect("not poisoned");
        if s.up != up {
            s.up = up.to_vec();
            s.changed = true;
            drop(s);
            self.poke();
        }
    }

    fn stop(&self) {
        self.shared.lock().expect("not poisoned").stop = true;
        self.poke();
    }

    fn poke(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for Steer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whose turn it is: the decision of the steering thread, apart from its
/// syscalls. New connections go round the up slots: the kernel picks one of
/// the slots not served yet in this round at random for each connection
/// (it queues a signal per landing), and a slot leaves the set once a
/// connection landed on its socket; when every slot has been served the
/// next round starts with all of them. Connections opened one after the
/// other so go to every worker once per round. A burst that comes faster
/// than the thread can re-steer lands on the slots left in the round until
/// the thread sees it (several landings at one wake-up), and then on every
/// up slot at random, as the kernel's own hashing would; it leaves no debt
/// that would pile the next burst on one worker. A slot whose socket holds a
/// connection not accepted yet (busy, hung) is passed by, unless all are.
#[derive(Debug, Default)]
pub(crate) struct Turns {
    /// 1 for a slot served in this round.
    taken: Vec<u64>,
    /// The slots steered over, in order.
    up: Vec<usize>,
    /// The slots new connections go to now.
    pub target: Vec<usize>,
}

impl Turns {
    /// A new up set: a new round.
    pub fn set_up(&mut self, up: &[usize]) {
        self.up = up.to_vec();
        self.taken.iter_mut().for_each(|t| *t = 0);
    }

    /// A connection landed on `slot`'s socket.
    pub fn landed(&mut self, slot: usize) {
        if self.taken.len() <= slot {
            self.taken.resize(slot + 1, 0);
        }
        self.taken[slot] = 1;
        let least = self
            .up
            .iter()
            .map(|&s| self.taken.get(s).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        if least > 0 {
            for &s in &self.up {
                self.taken[s] -= least;
            }
        }
    }

    /// A burst is under way (connections land faster than the thread
    /// re-steers): every up slot (the `idle` ones if any), and a new round.
    pub fn burst(&mut self, idle: impl Fn(usize) -> bool) -> Vec<usize> {
        self.set_up(&self.up.clone());
        let ready: Vec<usize> = self.up.iter().copied().filter(|&s| idle(s)).collect();
        if ready.is_empty() {
            self.up.clone()
        } else {
            ready
        }
    }

    /// The slots new connections should go to now: the up ones not served
    /// in this round, among those whose socket is `idle` if any is; empty
    /// while nothing is up.
    pub fn next(&self, idle: impl Fn(usize) -> bool) -> Vec<usize> {
        let taken = |s: usize| self.taken.get(s).copied().unwrap_or(0);
        let ready: Vec<usize> = self.up.iter().copied().filter(|&s| idle(s)).collect();
        let pool = if ready.is_empty() { &self.up } else { &ready };
        let Some(least) = pool.iter().map(|&s| taken(s)).min() else {
            return Vec::new();
        };
        pool.iter()
            .copied()
            .filter(|&s| taken(s) == least)
            .collect()
    }
}

/// How soon, in milliseconds, a decision that saw a connection waiting is
/// made again (a worker that does not take it is passed by from then on).
const RECHECK_MS: u16 = 5;

/// The epoll key of the landings' signalfd.
const LANDINGS: u64 = u64::MAX - 1;

fn steer_loop(ep: Epoll, shared: Arc<Mutex<Shared>>, wake: Arc<EventFd>) {
    // A connection accepted before an epoll wake-up is reported is not
    // reported at all (epoll polls the socket again), so a fast worker's
    // landings would be missed: the kernel queues a signal per landing
    // instead (O_ASYNC), which the thread reads from a signalfd.
    let landings = match crate::sys::landing_signals() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot steer new connections (signalfd): the kernel hashes them over the workers' sockets");
            return;
        }
    };
    if let Err(e) = ep.add(
        landings.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, LANDINGS),
    ) {
        tracing::warn!(error = %e, "cannot steer new connections (epoll): the kernel hashes them over the workers' sockets");
        return;
    }
    let mut socks: Vec<OwnedFd> = Vec::new();
    let mut turns = Turns::default();
    let mut events = [EpollEvent::empty(); 4];
    let mut landed = Vec::new();
    let mut warned = false;
    // Set when a decision saw a connection waiting: look again shortly.
    let mut recheck = false;
    let queued = |socks: &[OwnedFd], s: usize| {
        socks
            .get(s)
            .and_then(|fd| crate::sys::listen_queue(fd.as_raw_fd()))
            .map_or(0, |(q, _)| q)
    };
    loop {
        let timeout = if recheck {
            EpollTimeout::from(RECHECK_MS)
        } else {
            EpollTimeout::NONE
        };
        let n = match ep.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "steering stopped: epoll_wait failed");
                return;
            }
        };
        // Nothing happened: the re-check.
        let mut decide = n == 0;
        // Landings seen at this wake-up, by slot.
        let mut fresh: Vec<usize> = Vec::new();
        for ev in &events[..n] {
            if ev.data() == WAKE {
                let _ = wake.read();
                let mut s = shared.lock().expect("not poisoned");
                if s.stop {
                    return;
                }
                for fd in s.added.drain(..) {
                    if let Err(e) = crate::sys::signal_on_input(fd.as_fd()) {
                        tracing::warn!(error = %e, "steering cannot watch a socket (O_ASYNC)");
                    }
                    socks.push(fd);
                }
                if s.changed {
                    s.changed = false;
                    turns.set_up(&s.up);
                    tracing::debug!(up = ?s.up, "steering over the workers that are up");
                    decide = true;
                }
            } else {
                landed.clear();
                if let Err(e) = crate::sys::read_landings(landings.as_fd(), &mut landed) {
                    tracing::warn!(error = %e, "steering stopped: cannot read the landings");
                    return;
                }
                for l in &landed {
                    let slot = match *l {
                        crate::sys::Landing::On(fd) => {
                            socks.iter().position(|s| s.as_raw_fd() == fd)
                        }
                        // Some were lost: count one on a target.
                        crate::sys::Landing::Lost => turns.target.first().copied(),
                    };
                    if let Some(slot) = slot {
                        tracing::trace!(slot, "landed");
                        turns.landed(slot);
                        fresh.push(slot);
                        decide = true;
                    }
                }
            }
        }
        if !decide {
            continue;
        }
        // A socket that holds a connection not accepted yet is passed by: its
        // worker is behind. What landed at this very wake-up does not count
        // yet (a healthy worker is about to accept it); a re-check
        // [`RECHECK_MS`] later, with nothing fresh, tells.
        let queues: Vec<u32> = (0..socks.len()).map(|s| queued(&socks, s)).collect();
        recheck = queues.iter().any(|&q| q > 0);
        let idle = |s: usize| {
            let just = fresh.iter().filter(|&&f| f == s).count() as u32;
            queues.get(s).copied().unwrap_or(0) <= just
        };
        let next = if fresh.len() > 1 {
            // A burst faster than the thread: every up worker, at random,
            // for the rest of it (rounds start again after it).
            turns.burst(idle)
        } else {
            turns.next(idle)
        };
        if next.is_empty() || next == turns.target {
            continue;
        }
        let Some(first) = socks.first() else { continue };
        match crate::listener::steer(first, &next) {
            Ok(()) => {
                tracing::trace!(to = ?next, "steered");
                turns.target = next;
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot steer new connections (SO_ATTACH_REUSEPORT_CBPF): the kernel hashes them over the workers' sockets");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Turns;

    fn turns(up: &[usize]) -> Turns {
        let mut t = Turns::default();
        t.set_up(up);
        t
    }

    #[test]
    fn connections_one_after_the_other_go_round() {
        let mut t = turns(&[0, 1, 2, 3]);
        let mut per = [0; 4];
        for k in 0..12 {
            let set = t.next(|_| true);
            // Whichever of the set the kernel picks (here: the last one).
            let s = *set.last().unwrap();
            per[s] += 1;
            t.landed(s);
            t.target = set;
            if k % 4 == 3 {
                assert_eq!(per, [(k + 1) / 4; 4], "after {} connections", k + 1);
            }
        }
        assert!(turns(&[]).next(|_| true).is_empty());
    }

    #[test]
    fn a_slot_that_took_a_burst_sits_out_the_round_but_no_longer() {
        let mut t = turns(&[0, 1, 2]);
        for _ in 0..5 {
            t.landed(0);
        }
        assert_eq!(t.next(|_| true), vec![1, 2]);
        t.landed(1);
        assert_eq!(t.next(|_| true), vec![2]);
        t.landed(2);
        // A new round: the burst is not held against slot 0.
        assert_eq!(t.next(|_| true), vec![0, 1, 2]);
    }

    #[test]
    fn a_burst_opens_every_up_slot_and_starts_a_round() {
        let mut t = turns(&[0, 1, 2]);
        t.landed(0);
        t.landed(1);
        assert_eq!(t.next(|_| true), vec![2]);
        assert_eq!(t.burst(|s| s != 1), vec![0, 2]);
        assert_eq!(t.next(|_| true), vec![0, 1, 2]);
    }

    #[test]
    fn a_socket_with_an_unaccepted_connection_is_passed_by_unless_all_are() {
        let t = turns(&[0, 1, 2]);
        assert_eq!(t.next(|s| s != 1), vec![0, 2]);
        assert_eq!(t.next(|_| false), vec![0, 1, 2]);
    }

    #[test]
    fn a_new_up_set_starts_the_counts_again() {
        let mut t = turns(&[0, 1]);
        t.landed(0);
        assert_eq!(t.next(|_| true), vec![1]);
        t.set_up(&[0, 1, 2]);
        assert_eq!(t.next(|_| true), vec![0, 1, 2]);
    }

    #[test]
    fn only_up_slots_are_steered_to() {
        let mut t = turns(&[0, 2]);
        t.landed(1);
        t.landed(3);
        assert_eq!(t.next(|_| true), vec![0, 2]);
    }
}
