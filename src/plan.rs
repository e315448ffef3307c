//! Turning the command line into a plan: contexts loaded and matched to the
//! worker count, the external command resolved, the token read. Everything
//! that can be wrong with the configuration is found here, before anything is
//! bound or started, so a bad pod fails with exit 78 and nothing half-started.
//! `drover check` prints exactly this plan.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde_json::Value;

use std::net::SocketAddr;

use crate::config::{RunArgs, WorkerReady, Workers};
use crate::contexts;
use crate::error::{Error, Result};
use crate::supervisor::drain::DrainPolicy;
use crate::supervisor::pool::policy::Policy;
use crate::supervisor::pool::table::BackoffLimits;
use crate::supervisor::pool::{Limits, PoolSettings};

/// What each worker runs.
#[derive(Debug, Clone)]
pub enum AppKind {
    /// The built-in or library app (drover's own binary in worker mode).
    Builtin,
    /// An external program, resolved to a path.
    Command {
        /// The resolved executable.
        program: PathBuf,
        /// argv, argv\[0\] included, as given.
        argv: Vec<OsString>,
    },
}

/// Where the contexts come from, for watching them after start.
#[derive(Debug, Clone)]
pub enum ContextsSource {
    /// No contexts configured: every worker's context is `null`.
    None,
    /// `--worker-contexts-file`.
    File(PathBuf),
    /// `--worker-contexts-configmap`, resolved.
    ConfigMap {
        /// As given.
        r: crate::contexts::configmap::ConfigMapRef,
        /// The namespace in use.
        namespace: String,
    },
}

/// Where the shared listener binds.
#[derive(Debug, Clone)]
pub enum ListenAt {
    /// A TCP address, resolved.
    Tcp(SocketAddr),
    /// A Unix socket path (`--uds`).
    Unix(PathBuf),
}

/// The shared listener.
#[derive(Debug, Clone)]
pub struct ListenPlan {
    /// Where.
    pub at: ListenAt,
    /// `--backlog`.
    pub backlog: u32,
    /// `--balance`.
    pub balance: crate::listener::Balance,
}

/// The admin server.
#[derive(Debug, Clone)]
pub struct AdminPlan {
    /// Its address, resolved.
    pub addr: SocketAddr,
}

/// Logging, as workers get it too.
#[derive(Debug, Clone)]
pub struct LogPlan {
    /// `--log-format`.
    pub format: crate::config::LogFormat,
    /// `--log-level`.
    pub level: String,
}

/// A checked configuration, ready to bind and start. The parts each owner
/// needs are typed and checked here once: the listener, the admin server,
/// the drain, the pool's policies; `args` keeps the raw options for what
/// only describes or watches (`drover check`, the contexts watch).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The options as given.
    pub args: RunArgs,
    /// The shared listener.
    pub listen: ListenPlan,
    /// The admin server.
    pub admin: AdminPlan,
    /// The drain.
    pub drain: DrainPolicy,
    /// Logging.
    pub log: LogPlan,
    /// One context per worker; its length is the worker count.
    pub contexts: Vec<Value>,
    /// Where the contexts came from, for logs.
    pub contexts_origin: String,
    /// Where to watch them.
    pub contexts_source: ContextsSource,
    /// The YAML text they were read from (to tell real changes from repeats).
    pub contexts_text: String,
    /// The source's version (ConfigMap resourceVersion, file content hash).
    pub contexts_version: String,
    /// What each worker runs.
    pub app: AppKind,
    /// The admin bearer token (re-read when its file changes).
    pub token: Option<crate::admin::Token>,
    /// The watchdog and the recycling limits.
    pub limits: Limits,
    per_worker: bool,
}

impl Plan {
    /// Whether the contexts give one item per worker (so they fix the count).
    pub fn contexts_per_worker(&self) -> bool {
        self.per_worker
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.contexts.len()
    }

    /// Whether the app runs inside the supervisor process (no child).
    pub fn in_process(&self) -> bool {
        matches!(self.app, AppKind::Builtin) && self.workers() == 1
    }

