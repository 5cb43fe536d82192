//! Retry delays: capped exponential with jitter, so a fleet of workers does not reconnect in lockstep after a
//! broker restart, and many objects failing together do not retry together. One schedule for the worker's
//! reconnects and the operator's requeues.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay ceiling of the first retry.
    pub initial: Duration,
    /// No ceiling exceeds this.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(100), max: Duration::from_secs(5) }
    }
}

impl Backoff {
    /// The ceiling of retry number `attempt` (0-based): `min(max, initial · 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.initial.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(self.max)
    }

    /// The delay before retry number `attempt` (0-based), given `jitter` in `[0, 1)`: "equal jitter", i.e.
    /// between half and all of the [`ceiling`](Self::ceiling).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let half = self.ceiling(attempt) / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// [`delay`](Self::delay) with a random jitter.
    pub fn random_delay(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }

    /// The delay after the `failures`th consecutive failure (0-based) against a broker of `addresses` addresses,
    /// each failure moving on to the next address: none while this round has an address not yet tried (a node
    /// that is down must not delay the move to a live one), then [`delay`](Self::delay) of the round number. With
    /// one address this is `delay(failures, jitter)`.
    pub fn failover_delay(&self, failures: u32, addresses: usize, jitter: f64) -> Duration {
        let addresses = u32::try_from(addresses.max(1)).unwrap_or(u32::MAX);
        if (failures % addresses) + 1 < addresses {
            return Duration::ZERO;
        }
        self.delay(failures / addresses, jitter)
    }

    /// [`failover_delay`](Self::failover_delay) with a random jitter.
    pub fn random_failover_delay(&self, failures: u32, addresses: usize) -> Duration {
        self.failover_delay(failures, addresses, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps() {
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) };
        assert_eq!(backoff.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(backoff.delay(1, 1.0), Duration::from_millis(200));
        assert_eq!(backoff.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(backoff.delay(10, 1.0), Duration::from_secs(5));
        assert_eq!(backoff.delay(u32::MAX, 1.0), Duration::from_secs(5));
    }

    #[test]
    fn failover_tries_every_address_before_backing_off() {
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(5) };
        let delays: Vec<u128> = (0..7).map(|n| backoff.failover_delay(n, 3, 1.0).as_millis()).collect();
        assert_eq!(delays, [0, 0, 100, 0, 0, 200, 0]);
        for n in 0..5 {
            assert_eq!(backoff.failover_delay(n, 1, 0.3), backoff.delay(n, 0.3));
        }
        assert_eq!(backoff.failover_delay(0, 0, 1.0), backoff.delay(0, 1.0));
    }

    #[test]
    fn jitter_stays_between_half_and_the_ceiling() {
        let backoff = Backoff::default();
        assert_eq!(backoff.delay(2, 0.0), Duration::from_millis(200));
        for attempt in 0..40 {
            let delay = backoff.random_delay(attempt);
            let ceiling = backoff.delay(attempt, 1.0);
            assert!(delay >= ceiling / 2 && delay <= ceiling, "{attempt}: {delay:?} vs {ceiling:?}");
        }
    }
}
