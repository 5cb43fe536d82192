//! The operator's Prometheus metrics: reconciles, failures by reason, reconcile duration, scale decisions.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

pub struct Metrics {
    pub registry: Arc<Registry>,
    pub reconciles: Counter,
    pub failures: Family<ReasonLabel, Counter>,
    pub duration: Histogram,
    pub scale_events: Family<DirectionLabel, Counter>,
    pub observer_polls: Counter,
    pub observer_failures: Counter,
    pub services: Gauge,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren_operator");
        let reconciles = Counter::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let duration = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let scale_events = Family::<DirectionLabel, Counter>::default();
        let observer_polls = Counter::default();
        let observer_failures = Counter::default();
        let services = Gauge::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed, by reason", failures.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", duration.clone());
        registry.register("scale_events", "Replica changes decided by the autoscaler", scale_events.clone());
        registry.register("observer_polls", "Management API polls", observer_polls.clone());
        registry.register("observer_failures", "Management API polls that failed", observer_failures.clone());
        registry.register("services", "RpcServices known to the observer", services.clone());
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        Self {
            registry: Arc::new(registry),
            reconciles,
            failures,
            duration,
            scale_events,
            observer_polls,
            observer_failures,
            services,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and observes its duration when the returned guard is dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer { start: Instant::now(), histogram: &self.duration }
    }

    pub fn reconcile_failed(&self, reason: &str) {
        self.failures.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encoding into a String");
        out
    }
}

pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
