//! `warren-autoscale simulate`: warren's autoscaler against KEDA + HPA (QueueLength and ExpectedQueueConsumptionTime)
//! and Knative's KPA on the same load traces, in a queue model
//! (docs/autoscaling.md, "Simulation").
//!
//! All policies see the same requests (same arrival times, same service times), the same pod start delay, the
//! same bounds and the same knowledge of one pod's throughput; warren runs the operator's own [`Autoscaler`].

pub mod keda;
pub mod keda_eqct;
pub mod kpa;
pub mod model;
pub mod trace;

use std::fmt::Write as _;

use serde::Serialize;

pub use keda::KedaHpa;
pub use keda_eqct::KedaEqct;
pub use kpa::Kpa;
pub use model::{Cluster, ScalingPolicy, TimelinePoint};
pub use trace::{ServiceTime, TRACE_NAMES, Trace};

use warren_autoscale::{
    Autoscaler, DEFAULT_SCALE_DOWN_DELAY_SECONDS, DEFAULT_TARGET_QUEUE_DELAY_SECONDS, DEFAULT_TARGET_UTILIZATION,
    PolicySpec, QueueSample, ReplicaCounts,
};

/// The simulated world and the policies' settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    /// Requests one worker runs at once (its prefetch).
    pub prefetch: u32,
    pub service: ServiceTime,
    pub pod_start_delay: f64,
    /// warren's observation period: the operator's management API poll.
    pub poll_interval: f64,
    /// warren's look at the backlog between polls (the operator's passive `queue.declare`); 0: none.
    pub probe_interval: f64,
    /// targetQueueDelaySeconds, also the wait `over_target_fraction` counts against.
    pub target_queue_delay: f64,
    pub scale_down_delay: i32,
    pub target_utilization: f64,
    /// Give warren the true per-replica throughput as `perReplicaThroughputHint` (KEDA always gets it).
    pub warren_hint: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            prefetch: 4,
            service: ServiceTime { mean_seconds: 0.2, sigma: 0.5 },
            pod_start_delay: 10.0,
            poll_interval: 5.0,
            probe_interval: 1.0,
            target_queue_delay: DEFAULT_TARGET_QUEUE_DELAY_SECONDS,
            scale_down_delay: DEFAULT_SCALE_DOWN_DELAY_SECONDS,
            target_utilization: DEFAULT_TARGET_UTILIZATION,
            warren_hint: true,
        }
    }
}

impl SimConfig {
    /// μ: requests per second one worker completes when busy.
    pub fn per_replica_throughput(&self) -> f64 {
        self.prefetch as f64 / self.service.mean_seconds
    }

    fn cluster(&self) -> Cluster {
        Cluster {
            prefetch: self.prefetch,
            pod_start_delay: self.pod_start_delay,
            target_queue_delay: self.target_queue_delay,
        }
    }

    /// warren's spec for a trace, as an RpcService would state it.
    pub fn warren_spec(&self, trace: &Trace) -> PolicySpec {
        PolicySpec {
            min_replicas: trace.min_replicas,
            max_replicas: trace.max_replicas,
            target_queue_delay_seconds: self.target_queue_delay,
            scale_down_delay_seconds: self.scale_down_delay as f64,
            target_utilization: self.target_utilization,
            per_replica_throughput_hint: self.warren_hint.then(|| self.per_replica_throughput()),
            prefetch: self.prefetch,
            ..PolicySpec::default()
        }
        .sanitized()
    }

    /// The pool every policy starts with: what the trace's first rate needs at the target utilisation.
    fn initial_replicas(&self, trace: &Trace) -> i32 {
        let need = trace.rate_at(0.0) / (self.per_replica_throughput() * self.target_utilization);
        (need.ceil() as i32).clamp(trace.min_replicas, trace.max_replicas)
    }

