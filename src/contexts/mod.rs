//! Worker contexts: one YAML value per worker, and how their count and
//! `--workers` agree. This module owns the YAML rules; it never touches a
//! process or a socket. All YAML parsing goes through [`parse`], so the YAML
//! crate can be swapped in one place.
//!
//! Rules (DESIGN.md): a YAML **sequence** gives worker *i* item *i*, and sets
//! the worker count when `--workers` is absent; any other value (a mapping, a
//! scalar, or an empty document, which is `null`) is every worker's context.
//!
//! # Limits
//! Checked here, so that `drover check`, the start and every reload refuse
//! exactly the same documents:
//! - the whole document is at most [`MAX_CONTEXTS_BYTES`] (1 MiB, what the
//!   API server allows a whole ConfigMap); a file is not even read past it;
//! - one worker's context, as compact JSON, is at most
//!   [`MAX_WORKER_CONTEXT_BYTES`] (127 KiB): a worker process gets it in one
//!   environment variable, and the kernel refuses an `execve` with E2BIG
//!   when one `NAME=value` string exceeds 128 KiB (`MAX_ARG_STRLEN`);
//! - numbers must be finite: JSON has no `.nan` or `.inf`.

pub(crate) mod configmap;
pub(crate) mod file;
pub(crate) mod watch;

use serde_json::Value;

use crate::config::Workers;
use crate::error::{Error, Result};

/// Largest contexts document, in bytes: the API server's limit for a whole
/// ConfigMap (1 MiB).
pub const MAX_CONTEXTS_BYTES: usize = 1024 * 1024;

/// Largest context of one worker, in bytes of compact JSON. A worker gets it
/// as `DROVER_WORKER_CONTEXT=<json>`, and Linux caps one environment string
/// at 128 KiB (`MAX_ARG_STRLEN`, NUL included): 1 KiB is left for the name.
pub const MAX_WORKER_CONTEXT_BYTES: usize = 127 * 1024;

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
    if text.len() > MAX_CONTEXTS_BYTES {
        return Err(Error::Contexts(format!(
            "{origin}: the contexts are {} bytes, more than the limit of {MAX_CONTEXTS_BYTES} bytes (1 MiB, a ConfigMap's own limit)",
            text.len()
        )));
    }
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
    if let Some(at) = non_finite(&yaml, &mut String::new()) {
        return Err(Error::Contexts(format!(
            "{origin}: the number at {at} is not finite (.nan or .inf); contexts must be expressible as JSON, which has no such numbers (quote it to pass a string)"
        )));
    }
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

/// Where in `v` a non-finite number is (`$[2].rate`), if anywhere.
fn non_finite(v: &serde_yaml::Value, at: &mut String) -> Option<String> {
    use serde_yaml::Value as Y;
    let here = |at: &str| {
        if at.is_empty() {
            "the top level".to_string()
        } else {
            format!("${at}")
        }
    };
    match v {
        Y::Number(n) => n.as_f64().is_some_and(|f| !f.is_finite()).then(|| here(at)),
        Y::Sequence(items) => items.iter().enumerate().find_map(|(i, x)| {
            let len = at.len();
            at.push_str(&format!("[{i}]"));
            let r = non_finite(x, at);
            at.truncate(len);
            r
        }),
        Y::Mapping(m) => m.iter().find_map(|(k, x)| {
            let len = at.len();
            match k {
                Y::String(s) => at.push_str(&format!(".{s}")),
                other => at.push_str(&format!(
                    "[{}]",
                    serde_yaml::to_string(other).unwrap_or_default().trim()
                )),
            }
            let r = non_finite(k, at).or_else(|| non_finite(x, at));
            at.truncate(len);
            r
        }),
        Y::Tagged(t) => non_finite(&t.value, at),
        Y::Null | Y::Bool(_) | Y::String(_) => None,
    }
}

/// Checks one worker's context against [`MAX_WORKER_CONTEXT_BYTES`].
pub fn check_worker_size(id: usize, context: &Value, origin: &str) -> Result<()> {
    let len = serde_json::to_string(context).map_or(0, |s| s.len());
    if len > MAX_WORKER_CONTEXT_BYTES {
        return Err(Error::Contexts(format!(
            "{origin}: worker {id}'s context is {len} bytes as JSON, more than the limit of {MAX_WORKER_CONTEXT_BYTES} bytes (127 KiB): a worker gets it in one environment variable, which the kernel caps at 128 KiB (MAX_ARG_STRLEN)"
        )));
    }
    Ok(())
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
            for (i, c) in items.iter().enumerate() {
                check_worker_size(i, c, origin)?;
            }
            Ok(items.clone())
        }
        Contexts::Shared(v) => {
            check_worker_size(0, v, origin)?;
            Ok(vec![v.clone(); wanted.unwrap_or(1)])
        }
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
    fn non_finite_numbers_are_errors_naming_where() {
        for (doc, at) in [
            (".nan", "the top level"),
            ("- 1\n- {rate: .inf}\n", "$[1].rate"),
            ("a: {b: [0, -.inf]}\n", "$.a.b[1]"),
        ] {
            let e = parse(doc, "f").unwrap_err().to_string();
            assert!(e.contains(at) && e.contains("not finite"), "{doc:?}: {e}");
        }
        assert_eq!(
            parse("'.nan'", "f").unwrap(),
            Contexts::Shared(json!(".nan"))
        );
        assert_eq!(
            parse("1.5e3", "f").unwrap(),
            Contexts::Shared(json!(1500.0))
        );
    }

    #[test]
    fn the_document_size_limit_is_enforced_at_parse() {
        let big = format!("x: '{}'\n", "a".repeat(MAX_CONTEXTS_BYTES));
        let e = parse(&big, "f").unwrap_err().to_string();
        assert!(e.contains("1048576"), "{e}");
    }

    #[test]
    fn one_workers_context_is_capped_below_the_kernels_env_limit() {
        let fits = "a".repeat(MAX_WORKER_CONTEXT_BYTES - 2);
        let c = Contexts::PerWorker(vec![json!(1), json!(fits)]);
        assert!(assign(&c, None, || 1, "f").is_ok());
        let over = "a".repeat(MAX_WORKER_CONTEXT_BYTES - 1);
        let c = Contexts::PerWorker(vec![json!(1), json!(over)]);
        let e = assign(&c, None, || 1, "f").unwrap_err().to_string();
        assert!(
            e.contains("worker 1's context") && e.contains("MAX_ARG_STRLEN"),
            "{e}"
        );
        let c = Contexts::Shared(json!({"k": "a".repeat(MAX_WORKER_CONTEXT_BYTES)}));
        assert!(assign(&c, Some(Workers::Count(2)), || 1, "f").is_err());
        // The kernel's own limit, with the variable's name and NUL.
        assert!("DROVER_WORKER_CONTEXT=".len() + MAX_WORKER_CONTEXT_BYTES < 128 * 1024);
    }

    #[test]
    fn empty_sequence_and_non_string_keys_are_errors() {
        let c = parse("[]", "f").unwrap();
        assert!(assign(&c, None, || 1, "f").is_err());
        assert!(parse("{[1, 2]: x}", "f").is_err());
    }
}
