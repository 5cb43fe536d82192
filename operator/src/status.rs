//! The status step, pure: the conditions a pass found (in the metav1.Condition shape, merged so that
//! `lastTransitionTime` only moves when the status does), the next status with the observer's view, the condition
//! transitions, and the events that announce them. The reconciler writes the result in one patch.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Resource;
use kube::runtime::events::{Event, EventType};

use crate::broker::{Broker, BrokerError};
use crate::build;
use crate::crd::{QueueStatus, RpcService, RpcServiceStatus, ScalingStatus};
use crate::error::Error;
use crate::observer::{Announcements, ServiceView};
use warren_autoscale::{ScaleDecision, ScaleReason, ThroughputSource};

pub const READY: &str = "Ready";
pub const QUEUE_READY: &str = "QueueReady";
pub const WORKERS_READY: &str = "WorkersReady";
pub const SCALING: &str = "Scaling";

/// A condition as the reconciler decides it, before timestamps.
#[derive(Clone, Debug, PartialEq)]
pub struct ConditionUpdate {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl ConditionUpdate {
    pub fn new(type_: &'static str, status: bool, reason: impl Into<String>, message: impl Into<String>) -> Self {
        Self { type_, status, reason: reason.into(), message: message.into() }
    }
}

/// Merges `updates` into `existing`: a condition whose status did not change keeps its `lastTransitionTime`.
/// Conditions not named in `updates` are kept as they are.
pub fn merge_conditions(
    existing: &[Condition],
    updates: &[ConditionUpdate],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing.to_vec();
    for update in updates {
        let status = if update.status { "True" } else { "False" }.to_owned();
        let fresh = Condition {
            type_: update.type_.to_owned(),
            status: status.clone(),
            reason: update.reason.clone(),
            message: update.message.clone(),
            observed_generation: generation,
            last_transition_time: now.clone(),
        };
        match merged.iter_mut().find(|c| c.type_ == update.type_) {
            Some(current) => {
                let since = if current.status == status { current.last_transition_time.clone() } else { now.clone() };
                *current = Condition { last_transition_time: since, ..fresh };
            }
            None => merged.push(fresh),
        }
    }
    merged
}

/// `Ready` from the other conditions: true when the queue and the workers are.
pub fn ready_condition(queue: &ConditionUpdate, workers: &ConditionUpdate) -> ConditionUpdate {
    match (queue.status, workers.status) {
        (true, true) => ConditionUpdate::new(READY, true, "Ready", "the queue is declared and the workers are ready"),
        (false, _) => ConditionUpdate::new(READY, false, queue.reason.clone(), queue.message.clone()),
        (true, false) => ConditionUpdate::new(READY, false, workers.reason.clone(), workers.message.clone()),
    }
}

/// `QueueReady` from the outcome of declaring the queues on `broker`.
pub fn queue_condition(declared: &Result<(), BrokerError>, queue: &str, broker: &Broker) -> ConditionUpdate {
    match declared {
        Ok(()) => ConditionUpdate::new(
            QUEUE_READY,
            true,
            "Declared",
            format!(
                "queue {queue} and {queue}.dead are declared on vhost {} of {}",
                broker.vhost(),
                broker.display_name()
            ),
        ),
        Err(e) => ConditionUpdate::new(QUEUE_READY, false, e.reason(), e.to_string()),
    }
}

/// `WorkersReady` from the Deployment as applied and the replicas asked for.
pub fn workers_condition(deployment: &Deployment, desired: i32) -> ConditionUpdate {
    let ready = deployment.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    let counted = format!("{ready}/{desired} workers ready");
    if desired == 0 {
        ConditionUpdate::new(WORKERS_READY, true, "ScaledToZero", "no workers: the service is idle")
    } else if ready >= desired {
        ConditionUpdate::new(WORKERS_READY, true, "AllReplicasReady", counted)
    } else if ready > 0 {
        ConditionUpdate::new(WORKERS_READY, true, "SomeReplicasReady", counted)
    } else {
        ConditionUpdate::new(WORKERS_READY, false, "NoReplicasReady", counted)
    }
}

/// `QueueReady` and `WorkersReady` when the broker could not be reached or the queue may not be used: nothing
/// can be declared or run.
pub fn unreachable_conditions(error: &Error) -> [ConditionUpdate; 2] {
    let workers = match error {
        Error::Dereference(_) => "workers need the broker Secret",
        _ => "no workers run until the service has a queue of its own",
    };
    [
        ConditionUpdate::new(QUEUE_READY, false, error.reason(), error.to_string()),
        ConditionUpdate::new(WORKERS_READY, false, error.reason(), workers),
    ]
}

/// A condition whose status or reason changed in a pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub type_: String,
    /// The condition had no value before (the service's first pass, or the condition is new).
    pub first: bool,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// The status after a pass: `updates` (the queue and workers conditions; `Ready` is derived from them), the
/// observer's `view` when the broker was reached, and the replicas asked for. Returns the transitions too.
pub fn next(
    svc: &RpcService,
    updates: &[ConditionUpdate],
    view: Option<&ServiceView>,
    desired_replicas: Option<i32>,
    now: &Time,
) -> (RpcServiceStatus, Vec<Transition>) {
    let previous = svc.status.clone().unwrap_or_default();
    let mut all: Vec<ConditionUpdate> = updates.to_vec();
    let find = |type_: &str| updates.iter().find(|c| c.type_ == type_);
    if let (Some(q), Some(w)) = (find(QUEUE_READY), find(WORKERS_READY)) {
        all.push(ready_condition(q, w));
    }
    if let Some(view) = view {
        all.push(scaling_condition(view));
    }
    let conditions = merge_conditions(&previous.conditions, &all, svc.meta().generation, now);
    let transitions = conditions
        .iter()
        .filter(|c| {
            let before = previous.conditions.iter().find(|p| p.type_ == c.type_);
            before.is_none_or(|b| b.status != c.status || b.reason != c.reason)
        })
        .map(|c| Transition {
            type_: c.type_.clone(),
            first: !previous.conditions.iter().any(|p| p.type_ == c.type_),
            status: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect();
    let mut next = RpcServiceStatus {
        observed_generation: svc.meta().generation,
        conditions,
        selector: Some(build::selector_string(svc)),
        desired_replicas,
        ..previous.clone()
    };
    if let Some(view) = view {
        let [publish_rate, ack_rate, delay] = shown_rates(view);
        next.replicas = view.replicas.current;
        next.ready_replicas = view.replicas.ready;
        let figures = match &view.figures {
            Some(f) => QueueStatus {
                name: svc.queue_name(),
                ready: backlog(view).map(|b| b as i64),
                unacked: Some(f.unacked as i64),
                consumers: Some(f.consumers as i64),
                publish_rate,
                ack_rate,
                ..QueueStatus::default()
            },
            None => QueueStatus { name: svc.queue_name(), ..previous.queue.clone().unwrap_or_default() },
        };
        next.queue = Some(QueueStatus {
            queueing_delay_seconds: delay,
            target_delay_seconds: Some(svc.spec.scaling.target_queue_delay_seconds),
            ..figures
        });
        if let Some(mu) = view.per_replica_throughput {
            next.per_replica_throughput = Some(round2(mu));
        }
        if let Some(decision) = &view.decision {
            next.scaling = Some(keep_time(previous.scaling.as_ref(), scaling_status(decision, now)));
        }
        if let Some((at, reason)) = &view.last_scale {
            next.last_scale_time = Some(Time(*at));
            next.last_scale_reason = Some(reason.clone());
        }
    }
    (next, transitions)
}

/// `Scaling` from the observer's view: off, blind (no figures), deciding, or waiting for its first poll.
pub fn scaling_condition(view: &ServiceView) -> ConditionUpdate {
    if !view.enabled {
        ConditionUpdate::new(SCALING, false, "Disabled", "autoscaling is off: spec.worker.replicas is used")
    } else if let Some(reason) = &view.metrics_unavailable {
        ConditionUpdate::new(
            SCALING,
            false,
            ScaleReason::MetricsUnavailable.to_string(),
            format!("{reason}; keeping {} replicas", view.desired_replicas),
        )
    } else if let Some(d) = &view.decision {
        ConditionUpdate::new(SCALING, true, d.reason.to_string(), d.message.clone())
    } else {
        ConditionUpdate::new(SCALING, true, "Waiting", "waiting for the first observation of the queue")
    }
}

/// Requests waiting, from the same observation as the delay: the latest decision's (a probe between polls sees the
/// backlog seconds before the management API does), else the last poll's.
pub fn backlog(view: &ServiceView) -> Option<u64> {
    let current = view.metrics_unavailable.is_none();
    let decided = view.decision.as_ref().filter(|_| current).map(|d| d.inputs.backlog);
    decided.or(view.figures.as_ref().map(|f| f.ready))
}

/// The arrival and completion rates and the queueing delay status shows for `view`, rounded as it shows them.
pub fn shown_rates(view: &ServiceView) -> [Option<f64>; 3] {
    [view.arrival_rate.map(round2), view.completion_rate.map(round2), queueing_delay(view).map(round2)]
}

/// The estimated queueing delay of the latest decision, absent while the figures are unavailable.
pub fn queueing_delay(view: &ServiceView) -> Option<f64> {
    let current = view.metrics_unavailable.is_none();
    view.decision.as_ref().filter(|_| current).and_then(|d| d.inputs.queueing_delay)
}

/// `status.scaling`: the decision with the figures it was made from.
fn scaling_status(d: &ScaleDecision, now: &Time) -> ScalingStatus {
    ScalingStatus {
        desired_replicas: d.desired,
        reason: d.reason.to_string(),
        message: d.message.clone(),
        backlog: d.inputs.backlog as i64,
        in_flight: d.inputs.in_flight as i64,
        arrival_rate: d.inputs.arrival_rate,
        per_replica_throughput: round2(d.inputs.per_replica_throughput),
        throughput_source: Some(throughput_source(d.inputs.throughput_source).to_owned()),
        time: Some(now.clone()),
    }
}

/// The decision `fresh` with the time of `previous` when it says the same: a pass that finds the same decision
/// changes nothing in status (and writes nothing).
fn keep_time(previous: Option<&ScalingStatus>, fresh: ScalingStatus) -> ScalingStatus {
    match previous {
        Some(p) if ScalingStatus { time: None, ..p.clone() } == ScalingStatus { time: None, ..fresh.clone() } => {
            p.clone()
        }
        _ => fresh,
    }
}

/// The source as status and metrics name it (camelCase, like the API's enums).
pub fn throughput_source(source: ThroughputSource) -> &'static str {
    match source {
        ThroughputSource::Measured => "measured",
        ThroughputSource::LowerBound => "lowerBound",
        ThroughputSource::Hint => "hint",
        ThroughputSource::Prior => "prior",
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The state every new service starts in (its pods not ready yet): no warning worth an event, and at N services N
/// events' worth of API server writes. Its end, the workers becoming ready, is one.
fn starting_state(t: &Transition) -> bool {
    t.first && t.type_ == WORKERS_READY && t.reason == "NoReplicasReady"
}

/// The events of a pass: the transitions of the queue and the workers (`Ready` and `Scaling` repeat them), and the
/// observer's `news` (a queue declared again, a scale change).
pub fn events(svc: &RpcService, transitions: &[Transition], news: &Announcements) -> Vec<Event> {
    let mut events: Vec<Event> = transitions
        .iter()
        .filter(|t| t.type_ != READY && t.type_ != SCALING && !starting_state(t))
        .map(|t| Event {
            type_: if t.status { EventType::Normal } else { EventType::Warning },
            reason: t.reason.clone(),
            note: Some(t.message.chars().take(1000).collect()),
            action: format!("Reconcile{}", t.type_),
            secondary: None,
        })
        .collect();
    if news.queue_missing {
        events.push(Event {
            type_: EventType::Warning,
            reason: "QueueRedeclared".into(),
            note: Some(format!("queue {} was missing on the broker and has been declared again", svc.queue_name())),
            action: "DeclareQueue".into(),
            secondary: None,
        });
    }
    if let Some(scale) = &news.scaled {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Scaled".into(),
            note: Some(scale.clone()),
            action: "Scale".into(),
            secondary: None,
        });
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::QueueFigures;
    use k8s_openapi::jiff::Timestamp;
    use warren_autoscale::{Autoscaler, PolicySpec, QueueSample, ReplicaCounts};

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first =
            merge_conditions(&[], &[ConditionUpdate::new(QUEUE_READY, true, "Declared", "ok")], Some(1), &at(10));
        let same = merge_conditions(
            &first,
            &[ConditionUpdate::new(QUEUE_READY, true, "Declared", "ok again")],
            Some(2),
            &at(20),
        );
        assert_eq!(same[0].last_transition_time, at(10));
        assert_eq!(same[0].message, "ok again");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge_conditions(
            &same,
            &[ConditionUpdate::new(QUEUE_READY, false, "BrokerUnavailable", "down")],
            Some(2),
            &at(30),
        );
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert_eq!(flipped[0].status, "False");
    }

    #[test]
    fn a_new_service_s_unready_workers_are_no_event_but_workers_lost_later_are() {
        let reasons = |events: &[Event]| events.iter().map(|e| e.reason.clone()).collect::<Vec<_>>();
        let news = Announcements::default();
        let starting = [
            ConditionUpdate::new(QUEUE_READY, true, "Declared", "declared"),
            ConditionUpdate::new(WORKERS_READY, false, "NoReplicasReady", "0/1 workers ready"),
        ];
        let mut svc = RpcService::new("calc", Default::default());
        let (status, transitions) = next(&svc, &starting, None, Some(1), &at(1));
        assert_eq!(reasons(&events(&svc, &transitions, &news)), ["Declared"]);

        svc.status = Some(status);
        let ready = [starting[0].clone(), ConditionUpdate::new(WORKERS_READY, true, "AllReplicasReady", "1/1")];
        let (status, transitions) = next(&svc, &ready, None, Some(1), &at(2));
        assert_eq!(reasons(&events(&svc, &transitions, &news)), ["AllReplicasReady"]);

        svc.status = Some(status);
        let (_, transitions) = next(&svc, &starting, None, Some(1), &at(3));
        let lost = events(&svc, &transitions, &news);
        assert_eq!(reasons(&lost), ["NoReplicasReady"]);
        assert!(matches!(lost[0].type_, EventType::Warning));
    }

    #[test]
    fn conditions_not_updated_are_kept() {
        let first = merge_conditions(&[], &[ConditionUpdate::new(SCALING, true, "Steady", "")], Some(1), &at(1));
        let next =
            merge_conditions(&first, &[ConditionUpdate::new(QUEUE_READY, true, "Declared", "")], Some(1), &at(2));
        assert_eq!(next.len(), 2);
    }

    /// What the observer reports after one poll of `figures` (None: no figures yet) for a service on a 10 req/s
    /// hint with one ready worker.
    fn view(figures: Option<QueueFigures>, unavailable: Option<&str>) -> ServiceView {
        let spec = PolicySpec { per_replica_throughput_hint: Some(10.0), ..PolicySpec::default() };
        let mut scaler = Autoscaler::new(None);
        let sample = figures.as_ref().filter(|_| unavailable.is_none()).map(|f| QueueSample {
            at: 0.0,
            ready: f.ready,
            unacked: f.unacked,
            consumers: f.consumers,
            published_total: f.published_total,
            acked_total: f.acked_total,
        });
        let observation = scaler.observe(sample, 0.0);
        let decision = scaler.decide(&observation, ReplicaCounts { current: 1, ready: 1 }, &spec, 0.0);
        ServiceView {
            desired_replicas: decision.desired,
            enabled: true,
            replicas: ReplicaCounts { current: 1, ready: 1 },
            figures,
            arrival_rate: None,
            completion_rate: None,
            per_replica_throughput: None,
            decision: Some(decision),
            metrics_unavailable: unavailable.map(str::to_owned),
            last_scale: None,
            announcements: Announcements::default(),
        }
    }

    #[test]
    fn the_queue_status_shows_the_delay_beside_the_target_and_nothing_it_does_not_know() {
        let mut svc = RpcService::new("calc", Default::default());
        svc.metadata.namespace = Some("shop".into());
        let unknown = view(None, Some("the management API reports no messages_ready for queue shop.calc"));
        let (status, _) = next(&svc, &[], Some(&unknown), Some(1), &at(1));
        let queue = status.queue.clone().unwrap();
        assert_eq!((queue.name.as_str(), queue.target_delay_seconds), ("shop.calc", Some(2.0)));
        assert_eq!(
            (queue.ready, queue.unacked, queue.consumers, queue.queueing_delay_seconds),
            (None, None, None, None)
        );

        // 25 waiting, one ready worker at 10 req/s: 2.5 s, over the 2 s target.
        let figures = QueueFigures { name: "shop.calc".into(), ready: 25, consumers: 1, ..QueueFigures::default() };
        svc.status = Some(status);
        let (status, _) = next(&svc, &[], Some(&view(Some(figures.clone()), None)), Some(1), &at(2));
        let queue = status.queue.clone().unwrap();
        assert_eq!(
            (queue.ready, queue.queueing_delay_seconds, queue.target_delay_seconds),
            (Some(25), Some(2.5), Some(2.0))
        );

        // The broker stops answering: the figures stay as last observed, the estimate of now goes.
        svc.status = Some(status);
        let (status, _) = next(&svc, &[], Some(&view(Some(figures), Some("no answer"))), Some(1), &at(3));
        let queue = status.queue.unwrap();
        assert_eq!((queue.ready, queue.queueing_delay_seconds), (Some(25), None));
    }

    #[test]
    fn the_backlog_shown_is_the_one_the_delay_was_estimated_from() {
        let mut svc = RpcService::new("calc", Default::default());
        svc.metadata.namespace = Some("shop".into());
        let figures = QueueFigures { name: "shop.calc".into(), ready: 253, consumers: 5, ..QueueFigures::default() };
        // A probe after the poll found the queue empty: the delay is 0, so the backlog shown is 0, not the poll's 253.
        let mut probed = view(Some(figures), None);
        let decision = probed.decision.as_mut().unwrap();
        (decision.inputs.backlog, decision.inputs.queueing_delay) = (0, Some(0.0));
        let (status, _) = next(&svc, &[], Some(&probed), Some(1), &at(1));
        let queue = status.queue.unwrap();
        assert_eq!((queue.ready, queue.queueing_delay_seconds, queue.consumers), (Some(0), Some(0.0), Some(5)));
    }

    #[test]
    fn ready_reports_the_first_failing_part() {
        let q = ConditionUpdate::new(QUEUE_READY, false, "QueueConflict", "x-max-length differs");
        let w = ConditionUpdate::new(WORKERS_READY, true, "AllReplicasReady", "");
        let r = ready_condition(&q, &w);
        assert!(!r.status);
        assert_eq!(r.reason, "QueueConflict");
    }
}
