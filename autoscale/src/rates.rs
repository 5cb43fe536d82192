//! Arrival and completion rates from the broker's cumulative counters.
//!
//! The management API's own `rate` fields are averaged over its stats interval and jump when a sample lands on
//! either side of a stats emission, so rates here come from the `publish` and `ack` counters of the operator's
//! own successive polls. A counter that goes down was reset (the queue was re-created or the broker restarted):
//! the window starts over from that sample instead of producing a negative or made-up rate.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One poll of a request queue on the management API.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueSample {
    /// When it was taken, in seconds on a monotonic clock with any fixed origin (e.g. the operator's start).
    pub at: f64,
    /// Requests waiting to be delivered (`messages_ready`): the backlog.
    pub ready: u64,
    /// Requests delivered and not yet acknowledged (`messages_unacknowledged`): in flight.
    pub unacked: u64,
    /// Consumers attached: one per worker that is consuming.
    pub consumers: u64,
    /// `message_stats.publish`: requests published to the queue since it (or the broker) started.
    pub published_total: u64,
    /// `message_stats.ack`: requests acknowledged since it (or the broker) started.
    pub acked_total: u64,
}

/// The queue over the rate window: what saturation and per-worker throughput are judged on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowFigures {
    /// Seconds between the oldest and newest sample of the window.
    pub span: f64,
    /// The smallest backlog of any look in the window: its polls and the probes between them.
    pub min_backlog: u64,
    /// The smallest in-flight count of any sample in the window.
    pub min_in_flight: u64,
    /// The most consumers of any sample in the window.
    pub max_consumers: u64,
    /// Whether every look in the window (polls and probes) saw the same number of consumers.
    pub steady_consumers: bool,
    /// The least, over the looks followed by a gap longer than [`MAX_LOOK_GAP_SECONDS`] before the next look, of
    /// the backlog ÷ that gap (req/s): how fast the backlog could have fed the workers until they were next seen.
    /// Infinite when no gap is that long (probes look every second).
    #[serde(default = "infinite")]
    pub min_backlog_rate_across_gaps: f64,
}

fn infinite() -> f64 {
    f64::INFINITY
}

/// Looks at the backlog (polls and probes) further apart than this (seconds) may hide an idle spell between them.
pub const MAX_LOOK_GAP_SECONDS: f64 = 2.0;

/// The figures of one poll, with the rates over the window that ends at it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObservedQueue {
    pub backlog: u64,
    pub in_flight: u64,
    pub consumers: u64,
    /// Requests arriving per second; `None` until two samples span a window (first poll, after a reset).
    pub arrival_rate: Option<f64>,
    /// Requests completed (acked) per second; `None` when `arrival_rate` is.
    pub completion_rate: Option<f64>,
    /// The window the rates cover; `None` when they are.
    pub window: Option<WindowFigures>,
    /// Requests arriving per second averaged over the scale-down delay (or as much of it as the samples cover,
    /// at least a rate window): what a scale-down sizes the arrival-rate need on. `None` when not known.
    #[serde(default)]
    pub sustained_arrival_rate: Option<f64>,
    /// How fast the backlog grew (req/s, negative when it shrank) since an earlier look, poll or probe, at least
    /// `MIN_GROWTH_SPAN` and at most `MAX_GROWTH_SPAN` before (`Autoscaler`); `None` when there is none.
    #[serde(default)]
    pub backlog_growth: Option<f64>,
}

/// What the autoscaler knows of a queue at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// When (seconds, same clock as [`QueueSample::at`]).
    pub at: f64,
    /// `None` when the metrics are unavailable (management API down, queue missing).
    pub queue: Option<ObservedQueue>,
}

impl Observation {
    pub fn unavailable(at: f64) -> Self {
        Self { at, queue: None }
    }
}

/// The operator's recent samples of one queue.
#[derive(Clone, Debug)]
pub struct RateTracker {
    samples: VecDeque<QueueSample>,
    window: f64,
    /// (at, published_total) of the polls of the last [`MAX_HISTORY_SECONDS`], for rates over longer spans.
    published: VecDeque<(f64, u64)>,
    /// (at, ready, consumers) of the probes since the oldest sample: what the saturation test sees between polls.
    probes: VecDeque<(f64, u64, u64)>,
}

/// The longest span [`RateTracker::arrival_rate_since`] looks back (seconds).
pub const MAX_HISTORY_SECONDS: f64 = 3600.0;

/// The span rates are computed over by default: two 5 s polls, so a sample that lands just before the broker's
/// stats emission (every 5 s by default) does not halve or double a rate.
pub const DEFAULT_RATE_WINDOW: f64 = 10.0;

