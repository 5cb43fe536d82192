//! The chaos suite: faults and hostile input against the real `warren-worker` and `warren` binaries and a real
//! RabbitMQ (the environment's broker, or a node of the test's own for faults that would disturb others: memory
//! alarm, `max_message_size`, restart). Each test prints its counts — sent, answered, errors, runs per request — and
//! asserts what users rely on: calls answered, one-way requests delivered to the handler, no request run more often
//! than the faults force, bounded metrics, no secret in logs.
//!
//! Run `cargo build --workspace --bins` first; `scripts/env up` must have started the broker.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use warren_client::topology::{QueueOptions, dead_letter_queue_name};
use warren_client::{CallError, Client};
use warren_tests::amqp_proxy::{AmqpProxy, Method};
use warren_tests::backend::Backend;
use warren_tests::broker::QueueCleanup;
use warren_tests::chaos_broker::{ChaosBroker, ChaosBrokerConfig, ChaosCluster};
use warren_tests::worker_process::{WorkerCommand, WorkerProcess, metric_sum, metric_value};
use warren_tests::{bin_path, broker, broker_uri, unique_name};

// ---------------------------------------------------------------------------------------------------------------
// Helpers

/// What a scenario counted; printed by every test, before its assertions.
#[derive(Debug, Default)]
struct Counts {
    sent: u64,
    answered: u64,
    errors: BTreeMap<String, u64>,
    /// How many requests ran how many times: `{1: 58, 2: 2}`.
    runs: BTreeMap<u32, u64>,
    extra: BTreeMap<&'static str, String>,
}

impl Counts {
    fn error(&mut self, error: &CallError) {
        let key = match error {
            CallError::Remote { code, .. } => format!("remote:{code}"),
            other => other.kind().as_str().to_owned(),
        };
        *self.errors.entry(key).or_default() += 1;
    }

    fn record(&mut self, result: &Result<Value, CallError>) {
        match result {
            Ok(_) => self.answered += 1,
            Err(error) => self.error(error),
        }
    }

    fn runs_from(&mut self, runs: impl IntoIterator<Item = u32>) {
        for n in runs {
            *self.runs.entry(n).or_default() += 1;
        }
    }

    fn note(&mut self, key: &'static str, value: impl std::fmt::Display) {
        self.extra.insert(key, value.to_string());
    }

    fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn print(&self, scenario: &str) {
        eprintln!(
            "CHAOS {scenario}: sent={} answered={} errors={} {:?} runs-per-request={:?} {:?}",
            self.sent,
            self.answered,
            self.errors_total(),
            self.errors,
            self.runs,
            self.extra
        );
    }
}

async fn connect(uri: &str) -> Connection {
    Connection::connect(uri, ConnectionProperties::default()).await.expect("broker connection")
}

/// A channel in confirm mode, for publishing hand-made requests.
async fn confirm_channel(connection: &Connection) -> Channel {
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    channel
}

/// A caller's own exclusive, server-named reply queue and a consumer of it (no acks), so every reply is counted.
async fn private_reply_queue(channel: &Channel, tag: &str) -> (lapin::Queue, lapin::Consumer) {
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let reply_queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
    let replies = channel
        .basic_consume(
            reply_queue.name().clone(),
            tag.into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (reply_queue, replies)
}

async fn publish(channel: &Channel, queue: &str, properties: BasicProperties, body: &[u8]) {
    let confirm = channel
        .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "the broker refused a request: {confirm:?}");
}

/// Declares a service's queues as `warren-worker --declare` does.
async fn declare(uri: &str, queue: &str) {
    let connection = connect(uri).await;
    let channel = connection.create_channel().await.unwrap();
    warren_client::topology::declare_service_queues(&channel, queue, &QueueOptions::default()).await.unwrap();
    let _ = connection.close(200, "declared".into()).await;
}

/// Messages waiting in `queue` (passive declare), on the broker at `uri`.
async fn queue_depth(uri: &str, queue: &str) -> u32 {
    let connection = connect(uri).await;
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let depth = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap().message_count();
    let _ = connection.close(200, "done".into()).await;
    depth
}

/// Consumers of `queue` (passive declare), on the broker at `uri`.
async fn consumer_count(uri: &str, queue: &str) -> u32 {
    let connection = connect(uri).await;
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let count = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap().consumer_count();
    let _ = connection.close(200, "done".into()).await;
    count
}

