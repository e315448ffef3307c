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

/// Lets a repeated warning through at most once per [`Throttle::EVERY`],
/// counting what it held back, so that a failure repeating in a tight loop
/// (accept failing with EMFILE, say) cannot flood the log.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<std::time::Instant>,
    held: u64,
}

impl Throttle {
    /// At most one line per this long.
    pub(crate) const EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    /// One more occurrence: `Some(n)` when it should be logged now, `n`
    /// being the occurrences it stands for (itself and those held back).
    pub(crate) fn hit(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        self.held += 1;
        match self.last {
            Some(t) if now.duration_since(t) < Self::EVERY => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_through_per_second_and_counts_the_rest() {
        let mut t = Throttle::default();
        assert_eq!(t.hit(), Some(1));
        for _ in 0..99 {
            assert_eq!(t.hit(), None);
        }
        t.last = Some(std::time::Instant::now() - Throttle::EVERY);
        assert_eq!(t.hit(), Some(100));
    }
}
