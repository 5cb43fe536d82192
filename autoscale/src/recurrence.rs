//! Anticipating surges that recur, from the service's own history.
//!
//! A **surge** is a stretch of polls whose arrival rate needs at least twice the replicas of the quietest rate of
//! the last [`BASE_HISTORY_SECONDS`] (and at least [`MIN_SURGE_EXTRA_REPLICAS`] more). The start of each surge and
//! the most replicas its arrival rate needed are remembered. Once [`MIN_SURGES`] surges have started at most
//! [`MAX_RECURRENCE_SECONDS`] apart, the next one is expected between the shortest and the longest interval seen
//! after the last one's start (widened by [`ANTICIPATION_JITTER_SHARE`] ÷ the intervals seen); from [`ANTICIPATION_LEAD_SECONDS`] before that window opens until it closes (plus a
//! slack), the pool is kept at the replicas the recent surges' rate needed, never above maxReplicas. If the surge
//! does not come, the floor ends with the window: nothing is held longer than the history justifies.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How far back the quiet level a surge is measured against reaches (seconds).
pub const BASE_HISTORY_SECONDS: f64 = 600.0;
/// A surge needs at least this many replicas more than the quiet level (and twice as many).
pub const MIN_SURGE_EXTRA_REPLICAS: i32 = 1;
/// Surges further apart than this are not treated as recurring (seconds).
pub const MAX_RECURRENCE_SECONDS: f64 = 1200.0;
/// Surges recur only if the longest interval between their starts is at most this many times the shortest: a
/// rate that crosses the surge threshold back and forth (a ramp, a slow swell) starts "surges" 10 s and 1000 s
/// apart, which predict nothing.
pub const MAX_RECURRENCE_SPREAD: f64 = 2.0;
/// How many surge starts it takes to expect another.
pub const MIN_SURGES: usize = 2;
/// How long before the expected window the floor starts: a poll, a pod start and a margin (seconds).
pub const ANTICIPATION_LEAD_SECONDS: f64 = 20.0;
/// The window is kept open this share of the shortest interval past the longest.
pub const ANTICIPATION_SLACK_SHARE: f64 = 0.1;
/// With one interval seen, the window is widened by this share of it on either side (by half of it with two, and
/// so on): one interval says nothing of how much they vary, and surges 3.5-4.5 min apart were otherwise missed
/// until four had been seen.
pub const ANTICIPATION_JITTER_SHARE: f64 = 0.1;
/// Surges remembered.
const KEPT_SURGES: usize = 6;

/// One surge: when it started and the most replicas its arrival rate needed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Surge {
    pub start: f64,
    pub peak_replicas: i32,
    pub peak_rate: f64,
}

/// The replicas to hold ahead of an expected surge, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Anticipation {
    pub replicas: i32,
    pub message: String,
}

/// The history of a service's surges.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Recurrence {
    /// (at, replicas the arrival rate needed) of recent polls.
    rate_needs: VecDeque<(f64, i32)>,
    surges: VecDeque<Surge>,
    in_surge: bool,
}

impl Recurrence {
    /// Records one poll's arrival rate and the replicas it needs at the target utilisation.
    pub fn observe(&mut self, now: f64, arrival_rate: f64, rate_need: i32) {
        self.rate_needs.push_back((now, rate_need));
        while self.rate_needs.front().is_some_and(|(t, _)| *t < now - BASE_HISTORY_SECONDS) {
            self.rate_needs.pop_front();
        }
        let base = self.rate_needs.iter().map(|(_, r)| *r).min().unwrap_or(rate_need);
        let surging = rate_need >= (2 * base).max(base + MIN_SURGE_EXTRA_REPLICAS);
        if surging && !self.in_surge {
            self.surges.push_back(Surge { start: now, peak_replicas: rate_need, peak_rate: arrival_rate });
            while self.surges.len() > KEPT_SURGES {
                self.surges.pop_front();
            }
        } else if surging && let Some(s) = self.surges.back_mut() {
            s.peak_replicas = s.peak_replicas.max(rate_need);
            s.peak_rate = s.peak_rate.max(arrival_rate);
        }
        self.in_surge = surging;
    }