impl Default for RateTracker {
    fn default() -> Self {
        Self::new(DEFAULT_RATE_WINDOW)
    }
}

impl RateTracker {
    /// Rates are computed over at least `window` seconds of samples once that many are held.
    pub fn new(window: f64) -> Self {
        Self { samples: VecDeque::new(), window: window.max(0.0), published: VecDeque::new(), probes: VecDeque::new() }
    }

    /// The longest gap between two polls that still gives a rate; longer means the rate would be stale.
    fn max_gap(&self) -> f64 {
        (3.0 * self.window).max(60.0)
    }

    /// Adds a poll and returns the figures with the rates over the window ending at it.
    pub fn push(&mut self, sample: QueueSample) -> ObservedQueue {
        if let Some(last) = self.samples.back() {
            let reset = sample.published_total < last.published_total || sample.acked_total < last.acked_total;
            let gap = sample.at - last.at;
            let in_order = gap > 0.0; // also false for a NaN time
            if reset || !in_order || gap > self.max_gap() {
                self.samples.clear();
                self.published.clear();
                self.probes.clear();
            }
        }
        self.samples.push_back(sample);
        self.published.push_back((sample.at, sample.published_total));
        while self.published.len() > 2 && self.published[1].0 <= sample.at - MAX_HISTORY_SECONDS {
            self.published.pop_front();
        }
        let cutoff = sample.at - self.window;
        while self.samples.len() > 2 && self.samples[1].at <= cutoff {
            self.samples.pop_front();
        }
        let oldest = self.samples.front().map_or(sample.at, |s| s.at);
        while self.probes.front().is_some_and(|p| p.0 <= oldest) {
            self.probes.pop_front();
        }
        self.figures()
    }

    /// Forgets all samples (e.g. the queue was deleted): the next rate needs two new polls.
    pub fn clear(&mut self) {
        self.samples.clear();
        self.published.clear();
        self.probes.clear();
    }

    /// Records a probe between polls (a passive `queue.declare`: ready and consumers, no counters), for the
    /// window's backlog and consumer figures. Ignored before the first poll and out of order.
    pub fn note_probe(&mut self, at: f64, ready: u64, consumers: u64) {
        if self.samples.back().is_some_and(|s| at > s.at) && self.probes.back().is_none_or(|p| at > p.0) {
            self.probes.push_back((at, ready, consumers));
        }
    }

    /// The arrival rate from the last poll at or before `since` (or the oldest held, if none is that old) to the
    /// newest: `None` when that spans less than the rate window.
    pub fn arrival_rate_since(&self, since: f64) -> Option<f64> {
        let &(newest_at, newest) = self.published.back()?;
        let i = self.published.partition_point(|(at, _)| *at <= since);
        let &(oldest_at, oldest) = self.published.get(i.saturating_sub(1))?;
        let span = newest_at - oldest_at;
        (span > 0.0 && span >= self.window).then(|| (newest - oldest) as f64 / span)
    }

    fn figures(&self) -> ObservedQueue {
        let newest = *self.samples.back().expect("push adds a sample before computing figures");
        let oldest = *self.samples.front().expect("non-empty");
        let mut figures = ObservedQueue {
            backlog: newest.ready,
            in_flight: newest.unacked,
            consumers: newest.consumers,
            arrival_rate: None,
            completion_rate: None,
            window: None,
            sustained_arrival_rate: None,
            backlog_growth: None,
        };
        let span = newest.at - oldest.at;
        if self.samples.len() < 2 || span <= 0.0 {
            return figures;
        }
        // Counters only grow within the window: push() restarts it at a reset.
        figures.arrival_rate = Some((newest.published_total - oldest.published_total) as f64 / span);
        figures.completion_rate = Some((newest.acked_total - oldest.acked_total) as f64 / span);
        // Every look of the window, in time order: the polls and the probes between the oldest and the newest.
        let mut looks: Vec<(f64, u64, u64)> = self.samples.iter().map(|s| (s.at, s.ready, s.consumers)).collect();
        looks.extend(self.probes.iter().filter(|p| p.0 > oldest.at && p.0 < newest.at));
        looks.sort_by(|a, b| a.0.total_cmp(&b.0));
        figures.window = Some(WindowFigures {
            span,
            min_backlog: looks.iter().map(|l| l.1).min().unwrap_or(0),
            min_in_flight: self.samples.iter().map(|s| s.unacked).min().unwrap_or(0),
            max_consumers: self.samples.iter().map(|s| s.consumers).max().unwrap_or(0),
            steady_consumers: looks.iter().all(|l| l.2 == newest.consumers),
            min_backlog_rate_across_gaps: looks
                .windows(2)
                .filter(|pair| pair[1].0 - pair[0].0 > MAX_LOOK_GAP_SECONDS)
                .map(|pair| pair[0].1 as f64 / (pair[1].0 - pair[0].0))
                .fold(f64::INFINITY, f64::min),
        });
        figures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: f64, published: u64, acked: u64) -> QueueSample {
        QueueSample { at, ready: 0, unacked: 0, consumers: 1, published_total: published, acked_total: acked }
    }

