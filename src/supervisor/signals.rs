//! Signals, as a PID 1 must treat them (tini's rules):
//! - TERM and INT set the stop flag;
//! - HUP, TTIN and TTOU roll, add or remove workers;
//! - every other signal a process may catch is forwarded to every worker's
//!   process group and never kills drover (USR1, USR2, WINCH, QUIT, ... and
//!   the realtime ones);
//! - the synchronous ones (SEGV, BUS, FPE, ILL, TRAP, SYS, ABRT) and CHLD,
//!   PIPE, KILL and STOP are left alone.
//!
//! All of them are blocked from drover's first instruction (before any
//! thread exists) until their handlers are installed, so a TERM in the
//! first milliseconds waits and then starts a drain instead of killing
//! drover with its default action.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::Control;
use crate::error::{Error, Result};
use crate::stop::{StopFlag, StopSource};

/// Signals drover acts on itself.
const USED: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Signals passed on to the workers (tini forwards the same set).
const FORWARDED: [libc::c_int; 15] = [
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGSTKFLT,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGURG,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGWINCH,
    libc::SIGIO,
    libc::SIGPWR,
];

fn all() -> Vec<libc::c_int> {
    USED.iter()
        .chain(FORWARDED.iter())
        .copied()
        .chain(crate::sys::realtime_signals())
        .collect()
}

/// Blocks every signal drover handles until [`install`] (call it first
/// thing, while the process has one thread; the threads started later
/// inherit the mask).
pub fn block_early() {
    crate::sys::block_signals(&all());
}

/// Undoes [`block_early`] for a command that does not supervise (`check`,
/// `stop`).
pub fn unblock() {
    crate::sys::unblock_signals(&all());
}

/// Installs the handlers, then unblocks: TERM/INT set `flag`, the others
/// become [`Control`]s on `tx`.
pub fn install(flag: StopFlag, tx: mpsc::UnboundedSender<Control>) -> Result<()> {
    let handler = |n: libc::c_int| {
        signal(SignalKind::from_raw(n))
            .map_err(|e| Error::io(format!("cannot handle signal {n}"), e))
    };
    for (n, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        let mut s = handler(n)?;
        let flag = flag.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if flag.request(StopSource::Signal) {
                    tracing::info!("{name} received: draining");
                } else {
                    tracing::info!("{name} received again: already draining");
                }
            }
        });
    }
    let mut controls: Vec<(libc::c_int, Control)> = vec![
        (libc::SIGHUP, Control::Hup),
        (libc::SIGTTIN, Control::Ttin),
        (libc::SIGTTOU, Control::Ttou),
    ];
    controls.extend(
        FORWARDED
            .iter()
            .copied()
            .chain(crate::sys::realtime_signals())
            .map(|n| (n, Control::Forward(n))),
    );
    for (n, c) in controls {
        let mut s = handler(n)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(c).is_err() {
                    return;
                }
            }
        });
    }
    crate::sys::unblock_signals(&all());
    Ok(())
}