    /// The floor to hold at `now`, if a recurring surge is expected soon.
    pub fn anticipate(&self, now: f64) -> Option<Anticipation> {
        if self.in_surge || self.surges.len() < MIN_SURGES {
            return None;
        }
        let starts: Vec<f64> = self.surges.iter().map(|s| s.start).collect();
        let intervals: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        let shortest = intervals.iter().copied().fold(f64::INFINITY, f64::min);
        let longest = intervals.iter().copied().fold(0.0, f64::max);
        if longest > MAX_RECURRENCE_SECONDS || shortest <= 0.0 || longest > MAX_RECURRENCE_SPREAD * shortest {
            return None;
        }
        let last = *starts.last()?;
        // Few intervals show little of how much they vary: widen the window by a share that shrinks as more are seen.
        let jitter = ANTICIPATION_JITTER_SHARE / intervals.len() as f64;
        let opens = last + shortest * (1.0 - jitter) - ANTICIPATION_LEAD_SECONDS;
        let closes = last + longest * (1.0 + jitter) + ANTICIPATION_SLACK_SHARE * shortest;
        if now < opens || now > closes {
            return None;
        }
        let recent = self.surges.iter().rev().take(3);
        let (replicas, rate) = recent.fold((0, 0.0_f64), |(r, l), s| (r.max(s.peak_replicas), l.max(s.peak_rate)));
        let message = format!(
            "surges to {rate:.1} req/s recurred every {shortest:.0}-{longest:.0}s ({} seen); the next is expected \
             {:.0}-{:.0}s from now: holding the {} they needed",
            self.surges.len(),
            (last + shortest - now).max(0.0),
            (last + longest - now).max(0.0),
            if replicas == 1 { "1 replica".to_owned() } else { format!("{replicas} replicas") }
        );
        Some(Anticipation { replicas, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(r: &mut Recurrence, from: f64, to: f64, rate: f64, need: i32) {
        let mut t = from;
        while t < to {
            r.observe(t, rate, need);
            t += 5.0;
        }
    }

    #[test]
    fn two_surges_a_few_minutes_apart_make_the_next_expected() {
        let mut r = Recurrence::default();
        run(&mut r, 0.0, 100.0, 30.0, 2);
        run(&mut r, 100.0, 120.0, 300.0, 19);
        run(&mut r, 120.0, 340.0, 30.0, 2);
        assert_eq!(r.anticipate(330.0), None, "one surge is not a pattern");
        run(&mut r, 340.0, 360.0, 300.0, 19);
        run(&mut r, 360.0, 530.0, 30.0, 2);
        // One interval, 240 s, widened by 10 %: the window is [340 + 216 - 20, 340 + 264 + 24] = [536, 628], so a
        // next surge 210 s or 270 s after the last is met too.
        assert_eq!(r.anticipate(530.0), None);
        let a = r.anticipate(540.0).expect("expected");
        assert_eq!(a.replicas, 19);
        assert!(a.message.contains("every 240-240s"), "{}", a.message);
        assert!(r.anticipate(627.0).is_some());
        assert_eq!(r.anticipate(630.0), None, "a surge that did not come is not waited for");
    }

    #[test]
    fn rare_or_small_changes_are_not_surges() {
        let mut r = Recurrence::default();
        run(&mut r, 0.0, 100.0, 30.0, 4);
        run(&mut r, 100.0, 120.0, 50.0, 6);
        run(&mut r, 120.0, 200.0, 30.0, 4);
        run(&mut r, 200.0, 220.0, 50.0, 6);
        assert!(r.surges.is_empty());
        let mut r = Recurrence::default();
        run(&mut r, 0.0, 100.0, 30.0, 2);
        run(&mut r, 100.0, 120.0, 300.0, 19);
        run(&mut r, 120.0, 1500.0, 30.0, 2);
        run(&mut r, 1500.0, 1520.0, 300.0, 19);
        assert_eq!(r.anticipate(2800.0), None, "21 min apart is not recurring");
    }

    #[test]
    fn a_rate_that_crosses_the_threshold_irregularly_predicts_nothing() {
        // A ramp: the need wavers across twice the quiet level at 100 s and 110 s, and again 600 s later.
        let mut r = Recurrence::default();
        run(&mut r, 0.0, 100.0, 30.0, 2);
        run(&mut r, 100.0, 105.0, 60.0, 4);
        run(&mut r, 105.0, 110.0, 45.0, 3);
        run(&mut r, 110.0, 710.0, 60.0, 4);
        assert_eq!(r.surges.len(), 2);
        run(&mut r, 710.0, 715.0, 45.0, 3);
        run(&mut r, 715.0, 720.0, 90.0, 6);
        run(&mut r, 720.0, 730.0, 30.0, 2);
        assert_eq!(r.surges.len(), 3);
        // Intervals 10 s and 605 s: the next start could be anywhere.
        assert_eq!(r.anticipate(730.0), None);
        assert_eq!(r.anticipate(1300.0), None);
    }
}
