//! Worker contexts: one YAML value per worker, and how their count and
//! `--workers` agree. This module owns the YAML rules; it never touches a
//! process or a socket. All YAML parsing goes through [`parse`], so the YAML
//! crate can be swapped in one place.
//!
//! Rules (DESIGN.md): a YAML **sequence** gives worker *i* item *i*, and sets
//! the worker count when `--workers` is absent; any other value (a mapping, a
//! scalar, or an empty document, which is `null`) is every worker's context.

pub(crate) mod configmap;
pub(crate) mod file;
pub(crate) mod watch;

use serde_json::Value;

use crate::config::Workers;
use crate::error::{Error, Result};

/// A value read by a watch of the contexts' source.
#[derive(Debug, Clone)]
pub struct Update {
    /// The YAML text, or why none could be read (the watch reports it so it
    /// is logged and counted as a failed reload).
    pub text: std::result::Result<String, String>,
    /// Where it came from, for messages.
    pub origin: String,
    /// The source's version: a ConfigMap's `resourceVersion`, a file's hash.
    pub version: String,
}

/// Contexts as loaded, before they are matched to a worker count.
#[derive(Debug, Clone, PartialEq)]
pub enum Contexts {
    /// One context per worker, in worker order.
    PerWorker(Vec<Value>),
    /// The same context for every worker.
    Shared(Value),
}

impl Default for Contexts {
    fn default() -> Self {
        Contexts::Shared(Value::Null)
    }
}

/// Parses YAML text from `origin` (a file path or a ConfigMap key, used in
/// messages) into contexts, as JSON values.
pub fn parse(text: &str, origin: &str) -> Result<Contexts> {
    let yaml: serde_yaml::Value = if text.trim().is_empty() {
        serde_yaml::Value::Null
    } else {
        serde_yaml::from_str(text).map_err(|e| {
            let at = match e.location() {
                Some(l) => format!(" at line {}, column {}", l.line(), l.column()),
                None => String::new(),
            };
            Error::Contexts(format!("{origin}: malformed YAML{at}: {e}"))
        })?
    };
    let json = serde_json::to_value(&yaml).map_err(|e| {
        Error::Contexts(format!(
            "{origin}: contexts must be expressible as JSON (mapping keys must be strings): {e}"
        ))
    })?;
    Ok(match json {
        Value::Array(items) => Contexts::PerWorker(items),
        other => Contexts::Shared(other),
    })
}

/// Decides the worker count from `--workers`, the contexts and the CPU quota,
/// and returns one context per worker.
pub fn assign(
    contexts: &Contexts,
    workers: Option<Workers>,
    auto_cpus: impl FnOnce() -> usize,
    origin: &str,
) -> Result<Vec<Value>> {
    let wanted = match workers {
        Some(Workers::Count(n)) => Some(n),
        Some(Workers::Auto) => Some(auto_cpus().max(1)),
        None => None,
    };
    match contexts {
        Contexts::PerWorker(items) if items.len() > crate::config::MAX_WORKERS => {
            Err(Error::Contexts(format!(
                "{origin}: {} worker contexts; at most {} workers are supported",
                items.len(),
                crate::config::MAX_WORKERS
            )))
        }
        Contexts::PerWorker(items) => {
            if items.is_empty() {
                return Err(Error::Contexts(format!(
                    "{origin}: the contexts sequence is empty; give one item per worker"
                )));
            }
            if let Some(n) = wanted {
                if n != items.len() {
                    let how = if workers == Some(Workers::Auto) {
                        format!("--workers auto resolved to {n}")
                    } else {
                        format!("--workers is {n}")
                    };
                    return Err(Error::Contexts(format!(
                        "{origin}: {} worker contexts but {how}; make them agree or drop --workers",
                        items.len()
                    )));
                }
            }
            Ok(items.clone())
        }
        Contexts::Shared(v) => Ok(vec![v.clone(); wanted.unwrap_or(1)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sequence_gives_one_context_per_worker_and_the_count() {
        let c = parse("- {shard: 0}\n- {shard: 1}\n", "f").unwrap();
        let v = assign(&c, None, || 9, "f").unwrap();
        assert_eq!(v, vec![json!({"shard": 0}), json!({"shard": 1})]);
    }

    #[test]
    fn mapping_is_shared_by_every_worker() {
        let c = parse("model: small\nbatch: 8\n", "f").unwrap();
        let v = assign(&c, Some(Workers::Count(3)), || 9, "f").unwrap();
        assert_eq!(v.len(), 3);
        assert!(v
            .iter()
            .all(|x| x == &json!({"model": "small", "batch": 8})));
    }

    #[test]
    fn scalar_and_empty_documents_are_shared() {
        assert_eq!(parse("42", "f").unwrap(), Contexts::Shared(json!(42)));
        assert_eq!(parse("", "f").unwrap(), Contexts::Shared(Value::Null));
        assert_eq!(parse("~", "f").unwrap(), Contexts::Shared(Value::Null));
    }

    #[test]
    fn count_mismatch_is_an_error_naming_both_numbers() {
        let c = parse("[a, b, c]", "ctx.yaml").unwrap();
        let e = assign(&c, Some(Workers::Count(2)), || 9, "ctx.yaml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("3 worker contexts") && msg.contains("--workers is 2"),
            "{msg}"
        );
        let e = assign(&c, Some(Workers::Auto), || 2, "ctx.yaml").unwrap_err();
        assert!(e.to_string().contains("auto resolved to 2"), "{e}");
        assert!(assign(&c, Some(Workers::Auto), || 3, "ctx.yaml").is_ok());
    }

    #[test]
    fn malformed_yaml_names_line_and_column() {
        let e = parse("a: 1\nb: [1, 2\nc: 3\n", "ctx.yaml").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("ctx.yaml: malformed YAML at line "),
            "{msg}"
        );
        assert!(msg.contains("column"), "{msg}");
    }

    #[test]
    fn empty_sequence_and_non_string_keys_are_errors() {
        let c = parse("[]", "f").unwrap();
        assert!(assign(&c, None, || 1, "f").is_err());
        assert!(parse("{[1, 2]: x}", "f").is_err());
    }
}
