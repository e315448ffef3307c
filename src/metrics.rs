//! The pod's Prometheus metrics, rendered by the supervisor for `/metrics`.
//! The supervisor updates them as workers start, exit and drain; this module
//! never changes any state of its own accord.

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::stop::{StopFlag, StopSource};

/// The supervisor's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `drover_workers_desired`.
    pub workers_desired: IntGauge,
    /// `drover_workers_running`.
    pub workers_running: IntGauge,
    /// `drover_worker_restarts_total{worker}`.
    pub worker_restarts: IntCounterVec,
    /// `drover_draining`.
    pub draining: IntGauge,
    /// `drover_stop_requests_total{source}`, synced from the stop flag.
    stop_requests: IntCounterVec,
    /// `drover_listen_backlog`.
    pub listen_backlog: IntGauge,
    flag: StopFlag,
}

impl Metrics {
    /// Registers every metric.
    pub fn new(flag: StopFlag) -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let m = Metrics {
            workers_desired: gauge(
                "drover_workers_desired",
                "Number of workers the pod should run.",
            ),
            workers_running: gauge(
                "drover_workers_running",
                "Number of worker processes currently running.",
            ),
            worker_restarts: counter(
                "drover_worker_restarts_total",
                "Times each worker was restarted after it exited.",
                "worker",
            ),
            draining: gauge(
                "drover_draining",
                "1 once a stop was requested and the pod drains, else 0.",
            ),
            stop_requests: counter(
                "drover_stop_requests_total",
                "Stop requests received, repeats included, by source.",
                "source",
            ),
            listen_backlog: gauge(
                "drover_listen_backlog",
                "Effective listen(2) backlog of the shared socket (after the somaxconn cap).",
            ),
            registry,
            flag,
        };
        for s in StopSource::ALL {
            m.stop_requests.with_label_values(&[s.as_str()]);
        }
        m
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        for s in StopSource::ALL {
            let c = self.stop_requests.with_label_values(&[s.as_str()]);
            let now = self.flag.requests(s);
            if now > c.get() {
                c.inc_by(now - c.get());
            }
        }
        self.draining.set(i64::from(self.flag.is_set()));
        let mut out = Vec::with_capacity(4096);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
