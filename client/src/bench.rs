//! The load driver behind `warren bench`: N concurrent callers, closed-loop or paced at a fixed rate, bounded by
//! time. The report it produces is in [`crate::bench_report`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::time::Instant;

use crate::bench_report::{BenchReport, ErrorCounts, new_histogram};
use crate::client::{CallOptions, Client};
use crate::error::CallError;

/// A late start beyond this (tokio's timer resolution) means the paced driver fell behind its schedule.
const TIMER_SLACK: Duration = Duration::from_millis(1);

/// What to drive.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    pub queue: String,
    /// `None` = the service's default method.
    pub method: Option<String>,
    pub params: Value,
    /// Calls in flight at most.
    pub concurrency: usize,
    /// How long calls are measured.
    pub duration: Duration,
    /// Calls before the measured window, not recorded.
    pub warmup: Duration,
    /// Calls per second in total (open loop); `None` = each caller sends its next call as soon as the last returns.
    pub rate: Option<f64>,
    pub timeout: Duration,
}

/// One caller's tallies, merged into the report at the end.
struct Tally {
    latency_ns: Histogram<u64>,
    errors: ErrorCounts,
    ok: u64,
    last_done: Option<Instant>,
}

/// Runs the load and measures it. Takes `warmup + duration`, plus at most one call timeout for the calls in flight.
pub async fn run(client: &Client, spec: &BenchSpec) -> BenchReport {
    let spec = Arc::new(spec.clone());
    let start = Instant::now();
    let measured_from = start + spec.warmup;
    let end = measured_from + spec.duration;
    let next_slot = Arc::new(AtomicU64::new(0));
    let cpu_at_start = tokio::spawn(async move {
        tokio::time::sleep_until(measured_from).await;
        process_cpu_time()
    });
    let callers: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| {
            let (client, spec, next_slot) = (client.clone(), spec.clone(), next_slot.clone());
            tokio::spawn(async move { caller(client, spec, start, measured_from, end, next_slot).await })
        })
        .collect();

    let mut latency_ns = new_histogram();
    let mut errors = ErrorCounts::default();
    let mut ok = 0;
    let mut last_done = measured_from;
    for caller in callers {
        // A caller only fails by panicking; its tallies are lost, the others still count.
        let Ok(tally) = caller.await else { continue };
        latency_ns.add(&tally.latency_ns).expect("histograms share their bounds");
        errors.merge(&tally.errors);
        ok += tally.ok;
        last_done = last_done.max(tally.last_done.unwrap_or(measured_from));
    }
    let elapsed = last_done.saturating_duration_since(measured_from).max(Duration::from_micros(1));
    let cpu = match (cpu_at_start.await.ok().flatten(), process_cpu_time()) {
        (Some(start), Some(end)) => end.checked_sub(start),
        _ => None,
    };
    let mut report = BenchReport::new(
        spec.queue.clone(),
        spec.method.clone(),
        spec.concurrency,
        spec.rate,
        elapsed,
        ok,
        errors,
        &latency_ns,
    );
    report.set_client_cpu(cpu);
    report
}

/// CPU time this process has used (user + system, all threads), from /proc on Linux; `None` elsewhere.
pub fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: the unit of these fields is 1/100 s on every Linux architecture warren runs on.
    Some(Duration::from_millis(ticks * 10))
}

async fn caller(
    client: Client,
    spec: Arc<BenchSpec>,
    start: Instant,
    measured_from: Instant,
    end: Instant,
    next_slot: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally { latency_ns: new_histogram(), errors: ErrorCounts::default(), ok: 0, last_done: None };
    let options = CallOptions::timeout(spec.timeout);
    loop {
        // With a rate, calls are slotted on a fixed schedule shared by all callers.
        let scheduled = match spec.rate {
            Some(rate) => {
                let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                let at = start + Duration::from_secs_f64(slot as f64 / rate);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                Some(at)
            }
            None => None,
        };
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let result = client.call_with(&spec.queue, spec.method.as_deref(), &spec.params, &options).await;
        let done = Instant::now();
        // A call that started late because every caller was busy counts its wait (no coordinated omission).
        let from = match scheduled {
            Some(at) if sent.saturating_duration_since(at) > TIMER_SLACK => at,
            _ => sent,
        };
        if let Err(CallError::Connection(_)) = &result {
            // Don't spin on a dead broker: reconnects are attempted at most once per interval anyway.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if from < measured_from {
            continue;
        }
        tally.last_done = Some(done);
        match result {
            Ok(_) => {
                tally.ok += 1;
                let ns = done.saturating_duration_since(from).as_nanos() as u64;
                tally.latency_ns.saturating_record(ns.max(1));
            }
            Err(error) => tally.errors.count(&error),
        }
    }
    tally
}
