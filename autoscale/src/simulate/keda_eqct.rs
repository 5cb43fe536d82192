//! The baseline KEDA recommends for latency: the RabbitMQ scaler in `ExpectedQueueConsumptionTime` mode (KEDA
//! 2.18+, `pkg/scalers/rabbitmq_scaler.go`), with `pollingInterval: 1` and `metricType: Value` as KEDA's docs advise
//! for this mode, driving the HPA as shipped.
//!
//! - The scaler reads `messages` (ready + unacked), `message_stats.publish_details.rate` and
//!   `deliver_get_details.rate` from the management API and reports
//!   `eta = (publish − deliver) / deliver + messages / deliver` seconds; 0 when `messages` is 0, and
//!   `activationValue` (0) when nothing is delivered. The broker's rates are averages over its last stats interval
//!   (5 s), modelled here as counter deltas over the last 5 s (delivered = acked + unacked).
//! - `value` is T (the expected consumption time callers tolerate). With `metricType: Value` the HPA computes
//!   `ratio = eta / value` and, outside the 0.1 tolerance, `ceil(ratio × ready pods)`
//!   (replica_calculator.go, `getUsageRatioReplicaCount`); then the same stabilisation (300 s down), scale-up limit
//!   (max(100 %, 4 pods) per 15 s) and bounds as [`super::keda`]. The HPA syncs every 15 s and fetches the metric
//!   from KEDA's metrics server live at each sync.
//! - `pollingInterval: 1` drives KEDA's activation loop: 0 → 1 within a second of the scaler turning active
//!   (eta > 0, or messages waiting with nothing delivered), → 0 after the 300 s cooldown when minReplicaCount is 0.

use std::collections::VecDeque;

use super::keda::{HPA_SYNC_SECONDS, HPA_TOLERANCE, Hpa, keda_activation};
use super::model::ScalingPolicy;
use warren_autoscale::{QueueSample, ReplicaCounts};

/// `pollingInterval: 1`, as KEDA's docs require for this mode.
pub const EQCT_POLLING_SECONDS: f64 = 1.0;
/// The span the management API's `rate` fields average over: RabbitMQ's default `collect_statistics_interval`.
pub const BROKER_RATE_SECONDS: f64 = 5.0;

#[derive(Clone, Debug)]
pub struct KedaEqct {
    /// The scaler's `value`: the expected consumption time to hold, seconds.
    target_seconds: f64,
    hpa: Hpa,
    next_sync: f64,
    next_poll: f64,
    last_active: Option<f64>,
    /// (at, published, delivered) of recent polls, for the broker's rates.
    counters: VecDeque<(f64, u64, u64)>,
}

impl KedaEqct {
    pub fn new(target_seconds: f64, min_replicas: i32, max_replicas: i32, phase: f64) -> Self {
        Self {
            target_seconds,
            hpa: Hpa::new(min_replicas, max_replicas),
            next_sync: phase * HPA_SYNC_SECONDS,
            next_poll: phase * EQCT_POLLING_SECONDS,
            last_active: None,
            counters: VecDeque::new(),
        }
    }

    /// The broker's (publish, deliver_get) rates: deltas over the last stats interval.
    fn rates(&self) -> (f64, f64) {
        let (Some(first), Some(last)) = (self.counters.front(), self.counters.back()) else { return (0.0, 0.0) };
        let span = last.0 - first.0;
        if span <= 0.0 {
            return (0.0, 0.0);
        }
        ((last.1 - first.1) as f64 / span, (last.2 - first.2) as f64 / span)
    }

    /// The scaler's metric and activity (`GetMetricsAndActivity`, ExpectedQueueConsumptionTime).
    pub fn eta(messages: f64, publish_rate: f64, deliver_rate: f64) -> (f64, bool) {
        let activation_value = 0.0;
        let eta = if messages == 0.0 {
            0.0
        } else if deliver_rate == 0.0 {
            activation_value
        } else {
            (publish_rate - deliver_rate) / deliver_rate + messages / deliver_rate
        };
        (eta, eta > activation_value || (deliver_rate == 0.0 && messages > 0.0))
    }

    /// One HPA sync with a `Value` target.
    fn hpa_sync(&mut self, now: f64, eta: f64, replicas: ReplicaCounts) -> Option<i32> {
        if replicas.current == 0 {
            return None;
        }
        let ratio = eta / self.target_seconds;
        let proposal = if (1.0 - ratio).abs() <= HPA_TOLERANCE {
            replicas.current
        } else {
            (ratio * replicas.ready.max(0) as f64 - 1e-9).ceil().max(0.0) as i32
        };
        self.hpa.apply(now, proposal, replicas.current)
    }
}

impl ScalingPolicy for KedaEqct {
    fn next_tick(&self) -> f64 {
        self.next_sync.min(self.next_poll)
    }

    fn tick(&mut self, now: f64, sample: QueueSample, replicas: ReplicaCounts) -> Option<i32> {
        let messages = (sample.ready + sample.unacked) as f64;
        self.counters.push_back((now, sample.published_total, sample.acked_total + sample.unacked));
        while self.counters.len() > 2 && self.counters[1].0 <= now - BROKER_RATE_SECONDS + 1e-6 {
            self.counters.pop_front();
        }
        let (publish_rate, deliver_rate) = self.rates();
        let (eta, active) = Self::eta(messages, publish_rate, deliver_rate);
        let mut current = replicas;
        let mut changed = None;
        let now_ish = now + 1e-3;
        if now_ish >= self.next_poll {
            self.next_poll += EQCT_POLLING_SECONDS;
            if let Some(r) = keda_activation(&mut self.last_active, self.hpa.min_replicas, now, active, current.current)
            {
                current.current = r;
                changed = Some(r);
            }
        }
        if now_ish >= self.next_sync {
            self.next_sync += HPA_SYNC_SECONDS;
            if let Some(r) = self.hpa_sync(now, eta, current) {
                changed = Some(r);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_the_scalers_formula() {
        assert_eq!(KedaEqct::eta(0.0, 10.0, 0.0), (0.0, false), "an empty queue is not active");
        assert_eq!(KedaEqct::eta(5.0, 10.0, 0.0), (0.0, true), "waiting and nothing delivered: active");
        // (150 − 100) / 100 + 300 / 100 = 3.5 s
        assert_eq!(KedaEqct::eta(300.0, 150.0, 100.0), (3.5, true));
    }

    #[test]
    fn the_value_target_scales_the_ready_pods_by_the_ratio() {
        let mut k = KedaEqct::new(2.0, 1, 100, 0.0);
        let r = |current, ready| ReplicaCounts { current, ready };
        assert_eq!(k.hpa_sync(0.0, 2.1, r(4, 4)), None, "within the tolerance");
        assert_eq!(k.hpa_sync(15.0, 6.0, r(4, 4)), Some(8), "ceil(3 × 4) = 12, at most +100 % or +4");
        assert_eq!(k.hpa_sync(30.0, 0.0, r(8, 0)), None, "nothing ready: nothing to scale by; down is stabilised");
    }
}