/// Takes every message out of `queue` (e.g. a dead-letter queue): (type, body) of each.
async fn drain_queue(uri: &str, queue: &str) -> Vec<(Option<String>, Value)> {
    let connection = connect(uri).await;
    let channel = connection.create_channel().await.unwrap();
    let mut messages = Vec::new();
    while let Some(message) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        let kind = message.delivery.properties.kind().as_ref().map(|k| k.as_str().to_owned());
        messages.push((kind, serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null)));
    }
    let _ = connection.close(200, "done".into()).await;
    messages
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if done().await {
            return true;
        }
        if Instant::now() > deadline {
            eprintln!("gave up waiting for {what} after {timeout:?}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_until`], but `done` must hold at every look for `hold` in a row: a state the worker passes through
/// between two sessions (a request between its old session's channel and the queue) is not the end.
async fn wait_until_steady<F, Fut>(what: &str, timeout: Duration, hold: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut since: Option<Instant> = None;
    loop {
        if done().await {
            let since = *since.get_or_insert_with(Instant::now);
            if since.elapsed() >= hold {
                return true;
            }
        } else {
            since = None;
        }
        if Instant::now() > deadline {
            eprintln!("gave up waiting for {what} to hold for {hold:?} after {timeout:?}");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn remote_code(result: &Result<Value, CallError>) -> Option<&str> {
    match result {
        Err(CallError::Remote { code, .. }) => Some(code),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// 1. An HTTP handler whose backend is not listening yet, then goes away and comes back

#[tokio::test]
async fn an_unavailable_http_backend_loses_no_request_and_fails_no_call() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-backend-down");
    let _cleanup = QueueCleanup::service(&queue);
    let mut backend = Backend::reserve();
    // The queue exists before the worker (the operator declares it), so requests can wait for the backend.
    declare(&broker_uri(), &queue).await;
    let mut worker =
        WorkerCommand::new(&queue).handler(&backend.url()).args(["--declare", "--prefetch", "8"]).spawn().unwrap();
    worker.wait_healthy(Duration::from_secs(30)).await.unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();
    let mut counts = Counts::default();

    // Phase 1: the backend starts 6 s after the requests (a pod whose app container is slower than the worker).
    let mut one_way_ids = Vec::new();
    for i in 0..40 {
        let id = format!("early-oneway-{i}");
        client.notify(&queue, Some("echo"), json!({ "id": id })).await.unwrap();
        one_way_ids.push(id);
    }
    let early_calls: Vec<_> = (0..20)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.clone());
            let params = json!({ "id": format!("early-call-{i}") });
            tokio::spawn(async move {
                let result = client.call(&queue, Some("echo"), params.clone(), Duration::from_secs(60)).await;
                (params, result)
            })
        })
        .collect();
    counts.sent += 60;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let ready_while_down = worker.ready().await;
    counts.note("ready_while_backend_down", ready_while_down);
    backend.start().await;
    for call in early_calls {
        let (params, result) = call.await.unwrap();
        if let Ok(value) = &result {
            assert_eq!(value, &params);
        }
        counts.record(&result);
    }

    // Phase 2: the backend goes away under load (slow requests in flight) and comes back 3 s later.
    let late_calls: Vec<_> = (0..10)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.clone());
            let params = json!({ "id": format!("late-call-{i}"), "ms": 1500 });
            tokio::spawn(async move { client.call(&queue, Some("slow"), params, Duration::from_secs(60)).await })
        })
        .collect();
    counts.sent += 10;
    wait_until("slow requests at the backend", Duration::from_secs(30), || async {
        backend.log.runs().keys().filter(|id| id.starts_with("late-call")).count() >= 8
    })
    .await;
    backend.stop();
    for i in 0..20 {
        let id = format!("late-oneway-{i}");
        client.notify(&queue, Some("echo"), json!({ "id": id })).await.unwrap();
        one_way_ids.push(id);
    }
    counts.sent += 20;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ready_while_gone = worker.ready().await;
    counts.note("ready_while_backend_gone", ready_while_gone);
    backend.start().await;
    for call in late_calls {
        counts.record(&call.await.unwrap());
    }

    let all_delivered = wait_until("every one-way request at the backend", Duration::from_secs(60), || async {
        one_way_ids.iter().all(|id| backend.log.runs_of(id) > 0)
    })
    .await;
    let runs = backend.log.runs();
    let one_way_delivered = one_way_ids.iter().filter(|id| runs.contains_key(*id)).count();
    counts.note("one_way_delivered", format!("{one_way_delivered}/{}", one_way_ids.len()));
    counts.runs_from(runs.values().copied());
    let dead = queue_depth(&broker_uri(), &dead_letter_queue_name(&queue)).await;
    counts.note("dead_lettered", dead);
    counts.note(
        "requeued",
        worker.metric(r#"warren_worker_requests_requeued_total{reason="handler_unavailable"}"#).await,
    );
    counts.print("backend unavailable");

    assert!(all_delivered, "one-way requests lost: {counts:?}");
    assert_eq!(counts.answered, 30, "every call answered: {counts:?}");
    assert_eq!(dead, 0, "nothing dead-lettered: {counts:?}");
    assert!(!ready_while_down && !ready_while_gone, "/readyz said ready with the backend down: {counts:?}");
    // Only the slow requests in flight when the backend died may run twice.
    let early_runs: Vec<u32> =
        runs.iter().filter(|(id, _)| id.starts_with("early") || id.contains("oneway")).map(|(_, n)| *n).collect();
    assert!(early_runs.iter().all(|n| *n == 1), "a request that never reached a dead backend ran twice: {counts:?}");
    assert!(worker.ready().await, "ready again once the backend answers");
}

// ---------------------------------------------------------------------------------------------------------------
// 2. reply_to naming another service's queue (a confused deputy)

#[tokio::test]
async fn replies_go_only_to_reply_addresses() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-replyto");
    let victim = unique_name("chaos-victim");
    let allowed = unique_name("chaos-replies");
    let _cleanup = (QueueCleanup::service(&queue), QueueCleanup::service(&victim), QueueCleanup::service(&allowed));
    let worker = WorkerCommand::new(&queue)
        .arg("--declare")
        .env("WARREN_ALLOW_REPLY_TO", &format!("{allowed},nothing.else.*"))
        .start()
        .await
        .unwrap();
    let connection = connect(&broker_uri()).await;
    let channel = confirm_channel(&connection).await;
    for name in [&victim, &allowed] {
        let durable = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(name.as_str().into(), durable, FieldTable::default()).await.unwrap();
    }
    let mut counts = Counts::default();

    // A request whose reply_to names another service's request queue, carrying a secret in its params.
    let hostile = BasicProperties::default()
        .with_type("echo".into())
        .with_correlation_id("deputy-1".into())
        .with_reply_to(victim.as_str().into());
    publish(&channel, &queue, hostile, br#"{"token": "s3cret-in-params"}"#).await;
    counts.sent += 1;
    // A tutorial-style caller: its own exclusive, server-named reply queue.
    let (reply_queue, mut replies) = private_reply_queue(&channel, "tutorial").await;
    let tutorial = BasicProperties::default()
        .with_type("echo".into())
        .with_correlation_id("tutorial-1".into())
        .with_reply_to(reply_queue.name().clone());
    publish(&channel, &queue, tutorial, b"[1, 2]").await;
    counts.sent += 1;
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next()).await;
    let tutorial_ok = matches!(&reply, Ok(Some(Ok(d))) if d.data == b"[1,2]");
    if tutorial_ok {
        counts.answered += 1;
    }
    // Direct reply-to (warren-client).
    let client = Client::connect(&broker_uri()).await.unwrap();
    let direct = client.call(&queue, Some("echo"), json!("direct"), Duration::from_secs(30)).await;
    counts.sent += 1;
    counts.record(&direct);
    // A queue the worker was told to allow.
    let allowed_request = BasicProperties::default()
        .with_type("echo".into())
        .with_correlation_id("allowed-1".into())
        .with_reply_to(allowed.as_str().into());
    publish(&channel, &queue, allowed_request, b"3").await;
    counts.sent += 1;

    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, Duration::from_secs(30)).await.unwrap();
    let allowed_got = wait_until("the reply in the allowed queue", Duration::from_secs(10), || async {
        queue_depth(&broker_uri(), &allowed).await == 1
    })
    .await;
    if allowed_got {
        counts.answered += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let in_victim = queue_depth(&broker_uri(), &victim).await;
    let refused = worker.metric(r#"warren_worker_requests_refused_total{reason="reply_to"}"#).await;
    counts.note("published_into_victim_queue", in_victim);
    counts.note("refused", refused);
    let log = worker.log();
    counts.print("reply_to policy");
    let _ = connection.close(200, "done".into()).await;

    assert_eq!(in_victim, 0, "the worker published into another service's queue: {counts:?}");
    assert_eq!(refused, 1.0, "{counts:?}");
    assert!(tutorial_ok, "a tutorial-style caller got no reply: {reply:?}");
    assert_eq!(direct.unwrap(), json!("direct"));
    assert!(allowed_got, "the allow-listed reply queue got no reply: {counts:?}");
    assert!(log.contains("reply_to"), "the refusal is logged:\n{log}");
    assert!(!log.contains("s3cret-in-params"), "the request body reached the log:\n{log}");
}

// ---------------------------------------------------------------------------------------------------------------
// 3. A reply the broker refuses for its size (max_message_size), and replies over the worker's own limit

#[tokio::test]
async fn a_reply_the_broker_refuses_for_size_becomes_an_error_and_runs_once() {
    let broker = ChaosBroker::start(ChaosBrokerConfig { max_message_size: Some(1024 * 1024), ..Default::default() })
        .await
        .unwrap();
    let queue = unique_name("chaos-maxsize");
    let backend = Backend::start_now().await;
    let worker = WorkerCommand::new(&queue)
        .broker_uri(&broker.uri())
        .handler(&backend.url())
        .arg("--declare")
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker.uri()).await.unwrap();
    let mut counts = Counts::default();

    let big = client.call(&queue, Some("big"), json!({"id": "big-1", "bytes": 3 << 20}), Duration::from_secs(60)).await;
    counts.sent += 1;
    counts.record(&big);
    // Requests after it are served normally, concurrently with another oversized one.
    let small = client.call(&queue, Some("echo"), json!({"id": "small-1"}), Duration::from_secs(30)).await;
    counts.sent += 1;
    counts.record(&small);
    tokio::time::sleep(Duration::from_secs(2)).await;
    counts.runs_from(backend.log.runs().values().copied());
    counts.note("big_runs", backend.log.runs_of("big-1"));
    counts.note("reconnects", worker.metric("warren_worker_reconnects_total").await);
    let dead = queue_depth(&broker.uri(), &dead_letter_queue_name(&queue)).await;
    counts.note("dead_lettered", dead);
    counts.print("reply over the broker's max_message_size");

    assert_eq!(remote_code(&big), Some("internal"), "{big:?}");
    assert_eq!(backend.log.runs_of("big-1"), 1, "the oversized request ran again: {counts:?}");
    assert_eq!(small.unwrap(), json!({"id": "small-1"}));
    assert_eq!(dead, 0);
    drop(worker);
}

#[tokio::test]
async fn replies_and_http_responses_over_the_size_limit_become_errors_and_run_once() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-replylimit");
    let _cleanup = QueueCleanup::service(&queue);
    let backend = Backend::start_now().await;
    let worker = WorkerCommand::new(&queue)
        .handler(&backend.url())
        .arg("--declare")
        .env("WARREN_MAX_REPLY_BYTES", "1048576")
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();
    let mut counts = Counts::default();
    let mut results = Vec::new();
    for (id, bytes) in [("fits", 512 << 10), ("over", 2 << 20), ("huge", 16 << 20)] {
        let result = client.call(&queue, Some("big"), json!({"id": id, "bytes": bytes}), Duration::from_secs(60)).await;
        counts.sent += 1;
        counts.record(&result);
        results.push(result);
    }
    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, Duration::from_secs(30)).await.unwrap();
    counts.runs_from(backend.log.runs().values().copied());
    counts.print("reply over the worker's limit");

    assert!(results[0].is_ok(), "{counts:?}");
    assert_eq!(remote_code(&results[1]), Some("internal"), "{counts:?}");
    assert_eq!(remote_code(&results[2]), Some("internal"), "{counts:?}");
    assert!(backend.log.runs().values().all(|n| *n == 1), "{counts:?}");
}

