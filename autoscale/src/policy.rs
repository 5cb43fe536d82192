//! The scaling rule, a pure function of what was observed, the small state kept per service, the replica counts
//! and the spec.
//!
//! ```text
//! desired = ceil( (λ + B / T) / (μ · u) )   clamped to [minReplicas, maxReplicas]
//! ```
//!
//! λ arrival rate, B backlog, T target queueing delay, μ one worker's throughput, u target utilisation. Never
//! below what the in-flight requests occupy (ceil(unacked / prefetch)); 1 as soon as anything waits. Up at once
//! (bounded per decision), down only once no recommendation of the scale-down delay asks for the pool, and then
//! to what the arrival rate averaged over the delay needs, with a tolerance band against flapping that a real
//! backlog overrides.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rates::{Observation, ObservedQueue};
use crate::recurrence::Recurrence;
use crate::throughput::{ThroughputEstimate, ThroughputSource};

/// The fewest workers when a service names no bound.
pub const DEFAULT_MIN_REPLICAS: i32 = 1;
/// The most workers when a service names no bound.
pub const DEFAULT_MAX_REPLICAS: i32 = 10;
/// T when a service names none: the queueing delay callers tolerate (seconds).
pub const DEFAULT_TARGET_QUEUE_DELAY_SECONDS: f64 = 2.0;
/// How long the pool only shrinks to the highest recommendation seen, when a service names no delay (seconds).
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: i32 = 60;
/// u when a service names none: the share of μ the sizing plans to use.
pub const DEFAULT_TARGET_UTILIZATION: f64 = 0.8;
/// Requests one worker holds unacknowledged when a service names no prefetch (the worker's own default).
pub const DEFAULT_PREFETCH: u32 = 32;
/// Relative changes smaller than this are ignored unless a backlog demands them (HPA's default is the same).
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// One decision may at most multiply the replicas by this (a large pool)...
pub const DEFAULT_MAX_SCALE_UP_FACTOR: f64 = 2.0;
/// ...or add this many (a small pool reaches a burst's size in one step), whichever is more.
pub const DEFAULT_MAX_SCALE_UP_PODS: i32 = 32;
/// A backlog the ready workers need more than this share of T to drain overrides the tolerance band.
pub const URGENT_BACKLOG_SHARE: f64 = 0.1;

/// The policy's parameters: a service's bounds and goals (the operator maps an RpcService's `scaling` and
/// `worker.prefetch` into them), and the fixed tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// T: the queueing delay callers tolerate (seconds).
    pub target_queue_delay_seconds: f64,
    /// How long the pool only shrinks to the highest recommendation seen (seconds).
    pub scale_down_delay_seconds: f64,
    /// u: the share of μ the sizing plans to use.
    pub target_utilization: f64,
    /// μ to use until it is measured.
    pub per_replica_throughput_hint: Option<f64>,
    /// Requests one worker holds unacknowledged (and runs concurrently).
    pub prefetch: u32,
    pub tolerance: f64,
    pub max_scale_up_factor: f64,
    pub max_scale_up_pods: i32,
}

impl Default for PolicySpec {
    /// What a service that states nothing gets.
    fn default() -> Self {
        Self {
            min_replicas: DEFAULT_MIN_REPLICAS,
            max_replicas: DEFAULT_MAX_REPLICAS,
            target_queue_delay_seconds: DEFAULT_TARGET_QUEUE_DELAY_SECONDS,
            scale_down_delay_seconds: DEFAULT_SCALE_DOWN_DELAY_SECONDS as f64,
            target_utilization: DEFAULT_TARGET_UTILIZATION,
            per_replica_throughput_hint: None,
            prefetch: DEFAULT_PREFETCH,
            tolerance: DEFAULT_TOLERANCE,
            max_scale_up_factor: DEFAULT_MAX_SCALE_UP_FACTOR,
            max_scale_up_pods: DEFAULT_MAX_SCALE_UP_PODS,
        }
    }
}

impl PolicySpec {
    /// The same spec with out-of-range values made safe: bounds ordered and not negative, T and u finite and in
    /// range, a hint only when it is a positive number, at least one request per worker.
    pub fn sanitized(self) -> Self {
        let min_replicas = self.min_replicas.max(0);
        Self {
            min_replicas,
            max_replicas: self.max_replicas.max(min_replicas).max(1),
            target_queue_delay_seconds: finite_or(self.target_queue_delay_seconds, DEFAULT_TARGET_QUEUE_DELAY_SECONDS)
                .max(0.01),
            scale_down_delay_seconds: self.scale_down_delay_seconds.max(0.0),
            target_utilization: finite_or(self.target_utilization, DEFAULT_TARGET_UTILIZATION).clamp(0.1, 1.0),
            per_replica_throughput_hint: self.per_replica_throughput_hint.filter(|h| h.is_finite() && *h > 0.0),
            prefetch: self.prefetch.max(1),
            ..self
        }
    }

    /// The most replicas one decision may go to from `current`.
    pub fn scale_up_limit(&self, current: i32) -> i32 {
        let by_factor = (current as f64 * self.max_scale_up_factor).ceil().min(i32::MAX as f64) as i32;
        by_factor.max(current.saturating_add(self.max_scale_up_pods))
    }
}

fn finite_or(x: f64, default: f64) -> f64 {
    if x.is_finite() { x } else { default }
}

/// The worker pods: `current` exist (or are asked for), `ready` of them serve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaCounts {
    pub current: i32,
    pub ready: i32,
}

