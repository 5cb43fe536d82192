//! Redelivered requests run alone, so that a poison request (one that kills the worker) does not take innocent
//! requests down with it.
//!
//! When a worker dies, every request it held unacked goes back to the queue with its delivery count raised, and
//! the quorum queue dead-letters a request whose count passes the delivery limit. Innocent requests that happened
//! to be in flight next to a poison would travel with it from worker to worker (returned requests are delivered
//! first, together) and be dead-lettered with it. So a redelivered request (it may be the poison) only runs while
//! nothing else is unacked on the channel: the prefetch drops to 1 while one is waiting or running, and a
//! session starts with a prefetch of 1 until its first fresh request, so a new worker does not take a whole batch
//! of returned requests at once. A worker crash then only charges the request that caused it.
//!
//! Pure bookkeeping: the session carries out the [`Step`]s.

/// How a request was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A first delivery, run concurrently up to the prefetch.
    Fresh,
    /// A redelivery, run alone.
    Suspect,
}

/// What the session must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<D> {
    /// `basic.qos` with this prefetch.
    SetPrefetch(u16),
    Run(D, Kind),
}

/// Which requests may run now.
#[derive(Debug)]
pub struct Admission<D> {
    prefetch: u16,
    /// The channel's prefetch is 1 (a session's start, or suspects waiting or running).
    cautious: bool,
    fresh_running: usize,
    suspect_running: bool,
    /// Suspects waiting for everything else to finish, with their delivery counts.
    suspects: Vec<(u64, D)>,
    /// Fresh requests that arrived while a suspect ran.
    fresh_waiting: Vec<D>,
}

impl<D> Admission<D> {
    pub fn new(prefetch: u16) -> Self {
        Self {
            prefetch,
            cautious: prefetch > 1,
            fresh_running: 0,
            suspect_running: false,
            suspects: Vec::new(),
            fresh_waiting: Vec::new(),
        }
    }

    /// The prefetch a session starts with.
    pub fn initial_prefetch(&self) -> u16 {
        if self.cautious { 1 } else { self.prefetch }
    }

    /// A delivery arrived; `delivery_count` is the quorum queue's `x-delivery-count` (0 when absent).
    pub fn admit(&mut self, delivery: D, redelivered: bool, delivery_count: u64) -> Vec<Step<D>> {
        let mut steps = Vec::new();
        if self.prefetch == 1 {
            // Alone anyway.
            steps.push(Step::Run(delivery, if redelivered { Kind::Suspect } else { Kind::Fresh }));
            return steps;
        }
        if redelivered {
            if !self.cautious {
                self.cautious = true;
                steps.push(Step::SetPrefetch(1));
            }
            self.suspects.push((delivery_count, delivery));
            steps.extend(self.next_suspect());
            return steps;
        }
        if self.cautious && self.suspects.is_empty() && !self.suspect_running {
            self.cautious = false;
            steps.push(Step::SetPrefetch(self.prefetch));
        }
        if self.suspect_running {
            self.fresh_waiting.push(delivery);
        } else {
            self.fresh_running += 1;
            steps.push(Step::Run(delivery, Kind::Fresh));
        }
        steps
    }

    /// A request admitted as `kind` is done (answered and acked, or given back).
    pub fn finished(&mut self, kind: Kind) -> Vec<Step<D>> {
        let mut steps = Vec::new();
        if self.prefetch == 1 {
            return steps;
        }
        match kind {
            Kind::Fresh => self.fresh_running = self.fresh_running.saturating_sub(1),
            Kind::Suspect => self.suspect_running = false,
        }
        if !self.suspect_running {
            for delivery in self.fresh_waiting.drain(..) {
                self.fresh_running += 1;
                steps.push(Step::Run(delivery, Kind::Fresh));
            }
        }
        steps.extend(self.next_suspect());
        steps
    }

    /// The next suspect, when nothing else runs; the lowest delivery count first (the poison has the highest).
    fn next_suspect(&mut self) -> Option<Step<D>> {
        if self.suspect_running || self.fresh_running > 0 || self.suspects.is_empty() {
            return None;
        }
        let lowest = self.suspects.iter().enumerate().min_by_key(|(_, (count, _))| *count).map(|(i, _)| i)?;
        let (_, delivery) = self.suspects.remove(lowest);
        self.suspect_running = true;
        Some(Step::Run(delivery, Kind::Suspect))
    }

