//! The contexts' source after start: a watch of the file or the ConfigMap,
//! each change checked as at start (YAML, size limits, count, the app's
//! type) before it is handed to the supervisor. It never starts or stops a
//! process.
//!
//! The check runs on tokio's blocking pool, never on the supervisor's event
//! loop: parsing a large document takes a while, and the admin port (the
//! kubelet's probes) is served by that loop.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::app::Validate;
use crate::config::{OnContextsChange, Workers};
use crate::contexts::{self, Update};
use crate::metrics::Metrics;
use crate::plan::{AppKind, ContextsSource, Plan};

/// The contexts' source after start: what it last said, and what to do with
/// a change. A change that is invalid (bad YAML, a count `--workers` forbids,
/// a context the app's type rejects) is logged, counted and ignored: the
/// workers keep their last good contexts.
pub(crate) struct ContextsWatch {
    rx: Option<mpsc::UnboundedReceiver<Update>>,
    /// The text in force.
    text: String,
    /// `configmap`, `file` or `none` (the info metric's label).
    pub(crate) source: &'static str,
    /// The version of the last change handed out by [`ContextsWatch::next`]:
    /// in force once the pool has rolled it (`drover_contexts_info`).
    pub(crate) version: String,
    workers: Option<Workers>,
    policy: OnContextsChange,
    /// Checks contexts against the app's type (built-in and library apps).
    validate: Option<Arc<Validate>>,
    metrics: Metrics,
    /// The contexts in force give one item per worker.
    pub(crate) per_worker: bool,
    /// The change being checked off the event loop. Kept here, not in the
    /// `next` future, so that `next` stays cancel-safe inside a `select!`.
    checking: Option<(Update, JoinHandle<Checked>)>,
}

/// A change, parsed and checked: the contexts per worker, and whether the
/// document gave one item per worker.
type Checked = std::result::Result<(Vec<serde_json::Value>, bool), String>;

/// Everything the check of a change needs, movable to another thread.
struct Check {
    workers: Option<Workers>,
    validate: Option<Arc<Validate>>,
}

impl Check {
    fn run(&self, text: &str, origin: &str) -> Checked {
        let parsed = contexts::parse(text, origin).map_err(|e| e.to_string())?;
        let assigned = contexts::assign(&parsed, self.workers, crate::cgroup::allowed_cpus, origin)
            .map_err(|e| e.to_string())?;
        if let Some(validate) = &self.validate {
            for (i, c) in assigned.iter().enumerate() {
                validate(i, c)?;
            }
        }
        Ok((assigned, matches!(parsed, contexts::Contexts::PerWorker(_))))
    }
}

impl ContextsWatch {
    pub(crate) fn start(plan: &Plan, validate: Arc<Validate>, metrics: Metrics) -> ContextsWatch {
        let (tx, rx) = mpsc::unbounded_channel();
        let source = match &plan.contexts_source {
            ContextsSource::File(path) => {
                super::file::spawn(path.clone(), plan.contexts_text.clone(), tx);
                "file"
            }
            ContextsSource::ConfigMap { r, namespace } => {
                let r = super::configmap::ConfigMapRef {
                    namespace: Some(namespace.clone()),
                    name: r.name.clone(),
                };
                let key = plan.args.worker_contexts_key.clone();
                let version = plan.contexts_version.clone();
                tokio::spawn(async move {
                    match super::configmap::connect(&r, &key).await {
                        Ok(src) => super::configmap::watch(src, version, tx).await,
                        Err(e) => tracing::error!("cannot watch the contexts: {e}"),
                    }
                });
                "configmap"
            }
            ContextsSource::None => "none",
        };
        metrics.set_contexts(source, &plan.contexts_version);
        ContextsWatch {
            rx: Some(rx),
            text: plan.contexts_text.clone(),
            source,
            version: plan.contexts_version.clone(),
            workers: plan.args.workers,
            policy: plan.args.on_contexts_change,
            validate: matches!(plan.app, AppKind::Builtin).then_some(validate),
            metrics,
            per_worker: plan.contexts_per_worker(),
            checking: None,
        }
    }