    #[test]
    fn first_sample_has_figures_but_no_rates() {
        let mut t = RateTracker::new(10.0);
        let f = t.push(QueueSample { ready: 7, unacked: 3, ..sample(0.0, 100, 90) });
        assert_eq!((f.backlog, f.in_flight, f.consumers), (7, 3, 1));
        assert_eq!(f.arrival_rate, None);
        assert_eq!(f.completion_rate, None);
        assert_eq!(f.window, None);
    }

    #[test]
    fn rates_are_counter_deltas_over_the_elapsed_time() {
        let mut t = RateTracker::new(5.0);
        t.push(sample(0.0, 100, 50));
        let f = t.push(sample(5.0, 600, 300));
        assert_eq!(f.arrival_rate, Some(100.0));
        assert_eq!(f.completion_rate, Some(50.0));
    }

    #[test]
    fn rates_span_the_window_not_just_the_last_poll() {
        let mut t = RateTracker::new(10.0);
        t.push(sample(0.0, 0, 0));
        t.push(sample(5.0, 0, 0)); // the broker's stats had not been emitted yet
        let f = t.push(sample(10.0, 1000, 1000));
        assert_eq!(f.arrival_rate, Some(100.0));
        assert_eq!(f.window.unwrap().span, 10.0);
        let f = t.push(sample(15.0, 1500, 1500));
        assert_eq!(f.arrival_rate, Some(150.0), "the window slides: samples at 5, 10 and 15 s");
    }

    #[test]
    fn a_counter_that_goes_down_is_a_reset_not_a_negative_rate() {
        let mut t = RateTracker::new(5.0);
        t.push(sample(0.0, 10_000, 10_000));
        let f = t.push(sample(5.0, 40, 30));
        assert_eq!(f.arrival_rate, None, "the reset time is unknown, so no rate from this pair");
        let f = t.push(sample(10.0, 540, 530));
        assert_eq!(f.arrival_rate, Some(100.0));
        assert_eq!(f.completion_rate, Some(100.0));
    }

    #[test]
    fn a_long_gap_or_a_clock_going_back_gives_no_rate() {
        let mut t = RateTracker::new(5.0);
        t.push(sample(0.0, 0, 0));
        assert_eq!(t.push(sample(500.0, 1000, 1000)).arrival_rate, None);
        assert_eq!(t.push(sample(400.0, 2000, 2000)).arrival_rate, None);
        assert_eq!(t.push(sample(405.0, 2500, 2500)).arrival_rate, Some(100.0));
    }

    #[test]
    fn a_rate_over_a_longer_span_comes_from_the_same_counters() {
        let mut t = RateTracker::new(10.0);
        for i in 0..=12u64 {
            // 100 req/s, except 300 req/s in the last 10 s.
            let published = if i <= 10 { 500 * i } else { 5000 + 1500 * (i - 10) };
            t.push(sample(5.0 * i as f64, published, published));
        }
        assert_eq!(t.arrival_rate_since(0.0), Some(8000.0 / 60.0));
        assert_eq!(t.arrival_rate_since(-100.0), Some(8000.0 / 60.0), "as far back as the samples go");
        assert_eq!(t.arrival_rate_since(50.0), Some(300.0));
        assert_eq!(t.arrival_rate_since(52.0), Some(300.0), "from the last poll at or before the start");
        assert_eq!(t.arrival_rate_since(57.0), None, "shorter than the rate window");
        t.push(sample(65.0, 10, 10));
        assert_eq!(t.arrival_rate_since(0.0), None, "a reset starts over");
    }

    #[test]
    fn window_figures_tell_whether_the_workers_stayed_busy() {
        let mut t = RateTracker::new(10.0);
        t.push(QueueSample { ready: 50, unacked: 8, consumers: 2, ..sample(0.0, 0, 0) });
        t.push(QueueSample { ready: 0, unacked: 8, consumers: 2, ..sample(5.0, 0, 0) });
        let f = t.push(QueueSample { ready: 20, unacked: 12, consumers: 3, ..sample(10.0, 0, 0) });
        let w = f.window.unwrap();
        assert_eq!((w.min_backlog, w.min_in_flight, w.max_consumers, w.steady_consumers), (0, 8, 3, false));
    }
}