#[tokio::test]
async fn requests_over_the_size_limit_are_answered_with_bad_request_and_never_run() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-requestlimit");
    let _cleanup = QueueCleanup::service(&queue);
    let backend = Backend::start_now().await;
    let worker = WorkerCommand::new(&queue)
        .handler(&backend.url())
        .arg("--declare")
        .env("WARREN_MAX_REQUEST_BYTES", "65536")
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();
    let mut counts = Counts::default();
    let mut results = Vec::new();
    for (id, bytes) in [("small", 1 << 10), ("over", 64 << 10), ("large", 4 << 20), ("after", 1 << 10)] {
        let params = json!({"id": id, "padding": "x".repeat(bytes)});
        let result = client.call(&queue, Some("echo"), params, Duration::from_secs(60)).await;
        counts.sent += 1;
        counts.record(&result);
        results.push(result);
    }
    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, Duration::from_secs(30)).await.unwrap();
    counts.runs_from(backend.log.runs().values().copied());
    counts.print("request over the worker's limit");

    assert!(results[0].is_ok() && results[3].is_ok(), "{counts:?}");
    for result in &results[1..3] {
        let Err(CallError::Remote { code, details, .. }) = result else { panic!("{result:?}") };
        assert_eq!(code, "bad_request");
        let details = details.as_ref().expect("details");
        assert_eq!((details["reason"].as_str(), details["limit"].as_u64()), (Some("request_too_large"), Some(65536)));
    }
    assert_eq!(backend.log.runs_of("over") + backend.log.runs_of("large"), 0, "{counts:?}");
    assert_eq!((backend.log.runs_of("small"), backend.log.runs_of("after")), (1, 1), "{counts:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Caller-chosen method names must not create unbounded metric series

#[tokio::test]
async fn caller_chosen_method_names_do_not_grow_the_metrics() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-labels");
    let _cleanup = QueueCleanup::service(&queue);
    let backend = Backend::start_now().await;
    let worker = WorkerCommand::new(&queue)
        .handler(&backend.url())
        .args(["--declare", "--prefetch", "64"])
        .start()
        .await
        .unwrap();
    let before = worker.metrics().await.len();
    let connection = connect(&broker_uri()).await;
    let channel = confirm_channel(&connection).await;
    let mut sizes = Vec::new();
    let mut sent = 0;
    // 1,000 distinct names, then 2,000 more: past the cap, /metrics must not grow any more.
    for batch in [1000, 2000] {
        let mut confirms = Vec::new();
        for _ in 0..batch {
            sent += 1;
            let properties =
                BasicProperties::default().with_type(format!("method-{sent}-{}", uuid::Uuid::new_v4()).into());
            let confirm = channel
                .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), b"{}", properties)
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack());
        }
        let done = wait_until("every request handled", Duration::from_secs(120), || async {
            metric_sum(&worker.metrics().await, "warren_worker_requests_total") >= sent as f64
        })
        .await;
        assert!(done, "{sent} requests not handled");
        sizes.push(worker.metrics().await.len());
    }
    let _ = connection.close(200, "done".into()).await;
    let text = worker.metrics().await;
    let series = text.lines().filter(|l| l.starts_with("warren_worker_requests_total{")).count();
    let mut counts =
        Counts { sent, answered: metric_sum(&text, "warren_worker_requests_total") as u64, ..Default::default() };
    counts.note("metrics_bytes_before", before);
    counts.note("metrics_bytes_after_1000", sizes[0]);
    counts.note("metrics_bytes_after_3000", sizes[1]);
    counts.note("requests_total_series", series);
    counts.print("3,000 distinct method names");

    assert!(sizes[1] <= sizes[0] + 1024, "/metrics kept growing with new method names: {counts:?}");
    assert!(sizes[1] < 256 * 1024, "{counts:?}");
    assert!(series <= 52, "{series} series of warren_worker_requests_total");
    assert!(metric_value(&text, r#"warren_worker_requests_total{method="_other",outcome="ok"}"#) > 0.0, "{text}");
}

// ---------------------------------------------------------------------------------------------------------------
// 5. A hung backend: per-request timeout without x-deadline, bounded SIGTERM drain

/// A request without `x-deadline` (a tutorial-style caller), whose reply goes to `reply_to`.
fn no_deadline(method: &str, reply_to: &ShortString, correlation_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_type(method.into())
        .with_correlation_id(correlation_id.into())
        .with_reply_to(reply_to.clone())
}

#[tokio::test]
async fn a_hung_backend_is_cut_off_and_does_not_pin_the_worker() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-hung");
    let _cleanup = QueueCleanup::service(&queue);
    let backend = Backend::start_now().await;
    let mut worker = WorkerCommand::new(&queue)
        .handler(&backend.url())
        .args(["--declare", "--prefetch", "2"])
        .env("WARREN_HANDLER_TIMEOUT", "2s")
        .start()
        .await
        .unwrap();
    let connection = connect(&broker_uri()).await;
    let channel = confirm_channel(&connection).await;
    let (reply_queue, mut replies) = private_reply_queue(&channel, "hung").await;
    let mut counts = Counts::default();
    // Two hung requests take both prefetch slots; four quick ones wait behind them.
    for i in 0..2 {
        publish(&channel, &queue, no_deadline("hang", reply_queue.name(), &format!("hang-{i}")), br#"{"id": "h"}"#)
            .await;
    }
    for i in 0..4 {
        publish(&channel, &queue, no_deadline("echo", reply_queue.name(), &format!("echo-{i}")), b"1").await;
    }
    counts.sent = 6;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut codes = HashMap::new();
    while codes.len() < 6 && Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), replies.next()).await {
            Ok(Some(Ok(reply))) => {
                let id = reply.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default();
                let body: Value = serde_json::from_slice(&reply.data).unwrap_or(Value::Null);
                let code = body.get("code").and_then(Value::as_str).unwrap_or("ok").to_owned();
                if code == "ok" {
                    counts.answered += 1
                } else {
                    *counts.errors.entry(code.clone()).or_default() += 1
                }
                codes.insert(id, code);
            }
            _ => break,
        }
    }
    counts.note("hang_runs", backend.log.runs_of("h"));

    // SIGTERM with two hung requests in flight: the drain ends within the handler timeout, not never.
    for i in 0..2 {
        publish(&channel, &queue, no_deadline("hang", reply_queue.name(), &format!("hang-term-{i}")), b"{}").await;
    }
    worker.wait_metric_at_least("warren_worker_requests_in_flight", 2.0, Duration::from_secs(10)).await.unwrap();
    let stopping = Instant::now();
    worker.sigterm().unwrap();
    let exit = worker.wait_exit(Duration::from_secs(15)).await;
    counts.note("sigterm_drain_s", format!("{:.1}", stopping.elapsed().as_secs_f64()));
    counts.print("hung backend");
    let _ = connection.close(200, "done".into()).await;

    assert_eq!(codes.len(), 6, "requests left unanswered behind the hung ones: {codes:?} {counts:?}");
    assert_eq!(counts.answered, 4, "{codes:?}");
    assert_eq!(codes.get("hang-0").map(String::as_str), Some("handler_error"), "{codes:?}");
    let exit = exit.expect("SIGTERM drain bounded by the handler timeout");
    assert!(exit.success(), "{exit}");
}

// ---------------------------------------------------------------------------------------------------------------
// 6. A broker memory alarm under load (the broker blocks publishing connections)

#[tokio::test]
async fn a_memory_alarm_under_load_runs_each_request_once() {
    let broker = ChaosBroker::start(ChaosBrokerConfig::default()).await.unwrap();
    let queue = unique_name("chaos-alarm");
    let worker = WorkerCommand::new(&queue)
        .broker_uri(&broker.uri())
        .args(["--declare", "--prefetch", "16"])
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker.uri()).await.unwrap();
    // A worker runs its first request alone, then opens its prefetch window. The call's timeout is as generous as
    // the others': in CI a fresh private broker beside the cluster tests once took longer than 30 s to answer it.
    let warm_up = client.call(&queue, Some("echo"), json!("warm-up"), Duration::from_secs(90)).await;
    warm_up.unwrap_or_else(|e| panic!("the warm-up call: {e}\n{}", worker.log_tail()));
    let mut counts = Counts::default();
    let in_flight = 16;
    let calls: Vec<_> = (0..in_flight)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.clone());
            tokio::spawn(async move {
                client.call(&queue, Some("sleep"), json!({"ms": 2000 + i}), Duration::from_secs(90)).await
            })
        })
        .collect();
    counts.sent = in_flight;
    worker
        .wait_metric_at_least("warren_worker_requests_in_flight", in_flight as f64, Duration::from_secs(30))
        .await
        .unwrap();
    broker.set_memory_alarm().await.unwrap();
    // Longer than any confirm timeout: the replies wait for the alarm to clear.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let in_flight_during_alarm = worker.metric("warren_worker_requests_in_flight").await;
    broker.clear_memory_alarm().await.unwrap();
    for call in calls {
        counts.record(&call.await.unwrap());
    }
    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, Duration::from_secs(30)).await.ok();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = worker.metric(r#"warren_worker_handler_duration_seconds_count{method="sleep"}"#).await;
    counts.note("handler_runs", runs);
    counts.note("in_flight_during_alarm", in_flight_during_alarm);
    counts.note("duplicate_replies", client.unmatched_replies());
    counts.note("reply_failures", worker.metric("warren_worker_reply_failures_total").await);
    counts.print("memory alarm");

    assert_eq!(counts.answered, in_flight, "{counts:?}");
    assert_eq!(runs, in_flight as f64, "requests ran twice because of the alarm: {counts:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 7. A handler that panics while building its future

#[tokio::test]
async fn a_handler_panicking_before_its_future_leaks_no_prefetch_slot() {
    use warren_worker::{Metrics, Params, Worker};
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-panic");
    let _cleanup = QueueCleanup::service(&queue);
    let handlers = warren_worker::builtin::handlers().method("explode", |params: Params| {
        if params.as_value().is_object() {
            panic!("the handler failed before returning its future");
        }
        async move { Ok(params.into_value()) }
    });
    let metrics = Arc::new(Metrics::new());
    let addr = warren_worker::server::serve("127.0.0.1:0".parse().unwrap(), metrics.clone()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::builder(broker_uri(), &queue)
            .prefetch(2)
            .declare(QueueOptions::default())
            .handlers(handlers)
            .metrics(metrics.clone())
            .run(async move {
                let _ = stopped.await;
            }),
    );
    let ready =
        || async move { reqwest::get(format!("http://{addr}/readyz")).await.is_ok_and(|r| r.status().is_success()) };
    assert!(wait_until("the in-process worker consumes", Duration::from_secs(30), ready).await);
    let client = Client::connect(&broker_uri()).await.unwrap();
    let mut counts = Counts::default();
    let panics: Vec<_> = (0..4)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.clone());
            tokio::spawn(
                async move { client.call(&queue, Some("explode"), json!({"i": i}), Duration::from_secs(10)).await },
            )
        })
        .collect();
    counts.sent = 5;
    for call in panics {
        counts.record(&call.await.unwrap());
    }
    let echo = client.call(&queue, Some("echo"), json!("after"), Duration::from_secs(10)).await;
    counts.record(&echo);
    let ready_after = ready().await;
    counts.note("ready_after", ready_after);
    counts.print("handler panics while building its future");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;

    assert_eq!(counts.errors.get("remote:internal"), Some(&4), "{counts:?}");
    assert!(echo.is_ok() || !ready_after, "/readyz says ready but the worker takes no work: {counts:?}");
    assert_eq!(echo.unwrap(), json!("after"));
}

// ---------------------------------------------------------------------------------------------------------------
// 8. Broker credentials in malformed URIs never reach logs or output

/// Runs a binary for at most `limit`, then kills it; its stdout and stderr.
async fn run_bounded(program: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new(bin_path(program));
    command
        .args(args)
        .env_remove("WARREN_BROKER_URI")
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => {
            let output = output.unwrap();
            let text =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            (output.status.code(), text)
        }
        Err(_) => (None, String::from("(still running; killed)")),
    }
}

