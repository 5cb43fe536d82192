//! warren's autoscaler: from polls of a request queue to the number of workers to run (docs/autoscaling.md).
//!
//! Pure code: no broker, no cluster, no Kubernetes types. The operator maps an RpcService's spec into a
//! [`PolicySpec`], keeps one [`Autoscaler`] per service and, every poll:
//!
//! ```
//! # use warren_autoscale::{Autoscaler, PolicySpec, QueueSample, ReplicaCounts, ScaleReason};
//! # let spec = PolicySpec::default();
//! # let now = 5.0;
//! let mut scaler = Autoscaler::new(None); // or Some(status.perReplicaThroughput) after a restart
//! let sample = QueueSample { at: now, ready: 40, unacked: 32, consumers: 1, published_total: 900, acked_total: 860 };
//! let observation = scaler.observe(Some(sample), now); // None when the management API or the queue is missing
//! let decision = scaler.decide(&observation, ReplicaCounts { current: 1, ready: 1 }, &spec, now);
//! // One poll gives no rate yet, and μ is a guess until the first pod has served: the pool waits for a measurement.
//! assert_eq!((decision.desired, decision.reason), (1, ScaleReason::Steady));
//! println!("{}", decision.message);
//! ```
//!
//! The policy ([`decide`]) answers two questions in turn: what the observation needs ([`need`]) and how far the
//! pool steps toward it ([`step`]). The crate's binary, `warren-autoscale simulate`, runs it against KEDA + HPA
//! on load traces in a queue model.

use std::collections::VecDeque;

mod policy;
mod rates;
mod recurrence;
mod throughput;

pub use policy::{BacklogSurge, MIN_SURGE_GROWTH_SHARE, SURGE_HORIZON_SECONDS, surge};
pub use policy::{
    DEFAULT_MAX_REPLICAS, DEFAULT_MAX_SCALE_UP_FACTOR, DEFAULT_MAX_SCALE_UP_PODS, DEFAULT_MIN_REPLICAS,
    DEFAULT_PREFETCH, DEFAULT_SCALE_DOWN_DELAY_SECONDS, DEFAULT_TARGET_QUEUE_DELAY_SECONDS, DEFAULT_TARGET_UTILIZATION,
    DEFAULT_TOLERANCE, DecisionInputs, Need, PolicySpec, PolicyState, RecommendationWindow, ReplicaCounts,
    ScaleDecision, ScaleReason, Step, URGENT_BACKLOG_SHARE, decide, need, queueing_delay, step,
};
pub use rates::{
    DEFAULT_RATE_WINDOW, MAX_LOOK_GAP_SECONDS, Observation, ObservedQueue, QueueSample, RateTracker, WindowFigures,
};
pub use recurrence::{
    ANTICIPATION_JITTER_SHARE, ANTICIPATION_LEAD_SECONDS, ANTICIPATION_SLACK_SHARE, Anticipation, BASE_HISTORY_SECONDS,
    MAX_RECURRENCE_SECONDS, MAX_RECURRENCE_SPREAD, MIN_SURGE_EXTRA_REPLICAS, MIN_SURGES, Recurrence, Surge,
};
pub use throughput::{PRIOR_PER_REPLICA_THROUGHPUT, SMOOTHING_SECONDS, ThroughputEstimate, ThroughputSource};

/// The backlog's growth is measured over at least this long (seconds): a poll just after a probe (which may decide
/// on that probe's backlog) compares with the look before.
pub const MIN_GROWTH_SPAN: f64 = 0.5;
/// ...and at most this long (seconds): two polls without probes, and a margin.
pub const MAX_GROWTH_SPAN: f64 = 10.0;

/// One service's autoscaler: its recent samples, its throughput estimate and its recent recommendations.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    rates: RateTracker,
    state: PolicyState,
    window_started: bool,
    /// The last poll's figures and rates: what a probe between polls updates the backlog of.
    last_polled: Option<ObservedQueue>,
    /// (at, ready) of the looks of the last [`MAX_GROWTH_SPAN`], polls and probes: how fast the backlog grows.
    looks: VecDeque<(f64, u64)>,
}

impl Autoscaler {
    /// `measured_throughput`: a per-replica throughput measured before (status.perReplicaThroughput), if any.
    pub fn new(measured_throughput: Option<f64>) -> Self {
        Self {
            rates: RateTracker::default(),
            state: PolicyState {
                throughput: ThroughputEstimate::seeded(measured_throughput),
                ..PolicyState::default()
            },
            window_started: false,
            last_polled: None,
            looks: VecDeque::new(),
        }
    }

    /// Computes rates over `window` seconds of polls instead of [`DEFAULT_RATE_WINDOW`].
    pub fn with_rate_window(mut self, window: f64) -> Self {
        self.rates = RateTracker::new(window);
        self
    }

