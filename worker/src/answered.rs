//! Requests this worker process has already answered, so that a redelivery of one of them is acked instead of run
//! again.
//!
//! A request is acked only after its reply was confirmed by the broker. When the session dies between the two (the
//! confirm came, the ack never reached the broker), the broker returns the request to the queue and redelivers it
//! with `redelivered` set; running it again would run the handler twice and send the caller a second reply, and
//! every such round raises the quorum queue's delivery count towards the delivery limit (dead-lettering). This
//! record remembers, for the last requests answered, the identity of what was answered: the `message_id` (unique
//! per call, docs/protocol.md), the `correlation_id` and the `reply_to` address the confirmed reply went to. A
//! redelivered request with the same identity already has its reply with the caller: it is acked without running.
//!
//! What it cannot do: a redelivery that reaches another worker process (or this one after a restart) runs again;
//! requests without a `message_id` are never skipped; an entry is forgotten after [`RETENTION`] or once
//! `capacity` newer answers were recorded. Only confirmed replies (and one-way requests whose handler finished) are
//! recorded, so a request whose reply was not confirmed always runs again.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::protocol::{AMQPErrorKind, AMQPHardError};
use lapin::{BasicProperties, ErrorKind};

/// How long an answer is remembered: far longer than a worker takes to reconnect and get its requests back.
pub const RETENTION: Duration = Duration::from_secs(5 * 60);

/// The fewest answers remembered, whatever the prefetch.
pub const MIN_CAPACITY: usize = 1024;

/// Direct reply-to addresses: they name the caller's channel, which dies with its connection and never comes back.
const DIRECT_REPLY_TO_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Whether publishing a reply to `reply_to` failed because the broker can never deliver it: RabbitMQ 3.10 closes the
/// publishing connection with 541 INTERNAL_ERROR (its channel crashes with `{case_clause,error}` in
/// `rabbit_channel:deliver_reply/2`) when the reply goes to the direct reply-to address of a caller whose node is
/// down; that caller's channel is gone for good. Only meaningful for a reply published alone on its connection, so
/// that the connection's close is this reply's doing.
pub fn reply_undeliverable(reply_to: &str, error: &lapin::Error) -> bool {
    reply_to.starts_with(DIRECT_REPLY_TO_PREFIX)
        && matches!(error.kind(), ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR))
}

/// What identifies an answered request: the call, and where its reply went. The three properties in one buffer
/// (one allocation, one hash per lookup), each as a presence byte, its length and its bytes, so that no two
/// different triples encode alike.
fn encode_key(properties: &BasicProperties, buffer: &mut Vec<u8>) -> bool {
    let Some(message_id) = properties.message_id().as_ref().map(|m| m.as_str()).filter(|m| !m.is_empty()) else {
        // Without a `message_id` nothing says that two deliveries are the same call.
        return false;
    };
    buffer.clear();
    let correlation_id = properties.correlation_id().as_ref().map(|c| c.as_str());
    let reply_to = properties.reply_to().as_ref().map(|r| r.as_str());
    for field in [Some(message_id), correlation_id, reply_to] {
        match field {
            Some(text) => {
                buffer.push(1);
                buffer.extend_from_slice(&(text.len() as u32).to_le_bytes());
                buffer.extend_from_slice(text.as_bytes());
            }
            None => buffer.push(0),
        }
    }
    true
}

/// The last answered requests of this process, bounded in number and age.
#[derive(Debug)]
pub struct Answered {
    capacity: usize,
    retention: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Oldest first, with when and as which entry it was recorded; a key answered twice appears twice (only its
    /// latest entry, the one `latest` names, counts).
    order: VecDeque<(Arc<[u8]>, u64, Instant)>,
    latest: HashMap<Arc<[u8]>, u64>,
    next: u64,
    /// Where a key is encoded before it is looked up or copied into an entry: no allocation per lookup.
    scratch: Vec<u8>,
}

impl Answered {
    /// Remembers the last `capacity` answers (at least [`MIN_CAPACITY`]) for [`RETENTION`].
    pub fn new(capacity: usize) -> Self {
        Self::with_retention(capacity.max(MIN_CAPACITY), RETENTION)
    }

