//! The contexts' source after start: a watch of the file or the ConfigMap,
//! each change checked as at start (YAML, count, the app's type) before it
//! is handed to the supervisor. It never starts or stops a process.

use std::sync::Arc;

use tokio::sync::mpsc;

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
        }
    }

    /// The next valid change to apply; None once the source can say no more.
    pub(crate) async fn next(&mut self, in_process: bool) -> Option<Vec<serde_json::Value>> {
        loop {
            let update = match self.rx.as_mut() {
                Some(rx) => rx.recv().await,
                None => None,
            };
            let Some(update) = update else {
                self.rx = None;
                return None;
            };
            let origin = update.origin.clone();
            match self.evaluate(update, in_process) {
                Ok(Some(c)) => return Some(c),
                Ok(None) => {}
                Err(e) => {
                    self.metrics
                        .contexts_reloads
                        .with_label_values(&["failure"])
                        .inc();
                    tracing::error!("ignoring new worker contexts from {origin}: {e}; the workers keep their last good contexts");
                }
            }
        }
    }

    fn evaluate(
        &mut self,
        u: Update,
        in_process: bool,
    ) -> std::result::Result<Option<Vec<serde_json::Value>>, String> {
        let text = u.text?;
        if text == self.text {
            return Ok(None);
        }
        let parsed = contexts::parse(&text, &u.origin).map_err(|e| e.to_string())?;
        // In-process there is exactly one worker and no process to add.
        let workers = if in_process {
            Some(Workers::Count(1))
        } else {
            self.workers
        };
        let assigned = contexts::assign(&parsed, workers, crate::cgroup::allowed_cpus, &u.origin)
            .map_err(|e| e.to_string())?;
        if let Some(validate) = &self.validate {
            for (i, c) in assigned.iter().enumerate() {
                validate(i, c)?;
            }
        }
        self.text = text;
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
            return Ok(None);
        }
        // Only contexts in force decide whether SIGTTIN/SIGTTOU may change
        // the count (an ignored change does not).
        self.per_worker = matches!(parsed, contexts::Contexts::PerWorker(_));
        self.version = u.version.clone();
        tracing::info!(
            version = u.version,
            "new worker contexts from {}: rolling restart",
            u.origin
        );
        Ok(Some(assigned))
    }
}
