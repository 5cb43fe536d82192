//! What `warren bench` reports: throughput, latency percentiles and errors by kind, as text or one JSON object.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::CallError;

/// Latencies in nanoseconds, 1 ns to 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Failed calls by kind; remote errors by their code (`remote:handler_error`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ErrorCounts(BTreeMap<String, u64>);

impl ErrorCounts {
    pub fn count(&mut self, error: &CallError) {
        let label = match error {
            CallError::Remote { code, .. } => format!("remote:{code}"),
            other => other.kind().as_str().to_owned(),
        };
        *self.0.entry(label).or_default() += 1;
    }

    pub fn merge(&mut self, other: &ErrorCounts) {
        for (label, n) in &other.0 {
            *self.0.entry(label.clone()).or_default() += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, label: &str) -> u64 {
        self.0.get(label).copied().unwrap_or(0)
    }
}

/// Latency percentiles of the successful calls, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencySummary {
    pub fn from_nanos(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| round1(ns as f64 / 1_000.0);
        Self {
            p50: us(histogram.value_at_quantile(0.50)),
            p90: us(histogram.value_at_quantile(0.90)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
            mean: round1(histogram.mean() / 1_000.0),
        }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// One bench run's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    pub queue: String,
    /// `null` = the service's default method.
    pub method: Option<String>,
    pub concurrency: usize,
    /// Target calls per second (open loop); `null` = closed loop.
    pub rate: Option<f64>,
    /// The measured window, from its start to the last measured call's end.
    pub elapsed_s: f64,
    pub calls: u64,
    pub ok: u64,
    pub errors: ErrorCounts,
    /// Completed calls (ok or not) per second of the measured window.
    pub calls_per_sec: f64,
    pub latency_us: LatencySummary,
    /// CPU time of the whole bench process (all threads, lapin's I/O thread included) per call, in µs: what the
    /// client costs, steadier than throughput on a busy machine. `null` where it cannot be read.
    pub client_cpu_us_per_call: Option<f64>,
}

impl BenchReport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queue: String,
        method: Option<String>,
        concurrency: usize,
        rate: Option<f64>,
        elapsed: Duration,
        ok: u64,
        errors: ErrorCounts,
        latency_ns: &Histogram<u64>,
    ) -> Self {
        let calls = ok + errors.total();
        let elapsed_s = elapsed.as_secs_f64();
        Self {
            queue,
            method,
            concurrency,
            rate,
            elapsed_s: (elapsed_s * 1000.0).round() / 1000.0,
            calls,
            ok,
            errors,
            calls_per_sec: round1(calls as f64 / elapsed_s),
            latency_us: LatencySummary::from_nanos(latency_ns),
            client_cpu_us_per_call: None,
        }
    }

    /// Records the process CPU time spent in the measured window.
    pub fn set_client_cpu(&mut self, cpu: Option<Duration>) {
        self.client_cpu_us_per_call =
            cpu.filter(|_| self.calls > 0).map(|cpu| round1(cpu.as_secs_f64() * 1e6 / self.calls as f64));
    }
}

/// A duration given in µs, as a person reads it: milliseconds, with as many decimals as the size needs (the JSON
/// report keeps the µs).
fn human_ms(us: f64) -> String {
    let ms = us / 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = self.method.as_deref().unwrap_or("(default)");
        write!(f, "queue {}  method {method}  concurrency {}", self.queue, self.concurrency)?;
        if let Some(rate) = self.rate {
            write!(f, "  rate {rate}/s")?;
        }
        writeln!(f, "  measured {:.1}s", self.elapsed_s)?;
        writeln!(
            f,
            "calls {} (ok {}, errors {})  {:.1} calls/s",
            self.calls,
            self.ok,
            self.errors.total(),
            self.calls_per_sec
        )?;
        let l = &self.latency_us;
        let ms = human_ms;
        writeln!(
            f,
            "latency  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            ms(l.mean)
        )?;
        if let Some(cpu) = self.client_cpu_us_per_call {
            writeln!(f, "client CPU  {} per call", ms(cpu))?;
        }
        if self.errors.total() > 0 {
            let by_kind: Vec<String> = self.errors.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
            writeln!(f, "errors  {}", by_kind.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_reported_in_microseconds() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1_000).unwrap();
        }
        let s = LatencySummary::from_nanos(&h);
        assert!((s.p50 - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p90 - 900.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99 - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max - 1000.0).abs() <= 1.0, "{s:?}");
        assert!((s.mean - 500.5).abs() <= 1.0, "{s:?}");
    }

    #[test]
    fn people_read_milliseconds() {
        assert_eq!(human_ms(201_345.6), "201 ms");
        assert_eq!(human_ms(12_345.6), "12.3 ms");
        assert_eq!(human_ms(412.7), "0.41 ms");
    }

    #[test]
    fn an_empty_run_reports_zero_latency() {
        assert_eq!(LatencySummary::from_nanos(&new_histogram()), LatencySummary::default());
    }

    #[test]
    fn errors_are_counted_by_kind_and_remote_code() {
        let mut a = ErrorCounts::default();
        a.count(&CallError::Timeout);
        a.count(&CallError::Remote { code: "handler_error".into(), message: "x".into(), details: None });
        let mut b = ErrorCounts::default();
        b.count(&CallError::Timeout);
        b.count(&CallError::NoSuchService { queue: "q".into() });
        a.merge(&b);
        assert_eq!(a.get("timeout"), 2);
        assert_eq!(a.get("remote:handler_error"), 1);
        assert_eq!(a.get("no_such_service"), 1);
        assert_eq!(a.total(), 4);
    }

    #[test]
    fn the_report_counts_every_call_and_serialises_as_one_object() {
        let mut h = new_histogram();
        h.record(100_000).unwrap();
        h.record(300_000).unwrap();
        let mut errors = ErrorCounts::default();
        errors.count(&CallError::Timeout);
        let report = BenchReport::new("q".into(), None, 4, None, Duration::from_secs(2), 2, errors, &h);
        assert_eq!(report.calls, 3);
        assert_eq!(report.calls_per_sec, 1.5);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["errors"]["timeout"], 1);
        assert_eq!(json["method"], serde_json::Value::Null);
        assert!(json["latency_us"]["p99"].as_f64().unwrap() >= 299.0);
        assert!(report.to_string().contains("errors  timeout 1"));
        let mut report = report;
        report.set_client_cpu(Some(Duration::from_millis(3)));
        assert_eq!(report.client_cpu_us_per_call, Some(1000.0));
    }
}
