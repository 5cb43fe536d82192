//! Per-replica throughput μ: how many requests one worker completes per second at full load.
//!
//! It is measured, not configured: while the workers are saturated (a backlog waited at every look of the rate
//! window, polls and the probes between them), the completion rate divided by the workers is what one worker can
//! do. Otherwise the
//! completion rate only shows what the workers were given, a lower bound on μ; the last saturated estimate stands,
//! or the spec's hint, or a conservative prior — raised to the lower bound when the evidence beats the guess.

use serde::{Deserialize, Serialize};

use crate::rates::{Observation, WindowFigures};

/// Requests per second one worker is assumed to complete before anything is known: low, so that an unknown
/// service is given too many workers rather than too few (the first saturated poll corrects it).
pub const PRIOR_PER_REPLICA_THROUGHPUT: f64 = 1.0;

/// Time constant of the smoothing (seconds): several polls, so one noisy poll moves μ by a fraction.
pub const SMOOTHING_SECONDS: f64 = 30.0;

/// Where the per-replica throughput used by a decision came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ThroughputSource {
    /// Measured while the workers were saturated (or seeded from status, which holds such a measurement).
    Measured,
    /// The most one worker was seen to complete while not saturated: above the hint or prior, so it replaces them.
    LowerBound,
    /// `scaling.perReplicaThroughputHint`, until a measurement exists.
    Hint,
    /// [`PRIOR_PER_REPLICA_THROUGHPUT`], when there is neither a measurement nor a hint.
    Prior,
}

impl std::fmt::Display for ThroughputSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Measured => "measured",
            Self::LowerBound => "lower bound",
            Self::Hint => "hint",
            Self::Prior => "prior",
        })
    }
}

/// What is known of one worker's throughput; serializable so it can be kept or inspected.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThroughputEstimate {
    /// Smoothed completions per second per worker while saturated.
    saturated: Option<f64>,
    /// Smoothed completions per second per worker while not saturated.
    unsaturated: Option<f64>,
    /// The highest `unsaturated` seen: μ is at least this.
    lower_bound: Option<f64>,
    /// When the last observation was folded in (seconds).
    updated_at: Option<f64>,
}

impl ThroughputEstimate {
    /// Starts from a measurement kept elsewhere (status.perReplicaThroughput after an operator restart).
    pub fn seeded(measured: Option<f64>) -> Self {
        Self { saturated: measured.filter(|m| m.is_finite() && *m > 0.0), ..Self::default() }
    }

    /// The saturated measurement, if any: what status.perReplicaThroughput should show.
    pub fn measured(&self) -> Option<f64> {
        self.saturated
    }

    /// Folds in one observation. `hint` is the spec's `perReplicaThroughputHint`: with the estimate so far, it says
    /// how long a backlog keeps the workers busy (see [`ThroughputEstimate::saturated`]).
    pub fn update(&mut self, obs: &Observation, hint: Option<f64>) {
        let Some(q) = &obs.queue else { return };
        let (Some(completion), Some(w)) = (q.completion_rate, q.window) else { return };
        if self.updated_at.is_some_and(|t| obs.at <= t) || w.max_consumers == 0 {
            return;
        }
        let dt = self.updated_at.map_or(w.span, |t| obs.at - t);
        self.updated_at = Some(obs.at);
        let alpha = 1.0 - (-dt / SMOOTHING_SECONDS).exp();
        let saturated = Self::saturated(&w, self.resolve(hint).0);
        if saturated && w.steady_consumers && completion > 0.0 {
            let sample = completion / w.max_consumers as f64;
            self.saturated = Some(match self.saturated {
                None => sample,
                Some(m) => m + alpha * (sample - m),
            });
        } else if !saturated {
            // Dividing by the most consumers of the window keeps this a lower bound while pods come and go.
            let sample = completion / w.max_consumers as f64;
            let smoothed = match self.unsaturated {
                None => sample,
                Some(u) => u + alpha * (sample - u),
            };
            self.unsaturated = Some(smoothed);
            self.lower_bound = Some(self.lower_bound.map_or(smoothed, |lb| lb.max(smoothed)));
            if let Some(m) = self.saturated.filter(|m| smoothed > *m) {
                self.saturated = Some(m + alpha * (smoothed - m));
            }
        }
    }

    /// Whether the workers were busy throughout the window, so that its completion rate is what they can do: a
    /// backlog at every look (every poll and every probe between them), and, across a gap between looks longer
    /// than [`MAX_LOOK_GAP_SECONDS`](crate::MAX_LOOK_GAP_SECONDS) (polls without probes), a backlog that could keep `per_worker` × consumers
    /// busy until the next look. A backlog of a few requests at each of two polls 5 s apart says nothing of the
    /// seconds in between: at 80 % utilisation the workers idle a fifth of them, and such a window measured μ at
    /// ≈ 0.8 × its value. So does a full prefetch at each poll, which is no longer taken for saturation.
    fn saturated(w: &WindowFigures, per_worker: f64) -> bool {
        w.min_backlog > 0 && w.min_backlog_rate_across_gaps >= per_worker * w.max_consumers as f64
    }

