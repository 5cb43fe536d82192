//! The autoscaler's loop on real parts: every poll interval, one management API request per broker vhost for
//! all services on it; each service's figures go through its [`Autoscaler`]; a changed decision (or a queue gone
//! missing, or new figures for status) triggers that service's reconcile, which applies it. The reconciler is
//! the only writer: replicas reach the Deployment through the same server-side apply as everything else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use futures::FutureExt;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::autoscale::{Autoscaler, PolicySpec, QueueSample, ReplicaCounts, ScaleDecision, ScaleReason};
use crate::broker::{Broker, QueueFigures};
use crate::crd::{RpcService, ScalingStatus};
use crate::metrics::{DirectionLabel, Metrics};
use crate::status::{self, ConditionUpdate};

/// What a reconcile tells the registry about a service.
pub struct ServiceRegistration {
    key: ObjectRef<RpcService>,
    broker: Arc<Broker>,
    queue: String,
    enabled: bool,
    policy: PolicySpec,
    replicas: ReplicaCounts,
    /// Worker pods that exist (the Deployment's status), for the scale subresource.
    pods: i32,
    /// Replicas of the existing Deployment, the starting point before the first decision.
    deployed: Option<i32>,
    seed_throughput: Option<f64>,
}

impl ServiceRegistration {
    pub fn new(
        key: ObjectRef<RpcService>,
        svc: &RpcService,
        broker: Arc<Broker>,
        current: Option<&Deployment>,
    ) -> Self {
        let status = current.and_then(|d| d.status.as_ref());
        Self {
            key,
            broker,
            queue: svc.queue_name(),
            enabled: svc.spec.scaling.enabled,
            policy: PolicySpec::from_spec(&svc.spec),
            // The policy counts what was asked for: pods being created count, or it would ask again.
            replicas: ReplicaCounts {
                current: current.and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas).unwrap_or(0),
                ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            },
            pods: status.and_then(|s| s.replicas).unwrap_or(0),
            deployed: current.and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas),
            seed_throughput: svc.status.as_ref().and_then(|s| s.per_replica_throughput),
        }
    }
}

/// What the reconcile reads back: the replicas to apply and everything status shows.
pub struct ServiceView {
    pub desired_replicas: i32,
    /// Pods that exist and pods that are ready.
    pub replicas: ReplicaCounts,
    pub figures: Option<QueueFigures>,
    pub arrival_rate: Option<f64>,
    pub completion_rate: Option<f64>,
    pub per_replica_throughput: Option<f64>,
    pub decision: Option<ScalingStatus>,
    pub last_scale: Option<(Timestamp, String)>,
    pub scaling_condition: ConditionUpdate,
    /// The observer found the queue missing since the last reconcile (it has just been declared again).
    pub queue_recreated: bool,
    /// A scale change to announce as an event.
    pub scale_event: Option<String>,
}

struct ServiceState {
    registration: ServiceRegistration,
    scaler: Autoscaler,
    figures: Option<QueueFigures>,
    decision: Option<ScaleDecision>,
    /// Replicas the last reconcile applied.
    applied: Option<i32>,
    last_scale: Option<(Timestamp, String)>,
    queue_missing: bool,
    scale_event: Option<String>,
    metrics_unavailable: Option<String>,
}

/// Every autoscaled service the operator knows, with its scaler state.
pub struct ScalingRegistry {
    services: Mutex<HashMap<ObjectRef<RpcService>, ServiceState>>,
    trigger: UnboundedSender<ObjectRef<RpcService>>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// The controller's cache: a service removed without its finalizer running (finalizer stripped by hand) is
    /// forgotten when it leaves the cache.
    known: OnceLock<Store<RpcService>>,
}

impl ScalingRegistry {
    pub fn new(trigger: UnboundedSender<ObjectRef<RpcService>>, metrics: Arc<Metrics>) -> Self {
        Self { services: Mutex::default(), trigger, metrics, started: Instant::now(), known: OnceLock::new() }
    }

