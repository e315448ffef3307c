//! The command line and its `DROVER_<NAME>` environment twins, exactly as
//! `DESIGN.md` names them. Parsing only: nothing here binds, reads files or
//! starts anything.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// drover: container entrypoint and pre-fork supervisor.
#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Container entrypoint and pre-fork supervisor: one shared socket, N workers, one stop flag",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// `stop`, `check` or `install`; without one, drover runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options for a run.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask a running drover to stop (for preStop hooks in images without curl).
    Stop(StopArgs),
    /// Load the configuration and worker contexts, print the plan, exit 0 or 78.
    Check(Box<RunArgs>),
    /// Copy this binary to DIR/drover (atomically, mode 0755), e.g. into an
    /// emptyDir from an initContainer, to run drover in front of another image.
    Install {
        /// Directory to copy drover into; it must exist.
        dir: PathBuf,
    },
}

/// `drover stop` options.
#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    /// Admin server base URL [default: http://127.0.0.1:$DROVER_ADMIN_PORT or :8001].
    #[arg(long, env = "DROVER_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// File holding the bearer token [default: $DROVER_ADMIN_TOKEN_FILE].
    #[arg(long, env = "DROVER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, env = "DROVER_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Options of a run (and of `drover check`).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Listen address; `::` is dual-stack.
    #[arg(long, env = "DROVER_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Listen port; 0 picks a free port and logs it.
    #[arg(long, env = "DROVER_PORT", default_value_t = 8000)]
    pub port: u16,
    /// listen(2) backlog (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "DROVER_BACKLOG", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub backlog: u32,
    /// How new connections spread over the worker processes: `shared` (one
    /// socket that every worker accepts on) or `reuseport` (one socket per
    /// worker in a SO_REUSEPORT group that drover holds and steers each new
    /// connection through, round-robin over the workers that are up).
    #[arg(long, env = "DROVER_BALANCE", value_enum, default_value_t = crate::listener::Balance::Shared)]
    pub balance: crate::listener::Balance,
    /// Listen on this Unix socket instead of TCP; the file is removed on exit.
    #[arg(long, env = "DROVER_UDS")]
    pub uds: Option<PathBuf>,
    /// Number of workers, or `auto` (CPUs allowed by the cgroup quota).
    /// Default: the length of a contexts sequence, else 1.
    #[arg(long, env = "DROVER_WORKERS", value_parser = parse_workers)]
    pub workers: Option<Workers>,
    /// YAML worker contexts from a file (e.g. a mounted ConfigMap).
    #[arg(
        long,
        env = "DROVER_WORKER_CONTEXTS_FILE",
        conflicts_with = "worker_contexts_configmap"
    )]
    pub worker_contexts_file: Option<PathBuf>,
    /// YAML worker contexts from a ConfigMap through the Kubernetes API: [NS/]NAME.
    #[arg(long, env = "DROVER_WORKER_CONTEXTS_CONFIGMAP")]
    pub worker_contexts_configmap: Option<String>,
    /// Key inside the ConfigMap.
    #[arg(
        long,
        env = "DROVER_WORKER_CONTEXTS_KEY",
        default_value = "worker-contexts.yaml"
    )]
    pub worker_contexts_key: String,
    /// How long to retry an unreachable Kubernetes API (or its 5xx) at start.
    #[arg(long, env = "DROVER_KUBE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub kube_timeout: Duration,
    /// What to do when the watched contexts change.
    #[arg(long, env = "DROVER_ON_CONTEXTS_CHANGE", value_enum, default_value_t = OnContextsChange::Restart)]
    pub on_contexts_change: OnContextsChange,
    /// Admin server address.
    #[arg(long, env = "DROVER_ADMIN_HOST", default_value = "0.0.0.0")]
    pub admin_host: String,
    /// Admin server port (0 picks a free one).
    #[arg(long, env = "DROVER_ADMIN_PORT", default_value_t = 8001)]
    pub admin_port: u16,
    /// Bearer token file for /admin/stop; without it only loopback callers may stop.
    #[arg(long, env = "DROVER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// After a stop, keep accepting this long while /readyz is 503.
    #[arg(long, env = "DROVER_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub drain_delay: Duration,
    /// Then stop accepting; in-flight work gets this long before workers are killed.
    #[arg(long, env = "DROVER_GRACEFUL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub graceful_timeout: Duration,
    /// Signal external workers get when accepting stops (TERM, QUIT, INT, HUP).
    #[arg(long, env = "DROVER_STOP_SIGNAL", default_value = "TERM", value_parser = parse_stop_signal)]
    pub stop_signal: StopSignal,
    /// Restart policy for workers that exit on their own.
    #[arg(long, env = "DROVER_RESTART", value_enum, default_value_t = Restart::Always)]
    pub restart: Restart,
    /// When an external worker counts as up: `auto` (READY=1 to
    /// $NOTIFY_SOCKET if it speaks sd_notify, else once it accepts on the
    /// socket), `notify` (READY=1 only) or `running` (at once).
    #[arg(long, env = "DROVER_WORKER_READY", value_enum, default_value_t = WorkerReady::Auto)]
    pub worker_ready: WorkerReady,
    /// A worker not up this long after its start is a failed start.
    #[arg(long, env = "DROVER_WORKER_READY_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub worker_ready_timeout: Duration,
    /// A worker of drover's own app whose event loop is silent this long is
    /// SIGKILLed and replaced (its heartbeat is stuck); an external app that
    /// sent sd_notify's `WATCHDOG=1` gets this as `WATCHDOG_USEC`. `0` = off.
    #[arg(long, env = "DROVER_WORKER_TIMEOUT", default_value = "30s")]
    pub worker_timeout: String,
    /// Recycle a worker of drover's own app after it answered this many
    /// requests (plus up to `--max-requests-jitter`). `0` = off.
    #[arg(long, env = "DROVER_MAX_REQUESTS", default_value = "0")]
    pub max_requests: String,
    /// Up to this many more requests, random per process, so that workers
    /// do not all recycle together.
    #[arg(long, env = "DROVER_MAX_REQUESTS_JITTER", default_value = "0")]
    pub max_requests_jitter: String,
    /// Recycle a worker whose process group's resident memory is above this
    /// (e.g. `512Mi`, `1G`; checked every second). `0` = off.
    #[arg(long, env = "DROVER_MAX_WORKER_MEMORY", default_value = "0")]
    pub max_worker_memory: String,
    /// Recycle a worker after it ran this long (e.g. `1h`). `0` = off.
    #[arg(long, env = "DROVER_MAX_WORKER_LIFETIME", default_value = "0")]
    pub max_worker_lifetime: String,
    /// Up to this much longer, random per process.
    #[arg(long, env = "DROVER_MAX_WORKER_LIFETIME_JITTER", default_value = "0")]
    pub max_worker_lifetime_jitter: String,
    /// Log format.
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or tracing filter (e.g. `info`, `drover=debug`).
    #[arg(long, env = "DROVER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// External command to run as each worker (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Most workers one drover runs.
