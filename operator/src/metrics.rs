//! The operator's Prometheus metrics: reconciles, failures by reason, reconcile duration, scale decisions, and the
//! latency model of every RpcService, labelled by namespace and service: one series per service (per source or
//! reason for the two that carry one), removed when the service goes.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use warren_autoscale::{ScaleReason, ThroughputSource};

use crate::observer::ServiceView;
use crate::status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// A request the reconciler sent to the Kubernetes API: its verb and resource (a fixed, small set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: String,
}

/// One RpcService.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub service: String,
}

/// One RpcService's per-replica throughput and where it came from (`measured`, `lowerBound`, `hint`, `prior`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThroughputLabels {
    pub namespace: String,
    pub service: String,
    pub source: String,
}

/// One RpcService's scale decisions of one reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub namespace: String,
    pub service: String,
    pub reason: String,
}

type ServiceGauge = Family<ServiceLabels, Gauge<f64, AtomicU64>>;

/// Each RpcService's latency model as the observer last saw it.
#[derive(Default)]
pub struct ServiceMetrics {
    pub backlog: ServiceGauge,
    pub in_flight: ServiceGauge,
    pub arrival_rate: ServiceGauge,
    pub completion_rate: ServiceGauge,
    pub per_replica_throughput: Family<ThroughputLabels, Gauge<f64, AtomicU64>>,
    pub queueing_delay: ServiceGauge,
    pub target_delay: ServiceGauge,
    pub desired_replicas: ServiceGauge,
    pub ready_replicas: ServiceGauge,
    pub scale_decisions: Family<DecisionLabels, Counter>,
}

const THROUGHPUT_SOURCES: [ThroughputSource; 4] =
    [ThroughputSource::Measured, ThroughputSource::LowerBound, ThroughputSource::Hint, ThroughputSource::Prior];
const SCALE_REASONS: [ScaleReason; 11] = [
    ScaleReason::Backlog,
    ScaleReason::ArrivalRate,
    ScaleReason::InFlight,
    ScaleReason::ScaleDownDelay,
    ScaleReason::MinReplicas,
    ScaleReason::MaxReplicas,
    ScaleReason::Steady,
    ScaleReason::MetricsUnavailable,
    ScaleReason::ScaleFromZero,
    ScaleReason::Idle,
    ScaleReason::Anticipated,
];

impl ServiceMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("service");
        r.register("backlog", "Requests waiting in the service's queue (absent while unknown)", self.backlog.clone());
        r.register("in_flight", "Requests delivered to workers and not yet acked", self.in_flight.clone());
        r.register("arrival_rate", "Requests arriving per second", self.arrival_rate.clone());
        r.register("completion_rate", "Requests completed (acked) per second", self.completion_rate.clone());
        r.register(
            "per_replica_throughput",
            "Requests per second one worker completes, as the autoscaler uses it, by source",
            self.per_replica_throughput.clone(),
        );
        r.register_with_unit(
            "queueing_delay",
            "Estimated queueing delay: backlog / (ready replicas x per-replica throughput); absent when unknown",
            Unit::Seconds,
            self.queueing_delay.clone(),
        );
        r.register_with_unit(
            "target_queue_delay",
            "The queueing delay the pool is sized to stay under (spec.scaling.targetQueueDelaySeconds)",
            Unit::Seconds,
            self.target_delay.clone(),
        );
        r.register("desired_replicas", "Workers the operator asks for", self.desired_replicas.clone());
        r.register("ready_replicas", "Workers that are ready", self.ready_replicas.clone());
        r.register(
            "scale_decisions",
            "Replica changes the autoscaler decided, by reason",
            self.scale_decisions.clone(),
        );
    }

    /// Sets every gauge of one service from the observer's view; a figure that is unknown has no series.
    pub fn observe(&self, service: &ServiceLabels, view: &ServiceView, target_delay: f64) {
        let current = view.metrics_unavailable.is_none();
        let figures = view.figures.as_ref().filter(|_| current);
        set_or_remove(&self.backlog, service, figures.and(status::backlog(view)).map(|b| b as f64));
        set_or_remove(&self.in_flight, service, figures.map(|f| f.unacked as f64));
        set_or_remove(&self.arrival_rate, service, view.arrival_rate.filter(|_| current));
        set_or_remove(&self.completion_rate, service, view.completion_rate.filter(|_| current));
        set_or_remove(&self.queueing_delay, service, status::queueing_delay(view));
        set_or_remove(&self.target_delay, service, Some(target_delay));
        set_or_remove(&self.desired_replicas, service, Some(f64::from(view.desired_replicas)));
        set_or_remove(&self.ready_replicas, service, Some(f64::from(view.replicas.ready)));
        let used = view.decision.as_ref().map(|d| (d.inputs.per_replica_throughput, d.inputs.throughput_source));
        for source in THROUGHPUT_SOURCES {
            let labels = throughput_labels(service, source);
            match used {
                Some((mu, s)) if s == source => {
                    self.per_replica_throughput.get_or_create(&labels).set(mu);
                }
                _ => {
                    self.per_replica_throughput.remove(&labels);
                }
            }
        }
    }

    /// Counts a decision that changed the service's replicas.
    pub fn scaled(&self, service: &ServiceLabels, reason: ScaleReason) {
        self.scale_decisions.get_or_create(&decision_labels(service, reason)).inc();
    }

    /// Removes every series of a service that is gone.
    pub fn forget(&self, service: &ServiceLabels) {
        for gauge in [
            &self.backlog,
            &self.in_flight,
            &self.arrival_rate,
            &self.completion_rate,
            &self.queueing_delay,
            &self.target_delay,
            &self.desired_replicas,
            &self.ready_replicas,
        ] {
            gauge.remove(service);
        }
        for source in THROUGHPUT_SOURCES {
            self.per_replica_throughput.remove(&throughput_labels(service, source));
        }
        for reason in SCALE_REASONS {
            self.scale_decisions.remove(&decision_labels(service, reason));
        }
    }
}