    /// Records what a reconcile learned and returns what it should apply and report.
    pub fn register(&self, reg: ServiceRegistration) -> ServiceView {
        use std::collections::hash_map::Entry;
        let mut services = self.services.lock().expect("registry lock");
        let state = match services.entry(reg.key.clone()) {
            Entry::Occupied(e) => {
                let state = e.into_mut();
                state.registration = reg;
                state
            }
            Entry::Vacant(e) => e.insert(ServiceState::new(reg)),
        };
        let view = view(state);
        self.metrics.services.set(services.len() as i64);
        view
    }

    /// Records the replicas a reconcile applied, so the observer knows when a decision is new.
    pub fn applied(&self, key: &ObjectRef<RpcService>, replicas: i32) {
        if let Some(state) = self.services.lock().expect("registry lock").get_mut(key) {
            state.applied = Some(replicas);
        }
    }

    pub fn forget(&self, key: &ObjectRef<RpcService>) {
        let mut services = self.services.lock().expect("registry lock");
        services.remove(key);
        self.metrics.services.set(services.len() as i64);
    }

    /// Ties the registry to the controller's cache of RpcServices (once).
    pub fn track(&self, store: Store<RpcService>) {
        let _ = self.known.set(store);
    }

    /// Drops services the cache no longer holds, once the cache has synced.
    fn forget_departed(&self) {
        let Some(store) = self.known.get() else { return };
        if store.wait_until_ready().now_or_never().is_none() {
            return;
        }
        let mut services = self.services.lock().expect("registry lock");
        services.retain(|key, _| store.get(key).is_some());
        self.metrics.services.set(services.len() as i64);
    }

    /// One observation round: a request per broker, a decision per service, triggers for what changed.
    pub async fn poll_once(&self) {
        self.forget_departed();
        let brokers: Vec<Arc<Broker>> = {
            let services = self.services.lock().expect("registry lock");
            let mut seen: Vec<Arc<Broker>> = Vec::new();
            for s in services.values() {
                if !seen.iter().any(|b| Arc::ptr_eq(b, &s.registration.broker)) {
                    seen.push(s.registration.broker.clone());
                }
            }
            seen
        };
        for broker in brokers {
            self.metrics.observer_polls.inc();
            let figures = broker.queue_figures().await;
            if figures.is_err() {
                self.metrics.observer_failures.inc();
            }
            let now = self.started.elapsed().as_secs_f64();
            let mut triggers = Vec::new();
            {
                let mut services = self.services.lock().expect("registry lock");
                let by_name: HashMap<&str, &QueueFigures> = match &figures {
                    Ok(list) => list.iter().map(|f| (f.name.as_str(), f)).collect(),
                    Err(_) => HashMap::new(),
                };
                for (key, state) in services.iter_mut().filter(|(_, s)| Arc::ptr_eq(&s.registration.broker, &broker)) {
                    let found = by_name.get(state.registration.queue.as_str()).map(|f| (*f).clone());
                    let unavailable = match (&figures, &found) {
                        (Err(e), _) => Some(format!("the management API did not answer: {e}")),
                        (Ok(_), None) => Some(format!("queue {} is missing on the broker", state.registration.queue)),
                        (Ok(_), Some(_)) => None,
                    };
                    if figures.is_ok() && found.is_none() && !state.queue_missing {
                        // Re-declared by the reconcile this triggers.
                        state.queue_missing = true;
                        triggers.push(key.clone());
                    }
                    if observe(state, found, unavailable, now, &self.metrics) {
                        triggers.push(key.clone());
                    }
                }
            }
            for key in triggers {
                let _ = self.trigger.unbounded_send(key);
            }
        }
    }

    /// Polls every `interval` until the task is dropped.
    pub async fn run(self: Arc<Self>, interval: std::time::Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.poll_once().await;
        }
    }
}

impl ServiceState {
    fn new(registration: ServiceRegistration) -> Self {
        Self {
            scaler: Autoscaler::new(registration.seed_throughput),
            registration,
            figures: None,
            decision: None,
            applied: None,
            last_scale: None,
            queue_missing: false,
            scale_event: None,
            metrics_unavailable: None,
        }
    }
}

