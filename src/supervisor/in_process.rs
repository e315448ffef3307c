//! `--workers 1` with the built-in or library app: the app serves inside the
//! supervisor, with no child process. It drains through the same
//! [`drain::run`](super::drain::run) as the pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::drain::{self, Serving};
use crate::app::{Factory, Stopper};
use crate::contexts::watch::ContextsWatch;
use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::plan::Plan;
use crate::serve::Draining;
use crate::stop::StopFlag;

/// The app serving in this process.
struct InProcess {
    /// The accept loop, until accepting stops.
    serving: Option<Pin<Box<dyn Future<Output = Draining>>>>,
    /// Tells the accept loop to stop.
    stop: Option<oneshot::Sender<()>>,
    /// The connections still open after accepting stopped.
    draining: Option<Draining>,
    metrics: Metrics,
    workers_up: Arc<AtomicBool>,
}

/// Serves until the flag is set, then drains.
pub async fn run(
    plan: Plan,
    listener: Listener,
    factory: &Factory<'_>,
    flag: StopFlag,
    metrics: Metrics,
    workers_up: Arc<AtomicBool>,
    mut watch: ContextsWatch,
) -> Result<u8> {
    let svc = factory(0, 1, plan.contexts[0].clone()).map_err(Error::Contexts)?;
    let (svc_tx, svc) = tokio::sync::watch::channel(svc);
    crate::app::install_stopper(Stopper::InProcess(flag.clone()));
    let (listener, _uds) = listener
        .into_serving()
        .map_err(|e| Error::io("cannot serve the listener", e))?;
    let recorder = metrics
        .pod
        .region()
        .and_then(|r| crate::metrics::HttpRecorder::new(r, 0, Some(0)));
    metrics
        .pod
        .publish(vec![(0, std::process::id() as i32)].into());
    let (stop, stopped) = oneshot::channel::<()>();
    let up = {
        let metrics = metrics.clone();
        let workers_up = workers_up.clone();
        move || {
            metrics.workers_running.set(1);
            workers_up.store(true, Ordering::Release);
        }
    };
    let serving = crate::serve::serve(
        listener,
        svc,
        recorder,
        async move {
            let _ = stopped.await;
        },
        up,
        true,
        1,
    );
    let mut app = InProcess {
        serving: Some(Box::pin(serving)),
        stop: Some(stop),
        draining: None,
        metrics,
        workers_up,
    };
    // New contexts: new connections get a service built from them (the
    // in-process form of a rolling restart); open ones finish on the old.
    let app_metrics = app.metrics.clone();
    let reload = async {
        loop {
            let Some(contexts) = watch.next(true).await else {
                return std::future::pending::<()>().await;
            };
            match factory(0, 1, contexts[0].clone()) {
                Ok(svc) => {
                    svc_tx.send_replace(svc);
                    app_metrics.set_contexts(watch.source, &watch.version);
                    tracing::info!("new connections are served with the new context");
                }
                Err(e) => tracing::error!("{e}; keeping the last good context"),
            }
        }
    };
    let serving = app.serving.as_mut().expect("serving");
    let source = tokio::select! {
        s = flag.wait() => s,
        _ = serving => unreachable!("the accept loop ends only when told"),
        _ = reload => unreachable!("the reload loop never ends"),
    };
    Ok(drain::run(&mut app, source, plan.drain).await)
}

impl Serving for InProcess {
    fn announce(&mut self) {
        self.workers_up.store(false, Ordering::Release);
    }

    async fn keep_serving(&mut self, until: Instant) {
        if let Some(serving) = self.serving.as_mut() {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = serving => unreachable!("the accept loop ends only when told"),
            }
        }
    }

    async fn stop_accepting(&mut self, _deadline: Instant) {
        self.metrics.pod.forget_listener();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            self.draining = Some(serving.await);
        }
    }

    async fn finish(&mut self, deadline: Instant) -> bool {
        let Some(draining) = self.draining.take() else {
            return true;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        draining.finish(Some(left)).await
    }

    async fn kill_rest(&mut self) {
        // The connections still open are dropped with the runtime.
    }

    fn sweep(&mut self) {
        self.metrics.workers_running.set(0);
        self.metrics.pod.publish(Vec::new().into());
    }
}
