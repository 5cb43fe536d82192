//! The observer: the observe → decide → act loop that runs beside the reconcile pipeline.
//!
//! - observe: every poll interval, one management API request per broker vhost reads the figures of all the
//!   services' queues on it ([`Observer::poll_once`]);
//! - decide: each service's figures go through its [`Autoscaler`] ([`Observer::record`]);
//! - act: a service whose decision, figures or metrics availability changed, or whose queue went missing, gets
//!   one reconcile triggered. The reconciler is the only writer: it reads the observer's [`ServiceView`], applies
//!   the replicas through the same server-side apply as everything else, and reports the view in status.
//!
//! What a reconcile learns (the spec's policy, the broker, the Deployment) comes in through
//! [`Observer::register`]; one-shot news (a scale change, a queue gone missing) stays in the view until the
//! reconcile has published it ([`Observer::announced`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use warren_autoscale::{Autoscaler, PolicySpec, QueueSample, ReplicaCounts, ScaleDecision};
use warren_client::management;

use crate::broker::{Broker, BrokerError, QueueFigures, QueueProbe, QueueReading};
use crate::crd::{RpcService, RpcServiceSpec};
use crate::metrics::{DirectionLabel, Metrics, ServiceLabels};
use crate::ownership::Claim;

/// What a reconcile tells the observer about a service.
pub struct Registration {
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

impl Registration {
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
            policy: policy(&svc.spec),
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

/// The autoscaling policy a service asks for: its `scaling` section and its workers' prefetch.
pub fn policy(spec: &RpcServiceSpec) -> PolicySpec {
    let scaling = &spec.scaling;
    PolicySpec {
        min_replicas: scaling.min_replicas,
        max_replicas: scaling.max_replicas,
        target_queue_delay_seconds: scaling.target_queue_delay_seconds,
        scale_down_delay_seconds: f64::from(scaling.scale_down_delay_seconds),
        target_utilization: scaling.target_utilization,
        per_replica_throughput_hint: scaling.per_replica_throughput_hint,
        prefetch: u32::try_from(spec.worker.prefetch).unwrap_or(1),
        ..PolicySpec::default()
    }
    .sanitized()
}

/// One-shot news for events, kept until the reconcile has published them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Announcements {
    /// The observer found the queue missing on the broker; the reconcile declares it again.
    pub queue_missing: bool,
    /// A new scale decision, as the event's note.
    pub scaled: Option<String>,
}

/// What the reconcile reads back: the replicas to apply and everything status shows.
#[derive(Clone, Debug)]
pub struct ServiceView {
    pub desired_replicas: i32,
    /// Whether the operator sizes the pool (`spec.scaling.enabled`).
    pub enabled: bool,
    /// Pods that exist and pods that are ready.
    pub replicas: ReplicaCounts,
    pub figures: Option<QueueFigures>,
    pub arrival_rate: Option<f64>,
    pub completion_rate: Option<f64>,
    pub per_replica_throughput: Option<f64>,
    pub decision: Option<ScaleDecision>,
    /// Why there are no figures this round, if there are none.
    pub metrics_unavailable: Option<String>,
    pub last_scale: Option<(Timestamp, String)>,
    pub announcements: Announcements,
}

/// A service to probe and its queue's name.
type ProbeTarget = (ObjectRef<RpcService>, String);

struct ServiceState {
    registration: Registration,
    scaler: Autoscaler,
    figures: Option<QueueFigures>,
    decision: Option<ScaleDecision>,
    /// Replicas the last reconcile applied.
    applied: Option<i32>,
    last_scale: Option<(Timestamp, String)>,
    announcements: Announcements,
    metrics_unavailable: Option<String>,
    /// The last probe of the backlog and when it was taken: newer than the management API's figures for a while.
    last_probe: Option<(f64, QueueProbe)>,
}

/// How long a probe's backlog stays fresher than the management API's, which moves once per stats interval (5 s by
/// default): a poll in that time decides on the probe's ready and consumer counts, so it cannot undo a probe's
/// scale-up with figures seconds older.
const PROBE_FRESHNESS_SECONDS: f64 = 2.5;

/// Every service the operator reconciles, with its autoscaler state.
pub struct Observer {
    services: Mutex<HashMap<ObjectRef<RpcService>, ServiceState>>,
    /// The controller's cache: a service removed without its finalizer running (finalizer stripped by hand) is
    /// forgotten when it leaves the cache.
    cache: Store<RpcService>,
    trigger: UnboundedSender<ObjectRef<RpcService>>,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Observer {
    pub fn new(
        cache: Store<RpcService>,
        trigger: UnboundedSender<ObjectRef<RpcService>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { services: Mutex::default(), cache, trigger, metrics, started: Instant::now() }
    }

    /// Records what a reconcile learned and returns what it should apply and report.
    pub fn register(&self, reg: Registration) -> ServiceView {
        use std::collections::hash_map::Entry;
        let mut services = self.services.lock().expect("observer lock");
        let state = match services.entry(reg.key.clone()) {
            Entry::Occupied(e) => {
                let state = e.into_mut();
                state.registration = reg;
                state
            }
            Entry::Vacant(e) => e.insert(ServiceState::new(reg)),
        };
        let view = state.view();
        self.metrics.services.set(services.len() as i64);
        view
    }

    /// Records the replicas a reconcile applied, so the observer knows when a decision is new.
    pub fn applied(&self, key: &ObjectRef<RpcService>, replicas: i32) {
        if let Some(state) = self.services.lock().expect("observer lock").get_mut(key) {
            state.applied = Some(replicas);
        }
    }

    /// Clears the news a reconcile has published; newer news that came in meanwhile stays.
    pub fn announced(&self, key: &ObjectRef<RpcService>, published: &Announcements) {
        if let Some(state) = self.services.lock().expect("observer lock").get_mut(key) {
            if published.queue_missing {
                state.announcements.queue_missing = false;
            }
            if published.scaled.is_some() && state.announcements.scaled == published.scaled {
                state.announcements.scaled = None;
            }
        }
    }

    pub fn forget(&self, key: &ObjectRef<RpcService>) {
        let mut services = self.services.lock().expect("observer lock");
        services.remove(key);
        self.metrics.service.forget(&labels(key));
        self.metrics.services.set(services.len() as i64);
    }

    /// Every RpcService in the controller's cache with the broker its last pass reached, for [`crate::ownership`].
    pub fn claims(&self) -> Vec<Claim> {
        let services = self.services.lock().expect("observer lock");
        self.cache
            .state()
            .into_iter()
            .map(|svc| {
                let broker = services.get(&ObjectRef::from_obj(svc.as_ref())).map(|s| s.registration.broker.clone());
                Claim { svc, broker }
            })
            .collect()
    }

    /// Drops services the cache no longer holds, once the cache has synced.
    fn forget_departed(&self) {
        if !matches!(self.cache.wait_until_ready().now_or_never(), Some(Ok(()))) {
            return;
        }
        let mut services = self.services.lock().expect("observer lock");
        services.retain(|key, _| {
            let cached = self.cache.get(key).is_some();
            if !cached {
                self.metrics.service.forget(&labels(key));
            }
            cached
        });
        self.metrics.services.set(services.len() as i64);
    }

    /// One round: a request per broker (observe), then a decision per service and its triggers.
    pub async fn poll_once(&self) {
        self.poll_within(management::REQUEST_TIMEOUT).await;
    }

    /// One round with every broker asked at once, each cut off after `timeout` and recorded as soon as it
    /// answers: a broker that does not answer (one tenant's black-holed `managementUri`) delays no other.
    async fn poll_within(&self, timeout: Duration) {
        self.forget_departed();
        let brokers: Vec<Arc<Broker>> = {
            let services = self.services.lock().expect("observer lock");
            let mut seen: Vec<Arc<Broker>> = Vec::new();
            for s in services.values() {
                if !seen.iter().any(|b| Arc::ptr_eq(b, &s.registration.broker)) {
                    seen.push(s.registration.broker.clone());
                }
            }
            seen
        };
        let polls = brokers.into_iter().map(|broker| async move {
            self.metrics.observer_polls.inc();
            let figures = match tokio::time::timeout(timeout, broker.queue_figures()).await {
                Ok(figures) => figures,
                Err(_) => Err(BrokerError::ManagementUnavailable(format!(
                    "no answer within {}",
                    humantime::format_duration(timeout)
                ))),
            };
            if figures.is_err() {
                self.metrics.observer_failures.inc();
            }
            self.record(&broker, &figures, self.started.elapsed().as_secs_f64());
        });
        futures::future::join_all(polls).await;
    }

    /// Decides for every service on `broker` from one poll's `figures` (taken at `now`, seconds on the
    /// observer's clock) and triggers one reconcile of each service that has something new to apply or report.
    pub fn record(&self, broker: &Arc<Broker>, figures: &Result<Vec<QueueReading>, BrokerError>, now: f64) {
        let by_name: HashMap<&str, &QueueReading> = match figures {
            Ok(list) => {
                list.iter().map(|r| (r.as_ref().map_or_else(|u| u.name.as_str(), |f| f.name.as_str()), r)).collect()
            }
            Err(_) => HashMap::new(),
        };
        let mut triggers = Vec::new();
        {
            let mut services = self.services.lock().expect("observer lock");
            for (key, state) in services.iter_mut().filter(|(_, s)| Arc::ptr_eq(&s.registration.broker, broker)) {
                let listed = by_name.get(state.registration.queue.as_str()).copied();
                let unavailable = match (figures, listed) {
                    (Err(e), _) => Some(format!("the management API did not answer: {e}")),
                    (Ok(_), None) => Some(format!("queue {} is missing on the broker", state.registration.queue)),
                    (Ok(_), Some(Err(unknown))) => Some(unknown.to_string()),
                    (Ok(_), Some(Ok(_))) => None,
                };
                let found = listed.and_then(|r| r.as_ref().ok()).cloned();
                let listed = listed.is_some();
                // Re-declared by the reconcile this triggers.
                let went_missing = figures.is_ok() && !listed && !state.announcements.queue_missing;
                if went_missing {
                    state.announcements.queue_missing = true;
                }
                let service = labels(key);
                if state.observe(&service, found, unavailable, now, &self.metrics) || went_missing {
                    triggers.push(key.clone());
                }
                self.metrics.service.observe(
                    &service,
                    &state.view(),
                    state.registration.policy.target_queue_delay_seconds,
                );
            }
        }
        for key in triggers {
            let _ = self.trigger.unbounded_send(key);
        }
    }

    /// One probe round: every autoscaled service's queue read with a passive `queue.declare` (a broker at a time,
    /// all brokers at once, each cut off after `timeout`), and a reconcile triggered for each new decision. Only
    /// services that a poll has given figures to are probed: the probe refreshes the backlog, the poll the rates.
    pub async fn probe_within(&self, timeout: Duration) {
        let mut by_broker: Vec<(Arc<Broker>, Vec<ProbeTarget>)> = Vec::new();
        {
            let services = self.services.lock().expect("observer lock");
            for (key, state) in services.iter().filter(|(_, s)| s.registration.enabled && s.figures.is_some()) {
                let target = (key.clone(), state.registration.queue.clone());
                match by_broker.iter_mut().find(|(b, _)| Arc::ptr_eq(b, &state.registration.broker)) {
                    Some((_, queues)) => queues.push(target),
                    None => by_broker.push((state.registration.broker.clone(), vec![target])),
                }
            }
        }
        let rounds = by_broker.into_iter().map(|(broker, queues)| async move {
            let round = async {
                for (key, queue) in queues {
                    self.metrics.observer_probes.inc();
                    match broker.probe_queue(&queue).await {
                        Ok(probe) => self.record_probe(&key, probe, self.started.elapsed().as_secs_f64()),
                        // The poll reports an unreachable broker or a missing queue; a probe only adds freshness.
                        Err(error) => {
                            tracing::debug!(%queue, %error, "probe failed");
                            if matches!(error, BrokerError::Unavailable(_)) {
                                break;
                            }
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(timeout, round).await;
        });
        futures::future::join_all(rounds).await;
    }

    /// Decides for one service on a probe's backlog (taken at `now`) and triggers its reconcile if that is new.
    pub fn record_probe(&self, key: &ObjectRef<RpcService>, probe: QueueProbe, now: f64) {
        let triggered = {
            let mut services = self.services.lock().expect("observer lock");
            let Some(state) = services.get_mut(key) else { return };
            let service = labels(key);
            let triggered = state.probe(&service, probe, now, &self.metrics);
            self.metrics.service.observe(&service, &state.view(), state.registration.policy.target_queue_delay_seconds);
            triggered
        };
        if triggered {
            let _ = self.trigger.unbounded_send(key.clone());
        }
    }

    /// Probes every `interval` until the task is dropped (see [`Observer::probe_within`]).
    pub async fn run_probes(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.probe_within(interval).await;
        }
    }

    /// Polls every `interval` until the task is dropped; no broker's poll outlasts the interval (nor the
    /// management client's own timeout), so the round keeps its cadence.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            self.poll_within(interval.min(management::REQUEST_TIMEOUT)).await;
        }
    }
}

/// A service's metric labels.
fn labels(key: &ObjectRef<RpcService>) -> ServiceLabels {
    ServiceLabels { namespace: key.namespace.clone().unwrap_or_default(), service: key.name.clone() }
}

impl ServiceState {
    fn new(registration: Registration) -> Self {
        Self {
            scaler: Autoscaler::new(registration.seed_throughput),
            registration,
            figures: None,
            decision: None,
            applied: None,
            last_scale: None,
            announcements: Announcements::default(),
            metrics_unavailable: None,
            last_probe: None,
        }
    }

    /// Feeds one round's figures to the scaler; returns whether the service's reconcile should run.
    fn observe(
        &mut self,
        service: &ServiceLabels,
        found: Option<QueueFigures>,
        unavailable: Option<String>,
        now: f64,
        metrics: &Metrics,
    ) -> bool {
        let fresh = self.last_probe.filter(|(at, _)| now - at <= PROBE_FRESHNESS_SECONDS).map(|(_, p)| p);
        let sample = found.as_ref().map(|f| QueueSample {
            at: now,
            ready: fresh.map_or(f.ready, |p| p.ready),
            unacked: f.unacked,
            consumers: fresh.map_or(f.consumers, |p| p.consumers),
            published_total: f.published_total,
            acked_total: f.acked_total,
        });
        let figures_changed = match (&self.figures, &found) {
            (Some(a), Some(b)) => {
                (a.ready, a.unacked, a.consumers) != (b.ready, b.unacked, b.consumers)
                    || a.published_total != b.published_total
            }
            (None, Some(_)) => true,
            // No figures this round: the availability change below says so, once.
            (_, None) => false,
        };
        let availability_changed = self.metrics_unavailable.is_some() != unavailable.is_some();
        self.metrics_unavailable = unavailable;
        if found.is_some() {
            self.figures = found;
        }
        let shown_before = self.shown_rates();
        let observation = self.scaler.observe(sample, now);
        let decision = self.scaler.decide(&observation, self.counts(), &self.registration.policy, now);
        let changed = self.settle(service, decision, "poll", metrics);
        // The rate window keeps moving after the counters stop (a burst's end): status must follow it down to 0.
        let rates_changed = shown_news(shown_before, self.shown_rates());
        changed || figures_changed || availability_changed || rates_changed
    }

    /// The rates and delay status shows from the latest decision, rounded as status rounds them.
    fn shown_rates(&self) -> [Option<f64>; 3] {
        crate::status::shown_rates(&self.view())
    }

    /// Feeds a probe's backlog to the scaler; returns whether the service's reconcile should run (a new decision).
    fn probe(&mut self, service: &ServiceLabels, probe: QueueProbe, now: f64, metrics: &Metrics) -> bool {
        self.last_probe = Some((now, probe));
        let (counts, policy) = (self.counts(), &self.registration.policy);
        let Some(decision) = self.scaler.probe(probe.ready, probe.consumers, counts, policy, now) else {
            return false;
        };
        self.settle(service, decision, "probe", metrics)
    }

    /// The replicas a decision steps from: what the last reconcile applied, not what it read before applying (a
    /// poll right after a probe's scale-up would take that for the pool and undo the scale-up).
    fn counts(&self) -> ReplicaCounts {
        let reg = &self.registration;
        ReplicaCounts { current: self.applied.unwrap_or(reg.replicas.current), ready: reg.replicas.ready }
    }

    /// Keeps a decision and announces it if it is new; returns whether it changes the replicas applied. `source`:
    /// what it was decided on (`poll` or `probe`), for the log.
    fn settle(&mut self, service: &ServiceLabels, decision: ScaleDecision, source: &str, metrics: &Metrics) -> bool {
        let reg = &self.registration;
        let previous = self.applied.or(reg.deployed);
        let changed = reg.enabled && previous != Some(decision.desired);
        // Announce a decision once, not on every poll until the reconcile has applied it.
        let new_decision = self.decision.as_ref().map(|d| d.desired) != Some(decision.desired);
        if changed && new_decision {
            let from = previous.unwrap_or(0);
            let message = format!("{} → {} replicas: {}", from, decision.desired, decision.message);
            tracing::info!(namespace = %service.namespace, name = %service.service, source, "{message}");
            self.announcements.scaled = Some(message);
            self.last_scale = Some((Timestamp::now(), format!("{}: {}", decision.reason, decision.message)));
            let direction = if decision.desired > from { "up" } else { "down" };
            metrics.scale_events.get_or_create(&DirectionLabel { direction: direction.into() }).inc();
            metrics.service.scaled(service, decision.reason);
        }
        self.decision = Some(decision);
        changed
    }

    /// What the reconcile applies and reports; reading it changes nothing.
    fn view(&self) -> ServiceView {
        let reg = &self.registration;
        let policy = &reg.policy;
        let desired = match (&self.decision, reg.deployed) {
            (Some(d), _) => d.desired,
            // Before the first observation: keep what runs, within bounds.
            (None, Some(deployed)) => deployed.clamp(policy.min_replicas, policy.max_replicas),
            (None, None) => policy.min_replicas,
        };
        // No rates until two polls span a window: empty in status, not a misleading 0.
        let known = self.decision.as_ref().filter(|d| d.inputs.rates_known);
        ServiceView {
            desired_replicas: desired,
            enabled: reg.enabled,
            replicas: ReplicaCounts { current: reg.pods, ready: reg.replicas.ready },
            figures: self.figures.clone(),
            arrival_rate: known.map(|d| d.inputs.arrival_rate),
            completion_rate: known.map(|d| d.inputs.completion_rate),
            per_replica_throughput: self.scaler.measured_throughput(),
            decision: self.decision.clone(),
            metrics_unavailable: self.metrics_unavailable.clone(),
            last_scale: self.last_scale.clone(),
            announcements: self.announcements.clone(),
        }
    }
}

/// Whether status must be rewritten for figures it shows: a value it shows moved, or a new one that is not 0 (a
/// first 0 for every idle service would cost a write each and tell nothing).
fn shown_news(before: [Option<f64>; 3], after: [Option<f64>; 3]) -> bool {
    before.iter().zip(&after).any(|(b, a)| b != a && (b.is_some() || a.is_some_and(|x| x != 0.0)))
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc::{UnboundedReceiver, unbounded};
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use kube::runtime::reflector;

    use super::*;
    use crate::broker::BrokerEndpoint;
    use crate::crd::RpcServiceSpec;

    struct Fixture {
        observer: Observer,
        triggers: UnboundedReceiver<ObjectRef<RpcService>>,
        broker: Arc<Broker>,
        svc: RpcService,
        key: ObjectRef<RpcService>,
        _cache: reflector::store::Writer<RpcService>,
    }

    /// A service of 1..10 workers of 10 req/s each (T 2 s, u 0.8: 8 req/s per worker planned); no broker is
    /// contacted, the figures are handed to [`Observer::record`].
    fn fixture() -> Fixture {
        let (cache, writer) = reflector::store();
        let (trigger, triggers) = unbounded();
        let observer = Observer::new(cache, trigger, Arc::new(Metrics::default()));
        let endpoint = BrokerEndpoint {
            amqp_uri: "amqp://u:p@rabbit/%2f".into(),
            management_uri: "http://u:p@rabbit:15672".into(),
        };
        let broker = Arc::new(Broker::new(endpoint).unwrap());
        let spec: RpcServiceSpec =
            serde_yaml::from_str("{ scaling: { perReplicaThroughputHint: 10 }, worker: { prefetch: 4 } }").unwrap();
        let mut svc = RpcService::new("calc", spec);
        svc.metadata.namespace = Some("shop".into());
        let key = ObjectRef::from_obj(&svc);
        Fixture { observer, triggers, broker, svc, key, _cache: writer }
    }

    fn deployment(replicas: i32) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec { replicas: Some(replicas), ..Default::default() }),
            status: Some(DeploymentStatus {
                replicas: Some(replicas),
                ready_replicas: Some(replicas),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn queue(ready: u64, published: u64) -> QueueFigures {
        QueueFigures {
            name: "shop.calc".into(),
            ready,
            unacked: 0,
            consumers: 1,
            published_total: published,
            acked_total: 0,
        }
    }

    /// A fixture whose service has been reconciled with `replicas`, polled once idle and reconciled again.
    fn settled(replicas: i32) -> Fixture {
        let mut f = fixture();
        f.reconcile(replicas);
        f.poll(Ok(vec![queue(0, 0)]), 0.0);
        f.reconcile(replicas);
        f.triggered();
        f
    }

    impl Fixture {
        /// A pass that stops before publishing (its Deployment patch or its declaration failed): it reads the view.
        fn failed_pass(&self, deployed: i32) -> ServiceView {
            let current = deployment(deployed);
            self.observer.register(Registration::new(self.key.clone(), &self.svc, self.broker.clone(), Some(&current)))
        }

        /// What a reconcile does with the observer: register, apply the view's replicas, publish its news.
        fn reconcile(&self, deployed: i32) -> ServiceView {
            let view = self.failed_pass(deployed);
            self.observer.applied(&self.key, view.desired_replicas);
            self.observer.announced(&self.key, &view.announcements);
            view
        }

        fn poll(&self, figures: Result<Vec<QueueFigures>, BrokerError>, at: f64) {
            self.poll_readings(figures.map(|list| list.into_iter().map(Ok).collect()), at);
        }

        fn poll_readings(&self, readings: Result<Vec<QueueReading>, BrokerError>, at: f64) {
            self.observer.record(&self.broker, &readings, at);
        }

        /// The reconciles triggered since the last call.
        fn triggered(&mut self) -> usize {
            std::iter::from_fn(|| self.triggers.try_recv().ok()).inspect(|k| assert_eq!(*k, self.key)).count()
        }
    }

    #[test]
    fn the_policy_takes_the_spec_and_the_prefetch_and_shares_its_defaults() {
        assert_eq!(policy(&RpcServiceSpec::default()), PolicySpec::default());
        let mut spec = RpcServiceSpec::default();
        spec.scaling.per_replica_throughput_hint = Some(3.0);
        spec.scaling.scale_down_delay_seconds = 90;
        spec.worker.prefetch = 16;
        let p = policy(&spec);
        assert_eq!((p.min_replicas, p.max_replicas, p.prefetch), (1, 10, 16));
        assert_eq!((p.target_queue_delay_seconds, p.scale_down_delay_seconds, p.target_utilization), (2.0, 90.0, 0.8));
        assert_eq!(p.per_replica_throughput_hint, Some(3.0));
    }

    #[test]
    fn a_new_decision_triggers_exactly_one_reconcile() {
        let mut f = fixture();
        let view = f.reconcile(1);
        assert_eq!(view.desired_replicas, 1);
        f.poll(Ok(vec![queue(0, 0)]), 0.0);
        assert_eq!(f.triggered(), 1, "the first figures are news for status");
        f.reconcile(1);
        f.poll(Ok(vec![queue(0, 0)]), 5.0);
        assert_eq!(f.triggered(), 0, "nothing changed (a first rate of 0 is not worth a status write)");

        // 160 waiting: (160 / 2 s) / 8 req/s per worker = 10 workers.
        f.poll(Ok(vec![queue(160, 160)]), 10.0);
        assert_eq!(f.triggered(), 1, "one reconcile for the new decision and the new figures");
        let view = f.reconcile(1);
        assert_eq!(view.desired_replicas, 10);
        assert!(view.announcements.scaled.as_deref().is_some_and(|s| s.starts_with("1 → 10 replicas")), "{view:?}");
        f.poll(Ok(vec![queue(160, 160)]), 15.0);
        assert_eq!(f.triggered(), 0, "the decision is applied and the figures did not move");
        assert_eq!(f.reconcile(10).announcements, Announcements::default(), "the Scaled event was published once");
    }

    #[test]
    fn the_rates_shown_follow_a_burst_down_to_zero_after_the_counters_stop() {
        let mut f = settled(10);
        for (at, published) in [(5.0, 500), (10.0, 1000)] {
            f.poll(Ok(vec![queue(0, published)]), at);
            f.reconcile(10);
        }
        f.triggered();
        assert_eq!(f.reconcile(10).arrival_rate, Some(100.0));
        // The burst is over: the counter stands still, the 10 s rate window empties over the next two polls.
        f.poll(Ok(vec![queue(0, 1000)]), 15.0);
        assert_eq!(f.triggered(), 1, "the rate fell: status must show it");
        assert_eq!(f.reconcile(10).arrival_rate, Some(50.0));
        f.poll(Ok(vec![queue(0, 1000)]), 20.0);
        assert_eq!(f.triggered(), 1, "the rate fell to 0");
        assert_eq!(f.reconcile(10).arrival_rate, Some(0.0));
        f.poll(Ok(vec![queue(0, 1000)]), 25.0);
        assert_eq!(f.triggered(), 0, "nothing new to show");
    }

    #[test]
    fn a_probe_between_polls_triggers_one_reconcile_for_a_backlog() {
        let mut f = fixture();
        f.reconcile(1);
        f.observer.record_probe(&f.key, QueueProbe { ready: 160, consumers: 1 }, -5.0);
        assert_eq!(f.triggered(), 0, "no decision on a probe before a poll has given figures");
        f.poll(Ok(vec![queue(0, 0)]), 0.0);
        f.reconcile(1);
        f.triggered();

        // 160 waiting a second after an idle poll: (160 / 2 s) / 8 req/s per worker = 10 workers, now.
        f.observer.record_probe(&f.key, QueueProbe { ready: 160, consumers: 1 }, 1.0);
        assert_eq!(f.triggered(), 1, "one reconcile for the new decision");
        // The poll of the same tick, before that reconcile runs, decides on the probe's backlog, not on the
        // management API's older 0: the decision the reconcile reads is still the probe's.
        f.poll(Ok(vec![queue(0, 0)]), 1.0);
        f.triggered(); // it asks again: the decision is not applied yet (the controller runs one reconcile)
        let view = f.reconcile(1);
        assert_eq!(view.desired_replicas, 10);
        assert!(view.announcements.scaled.as_deref().is_some_and(|s| s.starts_with("1 → 10 replicas")), "{view:?}");
        // A poll right after, before the Deployment's change has come back as a reconcile: its figures (the
        // management API's, seconds old) show no backlog yet; the scale-up stands.
        f.poll(Ok(vec![queue(0, 0)]), 1.3);
        assert_eq!(f.triggered(), 0, "a poll of older figures does not undo the probe's scale-up");
        assert_eq!(f.reconcile(10).desired_replicas, 10);
        f.observer.record_probe(&f.key, QueueProbe { ready: 160, consumers: 1 }, 2.0);
        assert_eq!(f.triggered(), 0, "the same decision, already applied");
        assert_eq!(f.reconcile(10).announcements, Announcements::default(), "the Scaled event was published once");
    }

    #[test]
    fn a_raised_min_replicas_is_applied_by_the_next_observation() {
        let mut f = settled(1);
        for (i, at) in [1.0, 2.0, 3.0].into_iter().enumerate() {
            f.poll(Ok(vec![queue(0, 10 * i as u64)]), at);
            f.reconcile(1);
        }
        f.triggered();
        f.svc.spec.scaling.min_replicas = 2;
        assert_eq!(f.reconcile(1).desired_replicas, 1, "the reconcile of the edit still reads the last decision");
        f.observer.record_probe(&f.key, QueueProbe { ready: 0, consumers: 1 }, 3.5);
        f.poll(Ok(vec![queue(0, 30)]), 4.0);
        assert!(f.triggered() >= 1, "the next observation decides on the new minimum");
        assert_eq!(f.reconcile(1).desired_replicas, 2);
    }

    #[test]
    fn the_view_changes_nothing_and_news_waits_until_published() {
        let f = fixture();
        f.reconcile(1);
        f.poll(Ok(vec![queue(160, 0)]), 0.0);
        let first = f.failed_pass(1);
        assert!(first.announcements.scaled.is_some());
        assert_eq!(f.failed_pass(1).announcements, first.announcements, "reading the view keeps the news");
        assert!(f.reconcile(1).announcements.scaled.is_some(), "a pass that gets through publishes it");
        assert_eq!(f.failed_pass(1).announcements, Announcements::default(), "once");
    }

    #[test]
    fn a_missing_queue_triggers_one_reconcile_and_stays_news_until_declared() {
        let mut f = settled(1);
        f.poll(Ok(vec![]), 5.0);
        assert_eq!(f.triggered(), 1);
        let view = f.failed_pass(1);
        assert!(view.announcements.queue_missing);
        assert_eq!(view.metrics_unavailable.as_deref(), Some("queue shop.calc is missing on the broker"));
        // That pass failed to declare it: it announced nothing, and the observer does not trigger again.
        f.poll(Ok(vec![]), 10.0);
        assert_eq!(f.triggered(), 0);
        // The next pass declares it and announces it, once.
        assert!(f.reconcile(1).announcements.queue_missing);
        assert!(!f.reconcile(1).announcements.queue_missing);
    }

    #[test]
    fn a_queue_listed_without_counts_is_unknown_not_empty_and_not_missing() {
        let mut f = settled(3);
        let unknown = crate::broker::UnknownFigures { name: "shop.calc".into(), missing: vec!["messages_ready"] };
        for at in [5.0, 10.0] {
            f.poll_readings(Ok(vec![Err(unknown.clone())]), at);
        }
        assert_eq!(f.triggered(), 1, "the availability changed once");
        let view = f.reconcile(3);
        assert_eq!(view.desired_replicas, 3, "the pool is kept, not shrunk on a backlog read as 0");
        assert!(!view.announcements.queue_missing, "the queue exists: nothing to declare again");
        assert!(view.metrics_unavailable.is_some_and(|m| m.contains("no messages_ready")));
        assert_eq!(view.decision.map(|d| d.inputs.queueing_delay), Some(None));
    }

    #[test]
    fn an_unanswered_poll_triggers_once_and_keeps_the_pool() {
        let mut f = settled(3);
        for at in [5.0, 10.0] {
            f.poll(Err(BrokerError::ManagementUnavailable("connection refused".into())), at);
        }
        assert_eq!(f.triggered(), 1, "the availability changed once");
        let view = f.reconcile(3);
        assert_eq!(view.desired_replicas, 3);
        assert!(view.metrics_unavailable.is_some_and(|m| m.contains("connection refused")));
    }

    #[test]
    fn each_service_has_its_series_until_it_is_forgotten() {
        let f = settled(1);
        f.poll(Ok(vec![queue(160, 160)]), 5.0);
        let text = f.observer.metrics.encode();
        let series = |name: &str| format!("warren_operator_service_{name}{{namespace=\"shop\",service=\"calc\"");
        for name in ["backlog", "in_flight", "arrival_rate", "completion_rate", "queueing_delay_seconds"] {
            assert!(text.contains(&series(name)), "{name}:\n{text}");
        }
        for name in ["target_queue_delay_seconds", "desired_replicas", "ready_replicas"] {
            assert!(text.contains(&series(name)), "{name}:\n{text}");
        }
        assert!(text.contains(&format!("{}}} 160", series("backlog"))), "{text}");
        // One decided 1 → 10 on the 160 waiting: counted by its reason; μ is the spec's hint.
        let decisions = format!("{},reason=\"MaxReplicas\"}} 1", series("scale_decisions_total"));
        assert!(text.contains(&decisions), "{text}");
        assert!(text.contains(&format!("{},source=\"hint\"}} 10", series("per_replica_throughput"))), "{text}");

        // Unknown figures: no backlog, no delay — absent, not 0 — while the replica series stay.
        let unknown = crate::broker::UnknownFigures { name: "shop.calc".into(), missing: vec!["messages_ready"] };
        f.poll_readings(Ok(vec![Err(unknown)]), 10.0);
        let text = f.observer.metrics.encode();
        assert!(!text.contains(&series("backlog")) && !text.contains(&series("queueing_delay_seconds")), "{text}");
        assert!(text.contains(&series("desired_replicas")), "{text}");

        f.observer.forget(&f.key);
        let text = f.observer.metrics.encode();
        assert!(!text.contains("service=\"calc\""), "the service's series went with it:\n{text}");
    }

    #[test]
    fn a_service_with_autoscaling_off_reports_but_never_scales() {
        let mut f = fixture();
        f.svc.spec.scaling.enabled = false;
        f.reconcile(2);
        f.poll(Ok(vec![queue(5000, 5000)]), 0.0);
        assert_eq!(f.triggered(), 1, "new figures for status");
        let view = f.reconcile(2);
        assert!(!view.enabled);
        assert_eq!(view.announcements.scaled, None);
    }
}