    /// Where in their periods the policies' clocks start, drawn from the seed so no trace edge lines up with a tick.
    fn phase(&self, salt: u64) -> f64 {
        let x = (self.seed ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The operator's autoscaler, polled like the operator polls the management API, and probed in between like
/// the operator reads the backlog with a passive `queue.declare`.
pub struct WarrenPolicy {
    scaler: Autoscaler,
    spec: PolicySpec,
    poll_interval: f64,
    probe_interval: f64,
    next_poll: f64,
    next_probe: f64,
}

impl WarrenPolicy {
    /// `probe_interval` 0: polls only.
    pub fn new(spec: PolicySpec, poll_interval: f64, probe_interval: f64, first_poll: f64) -> Self {
        let next_probe = if probe_interval > 0.0 { first_poll + probe_interval } else { f64::INFINITY };
        Self { scaler: Autoscaler::new(None), spec, poll_interval, probe_interval, next_poll: first_poll, next_probe }
    }
}

impl ScalingPolicy for WarrenPolicy {
    fn next_tick(&self) -> f64 {
        self.next_poll.min(self.next_probe)
    }

    fn tick(&mut self, now: f64, sample: QueueSample, replicas: ReplicaCounts) -> Option<i32> {
        // A probe due within the clock's microsecond of the poll gives way to it (else the poll would never move).
        if self.next_probe < self.next_poll - 1e-6 {
            self.next_probe += self.probe_interval;
            return self.scaler.probe(sample.ready, sample.consumers, replicas, &self.spec, now).map(|d| d.desired);
        }
        self.next_poll += self.poll_interval;
        if self.probe_interval > 0.0 {
            // The probe's cadence restarts after each poll, so no probe lands just before or on a poll.
            self.next_probe = now + self.probe_interval;
        }
        let observation = self.scaler.observe(Some(sample), now);
        Some(self.scaler.decide(&observation, replicas, &self.spec, now).desired)
    }
}

/// The policies compared.
pub const POLICIES: [&str; 4] = ["warren", "keda", "keda-eqct", "kpa"];

/// The baselines warren is compared with, and the over-target ratio the goal allows against each.
pub const BASELINES: [(&str, f64); 3] = [
    ("keda", GOAL_OVER_TARGET_RATIO),
    ("keda-eqct", GOAL_OVER_TARGET_RATIO_EQCT_KPA),
    ("kpa", GOAL_OVER_TARGET_RATIO_EQCT_KPA),
];

/// One (trace, policy) result: exactly what `--json` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunResult {
    pub trace: String,
    pub policy: String,
    pub requests: u64,
    pub over_target_fraction: f64,
    pub p99_wait_seconds: f64,
    pub replica_seconds: f64,
    pub scale_events: u64,
}

/// A policy's run of a trace, point by point.
#[derive(Clone, Debug, Serialize)]
pub struct Timeline {
    pub policy: String,
    pub points: Vec<TimelinePoint>,
}

fn policy_for(name: &str, config: &SimConfig, trace: &Trace) -> Box<dyn ScalingPolicy> {
    match name {
        "warren" => Box::new(WarrenPolicy::new(
            config.warren_spec(trace),
            config.poll_interval,
            config.probe_interval,
            config.phase(1) * config.poll_interval,
        )),
        "keda" => Box::new(KedaHpa::new(
            config.target_queue_delay * config.per_replica_throughput(),
            trace.min_replicas,
            trace.max_replicas,
            config.phase(2),
        )),
        "keda-eqct" => {
            Box::new(KedaEqct::new(config.target_queue_delay, trace.min_replicas, trace.max_replicas, config.phase(3)))
        }
        "kpa" => Box::new(Kpa::new(
            config.prefetch as f64 * config.target_utilization,
            trace.min_replicas,
            trace.max_replicas,
            config.phase(4),
        )),
        other => panic!("unknown policy {other}"),
    }
}

/// Runs every policy on one trace; with `timeline_step`, also returns their timelines.
pub fn run_trace(config: &SimConfig, trace: &Trace, timeline_step: Option<f64>) -> (Vec<RunResult>, Vec<Timeline>) {
    let requests = trace.requests(&config.service, config.seed);
    let mut results = Vec::new();
    let mut timelines = Vec::new();
    for name in POLICIES {
        let mut policy = policy_for(name, config, trace);
        let mut points = Vec::new();
        let timeline = timeline_step.map(|step| (&mut points, step));
        let o =
            model::run(trace, &requests, config.cluster(), config.initial_replicas(trace), policy.as_mut(), timeline);
        results.push(RunResult {
            trace: trace.name.to_owned(),
            policy: name.to_owned(),
            requests: o.requests,
            over_target_fraction: o.over_target_fraction,
            p99_wait_seconds: o.p99_wait_seconds,
            replica_seconds: o.replica_seconds,
            scale_events: o.scale_events,
        });
        if timeline_step.is_some() {
            timelines.push(Timeline { policy: name.to_owned(), points });
        }
    }
    (results, timelines)
}

/// Runs every policy on the named traces (all when empty).
pub fn run_traces(config: &SimConfig, names: &[&str]) -> Result<Vec<RunResult>, UnknownTrace> {
    let names: Vec<&str> = if names.is_empty() { TRACE_NAMES.to_vec() } else { names.to_vec() };
    let mut results = Vec::new();
    for name in names {
        let trace = Trace::named(name, config.seed).ok_or_else(|| UnknownTrace(name.to_owned()))?;
        results.extend(run_trace(config, &trace, None).0);
    }
    Ok(results)
}

#[derive(Debug, thiserror::Error)]
#[error("unknown trace {0:?}; the traces are {names}", names = TRACE_NAMES.join(", "))]
pub struct UnknownTrace(pub String);

/// The goal per trace: warren's over-target share at most this share of KEDA QueueLength's (and
/// [`BASELINES`] gives it for each baseline)...
pub const GOAL_OVER_TARGET_RATIO: f64 = 0.2;
/// ...and of KEDA ExpectedQueueConsumptionTime's and Knative KPA's...
pub const GOAL_OVER_TARGET_RATIO_EQCT_KPA: f64 = 0.5;
/// ...at most this share of the baseline's replica-seconds.
pub const GOAL_REPLICA_SECONDS_RATIO: f64 = 1.1;

/// warren against one baseline on one trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub trace: String,
    pub baseline: String,
    pub over_target_ratio: f64,
    pub replica_seconds_ratio: f64,
    /// The over-target ratio the goal allows against this baseline.
    pub goal_over_target_ratio: f64,
}

impl Comparison {
    pub fn meets_goal(&self) -> bool {
        self.over_target_ratio <= self.goal_over_target_ratio
            && self.replica_seconds_ratio <= GOAL_REPLICA_SECONDS_RATIO
    }
}

/// warren/baseline ratios per trace and baseline. A trace on which neither misses the target has an over-target
/// ratio of 0.
pub fn compare(results: &[RunResult]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for w in results.iter().filter(|r| r.policy == "warren") {
        for (baseline, goal) in BASELINES {
            let Some(k) = results.iter().find(|r| r.policy == baseline && r.trace == w.trace) else { continue };
            let over_target_ratio = match (w.over_target_fraction, k.over_target_fraction) {
                (0.0, _) => 0.0,
                (_, 0.0) => f64::INFINITY,
                (a, b) => a / b,
            };
            out.push(Comparison {
                trace: w.trace.clone(),
                baseline: baseline.to_owned(),
                over_target_ratio,
                replica_seconds_ratio: w.replica_seconds / k.replica_seconds,
                goal_over_target_ratio: goal,
            });
        }
    }
    out
}

/// The results as a table, with warren/KEDA ratios and whether the goal is met.
pub fn table(results: &[RunResult], config: &SimConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<9} {:>8} {:>12} {:>9} {:>12} {:>7}",
        "trace", "policy", "requests", "over_target", "p99_wait", "replica_s", "scales"
    );
    for r in results {
        let _ = writeln!(
            s,
            "{:<8} {:<9} {:>8} {:>11.2}% {:>8.2}s {:>12.0} {:>7}",
            r.trace,
            r.policy,
            r.requests,
            r.over_target_fraction * 100.0,
            r.p99_wait_seconds,
            r.replica_seconds,
            r.scale_events
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "warren/baseline: over-target share (goal ≤ 0.2 × keda's, ≤ 0.5 × keda-eqct's and kpa's), \
         replica-seconds (goal ≤ {GOAL_REPLICA_SECONDS_RATIO})"
    );
    for c in compare(results) {
        let _ = writeln!(
            s,
            "{:<8} {:<9} {:>6.3} {:>6.3}  {}",
            c.trace,
            c.baseline,
            c.over_target_ratio,
            c.replica_seconds_ratio,
            if c.meets_goal() { "goal met" } else { "goal missed" }
        );
    }
    let _ = writeln!(
        s,
        "\nseed {}, μ {:.1} req/s per replica (prefetch {}, service {:.0} ms mean, lognormal σ {}), pod start {} s, \
         poll {} s, probe {} s, T {} s, scale-down delay {} s, u {}, warren hint {}",
        config.seed,
        config.per_replica_throughput(),
        config.prefetch,
        config.service.mean_seconds * 1000.0,
        config.service.sigma,
        config.pod_start_delay,
        config.poll_interval,
        config.probe_interval,
        config.target_queue_delay,
        config.scale_down_delay,
        config.target_utilization,
        if config.warren_hint { "on" } else { "off" }
    );
    s
}

