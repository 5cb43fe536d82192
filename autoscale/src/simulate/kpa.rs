//! The request-driven baseline: Knative's pod autoscaler (KPA) as shipped, `pkg/autoscaler/scaling/autoscaler.go`,
//! with a queue's "concurrency" taken as requests in flight plus waiting (what Knative's activator and
//! queue-proxies would count) and a per-pod target of prefetch × target utilisation.
//!
//! - Concurrency is sampled every second (the metric scrape); the stable value is its average over the last 60 s,
//!   the panic value over the last 6 s (panic-window-percentage 10 %).
//! - Every 2 s (the tick): dspc = ceil(stable / target), dppc = ceil(panic / target), each kept within
//!   [floor(ready / 2), ceil(1000 × ready)] with ready = max(1, ready pods) (max scale-down rate 2, max scale-up
//!   rate 1000). Panic starts (or is extended) when dppc / ready ≥ 2 (panic threshold 200 %) and ends after a stable
//!   window below the threshold; while panicking the pool is the highest of max(dspc, dppc) seen and never shrinks.
//! - From zero: a waiting request pokes the autoscaler at once (the activator), so the decision comes at the next
//!   1 s scrape rather than the next tick. To zero: after 30 s of a zero decision (scale-to-zero grace period),
//!   which itself needs a stable window with no concurrency.
//! - min-scale / max-scale are the trace's bounds.

use std::collections::VecDeque;

use super::model::ScalingPolicy;
use warren_autoscale::{QueueSample, ReplicaCounts};

pub const KPA_STABLE_WINDOW_SECONDS: f64 = 60.0;
pub const KPA_PANIC_WINDOW_SECONDS: f64 = 6.0;
pub const KPA_PANIC_THRESHOLD: f64 = 2.0;
pub const KPA_TICK_SECONDS: f64 = 2.0;
pub const KPA_SCRAPE_SECONDS: f64 = 1.0;
pub const KPA_MAX_SCALE_UP_RATE: f64 = 1000.0;
pub const KPA_MAX_SCALE_DOWN_RATE: f64 = 2.0;
pub const KPA_SCALE_TO_ZERO_GRACE_SECONDS: f64 = 30.0;

#[derive(Clone, Debug)]
pub struct Kpa {
    /// Concurrency one pod should carry: prefetch × target utilisation.
    target: f64,
    min_replicas: i32,
    max_replicas: i32,
    next_scrape: f64,
    next_tick: f64,
    samples: VecDeque<(f64, f64)>,
    panic_since: Option<f64>,
    max_panic_pods: i32,
    zero_since: Option<f64>,
}

impl Kpa {
    pub fn new(target: f64, min_replicas: i32, max_replicas: i32, phase: f64) -> Self {
        Self {
            target,
            min_replicas,
            max_replicas,
            next_scrape: phase * KPA_SCRAPE_SECONDS,
            next_tick: phase * KPA_TICK_SECONDS,
            samples: VecDeque::new(),
            panic_since: None,
            max_panic_pods: 0,
            zero_since: None,
        }
    }

    fn average(&self, now: f64, window: f64) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .filter(|(t, _)| *t > now - window + 1e-6)
            .fold((0.0, 0usize), |(s, n), (_, c)| (s + c, n + 1));
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// `Scale`: the desired pod count for this tick.
    fn scale(&mut self, now: f64, ready: i32) -> i32 {
        let ready = f64::from(ready.max(1));
        let max_up = (KPA_MAX_SCALE_UP_RATE * ready).ceil();
        let max_down = (ready / KPA_MAX_SCALE_DOWN_RATE).floor();
        let dspc = (self.average(now, KPA_STABLE_WINDOW_SECONDS) / self.target - 1e-9).ceil().max(0.0);
        let dppc = (self.average(now, KPA_PANIC_WINDOW_SECONDS) / self.target - 1e-9).ceil().max(0.0);
        let stable = dspc.clamp(max_down, max_up) as i32;
        let panic = dppc.clamp(max_down, max_up) as i32;
        let over = dppc / ready >= KPA_PANIC_THRESHOLD;
        match self.panic_since {
            _ if over => self.panic_since = Some(now),
            Some(t) if t + KPA_STABLE_WINDOW_SECONDS < now => {
                self.panic_since = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }
        let mut desired = stable;
        if self.panic_since.is_some() {
            desired = desired.max(panic);
            if desired > self.max_panic_pods {
                self.max_panic_pods = desired;
            } else {
                desired = self.max_panic_pods;
            }
        }
        desired
    }

    fn bounded(&mut self, now: f64, desired: i32, current: i32) -> Option<i32> {
        let mut desired = desired.clamp(self.min_replicas, self.max_replicas);
        if desired == 0 && current > 0 {
            let since = *self.zero_since.get_or_insert(now);
            if now - since < KPA_SCALE_TO_ZERO_GRACE_SECONDS {
                desired = current.min(1);
            }
        } else {
            self.zero_since = None;
        }
        (desired != current).then_some(desired)
    }
}

impl ScalingPolicy for Kpa {
    fn next_tick(&self) -> f64 {
        self.next_scrape.min(self.next_tick)
    }

    fn tick(&mut self, now: f64, sample: QueueSample, replicas: ReplicaCounts) -> Option<i32> {
        let now_ish = now + 1e-3;
        let concurrency = (sample.ready + sample.unacked) as f64;
        let mut decide = false;
        if now_ish >= self.next_scrape {
            self.next_scrape += KPA_SCRAPE_SECONDS;
            self.samples.push_back((now, concurrency));
            while self.samples.front().is_some_and(|(t, _)| *t <= now - KPA_STABLE_WINDOW_SECONDS) {
                self.samples.pop_front();
            }
            // The activator pokes the autoscaler when a request waits for a revision at zero.
            decide = replicas.current == 0 && concurrency > 0.0;
        }
        if now_ish >= self.next_tick {
            self.next_tick += KPA_TICK_SECONDS;
            decide = true;
        }
        if !decide {
            return None;
        }
        let desired = self.scale(now, replicas.ready);
        self.bounded(now, desired, replicas.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_on_a_short_surge_and_does_not_shrink_while_panicking() {
        let mut k = Kpa::new(3.2, 1, 100, 0.0);
        for i in 0..60 {
            k.samples.push_back((i as f64, 16.0)); // 5 pods' worth
        }
        assert_eq!(k.scale(59.0, 5), 5);
        for i in 60..66 {
            k.samples.push_back((i as f64, 64.0)); // 20 pods' worth over the panic window
        }
        assert_eq!(k.scale(65.0, 5), 20, "dppc 20 ≥ 2 × 5 ready: panic");
        for i in 66..72 {
            k.samples.push_back((i as f64, 16.0));
        }
        assert_eq!(k.scale(71.0, 20), 20, "no scale-down while panicking");
    }

    #[test]
    fn scale_down_is_at_most_halving_per_tick() {
        let mut k = Kpa::new(3.2, 1, 100, 0.0);
        k.samples.push_back((0.0, 0.0));
        assert_eq!(k.scale(1.0, 20), 10);
    }
}