    /// Whether external workers may report readiness with sd_notify.
    pub fn notify(&self) -> bool {
        matches!(self.app, AppKind::Command { .. })
            && matches!(
                self.args.worker_ready,
                WorkerReady::Notify | WorkerReady::Auto
            )
    }

    /// Whether external workers are up once seen accepting on the socket.
    pub fn detect_accepting(&self) -> bool {
        matches!(self.app, AppKind::Command { .. }) && self.args.worker_ready == WorkerReady::Auto
    }

    /// The pool's settings: its rules and how it tells workers to leave.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            policy: Policy {
                restart: self.args.restart,
                graceful: self.drain.graceful,
                ready_timeout: self.args.worker_ready_timeout,
                backoff: BackoffLimits::default(),
                lanes: crate::metrics::LANES,
            },
            stop_signal: self.args.stop_signal.signo,
            ready_when_running: self.args.worker_ready == WorkerReady::Running,
            limits: self.limits.clone(),
        }
    }
}

/// Loads and checks everything; `validate` checks a context against the
/// library app's context type (built-in and library apps only).
pub fn load(args: RunArgs, validate: &dyn Fn(usize, &Value) -> Result<(), String>) -> Result<Plan> {
    let (text, origin, source, version) =
        match (&args.worker_contexts_file, &args.worker_contexts_configmap) {
            (Some(path), _) => {
                let text =
                    contexts::file::read_contexts(path).map_err(|source| Error::ReadFile {
                        what: "worker contexts file",
                        path: path.clone(),
                        source,
                    })?;
                let version = crate::contexts::file::content_version(&text);
                (
                    text,
                    path.display().to_string(),
                    ContextsSource::File(path.clone()),
                    version,
                )
            }
            (None, Some(cm)) => {
                let r = crate::contexts::configmap::parse_ref(cm)?;
                // A short-lived runtime: the supervisor builds its own client
                // (a client is tied to the runtime that made it).
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Error::io("cannot start the runtime", e))?;
                let (src, fetched) = rt.block_on(async {
                    let src =
                        crate::contexts::configmap::connect(&r, &args.worker_contexts_key).await?;
                    let fetched =
                        crate::contexts::configmap::fetch_at_start(&src, args.kube_timeout).await?;
                    Ok::<_, Error>((src, fetched))
                })?;
                rt.shutdown_timeout(std::time::Duration::from_millis(100));
                let source = ContextsSource::ConfigMap {
                    r,
                    namespace: src.namespace.clone(),
                };
                (fetched.text, src.origin(), source, fetched.resource_version)
            }
            (None, None) => (
                String::new(),
                "defaults".to_string(),
                ContextsSource::None,
                String::new(),
            ),
        };
    let loaded = contexts::parse(&text, &origin)?;
    let contexts = contexts::assign(&loaded, args.workers, crate::cgroup::allowed_cpus, &origin)?;
    if args.workers == Some(Workers::Auto) {
        tracing::info!(
            workers = contexts.len(),
            "--workers auto: CPUs allowed by the cgroup quota"
        );
    }

    let app = match args.command.split_first() {
        None => AppKind::Builtin,
        Some((program, _)) => AppKind::Command {
            program: resolve_command(program)?,
            argv: args.command.iter().map(OsString::from).collect(),
        },
    };
    if matches!(app, AppKind::Builtin) {
        for (i, c) in contexts.iter().enumerate() {
            validate(i, c).map_err(|e| Error::Contexts(format!("{origin}: {e}")))?;
        }
    }

    let token = match &args.admin_token_file {
        None => None,
        Some(path) => Some(crate::admin::Token::load(path)?),
    };
    // Resolved here, so that `drover check` fails exactly when a run would.
    let listen = ListenPlan {
        at: match &args.uds {
            Some(uds) if uds.as_os_str().is_empty() => {
                return Err(Error::Config("--uds needs a path".into()))
            }
            Some(uds) => ListenAt::Unix(uds.clone()),
            None => ListenAt::Tcp(crate::listener::resolve(&args.host, args.port, "")?),
        },
        backlog: args.backlog,
        balance: args.balance,
    };
    if args.balance == crate::listener::Balance::Reuseport && args.uds.is_some() {
        return Err(Error::Config(
            "--balance reuseport needs a TCP listener: Unix sockets have no SO_REUSEPORT groups (drop --uds or use --balance shared)".into(),
        ));
    }
    let admin = AdminPlan {
        addr: crate::listener::resolve(&args.admin_host, args.admin_port, " (admin)")?,
    };
    let drain = DrainPolicy {
        delay: args.drain_delay,
        graceful: args.graceful_timeout,
    };
    let log = LogPlan {
        format: args.log_format,
        level: args.log_level.clone(),
    };
    let per_worker = matches!(loaded, contexts::Contexts::PerWorker(_));
    let limits = limits(&args)?;
    if matches!(app, AppKind::Command { .. }) && limits.max_requests.is_some() {
        tracing::warn!(
            "--max-requests counts the requests of drover's own workers only: an external command's workers are not recycled by it (use --max-worker-memory or --max-worker-lifetime)"
        );
    }
    let recycling = limits.max_requests.is_some()
        || limits.max_memory.is_some()
        || limits.max_lifetime.is_some();
    if matches!(app, AppKind::Builtin) && contexts.len() == 1 && recycling {
        // (--worker-timeout is on by default: not worth a warning.)
        tracing::warn!(
            "--workers 1 with the built-in or a library app serves in-process: the --max-* recycling limits (and --worker-timeout) apply only to worker processes"
        );
    }
    let mut plan = Plan {
        limits,
        per_worker,
        listen,
        admin,
        drain,
        log,
        args,
        contexts,
        contexts_origin: origin,
        contexts_source: source,
        contexts_text: text,
        contexts_version: version,
        app,
        token,
    };
    if plan.in_process() {
        // One process serves: nothing to spread, and no group to join.
        plan.listen.balance = crate::listener::Balance::Shared;
    }
    Ok(plan)
}