/// Feeds one round's figures to the service's scaler; returns whether its reconcile should run.
fn observe(
    state: &mut ServiceState,
    found: Option<QueueFigures>,
    unavailable: Option<String>,
    now: f64,
    metrics: &Metrics,
) -> bool {
    let sample = found.as_ref().map(|f| QueueSample {
        at: now,
        ready: f.ready,
        unacked: f.unacked,
        consumers: f.consumers,
        published_total: f.published_total,
        acked_total: f.acked_total,
    });
    let figures_changed = match (&state.figures, &found) {
        (Some(a), Some(b)) => {
            (a.ready, a.unacked, a.consumers) != (b.ready, b.unacked, b.consumers)
                || a.published_total != b.published_total
        }
        (None, Some(_)) => true,
        // No figures this round: the availability change below says so, once.
        (_, None) => false,
    };
    let availability_changed = state.metrics_unavailable.is_some() != unavailable.is_some();
    state.metrics_unavailable = unavailable;
    if found.is_some() {
        state.figures = found;
    }
    let reg = &state.registration;
    let observation = state.scaler.observe(sample, now);
    let decision = state.scaler.decide(&observation, reg.replicas, &reg.policy, now);
    let previous = state.applied.or(reg.deployed);
    let changed = reg.enabled && previous != Some(decision.desired);
    // Announce a decision once, not on every poll until the reconcile has applied it.
    let new_decision = state.decision.as_ref().map(|d| d.desired) != Some(decision.desired);
    if changed && new_decision {
        let from = previous.unwrap_or(0);
        let message = format!("{} → {} replicas: {}", from, decision.desired, decision.message);
        state.scale_event = Some(message.clone());
        state.last_scale = Some((Timestamp::now(), format!("{}: {}", decision.reason, decision.message)));
        let direction = if decision.desired > from { "up" } else { "down" };
        metrics.scale_events.get_or_create(&DirectionLabel { direction: direction.into() }).inc();
    }
    state.decision = Some(decision);
    changed || figures_changed || availability_changed
}

fn view(state: &mut ServiceState) -> ServiceView {
    let reg = &state.registration;
    let policy = &reg.policy;
    let desired = match (&state.decision, reg.deployed) {
        (Some(d), _) => d.desired,
        // Before the first observation: keep what runs, within bounds.
        (None, Some(deployed)) => deployed.clamp(policy.min_replicas, policy.max_replicas),
        (None, None) => policy.min_replicas,
    };
    let scaling_condition = if !reg.enabled {
        ConditionUpdate::new(status::SCALING, false, "Disabled", "autoscaling is off: spec.worker.replicas is used")
    } else if let Some(reason) = &state.metrics_unavailable {
        ConditionUpdate::new(
            status::SCALING,
            false,
            ScaleReason::MetricsUnavailable.to_string(),
            format!("{reason}; keeping {desired} replicas"),
        )
    } else if let Some(d) = &state.decision {
        ConditionUpdate::new(status::SCALING, true, d.reason.to_string(), d.message.clone())
    } else {
        ConditionUpdate::new(status::SCALING, true, "Waiting", "waiting for the first observation of the queue")
    };
    let decision = state.decision.as_ref().map(|d| ScalingStatus {
        desired_replicas: d.desired,
        reason: d.reason.to_string(),
        message: d.message.clone(),
        backlog: d.inputs.backlog as i64,
        in_flight: d.inputs.in_flight as i64,
        arrival_rate: d.inputs.arrival_rate,
        per_replica_throughput: d.inputs.per_replica_throughput,
        time: Some(Time(Timestamp::now())),
    });
    ServiceView {
        desired_replicas: desired,
        replicas: ReplicaCounts { current: reg.pods, ready: reg.replicas.ready },
        figures: state.figures.clone(),
        // No rates until two polls span a window: empty in status, not a misleading 0.
        arrival_rate: state.decision.as_ref().filter(|d| d.inputs.rates_known).map(|d| d.inputs.arrival_rate),
        completion_rate: state.decision.as_ref().filter(|d| d.inputs.rates_known).map(|d| d.inputs.completion_rate),
        per_replica_throughput: state.scaler.measured_throughput(),
        decision,
        last_scale: state.last_scale.clone(),
        scaling_condition,
        queue_recreated: std::mem::take(&mut state.queue_missing),
        scale_event: state.scale_event.take(),
    }
}
