//! The baseline: KEDA's RabbitMQ scaler in `QueueLength` mode driving an HPA, with the defaults they ship.
//!
//! - KEDA exposes the queue's `messages` (ready + unacked, from the management API) as an external metric of
//!   type AverageValue; its target value is set by the AWS recipe, acceptable latency × one pod's throughput
//!   (given the true throughput here).
//! - The HPA controller syncs every 15 s: `desired = ceil(metric / target)` unless `metric / (target × replicas)`
//!   is within the 0.1 tolerance of 1 (replica_calculator.go, GetExternalPerPodMetricReplicas); the scale-down
//!   stabilisation window keeps the highest recommendation of the last 300 s; a scale-up adds at most
//!   max(100 %, 4 pods) per 15 s period (the default `behavior`); minReplicas is at least 1.
//! - KEDA's operator polls every 30 s for activation: 0 → max(1, minReplicaCount) when messages > 0 (the
//!   default activationValue), and → 0 after the 300 s cooldownPeriod without messages when minReplicaCount is 0.
//!   The HPA does nothing while the target has 0 replicas.

use std::collections::VecDeque;

use super::model::ScalingPolicy;
use warren_autoscale::{QueueSample, ReplicaCounts};

pub const HPA_SYNC_SECONDS: f64 = 15.0;
pub const HPA_TOLERANCE: f64 = 0.1;
pub const HPA_SCALE_DOWN_STABILIZATION_SECONDS: f64 = 300.0;
pub const HPA_SCALE_UP_PERCENT: f64 = 100.0;
pub const HPA_SCALE_UP_PODS: i32 = 4;
pub const HPA_SCALE_UP_PERIOD_SECONDS: f64 = 15.0;
pub const KEDA_POLLING_SECONDS: f64 = 30.0;
pub const KEDA_COOLDOWN_SECONDS: f64 = 300.0;

/// The HPA controller's part: stabilisation, the scale-up rate limit and the bounds, the same whatever the metric.
#[derive(Clone, Debug)]
pub struct Hpa {
    /// KEDA's minReplicaCount (the HPA's minReplicas is at least 1).
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// HPA's recorded (unstabilised) recommendations.
    recommendations: VecDeque<(f64, i32)>,
    /// Replicas added by the HPA, for its scale-up rate limit.
    scale_ups: VecDeque<(f64, i32)>,
}

impl Hpa {
    pub fn new(min_replicas: i32, max_replicas: i32) -> Self {
        Self { min_replicas, max_replicas, recommendations: VecDeque::new(), scale_ups: VecDeque::new() }
    }

    /// Applies one sync's proposal (what the replica calculator returned) to `replicas`: the replicas the HPA
    /// sets, if it changes them.
    pub fn apply(&mut self, now: f64, proposal: i32, replicas: i32) -> Option<i32> {
        if self.recommendations.is_empty() {
            self.recommendations.push_back((now, replicas));
        }
        // Stabilisation: up to the proposal at once (0 s window); down only to the window's highest.
        let highest = self
            .recommendations
            .iter()
            .filter(|(t, _)| *t > now - HPA_SCALE_DOWN_STABILIZATION_SECONDS)
            .map(|(_, r)| *r)
            .fold(proposal, i32::max);
        let stabilized = if replicas < proposal { proposal } else { replicas.min(highest) };
        self.recommendations.push_back((now, proposal));
        while self.recommendations.front().is_some_and(|(t, _)| *t <= now - HPA_SCALE_DOWN_STABILIZATION_SECONDS) {
            self.recommendations.pop_front();
        }
        // Rate limit and bounds.
        let hpa_min = self.min_replicas.max(1);
        let desired = if stabilized > replicas {
            while self.scale_ups.front().is_some_and(|(t, _)| *t <= now - HPA_SCALE_UP_PERIOD_SECONDS) {
                self.scale_ups.pop_front();
            }
            let added: i32 = self.scale_ups.iter().map(|(_, n)| *n).sum();
            let period_start = replicas - added;
            let by_percent = (period_start as f64 * (1.0 + HPA_SCALE_UP_PERCENT / 100.0)).ceil() as i32;
            let limit = by_percent.max(period_start + HPA_SCALE_UP_PODS).max(replicas);
            stabilized.min(limit)
        } else {
            stabilized
        }
        .clamp(hpa_min, self.max_replicas);
        if desired > replicas {
            self.scale_ups.push_back((now, desired - replicas));
        }
        (desired != replicas).then_some(desired)
    }
}

/// KEDA's ScaledObject with its HPA.
#[derive(Clone, Debug)]
pub struct KedaHpa {
    /// The scaler's `value`: queue length per replica.
    target_per_replica: f64,
    hpa: Hpa,
    next_sync: f64,
    next_poll: f64,
    last_active: Option<f64>,
}

impl KedaHpa {
    /// `phase`: where in its periods the run starts, in [0, 1).
    pub fn new(target_per_replica: f64, min_replicas: i32, max_replicas: i32, phase: f64) -> Self {
        Self {
            target_per_replica,
            hpa: Hpa::new(min_replicas, max_replicas),
            next_sync: phase * HPA_SYNC_SECONDS,
            next_poll: phase * KEDA_POLLING_SECONDS,
            last_active: None,
        }
    }