    /// The throughput a decision uses, and where it comes from.
    pub fn resolve(&self, hint: Option<f64>) -> (f64, ThroughputSource) {
        if let Some(m) = self.saturated {
            return (m, ThroughputSource::Measured);
        }
        let (base, source) = match hint.filter(|h| h.is_finite() && *h > 0.0) {
            Some(h) => (h, ThroughputSource::Hint),
            None => (PRIOR_PER_REPLICA_THROUGHPUT, ThroughputSource::Prior),
        };
        match self.lower_bound {
            Some(lb) if lb > base => (lb, ThroughputSource::LowerBound),
            _ => (base, source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rates::{ObservedQueue, WindowFigures};

    /// One observation over a 5 s window with steady consumers.
    fn obs(at: f64, backlog: u64, in_flight: u64, consumers: u64, completion: f64) -> Observation {
        Observation {
            at,
            queue: Some(ObservedQueue {
                backlog,
                in_flight,
                consumers,
                arrival_rate: Some(completion),
                completion_rate: Some(completion),
                window: Some(WindowFigures {
                    span: 5.0,
                    min_backlog: backlog,
                    min_in_flight: in_flight,
                    max_consumers: consumers,
                    steady_consumers: true,
                    min_backlog_rate_across_gaps: f64::INFINITY,
                }),
                sustained_arrival_rate: None,
                backlog_growth: None,
            }),
        }
    }

    #[test]
    fn before_any_measurement_the_hint_then_the_prior_is_used() {
        let e = ThroughputEstimate::default();
        assert_eq!(e.resolve(Some(12.0)), (12.0, ThroughputSource::Hint));
        assert_eq!(e.resolve(None), (PRIOR_PER_REPLICA_THROUGHPUT, ThroughputSource::Prior));
    }

    #[test]
    fn saturated_workers_give_completion_rate_per_worker() {
        let mut e = ThroughputEstimate::default();
        e.update(&obs(5.0, 100, 16, 4, 80.0), None);
        assert_eq!(e.resolve(Some(50.0)), (20.0, ThroughputSource::Measured), "a measurement beats the hint");
        assert_eq!(e.measured(), Some(20.0));
    }

    #[test]
    fn a_full_prefetch_at_each_poll_without_a_backlog_is_not_saturation() {
        // 4 workers of prefetch 4 held 15 requests at each poll, but completed 64 req/s, 0.8 × their 20 req/s:
        // between polls they idled. Taken for saturation, this read μ = 16 and the pool was sized 25 % too large.
        let mut e = ThroughputEstimate::default();
        e.update(&obs(5.0, 0, 15, 4, 64.0), Some(20.0));
        assert_eq!(e.measured(), None);
        assert_eq!(e.resolve(Some(20.0)), (20.0, ThroughputSource::Hint), "16 is only a lower bound");
    }

    #[test]
    fn across_a_long_gap_between_looks_the_backlog_must_last_until_the_next() {
        // Polls 5 s apart and no probe between them: 30 waiting at each poll is 1.5 s of work for 4 workers at
        // 20 req/s, so they may have idled for most of the 5 s.
        let mut gap = obs(5.0, 30, 16, 4, 64.0);
        gap.queue.as_mut().unwrap().window.as_mut().unwrap().min_backlog_rate_across_gaps = 30.0 / 5.0;
        let mut e = ThroughputEstimate::default();
        e.update(&gap, Some(20.0));
        assert_eq!(e.measured(), None);
        // 500 waiting at each poll feeds them for the whole gap: saturated.
        let mut fed = obs(10.0, 500, 16, 4, 80.0);
        fed.queue.as_mut().unwrap().window.as_mut().unwrap().min_backlog_rate_across_gaps = 500.0 / 5.0;
        e.update(&fed, Some(20.0));
        assert_eq!(e.measured(), Some(20.0));
    }

    #[test]
    fn measurements_are_smoothed() {
        let mut e = ThroughputEstimate::seeded(Some(20.0));
        e.update(&obs(5.0, 100, 16, 4, 160.0), None);
        let m = e.measured().unwrap();
        assert!(m > 20.0 && m < 40.0, "one poll at 40/worker moves 20 part of the way: {m}");
    }

    #[test]
    fn an_idle_pool_does_not_lower_a_measurement() {
        let mut e = ThroughputEstimate::seeded(Some(20.0));
        for i in 1..=20 {
            e.update(&obs(5.0 * i as f64, 0, 2, 4, 8.0), None);
        }
        assert_eq!(e.resolve(None), (20.0, ThroughputSource::Measured));
    }

    #[test]
    fn unsaturated_throughput_above_the_hint_replaces_it() {
        let mut e = ThroughputEstimate::default();
        e.update(&obs(5.0, 0, 10, 2, 60.0), None);
        assert_eq!(e.resolve(Some(10.0)), (30.0, ThroughputSource::LowerBound));
        assert_eq!(e.resolve(Some(50.0)), (50.0, ThroughputSource::Hint));
        assert_eq!(e.measured(), None, "a lower bound is not written to status as a measurement");
    }

    #[test]
    fn a_stuck_pool_or_changing_consumers_measure_nothing() {
        let mut e = ThroughputEstimate::default();
        e.update(&obs(5.0, 100, 16, 4, 0.0), None);
        let mut changing = obs(10.0, 100, 16, 4, 80.0);
        changing.queue.as_mut().unwrap().window.as_mut().unwrap().steady_consumers = false;
        e.update(&changing, None);
        assert_eq!(e.measured(), None);
    }

    #[test]
    fn one_observation_is_folded_in_once() {
        let mut e = ThroughputEstimate::seeded(Some(20.0));
        let o = obs(5.0, 100, 16, 4, 160.0);
        e.update(&o, None);
        let once = e.measured();
        e.update(&o, None);
        assert_eq!(e.measured(), once);
    }
}