#[tokio::test]
async fn broker_passwords_never_reach_logs_or_output() {
    let secret = "S3cretPassw0rd";
    let closed_port = warren_tests::operator_process::free_port();
    let uris = [
        format!("amqp:user:{secret}@127.0.0.1"),
        format!("amqp:/user:{secret}@127.0.0.1:{closed_port}"),
        format!("amqp://user:{secret}@127.0.0.1:{closed_port}/%2f"),
        format!("amqps://user:{secret}@[::1:{closed_port}/%2f"),
        format!("amqp://user:{secret}@127.0.0.1:{closed_port}/%2f?frame_max=abc"),
        format!("amqp://user:{secret}@127.0.0.1:{closed_port},127.0.0.1:{closed_port}/%2f"),
        format!("amqp://user:pa,{secret}@127.0.0.1:{closed_port},,127.0.0.1:{closed_port}/%2f"),
        format!("amqp://user:{secret}@127.0.0.1:{closed_port},127.0.0.1:{secret}/%2f"),
    ];
    let mut leaks = Vec::new();
    let mut runs = 0;
    for uri in &uris {
        let worker_log = run_bounded(
            "warren-worker",
            &["--queue", "q", "--broker-uri", uri, "--metrics-addr", "127.0.0.1:0"],
            &[("RUST_LOG", "debug")],
            Duration::from_secs(3),
        )
        .await;
        let cli = run_bounded(
            "warren",
            &["--broker-uri", uri, "call", "q", "echo", "[]", "--timeout", "2s"],
            &[("RUST_LOG", "debug"), ("WARREN_CONNECT_TIMEOUT", "2s")],
            Duration::from_secs(20),
        )
        .await;
        let help =
            run_bounded("warren-worker", &["--help"], &[("WARREN_BROKER_URI", uri)], Duration::from_secs(5)).await;
        let cli_help = run_bounded("warren", &["--help"], &[("WARREN_BROKER_URI", uri)], Duration::from_secs(5)).await;
        for (what, (_, output)) in
            [("worker", worker_log), ("cli", cli), ("worker --help", help), ("cli --help", cli_help)]
        {
            runs += 1;
            if output.contains(secret) {
                let line = output.lines().find(|l| l.contains(secret)).unwrap_or_default().to_owned();
                leaks.push(format!("{what} with {uri:?}: {line}"));
            }
        }
    }
    let counts =
        Counts { sent: runs, errors: BTreeMap::from([("leaks".into(), leaks.len() as u64)]), ..Default::default() };
    counts.print("credentials in output");
    assert!(leaks.is_empty(), "the password reached the output:\n{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------------------------------------------
// 9. A black-holed broker: connecting must time out

#[tokio::test]
async fn connecting_to_a_black_holed_broker_times_out() {
    // Accepts TCP connections (the kernel does) and never answers the AMQP handshake.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("amqp://guest:guest@{}/%2f", black_hole.local_addr().unwrap());
    let mut counts = Counts::default();

    let started = Instant::now();
    let connect = tokio::time::timeout(Duration::from_secs(40), Client::connect(&uri)).await;
    let library_s = started.elapsed().as_secs_f64();
    counts.note("library_connect_s", format!("{library_s:.1}"));
    counts.note(
        "library_result",
        match &connect {
            Ok(Ok(_)) => "connected".to_owned(),
            Ok(Err(e)) => e.kind().as_str().to_owned(),
            Err(_) => "hung".to_owned(),
        },
    );

    let started = Instant::now();
    let (code, output) = run_bounded(
        "warren",
        &["--broker-uri", &uri, "call", "q", "echo", "[]", "--timeout", "2s"],
        &[],
        Duration::from_secs(40),
    )
    .await;
    let cli_s = started.elapsed().as_secs_f64();
    counts.note("cli_s", format!("{cli_s:.1}"));
    counts.note("cli_exit", format!("{code:?}"));
    counts.sent = 2;
    counts.print("black-holed broker");
    drop(black_hole);

    assert!(matches!(connect, Ok(Err(CallError::Connection(_)))), "{counts:?}");
    assert!(library_s < 20.0, "{counts:?}");
    assert_eq!(code, Some(6), "the CLI exits 'connection failed': {output}");
    assert!(cli_s < 20.0, "{counts:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 10. A worker SIGKILL loop on one poison request

#[tokio::test]
async fn a_poison_request_killing_workers_is_dead_lettered_alone() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-poison");
    let _cleanup = QueueCleanup::service(&queue);
    let command = WorkerCommand::new(&queue).args([
        "--declare",
        "--delivery-limit",
        "3",
        "--enable-crash-method",
        "--prefetch",
        "16",
    ]);
    let mut worker = command.start().await.unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    // Eight callers keep innocent requests in flight while the poison kills worker after worker.
    let load: Vec<_> = (0..8)
        .map(|task| {
            let (client, queue, stop, sent) = (client.clone(), queue.clone(), stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 10_000 {
                    i += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                    let params = json!({"task": task, "i": i});
                    results.push(client.call(&queue, Some("echo"), params, Duration::from_secs(120)).await);
                }
                results
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.notify(&queue, Some("crash"), json!({"poison": true})).await.unwrap();

    let dead_queue = dead_letter_queue_name(&queue);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while queue_depth(&broker_uri(), &dead_queue).await == 0 && Instant::now() < deadline {
        if worker.try_exit_status().unwrap().is_some() {
            kills += 1;
            worker = command.spawn().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the load run on a healthy worker for a moment, then stop it.
    if worker.try_exit_status().unwrap().is_some() {
        kills += 1;
        worker = command.spawn().unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts = Counts { sent: sent.load(Ordering::Relaxed) + 1, ..Default::default() };
    for task in load {
        for result in tokio::time::timeout(Duration::from_secs(150), task).await.expect("callers end").unwrap() {
            counts.record(&result);
        }
    }
    let dead = drain_queue(&broker_uri(), &dead_queue).await;
    let dead_innocents = dead.iter().filter(|(kind, _)| kind.as_deref() != Some("crash")).count();
    counts.note("worker_kills", kills);
    counts.note("dead_lettered_poison", dead.len() - dead_innocents);
    counts.note("dead_lettered_innocent", dead_innocents);
    counts.print("poison SIGKILL loop");
    drop(worker);

    assert_eq!(dead.len() - dead_innocents, 1, "the poison ends in {dead_queue}: {counts:?}");
    assert_eq!(dead_innocents, 0, "innocent requests were dead-lettered with the poison: {counts:?}");
    assert_eq!(counts.errors_total(), 0, "every innocent call answered: {counts:?}");
    assert_eq!(kills, 4, "one delivery and three redeliveries (the delivery limit): {counts:?}");
}

/// The same with a real SIGKILL each time (an OOM kill, a failed liveness probe): the poison hangs the HTTP backend,
/// and the test kills the worker as soon as the backend sees it.
#[tokio::test]
async fn a_request_whose_worker_is_sigkilled_each_time_is_dead_lettered_alone() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-sigkill");
    let _cleanup = QueueCleanup::service(&queue);
    let backend = Backend::start_now().await;
    let command = WorkerCommand::new(&queue).handler(&backend.url()).args([
        "--declare",
        "--delivery-limit",
        "3",
        "--prefetch",
        "16",
    ]);
    let mut worker = command.start().await.unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|task| {
            let (client, queue, stop) = (client.clone(), queue.clone(), stop.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) && i < 10_000 {
                    i += 1;
                    let params = json!({"id": format!("innocent-{task}-{i}"), "ms": 300});
                    results.push(client.call(&queue, Some("slow"), params, Duration::from_secs(120)).await);
                }
                results
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.notify(&queue, Some("hang"), json!({"id": "poison"})).await.unwrap();

    let dead_queue = dead_letter_queue_name(&queue);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while queue_depth(&broker_uri(), &dead_queue).await == 0 && Instant::now() < deadline {
        if backend.log.runs_of("poison") > kills {
            worker.kill().await.unwrap();
            kills += 1;
            worker = command.spawn().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts = Counts::default();
    for task in load {
        for result in tokio::time::timeout(Duration::from_secs(150), task).await.expect("callers end").unwrap() {
            counts.sent += 1;
            counts.record(&result);
        }
    }
    counts.sent += 1;
    let dead = drain_queue(&broker_uri(), &dead_queue).await;
    let dead_innocents = dead.iter().filter(|(kind, _)| kind.as_deref() != Some("hang")).count();
    counts.runs_from(backend.log.runs().iter().filter(|(id, _)| id.starts_with("innocent")).map(|(_, n)| *n));
    counts.note("sigkills", kills);
    counts.note("poison_runs", backend.log.runs_of("poison"));
    counts.note("dead_lettered_poison", dead.len() - dead_innocents);
    counts.note("dead_lettered_innocent", dead_innocents);
    counts.print("poison SIGKILL loop (HTTP backend)");
    drop(worker);

    assert_eq!(dead.len() - dead_innocents, 1, "the poison ends in {dead_queue}: {counts:?}");
    assert_eq!(dead_innocents, 0, "innocent requests were dead-lettered with the poison: {counts:?}");
    assert_eq!(counts.errors_total(), 0, "every innocent call answered: {counts:?}");
    assert_eq!(kills, 4, "one delivery and three redeliveries (the delivery limit): {counts:?}");
}

// ---------------------------------------------------------------------------------------------------------------
// 11. A broker restart under load (on a node of the test's own)

#[tokio::test]
async fn a_broker_restart_under_load_loses_no_one_way_request() {
    let broker = ChaosBroker::start(ChaosBrokerConfig::default()).await.unwrap();
    let queue = unique_name("chaos-restart");
    let backend = Backend::start_now().await;
    let mut worker = WorkerCommand::new(&queue)
        .broker_uri(&broker.uri())
        .handler(&backend.url())
        .args(["--declare", "--prefetch", "8"])
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker.uri()).await.unwrap();
    let mut counts = Counts::default();
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = format!("before-{i}");
        client.notify(&queue, Some("slow"), json!({"id": id, "ms": 100})).await.unwrap();
        ids.push(id);
    }
    counts.sent = 50;
    wait_until("some requests handled", Duration::from_secs(30), || async { backend.log.requests() >= 8 }).await;
    let stop = broker.stop_app();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = broker.start_app();
    stop.unwrap();
    start.unwrap();
    worker.wait_ready(Duration::from_secs(60)).await.unwrap();
    let delivered = wait_until("every request before the restart delivered", Duration::from_secs(60), || async {
        ids.iter().all(|id| backend.log.runs_of(id) > 0)
    })
    .await;
    counts.answered = ids.iter().filter(|id| backend.log.runs_of(id) > 0).count() as u64;
    counts.runs_from(backend.log.runs().values().copied());
    counts.note("reconnects", worker.metric("warren_worker_reconnects_total").await);
    counts.print("broker restart");

    assert!(delivered, "one-way requests lost across the restart: {counts:?}");
    assert!(worker.try_exit_status().unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------------------------
// 12. A broker node lost under load: the worker and the caller move to another address of the URI

#[tokio::test]
async fn a_lost_node_moves_the_worker_and_the_caller_to_the_next_address() {
    // Two unclustered nodes stand for a cluster's: the queue is declared on both, and the worker and the caller
    // start on the first (the second refuses connections until they are up), then the first is killed.
    let (first, second) = tokio::join!(ChaosBroker::start(Default::default()), ChaosBroker::start(Default::default()));
    let (mut first, second) = (first.unwrap(), second.unwrap());
    second.stop_app().unwrap();
    let uri = format!("amqp://guest:guest@127.0.0.1:{},127.0.0.1:{}/%2f", first.amqp_port, second.amqp_port);
    let queue = unique_name("chaos-node-loss");
    let worker = WorkerCommand::new(&queue).broker_uri(&uri).args(["--declare", "--prefetch", "8"]).start().await;
    let worker = worker.unwrap();
    let client = Client::connect(&uri).await.unwrap();
    assert!(client.broker_address().contains(&first.amqp_port.to_string()), "{}", client.broker_address());
    second.start_app().unwrap();
    declare(&second.uri(), &queue).await;

    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let first_answer_after_kill: Arc<std::sync::OnceLock<Duration>> = Arc::default();
    let load: Vec<_> = (0..4)
        .map(|task| {
            let (client, queue, stop) = (client.clone(), queue.clone(), stop.clone());
            let (killed_at, first_answer_after_kill) = (killed_at.clone(), first_answer_after_kill.clone());
            tokio::spawn(async move {
                let (mut counts, mut answered_after_kill, mut hung) = (Counts::default(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    counts.sent += 1;
                    let sent_after_kill = killed_at.get().copied();
                    let params = json!([task, counts.sent]);
                    let call = client.call(&queue, Some("echo"), params.clone(), Duration::from_secs(10));
                    match tokio::time::timeout(Duration::from_secs(30), call).await {
                        Ok(Ok(value)) => {
                            assert_eq!(value, params, "a caller got someone else's answer");
                            counts.answered += 1;
                            if let Some(killed) = sent_after_kill {
                                answered_after_kill += 1;
                                let _ = first_answer_after_kill.set(killed.elapsed());
                            }
                        }
                        Ok(Err(error)) => {
                            counts.error(&error);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(_) => hung += 1,
                    }
                }
                (counts, answered_after_kill, hung)
            })
        })
        .collect();

    worker
        .wait_metric_at_least(
            r#"warren_worker_requests_total{method="echo",outcome="ok"}"#,
            200.0,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let echo_ok = r#"warren_worker_requests_total{method="echo",outcome="ok"}"#;
    let answered_before_kill = worker.metric(echo_ok).await;
    first.kill();
    let killed = Instant::now();
    let _ = killed_at.set(killed);
    // The worker consumes from the second node's queue (asked over AMQP: the management API's figures lag).
    let worker_moved = wait_until("the worker consuming on the second node", Duration::from_secs(60), || async {
        consumer_count(&second.uri(), &queue).await >= 1
    })
    .await;
    let worker_reconnect = killed.elapsed();
    let settled = wait_until("200 calls answered after the kill", Duration::from_secs(60), || async {
        let answered = worker.metric(echo_ok).await;
        answered >= answered_before_kill + 200.0 && first_answer_after_kill.get().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut counts = Counts::default();
    let (mut answered_after_kill, mut hung) = (0, 0);
    for task in load {
        let (tally, after, stuck) = task.await.unwrap();
        counts.sent += tally.sent;
        counts.answered += tally.answered;
        for (kind, n) in tally.errors {
            *counts.errors.entry(kind).or_default() += n;
        }
        answered_after_kill += after;
        hung += stuck;
    }
    counts.note("answered_after_kill", answered_after_kill);
    counts.note("hung", hung);
    counts.note("worker_reconnect_s", format!("{:.2}", worker_reconnect.as_secs_f64()));
    let caller_reconnect = first_answer_after_kill.get().map(|d| format!("{:.2}", d.as_secs_f64()));
    counts.note("caller_first_answer_after_kill_s", caller_reconnect.unwrap_or_else(|| "never".into()));
    counts.note("worker_reconnects", worker.metric("warren_worker_reconnects_total").await);
    counts.note("caller_now_on", client.broker_address());
    counts.print("node lost under load");

    assert!(worker_moved, "the worker did not move to the second node: {counts:?}\n{}", worker.log_tail());
    assert!(settled, "calls did not resume on the second node: {counts:?}");
    assert!(client.broker_address().contains(&second.amqp_port.to_string()), "{counts:?}");
    assert_eq!(hung, 0, "calls hung past their timeout: {counts:?}");
    // Calls in flight on the lost node fail fast (the connection), none wait for their timeout.
    let unexpected: Vec<_> = counts.errors.keys().filter(|k| k.as_str() != "connection").collect();
    assert!(unexpected.is_empty(), "{counts:?}");
    assert!(!worker.log().contains("guest:guest"), "the worker logged the password");
    assert!(worker.log().contains(&format!("@127.0.0.1:{}/", second.amqp_port)), "the log names the new node");
}

// ---------------------------------------------------------------------------------------------------------------
// 13b. A session lost at an exact point: after the reply's confirm and before the ack reaches the broker (the
// redelivery must not run again), or before the reply reaches the broker (the redelivery must run again). A proxy in
// front of the broker cuts the worker's connection when it sends that frame (tests/src/amqp_proxy.rs). And a reply
// whose confirm comes late (the proxy holds it back): the worker must wait for it, not run the request again.

/// What the proxy does to the worker's connections.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Cut the connection on which the worker sends this method.
    Cut(Method),
    /// Hold back, for this long, the first such method the broker sends the worker and what follows on its channel.
    Delay(Method, Duration),
}

/// One request through a worker behind a proxy that cuts the connection carrying the first `cut`; the counts of
/// what followed once everything settled: runs of the request, replies the caller got, and the worker's metrics.
async fn one_request_through_a_cut(cut: Method, scenario: &str) -> Counts {
    one_request_through_a_fault(Fault::Cut(cut), scenario).await
}

/// A proxy in front of the broker at `uri` (its first node), and `uri` with the proxy's address instead.
async fn proxy_in_front(uri: &str) -> (AmqpProxy, String) {
    let node = warren_client::broker_uri::BrokerAddresses::parse(uri).unwrap().node(0).clone();
    let (host, port) = (node.authority.host.clone(), node.authority.port);
    let upstream = tokio::net::lookup_host((host.as_str(), port)).await.unwrap().next().unwrap();
    let proxy = AmqpProxy::start(upstream).await.unwrap();
    let proxied = uri.replacen(&format!("@{host}:{port}/"), &format!("@127.0.0.1:{}/", proxy.port), 1);
    assert_ne!(proxied, uri, "the broker URI names no host:port to replace: {uri}");
    (proxy, proxied)
}

/// A request of the test's caller: `echo` of `{"id": id}`, replies to `reply_to`.
fn echo_request(id: &str, reply_to: &ShortString) -> (BasicProperties, Vec<u8>) {
    let properties = BasicProperties::default()
        .with_type("echo".into())
        .with_content_type("application/json".into())
        .with_message_id(format!("{id}-message").into())
        .with_correlation_id(format!("{id}-correlation").into())
        .with_reply_to(reply_to.clone());
    (properties, json!({ "id": id }).to_string().into_bytes())
}

/// [`one_request_through_a_cut`], for any [`Fault`].
async fn one_request_through_a_fault(fault: Fault, scenario: &str) -> Counts {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-cut");
    let _cleanup = QueueCleanup::service(&queue);
    let uri = broker_uri();
    let (proxy, proxied) = proxy_in_front(&uri).await;
    let backend = Backend::start_now().await;
    let worker = WorkerCommand::new(&queue)
        .broker_uri(&proxied)
        .handler(&backend.url())
        .args(["--declare", "--prefetch", "4"])
        .start()
        .await
        .unwrap();

    // The caller talks to the broker directly, on a reply queue of its own, so every reply is counted.
    let connection = connect(&uri).await;
    let channel = confirm_channel(&connection).await;
    let (reply_queue, mut replies) = private_reply_queue(&channel, "").await;
    let id = unique_name("cut");
    match fault {
        Fault::Cut(method) => proxy.cut_on(method),
        Fault::Delay(method, hold) => proxy.delay_on(method, hold),
    }
    let (properties, body) = echo_request(&id, reply_queue.name());
    publish(&channel, &queue, properties, &body).await;

    let (proxy, worker, uri, queue) = (&proxy, &worker, uri.as_str(), queue.as_str());
    let fired = wait_until("the proxy's fault to fire", Duration::from_secs(30), || async move {
        proxy.cuts() + proxy.delays() == 1
    })
    .await;
    assert!(fired, "the fault never fired: {fault:?}\n{}", worker.log_tail());
    let reconnects = match fault {
        // The worker reconnects and gets the request back.
        Fault::Cut(_) => 1.0,
        // Nothing is lost: the held frames arrive, the worker goes on.
        Fault::Delay(_, hold) => {
            tokio::time::sleep(hold).await;
            0.0
        }
    };
    // Then it settles: nothing waits, nothing is in flight.
    let settled = wait_until("the worker to settle", Duration::from_secs(60), || async move {
        worker.metric("warren_worker_reconnects_total").await >= reconnects
            && worker.ready().await
            && worker.metric("warren_worker_requests_in_flight").await == 0.0
            && queue_depth(uri, queue).await == 0
    })
    .await;
    // Late duplicates have time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut got = 0;
    while let Ok(Some(Ok(reply))) = tokio::time::timeout(Duration::from_millis(200), replies.next()).await {
        assert_eq!(
            reply.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()),
            Some(format!("{id}-correlation"))
        );
        got += 1;
    }

    let mut counts = Counts { sent: 1, answered: got, ..Counts::default() };
    counts.runs_from([backend.log.runs_of(&id)]);
    counts.note("cuts", proxy.cuts());
    counts.note("delays", proxy.delays());
    counts.note("proxied_connections", proxy.connections());
    counts.note("worker_reconnects", worker.metric("warren_worker_reconnects_total").await);
    counts.note("redeliveries_answered", worker.metric("warren_worker_redeliveries_answered_total").await);
    counts.note("reply_confirms_late", worker.metric("warren_worker_reply_confirms_late_total").await);
    counts.note("reply_failures", worker.metric("warren_worker_reply_failures_total").await);
    counts.note("late_confirm_warnings", worker.log().matches("has not confirmed the reply yet").count());
    counts.note("waiting", queue_depth(uri, queue).await);
    counts.note("dead_lettered", queue_depth(uri, &dead_letter_queue_name(queue)).await);
    counts.print(scenario);
    assert!(settled, "the worker did not settle after the fault: {counts:?}\n{}", worker.log_tail());
    let _ = connection.close(200, "done".into()).await;
    counts
}

#[tokio::test]
async fn a_request_whose_ack_is_lost_after_its_reply_was_confirmed_runs_once() {
    let counts = one_request_through_a_cut(Method::BASIC_ACK, "ack lost after the reply's confirm").await;
    assert_eq!(counts.answered, 1, "the caller must get exactly one reply: {counts:?}");
    assert_eq!(counts.runs, BTreeMap::from([(1, 1)]), "the handler must run once: {counts:?}");
    assert_eq!(counts.extra["redeliveries_answered"], "1", "{counts:?}");
    assert_eq!(counts.extra["dead_lettered"], "0", "{counts:?}");
}

#[tokio::test]
async fn a_request_whose_reply_was_not_confirmed_runs_again_after_a_lost_session() {
    let counts = one_request_through_a_cut(Method::BASIC_PUBLISH, "reply lost before the broker").await;
    assert_eq!(counts.answered, 1, "the caller must get exactly one reply: {counts:?}");
    assert_eq!(counts.runs, BTreeMap::from([(2, 1)]), "the request must run again (its reply was lost): {counts:?}");
    assert_eq!(counts.extra["redeliveries_answered"], "0", "{counts:?}");
    assert_eq!(counts.extra["dead_lettered"], "0", "{counts:?}");
}

/// The confirm of the reply is held back 15 s (a quorum reply queue electing a leader, a stalled broker), longer than
/// the 10 s after which the worker used to give up on it and requeue the request: the reply went out all the same,
/// so the request ran twice and the caller got two replies. Only the reply channel is held: heartbeats pass.
#[tokio::test]
async fn a_request_whose_reply_confirm_is_late_runs_once() {
    let hold = Duration::from_secs(15);
    let counts = one_request_through_a_fault(Fault::Delay(Method::BASIC_ACK, hold), "reply confirm late").await;
    assert_eq!(counts.answered, 1, "the caller must get exactly one reply: {counts:?}");
    assert_eq!(counts.runs, BTreeMap::from([(1, 1)]), "the handler must run once: {counts:?}");
    assert_eq!(counts.extra["reply_confirms_late"], "1", "{counts:?}");
    assert_eq!(counts.extra["late_confirm_warnings"], "1", "{counts:?}");
    assert_eq!(counts.extra["reply_failures"], "0", "{counts:?}");
    assert_eq!(counts.extra["worker_reconnects"], "0", "no session may be lost: {counts:?}");
    assert_eq!(counts.extra["dead_lettered"], "0", "{counts:?}");
}

/// A SIGTERM while a reply's confirm is held back (60 s): the drain waits for it 10 s, not for ever, and the worker
/// exits 0 without acking or nacking the request; it returns to the queue when the connections close (its reply
/// went out: the next worker runs it again, as the fault forces).
#[tokio::test]
async fn a_drain_waiting_for_a_late_confirm_ends_in_bounded_time() {
    let _broker = broker::shared().await;
    let queue = unique_name("chaos-drain");
    let _cleanup = QueueCleanup::service(&queue);
    let uri = broker_uri();
    let (proxy, proxied) = proxy_in_front(&uri).await;
    let backend = Backend::start_now().await;
    let mut worker = WorkerCommand::new(&queue)
        .broker_uri(&proxied)
        .handler(&backend.url())
        .args(["--declare", "--prefetch", "4"])
        .start()
        .await
        .unwrap();
    let connection = connect(&uri).await;
    let channel = confirm_channel(&connection).await;
    let (reply_queue, mut replies) = private_reply_queue(&channel, "").await;
    let id = unique_name("drain");
    proxy.delay_on(Method::BASIC_ACK, Duration::from_secs(60));
    let (properties, body) = echo_request(&id, reply_queue.name());
    publish(&channel, &queue, properties, &body).await;
    let proxy = &proxy;
    let fired =
        wait_until("the confirm to be held", Duration::from_secs(30), || async move { proxy.delays() == 1 }).await;
    assert!(fired, "the worker's reply was never confirmed\n{}", worker.log_tail());

    worker.sigterm().unwrap();
    let signalled = Instant::now();
    let exit = worker.wait_exit(Duration::from_secs(40)).await;
    let drain = signalled.elapsed();
    let mut got = 0;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_millis(500), replies.next()).await {
        got += 1;
    }
    let mut counts = Counts { sent: 1, answered: got, ..Counts::default() };
    counts.runs_from([backend.log.runs_of(&id)]);
    counts.note("drain_s", format!("{:.1}", drain.as_secs_f64()));
    counts.note("exit", format!("{exit:?}"));
    counts.note("waiting", queue_depth(&uri, &queue).await);
    counts.note("gave_up_warnings", worker.log().matches("shutting down without the reply's confirm").count());
    counts.print("drain with a late confirm");
    let exit = exit.unwrap_or_else(|e| panic!("the drain did not end: {e}\n{}", worker.log_tail()));
    assert!(exit.success(), "{exit}\n{}", worker.log_tail());
    // 10 s after the signal, to a check (1 s) and the connections' close.
    assert!(drain < Duration::from_secs(20), "{counts:?}");
    assert!(drain >= Duration::from_secs(9), "the drain did not wait for the confirm: {counts:?}");
    assert_eq!((counts.answered, counts.runs.clone()), (1, BTreeMap::from([(1, 1)])), "{counts:?}");
    assert_eq!(counts.extra["waiting"], "1", "the request must return to the queue: {counts:?}");
    assert_eq!(counts.extra["gave_up_warnings"], "1", "{counts:?}");
    let _ = connection.close(200, "done".into()).await;
}

// ---------------------------------------------------------------------------------------------------------------
// 14. A RabbitMQ cluster node lost under load (issue 11): a quorum queue replicated on three nodes, workers and
// callers spread over the nodes by the multi-host URI; one node stopped cleanly, another killed with SIGKILL, and
// (separately) one cut off from the others by a network partition with `pause_minority`.

/// How one call of the load ended, and on which caller.
#[derive(Debug)]
struct CallOutcome {
    caller: usize,
    id: String,
    result: Result<(), String>,
    elapsed: Duration,
    /// When the call ended, from the start of the load.
    at: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum NodeFault {
    /// `rabbitmqctl stop`: connections closed cleanly, as in a rolling restart.
    Stop,
    /// SIGKILL of the node's VM: connections reset, as when a machine is lost.
    Kill,
    /// The node cut off from its peers (AMQP still reachable): with `pause_minority` it pauses itself.
    Partition,
}

/// A cluster under test with its workers, callers and the backend that counts runs per request.
struct ClusterRig {
    cluster: ChaosCluster,
    queue: String,
    backend: Backend,
    workers: Vec<WorkerProcess>,
    callers: Vec<Client>,
}

impl ClusterRig {
    async fn start(cluster: ChaosCluster) -> Self {
        let queue = unique_name("chaos-cluster");
        let backend = Backend::start_now().await;
        let mut workers = Vec::new();
        for _ in 0..3 {
            let worker = WorkerCommand::new(&queue)
                .broker_uri(&cluster.uri())
                .handler(&backend.url())
                .args(["--declare", "--prefetch", "4"])
                .start()
                .await
                .unwrap();
            workers.push(worker);
        }
        // Callers pick a node at random; keep one on each node, so that whichever node is lost, a caller was on it.
        let mut callers = Vec::new();
        for node in &cluster.nodes {
            let port = format!(":{}/", node.amqp_port);
            for _ in 0..50 {
                let client = Client::connect(&cluster.uri()).await.unwrap();
                if client.broker_address().contains(&port) {
                    callers.push(client);
                    break;
                }
            }
        }
        assert_eq!(callers.len(), cluster.nodes.len(), "no caller landed on some node in 50 tries");
        let members = queue_members(&cluster, &queue).await;
        eprintln!("quorum queue {queue} members: {members:?}");
        assert_eq!(members.len(), 3, "the request queue must be replicated on every node: {members:?}");
        Self { cluster, queue, backend, workers, callers }
    }

    /// Which node each connection is on: (connection name, node), once the management API lists every caller's and
    /// worker's connection (it shows a new one only after its first statistics, some seconds later).
    async fn connections_by_node(&self) -> Vec<(String, String)> {
        let callers: Vec<String> = self.callers.iter().map(Client::connection_name).collect();
        let mut listed = Vec::new();
        for _ in 0..60 {
            listed = self.list_connections().await;
            let callers_listed = callers.iter().all(|c| listed.iter().any(|(n, _)| n == c));
            let workers_listed = listed.iter().filter(|(n, _)| n.starts_with("warren-worker")).count();
            if callers_listed && workers_listed >= 2 * self.workers.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        listed
    }

    /// The connections the management API lists now: (connection name, node), from any node that answers.
    async fn list_connections(&self) -> Vec<(String, String)> {
        let http = reqwest::Client::new();
        for node in &self.cluster.nodes {
            let url =
                format!("http://127.0.0.1:{}/api/connections?columns=node,client_properties", node.management_port);
            let Ok(response) = http.get(&url).basic_auth("guest", Some("guest")).send().await else { continue };
            let Ok(list) = response.json::<Vec<Value>>().await else { continue };
            return list
                .iter()
                .map(|c| {
                    let name = c["client_properties"]["connection_name"].as_str().unwrap_or("?").to_owned();
                    (name, c["node"].as_str().unwrap_or("?").to_owned())
                })
                .collect();
        }
        Vec::new()
    }

    /// Runs the load, applies `fault` to node `victim` after 3 s, repairs it after the workers are back, and checks
    /// what callers and workers saw. Returns every call's outcome.
    async fn lose_node(&mut self, victim: usize, fault: NodeFault) -> Vec<CallOutcome> {
        let victim_name = self.cluster.nodes[victim].node_name().to_owned();
        let connections = self.connections_by_node().await;
        let node_of = |name: &str| connections.iter().find(|(n, _)| n == name).map(|(_, node)| node.clone());
        let caller_nodes: Vec<Option<String>> = self.callers.iter().map(|c| node_of(&c.connection_name())).collect();
        let mut per_node: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (name, node) in &connections {
            let entry = per_node.entry(node.clone()).or_default();
            if name.starts_with("warren-worker") { entry.0 += 1 } else { entry.1 += 1 }
        }
        eprintln!("{fault:?}: connections per node (worker, caller): {per_node:?}; victim {victim_name}");
        let doomed: Vec<usize> =
            (0..self.callers.len()).filter(|&c| caller_nodes[c].as_deref() == Some(&victim_name)).collect();
        let workers_on_victim = per_node.get(&victim_name).map_or(0, |(w, _)| *w);

        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let load = run_load(&self.callers, &self.queue, 4, fault, start, stop.clone());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let reconnects_before = reconnects(&self.workers).await;
        let fault_at = start.elapsed();
        let mut partition = None;
        match fault {
            NodeFault::Stop => self.cluster.nodes[victim].stop().unwrap(),
            NodeFault::Kill => self.cluster.nodes[victim].kill(),
            NodeFault::Partition => partition = Some(self.cluster.partition(victim).unwrap()),
        }
        // A paused node stops its AMQP listener: that is when its clients notice.
        let lost_at = Instant::now();
        if fault == NodeFault::Partition {
            let port = self.cluster.nodes[victim].amqp_port;
            let paused = wait_until("the minority node to pause", Duration::from_secs(90), || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err()
            })
            .await;
            assert!(paused, "{victim_name} did not pause (pause_minority) within 90 s of the partition");
            eprintln!("Partition: {victim_name} paused {:?} after the partition", lost_at.elapsed());
        }
        // Workers on the lost node reconnect to another: time until they have and every worker consumes again.
        if workers_on_victim > 0 {
            let workers = &self.workers;
            let reconnected =
                wait_until("the workers on the lost node reconnect", Duration::from_secs(90), || async move {
                    reconnects(workers).await > reconnects_before
                })
                .await;
            assert!(reconnected, "no worker reconnected after losing {victim_name}");
        }
        for worker in self.workers.iter_mut() {
            worker.wait_ready(Duration::from_secs(60)).await.unwrap();
        }
        let workers_back_after = lost_at.elapsed();
        tokio::time::sleep(Duration::from_secs(5)).await;
        match partition.take() {
            Some(partition) => partition.heal().unwrap(),
            None => self.cluster.nodes[victim].restart().await.unwrap(),
        }
        let healed_at = Instant::now();
        self.cluster.wait_running(3, Duration::from_secs(180)).await.unwrap();
        let rejoined_after = healed_at.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let mut outcomes = Vec::new();
        for task in load {
            outcomes.extend(task.await.unwrap());
        }

        let mut counts = Counts { sent: outcomes.len() as u64, ..Counts::default() };
        for o in &outcomes {
            match &o.result {
                Ok(()) => counts.answered += 1,
                Err(kind) => *counts.errors.entry(kind.clone()).or_default() += 1,
            }
        }
        let failed_slowest = outcomes.iter().filter(|o| o.result.is_err()).map(|o| o.elapsed).max();
        // Per caller that lost its node: time from the fault until its first call both sent and answered after it.
        let recovered: Vec<Option<Duration>> = doomed
            .iter()
            .map(|&c| {
                outcomes
                    .iter()
                    .filter(|o| o.caller == c && o.result.is_ok() && o.at > fault_at + o.elapsed)
                    .map(|o| o.at - fault_at)
                    .min()
            })
            .collect();
        counts.note("fault", format!("{fault:?} {victim_name}"));
        counts.note("callers_on_lost_node", format!("{doomed:?}"));
        counts.note("slowest_failed_call", format!("{failed_slowest:?}"));
        counts.note("callers_answered_again_after", format!("{recovered:?}"));
        counts.note("worker_connections_on_lost_node", workers_on_victim);
        counts.note("workers_consuming_again_after", format!("{workers_back_after:?}"));
        counts.note("worker_reconnects", reconnects(&self.workers).await - reconnects_before);
        counts.note("node_back_in_cluster_after", format!("{rejoined_after:?}"));
        counts.print(&format!("cluster node lost ({fault:?})"));

        // Only callers that were on the lost node see errors, and only `connection` errors, failing fast.
        for o in outcomes.iter().filter(|o| o.result.is_err()) {
            assert!(doomed.contains(&o.caller), "caller {} was not on the lost node: {o:?}", o.caller);
            assert_eq!(o.result, Err("connection".to_owned()), "{o:?}");
            assert!(o.elapsed < Duration::from_secs(30), "a call failed by timing out, not fast: {o:?}");
        }
        for (c, r) in doomed.iter().zip(&recovered) {
            assert!(r.is_some(), "caller {c} never got an answer after the fault: {counts:?}");
        }
        outcomes
    }

    /// Nothing waits in the queue, nothing was dead-lettered, and every answered call ran, at most twice (a
    /// request a worker on the lost node had taken is redelivered: the one rerun the fault forces).
    async fn check_nothing_lost(&self, outcomes: &[CallOutcome], scenario: &str) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let node = &self.cluster.nodes[0];
        let waiting = queue_depth(&node.uri(), &self.queue).await;
        let dead = queue_depth(&node.uri(), &dead_letter_queue_name(&self.queue)).await;
        let runs = self.backend.log.runs();
        let answered = outcomes.iter().filter(|o| o.result.is_ok()).count() as u64;
        let mut counts = Counts { sent: outcomes.len() as u64, answered, ..Counts::default() };
        counts.runs_from(runs.values().copied());
        counts.note("waiting", waiting);
        counts.note("dead_lettered", dead);
        let ran = outcomes.iter().filter(|o| o.result.is_err() && runs.contains_key(&o.id)).count();
        counts.note("failed_calls_whose_request_ran", ran);
        counts.print(scenario);
        for o in outcomes.iter().filter(|o| o.result.is_ok()) {
            assert!(runs.get(&o.id).copied().unwrap_or(0) >= 1, "answered but never ran: {o:?}");
        }
        assert!(runs.values().all(|&n| n <= 2), "a request ran more than twice: {counts:?}");
        assert_eq!(waiting, 0, "requests still wait in the queue: {counts:?}");
        assert_eq!(dead, 0, "requests were dead-lettered because of the node loss: {counts:?}");
    }
}

/// Calls `queue` from every caller, `lanes` calls in flight each, until `stop` is set.
fn run_load(
    callers: &[Client],
    queue: &str,
    lanes: usize,
    fault: NodeFault,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<CallOutcome>>> {
    let mut tasks = Vec::new();
    for (caller, client) in callers.iter().enumerate() {
        for lane in 0..lanes {
            let (client, queue, stop) = (client.clone(), queue.to_owned(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{fault:?}-{caller}-{lane}-{n}");
                    n += 1;
                    let began = Instant::now();
                    let result = client
                        .call(&queue, Some("slow"), json!({"id": id, "ms": 20}), Duration::from_secs(60))
                        .await
                        .map(drop)
                        .map_err(|e| match e {
                            CallError::Remote { code, .. } => format!("remote:{code}"),
                            other => other.kind().as_str().to_owned(),
                        });
                    let failed = result.is_err();
                    outcomes.push(CallOutcome { caller, id, result, elapsed: began.elapsed(), at: start.elapsed() });
                    if failed {
                        // A caller whose connection died retries after a pause, as an application would.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                outcomes
            }));
        }
    }
    tasks
}

/// Reconnects of all the workers so far.
async fn reconnects(workers: &[WorkerProcess]) -> f64 {
    let metrics: Vec<_> = workers.iter().map(|w| w.metric("warren_worker_reconnects_total")).collect();
    futures::future::join_all(metrics).await.iter().sum()
}

/// The quorum queue's members, from the management API of a node that answers.
async fn queue_members(cluster: &ChaosCluster, queue: &str) -> Vec<String> {
    for node in &cluster.nodes {
        let management = warren_client::management::Management::new(&node.management_uri()).unwrap();
        if let Ok(Some(q)) = management.queue("/", queue).await {
            return q["members"]
                .as_array()
                .map(|m| m.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
        }
    }
    Vec::new()
}

/// The node most callers are on (callers pick a node at random), so that the test sees callers lose theirs.
async fn busiest_caller_node(rig: &ClusterRig, exclude: &[usize]) -> usize {
    let connections = rig.connections_by_node().await;
    let names: Vec<String> = rig.callers.iter().map(Client::connection_name).collect();
    (0..rig.cluster.nodes.len())
        .filter(|i| !exclude.contains(i))
        .max_by_key(|&i| {
            let node = rig.cluster.nodes[i].node_name();
            connections.iter().filter(|(n, on)| on == node && names.contains(n)).count()
        })
        .unwrap()
}

#[tokio::test]
async fn losing_a_cluster_node_under_load_loses_no_request() {
    let mut rig = ClusterRig::start(ChaosCluster::start(3).await.unwrap()).await;
    let first = busiest_caller_node(&rig, &[]).await;
    let mut outcomes = rig.lose_node(first, NodeFault::Stop).await;
    let second = busiest_caller_node(&rig, &[first]).await;
    outcomes.extend(rig.lose_node(second, NodeFault::Kill).await);
    rig.check_nothing_lost(&outcomes, "cluster node lost (stop, then kill: totals)").await;
}

#[tokio::test]
async fn a_partitioned_node_pauses_under_pause_minority_and_loses_no_request() {
    // The node to cut off runs as another uid, so that a firewall rule can drop its distribution traffic alone.
    let config = |i: usize| ChaosBrokerConfig {
        partition_handling: Some("pause_minority"),
        net_ticktime: Some(4),
        run_as: (i == 2).then_some(PARTITIONED_UID),
        ..ChaosBrokerConfig::default()
    };
    let mut rig = ClusterRig::start(ChaosCluster::start_with(3, config).await.unwrap()).await;
    let outcomes = rig.lose_node(2, NodeFault::Partition).await;
    rig.check_nothing_lost(&outcomes, "cluster node partitioned (pause_minority: totals)").await;
}

/// RabbitMQ 3.10 closes a worker's reply connection (541 INTERNAL_ERROR) when a reply goes to the direct reply-to
/// address of a caller whose node is down, so such a request killed session after session until the delivery limit
/// dead-lettered it. It must run at most twice (once with other requests in flight, once alone) and never be
/// dead-lettered. On 4.x the broker drops such a reply and each request runs once.
#[tokio::test]
async fn requests_of_callers_whose_node_is_down_do_not_kill_sessions_until_dead_lettered() {
    let mut cluster = ChaosCluster::start(3).await.unwrap();
    let queue = unique_name("chaos-gone-caller");
    let uri = cluster.nodes[0].uri();
    declare(&uri, &queue).await;
    // A caller on node 2 sends requests that no worker takes yet, then its node goes away.
    let caller = connect(&cluster.nodes[2].uri()).await;
    let channel = caller.create_channel().await.unwrap();
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let _replies =
        channel.basic_consume("amq.rabbitmq.reply-to".into(), "".into(), no_ack, FieldTable::default()).await.unwrap();
    let ids: Vec<String> = (0..3).map(|i| format!("{queue}-{i}")).collect();
    for id in &ids {
        let properties = BasicProperties::default()
            .with_type("echo".into())
            .with_content_type("application/json".into())
            .with_message_id(format!("{id}-message").into())
            .with_correlation_id(format!("{id}-correlation").into())
            .with_reply_to("amq.rabbitmq.reply-to".into());
        let body = json!({ "id": id }).to_string();
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .unwrap();
    }
    let queued = wait_until("the requests to be queued", Duration::from_secs(30), || {
        let (uri, queue) = (uri.clone(), queue.clone());
        async move { queue_depth(&uri, &queue).await == 3 }
    })
    .await;
    assert!(queued, "the requests did not reach the queue");
    cluster.nodes[2].stop().unwrap();

    let backend = Backend::start_now().await;
    let worker = WorkerCommand::new(&queue)
        .broker_uri(&uri)
        .handler(&backend.url())
        .args(["--declare", "--prefetch", "4"])
        .start()
        .await
        .unwrap();
    // On 3.10 every undeliverable reply ends a session and sends the requests it held back to the queue: done is
    // nothing waiting and nothing in flight through several sessions' worth of time, not at one look.
    let settled =
        wait_until_steady("the requests to be done", Duration::from_secs(120), Duration::from_secs(5), || {
            let (uri, queue, worker) = (uri.clone(), queue.clone(), &worker);
            async move {
                queue_depth(&uri, &queue).await == 0 && worker.metric("warren_worker_requests_in_flight").await == 0.0
            }
        })
        .await;
    let mut counts = Counts { sent: ids.len() as u64, ..Counts::default() };
    counts.runs_from(ids.iter().map(|id| backend.log.runs_of(id)));
    counts.note("waiting", queue_depth(&uri, &queue).await);
    counts.note("dead_lettered", queue_depth(&uri, &dead_letter_queue_name(&queue)).await);
    counts.note("worker_reconnects", worker.metric("warren_worker_reconnects_total").await);
    counts.note("replies_undeliverable", worker.metric("warren_worker_replies_undeliverable_total").await);
    counts.note("redeliveries_answered", worker.metric("warren_worker_redeliveries_answered_total").await);
    counts.print("replies to callers whose node is down");
    assert!(settled, "the requests were not done: {counts:?}\n{}", worker.log_tail());
    assert!(counts.runs.keys().all(|&n| (1..=2).contains(&n)), "a request ran more than twice: {counts:?}");
    assert_eq!(counts.extra["dead_lettered"], "0", "{counts:?}");
    assert_eq!(counts.extra["waiting"], "0", "{counts:?}");
}

/// A uid no account on the machine uses.
const PARTITIONED_UID: u32 = 64_123;

// The operator under an API server restart

/// The API server goes away while the operator reconciles (the observer's news keeps triggering passes that fail)
/// and comes back: the operator survives, its status catches up, and nothing is done twice (the one Deployment
/// keeps its identity and generation, the queues are the same). A control plane of the test's own: the shared one
/// is never restarted.
#[tokio::test]
async fn operator_rides_out_an_api_server_restart() {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::PostParams;
    use warren_operator::RpcService;
    use warren_tests::cluster::{TestNamespace, install_crd, wait_for};
    use warren_tests::operator_process::OperatorProcess;
    use warren_tests::private_cluster::PrivateCluster;

    let _broker = broker::shared().await;
    let cluster = PrivateCluster::start().expect("a private control plane");
    let client = cluster.client().await.unwrap();
    install_crd(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "chaos-apiserver").await.unwrap();
    ns.create_broker_secret("rabbitmq").await.unwrap();
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let mut operator = OperatorProcess::start_against(&kubeconfig, ns.name(), &[]).unwrap();
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": "svc" },
        "spec": { "broker": { "secretRef": { "name": "rabbitmq" } }, "scaling": { "enabled": false } },
    }))
    .unwrap();
    let api = ns.api::<RpcService>();
    api.create(&PostParams::default(), &svc).await.unwrap();
    let queue = format!("{}.svc", ns.name());
    let _cleanup = QueueCleanup::service(&queue);
    let backlog_shown = |n: i64| {
        let api = api.clone();
        async move {
            wait_for(&format!("status.queue.ready = {n}"), Duration::from_secs(120), || async {
                let svc = api.get("svc").await?;
                Ok((svc.status.and_then(|s| s.queue).and_then(|q| q.ready) == Some(n)).then_some(()))
            })
            .await
        }
    };
    wait_for("the queues to be declared", Duration::from_secs(120), || async {
        let svc = api.get("svc").await?;
        let declared =
            svc.status.iter().flat_map(|s| &s.conditions).any(|c| c.type_ == "QueueReady" && c.status == "True");
        Ok(declared.then_some(()))
    })
    .await
    .unwrap();
    let channel = publisher().await;
    publish_n(&channel, &queue, 2).await;
    backlog_shown(2).await.unwrap();
    let before = ns.api::<Deployment>().get("svc").await.unwrap();

    cluster.stop_apiserver().unwrap();
    // New figures while it is down: the observer triggers passes whose status patch cannot get through.
    publish_n(&channel, &queue, 3).await;
    let failures = wait_for("a pass that fails without the API server", Duration::from_secs(60), || async {
        let n = operator.metric("warren_operator_reconcile_failures_total").await;
        Ok((n >= 1.0).then_some(n))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outage_failures = operator.metric("warren_operator_reconcile_failures_total").await;
    assert!(operator.is_running(), "the operator exited while the API server was down");

    cluster.up().expect("the API server back");
    backlog_shown(5).await.unwrap();
    let after = ns.api::<Deployment>().get("svc").await.unwrap();
    let deployments = ns.api::<Deployment>().list(&Default::default()).await.unwrap().items.len();
    let reconciles = operator.metric("warren_operator_reconciles_total").await;
    let opened = broker::queue("/", &queue).await.unwrap().is_some();
    println!(
        "api server restart: failed passes {failures} when first seen, {outage_failures} by the end of the outage; \
         {reconciles} passes in all; deployments {deployments}; deployment generation {:?} -> {:?}; queue present: {opened}",
        before.metadata.generation, after.metadata.generation
    );
    assert!(operator.is_running(), "the operator exited after the API server came back");
    assert_eq!(deployments, 1);
    assert_eq!(after.metadata.uid, before.metadata.uid, "the same Deployment, not a new one");
    assert_eq!(after.metadata.generation, before.metadata.generation, "its spec was not rewritten");
    assert!(opened);
    drop(operator);
    ns.cleanup().await.unwrap();
}

async fn publisher() -> Channel {
    let conn = Connection::connect(&broker_uri(), ConnectionProperties::default()).await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    // The connection lives as long as the channel's test: leaked on purpose, closed at exit.
    std::mem::forget(conn);
    channel
}

async fn publish_n(channel: &Channel, queue: &str, n: usize) {
    for _ in 0..n {
        let confirm = channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), b"[]", BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
}
