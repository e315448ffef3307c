//! Starting a worker process: its environment ([`crate::control::WorkerEnv`]
//! on top of drover's own, minus what drover reserves), its descriptors, the
//! fork + exec ([`crate::sys::Spawn`]) and the words for an exec that failed.
//! Mechanism only: *when* to start is `policy`'s.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::control::{self, OwnWorker, SupervisorEnd, ToSupervisor, WorkerEnv};
use crate::error::Error;
use crate::plan::AppKind;
use crate::sys::SharedWords;

/// What every start of every worker shares.
pub struct Spawner {
    /// What the workers run.
    pub app: AppKind,
    /// drover's environment minus the reserved variables.
    base_env: Vec<(Vec<u8>, Vec<u8>)>,
    /// The HTTP metrics region (drover's own workers).
    region: Option<Arc<SharedWords>>,
    /// `NOTIFY_SOCKET` for the workers, when drover listens for sd_notify.
    pub notify_socket: Option<String>,
    /// `--log-format` and `--log-level`, for drover's own workers.
    log: (String, String),
    /// Each worker has a socket of its own (`--balance reuseport`).
    pub own_sockets: bool,
    /// How often drover's own workers send a heartbeat (`--worker-timeout`).
    pub heartbeat: Option<std::time::Duration>,
    /// `WATCHDOG_USEC` for external workers (with `NOTIFY_SOCKET`).
    pub watchdog_usec: Option<u64>,
}

/// A started worker: its pid and the supervisor's end of its control socket.
pub struct Started {
    /// Its pid.
    pub pid: i32,
    /// The control socket.
    pub ctl: SupervisorEnd,
}

impl Spawner {
    /// Prepares starts of `app`.
    pub fn new(app: AppKind, region: Option<Arc<SharedWords>>, log: (String, String)) -> Spawner {
        let base_env = std::env::vars_os()
            .filter(|(k, _)| !control::is_reserved(k.as_bytes()))
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        Spawner {
            app,
            base_env,
            region,
            notify_socket: None,
            log,
            own_sockets: false,
            heartbeat: None,
            watchdog_usec: None,
        }
    }

    /// Whether the workers are drover's own (built-in or library app).
    pub fn own(&self) -> bool {
        matches!(self.app, AppKind::Builtin)
    }

    /// Starts worker `id` of `workers` with `context` on the `listener`
    /// descriptor; messages from its control socket go to `on_message`.
    pub fn spawn(
        &self,
        listener: RawFd,
        id: usize,
        workers: usize,
        context: &serde_json::Value,
        lane: Option<usize>,
        on_message: impl FnMut(ToSupervisor) -> bool + Send + 'static,
    ) -> std::io::Result<Started> {
        let (ctl, theirs) = SupervisorEnd::pair(self.own(), on_message)?;
        let theirs = crate::sys::high_fd(theirs)?;
        let worker = WorkerEnv {
            id,
            workers,
            context: context.clone(),
            own: self.own().then(|| OwnWorker {
                lane,
                log_format: self.log.0.clone(),
                log_level: self.log.1.clone(),
                own_socket: self.own_sockets,
                heartbeat: self.heartbeat,
            }),
            notify_socket: self.notify_socket.clone(),
            watchdog_usec: self.watchdog_usec,
        };
        let mut env = self.base_env.clone();
        env.extend(worker.encode());
        let (program, argv): (OsString, Vec<OsString>) = match &self.app {
            AppKind::Builtin => ("/proc/self/exe".into(), std::env::args_os().collect()),
            AppKind::Command { program, argv } => (program.clone().into(), argv.clone()),
        };
        let mut fds = vec![
            (listener, control::LISTEN_FD),
            (theirs.as_raw_fd(), control::CONTROL_FD),
        ];
        if let (Some(region), true) = (&self.region, self.own()) {
            fds.push((region.raw_fd(), control::METRICS_FD));
        }
        let args: Vec<&OsStr> = argv.iter().map(|a| a.as_os_str()).collect();
        let pid = crate::sys::Spawn::new(&program, &args, &env, &fds)?.spawn()?;
        Ok(Started { pid, ctl })
    }

    /// Words for a worker that could not be started.
    pub fn start_error(&self, e: std::io::Error) -> Error {
        match &self.app {
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
}

/// The interpreter a script's `#!` line names, if any.
fn shebang(program: &PathBuf) -> Option<String> {
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