    /// One poll's sample (`None`: management API down or queue missing) → what the policy decides on.
    pub fn observe(&mut self, sample: Option<QueueSample>, now: f64) -> Observation {
        let mut queue = sample.map(|sample| self.rates.push(sample));
        if let Some(q) = queue.as_mut() {
            q.backlog_growth = self.look(now, q.backlog);
        } else {
            self.looks.clear();
        }
        self.last_polled = queue;
        Observation { at: now, queue }
    }

    /// Between polls, a fresher look at the queue (a passive `queue.declare`: requests ready and consumers, no
    /// counters) with the last poll's rates. Decides on it like a poll, except that μ and the recurrence learn only
    /// from polls. `None` until a poll has given figures (and while the last one failed): no decision on half a view.
    pub fn probe(
        &mut self,
        ready: u64,
        consumers: u64,
        replicas: ReplicaCounts,
        spec: &PolicySpec,
        now: f64,
    ) -> Option<ScaleDecision> {
        let polled = self.last_polled?;
        if !self.window_started {
            return None;
        }
        self.rates.note_probe(now, ready, consumers);
        let backlog_growth = self.look(now, ready);
        let obs =
            Observation { at: now, queue: Some(ObservedQueue { backlog: ready, consumers, backlog_growth, ..polled }) };
        let obs = self.with_sustained_rate(&obs, spec);
        let decision = decide(&self.state, &obs, replicas, spec, now);
        if decision.reason != ScaleReason::Anticipated {
            self.state.recommendations.record(now, decision.recommendation, spec.scale_down_delay_seconds);
        }
        Some(decision)
    }

    /// Decides the replicas for an observation and remembers what is needed for the next decisions.
    pub fn decide(&mut self, obs: &Observation, replicas: ReplicaCounts, spec: &PolicySpec, now: f64) -> ScaleDecision {
        self.state.throughput.update(obs, spec.per_replica_throughput_hint);
        if !self.window_started {
            // Like HPA after a restart: what runs now counts as recommended, so nothing shrinks before the delay.
            let running = replicas.current.clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
            self.state.recommendations.record(now, running, spec.scale_down_delay_seconds);
            self.window_started = true;
        }
        let obs = &self.with_sustained_rate(obs, spec);
        let decision = decide(&self.state, obs, replicas, spec, now);
        // A floor held for an expected surge ends with its window: it is not remembered for the scale-down delay.
        if decision.reason != ScaleReason::Anticipated {
            self.state.recommendations.record(now, decision.recommendation, spec.scale_down_delay_seconds);
        }
        let i = &decision.inputs;
        if i.rates_known && i.per_replica_throughput > 0.0 {
            let rate_need = (i.arrival_rate / (i.per_replica_throughput * spec.target_utilization) - 1e-9).ceil();
            self.state.recurrence.observe(now, i.arrival_rate, rate_need.max(0.0) as i32);
        }
        decision
    }

    /// Records a look at the backlog (a poll or a probe) and returns how fast it grew since the newest look at
    /// least [`MIN_GROWTH_SPAN`] and at most [`MAX_GROWTH_SPAN`] before.
    fn look(&mut self, now: f64, ready: u64) -> Option<f64> {
        if self.looks.back().is_some_and(|(at, _)| now < *at) {
            self.looks.clear(); // the clock went back
        }
        let earlier = self.looks.iter().rev().find(|(at, _)| *at <= now - MIN_GROWTH_SPAN).copied();
        if self.looks.back().is_none_or(|(at, _)| now > *at) {
            self.looks.push_back((now, ready));
        }
        while self.looks.len() > 1 && self.looks[1].0 <= now - MAX_GROWTH_SPAN {
            self.looks.pop_front();
        }
        earlier
            .filter(|(at, _)| now - at <= MAX_GROWTH_SPAN)
            .map(|(at, before)| (ready as f64 - before as f64) / (now - at))
    }

    /// The observation with the arrival rate averaged over the scale-down delay, unless it has one already.
    fn with_sustained_rate(&self, obs: &Observation, spec: &PolicySpec) -> Observation {
        let mut obs = *obs;
        if let Some(q) = obs.queue.as_mut()
            && q.sustained_arrival_rate.is_none()
            && q.arrival_rate.is_some()
        {
            q.sustained_arrival_rate = self.rates.arrival_rate_since(obs.at - spec.scale_down_delay_seconds);
        }
        obs
    }

    /// The per-replica throughput measured while saturated: what status.perReplicaThroughput should hold.
    pub fn measured_throughput(&self) -> Option<f64> {
        self.state.throughput.measured()
    }

