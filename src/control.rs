//! The contract between the supervisor and a worker process, both ends: the
//! environment a worker is started with (encoded by the supervisor, decoded
//! by the worker) and the one-byte messages on its control socket
//! (`DROVER_STOP_FD`). A leaf: it imports nothing else of drover, so both
//! sides, the metrics and the library API can use it without a cycle.
//!
//! # Descriptors a worker gets
//! | fd | what |
//! |---|---|
//! | 3 | the shared listener (`LISTEN_FDS=1`, `LISTEN_PID`, `LISTEN_FDNAMES=http`) |
//! | 4 | its end of the control socket pair (`DROVER_STOP_FD=4`) |
//! | 5 | the shared HTTP metrics region (built-in and library workers only) |
//!
//! # Control messages (one byte each)
//! | direction | byte | meaning |
//! |---|---|---|
//! | worker → supervisor | `R` | accepting: the worker is up (drover's own workers) |
//! | worker → supervisor | `S` | stop the whole service (library `stop()`) |
//! | worker → supervisor | `H` | heartbeat: its event loop runs (`--worker-timeout`) |
//! | supervisor → worker | `D` | the stop flag is set: draining |
//! | supervisor → worker | `A` | stop accepting now; finish in-flight work and exit |
//! | supervisor gone | EOF | stop accepting and exit |
//!
//! External commands get the same fd 4; any byte they write means `S`.

use std::io;

/// The listener's descriptor in a worker.
pub const LISTEN_FD: i32 = 3;
/// The control socket's descriptor in a worker.
pub const CONTROL_FD: i32 = 4;
/// The shared metrics region's descriptor (built-in and library workers).
pub const METRICS_FD: i32 = 5;

/// Marks a re-executed drover as a worker (value [`ROLE_WORKER`]).
const ROLE_ENV: &str = "DROVER_INTERNAL_ROLE";
const ROLE_WORKER: &str = "worker";
/// The worker's in-flight lane in the metrics region.
const LANE_ENV: &str = "DROVER_INTERNAL_LANE";
/// Set when the worker's socket is its own (`--balance reuseport`).
const OWN_SOCKET_ENV: &str = "DROVER_INTERNAL_OWN_SOCKET";
const ID_ENV: &str = "DROVER_WORKER_ID";
const WORKERS_ENV: &str = "DROVER_WORKERS";
const CONTEXT_ENV: &str = "DROVER_WORKER_CONTEXT";
const STOP_FD_ENV: &str = "DROVER_STOP_FD";
const LOG_FORMAT_ENV: &str = "DROVER_LOG_FORMAT";
const LOG_LEVEL_ENV: &str = "DROVER_LOG_LEVEL";
/// How often a worker of drover's own app sends its heartbeat, in ms.
const HEARTBEAT_ENV: &str = "DROVER_INTERNAL_HEARTBEAT_MS";
/// sd_watchdog(3): the interval, and the pid it is meant for (the child
/// writes its own pid there, as for `LISTEN_PID`).
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
/// See [`WATCHDOG_USEC_ENV`].
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";
/// sd_notify's socket, set only when drover listens for `READY=1`.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Variables drover sets for a worker: never inherited from drover's own
/// environment, so a worker sees exactly what its supervisor meant.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(b"LISTEN_")
        || [
            ROLE_ENV,
            LANE_ENV,
            OWN_SOCKET_ENV,
            ID_ENV,
            WORKERS_ENV,
            CONTEXT_ENV,
            STOP_FD_ENV,
            LOG_FORMAT_ENV,
            LOG_LEVEL_ENV,
            HEARTBEAT_ENV,
            WATCHDOG_USEC_ENV,
            WATCHDOG_PID_ENV,
            // Readiness is reported to drover, never past it to whoever
            // started drover.
            NOTIFY_SOCKET_ENV,
        ]
        .iter()
        .any(|r| r.as_bytes() == name)
}

/// Whether this process was started by a drover supervisor as a worker of
/// the built-in or a library app.
pub fn is_worker() -> bool {
    std::env::var_os(ROLE_ENV).is_some_and(|v| v == ROLE_WORKER)
}

