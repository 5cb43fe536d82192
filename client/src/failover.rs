//! Which of a broker's addresses to connect to next. Each process starts at a random one, so that workers and
//! callers spread over a cluster's nodes; every new attempt (after a failure or a lost connection) moves on to the
//! next one, so a node that went away is left behind. How long to wait between attempts is
//! [`Backoff::failover_delay`](crate::backoff::Backoff::failover_delay).

use std::sync::atomic::{AtomicUsize, Ordering};

/// A position in a list of `len` addresses that goes round.
#[derive(Debug)]
pub struct Rotation {
    next: AtomicUsize,
    len: usize,
}

impl Rotation {
    /// Starts at a random address.
    pub fn random(len: usize) -> Self {
        Self::starting_at(rand::random_range(0..len.max(1)), len)
    }

    pub fn starting_at(start: usize, len: usize) -> Self {
        Self { next: AtomicUsize::new(start), len: len.max(1) }
    }

    /// The address to try now; the next call returns the one after it.
    pub fn advance(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_round_from_its_start() {
        let rotation = Rotation::starting_at(2, 3);
        let order: Vec<usize> = (0..5).map(|_| rotation.advance()).collect();
        assert_eq!(order, [2, 0, 1, 2, 0]);
        assert!(Rotation::random(3).advance() < 3);
        assert_eq!(Rotation::random(0).advance(), 0);
    }

    #[test]
    fn random_starts_spread_over_the_addresses() {
        let mut seen = [false; 3];
        for _ in 0..200 {
            seen[Rotation::random(3).advance()] = true;
        }
        assert_eq!(seen, [true; 3]);
    }
}