/// Why a decision is what it is, in a word (for status reasons and events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScaleReason {
    /// The backlog has to drain within the target delay.
    Backlog,
    /// The arrival rate needs this many workers at the target utilisation.
    ArrivalRate,
    /// The requests in flight occupy this many workers' prefetch.
    InFlight,
    /// Load fell, but a recommendation of the scale-down delay still asks for the pool, or the arrival rate
    /// averaged over the delay needs more than this observation.
    ScaleDownDelay,
    MinReplicas,
    MaxReplicas,
    /// The change would be within the tolerance band.
    Steady,
    /// No figures from the broker: the pool is kept as it is.
    MetricsUnavailable,
    /// A request waits and no worker runs.
    ScaleFromZero,
    /// Nothing arrives, waits or runs.
    Idle,
    /// Surges recur in the service's history and the next is expected soon: the pool is held at what they needed.
    Anticipated,
}

impl fmt::Display for ScaleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The figures a decision was computed from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionInputs {
    /// Ready requests (0 when metrics are unavailable).
    pub backlog: u64,
    /// Unacked requests (0 when metrics are unavailable).
    pub in_flight: u64,
    /// Requests/s arriving (0 until two polls give a rate; see `rates_known`).
    pub arrival_rate: f64,
    /// Requests/s completed (0 until two polls give a rate).
    pub completion_rate: f64,
    pub rates_known: bool,
    /// μ used, requests/s per replica.
    pub per_replica_throughput: f64,
    pub throughput_source: ThroughputSource,
    pub current_replicas: i32,
    pub ready_replicas: i32,
    /// The queueing delay a request arriving now would see (seconds), by [`queueing_delay`]: `None` when it
    /// cannot be estimated (no figures, μ only the prior, or requests wait and no worker is ready to drain them).
    #[serde(default)]
    pub queueing_delay: Option<f64>,
}

impl DecisionInputs {
    /// The rate the ready workers drain the queue at: ready replicas × μ.
    pub fn drain_rate(&self) -> f64 {
        self.ready_replicas.max(0) as f64 * self.per_replica_throughput
    }
}

/// The design's latency model (Little's law): the queueing delay is the backlog ÷ the rate the consumers drain it
/// — not ÷ the arrival rate. 0 when nothing waits; `None` when requests wait and nothing drains them (unbounded).
pub fn queueing_delay(backlog: u64, drain_rate: f64) -> Option<f64> {
    if backlog == 0 {
        Some(0.0)
    } else if drain_rate > 0.0 && drain_rate.is_finite() {
        Some(backlog as f64 / drain_rate)
    } else {
        None
    }
}

/// What the policy decided, why, and from what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleDecision {
    /// The replicas to run.
    pub desired: i32,
    pub reason: ScaleReason,
    /// What this observation alone calls for (before the step limit, tolerance and scale-down delay); it is
    /// what the scale-down window remembers.
    pub recommendation: i32,
    pub inputs: DecisionInputs,
    /// One sentence with the figures, for status and events.
    pub message: String,
}

/// Recent recommendations: the pool shrinks only to the highest of the scale-down delay.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendationWindow {
    entries: VecDeque<(f64, i32)>,
}

impl RecommendationWindow {
    /// Remembers a recommendation and forgets those older than `keep_seconds`.
    pub fn record(&mut self, at: f64, replicas: i32, keep_seconds: f64) {
        self.entries.push_back((at, replicas));
        while self.entries.front().is_some_and(|(t, _)| *t < at - keep_seconds) {
            self.entries.pop_front();
        }
    }

    /// The highest recommendation made at or after `since`.
    pub fn highest_since(&self, since: f64) -> Option<i32> {
        self.entries.iter().filter(|(t, _)| *t >= since).map(|(_, r)| *r).max()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What the operator keeps per service between decisions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyState {
    pub throughput: ThroughputEstimate,
    pub recommendations: RecommendationWindow,
    #[serde(default)]
    pub recurrence: Recurrence,
}

/// `ceil` that ignores float noise just above an integer.
fn ceil_replicas(x: f64) -> i32 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    (x - 1e-9).ceil().min(i32::MAX as f64) as i32
}

/// A backlog that grows is sized for what it will be when new pods serve: its growth over this many seconds (a
/// pod start) is added to it.
pub const SURGE_HORIZON_SECONDS: f64 = 10.0;
/// A backlog growing by less than this share of what the ready workers drain per second is noise, not a surge.
pub const MIN_SURGE_GROWTH_SHARE: f64 = 0.1;

/// A surge seen in the backlog between two looks: how fast it grows and what it will be by the time new pods serve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BacklogSurge {
    /// Requests per second the backlog grew by since the look before.
    pub growth: f64,
    /// The backlog now plus its growth over [`SURGE_HORIZON_SECONDS`].
    pub projected_backlog: f64,
}

/// Whether the backlog is one the ready workers need at least [`URGENT_BACKLOG_SHARE`] of T to drain (or have no
/// ready worker to drain it): then it overrides the tolerance band, and its growth is projected.
fn urgent(q: &ObservedQueue, inputs: &DecisionInputs, spec: &PolicySpec) -> bool {
    q.backlog > 0
        && queueing_delay(q.backlog, inputs.drain_rate())
            .is_none_or(|delay| delay >= URGENT_BACKLOG_SHARE * spec.target_queue_delay_seconds)
}