fn set_or_remove(family: &ServiceGauge, service: &ServiceLabels, value: Option<f64>) {
    match value {
        Some(v) => {
            family.get_or_create(service).set(v);
        }
        None => {
            family.remove(service);
        }
    }
}

fn throughput_labels(service: &ServiceLabels, source: ThroughputSource) -> ThroughputLabels {
    ThroughputLabels {
        namespace: service.namespace.clone(),
        service: service.service.clone(),
        source: status::throughput_source(source).to_owned(),
    }
}

fn decision_labels(service: &ServiceLabels, reason: ScaleReason) -> DecisionLabels {
    DecisionLabels {
        namespace: service.namespace.clone(),
        service: service.service.clone(),
        reason: reason.to_string(),
    }
}

pub struct Metrics {
    pub registry: Arc<Registry>,
    pub reconciles: Counter,
    pub failures: Family<ReasonLabel, Counter>,
    /// Requests reconciles sent to the Kubernetes API (reads and writes; the watches are not counted).
    pub kubernetes_requests: Family<RequestLabels, Counter>,
    pub duration: Histogram,
    pub scale_events: Family<DirectionLabel, Counter>,
    pub observer_polls: Counter,
    pub observer_probes: Counter,
    pub observer_failures: Counter,
    pub services: Gauge,
    pub leader: Gauge,
    pub service: ServiceMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("warren_operator");
        let reconciles = Counter::default();
        let failures = Family::<ReasonLabel, Counter>::default();
        let kubernetes_requests = Family::<RequestLabels, Counter>::default();
        let duration = Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        let scale_events = Family::<DirectionLabel, Counter>::default();
        let observer_polls = Counter::default();
        let observer_probes = Counter::default();
        let observer_failures = Counter::default();
        let services = Gauge::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register("reconcile_failures", "Reconciles that failed, by reason", failures.clone());
        registry.register(
            "kubernetes_requests",
            "Requests reconciles sent to the Kubernetes API, by verb and resource (watches not counted)",
            kubernetes_requests.clone(),
        );
        registry.register("reconcile_duration_seconds", "Reconcile duration", duration.clone());
        registry.register("scale_events", "Replica changes decided by the autoscaler", scale_events.clone());
        registry.register("observer_polls", "Management API polls", observer_polls.clone());
        registry.register("observer_probes", "Passive queue.declare probes of a backlog", observer_probes.clone());
        registry.register("observer_failures", "Management API polls that failed", observer_failures.clone());
        registry.register("services", "RpcServices known to the observer", services.clone());
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let service = ServiceMetrics::default();
        service.register(&mut registry);
        Self {
            registry: Arc::new(registry),
            reconciles,
            failures,
            kubernetes_requests,
            duration,
            scale_events,
            observer_polls,
            observer_probes,
            observer_failures,
            services,
            leader,
            service,
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

    /// Counts one request to the Kubernetes API, e.g. `("patch", "deployments")`.
    pub fn kubernetes_request(&self, verb: &str, resource: &str) {
        let labels = RequestLabels { verb: verb.to_owned(), resource: resource.to_owned() };
        self.kubernetes_requests.get_or_create(&labels).inc();
    }

    /// Requests counted by [`Metrics::kubernetes_request`] whose verb is `verb` (all verbs: `None`).
    pub fn kubernetes_requests_of(&self, verb: Option<&str>) -> u64 {
        let mut total = 0;
        for v in ["get", "create", "patch", "update", "delete"] {
            if verb.is_some_and(|want| want != v) {
                continue;
            }
            for r in ["rpcservices", "rpcservices/status", "deployments", "secrets", "events"] {
                let labels = RequestLabels { verb: v.to_owned(), resource: r.to_owned() };
                if let Some(c) = self.kubernetes_requests.get(&labels) {
                    total += c.get();
                }
            }
        }
        total
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