    /// A record for a worker holding up to `prefetch` requests: the requests a dying session leaves confirmed but
    /// unacked are at most the prefetch, and they are the last ones recorded before their redelivery.
    pub fn for_prefetch(prefetch: u16) -> Self {
        Self::new(usize::from(prefetch) * 4)
    }

    fn with_retention(capacity: usize, retention: Duration) -> Self {
        Self { capacity: capacity.max(1), retention, inner: Mutex::new(Inner::default()) }
    }

    /// Records that the request with `properties` was answered: its reply confirmed by the broker, or, for a
    /// one-way request, its handler finished; or that its reply can never be delivered ([`reply_undeliverable`]).
    pub fn record(&self, properties: &BasicProperties) {
        self.record_at(properties, Instant::now());
    }

    /// Whether a request with `properties` was answered by this process within the retention (and, if so, forgets
    /// it: its redelivery is acked now, and a later delivery of the same call is a new attempt).
    pub fn take(&self, properties: &BasicProperties) -> bool {
        self.take_at(properties, Instant::now())
    }

    /// Answers remembered now.
    pub fn len(&self) -> usize {
        self.lock().latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn record_at(&self, properties: &BasicProperties, now: Instant) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if !encode_key(properties, &mut inner.scratch) {
            return;
        }
        let key: Arc<[u8]> = Arc::from(&inner.scratch[..]);
        let entry = inner.next;
        inner.next += 1;
        inner.latest.insert(key.clone(), entry);
        inner.order.push_back((key, entry, now));
        self.evict(inner, now);
    }

    fn take_at(&self, properties: &BasicProperties, now: Instant) -> bool {
        let mut guard = self.lock();
        let inner = &mut *guard;
        self.evict(inner, now);
        encode_key(properties, &mut inner.scratch) && inner.latest.remove(&inner.scratch[..]).is_some()
    }