    /// One HPA sync: the replicas it sets, if any.
    fn hpa_sync(&mut self, now: f64, messages: f64, replicas: i32) -> Option<i32> {
        if replicas == 0 {
            return None; // scaling is disabled while the target has none
        }
        // AverageValue (GetExternalPerPodMetricReplicas): the tolerance on metric / (target × replicas).
        let ratio = messages / (self.target_per_replica * replicas as f64);
        let proposal = if (1.0 - ratio).abs() > HPA_TOLERANCE {
            (messages / self.target_per_replica).ceil() as i32
        } else {
            replicas
        };
        self.hpa.apply(now, proposal, replicas)
    }

    /// One KEDA poll: activation from and deactivation to zero.
    fn keda_poll(&mut self, now: f64, messages: f64, replicas: i32) -> Option<i32> {
        keda_activation(&mut self.last_active, self.hpa.min_replicas, now, messages > 0.0, replicas)
    }
}

/// KEDA's activation loop at one poll: 0 → max(1, minReplicaCount) when the scaler is active, → 0 after the
/// cooldown without activity when minReplicaCount is 0.
pub fn keda_activation(
    last_active: &mut Option<f64>,
    min_replicas: i32,
    now: f64,
    active: bool,
    replicas: i32,
) -> Option<i32> {
    if active {
        *last_active = Some(now);
    }
    if replicas == 0 && active {
        return Some(min_replicas.max(1));
    }
    let cooled = last_active.is_none_or(|t| now - t >= KEDA_COOLDOWN_SECONDS);
    if replicas > 0 && !active && min_replicas == 0 && cooled {
        return Some(0);
    }
    None
}

impl ScalingPolicy for KedaHpa {
    fn next_tick(&self) -> f64 {
        self.next_sync.min(self.next_poll)
    }

    fn tick(&mut self, now: f64, sample: QueueSample, replicas: ReplicaCounts) -> Option<i32> {
        let messages = (sample.ready + sample.unacked) as f64;
        let mut current = replicas.current;
        let mut changed = None;
        // The model's clock is in whole microseconds: a tick a hair before its time is that tick.
        let now_ish = now + 1e-3;
        if now_ish >= self.next_poll {
            self.next_poll += KEDA_POLLING_SECONDS;
            if let Some(r) = self.keda_poll(now, messages, current) {
                current = r;
                changed = Some(r);
            }
        }
        if now_ish >= self.next_sync {
            self.next_sync += HPA_SYNC_SECONDS;
            if let Some(r) = self.hpa_sync(now, messages, current) {
                changed = Some(r);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(messages: u64) -> QueueSample {
        QueueSample { at: 0.0, ready: messages, unacked: 0, consumers: 0, published_total: 0, acked_total: 0 }
    }

    #[test]
    fn hpa_targets_queue_length_per_replica_within_tolerance() {
        let mut k = KedaHpa::new(40.0, 1, 100, 0.0);
        assert_eq!(k.hpa_sync(0.0, 170.0, 4), None, "170 / (40 × 4) = 1.06 is within the tolerance");
        assert_eq!(k.hpa_sync(15.0, 400.0, 4), Some(8), "ceil(400 / 40) = 10, but at most +100 % or +4");
        assert_eq!(k.hpa_sync(30.0, 4000.0, 8), Some(16));
    }

    #[test]
    fn the_scale_up_limit_counts_what_was_added_within_the_period() {
        let mut k = KedaHpa::new(40.0, 1, 100, 0.0);
        assert_eq!(k.hpa_sync(0.0, 4000.0, 2), Some(6));
        assert_eq!(k.hpa_sync(5.0, 4000.0, 6), None, "the period that started at 2 allows 6");
        assert_eq!(k.hpa_sync(15.0, 4000.0, 6), Some(12));
    }

    #[test]
    fn scale_down_takes_the_highest_recommendation_of_five_minutes() {
        let mut k = KedaHpa::new(40.0, 1, 100, 0.0);
        assert_eq!(k.hpa_sync(0.0, 400.0, 10), None);
        assert_eq!(k.hpa_sync(15.0, 40.0, 10), None);
        assert_eq!(k.hpa_sync(290.0, 40.0, 10), None);
        assert_eq!(k.hpa_sync(300.0, 40.0, 10), Some(1));
    }

    #[test]
    fn keda_activates_from_zero_on_its_poll_and_deactivates_after_the_cooldown() {
        let mut k = KedaHpa::new(40.0, 0, 100, 0.0);
        let zero = ReplicaCounts { current: 0, ready: 0 };
        assert_eq!(k.tick(0.0, sample(0), zero), None);
        assert_eq!(k.next_tick(), 15.0);
        assert_eq!(k.tick(15.0, sample(3), zero), None, "the HPA does nothing at zero");
        assert_eq!(k.tick(30.0, sample(3), zero), Some(1));
        let one = ReplicaCounts { current: 1, ready: 1 };
        assert_eq!(k.tick(300.0, sample(0), one), None, "270 s without messages");
        assert_eq!(k.tick(330.0, sample(0), one), Some(0));
    }
}