    pub fn state(&self) -> &PolicyState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, ready: u64, unacked: u64, consumers: u64, published: u64, acked: u64) -> QueueSample {
        QueueSample { at, ready, unacked, consumers, published_total: published, acked_total: acked }
    }

    #[test]
    fn measures_throughput_from_saturated_polls_and_scales_for_it() {
        let spec = PolicySpec::default(); // prefetch 32, T 2 s, u 0.8, max 10
        let mut scaler = Autoscaler::new(None);
        let counts = ReplicaCounts { current: 2, ready: 2 };
        // Two workers, always a backlog, 40 acks/s: μ = 20; 100 req/s arrive.
        let mut decision = None;
        for i in 0..=2u64 {
            let at = 5.0 * i as f64;
            let obs = scaler.observe(Some(sample(at, 200 + 300 * i, 64, 2, 500 * i, 200 * i)), at);
            decision = Some(scaler.decide(&obs, counts, &spec, at));
        }
        let d = decision.unwrap();
        assert_eq!(scaler.measured_throughput(), Some(20.0));
        assert_eq!(d.inputs.throughput_source, ThroughputSource::Measured);
        assert_eq!((d.inputs.arrival_rate, d.inputs.completion_rate), (100.0, 40.0));
        // (100 + 800 / 2) / (20 · 0.8) = 31.25, capped at maxReplicas 10.
        assert_eq!((d.recommendation, d.desired, d.reason), (10, 10, ScaleReason::MaxReplicas));
    }

    #[test]
    fn a_seed_from_status_is_used_at_once() {
        let spec = PolicySpec::default();
        let mut scaler = Autoscaler::new(Some(50.0));
        let obs = scaler.observe(Some(sample(0.0, 0, 0, 1, 0, 0)), 0.0);
        let d = scaler.decide(&obs, ReplicaCounts { current: 1, ready: 1 }, &spec, 0.0);
        assert_eq!((d.inputs.per_replica_throughput, d.inputs.throughput_source), (50.0, ThroughputSource::Measured));
    }

    #[test]
    fn after_a_restart_the_pool_is_not_shrunk_before_the_scale_down_delay() {
        let spec = PolicySpec::default();
        let mut scaler = Autoscaler::new(Some(20.0));
        let counts = ReplicaCounts { current: 8, ready: 8 };
        for i in 0..=12u64 {
            let at = 5.0 * i as f64;
            let obs = scaler.observe(Some(sample(at, 0, 0, 8, 10 * i, 10 * i)), at);
            assert_eq!(scaler.decide(&obs, counts, &spec, at).desired, 8, "at {at}s");
        }
        let obs = scaler.observe(Some(sample(65.0, 0, 0, 8, 130, 130)), 65.0);
        assert_eq!(scaler.decide(&obs, counts, &spec, 65.0).desired, 1);
    }

    #[test]
    fn a_probe_that_finds_the_backlog_gone_between_polls_measures_no_throughput() {
        let spec = PolicySpec { prefetch: 4, per_replica_throughput_hint: Some(20.0), ..PolicySpec::default() };
        let mut scaler = Autoscaler::new(None);
        let counts = ReplicaCounts { current: 4, ready: 4 };
        // Four workers complete 64 req/s; each poll happens to find a few requests waiting, but the probes between
        // them find none: the workers idled a fifth of the time, and 16 req/s is not what one of them can do.
        for i in 0..=4u64 {
            let at = 5.0 * i as f64;
            let obs = scaler.observe(Some(sample(at, 3, 16, 4, 320 * i, 320 * i)), at);
            scaler.decide(&obs, counts, &spec, at);
            for k in 1..=4 {
                scaler.probe(if k == 2 { 0 } else { 2 }, 4, counts, &spec, at + k as f64);
            }
        }
        assert_eq!(scaler.measured_throughput(), None);
        // With a backlog at every probe too, the workers were busy throughout: 80 req/s is 20 each.
        let mut scaler = Autoscaler::new(None);
        for i in 0..=4u64 {
            let at = 5.0 * i as f64;
            let obs = scaler.observe(Some(sample(at, 30, 16, 4, 400 * i, 400 * i)), at);
            scaler.decide(&obs, counts, &spec, at);
            for k in 1..=4 {
                scaler.probe(25, 4, counts, &spec, at + k as f64);
            }
        }
        assert_eq!(scaler.measured_throughput(), Some(20.0));
    }

    #[test]
    fn a_backlog_growing_between_probes_is_sized_for_when_new_pods_serve() {
        let spec = PolicySpec {
            max_replicas: 40,
            prefetch: 4,
            per_replica_throughput_hint: Some(20.0),
            ..PolicySpec::default()
        };
        let mut scaler = Autoscaler::new(None);
        let counts = ReplicaCounts { current: 4, ready: 4 };
        for i in 0..=2u64 {
            let at = 5.0 * i as f64;
            let obs = scaler.observe(Some(sample(at, 0, 12, 4, 300 * i, 300 * i)), at);
            assert_eq!(scaler.decide(&obs, counts, &spec, at).desired, 4);
        }
        // 60 → 240 req/s: a second later 160 wait, growing by 160/s; by the time a new pod serves (10 s), 1,760.
        // (60 + 1760 / 2) / 16 = 58.75: the step limit (4 + 32) binds. Sized on the 160 alone: (60 + 80) / 16 → 9.
        let d = scaler.probe(160, 4, counts, &spec, 11.0).unwrap();
        assert_eq!((d.desired, d.recommendation, d.reason), (36, 40, ScaleReason::Backlog), "{}", d.message);
        assert!(d.message.contains("growing by 160/s (1760 in 10s"), "{}", d.message);
        // A poll a tenth of a second later measures the growth from the look before the probe, not over 0.1 s.
        let obs = scaler.observe(Some(sample(11.1, 176, 16, 4, 3300, 3100)), 11.1);
        let growth = obs.queue.unwrap().backlog_growth.unwrap();
        assert!((growth - 160.0).abs() < 1e-6, "176 more than at the poll 1.1 s before: {growth}");
    }

    #[test]
    fn a_probe_between_polls_acts_on_a_fresh_backlog_with_the_polled_rates() {
        let spec = PolicySpec { prefetch: 4, per_replica_throughput_hint: Some(20.0), ..PolicySpec::default() };
        let mut scaler = Autoscaler::new(None);
        let counts = ReplicaCounts { current: 2, ready: 2 };
        // Nothing to decide on before a poll has given figures.
        assert_eq!(scaler.probe(500, 2, counts, &spec, 0.5), None);
        // 20 req/s, no backlog: two workers are enough.
        for i in 0..=2u64 {
            let at = 5.0 * i as f64;
            let obs = scaler.observe(Some(sample(at, 0, 2, 2, 100 * i, 100 * i)), at);
            assert_eq!(scaler.decide(&obs, counts, &spec, at).desired, 2);
        }
        // A second later 320 requests wait: draining them within T = 2 s at 16 req/s a worker takes 10 more.
        let d = scaler.probe(320, 2, counts, &spec, 11.0).expect("a poll gave figures");
        assert_eq!((d.inputs.backlog, d.inputs.arrival_rate), (320, 20.0));
        assert_eq!((d.desired, d.reason), (10, ScaleReason::MaxReplicas));
        // The probe's recommendation is remembered: an idle poll right after does not shrink the pool.
        let obs = scaler.observe(Some(sample(15.0, 0, 2, 2, 300, 300)), 15.0);
        assert_eq!(scaler.decide(&obs, ReplicaCounts { current: 10, ready: 2 }, &spec, 15.0).desired, 10);
        // A failed poll leaves the probe nothing to decide on.
        let _ = scaler.observe(None, 20.0);
        assert_eq!(scaler.probe(320, 2, counts, &spec, 21.0), None);
    }

    #[test]
    fn unavailable_metrics_keep_the_pool() {
        let spec = PolicySpec::default();
        let mut scaler = Autoscaler::new(None);
        let obs = scaler.observe(None, 0.0);
        let d = scaler.decide(&obs, ReplicaCounts { current: 4, ready: 3 }, &spec, 0.0);
        assert_eq!((d.desired, d.reason), (4, ScaleReason::MetricsUnavailable));
        assert_eq!(d.reason.to_string(), "MetricsUnavailable");
    }

    #[test]
    fn recurring_surges_are_anticipated_within_max_replicas_and_the_reason_says_so() {
        let spec = PolicySpec {
            max_replicas: 12,
            prefetch: 4,
            per_replica_throughput_hint: Some(20.0),
            ..PolicySpec::default()
        };
        let mut scaler = Autoscaler::new(None);
        let (mut published, mut current) = (0u64, 2);
        // 30 req/s, with 20 s surges to 300 req/s starting at 100 s and 340 s.
        for i in 0..=112u64 {
            let at = 5.0 * i as f64;
            let surging = (100.0..120.0).contains(&at) || (340.0..360.0).contains(&at);
            published += if surging { 1500 } else { 150 };
            let obs = scaler.observe(Some(sample(at, 0, 8, current as u64, published, published)), at);
            let d = scaler.decide(&obs, ReplicaCounts { current, ready: current }, &spec, at);
            assert!(d.desired <= spec.max_replicas, "{d:?}");
            current = d.desired;
        }
        // The next surge is expected 240 s after the last start: from 560 s on, the pool is held ahead of it.
        let obs = scaler.observe(Some(sample(565.0, 0, 8, current as u64, published + 150, published + 150)), 565.0);
        let d = scaler.decide(&obs, ReplicaCounts { current, ready: current }, &spec, 565.0);
        assert_eq!((d.desired, d.reason), (12, ScaleReason::Anticipated), "{}", d.message);
        assert!(d.message.contains("recurred every"), "{}", d.message);
    }
}