/// A surge: an urgent backlog that grew since the look before by at least [`MIN_SURGE_GROWTH_SHARE`] of what the
/// ready workers drain per second (of one worker's throughput when none is ready). Until new pods serve, the
/// pool that let it grow keeps letting it grow at that pace: sizing on the backlog as it is now leaves the pods
/// asked for now too few for the backlog they will find, and the pool catches up one probe at a time.
pub fn surge(q: &ObservedQueue, inputs: &DecisionInputs, spec: &PolicySpec) -> Option<BacklogSurge> {
    let growth = q.backlog_growth.filter(|g| g.is_finite())?;
    let noise = MIN_SURGE_GROWTH_SHARE * inputs.drain_rate().max(inputs.per_replica_throughput);
    (growth > noise && urgent(q, inputs, spec))
        .then_some(BacklogSurge { growth, projected_backlog: q.backlog as f64 + growth * SURGE_HORIZON_SECONDS })
}

/// The rule. Pure: the same inputs always give the same decision. Two questions in turn: what does this
/// observation need ([`need`]), and how far does the pool step toward it ([`step`]).
pub fn decide(
    state: &PolicyState,
    obs: &Observation,
    replicas: ReplicaCounts,
    spec: &PolicySpec,
    now: f64,
) -> ScaleDecision {
    let (mu, source) = state.throughput.resolve(spec.per_replica_throughput_hint);
    let mut inputs = DecisionInputs {
        backlog: 0,
        in_flight: 0,
        arrival_rate: 0.0,
        completion_rate: 0.0,
        rates_known: false,
        per_replica_throughput: mu,
        throughput_source: source,
        current_replicas: replicas.current,
        ready_replicas: replicas.ready,
        queueing_delay: None,
    };
    let Some(q) = &obs.queue else {
        // Never act on missing data, and in particular never scale to zero on it.
        let desired = replicas.current.max(0).clamp(spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
        let message = format!("queue metrics are unavailable; keeping {}", plural(desired));
        return ScaleDecision {
            desired,
            reason: ScaleReason::MetricsUnavailable,
            recommendation: desired,
            inputs,
            message,
        };
    };
    inputs.backlog = q.backlog;
    inputs.in_flight = q.in_flight;
    inputs.rates_known = q.arrival_rate.is_some();
    inputs.arrival_rate = q.arrival_rate.unwrap_or(0.0).max(0.0);
    inputs.completion_rate = q.completion_rate.unwrap_or(0.0).max(0.0);
    // A delay computed from the prior would be a guess presented as a figure, and one from μ's lower bound (the
    // workers were never seen saturated) only a bound, tens of times the truth at the start of a burst: none until
    // μ is hinted or measured, unless nothing waits.
    inputs.queueing_delay = match source {
        ThroughputSource::Measured | ThroughputSource::Hint => queueing_delay(q.backlog, inputs.drain_rate()),
        ThroughputSource::LowerBound if q.backlog == 0 => Some(0.0),
        ThroughputSource::LowerBound | ThroughputSource::Prior => None,
    };
    let mut need = need(q, &inputs, spec);
    if inputs.rates_known
        && source != ThroughputSource::Prior
        && let Some(a) = state.recurrence.anticipate(now)
    {
        let floor = a.replicas.min(spec.max_replicas.max(spec.min_replicas));
        if floor > need.recommendation {
            need.recommendation = floor;
            need.reason = ScaleReason::Anticipated;
            need.demand = ScaleReason::Anticipated;
            need.why = format!("{}; {}", need.why, a.message);
        }
    }
    let Step { desired, reason, message } = step(state, q, &need, &inputs, spec, now);
    ScaleDecision { desired, reason, recommendation: need.recommendation, inputs, message }
}

/// What one observation calls for, before the pool's recent history and the step limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Need {
    /// The replicas, within the bounds: what the scale-down window remembers.
    pub recommendation: i32,
    /// Why, with the bounds: `MinReplicas` or `MaxReplicas` when one of them binds.
    pub reason: ScaleReason,
    /// Why, before the bounds: what a step that stops short of the recommendation reports.
    pub demand: ScaleReason,
    /// Whether anything arrives, waits or runs.
    pub busy: bool,
    /// The figures behind it, as a clause.
    pub why: String,
    /// The replicas the arrival rate averaged over the scale-down delay needs, within the bounds: the least a
    /// scale-down goes to. `None` when that rate is not known.
    pub sustained: Option<i32>,
}

/// What the observation needs: enough workers to take the arrival rate and drain the backlog within T at the
/// target utilisation, never fewer than the in-flight requests occupy, one as soon as anything is there.
pub fn need(q: &ObservedQueue, inputs: &DecisionInputs, spec: &PolicySpec) -> Need {
    let current = inputs.current_replicas.max(0);
    let (min, max) = (spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    let t = spec.target_queue_delay_seconds;
    let per_replica = inputs.per_replica_throughput * spec.target_utilization;
    let lambda = inputs.arrival_rate;
    let for_rate = ceil_replicas(lambda / per_replica);
    let surge = surge(q, inputs, spec);
    let backlog = surge.map_or(q.backlog as f64, |s| s.projected_backlog);
    let for_backlog = ceil_replicas((lambda + backlog / t) / per_replica);
    let for_in_flight = ceil_replicas(q.in_flight as f64 / spec.prefetch as f64);
    let busy = q.backlog > 0 || q.in_flight > 0 || lambda > 0.0;
    let need = for_backlog.max(for_in_flight).max(i32::from(busy));
    let mut reason = if need == 0 {
        ScaleReason::Idle
    } else if for_in_flight > for_backlog {
        ScaleReason::InFlight
    } else if for_backlog > for_rate {
        ScaleReason::Backlog
    } else {
        ScaleReason::ArrivalRate
    };
    let mut why = explain(reason, need, inputs, spec, q.backlog > 0, surge);
    if !inputs.rates_known && need < current {
        // One poll shows no rate: never shrink on it.
        why = format!("{why}, but the arrival rate is not known yet");
        reason = ScaleReason::Steady;
    }
    let demand = reason;
    let unclamped = if inputs.rates_known { need } else { need.max(current) };
    let recommendation = unclamped.clamp(min, max);
    if recommendation > unclamped {
        reason = ScaleReason::MinReplicas;
        why = format!("{why}; minReplicas is {min}");
    } else if recommendation < unclamped {
        reason = ScaleReason::MaxReplicas;
        why = format!("{why}; maxReplicas is {max}");
    }
    let sustained = q
        .sustained_arrival_rate
        .filter(|_| inputs.rates_known)
        .map(|rate| ceil_replicas(rate.max(0.0) / per_replica).clamp(min, max));
    Need { recommendation, reason, demand, busy, why, sustained }
}

/// Where the pool goes this decision, and why in a sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub desired: i32,
    pub reason: ScaleReason,
    pub message: String,
}

