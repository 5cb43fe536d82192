//! The worker's Prometheus metrics, and the readiness they imply.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// `ok` or the error code of the reply.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// The `method` label of requests for methods nobody serves.
pub const UNKNOWN_METHOD_LABEL: &str = "_unknown";
/// The `method` label of forwarded methods past the cap (see [`Metrics::forwarded_method_label`]).
pub const OTHER_METHOD_LABEL: &str = "_other";
/// Distinct forwarded method names that get a label of their own, by default.
pub const DEFAULT_MAX_METHOD_LABELS: usize = 50;
/// Longer method names are counted under [`OTHER_METHOD_LABEL`].
const MAX_METHOD_LABEL_LEN: usize = 100;

/// Everything the worker counts, registered under the `warren_worker_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    handler_duration: HistogramFamily,
    in_flight: Gauge,
    expired: Counter,
    reply_failures: Counter,
    reply_confirms_late: Counter,
    reconnects: Counter,
    consuming: Gauge,
    requeued: Family<ReasonLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    replies_too_large: Counter,
    run_alone: Counter,
    redeliveries_answered: Counter,
    replies_undeliverable: Counter,
    handler_available: Gauge,
    publisher_blocked: Gauge,
    /// Forwarded method names that have a label of their own, at most `max_method_labels`.
    method_labels: Mutex<HashSet<String>>,
    max_method_labels: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::with_max_method_labels(DEFAULT_MAX_METHOD_LABELS)
    }

    /// Metrics in which at most `max` distinct forwarded method names get a `method` label of their own.
    pub fn with_max_method_labels(max: usize) -> Self {
        let mut registry = Registry::with_prefix("warren_worker");
        let requests = Family::<RequestLabels, Counter>::default();
        // 0.5 ms .. ~65 s: built-ins answer in microseconds, HTTP backends in milliseconds to seconds.
        let handler_duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 18)));
        let in_flight = Gauge::default();
        let expired = Counter::default();
        let reply_failures = Counter::default();
        let reply_confirms_late = Counter::default();
        let reconnects = Counter::default();
        let consuming = Gauge::default();
        registry.register("requests", "Requests handled, by method and outcome (ok or error code)", requests.clone());
        registry.register_with_unit(
            "handler_duration",
            "Time spent in the handler, by method",
            Unit::Seconds,
            handler_duration.clone(),
        );
        registry.register("requests_in_flight", "Requests received and not yet acked", in_flight.clone());
        registry.register("requests_expired", "Requests skipped because their x-deadline had passed", expired.clone());
        registry.register(
            "reply_failures",
            "Replies that could not be published (the request is redelivered)",
            reply_failures.clone(),
        );
        registry.register(
            "reply_confirms_late",
            "Replies whose publisher confirm took longer than 10 s; still waited for (up to 5 minutes while the broker \
             does not block the reply connection), since re-running the request could answer it twice",
            reply_confirms_late.clone(),
        );
        registry.register("reconnects", "Broker sessions lost and re-established", reconnects.clone());
        registry.register("consuming", "1 while the worker is connected and consuming its queue", consuming.clone());
        let requeued = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "requests_requeued",
            "Requests given back to the queue unanswered, by reason (handler_unavailable, reply_failed)",
            requeued.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "requests_refused",
            "Requests acked without running or replying, by reason (reply_to: not a reply address)",
            refused.clone(),
        );
        let replies_too_large = Counter::default();
        registry.register(
            "replies_too_large",
            "Replies over the size limit (the worker's or the broker's), answered with a small internal error instead",
            replies_too_large.clone(),
        );
        let run_alone = Counter::default();
        registry.register(
            "requests_run_alone",
            "Redelivered requests run with nothing else in flight (one of them may be what killed a worker)",
            run_alone.clone(),
        );
        let redeliveries_answered = Counter::default();
        registry.register(
            "redeliveries_answered",
            "Redelivered requests this worker had already answered (reply confirmed, ack lost with its session): \
             acked without running the handler again",
            redeliveries_answered.clone(),
        );
        let replies_undeliverable = Counter::default();
        registry.register(
            "replies_undeliverable",
            "Replies the broker can never deliver (RabbitMQ 3.10 closes the connection on a reply to a caller whose \
             node is down): the request's redelivery is acked without running again",
            replies_undeliverable.clone(),
        );
        let handler_available = Gauge::default();
        handler_available.set(1);
        registry.register(
            "handler_available",
            "0 while the handler cannot run (e.g. its HTTP backend does not answer) and the worker does not consume",
            handler_available.clone(),
        );
        let publisher_blocked = Gauge::default();
        registry.register(
            "publisher_blocked",
            "1 while the broker blocks the reply connection (memory or disk alarm)",
            publisher_blocked.clone(),
        );
        Self {
            registry,
            requests,
            handler_duration,
            in_flight,
            expired,
            reply_failures,
            reply_confirms_late,
            reconnects,
            consuming,
            requeued,
            refused,
            replies_too_large,
            run_alone,
            redeliveries_answered,
            replies_undeliverable,
            handler_available,
            publisher_blocked,
            method_labels: Mutex::new(HashSet::new()),
            max_method_labels: max,
        }
    }

    /// The `method` label of a method served by the fallback (e.g. forwarded to an HTTP backend), whose names the
    /// callers choose: the first `max` distinct names keep their own label, every later one is `_other`, so
    /// made-up names cannot grow `/metrics` without bound.
    pub fn forwarded_method_label(&self, method: &str) -> String {
        if method.len() > MAX_METHOD_LABEL_LEN {
            return OTHER_METHOD_LABEL.into();
        }
        let mut labels = self.method_labels.lock().unwrap_or_else(|e| e.into_inner());
        if labels.contains(method) {
            return method.into();
        }
        if labels.len() < self.max_method_labels {
            labels.insert(method.into());
            return method.into();
        }
        OTHER_METHOD_LABEL.into()
    }

    pub fn request_requeued(&self, reason: &str) {
        self.requeued.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }

    pub fn request_refused(&self, reason: &str) {
        self.refused.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
    }

    pub fn reply_too_large(&self) {
        self.replies_too_large.inc();
    }

    pub fn request_run_alone(&self) {
        self.run_alone.inc();
    }

    pub fn redelivery_answered(&self) {
        self.redeliveries_answered.inc();
    }

    pub fn reply_undeliverable(&self) {
        self.replies_undeliverable.inc();
    }

    pub fn set_handler_available(&self, available: bool) {
        self.handler_available.set(i64::from(available));
    }

    pub fn is_handler_available(&self) -> bool {
        self.handler_available.get() == 1
    }

    pub fn set_publisher_blocked(&self, blocked: bool) {
        self.publisher_blocked.set(i64::from(blocked));
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    pub fn request_done(&self, method: &str, outcome: &str) {
        self.requests.get_or_create(&RequestLabels { method: method.into(), outcome: outcome.into() }).inc();
    }

    pub fn handler_ran(&self, method: &str, duration: Duration) {
        self.handler_duration.get_or_create(&MethodLabels { method: method.into() }).observe(duration.as_secs_f64());
    }

    pub fn request_expired(&self) {
        self.expired.inc();
    }

    pub fn reply_failed(&self) {
        self.reply_failures.inc();
    }

    pub fn reply_confirm_late(&self) {
        self.reply_confirms_late.inc();
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Counts a request as in flight until the guard drops.
    pub fn in_flight(&self) -> InFlightGuard {
        self.in_flight.inc();
        InFlightGuard(self.in_flight.clone())
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.set(i64::from(consuming));
    }

    pub fn is_consuming(&self) -> bool {
        self.consuming.get() == 1
    }

    /// Ready = connected, consuming, and the handler can run: the worker takes work.
    pub fn is_ready(&self) -> bool {
        self.is_consuming() && self.is_handler_available()
    }
}

/// Decrements the in-flight gauge when dropped, whichever way the request ends.
#[derive(Debug)]
pub struct InFlightGuard(Gauge);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric_under_the_prefix() {
        let metrics = Metrics::new();
        metrics.request_done("add", "ok");
        metrics.handler_ran("add", Duration::from_millis(2));
        metrics.request_expired();
        let guard = metrics.in_flight();
        metrics.set_consuming(true);
        let text = metrics.encode();
        assert!(text.contains(r#"warren_worker_requests_total{method="add",outcome="ok"} 1"#), "{text}");
        assert!(text.contains("warren_worker_handler_duration_seconds_count{method=\"add\"} 1"), "{text}");
        assert!(text.contains("warren_worker_requests_in_flight 1"), "{text}");
        assert!(text.contains("warren_worker_requests_expired_total 1"), "{text}");
        assert!(text.contains("warren_worker_reconnects_total 0"), "{text}");
        assert!(text.contains("warren_worker_reply_confirms_late_total 0"), "{text}");
        assert!(metrics.is_ready());
        metrics.set_handler_available(false);
        assert!(!metrics.is_ready());
        drop(guard);
        assert!(metrics.encode().contains("warren_worker_requests_in_flight 0"));
    }

    #[test]
    fn forwarded_method_labels_are_capped() {
        let metrics = Metrics::with_max_method_labels(2);
        assert_eq!(metrics.forwarded_method_label("a"), "a");
        assert_eq!(metrics.forwarded_method_label("b"), "b");
        assert_eq!(metrics.forwarded_method_label("c"), OTHER_METHOD_LABEL);
        assert_eq!(metrics.forwarded_method_label("a"), "a");
        assert_eq!(metrics.forwarded_method_label(&"x".repeat(101)), OTHER_METHOD_LABEL);
        for i in 0..1000 {
            metrics.request_done(&metrics.forwarded_method_label(&format!("m{i}")), "ok");
        }
        let series = metrics.encode().lines().filter(|l| l.starts_with("warren_worker_requests_total{")).count();
        assert_eq!(series, 1);
    }
}