    /// The next valid change to apply; None once the source can say no more.
    /// Cancel-safe: a change being checked when the future is dropped is
    /// picked up by the next call.
    pub(crate) async fn next(&mut self, in_process: bool) -> Option<Vec<serde_json::Value>> {
        loop {
            if self.checking.is_none() {
                let update = match self.rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => None,
                };
                let Some(update) = update else {
                    self.rx = None;
                    return None;
                };
                let text = match &update.text {
                    Err(e) => {
                        self.failed(&update.origin, e);
                        continue;
                    }
                    Ok(t) if *t == self.text => continue,
                    Ok(t) => t.clone(),
                };
                // In-process there is exactly one worker and no process to add.
                let check = Check {
                    workers: if in_process {
                        Some(Workers::Count(1))
                    } else {
                        self.workers
                    },
                    validate: self.validate.clone(),
                };
                let origin = update.origin.clone();
                let handle = tokio::task::spawn_blocking(move || check.run(&text, &origin));
                self.checking = Some((update, handle));
            }
            let (_, handle) = self.checking.as_mut().expect("set above");
            let checked = handle
                .await
                .unwrap_or_else(|e| Err(format!("the check of the change failed: {e}")));
            let (update, _) = self.checking.take().expect("set above");
            match checked {
                Ok((assigned, per_worker)) => {
                    if let Some(c) = self.accept(update, assigned, per_worker) {
                        return Some(c);
                    }
                }
                Err(e) => self.failed(&update.origin, &e),
            }
        }
    }

    fn failed(&self, origin: &str, e: &str) {
        self.metrics
            .contexts_reloads
            .with_label_values(&["failure"])
            .inc();
        tracing::error!("ignoring new worker contexts from {origin}: {e}; the workers keep their last good contexts");
    }

    /// A valid change: it is now in force; returns the contexts to roll to
    /// unless the policy is to ignore changes.
    fn accept(
        &mut self,
        u: Update,
        assigned: Vec<serde_json::Value>,
        per_worker: bool,
    ) -> Option<Vec<serde_json::Value>> {
        self.text = u.text.unwrap_or_default();
        self.metrics
            .contexts_reloads
            .with_label_values(&["success"])
            .inc();
        if self.policy == OnContextsChange::Ignore {
            tracing::info!(
                version = u.version,
                "worker contexts changed in {}; --on-contexts-change ignore: the workers keep theirs",
                u.origin
            );
            return None;
        }
        // Only contexts in force decide whether SIGTTIN/SIGTTOU may change
        // the count (an ignored change does not).
        self.per_worker = per_worker;
        self.version = u.version.clone();
        tracing::info!(
            version = u.version,
            "new worker contexts from {}: rolling restart",
            u.origin
        );
        Some(assigned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(rx: mpsc::UnboundedReceiver<Update>) -> ContextsWatch {
        ContextsWatch {
            rx: Some(rx),
            text: "[{v: 0}, {v: 1}]".into(),
            source: "file",
            version: String::new(),
            workers: None,
            policy: OnContextsChange::Restart,
            validate: None,
            metrics: Metrics::new(crate::stop::StopFlag::new(), None),
            per_worker: true,
            checking: None,
        }
    }

    fn update(text: &str) -> Update {
        Update {
            text: Ok(text.into()),
            origin: "ctx.yaml".into(),
            version: "v".into(),
        }
    }

    /// The supervisor polls `next` inside a `select!`: dropping it while a
    /// change is being checked on the blocking pool must not lose the change.
    #[tokio::test]
    async fn a_change_survives_next_being_dropped_mid_check() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut w = watch(rx);
        // Big enough that its check is still running when `next` is dropped.
        let items: Vec<String> = (0..2)
            .map(|i| format!("- [{}]", vec![format!("{{k: {i}}}"); 5000].join(", ")))
            .collect();
        tx.send(update(&items.join("\n"))).unwrap();
        tokio::select! {
            biased;
            _ = w.next(false) => panic!("the check finished within one poll"),
            _ = std::future::ready(()) => {}
        }
        assert!(w.checking.is_some(), "the pending check was lost");
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), w.next(false))
            .await
            .expect("next never returned")
            .expect("the change was lost");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1][0], serde_json::json!({"k": 1}));
    }

    /// An invalid change is counted as a failure and skipped; the next
    /// valid one is returned.
    #[tokio::test]
    async fn an_invalid_change_is_counted_and_skipped() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut w = watch(rx);
        tx.send(update("- .nan\n- 1\n")).unwrap();
        tx.send(update("[{v: 5}, {v: 6}]")).unwrap();
        let got = w.next(false).await.unwrap();
        assert_eq!(got[0], serde_json::json!({"v": 5}));
        let failures = w
            .metrics
            .contexts_reloads
            .with_label_values(&["failure"])
            .get();
        assert_eq!(failures, 1);
    }
}
