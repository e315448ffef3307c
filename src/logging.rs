//! Log setup: text or JSON lines on stderr (the container's log), filtered
//! by `--log-level`. Workers log the same way, tagged with their id.

use crate::config::LogFormat;

/// Installs the global subscriber. A bad filter falls back to `info` with a
/// warning rather than failing the pod.
pub fn init(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let (filter, bad) = match EnvFilter::try_new(level) {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new("info"), true),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if bad {
        tracing::warn!(level, "--log-level is not a valid filter; using info");
    }
}
