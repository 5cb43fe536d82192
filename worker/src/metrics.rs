//! The worker's Prometheus metrics, and the readiness they imply.

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

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// Everything the worker counts, registered under the `warren_worker_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    handler_duration: HistogramFamily,
    in_flight: Gauge,
    expired: Counter,
    reply_failures: Counter,
    reconnects: Counter,
    consuming: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("warren_worker");
        let requests = Family::<RequestLabels, Counter>::default();
        // 0.5 ms .. ~65 s: built-ins answer in microseconds, HTTP backends in milliseconds to seconds.
        let handler_duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 18)));
        let in_flight = Gauge::default();
        let expired = Counter::default();
        let reply_failures = Counter::default();
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
        registry.register("reconnects", "Broker sessions lost and re-established", reconnects.clone());
        registry.register("consuming", "1 while the worker is connected and consuming its queue", consuming.clone());
        Self { registry, requests, handler_duration, in_flight, expired, reply_failures, reconnects, consuming }
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

    /// Ready = connected and consuming.
    pub fn is_consuming(&self) -> bool {
        self.consuming.get() == 1
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
        assert!(metrics.is_consuming());
        drop(guard);
        assert!(metrics.encode().contains("warren_worker_requests_in_flight 0"));
    }
}