/// What drover's own worker processes are told through the environment, on
/// top of what every worker gets.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnWorker {
    /// The in-flight lane of the metrics region it records into.
    pub lane: Option<usize>,
    /// `text` or `json`.
    pub log_format: String,
    /// The tracing filter.
    pub log_level: String,
    /// No other worker accepts on its socket (`--balance reuseport`): it
    /// has no peer to defer to.
    pub own_socket: bool,
    /// How often to send a heartbeat (`--worker-timeout` is on).
    pub heartbeat: Option<std::time::Duration>,
}

/// A worker's identity and settings, as passed in its environment.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEnv {
    /// `DROVER_WORKER_ID`.
    pub id: usize,
    /// `DROVER_WORKERS`.
    pub workers: usize,
    /// `DROVER_WORKER_CONTEXT`, as JSON.
    pub context: serde_json::Value,
    /// Set for drover's own workers (built-in and library apps).
    pub own: Option<OwnWorker>,
    /// `NOTIFY_SOCKET`, when drover listens for sd_notify.
    pub notify_socket: Option<String>,
    /// `WATCHDOG_USEC` (with `WATCHDOG_PID`), with sd_notify and
    /// `--worker-timeout`.
    pub watchdog_usec: Option<u64>,
}

/// Why a worker's environment could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A variable the supervisor always sets is missing.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// A number that is not one.
    #[error("{name} is not a number: {value:?}")]
    NotANumber {
        /// The variable.
        name: &'static str,
        /// What it held.
        value: String,
    },
    /// The context is not JSON.
    #[error("{CONTEXT_ENV} is not JSON")]
    Context(#[source] serde_json::Error),
}

impl WorkerEnv {
    /// The variables to add to a worker's environment. `LISTEN_PID` (and
    /// `WATCHDOG_PID`) is present with an empty value: the child writes its
    /// own pid there.
    pub fn encode(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut env: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(12);
        let mut set = |k: &str, v: &[u8]| env.push((k.as_bytes().to_vec(), v.to_vec()));
        set("LISTEN_FDS", b"1");
        set("LISTEN_PID", b"");
        set("LISTEN_FDNAMES", b"http");
        set(ID_ENV, self.id.to_string().as_bytes());
        set(WORKERS_ENV, self.workers.to_string().as_bytes());
        let context = serde_json::to_vec(&self.context).unwrap_or_else(|_| b"null".to_vec());
        set(CONTEXT_ENV, &context);
        set(STOP_FD_ENV, CONTROL_FD.to_string().as_bytes());
        if let Some(n) = &self.notify_socket {
            set(NOTIFY_SOCKET_ENV, n.as_bytes());
            if let Some(usec) = self.watchdog_usec {
                set(WATCHDOG_USEC_ENV, usec.to_string().as_bytes());
                set(WATCHDOG_PID_ENV, b"");
            }
        }
        if let Some(own) = &self.own {
            set(ROLE_ENV, ROLE_WORKER.as_bytes());
            set(LOG_FORMAT_ENV, own.log_format.as_bytes());
            set(LOG_LEVEL_ENV, own.log_level.as_bytes());
            if let Some(lane) = own.lane {
                set(LANE_ENV, lane.to_string().as_bytes());
            }
            if own.own_socket {
                set(OWN_SOCKET_ENV, b"1");
            }
            if let Some(h) = own.heartbeat {
                set(HEARTBEAT_ENV, h.as_millis().max(1).to_string().as_bytes());
            }
        }
        env
    }

