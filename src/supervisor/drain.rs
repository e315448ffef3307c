//! The one drain (DESIGN.md, "The stop, step by step"), written once for the
//! in-process app and the worker pool alike; each says how it does a step by
//! implementing [`Serving`].
//!
//! 1. The flag is set: `/readyz` answers 503 at once (it reads the flag);
//!    drover's own workers are told in the same turn of the event loop.
//! 2. Everything keeps serving for `--drain-delay`; nothing is restarted.
//! 3. Accepting stops: connections already queued are still served, not
//!    reset; external workers get `--stop-signal`.
//! 4. In-flight work gets until `--graceful-timeout`; then what is left is
//!    SIGKILLed (or, in-process, aborted).
//! 5. Exit 0 after a clean drain, 1 if anything had to be killed.

use std::time::Duration;

use tokio::time::Instant;

use crate::error::exit;
use crate::stop::StopSource;

/// The drain's settings.
#[derive(Debug, Clone, Copy)]
pub struct DrainPolicy {
    /// `--drain-delay`.
    pub delay: Duration,
    /// `--graceful-timeout`.
    pub graceful: Duration,
}

/// What serves, as the drain sees it.
pub trait Serving {
    /// Step 1: the flag is set; tell whoever serves.
    fn announce(&mut self);
    /// Step 2: keep serving until `until`.
    async fn keep_serving(&mut self, until: Instant);
    /// Step 3: stop accepting; what is queued is still served. Nothing may
    /// live past `deadline`.
    async fn stop_accepting(&mut self, deadline: Instant);
    /// Step 4: waits for in-flight work until `deadline`; true if it all
    /// finished without anything being killed.
    async fn finish(&mut self, deadline: Instant) -> bool;
    /// Step 4, when time ran out: kill what is left.
    async fn kill_rest(&mut self);
    /// Before exiting: nothing that was started may outlive drover.
    fn sweep(&mut self);
}

/// Runs the drain to its exit code.
pub async fn run(serving: &mut impl Serving, source: StopSource, policy: DrainPolicy) -> u8 {
    tracing::info!(source = source.as_str(), "stop requested: draining");
    serving.announce();
    serving.keep_serving(Instant::now() + policy.delay).await;
    let deadline = Instant::now() + policy.graceful;
    serving.stop_accepting(deadline).await;
    tracing::info!("no longer accepting; finishing in-flight requests");
    let clean = serving.finish(deadline).await;
    if !clean {
        serving.kill_rest().await;
    }
    serving.sweep();
    if clean {
        tracing::info!("drained cleanly");
        exit::OK
    } else {
        tracing::warn!(
            timeout = ?policy.graceful,
            "work outlived --graceful-timeout and was killed"
        );
        exit::KILLED
    }
}