/// `--worker-timeout` and the recycling limits, checked (exit 78 when bad).
fn limits(a: &RunArgs) -> Result<Limits> {
    use crate::config::{parse_duration, parse_size};
    let bad = |opt: &str, e: String| Error::Config(format!("--{opt}: {e}"));
    let duration = |opt: &str, v: &str| parse_duration(v).map_err(|e| bad(opt, e));
    let count = |opt: &str, v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|_| bad(opt, format!("`{v}` is not a whole number (0 = off)")))
    };
    let nonzero = |d: std::time::Duration| (!d.is_zero()).then_some(d);
    let worker_timeout = nonzero(duration("worker-timeout", &a.worker_timeout)?);
    if worker_timeout.is_some_and(|t| t < std::time::Duration::from_millis(100)) {
        return Err(bad(
            "worker-timeout",
            format!(
                "`{}` is shorter than 100ms (0 turns it off)",
                a.worker_timeout
            ),
        ));
    }
    let max_requests = count("max-requests", &a.max_requests)?;
    let jitter = count("max-requests-jitter", &a.max_requests_jitter)?;
    let memory = parse_size(&a.max_worker_memory).map_err(|e| bad("max-worker-memory", e))?;
    let lifetime = duration("max-worker-lifetime", &a.max_worker_lifetime)?;
    let lifetime_jitter = duration("max-worker-lifetime-jitter", &a.max_worker_lifetime_jitter)?;
    Ok(Limits {
        worker_timeout,
        max_requests: (max_requests > 0).then_some((max_requests, jitter)),
        max_memory: (memory > 0).then_some(memory),
        max_lifetime: nonzero(lifetime).map(|l| (l, lifetime_jitter)),
    })
}