    /// Reads a worker's environment through `var` (`std::env::var` in a
    /// worker; a map in tests).
    pub fn decode(var: impl Fn(&str) -> Option<String>) -> Result<WorkerEnv, EnvError> {
        let num = |name: &'static str| -> Result<usize, EnvError> {
            let v = var(name).ok_or(EnvError::Missing(name))?;
            v.parse()
                .map_err(|_| EnvError::NotANumber { name, value: v })
        };
        let context = match var(CONTEXT_ENV) {
            Some(c) => serde_json::from_str(&c).map_err(EnvError::Context)?,
            None => serde_json::Value::Null,
        };
        let own = (var(ROLE_ENV).as_deref() == Some(ROLE_WORKER)).then(|| OwnWorker {
            lane: var(LANE_ENV).and_then(|l| l.parse().ok()),
            log_format: var(LOG_FORMAT_ENV).unwrap_or_else(|| "text".into()),
            log_level: var(LOG_LEVEL_ENV).unwrap_or_else(|| "info".into()),
            own_socket: var(OWN_SOCKET_ENV).as_deref() == Some("1"),
            heartbeat: var(HEARTBEAT_ENV)
                .and_then(|h| h.parse().ok())
                .filter(|&ms| ms > 0)
                .map(std::time::Duration::from_millis),
        });
        Ok(WorkerEnv {
            id: num(ID_ENV)?,
            workers: num(WORKERS_ENV)?,
            context,
            own,
            watchdog_usec: var(NOTIFY_SOCKET_ENV)
                .and(var(WATCHDOG_USEC_ENV))
                .and_then(|u| u.parse().ok()),
            notify_socket: var(NOTIFY_SOCKET_ENV),
        })
    }
}

/// A message from a worker to the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToSupervisor {
    /// Accepting: the worker is up.
    Ready,
    /// Stop the whole service.
    Stop,
    /// Its event loop runs.
    Heartbeat,
}

/// A message from the supervisor to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToWorker {
    /// The stop flag is set.
    Draining,
    /// Stop accepting, finish what is in flight, exit.
    StopAccepting,
}

impl ToSupervisor {
    /// Its byte.
    pub fn byte(self) -> u8 {
        match self {
            ToSupervisor::Ready => b'R',
            ToSupervisor::Stop => b'S',
            ToSupervisor::Heartbeat => b'H',
        }
    }

    /// Reads one byte from a worker. drover's own workers speak the
    /// protocol; for an external command any byte asks for a stop.
    pub fn decode(b: u8, own_worker: bool) -> ToSupervisor {
        match b {
            b'R' if own_worker => ToSupervisor::Ready,
            b'H' if own_worker => ToSupervisor::Heartbeat,
            _ => ToSupervisor::Stop,
        }
    }
}

impl ToWorker {
    /// Its byte.
    pub fn byte(self) -> u8 {
        match self {
            ToWorker::Draining => b'D',
            ToWorker::StopAccepting => b'A',
        }
    }

    /// Reads one byte from the supervisor; unknown bytes are ignored (a
    /// newer supervisor may say more).
    pub fn decode(b: u8) -> Option<ToWorker> {
        match b {
            b'D' => Some(ToWorker::Draining),
            b'A' => Some(ToWorker::StopAccepting),
            _ => None,
        }
    }
}

/// The supervisor's end of one worker's control socket.
#[derive(Debug)]
pub struct SupervisorEnd {
    write: tokio::net::unix::OwnedWriteHalf,
}

impl SupervisorEnd {
    /// A new socket pair: the supervisor's end, a task reading the worker's
    /// messages into `on_message`, and the worker's end (to become its fd 4).
    pub fn pair(
        own_worker: bool,
        mut on_message: impl FnMut(ToSupervisor) -> bool + Send + 'static,
    ) -> io::Result<(SupervisorEnd, std::os::fd::OwnedFd)> {
        use tokio::io::AsyncReadExt;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let (mut read, write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        for &b in &buf[..n] {
                            if !on_message(ToSupervisor::decode(b, own_worker)) {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok((SupervisorEnd { write }, theirs.into()))
    }

    /// Sends `msg` without waiting; a worker that is gone or not reading
    /// (its buffer full) misses it, which is harmless: EOF tells it the rest.
    pub fn send(&self, msg: ToWorker) {
        let _ = self.write.try_write(&[msg.byte()]);
    }
}

/// The worker's end of its control socket.
#[derive(Debug)]
pub struct WorkerEnd {
    write: std::os::unix::net::UnixStream,
    read: tokio::net::UnixStream,
}

impl WorkerEnd {
    /// Takes the inherited fd 4 (inside a tokio runtime).
    pub fn new(fd: std::os::fd::OwnedFd) -> io::Result<WorkerEnd> {
        let sock = std::os::unix::net::UnixStream::from(fd);
        let write = sock.try_clone()?;
        sock.set_nonblocking(true)?;
        Ok(WorkerEnd {
            write,
            read: tokio::net::UnixStream::from_std(sock)?,
        })
    }

    /// A blocking writer for messages to the supervisor (usable from any
    /// thread, e.g. the library's `stop()`).
    pub fn sender(&self) -> io::Result<WorkerSender> {
        Ok(WorkerSender(self.write.try_clone()?))
    }

    /// The next message from the supervisor; `None` once it is gone (EOF).
    pub async fn recv(&mut self) -> Option<ToWorker> {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 1];
        loop {
            match self.read.read(&mut b).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {
                    if let Some(m) = ToWorker::decode(b[0]) {
                        return Some(m);
                    }
                }
            }
        }
    }
}

/// Sends messages to the supervisor.
#[derive(Debug)]
pub struct WorkerSender(std::os::unix::net::UnixStream);

impl WorkerSender {
    /// Sends `msg`; false if the supervisor is gone.
    pub fn send(&self, msg: ToSupervisor) -> bool {
        use std::io::Write;
        (&self.0).write_all(&[msg.byte()]).is_ok()
    }