/// `warren-autoscale simulate`.
#[derive(clap::Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Run only this trace (step, ramp, burst, diurnal, noisy, sparse, flash); all when omitted.
    #[arg(long)]
    pub trace: Option<String>,
    /// Print a JSON list of {trace, policy, requests, over_target_fraction, p99_wait_seconds, replica_seconds,
    /// scale_events} instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Print the trace's run second by second as JSON (every policy), for plots; needs --trace.
    #[arg(long, requires = "trace")]
    pub timeline_json: bool,
    /// Seed of the arrivals, service times and policy clock phases.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Don't tell warren one worker's throughput: it starts from the prior and measures it.
    #[arg(long)]
    pub no_hint: bool,
    /// Seconds from a pod's creation to its first request.
    #[arg(long, default_value_t = 10.0)]
    pub pod_start_delay: f64,
    /// Seconds between warren's polls of the queue.
    #[arg(long, default_value_t = 5.0)]
    pub poll_interval: f64,
    /// Seconds between warren's passive `queue.declare` probes of the backlog between polls; 0: none.
    #[arg(long, default_value_t = 1.0)]
    pub probe_interval: f64,
}

/// Runs the command and returns what it prints.
pub fn execute(args: &SimulateArgs) -> anyhow::Result<String> {
    anyhow::ensure!(args.pod_start_delay >= 0.0, "--pod-start-delay must not be negative");
    anyhow::ensure!(args.poll_interval > 0.0, "--poll-interval must be positive");
    anyhow::ensure!(args.probe_interval >= 0.0, "--probe-interval must not be negative");
    let config = SimConfig {
        seed: args.seed,
        warren_hint: !args.no_hint,
        pod_start_delay: args.pod_start_delay,
        poll_interval: args.poll_interval,
        probe_interval: args.probe_interval,
        ..SimConfig::default()
    };
    if args.timeline_json {
        let name = args.trace.as_deref().expect("clap requires --trace");
        let trace = Trace::named(name, config.seed).ok_or_else(|| UnknownTrace(name.to_owned()))?;
        let (results, series) = run_trace(&config, &trace, Some(1.0));
        let doc = serde_json::json!({
            "trace": trace.name,
            "description": trace.description,
            "target_queue_delay_seconds": config.target_queue_delay,
            "results": results,
            "series": series,
        });
        return Ok(serde_json::to_string(&doc)? + "\n");
    }
    let names: Vec<&str> = args.trace.as_deref().into_iter().collect();
    let results = run_traces(&config, &names)?;
    if args.json { Ok(serde_json::to_string_pretty(&results)? + "\n") } else { Ok(table(&results, &config)) }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// Every trace, every policy, the default world, seed 1: computed once for all tests.
    fn results() -> &'static [RunResult] {
        static RESULTS: OnceLock<Vec<RunResult>> = OnceLock::new();
        RESULTS.get_or_init(|| run_traces(&SimConfig::default(), &[]).expect("all traces exist"))
    }

    fn comparison(trace: &str) -> Comparison {
        compare(results()).into_iter().find(|c| c.trace == trace && c.baseline == "keda").expect("trace was run")
    }

    #[test]
    fn warren_meets_the_goal_on_step_ramp_diurnal_and_noisy() {
        for trace in ["step", "ramp", "diurnal", "noisy"] {
            let c = comparison(trace);
            assert!(c.meets_goal(), "{c:?}\n{}", table(results(), &SimConfig::default()));
        }
    }

    #[test]
    fn short_bursts_and_cold_starts_are_bounded_by_the_pod_start_delay() {
        // Not the goal: any reactive policy leaves ~(poll / 2 + pod start - T) s of each 60 s burst over T
        // (docs/autoscaling.md). What warren achieves there: well under half KEDA's share at half its cost.
        for trace in ["burst", "sparse"] {
            let c = comparison(trace);
            assert!(c.over_target_ratio <= 0.45 && c.replica_seconds_ratio <= 0.5, "{c:?}");
        }
    }

    #[test]
    fn warren_without_a_hint_measures_throughput_and_keeps_queueing_short() {
        let config = SimConfig { warren_hint: false, ..SimConfig::default() };
        let results = run_traces(&config, &["step"]).unwrap();
        let c = compare(&results).into_iter().find(|c| c.baseline == "keda").unwrap();
        assert!(c.over_target_ratio <= GOAL_OVER_TARGET_RATIO, "{c:?}");
    }

    #[test]
    fn runs_are_reproducible_from_the_seed() {
        let trace = Trace::named("noisy", 7).unwrap();
        let config = SimConfig { seed: 7, ..SimConfig::default() };
        assert_eq!(run_trace(&config, &trace, None).0, run_trace(&config, &trace, None).0);
        let other = SimConfig { seed: 8, ..SimConfig::default() };
        assert_ne!(run_trace(&config, &trace, None).0, run_trace(&other, &trace, None).0);
    }

    #[test]
    fn json_rows_have_exactly_the_documented_keys() {
        let row = serde_json::to_value(&results()[0]).unwrap();
        let mut keys: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let expected = [
            "over_target_fraction",
            "p99_wait_seconds",
            "policy",
            "replica_seconds",
            "requests",
            "scale_events",
            "trace",
        ];
        assert_eq!(keys, expected);
        assert_eq!(results().len(), POLICIES.len() * TRACE_NAMES.len());
    }

    #[test]
    fn unknown_traces_are_refused_with_the_list() {
        let err = run_traces(&SimConfig::default(), &["square"]).unwrap_err();
        assert!(err.to_string().contains("step, ramp, burst"), "{err}");
    }
}
