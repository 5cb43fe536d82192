//! The calls waiting for a reply on one channel, keyed by correlation id.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::message::Delivery;
use tokio::sync::oneshot;

use crate::error::CallError;

/// What ends a waiting call: its reply, or why it will never come.
// Boxing the reply would cost an allocation per call to save a copy of a few hundred bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Outcome {
    Reply(Delivery),
    /// The broker returned the request: no queue of that name.
    Unroutable,
    /// The broker nacked the request: the queue refused it (full, `reject-publish`) or could not take it.
    Nacked,
    /// The channel closed before the reply came.
    Lost(lapin::Error),
}

/// Correlation ids are sequence numbers; a multiplicative hash spreads them over the table's buckets.
#[derive(Default)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct Table {
    waiting: HashMap<u64, oneshot::Sender<Outcome>, BuildHasherDefault<SeqHasher>>,
    next_seq: u64,
    /// Set once the channel is gone: every later registration fails with this error.
    closed: Option<lapin::Error>,
}

#[derive(Default)]
pub(crate) struct PendingCalls {
    table: Mutex<Table>,
    /// Mirrors `Table::closed` so the per-call liveness check takes no lock.
    closed: AtomicBool,
}

impl PendingCalls {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock leaves the table consistent (every operation is one map call).
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves a correlation id for a call that is about to be published.
    pub(crate) fn register(&self) -> Result<Waiter<'_>, CallError> {
        let (tx, rx) = oneshot::channel();
        let mut table = self.lock();
        if let Some(error) = &table.closed {
            return Err(CallError::Connection(error.clone()));
        }
        let seq = table.next_seq;
        table.next_seq += 1;
        table.waiting.insert(seq, tx);
        Ok(Waiter { calls: self, seq, rx, done: false })
    }

    /// Hands `outcome` to the call waiting on `seq`; false when none is (a late, duplicate or foreign reply).
    pub(crate) fn resolve(&self, seq: u64, outcome: Outcome) -> bool {
        let Some(tx) = self.lock().waiting.remove(&seq) else { return false };
        // The receiver may have just timed out; then the outcome is dropped like any late reply.
        tx.send(outcome).is_ok()
    }

    /// Fails every waiting call and refuses new ones: the channel they were sent on is gone.
    pub(crate) fn close(&self, error: lapin::Error) {
        let waiting = {
            let mut table = self.lock();
            table.closed.get_or_insert(error.clone());
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut table.waiting)
        };
        for (_, tx) in waiting {
            let _ = tx.send(Outcome::Lost(error.clone()));
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// How many calls wait for a reply.
    pub(crate) fn len(&self) -> usize {
        self.lock().waiting.len()
    }

    fn forget(&self, seq: u64) {
        self.lock().waiting.remove(&seq);
    }
}

/// One registered call; dropping it before its outcome arrived (timeout, cancelled future) frees its entry.
pub(crate) struct Waiter<'a> {
    calls: &'a PendingCalls,
    pub(crate) seq: u64,
    rx: oneshot::Receiver<Outcome>,
    done: bool,
}

impl Waiter<'_> {
    pub(crate) async fn outcome(&mut self) -> Outcome {
        let outcome = (&mut self.rx).await;
        self.done = true;
        // A dropped sender without an outcome means the table was torn down with the session.
        outcome.unwrap_or_else(|_| {
            Outcome::Lost(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "the reply channel closed",
            )))
        })
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.calls.forget(self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed() -> lapin::Error {
        lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))
    }

    #[tokio::test]
    async fn each_call_gets_its_own_outcome_once() {
        let calls = PendingCalls::default();
        let mut a = calls.register().unwrap();
        let mut b = calls.register().unwrap();
        assert_ne!(a.seq, b.seq);
        assert!(calls.resolve(b.seq, Outcome::Unroutable));
        assert!(!calls.resolve(b.seq, Outcome::Unroutable), "a duplicate finds no one waiting");
        assert!(matches!(b.outcome().await, Outcome::Unroutable));
        assert_eq!(calls.len(), 1);
        assert!(calls.resolve(a.seq, Outcome::Lost(closed())));
        assert!(matches!(a.outcome().await, Outcome::Lost(_)));
        assert_eq!(calls.len(), 0);
    }

    #[test]
    fn a_dropped_waiter_frees_its_entry_and_later_replies_find_no_one() {
        let calls = PendingCalls::default();
        let seq = calls.register().unwrap().seq;
        assert_eq!(calls.len(), 0);
        assert!(!calls.resolve(seq, Outcome::Unroutable));
    }

    #[tokio::test]
    async fn closing_fails_every_waiting_call_and_refuses_new_ones() {
        let calls = PendingCalls::default();
        let mut a = calls.register().unwrap();
        let mut b = calls.register().unwrap();
        calls.close(closed());
        assert!(matches!(a.outcome().await, Outcome::Lost(_)));
        assert!(matches!(b.outcome().await, Outcome::Lost(_)));
        assert!(matches!(calls.register(), Err(CallError::Connection(_))));
        assert!(calls.is_closed());
    }
}