    /// Sends `msg` unless that would block (the supervisor is not reading:
    /// a heartbeat is then simply missed, never waited for on the event
    /// loop); false only if the supervisor is gone.
    pub fn send_nonblocking(&self, msg: ToSupervisor) -> bool {
        let n = nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&self.0),
            &[msg.byte()],
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        );
        !matches!(n, Err(e) if e != nix::errno::Errno::EAGAIN && e != nix::errno::Errno::EINTR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn round_trip(env: &WorkerEnv) -> WorkerEnv {
        let vars: HashMap<String, String> = env
            .encode()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        for k in vars.keys() {
            assert!(is_reserved(k.as_bytes()), "{k} must not be inherited");
        }
        WorkerEnv::decode(|k| vars.get(k).cloned()).unwrap()
    }

    #[test]
    fn worker_environment_round_trips() {
        let external = WorkerEnv {
            id: 3,
            workers: 8,
            context: serde_json::json!({"db": "x", "n": [1, 2.5, null], "ü": "\u{1F600}"}),
            own: None,
            notify_socket: Some("/run/drover-1/notify".into()),
            watchdog_usec: Some(2_000_000),
        };
        assert_eq!(round_trip(&external), external);
        let own = WorkerEnv {
            own: Some(OwnWorker {
                lane: Some(2),
                log_format: "json".into(),
                log_level: "drover=debug".into(),
                own_socket: true,
                heartbeat: Some(std::time::Duration::from_millis(400)),
            }),
            notify_socket: None,
            watchdog_usec: None,
            ..external
        };
        assert_eq!(round_trip(&own), own);
    }

    #[test]
    fn bad_environments_are_named() {
        let e = WorkerEnv::decode(|_| None).unwrap_err();
        assert_eq!(e.to_string(), "DROVER_WORKER_ID is not set");
        let e = WorkerEnv::decode(|k| match k {
            "DROVER_WORKER_ID" => Some("x".into()),
            _ => Some("1".into()),
        })
        .unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
        let e = WorkerEnv::decode(|k| match k {
            "DROVER_WORKER_CONTEXT" => Some("{".into()),
            _ => Some("1".into()),
        })
        .unwrap_err();
        assert!(e.to_string().contains("not JSON"), "{e}");
    }

    #[test]
    fn messages_round_trip_and_external_bytes_mean_stop() {
        for m in [ToWorker::Draining, ToWorker::StopAccepting] {
            assert_eq!(ToWorker::decode(m.byte()), Some(m));
        }
        assert_eq!(ToWorker::decode(b'x'), None);
        for m in [
            ToSupervisor::Ready,
            ToSupervisor::Stop,
            ToSupervisor::Heartbeat,
        ] {
            assert_eq!(ToSupervisor::decode(m.byte(), true), m);
        }
        // An external command that writes anything, even 'R', asks for a stop.
        for b in [b'R', b'S', b'H', b'\n', 0] {
            assert_eq!(ToSupervisor::decode(b, false), ToSupervisor::Stop);
        }
    }
}