/// Finds `program` the way a shell would, so that "not found" and "not
/// executable" are configuration errors at start, not a crash loop.
pub fn resolve_command(program: &str) -> Result<PathBuf> {
    let fail = |reason: String| Error::Command {
        program: program.to_string(),
        reason,
    };
    if program.is_empty() {
        return Err(fail("the command is empty".into()));
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return check_executable(&p).map(|_| p).map_err(fail);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut denied = None;
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.exists() {
            match check_executable(&candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) => denied = Some(e),
            }
        }
    }
    Err(fail(denied.unwrap_or_else(|| {
        format!(
            "not found in PATH={} (a shell would exit 127)",
            path.to_string_lossy()
        )
    })))
}

fn check_executable(p: &Path) -> std::result::Result<(), String> {
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("{} does not exist (a shell would exit 127)", p.display())
        }
        _ => format!("{}: {e} (a shell would exit 126)", p.display()),
    })?;
    if meta.is_dir() {
        return Err(format!(
            "{} is a directory (a shell would exit 126)",
            p.display()
        ));
    }
    nix::unistd::access(p, nix::unistd::AccessFlags::X_OK)
        .map_err(|_| format!("{} is not executable (a shell would exit 126)", p.display()))
}

/// The plan as `drover check` prints it.
pub fn describe(plan: &Plan) -> String {
    use std::fmt::Write;
    let a = &plan.args;
    let mut s = String::new();
    let listener = match &a.uds {
        Some(p) => format!("unix:{}", p.display()),
        None if a.host.contains(':') => format!("[{}]:{}", a.host, a.port),
        None => format!("{}:{}", a.host, a.port),
    };
    let cap = crate::listener::somaxconn();
    let _ = writeln!(s, "listener: {listener}");
    match cap {
        Some(c) if c < a.backlog => {
            let _ = writeln!(
                s,
                "backlog: {} (capped to {c} by net.core.somaxconn)",
                a.backlog
            );
        }
        _ => {
            let _ = writeln!(s, "backlog: {}", a.backlog);
        }
    }
    if a.balance == crate::listener::Balance::Reuseport && !plan.in_process() {
        let _ = writeln!(
            s,
            "balance: reuseport (one socket per worker, steered round-robin)"
        );
    }
    let mode = match &plan.app {
        AppKind::Builtin if plan.in_process() => "built-in app, in-process".to_string(),
        AppKind::Builtin => "built-in app, worker processes".to_string(),
        AppKind::Command { program, argv } => format!(
            "command {} (argv: {})",
            program.display(),
            argv.iter()
                .map(|x| x.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    };
    let _ = writeln!(s, "workers: {} ({mode})", plan.workers());
    match &plan.contexts_source {
        ContextsSource::ConfigMap { .. } => {
            let _ = writeln!(
                s,
                "contexts from: {} (resourceVersion {}, watched)",
                plan.contexts_origin, plan.contexts_version
            );
        }
        ContextsSource::File(_) => {
            let _ = writeln!(s, "contexts from: {} (watched)", plan.contexts_origin);
        }
        ContextsSource::None => {
            let _ = writeln!(s, "contexts from: none (every worker's context is null)");
        }
    }
    for (i, c) in plan.contexts.iter().enumerate() {
        let _ = writeln!(s, "  worker {i}: {c}");
    }
    let _ = writeln!(
        s,
        "admin: {}:{}{}",
        a.admin_host,
        a.admin_port,
        if plan.token.is_some() {
            " (bearer token required for /admin/stop)"
        } else {
            " (stop from loopback only)"
        }
    );
    let _ = writeln!(
        s,
        "drain: delay {:?}, graceful timeout {:?}, stop signal {}, restart {:?}",
        a.drain_delay, a.graceful_timeout, a.stop_signal.name, a.restart
    );
    let l = &plan.limits;
    let off = || "off".to_string();
    let _ = writeln!(
        s,
        "watchdog: worker timeout {}; recycle after requests {}, memory {}, lifetime {}",
        l.worker_timeout.map_or_else(off, |t| format!("{t:?}")),
        l.max_requests
            .map_or_else(off, |(n, j)| format!("{n} (+ up to {j})")),
        l.max_memory.map_or_else(off, |m| format!("{m} bytes")),
        l.max_lifetime
            .map_or_else(off, |(d, j)| format!("{d:?} (+ up to {j:?})")),
    );
    s
}
