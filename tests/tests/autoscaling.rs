//! The autoscaler's closed loop on real parts: the real operator (polling the management API every second), the
//! real broker, real `warren-worker` processes run by [`LocalRuntime`] one per replica the operator asks for (with
//! a pod start delay), and a step load from the real `warren bench`. The test asserts behaviour — the pool grows
//! to what the rate needs, the backlog drains, the pool shrinks back after the scale-down delay, every call is
//! answered and nothing is lost on scale-in — and prints the figures (reaction time in observation
//! periods, the replica timeline) that docs/autoscaling.md quotes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use kube::Client;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use warren_operator::RpcService;
use warren_operator::crd::RpcServiceStatus;
use warren_tests::broker;
use warren_tests::cluster::{self, TestNamespace, wait_for};
use warren_tests::local_runtime::{LocalRuntime, ReplicaChange, RuntimeOptions};
use warren_tests::operator_process::OperatorProcess;

const WAIT: Duration = Duration::from_secs(180);
/// The operator's poll interval in tests (`OperatorProcess` passes `--poll-interval 1s`): one observation period.
const POLL: Duration = Duration::from_secs(1);

// The service: `sleep` 100 ms at prefetch 4, so one worker completes at most 4 / 0.1 s = 40 requests/s.
const SLEEP_MS: u64 = 100;
const PREFETCH: i32 = 4;
const MIN_REPLICAS: i32 = 1;
const MAX_REPLICAS: i32 = 8;
const TARGET_DELAY_S: f64 = 2.0;
const SCALE_DOWN_DELAY_S: i32 = 10;
/// A rough guess, below the real 40/s: the operator measures μ once the workers are saturated.
const THROUGHPUT_HINT: f64 = 30.0;
/// Image pull and container start, as a real cluster would take.
const POD_START_DELAY: Duration = Duration::from_secs(2);

// The step: 3× one worker's capacity, open loop. Concurrency is far above rate × the worst queueing delay, so the
// bench never runs out of callers and the load stays a fixed rate however long the queue gets.
const RATE: f64 = 120.0;
const CALLS: u64 = 3600;
const CONCURRENCY: usize = 1000;
const CALL_TIMEOUT: &str = "60s";

/// At most: the reply and the ack add to the 100 ms, and more so on a busy machine.
fn worker_capacity() -> f64 {
    PREFETCH as f64 * 1000.0 / SLEEP_MS as f64
}

/// The bench schedules call k at k / RATE and stops at the duration: ending half a slot after the last call keeps a
/// timer that fires a little late from dropping it, so [`CALLS`] calls are made unless the bench is starved.
fn load_duration() -> Duration {
    Duration::from_secs_f64((CALLS as f64 - 0.5) / RATE)
}

/// What the test saw every quarter second: the RpcService's status and the queue on the management API.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    status: Option<RpcServiceStatus>,
    queue: Option<Value>,
}

impl Sample {
    fn queue_u64(&self, field: &str) -> Option<u64> {
        self.queue.as_ref()?.get(field)?.as_u64()
    }
}

fn stat(queue: &Value, name: &str) -> u64 {
    queue["message_stats"][name].as_u64().unwrap_or(0)
}

/// `(first seen, value)` each time the queue's `message_stats.<name>` counter changed: the broker publishes new
/// figures every `collect_statistics_interval` (5 s by default), so these are the moments new figures appeared.
fn counter_steps(samples: &[Sample], name: &str) -> Vec<(Instant, u64)> {
    let mut steps: Vec<(Instant, u64)> = Vec::new();
    for s in samples {
        let Some(q) = &s.queue else { continue };
        let value = stat(q, name);
        if steps.last().is_none_or(|(_, v)| *v != value) {
            steps.push((s.at, value));
        }
    }
    steps
}

/// The queueing delay a request arriving at `s` would see (Little's law): the backlog ÷ the rate the consumers
/// drain the queue, i.e. acks/s between the last two figures of the ack counter seen by then.
fn queueing_delay(s: &Sample, acks: &[(Instant, u64)]) -> f64 {
    let backlog = s.queue_u64("messages_ready").unwrap_or(0) as f64;
    if backlog == 0.0 {
        return 0.0;
    }
    let seen: Vec<&(Instant, u64)> = acks.iter().filter(|(at, _)| *at <= s.at).collect();
    match seen.as_slice() {
        [.., a, b] if b.1 > a.1 => backlog / ((b.1 - a.1) as f64 / secs(a.0, b.0)),
        _ => f64::INFINITY,
    }
}