    /// Nothing waits to run and no suspect runs.
    pub fn idle(&self) -> bool {
        self.suspects.is_empty() && self.fresh_waiting.is_empty() && !self.suspect_running
    }

    /// Everything waiting to run, with how it was admitted, to give back to the queue (the handler became
    /// unavailable).
    pub fn take_waiting(&mut self) -> Vec<(D, Kind)> {
        let mut waiting: Vec<(D, Kind)> = self.suspects.drain(..).map(|(_, d)| (d, Kind::Suspect)).collect();
        waiting.extend(self.fresh_waiting.drain(..).map(|d| (d, Kind::Fresh)));
        waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(steps: &[Step<&'static str>]) -> Vec<(&'static str, Kind)> {
        steps.iter().filter_map(|s| if let Step::Run(d, k) = s { Some((*d, *k)) } else { None }).collect()
    }

    #[test]
    fn a_session_starts_cautious_and_opens_up_on_the_first_fresh_request() {
        let mut admission = Admission::new(16);
        assert_eq!(admission.initial_prefetch(), 1);
        let steps = admission.admit("a", false, 0);
        assert_eq!(steps, vec![Step::SetPrefetch(16), Step::Run("a", Kind::Fresh)]);
        assert_eq!(admission.admit("b", false, 0), vec![Step::Run("b", Kind::Fresh)]);
    }

    #[test]
    fn returned_requests_after_a_crash_run_one_at_a_time() {
        let mut admission = Admission::new(16);
        assert_eq!(runs(&admission.admit("p", true, 1)), [("p", Kind::Suspect)]);
        // With a prefetch of 1 nothing else arrives until it is acked.
        assert!(admission.finished(Kind::Suspect).is_empty());
        assert_eq!(runs(&admission.admit("i", true, 1)), [("i", Kind::Suspect)]);
        assert!(admission.finished(Kind::Suspect).is_empty());
        assert!(admission.idle());
        assert_eq!(admission.admit("f", false, 0), vec![Step::SetPrefetch(16), Step::Run("f", Kind::Fresh)]);
    }

    #[test]
    fn a_suspect_among_running_requests_waits_for_them_and_closes_the_window() {
        let mut admission = Admission::new(8);
        admission.admit("a", false, 0);
        admission.admit("b", false, 0);
        assert_eq!(admission.admit("s", true, 3), vec![Step::SetPrefetch(1)]);
        assert_eq!(runs(&admission.admit("t", true, 1)), []);
        assert!(admission.finished(Kind::Fresh).is_empty());
        // The lowest delivery count first.
        assert_eq!(runs(&admission.finished(Kind::Fresh)), [("t", Kind::Suspect)]);
        // A fresh request arriving meanwhile waits for the suspect.
        assert_eq!(runs(&admission.admit("c", false, 0)), []);
        assert_eq!(runs(&admission.finished(Kind::Suspect)), [("c", Kind::Fresh)]);
        assert_eq!(runs(&admission.finished(Kind::Fresh)), [("s", Kind::Suspect)]);
        assert!(!admission.idle());
        assert!(admission.finished(Kind::Suspect).is_empty());
        assert!(admission.idle());
    }

    #[test]
    fn a_prefetch_of_one_needs_no_isolation() {
        let mut admission = Admission::new(1);
        assert_eq!(admission.initial_prefetch(), 1);
        assert_eq!(admission.admit("s", true, 2), vec![Step::Run("s", Kind::Suspect)]);
        assert_eq!(admission.admit("f", false, 0), vec![Step::Run("f", Kind::Fresh)]);
    }

    #[test]
    fn waiting_requests_can_be_given_back() {
        let mut admission = Admission::new(4);
        admission.admit("a", false, 0);
        admission.admit("s", true, 1);
        assert_eq!(admission.take_waiting(), [("s", Kind::Suspect)]);
        assert!(admission.idle());
    }
}
