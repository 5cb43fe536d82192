//! Redelivered requests run alone, so that a poison request (one that kills the worker) does not take innocent
//! requests down with it.
//!
//! When a worker dies, every request it held unacked goes back to the queue with its delivery count raised, and
//! the quorum queue dead-letters a request whose count passes the delivery limit. Innocent requests that happened
//! to be in flight next to a poison would travel with it from worker to worker (returned requests are delivered
//! first, together) and be dead-lettered with it. So a redelivered request (it may be the poison) only runs while
//! nothing else is unacked on the channel, and a worker takes requests one at a time (a consumer with a prefetch
//! of one) after a redelivered one and when it starts, until a fresh request comes: a new worker then does not
//! take a whole batch of returned requests at once, and a crash only charges the request that caused it.
//!
//! RabbitMQ applies a prefetch to consumers started after `basic.qos`, so a prefetch change means a new consumer.
//! A new one is started only once nothing is unacked, so the requests in flight never exceed the prefetch: the
//! request that opens the window (the first fresh one) runs alone, with no consumer, and so does the wait for the
//! requests in flight before a suspect runs.
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
    /// Cancel the consumer (what it already sent still arrives and is admitted).
    StopIntake,
    /// Start a consumer with this prefetch (`basic.qos`, then `basic.consume`).
    StartIntake(u16),
    Run(D, Kind),
}

/// Which requests may run now, and which consumer takes more.
#[derive(Debug)]
pub struct Admission<D> {
    prefetch: u16,
    /// The prefetch of the running consumer; `None` while there is none.
    intake: Option<u16>,
    /// The prefetch of the next consumer: 1 (one at a time) or the full prefetch.
    next: u16,
    /// No consumer may be started (the handler is unavailable, or the worker is shutting down).
    suspended: bool,
    fresh_running: usize,
    suspect_running: bool,
    /// Suspects waiting for everything else to finish, with their delivery counts.
    suspects: Vec<(u64, D)>,
    /// Fresh requests that arrived while a suspect ran.
    fresh_waiting: Vec<D>,
}

impl<D> Admission<D> {
    pub fn new(prefetch: u16) -> Self {
        let initial = if prefetch > 1 { 1 } else { prefetch };
        Self {
            prefetch,
            intake: Some(initial),
            next: initial,
            suspended: false,
            fresh_running: 0,
            suspect_running: false,
            suspects: Vec::new(),
            fresh_waiting: Vec::new(),
        }
    }

    /// The prefetch of a session's first consumer.
    pub fn initial_prefetch(&self) -> u16 {
        self.next
    }

    /// A delivery arrived; `delivery_count` is the quorum queue's `x-delivery-count` (0 when absent). What to do
    /// is appended to `steps` (the session's buffer, reused: no allocation per request).
    pub fn admit_into(&mut self, delivery: D, redelivered: bool, delivery_count: u64, steps: &mut Vec<Step<D>>) {
        if self.prefetch == 1 {
            // Alone anyway.
            steps.push(Step::Run(delivery, if redelivered { Kind::Suspect } else { Kind::Fresh }));
            return;
        }
        if redelivered {
            // Take no more until it ran alone; then one at a time.
            if self.intake.is_some_and(|p| p > 1) {
                self.intake = None;
                steps.push(Step::StopIntake);
            }
            self.next = 1;
            self.suspects.push((delivery_count, delivery));
            steps.extend(self.next_suspect());
            return;
        }
        if self.intake == Some(1) {
            // The first fresh request: it runs alone, then the window opens.
            self.intake = None;
            steps.push(Step::StopIntake);
        }
        if self.suspects.is_empty() && !self.suspect_running {
            self.next = self.prefetch;
        }
        if self.suspect_running {
            self.fresh_waiting.push(delivery);
        } else {
            self.fresh_running += 1;
            steps.push(Step::Run(delivery, Kind::Fresh));
        }
    }