    /// Drops the entries past the capacity or the retention, oldest first.
    fn evict(&self, inner: &mut Inner, now: Instant) {
        while let Some((key, entry, at)) = inner.order.front() {
            let expired = now.saturating_duration_since(*at) > self.retention;
            if inner.order.len() <= self.capacity && !expired {
                break;
            }
            // Forget the key only if this entry is its latest (a key recorded again later stays).
            if let Entry::Occupied(latest) = inner.latest.entry(Arc::clone(key))
                && latest.get() == entry
            {
                latest.remove();
            }
            inner.order.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(message_id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(message_id.into())
            .with_correlation_id(format!("c-{message_id}").into())
            .with_reply_to("amq.rabbitmq.reply-to.g1h2AA".into())
    }

    #[test]
    fn a_recorded_answer_is_found_once() {
        let answered = Answered::new(10);
        answered.record(&request("m-1"));
        assert!(!answered.take(&request("m-2")), "another call was not answered");
        assert!(answered.take(&request("m-1")));
        assert!(!answered.take(&request("m-1")), "forgotten once its redelivery was acked");
    }

    #[test]
    fn the_same_message_id_to_another_reply_address_or_correlation_id_is_another_answer() {
        let answered = Answered::new(10);
        answered.record(&request("m-1"));
        assert!(!answered.take(&request("m-1").with_reply_to("amq.gen-other".into())));
        assert!(!answered.take(&request("m-1").with_correlation_id("c-other".into())));
        assert!(answered.take(&request("m-1")));
    }

    #[test]
    fn properties_that_join_alike_are_different_answers() {
        let answered = Answered::new(10);
        let call = |m: &str, c: Option<&str>| {
            let properties = BasicProperties::default().with_message_id(m.into());
            match c {
                Some(c) => properties.with_correlation_id(c.into()),
                None => properties,
            }
        };
        answered.record(&call("ab", Some("c")));
        assert!(!answered.take(&call("a", Some("bc"))));
        assert!(!answered.take(&call("abc", None)));
        answered.record(&call("m", None));
        assert!(!answered.take(&call("m", Some(""))), "no correlation id is not an empty one");
        assert!(answered.take(&call("m", None)));
        assert!(answered.take(&call("ab", Some("c"))));
    }

    #[test]
    fn requests_without_a_message_id_are_never_taken() {
        let answered = Answered::new(10);
        let anonymous = BasicProperties::default().with_correlation_id("c".into());
        answered.record(&anonymous);
        assert!(!answered.take(&anonymous));
        answered.record(&anonymous.clone().with_message_id("".into()));
        assert!(!answered.take(&anonymous.with_message_id("".into())));
        assert!(answered.is_empty());
    }

    #[test]
    fn one_way_requests_are_keyed_by_message_id() {
        let answered = Answered::new(10);
        let one_way = BasicProperties::default().with_message_id("m-1".into());
        answered.record(&one_way);
        assert!(answered.take(&one_way));
    }

    #[test]
    fn the_oldest_answers_are_forgotten_past_the_capacity() {
        let answered = Answered::with_retention(3, RETENTION);
        for i in 0..5 {
            answered.record(&request(&format!("m-{i}")));
        }
        assert_eq!(answered.len(), 3);
        assert!(!answered.take(&request("m-0")));
        assert!(!answered.take(&request("m-1")));
        assert!(answered.take(&request("m-2")));
        assert!(answered.take(&request("m-4")));
    }

    #[test]
    fn answers_are_forgotten_after_the_retention() {
        let answered = Answered::with_retention(100, Duration::from_secs(60));
        let t0 = Instant::now();
        answered.record_at(&request("old"), t0);
        answered.record_at(&request("new"), t0 + Duration::from_secs(50));
        let later = t0 + Duration::from_secs(61);
        assert!(!answered.take_at(&request("old"), later));
        assert!(answered.take_at(&request("new"), later));
    }

    #[test]
    fn recording_a_key_again_keeps_it_past_its_first_entry() {
        let answered = Answered::with_retention(2, RETENTION);
        answered.record(&request("a"));
        answered.record(&request("b"));
        answered.record(&request("a"));
        // The first entry of "a" is evicted, its second keeps it.
        assert!(answered.take(&request("a")));
        assert!(answered.take(&request("b")));
    }

    #[test]
    fn only_a_broker_internal_error_on_a_direct_reply_to_reply_is_undeliverable() {
        use lapin::protocol::{AMQPError, AMQPSoftError};
        let internal = lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Hard(AMQPHardError::INTERNALERROR),
            "INTERNAL_ERROR".into(),
        )));
        let refused = lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED),
            "PRECONDITION_FAILED".into(),
        )));
        let reset = lapin::Error::from(ErrorKind::IOError(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        ))));
        let direct = "amq.rabbitmq.reply-to.g1h2AA9yZXBseUAxMzI4OTIyNjAAAAY+AAAAAGsRaBA=.RiZlVc8c0V7x/CAKYMztDQ==";
        assert!(reply_undeliverable(direct, &internal));
        assert!(!reply_undeliverable("amq.gen-JzTY20BRgKO", &internal), "a reply queue outlives its caller's node");
        assert!(!reply_undeliverable(direct, &refused));
        assert!(!reply_undeliverable(direct, &reset));
    }

    #[test]
    fn memory_is_bounded_under_a_stream_of_answers() {
        let answered = Answered::new(0);
        for i in 0..10 * MIN_CAPACITY {
            answered.record(&request(&format!("m-{i}")));
        }
        assert_eq!(answered.len(), MIN_CAPACITY);
        assert!(answered.lock().order.len() <= MIN_CAPACITY);
    }
}