fn secs(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

fn print_timeline(step: Instant, timeline: &[ReplicaChange]) {
    eprintln!("replica timeline (seconds from the step; desired = spec.replicas, pods = starting or running):");
    for c in timeline {
        let t = if c.at >= step { format!("+{:.1}", secs(step, c.at)) } else { format!("-{:.1}", secs(c.at, step)) };
        eprintln!(
            "  {t:>7}s  desired {:>2}  pods {:>2}  ready {:>2}  processes {:>2}",
            c.desired, c.pods, c.ready, c.processes
        );
    }
}

/// The status decisions and broker figures the test saw, one line each time either changed.
fn print_samples(step: Instant, samples: &[Sample]) {
    eprintln!("status.scaling and the queue on the management API (seconds from the step):");
    let mut last = String::new();
    for s in samples {
        let decision = s.status.as_ref().and_then(|st| st.scaling.as_ref()).map_or("-".to_owned(), |d| {
            format!(
                "desired {:>2} {:<14} backlog {:>4} inFlight {:>3} λ {:>6.1} μ {:>5.1}",
                d.desired_replicas, d.reason, d.backlog, d.in_flight, d.arrival_rate, d.per_replica_throughput
            )
        });
        let q = s.queue.as_ref().map_or("-".to_owned(), |q| {
            format!(
                "ready {:>4} unacked {:>3} consumers {} publish {:>4} ack {:>4} redeliver {}",
                q["messages_ready"],
                q["messages_unacknowledged"],
                q["consumers"],
                stat(q, "publish"),
                stat(q, "ack"),
                stat(q, "redeliver")
            )
        });
        let line = format!("{decision} | {q}");
        if line != last {
            let t =
                if s.at >= step { format!("+{:.1}", secs(step, s.at)) } else { format!("-{:.1}", secs(s.at, step)) };
            eprintln!("  {t:>7}s  {line}");
            last = line;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_load_scales_out_drains_the_backlog_and_scales_back_in() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let client = cluster::client().await?;
    cluster::install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "autoscale-step").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let queue = format!("{}.sleepy", ns.name());
    let result = closed_loop(&client, &ns, &queue).await;
    broker::delete_queue("/", &queue).await?;
    broker::delete_queue("/", &format!("{queue}.dead")).await?;
    result?;
    ns.cleanup().await
}

async fn closed_loop(client: &Client, ns: &TestNamespace, queue: &str) -> anyhow::Result<()> {
    let operator = OperatorProcess::start(ns.name(), &[])?;
    let runtime =
        LocalRuntime::start(client.clone(), ns.name(), RuntimeOptions::default().start_delay(POD_START_DELAY))?;
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": "sleepy" },
        "spec": {
            "broker": { "secretRef": { "name": "rabbitmq" } },
            "worker": { "handler": { "builtin": "sleep" }, "prefetch": PREFETCH, "terminationGracePeriodSeconds": 30 },
            "scaling": {
                "minReplicas": MIN_REPLICAS,
                "maxReplicas": MAX_REPLICAS,
                "targetQueueDelaySeconds": TARGET_DELAY_S,
                "scaleDownDelaySeconds": SCALE_DOWN_DELAY_S,
                "perReplicaThroughputHint": THROUGHPUT_HINT,
            },
        },
    }))?;
    let services = ns.api::<RpcService>();
    services.create(&PostParams::default(), &svc).await?;

    // Settled before the step: one ready worker, the operator has seen it, the broker shows its consumer.
    runtime.wait_settled("sleepy", MIN_REPLICAS as usize, WAIT).await?;
    wait_for("WorkersReady and a first scaling decision", WAIT, || async {
        let svc = services.get("sleepy").await?;
        let status = svc.status.unwrap_or_default();
        let workers_ready =
            status.conditions.iter().any(|c| c.type_ == "WorkersReady" && c.reason == "AllReplicasReady");
        let decided = status.scaling.as_ref().is_some_and(|s| s.desired_replicas == MIN_REPLICAS);
        Ok((workers_ready && decided && status.ready_replicas == MIN_REPLICAS).then_some(()))
    })
    .await?;
    wait_for("the worker's consumer on the management API", WAIT, || async {
        Ok(broker::queue("/", queue).await?.filter(|q| q["consumers"].as_u64() == Some(1)).map(|_| ()))
    })
    .await?;

    // Record status and queue figures in the background for the whole run.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let recorder = {
        let (samples, services, queue) = (samples.clone(), services.clone(), queue.to_owned());
        tokio::spawn(async move {
            loop {
                let status = services.get("sleepy").await.ok().and_then(|s| s.status);
                let q = broker::queue("/", &queue).await.ok().flatten();
                samples.lock().unwrap().push(Sample { at: Instant::now(), status, queue: q });
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // The step: 0 → RATE calls/s.
    let step = Instant::now();
    let bench = tokio::process::Command::new(warren_tests::bin_path("warren"))
        .args(["bench", queue, "sleep", &format!("{{\"ms\":{SLEEP_MS}}}")])
        .args(["--concurrency", &CONCURRENCY.to_string(), "--rate", &RATE.to_string()])
        .args(["--duration", &format!("{}ms", load_duration().as_millis()), "--timeout", CALL_TIMEOUT, "--json"])
        .env(warren_client::endpoint::BROKER_URI_ENV, warren_tests::broker_uri())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(load_duration() + Duration::from_secs(120), bench)
        .await
        .context("warren bench did not finish")??;
    let load_end = step + load_duration();
    let done = Instant::now();
    ensure!(output.status.success(), "warren bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).context("bench JSON")?;
    eprintln!("bench: {report}");

    let calls = report["calls"].as_u64().context("calls")?;

    // After the load the pool goes back to minReplicas, and only those processes are left; the queue empties.
    let settled =
        runtime.wait_settled("sleepy", MIN_REPLICAS as usize, Duration::from_secs(120)).await.map(|()| Instant::now());
    let final_queue = wait_for("the queue to be empty with every request acked", WAIT, || async {
        let q = broker::queue("/", queue).await?.context("queue missing")?;
        let drained = q["messages_ready"].as_u64() == Some(0) && q["messages_unacknowledged"].as_u64() == Some(0);
        // Acks are counted on the workers' channels, which stay open. The caller's channel is closed by then, and the
        // management API lost the last few publishes of a closed channel once (3,589 of 3,600, all 3,600 acked): a
        // closed channel's counters go before the next stats collection reads them.
        Ok((drained && stat(&q, "publish") <= calls && stat(&q, "ack") == calls).then_some(q))
    })
    .await;
    recorder.abort();
    let stats = runtime.stop();
    drop(operator);
    let samples = samples.lock().unwrap().clone();
    print_samples(step, &samples);
    print_timeline(step, &stats.timeline_of("sleepy"));
    let settled = settled?;
    let final_queue = final_queue?;

    // Every call made and answered; nothing lost and nothing requeued: each call published once, acked once.
    let errors: u64 = report["errors"].as_object().context("errors")?.values().filter_map(Value::as_u64).sum();
    assert_eq!(errors, 0, "calls failed: {}", report["errors"]);
    assert_eq!(report["ok"].as_u64(), Some(calls), "every call was answered");
    assert_eq!(stat(&final_queue, "ack"), calls, "each call acked once");
    assert!(stat(&final_queue, "publish") <= calls, "no call published twice: {}", final_queue["message_stats"]);
    // `warren bench` drops a slot whose timer fires after the end (a starved bench process does, by a few): the
    // load is the step all the same.
    assert!(calls >= CALLS * 99 / 100, "the bench made {calls} of {CALLS} calls");
    let desired = stats.desired_changes("sleepy");

    // Reaction: the first scale-up the runtime saw after the step, in observation periods.
    let (first_up_at, first_up) =
        *desired.iter().find(|(at, d)| *at >= step && *d > MIN_REPLICAS).context("the pool was never scaled up")?;
    let reaction = secs(step, first_up_at);
    eprintln!(
        "first scale-up ({MIN_REPLICAS} → {first_up}) {reaction:.1} s after the step = {:.1} observation periods of {:?}",
        reaction / POLL.as_secs_f64(),
        POLL
    );

    // The broker's figures move once per stats interval (queue lengths and message counters each on their own
    // phase): how long before the scale-up reached the Deployment the figures it was decided on had appeared, i.e.
    // the operator's own share of the reaction. This test samples every 250 ms, so roughly.
    let figures = |s: &Sample| {
        s.queue.as_ref().map(|q| {
            let n = |f: &str| q[f].as_u64();
            (n("messages_ready"), n("messages_unacknowledged"), n("consumers"), stat(q, "publish"), stat(q, "ack"))
        })
    };
    let mut basis = None;
    // A change seen up to one sample after the Deployment moved may be the one it was decided on.
    for pair in samples.windows(2).filter(|w| w[1].at <= first_up_at + Duration::from_millis(250)) {
        if figures(&pair[1]) != figures(&pair[0]) {
            basis = Some(pair[1].at);
        }
    }
    if let Some(basis) = basis {
        let after = secs(basis, first_up_at); // 0 when both landed in the same sample
        eprintln!(
            "the figures it was decided on appeared at +{:.1}s, {after:.1}s = {:.1} observation periods before",
            secs(step, basis),
            after / POLL.as_secs_f64()
        );
    }

    // Up to what the rate needs, never above the maximum.
    let peak = desired.iter().map(|(_, d)| *d).max().unwrap_or(0);
    let needed = (RATE / worker_capacity()).ceil() as i32;
    eprintln!(
        "peak desired {peak} (the rate alone needs {needed} at full utilisation); most pods {}, most processes {}",
        stats.max_pods, stats.max_processes
    );
    assert!(peak >= needed && peak <= MAX_REPLICAS, "peak {peak} outside {needed}..={MAX_REPLICAS}");
    assert!(stats.max_pods <= MAX_REPLICAS as usize, "{} pods at once", stats.max_pods);
    assert!(stats.max_processes <= MAX_REPLICAS as usize, "{} processes at once", stats.max_processes);

    // The backlog drained: after its peak, the queueing delay (backlog ÷ the rate the consumers drain it, from the
    // ack counter) went under the target while the load still ran, and stayed there to the end of the load.
    let acks = counter_steps(&samples, "ack");
    let during: Vec<&Sample> = samples.iter().filter(|s| s.at >= step && s.at <= load_end).collect();
    let (peak_index, peak_sample) = during
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| s.queue_u64("messages_ready").unwrap_or(0))
        .context("no samples during the load")?;
    let peak_backlog = peak_sample.queue_u64("messages_ready").unwrap_or(0);
    eprintln!(
        "peak backlog {peak_backlog} seen at +{:.1}s: queueing delay {:.1}s",
        secs(step, peak_sample.at),
        queueing_delay(peak_sample, &acks)
    );
    assert!(peak_backlog > 0, "the step never built a backlog: not a test of scaling");
    let drained = during[peak_index..]
        .iter()
        .find(|s| queueing_delay(s, &acks) < TARGET_DELAY_S)
        .context("the backlog never drained")?;
    eprintln!(
        "queueing delay under the {TARGET_DELAY_S}s target again at +{:.1}s: {:.1}s (backlog {}, {} consumers)",
        secs(step, drained.at),
        queueing_delay(drained, &acks),
        drained.queue_u64("messages_ready").unwrap_or(0),
        drained.queue_u64("consumers").unwrap_or(0)
    );
    let last = during.last().context("no samples during the load")?;
    assert!(queueing_delay(last, &acks) < TARGET_DELAY_S, "at the end of the load: {:?}", last.queue);
    let publishes = counter_steps(&samples, "publish");
    let gaps: Vec<f64> = publishes.windows(2).map(|w| secs(w[0].0, w[1].0)).collect();
    eprintln!(
        "the management API's publish counter moved every {:?} s (collect_statistics_interval)",
        gaps.iter().map(|g| (g * 10.0).round() / 10.0).collect::<Vec<_>>()
    );
    let status_ready: Vec<i64> =
        during[peak_index..].iter().filter_map(|s| s.status.as_ref()?.queue.as_ref()?.ready).collect();
    assert!(
        status_ready.iter().min().is_some_and(|m| (*m as u64) < peak_backlog),
        "status.queue.ready never dropped after the peak: {status_ready:?}"
    );

    // The decision, with its inputs, is visible in status.
    let decision = samples
        .iter()
        .filter_map(|s| s.status.as_ref())
        .find(|st| {
            st.scaling.as_ref().is_some_and(|d| {
                d.desired_replicas > MIN_REPLICAS
                    && ["Backlog", "ArrivalRate", "MaxReplicas", "InFlight"].contains(&d.reason.as_str())
                    && (d.backlog > 0 || d.arrival_rate > 0.0)
                    && d.per_replica_throughput > 0.0
            })
        })
        .context("no scale-up decision with its inputs in status.scaling")?;
    let scaling = decision.scaling.as_ref().unwrap();
    eprintln!(
        "status.scaling: desired {} reason {} backlog {} inFlight {} arrivalRate {} perReplicaThroughput {}: {}",
        scaling.desired_replicas,
        scaling.reason,
        scaling.backlog,
        scaling.in_flight,
        scaling.arrival_rate,
        scaling.per_replica_throughput,
        scaling.message
    );
    assert_eq!(decision.desired_replicas, Some(scaling.desired_replicas));
    assert!(decision.last_scale_time.is_some() && decision.last_scale_reason.is_some(), "{decision:?}");
    let condition = decision.conditions.iter().find(|c| c.type_ == "Scaling").context("Scaling condition")?;
    assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("True", scaling.reason.as_str()));
    let measured = samples.iter().rev().find_map(|s| s.status.as_ref()?.per_replica_throughput);
    eprintln!(
        "status.perReplicaThroughput at the end: {measured:?} (hint {THROUGHPUT_HINT}, nominal {} req/s)",
        worker_capacity()
    );

    // Events: every change is announced. kube's Recorder folds events with the same reason and action for the
    // same object into one event with a series count (its note stays the first one's), so count announcements.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(client.clone(), ns.name());
    let scaled: Vec<(String, i32)> = events
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Scaled"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("sleepy"))
        .map(|e| (e.note.unwrap_or_default(), e.series.map_or(1, |s| s.count)))
        .collect();
    eprintln!("Scaled events (note, count): {scaled:#?}");
    let announced: i32 = scaled.iter().map(|(_, n)| n).sum();
    let changes = desired.iter().filter(|(at, _)| *at >= step).count() as i32;
    assert!(scaled.iter().any(|(m, _)| m.starts_with(&format!("{MIN_REPLICAS} → "))), "no scale-up event: {scaled:?}");
    assert!(announced >= changes, "{announced} Scaled announcements for {changes} replica changes: {scaled:?}");

    // Down only after the scale-down delay: no decrease sooner than the delay after the last increase (1 s of slack
    // for the watch latency of two observations), and never below the minimum.
    let mut last_up: Option<Instant> = None;
    for pair in desired.windows(2) {
        let ((_, before), (at, after)) = (pair[0], pair[1]);
        if after > before {
            last_up = Some(at);
        } else if let Some(up) = last_up {
            let after_up = secs(up, at);
            assert!(
                after_up >= SCALE_DOWN_DELAY_S as f64 - 1.0,
                "{before} → {after} only {after_up:.1}s after a scale-up"
            );
        }
        assert!(after >= MIN_REPLICAS, "scaled to {after}");
    }
    eprintln!(
        "load ended at +{:.1}s, bench returned at +{:.1}s, back to {MIN_REPLICAS} worker at +{:.1}s",
        secs(step, load_end),
        secs(step, done),
        secs(step, settled)
    );

    // No request lost on scale-in: every stopped worker drained on SIGTERM (answered and acked all it had received)
    // and exited 0, none was killed, none died on its own.
    let stopped = stats.terminations.iter().filter(|t| t.deployment == "sleepy").collect::<Vec<_>>();
    for t in &stopped {
        if !t.clean() {
            bail!(
                "{} did not stop cleanly: {:?} killed {} requested {}\n{}",
                t.pod,
                t.status,
                t.killed,
                t.requested,
                t.log_tail
            );
        }
    }
    for t in stopped.iter().filter(|t| t.was_ready) {
        // The worker's own account: it logs this only once every request it received was replied to and acked.
        assert!(t.log_tail.contains("every received request was answered"), "{} did not drain:\n{}", t.pod, t.log_tail);
    }
    let drains: Vec<String> =
        stopped.iter().filter_map(|t| t.drain).map(|d| format!("{:.0}ms", d.as_secs_f64() * 1000.0)).collect();
    eprintln!("{} workers stopped, all with exit code 0; SIGTERM → exit: {drains:?}", stopped.len());
    assert!(stopped.len() >= (peak - MIN_REPLICAS) as usize, "{} stopped for a peak of {peak}", stopped.len());
    assert!(stats.errors.is_empty(), "local runtime errors: {:#?}", stats.errors);
    for t in &stopped {
        for line in t.log_tail.lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")) {
            eprintln!("{}: {line}", t.pod);
        }
    }
    // A scale-in under load occasionally sends a request back to the queue: a delivery in transit to the consumer
    // when it is cancelled never reaches the worker (which answered everything it did receive, checked above) and
    // is requeued when its connection closes, then answered by another worker. Nothing is lost or run twice; it can
    // only be what the stopped consumers' prefetch held.
    let redelivered = stat(&final_queue, "redeliver");
    let bound = PREFETCH as u64 * stopped.iter().filter(|t| t.was_ready).count() as u64;
    eprintln!("requests redelivered during the run: {redelivered} (at most {bound}: the stopped consumers' prefetch)");
    assert!(redelivered <= bound, "requests were redelivered: {}", final_queue["message_stats"]);
    Ok(())
}