    /// A request admitted as `kind` is done (answered and acked, or given back); what to do is appended to `steps`.
    pub fn finished_into(&mut self, kind: Kind, steps: &mut Vec<Step<D>>) {
        if self.prefetch == 1 {
            return;
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
        steps.extend(self.restart());
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

    /// A new consumer, once nothing is unacked.
    fn restart(&mut self) -> Option<Step<D>> {
        if self.intake.is_some() || self.suspended || !self.quiet() {
            return None;
        }
        self.intake = Some(self.next);
        Some(Step::StartIntake(self.next))
    }

    fn quiet(&self) -> bool {
        self.fresh_running == 0 && self.idle()
    }

    /// Nothing waits to run and no suspect runs.
    pub fn idle(&self) -> bool {
        self.suspects.is_empty() && self.fresh_waiting.is_empty() && !self.suspect_running
    }

    /// The session cancelled the consumer itself (the handler became unavailable, or shutdown): start none until
    /// [`resume`](Self::resume).
    pub fn suspend(&mut self) {
        self.suspended = true;
        self.intake = None;
    }

    /// Everything waiting to run, to give back to the queue (the handler became unavailable).
    pub fn take_waiting(&mut self) -> Vec<(D, Kind)> {
        let mut waiting: Vec<(D, Kind)> = self.suspects.drain(..).map(|(_, d)| (d, Kind::Suspect)).collect();
        waiting.extend(self.fresh_waiting.drain(..).map(|d| (d, Kind::Fresh)));
        waiting
    }

    /// The session starts a consumer again (the handler answers): its prefetch.
    pub fn resume(&mut self) -> u16 {
        self.suspended = false;
        self.intake = Some(self.next);
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<D> Admission<D> {
        fn admit(&mut self, delivery: D, redelivered: bool, delivery_count: u64) -> Vec<Step<D>> {
            let mut steps = Vec::new();
            self.admit_into(delivery, redelivered, delivery_count, &mut steps);
            steps
        }

        fn finished(&mut self, kind: Kind) -> Vec<Step<D>> {
            let mut steps = Vec::new();
            self.finished_into(kind, &mut steps);
            steps
        }
    }

    fn runs(steps: &[Step<&'static str>]) -> Vec<(&'static str, Kind)> {
        steps.iter().filter_map(|s| if let Step::Run(d, k) = s { Some((*d, *k)) } else { None }).collect()
    }

    #[test]
    fn a_session_starts_one_at_a_time_and_opens_up_after_its_first_fresh_request() {
        let mut admission = Admission::new(16);
        assert_eq!(admission.initial_prefetch(), 1);
        let steps = admission.admit("a", false, 0);
        assert_eq!(steps, vec![Step::StopIntake, Step::Run("a", Kind::Fresh)]);
        // The window opens once nothing is unacked, so the requests in flight never exceed the prefetch.
        assert_eq!(admission.finished(Kind::Fresh), vec![Step::StartIntake(16)]);
        assert_eq!(admission.admit("b", false, 0), vec![Step::Run("b", Kind::Fresh)]);
        assert_eq!(admission.admit("c", false, 0), vec![Step::Run("c", Kind::Fresh)]);
        assert!(admission.finished(Kind::Fresh).is_empty());
    }

    #[test]
    fn returned_requests_after_a_crash_run_one_at_a_time() {
        let mut admission = Admission::new(16);
        assert_eq!(admission.admit("p", true, 1), vec![Step::Run("p", Kind::Suspect)]);
        // The consumer's prefetch of 1 holds everything else back until it is acked; the consumer stays.
        assert!(admission.finished(Kind::Suspect).is_empty());
        assert_eq!(admission.admit("i", true, 1), vec![Step::Run("i", Kind::Suspect)]);
        assert!(admission.finished(Kind::Suspect).is_empty());
        assert!(admission.idle());
        assert_eq!(admission.admit("f", false, 0), vec![Step::StopIntake, Step::Run("f", Kind::Fresh)]);
        assert_eq!(admission.finished(Kind::Fresh), vec![Step::StartIntake(16)]);
    }

    #[test]
    fn a_suspect_among_running_requests_stops_the_intake_and_waits_for_them() {
        let mut admission = Admission::new(8);
        admission.admit("a", false, 0);
        admission.finished(Kind::Fresh);
        admission.admit("b", false, 0);
        admission.admit("c", false, 0);
        assert_eq!(admission.admit("s", true, 3), vec![Step::StopIntake]);
        // Already sent by the stopped consumer.
        assert_eq!(runs(&admission.admit("t", true, 1)), []);
        assert!(admission.finished(Kind::Fresh).is_empty());
        // The lowest delivery count first.
        assert_eq!(runs(&admission.finished(Kind::Fresh)), [("t", Kind::Suspect)]);
        // A fresh request still arriving waits for the suspect.
        assert_eq!(runs(&admission.admit("d", false, 0)), []);
        assert_eq!(runs(&admission.finished(Kind::Suspect)), [("d", Kind::Fresh)]);
        assert_eq!(runs(&admission.finished(Kind::Fresh)), [("s", Kind::Suspect)]);
        assert!(!admission.idle());
        // Quiet: one at a time again, until a fresh request.
        assert_eq!(admission.finished(Kind::Suspect), vec![Step::StartIntake(1)]);
        assert!(admission.idle());
    }

    #[test]
    fn a_prefetch_of_one_needs_no_isolation() {
        let mut admission = Admission::new(1);
        assert_eq!(admission.initial_prefetch(), 1);
        assert_eq!(admission.admit("s", true, 2), vec![Step::Run("s", Kind::Suspect)]);
        assert_eq!(admission.admit("f", false, 0), vec![Step::Run("f", Kind::Fresh)]);
        assert!(admission.finished(Kind::Fresh).is_empty());
    }

    #[test]
    fn a_suspended_admission_starts_no_consumer_until_resumed() {
        let mut admission = Admission::new(4);
        admission.admit("a", false, 0);
        admission.admit("s", true, 1);
        admission.suspend();
        assert_eq!(admission.take_waiting(), [("s", Kind::Suspect)]);
        assert!(admission.finished(Kind::Fresh).is_empty());
        assert!(admission.idle());
        assert_eq!(admission.resume(), 1);
    }
}