/// How far the pool steps toward what is needed: up at once but bounded per decision and past the tolerance
/// band (unless a backlog is urgent), down only once no recommendation of the scale-down delay asks for the pool,
/// to what the arrival rate averaged over the delay needs (within this observation's need and the delay's
/// highest recommendation); a spec whose bounds changed under a running pool applies at once.
pub fn step(
    state: &PolicyState,
    q: &ObservedQueue,
    need: &Need,
    inputs: &DecisionInputs,
    spec: &PolicySpec,
    now: f64,
) -> Step {
    let current = inputs.current_replicas.max(0);
    let step = match need.recommendation.cmp(&current) {
        std::cmp::Ordering::Greater => step_up(q, need, inputs, spec),
        std::cmp::Ordering::Less => step_down(state, need, current, spec, now),
        std::cmp::Ordering::Equal => Step {
            desired: current,
            reason: need.reason,
            message: format!("keeping {}: {}", plural(current), need.why),
        },
    };
    let (min, max) = (spec.min_replicas, spec.max_replicas.max(spec.min_replicas));
    if step.desired > max {
        Step {
            desired: max,
            reason: ScaleReason::MaxReplicas,
            message: format!("{}; maxReplicas is {max}", step.message),
        }
    } else if step.desired < min {
        Step {
            desired: min,
            reason: ScaleReason::MinReplicas,
            message: format!("{}; minReplicas is {min}", step.message),
        }
    } else {
        step
    }
}

fn step_up(q: &ObservedQueue, need: &Need, inputs: &DecisionInputs, spec: &PolicySpec) -> Step {
    let (current, recommendation, why) = (inputs.current_replicas.max(0), need.recommendation, &need.why);
    let urgent = urgent(q, inputs, spec);
    let beyond_tolerance = recommendation as f64 >= current as f64 * (1.0 + spec.tolerance) - 1e-9;
    // With μ a mere guess, the pods already asked for measure it within a rate window of serving: more would be
    // sized on the guess. Once they have been watched that long the guess is used, so this never stalls.
    let watched = q.window.is_some_and(|w| w.steady_consumers && w.max_consumers > 0);
    let guessing =
        inputs.throughput_source == ThroughputSource::Prior && (inputs.ready_replicas < current.max(1) || !watched);
    let guessing_from_zero = guessing && current == 0;
    if guessing && !guessing_from_zero {
        let message = format!(
            "keeping {}: {why}, but the per-replica throughput is a guess until the starting pods serve",
            plural(current)
        );
        Step { desired: current, reason: ScaleReason::Steady, message }
    } else if current == 0 || beyond_tolerance || urgent {
        let limit = if guessing_from_zero { 1 } else { spec.scale_up_limit(current) };
        let desired = recommendation.min(limit).max(1);
        let reason = if current == 0 && need.busy && need.reason != ScaleReason::MinReplicas {
            ScaleReason::ScaleFromZero
        } else if desired < recommendation {
            need.demand // the step limit binds, not a bound
        } else {
            need.reason
        };
        let limited =
            if desired < recommendation { format!(" (at most {desired} in one step)") } else { String::new() };
        Step { desired, reason, message: format!("scaling from {current} to {desired}: {why}{limited}") }
    } else {
        within_tolerance(current, why, spec)
    }
}

fn step_down(state: &PolicyState, need: &Need, current: i32, spec: &PolicySpec, now: f64) -> Step {
    let (recommendation, why) = (need.recommendation, &need.why);
    let delay = spec.scale_down_delay_seconds;
    let highest = state.recommendations.highest_since(now - delay).unwrap_or(recommendation).max(recommendation);
    // Once nothing of the delay asked for the current pool, it shrinks to what the arrival rate averaged over the
    // delay needs (not the highest of the delay's noisy 10 s rates), never below this observation's need.
    let target = match need.sustained {
        Some(sustained) => highest.min(sustained.max(recommendation)),
        None => highest,
    };
    if highest >= current {
        let message =
            format!("keeping {}: {why}, but {highest} were recommended within the last {delay:.0}s", plural(current));
        Step { desired: current, reason: ScaleReason::ScaleDownDelay, message }
    } else if ((current - target) as f64) < current as f64 * spec.tolerance - 1e-9 {
        within_tolerance(current, why, spec)
    } else if target > recommendation {
        let message =
            format!("scaling from {current} to {target}, what the arrival rate over the last {delay:.0}s needs: {why}");
        Step { desired: target, reason: ScaleReason::ScaleDownDelay, message }
    } else {
        Step {
            desired: recommendation,
            reason: need.reason,
            message: format!("scaling from {current} to {recommendation}: {why}"),
        }
    }
}

