//! The one stop flag. Whoever asks first — `POST /admin/stop`, SIGTERM/SIGINT
//! to the supervisor, or a worker (the library's [`stop`] or a byte on
//! `DROVER_STOP_FD`) — sets it; every later request is counted and changes
//! nothing. Setting it wakes every waiter at once (a `watch` channel, no
//! polling tick); the supervisor pushes it to worker processes over their
//! control sockets in the same turn of its event loop.
//!
//! This module is only the flag: it never decides what a drain does
//! (`supervisor::drain` owns that), and the library's `stop()` lives with
//! the library API (`app`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Who asked for the stop (the `source` label of `drover_stop_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSource {
    /// `POST /admin/stop`.
    Http,
    /// SIGTERM or SIGINT to the supervisor.
    Signal,
    /// A worker asked (library stop function or `DROVER_STOP_FD`).
    Worker,
}

impl StopSource {
    /// Every source, in label order.
    pub const ALL: [StopSource; 3] = [StopSource::Http, StopSource::Signal, StopSource::Worker];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StopSource::Http => "http",
            StopSource::Signal => "signal",
            StopSource::Worker => "worker",
        }
    }
}

/// The shared stop flag of one drover pod. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopFlag {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` until the first request; then the source that set it.
    tx: watch::Sender<Option<StopSource>>,
    /// Requests per source, repeats included.
    requests: [AtomicU64; 3],
}

impl Default for StopFlag {
    fn default() -> Self {
        StopFlag::new()
    }
}

impl StopFlag {
    /// A flag that is not set.
    pub fn new() -> StopFlag {
        StopFlag {
            inner: Arc::new(Inner {
                tx: watch::Sender::new(None),
                requests: Default::default(),
            }),
        }
    }

    /// Requests a stop. Returns true if this request set the flag.
    pub fn request(&self, source: StopSource) -> bool {
        self.inner.requests[source as usize].fetch_add(1, Ordering::Relaxed);
        self.inner.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(source);
                true
            } else {
                false
            }
        })
    }

    /// Whether the flag is set.
    pub fn is_set(&self) -> bool {
        self.inner.tx.borrow().is_some()
    }

    /// How many stop requests came from `source` (repeats included).
    pub fn requests(&self, source: StopSource) -> u64 {
        self.inner.requests[source as usize].load(Ordering::Relaxed)
    }

    /// Waits until the flag is set; returns who set it.
    pub async fn wait(&self) -> StopSource {
        let mut rx = self.inner.tx.subscribe();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `inner`, which we hold: unreachable.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_request_wins_and_repeats_are_counted() {
        let flag = StopFlag::new();
        let waiter = {
            let f = flag.clone();
            tokio::spawn(async move { f.wait().await })
        };
        assert!(!flag.is_set());
        assert!(flag.request(StopSource::Http));
        assert!(!flag.request(StopSource::Signal));
        assert!(!flag.request(StopSource::Http));
        assert_eq!(waiter.await.unwrap(), StopSource::Http);
        assert_eq!(flag.requests(StopSource::Http), 2);
        assert_eq!(flag.requests(StopSource::Signal), 1);
        assert_eq!(flag.requests(StopSource::Worker), 0);
    }
}