pub const MAX_WORKERS: usize = 1024;

/// `--workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// A fixed count, at least 1.
    Count(usize),
    /// CPUs allowed by the cgroup quota.
    Auto,
}

/// `--on-contexts-change`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnContextsChange {
    /// Rolling restart, one worker at a time.
    Restart,
    /// Log only.
    Ignore,
}

/// `--restart`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Restart {
    /// Restart every worker that exits.
    Always,
    /// Restart only workers that exit non-zero or by a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// `--worker-ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkerReady {
    /// Up at `READY=1`, or once seen accepting on the shared socket.
    Auto,
    /// Up once the process runs.
    Running,
    /// Up once it sends `READY=1` to `$NOTIFY_SOCKET`.
    Notify,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The option's value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// `--stop-signal`: a signal number together with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal {
    /// The signal number.
    pub signo: i32,
    /// Its short name, e.g. `TERM`.
    pub name: &'static str,
}

fn parse_workers(s: &str) -> Result<Workers, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Workers::Auto);
    }
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (or `auto`)".into()),
        Ok(n) if n > MAX_WORKERS => Err(format!("at most {MAX_WORKERS} workers")),
        Ok(n) => Ok(Workers::Count(n)),
        Err(_) => Err(format!("`{s}` is not a number or `auto`")),
    }
}

/// Parses durations such as `0s`, `500ms`, `30s`, `1m`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err(format!("`{s}` is not a non-negative duration"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 500ms, 30s or 1m: {e}"))
}

/// Parses a memory size: bytes, or a number with a decimal (`k`, `M`, `G`,
/// `T`) or binary (`Ki`, `Mi`, `Gi`, `Ti`) suffix as Kubernetes writes them,
/// optionally followed by `B` (`64Mi`, `1G`, `512MiB`, `1.5Gi`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" | "KI" => 1 << 10,
        "Mi" | "MI" => 1 << 20,
        "Gi" | "GI" => 1 << 30,
        "Ti" | "TI" => 1 << 40,
        _ => {
            return Err(format!(
                "`{s}` is not a size like 512Mi, 1Gi or 1G (suffixes k, M, G, T, Ki, Mi, Gi, Ti)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 512Mi, 1Gi or 1G"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(bytes as u64)
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
}

fn parse_stop_signal(s: &str) -> Result<StopSignal, String> {
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let (signo, name) = match name {
        "TERM" => (libc::SIGTERM, "TERM"),
        "QUIT" => (libc::SIGQUIT, "QUIT"),
        "INT" => (libc::SIGINT, "INT"),
        "HUP" => (libc::SIGHUP, "HUP"),
        _ => return Err(format!("`{s}` is not one of TERM, QUIT, INT, HUP")),
    };
    Ok(StopSignal { signo, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["12xyz", "", "Mi", "-1Mi", "1..2G", "64 Mi q", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn workers_and_signals() {
        assert_eq!(parse_workers("auto").unwrap(), Workers::Auto);
        assert_eq!(parse_workers("4").unwrap(), Workers::Count(4));
        assert!(parse_workers("0").is_err());
        assert!(parse_workers("-2").is_err());
        assert_eq!(parse_stop_signal("sigquit").unwrap().signo, libc::SIGQUIT);
        assert!(parse_stop_signal("KILL").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