fn within_tolerance(current: i32, why: &str, spec: &PolicySpec) -> Step {
    let pct = spec.tolerance * 100.0;
    let message = format!("keeping {}: {why}, within the {pct:.0}% tolerance", plural(current));
    Step { desired: current, reason: ScaleReason::Steady, message }
}

fn plural(n: i32) -> String {
    if n == 1 { "1 replica".to_owned() } else { format!("{n} replicas") }
}

/// The figures behind a recommendation, as a clause.
fn explain(
    reason: ScaleReason,
    need: i32,
    i: &DecisionInputs,
    spec: &PolicySpec,
    waiting: bool,
    surge: Option<BacklogSurge>,
) -> String {
    let mu = format!("{:.1} req/s per replica ({})", i.per_replica_throughput, i.throughput_source);
    let u = spec.target_utilization * 100.0;
    let t = spec.target_queue_delay_seconds;
    match reason {
        ScaleReason::Idle => "no requests arrive, wait or run".to_owned(),
        ScaleReason::InFlight => {
            format!("{} requests in flight occupy {} at prefetch {}", i.in_flight, plural(need), spec.prefetch)
        }
        ScaleReason::Backlog => {
            let waiting = match surge {
                Some(s) => format!(
                    "{} waiting, growing by {:.0}/s ({:.0} in {SURGE_HORIZON_SECONDS:.0}s, when new pods serve),",
                    i.backlog, s.growth, s.projected_backlog
                ),
                None => format!("{} waiting", i.backlog),
            };
            format!(
                "{waiting} and {:.1} req/s arriving need {} at {mu} to drain within {t}s at {u:.0}% utilisation",
                i.arrival_rate,
                plural(need)
            )
        }
        _ if waiting || i.arrival_rate > 0.0 => format!(
            "{:.1} req/s arriving ({} waiting) need {} at {mu} and {u:.0}% utilisation",
            i.arrival_rate,
            i.backlog,
            plural(need)
        ),
        _ => format!("{} in flight need {}", i.in_flight, plural(need)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rates::WindowFigures;
    use proptest::prelude::*;

    fn spec() -> PolicySpec {
        PolicySpec {
            min_replicas: 1,
            max_replicas: 50,
            target_queue_delay_seconds: 2.0,
            scale_down_delay_seconds: 60.0,
            target_utilization: 0.8,
            per_replica_throughput_hint: Some(20.0),
            prefetch: 4,
            ..PolicySpec::default()
        }
    }

    fn obs(at: f64, backlog: u64, in_flight: u64, arrival: f64) -> Observation {
        Observation {
            at,
            queue: Some(ObservedQueue {
                backlog,
                in_flight,
                consumers: 0,
                arrival_rate: Some(arrival),
                completion_rate: Some(arrival),
                window: Some(WindowFigures {
                    span: 5.0,
                    min_backlog: backlog,
                    min_in_flight: in_flight,
                    max_consumers: 0,
                    steady_consumers: true,
                    min_backlog_rate_across_gaps: f64::INFINITY,
                }),
                sustained_arrival_rate: Some(arrival),
                backlog_growth: None,
            }),
        }
    }

    fn counts(current: i32) -> ReplicaCounts {
        ReplicaCounts { current, ready: current }
    }

    fn decide_fresh(o: &Observation, current: i32, spec: &PolicySpec) -> ScaleDecision {
        decide(&PolicyState::default(), o, counts(current), spec, o.at)
    }

    #[test]
    fn arrival_rate_sizes_the_pool_at_the_target_utilisation() {
        // 100 req/s at 20 req/s per replica and 80 %: 6.25 → 7.
        let d = decide_fresh(&obs(0.0, 0, 10, 100.0), 7, &spec());
        assert_eq!((d.desired, d.reason), (7, ScaleReason::ArrivalRate));
        assert_eq!(d.inputs.throughput_source, ThroughputSource::Hint);
    }

    #[test]
    fn backlog_is_drained_within_the_target_delay() {
        // (100 + 320 / 2) / 16 = 16.25 → 17.
        let d = decide_fresh(&obs(0.0, 320, 40, 100.0), 10, &spec());
        assert_eq!((d.desired, d.reason), (17, ScaleReason::Backlog));
        assert!(d.message.contains("320 waiting"), "{}", d.message);
        assert!(d.message.contains("20.0 req/s per replica (hint)"), "{}", d.message);
    }

    #[test]
    fn one_step_at_most_doubles_or_adds_thirty_two() {
        let spec = PolicySpec { max_replicas: 500, ..spec() };
        let d = decide_fresh(&obs(0.0, 50_000, 8, 200.0), 2, &spec);
        assert_eq!((d.desired, d.recommendation), (34, 500));
        assert_eq!(d.reason, ScaleReason::Backlog, "the step limit binds, not maxReplicas");
        assert!(d.message.contains("at most 34 in one step"), "{}", d.message);
        let d = decide_fresh(&obs(0.0, 50_000, 8, 200.0), 40, &spec);
        assert_eq!(d.desired, 80);
    }

    #[test]
    fn the_queueing_delay_is_the_backlog_over_the_drain_rate() {
        assert_eq!(queueing_delay(0, 0.0), Some(0.0), "nothing waits: no delay, even with no workers");
        assert_eq!(queueing_delay(100, 40.0), Some(2.5));
        assert_eq!(queueing_delay(1, 0.0), None, "requests wait and nothing drains them: unbounded, not 0");
        // 320 waiting, 10 ready replicas at 20 req/s: 1.6 s, whatever the arrival rate.
        let d = decide_fresh(&obs(0.0, 320, 40, 100.0), 10, &spec());
        assert_eq!(d.inputs.queueing_delay, Some(1.6));
        let no_hint = PolicySpec { per_replica_throughput_hint: None, ..spec() };
        assert_eq!(decide_fresh(&obs(0.0, 320, 40, 100.0), 10, &no_hint).inputs.queueing_delay, None, "prior");
        assert_eq!(decide_fresh(&Observation::unavailable(0.0), 3, &spec()).inputs.queueing_delay, None);
        let starting = ReplicaCounts { current: 2, ready: 0 };
        let d = decide(&PolicyState::default(), &obs(0.0, 5, 0, 1.0), starting, &spec(), 0.0);
        assert_eq!(d.inputs.queueing_delay, None, "no ready worker");
    }

    #[test]
    fn a_throughput_only_bounded_from_below_gives_no_delay_while_requests_wait() {
        // One idle worker completed 2 req/s: μ ≥ 2 is all that is known, so 300 waiting would read as 30 s.
        let mut state = PolicyState::default();
        let mut idle = obs(0.0, 0, 1, 2.0);
        if let Some(w) = idle.queue.as_mut().and_then(|q| q.window.as_mut()) {
            w.max_consumers = 1;
        }
        state.throughput.update(&idle, None);
        let no_hint = PolicySpec { per_replica_throughput_hint: None, ..spec() };
        let waiting = decide(&state, &obs(1.0, 300, 40, 150.0), counts(5), &no_hint, 1.0);
        assert_eq!(waiting.inputs.throughput_source, ThroughputSource::LowerBound);
        assert_eq!(waiting.inputs.queueing_delay, None);
        let quiet = decide(&state, &obs(1.0, 0, 1, 2.0), counts(5), &no_hint, 1.0);
        assert_eq!(quiet.inputs.queueing_delay, Some(0.0), "nothing waits: no delay, whatever μ is");
    }

    #[test]
    fn in_flight_work_is_never_cut() {
        let d = decide_fresh(&obs(0.0, 0, 40, 0.0), 12, &spec());
        assert_eq!((d.desired, d.reason), (10, ScaleReason::InFlight));
    }

    #[test]
    fn a_waiting_request_brings_a_pool_back_from_zero() {
        let spec = PolicySpec { min_replicas: 0, per_replica_throughput_hint: Some(1000.0), ..spec() };
        let d = decide_fresh(&obs(0.0, 1, 0, 0.0), 0, &spec);
        assert_eq!((d.desired, d.reason), (1, ScaleReason::ScaleFromZero));
    }

    #[test]
    fn without_any_throughput_figure_scale_up_waits_for_the_starting_pods() {
        let hinted_spec = spec();
        let spec = PolicySpec { per_replica_throughput_hint: None, ..spec() };
        let starting = ReplicaCounts { current: 1, ready: 0 };
        let d = decide(&PolicyState::default(), &obs(0.0, 200, 0, 20.0), starting, &spec, 0.0);
        assert_eq!((d.desired, d.reason), (1, ScaleReason::Steady));
        let d = decide(&PolicyState::default(), &obs(0.0, 200, 0, 20.0), counts(1), &spec, 0.0);
        assert_eq!(d.desired, 1, "the ready pod has not been watched for a window yet");
        let mut watched = obs(0.0, 200, 0, 20.0);
        watched.queue.as_mut().unwrap().window.as_mut().unwrap().max_consumers = 1;
        let d = decide(&PolicyState::default(), &watched, counts(1), &spec, 0.0);
        assert_eq!(d.desired, 33, "a pod that served a window and measured nothing: the prior is used");
        let hinted = decide(&PolicyState::default(), &obs(0.0, 200, 0, 20.0), starting, &hinted_spec, 0.0);
        assert_eq!(hinted.desired, 8, "a hint is trusted: (20 + 100) / 16 = 7.5");
        let spec = PolicySpec { min_replicas: 0, ..spec };
        let d = decide(&PolicyState::default(), &obs(0.0, 200, 0, 20.0), counts(0), &spec, 0.0);
        assert_eq!((d.desired, d.reason), (1, ScaleReason::ScaleFromZero), "one pod to measure with");
    }

    #[test]
    fn an_idle_pool_goes_to_zero_only_after_the_scale_down_delay() {
        let spec = PolicySpec { min_replicas: 0, ..spec() };
        let mut scaler = crate::Autoscaler::new(Some(20.0));
        let mut desired = 3;
        for i in 0..=12 {
            let at = 5.0 * i as f64;
            desired = scaler.decide(&obs(at, 0, 0, 0.0), counts(desired), &spec, at).desired;
            assert_eq!(desired, 3, "at {at}s");
        }
        let d = scaler.decide(&obs(65.0, 0, 0, 0.0), counts(3), &spec, 65.0);
        assert_eq!((d.desired, d.reason), (0, ScaleReason::Idle));
    }

    #[test]
    fn missing_metrics_keep_the_pool_and_never_scale_to_zero() {
        let spec = PolicySpec { min_replicas: 0, ..spec() };
        let d = decide_fresh(&Observation::unavailable(0.0), 3, &spec);
        assert_eq!((d.desired, d.reason), (3, ScaleReason::MetricsUnavailable));
        let d = decide_fresh(&Observation::unavailable(0.0), 60, &spec);
        assert_eq!(d.desired, 50, "bounds still apply");
    }

    #[test]
    fn the_first_poll_without_rates_never_shrinks_the_pool() {
        let mut o = obs(0.0, 0, 0, 0.0);
        o.queue.as_mut().unwrap().arrival_rate = None;
        let d = decide_fresh(&o, 8, &spec());
        assert_eq!(d.desired, 8);
        let mut o = obs(0.0, 400, 0, 0.0);
        o.queue.as_mut().unwrap().arrival_rate = None;
        assert_eq!(decide_fresh(&o, 8, &spec()).desired, 13, "but a backlog still scales it up");
    }

    #[test]
    fn a_growing_urgent_backlog_is_projected_over_a_pod_start() {
        let growing = |backlog: u64, growth: f64| {
            let mut o = obs(0.0, backlog, 16, 60.0);
            o.queue.as_mut().unwrap().backlog_growth = Some(growth);
            o
        };
        // 160 waiting, growing by 160/s: 1,760 by the time new pods serve. (60 + 1760 / 2) / 16 = 58.75.
        let d = decide_fresh(&growing(160, 160.0), 4, &spec());
        assert_eq!((d.recommendation, d.desired, d.reason), (50, 36, ScaleReason::Backlog), "{}", d.message);
        // Sized on the backlog as it is: (60 + 80) / 16 = 8.75.
        assert_eq!(decide_fresh(&obs(0.0, 160, 16, 60.0), 4, &spec()).recommendation, 9);
        // Growth under a tenth of what the ready workers drain (80 req/s) is noise; so is any growth of a backlog
        // they drain within a tenth of T.
        assert_eq!(decide_fresh(&growing(160, 7.0), 4, &spec()).recommendation, 9);
        assert_eq!(decide_fresh(&growing(15, 160.0), 4, &spec()).recommendation, 5);
        // A shrinking backlog is sized as it is.
        assert_eq!(decide_fresh(&growing(160, -50.0), 4, &spec()).recommendation, 9);
    }

    #[test]
    fn small_changes_are_ignored_unless_a_backlog_demands_them() {
        // 330 req/s needs 21 at 16 req/s per replica: +5 % on 20.
        let d = decide_fresh(&obs(0.0, 0, 60, 330.0), 20, &spec());
        assert_eq!((d.desired, d.reason), (20, ScaleReason::Steady));
        // 80 waiting would take the 20 ready replicas 0.2 s = 10 % of T to drain.
        let d = decide_fresh(&obs(0.0, 80, 80, 300.0), 20, &spec());
        assert_eq!((d.desired, d.reason), (22, ScaleReason::Backlog));
    }

    #[test]
    fn scale_down_waits_for_the_highest_recent_recommendation() {
        let spec = spec();
        let mut state = PolicyState::default();
        state.recommendations.record(0.0, 20, 60.0);
        state.recommendations.record(30.0, 12, 60.0);
        let d = decide(&state, &obs(50.0, 0, 10, 50.0), counts(20), &spec, 50.0);
        assert_eq!((d.desired, d.reason), (20, ScaleReason::ScaleDownDelay));
        // The 10 s rate fell to 50 req/s; averaged over the delay it is still 190 req/s (12 replicas).
        let mut o = obs(70.0, 0, 10, 50.0);
        o.queue.as_mut().unwrap().sustained_arrival_rate = Some(190.0);
        let d = decide(&state, &o, counts(20), &spec, 70.0);
        assert_eq!((d.desired, d.reason), (12, ScaleReason::ScaleDownDelay));
        let d = decide(&state, &obs(95.0, 0, 10, 50.0), counts(12), &spec, 95.0);
        assert_eq!((d.desired, d.reason), (4, ScaleReason::ArrivalRate));
    }

    #[test]
    fn scale_down_goes_to_the_rate_averaged_over_the_delay_not_the_highest_noisy_one() {
        let spec = spec();
        let mut state = PolicyState::default();
        state.recommendations.record(10.0, 14, 60.0); // a 10 s window that read high
        state.recommendations.record(30.0, 13, 60.0);
        let mut o = obs(65.0, 0, 10, 160.0); // 10 replicas now
        o.queue.as_mut().unwrap().sustained_arrival_rate = Some(180.0); // 11.25 → 12 over the delay
        let d = decide(&state, &o, counts(20), &spec, 65.0);
        assert_eq!((d.desired, d.reason), (12, ScaleReason::ScaleDownDelay), "{}", d.message);
        assert!(d.message.contains("arrival rate over the last 60s"), "{}", d.message);
        // Never below this observation's own need, never above the highest of the delay.
        o.queue.as_mut().unwrap().sustained_arrival_rate = Some(50.0);
        assert_eq!(decide(&state, &o, counts(20), &spec, 65.0).desired, 10);
        o.queue.as_mut().unwrap().sustained_arrival_rate = Some(400.0);
        assert_eq!(decide(&state, &o, counts(20), &spec, 65.0).desired, 14);
        // Unknown: the highest recommendation of the delay, as before.
        o.queue.as_mut().unwrap().sustained_arrival_rate = None;
        assert_eq!(decide(&state, &o, counts(20), &spec, 65.0).desired, 14);
        // And no decrease at all while a recommendation of the delay asks for the current pool.
        state.recommendations.record(40.0, 20, 60.0);
        o.queue.as_mut().unwrap().sustained_arrival_rate = Some(180.0);
        assert_eq!(decide(&state, &o, counts(20), &spec, 65.0).desired, 20);
    }

    #[test]
    fn bounds_are_reported_as_the_reason() {
        let d = decide_fresh(&obs(0.0, 0, 0, 2000.0), 50, &spec());
        assert_eq!((d.desired, d.reason), (50, ScaleReason::MaxReplicas));
        let spec = PolicySpec { min_replicas: 5, ..spec() };
        let d = decide_fresh(&obs(0.0, 0, 0, 1.0), 5, &spec);
        assert_eq!((d.desired, d.reason), (5, ScaleReason::MinReplicas));
        let d = decide_fresh(&obs(0.0, 0, 0, 1.0), 0, &spec);
        assert_eq!(d.desired, 5, "a spec's new minimum applies at once");
    }

    #[test]
    fn out_of_range_values_are_made_safe() {
        let wild = PolicySpec {
            min_replicas: -3,
            max_replicas: 0,
            target_queue_delay_seconds: f64::NAN,
            scale_down_delay_seconds: -5.0,
            target_utilization: 7.0,
            per_replica_throughput_hint: Some(-1.0),
            prefetch: 0,
            ..PolicySpec::default()
        }
        .sanitized();
        assert_eq!((wild.min_replicas, wild.max_replicas, wild.prefetch), (0, 1, 1));
        assert_eq!((wild.target_queue_delay_seconds, wild.scale_down_delay_seconds), (2.0, 0.0));
        assert_eq!((wild.target_utilization, wild.per_replica_throughput_hint), (1.0, None));
        assert_eq!(PolicySpec::default().sanitized(), PolicySpec::default());
    }

    prop_compose! {
        fn any_spec()(min in 0..20i32, extra in 0..80i32, t in 0.05..30.0f64, delay in 0..600i32,
                      u in 0.1..1.0f64, hint in 0.01..2000.0f64, prefetch in 1..200u32) -> PolicySpec {
            PolicySpec {
                min_replicas: min,
                max_replicas: (min + extra).max(1),
                target_queue_delay_seconds: t,
                scale_down_delay_seconds: delay as f64,
                target_utilization: u,
                per_replica_throughput_hint: Some(hint),
                prefetch,
                ..PolicySpec::default()
            }
            .sanitized()
        }
    }

    prop_compose! {
        fn any_state()(recs in proptest::collection::vec((0.0..600.0f64, 0..120i32), 0..20)) -> PolicyState {
            let mut state = PolicyState::default();
            let mut recs = recs;
            recs.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (at, r) in recs {
                state.recommendations.record(at, r, 600.0);
            }
            state
        }
    }

    proptest! {
        #[test]
        fn always_within_bounds(spec in any_spec(), state in any_state(), current in 0..200i32, ready_share in 0.0..1.0f64,
                                backlog in 0..1_000_000u64, in_flight in 0..100_000u64, arrival in 0.0..100_000.0f64,
                                available in any::<bool>()) {
            let o = if available { obs(600.0, backlog, in_flight, arrival) } else { Observation::unavailable(600.0) };
            let ready = (current as f64 * ready_share) as i32;
            let d = decide(&state, &o, ReplicaCounts { current, ready }, &spec, 600.0);
            prop_assert!(d.desired >= spec.min_replicas && d.desired <= spec.max_replicas, "{d:?}");
        }

        #[test]
        fn monotone_in_backlog(spec in any_spec(), state in any_state(), current in 0..120i32, ready_share in 0.0..1.0f64,
                               b1 in 0..100_000u64, b2 in 0..100_000u64, in_flight in 0..10_000u64, arrival in 0.0..10_000.0f64) {
            let (lo, hi) = (b1.min(b2), b1.max(b2));
            let c = ReplicaCounts { current, ready: (current as f64 * ready_share) as i32 };
            let d_lo = decide(&state, &obs(600.0, lo, in_flight, arrival), c, &spec, 600.0);
            let d_hi = decide(&state, &obs(600.0, hi, in_flight, arrival), c, &spec, 600.0);
            prop_assert!(d_lo.desired <= d_hi.desired, "backlog {lo} → {}, {hi} → {}", d_lo.desired, d_hi.desired);
        }

        #[test]
        fn monotone_in_arrival_rate(spec in any_spec(), state in any_state(), current in 0..120i32, ready_share in 0.0..1.0f64,
                                    backlog in 0..100_000u64, in_flight in 0..10_000u64, a1 in 0.0..10_000.0f64, a2 in 0.0..10_000.0f64) {
            let (lo, hi) = (a1.min(a2), a1.max(a2));
            let c = ReplicaCounts { current, ready: (current as f64 * ready_share) as i32 };
            let d_lo = decide(&state, &obs(600.0, backlog, in_flight, lo), c, &spec, 600.0);
            let d_hi = decide(&state, &obs(600.0, backlog, in_flight, hi), c, &spec, 600.0);
            prop_assert!(d_lo.desired <= d_hi.desired, "rate {lo} → {}, {hi} → {}", d_lo.desired, d_hi.desired);
        }

        #[test]
        fn constant_load_settles_and_stays(spec in any_spec(), start in 0..120i32, backlog in 0..10_000u64,
                                           in_flight in 0..5_000u64, arrival in 0.0..5_000.0f64) {
            let mut scaler = crate::Autoscaler::new(None);
            let mut current = start;
            let mut history = Vec::new();
            // Long enough for the step limit to climb from 0 to 100 and for the longest scale-down delay.
            for i in 0..400 {
                let at = 5.0 * i as f64;
                current = scaler.decide(&obs(at, backlog, in_flight, arrival), counts(current), &spec, at).desired;
                history.push(current);
            }
            let tail = &history[300..];
            prop_assert!(tail.iter().all(|r| *r == tail[0]), "still moving: {:?}", &history[250..]);
        }
    }
}
