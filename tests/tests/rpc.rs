//! RPC behaviour end to end: the real `warren-worker` binary, the real broker, `warren_client::Client` as the
//! caller (and a raw lapin caller where a request must be shaped by hand).
//!
//! Run `cargo build --workspace --bins` first; the broker from `scripts/env up` must be running.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren_client::topology::{QueueOptions, dead_letter_queue_name, declare_service_queues};
use warren_client::{CallError, CallOptions, Client, TraceContext};
use warren_tests::broker::QueueCleanup;
use warren_tests::worker_process::{WorkerCommand, metric_value};
use warren_tests::{broker, broker_uri, unique_name};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------------------------
// Helpers

async fn connect() -> Connection {
    Connection::connect(&broker_uri(), ConnectionProperties::default()).await.expect("broker connection")
}

async fn declare(queue: &str, options: &QueueOptions) -> QueueCleanup {
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    declare_service_queues(&channel, queue, options).await.expect("declare the service queues");
    let _ = connection.close(200, "declared".into()).await;
    QueueCleanup::service(queue)
}

async fn client() -> Client {
    Client::connect(&broker_uri()).await.expect("client connects")
}

/// A client, retrying while the broker is still coming back.
async fn connect_client_retrying(timeout: Duration) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        match Client::connect(&broker_uri()).await {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                eprintln!("client connect failed, retrying: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("no client connection within {timeout:?}: {error}"),
        }
    }
}

fn remote_code(result: &Result<Value, CallError>) -> Option<&str> {
    match result {
        Err(CallError::Remote { code, .. }) => Some(code),
        _ => None,
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A hand-made caller, RabbitMQ-tutorial style: its own exclusive reply queue, any properties and body.
struct RawCaller {
    connection: Connection,
    channel: Channel,
    reply_queue: ShortString,
    replies: Consumer,
}

impl RawCaller {
    async fn new() -> Self {
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = channel.queue_declare("".into(), exclusive, FieldTable::default()).await.unwrap();
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let replies = channel
            .basic_consume(queue.name().clone(), "raw-caller".into(), no_ack, FieldTable::default())
            .await
            .unwrap();
        Self { connection, channel, reply_queue: queue.name().clone(), replies }
    }

    /// Publishes `body` to `queue` with `properties` (add `.with_reply_to(caller.reply_queue.clone())` for a reply).
    async fn publish(&self, queue: &str, properties: BasicProperties, body: &[u8]) {
        self.channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn next_reply(&mut self) -> Delivery {
        tokio::time::timeout(CALL_TIMEOUT, self.replies.next())
            .await
            .expect("a reply within the timeout")
            .expect("reply consumer open")
            .expect("reply delivery")
    }

    async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Methods and errors

#[tokio::test]
async fn builtin_methods_answer_and_failures_have_their_codes() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-builtin");
    let _cleanup = QueueCleanup::service(&queue);
    let worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let client = client().await;

    assert_eq!(client.call(&queue, Some("add"), json!([1, 2]), CALL_TIMEOUT).await.unwrap(), json!(3));
    assert_eq!(client.call(&queue, Some("add"), json!({"a": 1.5, "b": 2}), CALL_TIMEOUT).await.unwrap(), json!(3.5));
    let params = json!({"nested": [1, "two", null], "ok": true});
    assert_eq!(client.call(&queue, Some("echo"), params.clone(), CALL_TIMEOUT).await.unwrap(), params);
    assert_eq!(
        client.call(&queue, Some("sleep"), json!({"ms": 1}), CALL_TIMEOUT).await.unwrap(),
        json!({"slept_ms": 1})
    );

    let unknown = client.call(&queue, Some("no_such_method"), json!([]), CALL_TIMEOUT).await;
    assert_eq!(remote_code(&unknown), Some("unknown_method"), "{unknown:?}");
    let bad_params = client.call(&queue, Some("add"), json!(["one", 2]), CALL_TIMEOUT).await;
    assert_eq!(remote_code(&bad_params), Some("bad_request"), "{bad_params:?}");
    match client.call(&queue, Some("fail"), json!({"why": "testing"}), CALL_TIMEOUT).await {
        Err(CallError::Remote { code, details, .. }) => {
            assert_eq!(code, "handler_error");
            assert_eq!(details, Some(json!({"why": "testing"})));
        }
        other => panic!("expected a handler_error, got {other:?}"),
    }
    // No method and no --default-method.
    let no_method = client.call(&queue, None, json!([1, 2]), CALL_TIMEOUT).await;
    assert_eq!(remote_code(&no_method), Some("unknown_method"), "{no_method:?}");

    // Every failure above was answered and acked, not requeued: nothing waits or sits unacked in the queue.
    let metrics = worker.metrics().await;
    assert_eq!(metric_value(&metrics, r#"warren_worker_requests_total{method="add",outcome="ok"}"#), 2.0);
    assert_eq!(metric_value(&metrics, r#"warren_worker_requests_total{method="add",outcome="bad_request"}"#), 1.0);
    assert_eq!(metric_value(&metrics, r#"warren_worker_requests_total{method="fail",outcome="handler_error"}"#), 1.0);
    assert_eq!(
        metric_value(&metrics, r#"warren_worker_requests_total{method="_unknown",outcome="unknown_method"}"#),
        2.0
    );
    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, CALL_TIMEOUT).await.unwrap();
    assert!(worker.healthy().await);
}

#[tokio::test]
async fn malformed_body_is_a_bad_request_and_the_worker_keeps_serving() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-malformed");
    let _cleanup = QueueCleanup::service(&queue);
    let worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let mut caller = RawCaller::new().await;

    let properties = BasicProperties::default()
        .with_type("add".into())
        .with_correlation_id("bad-1".into())
        .with_reply_to(caller.reply_queue.clone());
    caller.publish(&queue, properties, b"{this is not json").await;
    let reply = caller.next_reply().await;
    assert_eq!(reply.properties.correlation_id().as_ref().map(ShortString::as_str), Some("bad-1"));
    assert_eq!(header_str(&reply.properties, "x-status").as_deref(), Some("error"));
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body["code"], "bad_request", "{body}");
    caller.close().await;

    let client = client().await;
    assert_eq!(client.call(&queue, Some("add"), json!([2, 2]), CALL_TIMEOUT).await.unwrap(), json!(4));
    assert_eq!(worker.metric("warren_worker_reconnects_total").await, 0.0);
}

#[tokio::test]
async fn tutorial_style_request_gets_the_default_method_and_a_reply_with_its_properties() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-tutorial");
    let _cleanup = QueueCleanup::service(&queue);
    let _worker = WorkerCommand::new(&queue).args(["--declare", "--default-method", "add"]).start().await.unwrap();
    let mut caller = RawCaller::new().await;

    // No type, no content type: the default method, JSON.
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), long_string("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    headers.insert("tracestate".into(), long_string("vendor=1"));
    let properties = BasicProperties::default()
        .with_correlation_id("tut-1".into())
        .with_reply_to(caller.reply_queue.clone())
        .with_headers(headers);
    caller.publish(&queue, properties, b"[40, 2]").await;
    let reply = caller.next_reply().await;
    assert_eq!(serde_json::from_slice::<Value>(&reply.data).unwrap(), json!(42));
    assert_eq!(reply.properties.correlation_id().as_ref().map(ShortString::as_str), Some("tut-1"));
    assert_eq!(reply.properties.content_type().as_ref().map(ShortString::as_str), Some("application/json"));
    assert_eq!(header_str(&reply.properties, "x-status").as_deref(), Some("ok"));
    assert_eq!(
        header_str(&reply.properties, "traceparent").as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(header_str(&reply.properties, "tracestate").as_deref(), Some("vendor=1"));
    caller.close().await;
}

#[tokio::test]
async fn expired_request_is_acked_without_running_and_counted() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-expired");
    let _cleanup = QueueCleanup::service(&queue);
    let worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let mut caller = RawCaller::new().await;

    let mut headers = FieldTable::default();
    headers.insert("x-deadline".into(), AMQPValue::LongLongInt(unix_ms_now() as i64 - 60_000));
    let properties = BasicProperties::default()
        .with_type("sleep".into())
        .with_correlation_id("late-1".into())
        .with_reply_to(caller.reply_queue.clone())
        .with_headers(headers);
    caller.publish(&queue, properties, br#"{"ms": 600000}"#).await;
    let reply = caller.next_reply().await;
    let body: Value = serde_json::from_slice(&reply.data).unwrap();
    assert_eq!(body["code"], "deadline_exceeded", "{body}");
    caller.close().await;

    let metrics = worker.metrics().await;
    assert_eq!(metric_value(&metrics, "warren_worker_requests_expired_total"), 1.0);
    // The handler never ran.
    assert_eq!(metric_value(&metrics, r#"warren_worker_handler_duration_seconds_count{method="sleep"}"#), 0.0);
    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, CALL_TIMEOUT).await.unwrap();
}

#[tokio::test]
async fn one_way_requests_run_without_a_reply() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-oneway");
    let _cleanup = QueueCleanup::service(&queue);
    let worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let client = client().await;
    client.notify(&queue, Some("echo"), json!({"fire": "and forget"})).await.unwrap();
    worker
        .wait_metric_at_least(r#"warren_worker_requests_total{method="echo",outcome="ok"}"#, 1.0, CALL_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(worker.metric("warren_worker_reply_failures_total").await, 0.0);
}

#[tokio::test]
async fn a_reply_to_a_vanished_caller_does_not_disturb_the_worker() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-vanished");
    let _cleanup = QueueCleanup::service(&queue);
    let worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let caller = RawCaller::new().await;
    for reply_to in
        ["amq.rabbitmq.reply-to.g2dkABNyYWJiaXRAbG9jYWxob3N0AAAAAAAAAAAAAAAAAAAAAA==", "amq.gen-no-such-reply-queue"]
    {
        let properties = BasicProperties::default()
            .with_type("echo".into())
            .with_correlation_id("gone".into())
            .with_reply_to(reply_to.into());
        caller.publish(&queue, properties, b"1").await;
    }
    caller.close().await;
    worker
        .wait_metric_at_least(r#"warren_worker_requests_total{method="echo",outcome="ok"}"#, 2.0, CALL_TIMEOUT)
        .await
        .unwrap();
    let client = client().await;
    assert_eq!(
        client.call(&queue, Some("echo"), json!("still here"), CALL_TIMEOUT).await.unwrap(),
        json!("still here")
    );
    // The broker confirmed both replies (and dropped them): acked, nothing to redeliver, no session lost.
    assert_eq!(worker.metric("warren_worker_reply_failures_total").await, 0.0);
    assert_eq!(worker.metric("warren_worker_reconnects_total").await, 0.0);
}

// ---------------------------------------------------------------------------------------------------------------
// No worker, no queue

#[tokio::test]
async fn a_call_nobody_serves_times_out_after_its_timeout() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-noworker");
    let _cleanup = declare(&queue, &QueueOptions::default()).await;
    let client = client().await;
    let timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let result = client.call(&queue, Some("add"), json!([1, 2]), timeout).await;
    assert!(matches!(result, Err(CallError::Timeout)), "{result:?}");
    assert!(started.elapsed() >= timeout, "timed out early: {:?}", started.elapsed());
}

#[tokio::test]
async fn a_call_to_a_missing_queue_fails_at_once_with_no_such_service() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-missing");
    let client = client().await;
    let timeout = Duration::from_secs(120);
    let started = Instant::now();
    let result = client.call(&queue, Some("add"), json!([1, 2]), timeout).await;
    assert!(matches!(&result, Err(CallError::NoSuchService { queue: q }) if *q == queue), "{result:?}");
    assert!(started.elapsed() < timeout / 2, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn calls_to_a_missing_queue_fail_at_once_while_calls_on_the_same_client_are_answered() {
    let _broker = broker::shared().await;
    let served = unique_name("rpc-served");
    let missing = unique_name("rpc-missing");
    let _cleanup = QueueCleanup::service(&served);
    let _worker = WorkerCommand::new(&served).arg("--declare").start().await.unwrap();
    let client = client().await;
    // Interleaved on one channel, so the broker's confirms cover returned and delivered requests alike (a `multiple`
    // ack may hand a return to another call's confirm): every return must still reach its own call.
    let started = Instant::now();
    let calls = (0..200).map(|i| {
        let client = client.clone();
        let queue = if i % 2 == 0 { served.clone() } else { missing.clone() };
        async move {
            let result = client.call(&queue, Some("echo"), json!(i), CALL_TIMEOUT).await;
            (i, queue, result, started.elapsed())
        }
    });
    for (i, queue, result, elapsed) in futures::future::join_all(calls).await {
        if queue == served {
            assert_eq!(result.as_ref().ok(), Some(&json!(i)), "{result:?}");
        } else {
            assert!(matches!(&result, Err(CallError::NoSuchService { queue: q }) if *q == missing), "{result:?}");
            assert!(elapsed < CALL_TIMEOUT / 2, "call {i} to the missing queue took {elapsed:?}");
        }
    }
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(client.unmatched_replies(), 0);
}

#[tokio::test]
async fn a_call_to_a_full_queue_is_rejected_at_once() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-full");
    let options = QueueOptions { max_length: Some(1), ..QueueOptions::default() };
    let _cleanup = declare(&queue, &options).await;
    let client = client().await;
    // Nobody consumes. A quorum queue turns publishes away once it is over its limit, so two requests fill it and
    // the broker nacks the third.
    let filler = |n| client.call(&queue, Some("add"), json!([n, n]), Duration::from_millis(3000));
    let started = Instant::now();
    let (first, second, third) = tokio::join!(filler(1), filler(2), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.call(&queue, Some("add"), json!([3, 4]), CALL_TIMEOUT).await
    });
    assert!(matches!(first, Err(CallError::Timeout)), "{first:?}");
    assert!(matches!(second, Err(CallError::Timeout)), "{second:?}");
    assert!(matches!(&third, Err(CallError::Rejected { queue: q }) if *q == queue), "{third:?}");
    assert!(started.elapsed() < CALL_TIMEOUT / 2, "took {:?}", started.elapsed());
    assert_eq!(client.pending_calls(), 0);
}

// ---------------------------------------------------------------------------------------------------------------
// Load

#[tokio::test]
async fn a_thousand_concurrent_calls_each_get_their_own_answer_once() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-thousand");
    let _cleanup = QueueCleanup::service(&queue);
    let worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let client = client().await;
    let run = uuid::Uuid::new_v4().to_string();

    let calls = (0..1000).map(|i| {
        let client = client.clone();
        let queue = queue.clone();
        let params = json!({"id": i, "run": run});
        async move {
            let result = client.call(&queue, Some("echo"), params.clone(), Duration::from_secs(120)).await;
            (params, result)
        }
    });
    let results = futures::future::join_all(calls).await;
    for (params, result) in &results {
        assert_eq!(result.as_ref().ok(), Some(params), "{result:?}");
    }
    assert_eq!(client.unmatched_replies(), 0, "a caller got an answer that was not its own, or twice");
    assert_eq!(worker.metric(r#"warren_worker_requests_total{method="echo",outcome="ok"}"#).await, 1000.0);
}

// ---------------------------------------------------------------------------------------------------------------
// Several broker addresses

/// The environment's broker URI with `extra` hosts put before its own: `amqp://u:p@<extra>,<host>/vhost`.
fn uri_with_nodes_before(extra: &[String]) -> String {
    let uri = broker_uri();
    let (credentials, hosts) = uri.rsplit_once('@').expect("the test broker URI has credentials");
    format!("{credentials}@{},{hosts}", extra.join(","))
}

#[tokio::test]
async fn a_broker_uri_naming_a_dead_node_besides_a_live_one_connects_and_works() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-nodes");
    let _cleanup = QueueCleanup::service(&queue);
    let closed = warren_tests::operator_process::free_port();
    let dead_node = format!("127.0.0.1:{closed}");
    let uri = uri_with_nodes_before(std::slice::from_ref(&dead_node));
    // Each process starts at a random node: with 3 workers and 8 callers some start at the dead one.
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerCommand::new(&queue).broker_uri(&uri).arg("--declare").start().await.unwrap());
    }
    let mut answered = 0;
    let mut callers_on_the_dead_node = 0;
    for i in 0..8 {
        let client = Client::connect(&uri).await.expect("a caller connects through the live node");
        callers_on_the_dead_node += u32::from(client.broker_address().contains(&dead_node));
        assert_eq!(client.call(&queue, Some("add"), json!([i, 1]), CALL_TIMEOUT).await.unwrap(), json!(i + 1));
        answered += 1;
        client.close().await.unwrap();
    }
    let workers_that_tried_the_dead_node =
        workers.iter().filter(|w| w.log().contains(&format!("@{dead_node}/"))).count();
    for worker in &workers {
        assert!(!worker.log().contains("guest:guest"), "a worker logged the password");
    }
    eprintln!(
        "NODES dead+live URI: callers=8 answered={answered} callers_on_the_dead_node={callers_on_the_dead_node} \
         workers=3 workers_that_tried_the_dead_node={workers_that_tried_the_dead_node}"
    );
    assert_eq!(answered, 8);
    assert_eq!(callers_on_the_dead_node, 0);
    // The CLI takes the same URI.
    let output = std::process::Command::new(warren_tests::bin_path("warren"))
        .args(["--broker-uri", &uri, "call", &queue, "add", "[20, 22]"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "42");
}

// ---------------------------------------------------------------------------------------------------------------
// Worker death and shutdown

#[tokio::test]
async fn a_request_whose_worker_is_killed_is_answered_by_another_worker() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-sigkill");
    let _cleanup = QueueCleanup::service(&queue);
    let command = WorkerCommand::new(&queue).args(["--declare", "--prefetch", "1"]);
    let mut first = command.start().await.unwrap();
    let client = client().await;

    let call = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(
            async move { client.call(&queue, Some("sleep"), json!({"ms": 2000}), Duration::from_secs(120)).await },
        )
    };
    first.wait_metric_at_least("warren_worker_requests_in_flight", 1.0, CALL_TIMEOUT).await.unwrap();
    first.kill().await.unwrap();

    let second = command.start().await.unwrap();
    let result = call.await.unwrap();
    assert_eq!(result.unwrap(), json!({"slept_ms": 2000}));
    assert_eq!(second.metric(r#"warren_worker_requests_total{method="sleep",outcome="ok"}"#).await, 1.0);
}

/// `n` calls to `sleep`, each for a different time, so they finish in another order than they were delivered.
async fn out_of_order_calls(client: &Client, queue: &str, n: u64, run: &str) -> Vec<Result<Value, CallError>> {
    let calls = (0..n).map(|i| {
        let (client, queue) = (client.clone(), queue.to_owned());
        // A permutation of 0..50 ms, with the run's id so a reply can only match its own call.
        let params = json!({"ms": (i * 37) % 50, "run": run, "i": i});
        async move { client.call(&queue, Some("sleep"), params, Duration::from_secs(120)).await }
    });
    futures::future::join_all(calls).await
}

/// The requests a queue holds ready (not delivered), exactly (a passive declare, not the management API's sampled
/// figures).
async fn ready_messages(queue: &str) -> u32 {
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap();
    let _ = connection.close(200, "counted".into()).await;
    declared.message_count()
}

/// The worker acks answered requests in batches (one `multiple` ack per contiguous run of delivery tags). Requests
/// answered out of order must each be acked exactly once: an ack of an unknown or already acked tag would make the
/// broker close the channel (a reconnect), a missing ack would leave the request to come back when the worker
/// stops, and a `multiple` ack over a request still running would lose it. A session that dies in the middle of
/// a batch must lose nothing either: what it had not acked is redelivered and answered.
#[tokio::test]
async fn requests_answered_out_of_order_are_acked_once_and_none_is_lost_when_a_session_dies() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-batched-acks");
    let _cleanup = QueueCleanup::service(&queue);
    let command = WorkerCommand::new(&queue).args(["--declare", "--prefetch", "64"]);
    let mut worker = command.start().await.unwrap();
    let client = client().await;
    let run = uuid::Uuid::new_v4().to_string();

    let results = out_of_order_calls(&client, &queue, 300, &run).await;
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.as_ref().ok().and_then(|v| v.get("slept_ms")), Some(&json!((i as u64 * 37) % 50)));
    }
    assert_eq!(worker.metric(r#"warren_worker_requests_total{method="sleep",outcome="ok"}"#).await, 300.0);
    assert_eq!(worker.metric("warren_worker_reconnects_total").await, 0.0, "{}", worker.log_tail());
    assert_eq!(client.unmatched_replies(), 0, "a request ran twice, or a caller got an answer not its own");

    // The session dies with requests in flight: its consuming connection is closed under it (found before the
    // calls start, so that closing it takes no longer than the management API's DELETE).
    let management = broker::management();
    let consume_name = format!("warren-worker {queue} consume");
    let deadline = Instant::now() + CALL_TIMEOUT;
    let connection = loop {
        let connections = management.connections().await.unwrap();
        let found = connections.iter().find(|c| c["client_properties"]["connection_name"] == consume_name.as_str());
        if let Some(name) = found.and_then(|c| c["name"].as_str()) {
            break name.to_owned();
        }
        assert!(Instant::now() < deadline, "the worker's consuming connection never showed in the management API");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let calls = {
        let (client, queue, run) = (client.clone(), queue.clone(), run.clone());
        tokio::spawn(async move { out_of_order_calls(&client, &queue, 1000, &run).await })
    };
    worker.wait_metric_at_least("warren_worker_requests_in_flight", 32.0, CALL_TIMEOUT).await.unwrap();
    management.close_connection(&connection).await.unwrap();
    for (i, result) in calls.await.unwrap().iter().enumerate() {
        assert_eq!(result.as_ref().ok().and_then(|v| v.get("slept_ms")), Some(&json!((i as u64 * 37) % 50)), "{i}");
    }
    worker.wait_metric_at_least("warren_worker_reconnects_total", 1.0, CALL_TIMEOUT).await.unwrap();
    // The requests in flight when the session died ran again (their second replies are dropped by the caller):
    // proof that it died in the middle, not after the last call.
    let runs = worker.metric(r#"warren_worker_requests_total{method="sleep",outcome="ok"}"#).await;
    assert!(runs > 1300.0, "{runs} runs: the session did not die with requests in flight");

    // Every answered request was acked: none comes back to the queue when the worker stops.
    worker.sigterm().unwrap();
    assert!(worker.wait_exit(CALL_TIMEOUT).await.unwrap().success(), "{}", worker.log_tail());
    assert!(worker.log().contains("every received request was answered"), "{}", worker.log_tail());
    assert_eq!(ready_messages(&queue).await, 0, "requests answered but not acked came back to the queue");
}

#[tokio::test]
async fn sigterm_answers_every_request_in_flight_then_exits_zero() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-sigterm");
    let _cleanup = QueueCleanup::service(&queue);
    let command = WorkerCommand::new(&queue).args(["--declare", "--prefetch", "4"]);
    let mut first = command.start().await.unwrap();
    let client = client().await;
    // A worker takes its first request alone (it may be a returned one), then opens its prefetch window.
    assert_eq!(client.call(&queue, Some("echo"), json!("warm-up"), CALL_TIMEOUT).await.unwrap(), json!("warm-up"));

    // Six calls: four in flight on the worker (its prefetch), two waiting in the queue.
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let (client, queue) = (client.clone(), queue.clone());
            tokio::spawn(async move {
                client.call(&queue, Some("sleep"), json!({"ms": 1500 + i}), Duration::from_secs(120)).await
            })
        })
        .collect();
    first.wait_metric_at_least("warren_worker_requests_in_flight", 4.0, CALL_TIMEOUT).await.unwrap();
    first.sigterm().unwrap();
    let status = first.wait_exit(CALL_TIMEOUT).await.unwrap();
    assert!(status.success(), "exit status {status}:\n{}", first.log_tail());
    assert!(first.log().contains("every received request was answered"), "{}", first.log_tail());

    // The two requests never delivered are still in the queue; a new worker answers them, and only them.
    let second = command.start().await.unwrap();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), json!({"slept_ms": 1500 + i}));
    }
    assert_eq!(second.metric(r#"warren_worker_requests_total{method="sleep",outcome="ok"}"#).await, 2.0);
}

#[tokio::test]
async fn a_poison_request_is_dead_lettered_after_the_delivery_limit() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-poison");
    let _cleanup = QueueCleanup::service(&queue);
    let command = WorkerCommand::new(&queue).args(["--declare", "--delivery-limit", "2", "--enable-crash-method"]);
    let mut worker = command.start().await.unwrap();
    let client = client().await;
    client.notify(&queue, Some("crash"), json!({"poison": true})).await.unwrap();

    // Supervise like a Deployment would: restart the worker whenever it dies, until the request is dead-lettered.
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let dead_queue = dead_letter_queue_name(&queue);
    let mut crashes = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let dead = loop {
        assert!(Instant::now() < deadline, "not dead-lettered after {crashes} crashes");
        if let Some(message) =
            channel.basic_get(dead_queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap()
        {
            break message;
        }
        if let Some(status) = worker.try_exit_status().unwrap() {
            assert!(!status.success(), "the worker exited cleanly instead of crashing");
            crashes += 1;
            // Not `start`: the new worker may crash on the poison before it is seen ready.
            worker = command.spawn().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.delivery.properties.kind().as_ref().map(ShortString::as_str), Some("crash"));
    assert_eq!(serde_json::from_slice::<Value>(&dead.delivery.data).unwrap(), json!({"poison": true}));
    let _ = connection.close(200, "done".into()).await;

    // A worker outlives the poison and serves normally (the one that took the last delivery died with it).
    if worker.try_exit_status().unwrap().is_some() {
        crashes += 1;
        worker = command.spawn().unwrap();
    }
    assert_eq!(crashes, 3, "one delivery and two redeliveries (the delivery limit), each crashing a worker");
    worker.wait_ready(CALL_TIMEOUT).await.unwrap();
    assert_eq!(client.call(&queue, Some("add"), json!([1, 1]), CALL_TIMEOUT).await.unwrap(), json!(2));
}

// ---------------------------------------------------------------------------------------------------------------
// Broker restart

#[tokio::test]
async fn broker_restart_under_load_ends_every_call_and_the_worker_consumes_again() {
    let _broker = broker::disruption().await;
    let overall = tokio::time::timeout(Duration::from_secs(300), broker_restart_under_load()).await;
    // Whatever happened, the broker is running again for the next test.
    let restarted = tokio::task::spawn_blocking(broker::start_app).await.unwrap();
    overall.expect("the broker restart test did not finish within 5 minutes");
    restarted.expect("restart the broker");
}

/// `add [20, 22]` until it is answered, at most `tries` times, half a second apart; the last result.
async fn add_until_answered(client: &Client, queue: &str, tries: u32) -> Result<serde_json::Value, CallError> {
    let mut result = Err(CallError::Timeout);
    for _ in 0..tries {
        result = client.call(queue, Some("add"), json!([20, 22]), Duration::from_secs(5)).await;
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    result
}

async fn broker_restart_under_load() {
    let queue = unique_name("rpc-restart");
    let _cleanup = QueueCleanup::service(&queue);
    let mut worker = WorkerCommand::new(&queue).arg("--declare").start().await.unwrap();
    let client = client().await;
    let call_timeout = Duration::from_secs(3);

    #[derive(Debug, Default)]
    struct Tally {
        ok: u64,
        errors: std::collections::BTreeMap<&'static str, u64>,
        hung: u64,
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Six callers of quick echoes, and two of 4 s sleeps: those are still running in the worker when its session
    // dies, finish after it reconnected, and must not ack on the new session.
    let load: Vec<_> = (0..8)
        .map(|task| {
            let (client, queue, stop) = (client.clone(), queue.clone(), stop.clone());
            let slow = task >= 6;
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                    i += 1;
                    let (method, params, expected, timeout) = if slow {
                        ("sleep", json!({"ms": 4000}), json!({"slept_ms": 4000}), Duration::from_secs(10))
                    } else {
                        ("echo", json!([task, i]), json!([task, i]), call_timeout)
                    };
                    // The call's own timeout bounds it; the outer one only catches a hang.
                    let call = client.call(&queue, Some(method), params, timeout);
                    match tokio::time::timeout(timeout + Duration::from_secs(10), call).await {
                        Ok(Ok(value)) => {
                            assert_eq!(value, expected, "a caller got someone else's answer");
                            tally.ok += 1;
                        }
                        Ok(Err(error)) => {
                            *tally.errors.entry(error.kind().as_str()).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(_) => tally.hung += 1,
                    }
                }
                tally
            })
        })
        .collect();

    worker
        .wait_metric_at_least(r#"warren_worker_requests_total{method="echo",outcome="ok"}"#, 100.0, CALL_TIMEOUT)
        .await
        .unwrap();
    tokio::task::spawn_blocking(broker::stop_app).await.unwrap().expect("stop the broker");
    // The worker notices: it is no longer ready while the broker is away.
    let deadline = Instant::now() + Duration::from_secs(30);
    while worker.ready().await {
        assert!(Instant::now() < deadline, "the worker still claims readiness with the broker stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(worker.healthy().await, "the worker process should stay alive through a broker outage");
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(broker::start_app).await.unwrap().expect("start the broker");

    worker.wait_ready(Duration::from_secs(60)).await.unwrap();
    // A call after the restart succeeds. A fresh client first, so this checks the worker, not the caller's reconnect.
    let fresh = connect_client_retrying(Duration::from_secs(60)).await;
    let after = add_until_answered(&fresh, &queue, 60).await;
    assert_eq!(after.expect("no answer after the restart"), json!(42));
    // The long-lived client the load used reconnects by itself: a caller never has to rebuild it.
    let recovered = add_until_answered(&client, &queue, 30).await;
    assert_eq!(recovered.expect("the load's client did not recover after the restart"), json!(42));

    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for task in load {
        let tally = task.await.unwrap();
        total.ok += tally.ok;
        total.hung += tally.hung;
        for (kind, n) in tally.errors {
            *total.errors.entry(kind).or_default() += n;
        }
    }
    eprintln!("calls across the restart: {total:?}");
    assert_eq!(total.hung, 0, "calls hung past their timeout: {total:?}");
    assert!(total.ok >= 100, "{total:?}");
    // Every handler has finished, including those whose session died under them; none of their late acks landed
    // on the new session (an unknown delivery tag would have closed it, and the worker would have reconnected
    // again), and the worker still answers.
    worker.wait_metric_at_most("warren_worker_requests_in_flight", 0.0, Duration::from_secs(30)).await.unwrap();
    assert_eq!(fresh.call(&queue, Some("add"), json!([1, 2]), Duration::from_secs(10)).await.unwrap(), json!(3));
    assert_eq!(worker.metric("warren_worker_reconnects_total").await, 1.0, "{}", worker.log_tail());
    assert!(worker.try_exit_status().unwrap().is_none(), "the worker died:\n{}", worker.log_tail());
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP handler

/// What the test backend saw of one request.
#[derive(Debug, Clone)]
struct SeenRequest {
    method: String,
    path: String,
    method_header: Option<String>,
    traceparent: Option<String>,
    body: Value,
}

/// A tiny HTTP/1.1 backend: `/rpc/add` sums, `/rpc/teapot` answers 418, anything else 404. Only POSTs are reported
/// (the worker's probe of the backend is a GET).
async fn start_backend() -> (String, tokio::sync::mpsc::UnboundedReceiver<SeenRequest>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/rpc", listener.local_addr().unwrap());
    let (seen, seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(request) = read_request(&mut stream).await else { return };
                let (status, body) = match request.path.as_str() {
                    "/rpc/add" => {
                        let sum = request.body[0].as_i64().unwrap_or(0) + request.body[1].as_i64().unwrap_or(0);
                        ("200 OK", sum.to_string())
                    }
                    "/rpc/teapot" => ("418 I'm a teapot", r#"{"why":"short and stout"}"#.to_owned()),
                    _ => ("404 Not Found", "no such method".to_owned()),
                };
                if request.method == "POST" {
                    let _ = seen.send(request);
                }
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, seen_rx)
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<SeenRequest> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buffer.len() > 1 << 20 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.lines();
    let mut request_line = lines.next()?.split_whitespace();
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(SeenRequest {
        method,
        path,
        method_header: header("x-warren-method"),
        traceparent: header("traceparent"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

#[tokio::test]
async fn the_http_handler_forwards_calls_and_maps_non_2xx_to_handler_error() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-http");
    let _cleanup = QueueCleanup::service(&queue);
    let (url, mut seen) = start_backend().await;
    let _worker = WorkerCommand::new(&queue).handler(&url).arg("--declare").start().await.unwrap();
    let client = client().await;

    let trace = TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: None,
    };
    let options = CallOptions { timeout: CALL_TIMEOUT, trace: Some(trace.clone()) };
    assert_eq!(client.call_with(&queue, Some("add"), &json!([3, 4]), &options).await.unwrap(), json!(7));
    let request = seen.recv().await.unwrap();
    assert_eq!(request.path, "/rpc/add");
    assert_eq!(request.method_header.as_deref(), Some("add"));
    assert_eq!(request.traceparent.as_deref(), Some(trace.traceparent.as_str()));
    assert_eq!(request.body, json!([3, 4]));

    match client.call(&queue, Some("teapot"), json!({}), CALL_TIMEOUT).await {
        Err(CallError::Remote { code, details, .. }) => {
            assert_eq!(code, "handler_error");
            assert_eq!(details, Some(json!({"status": 418, "body": {"why": "short and stout"}})));
        }
        other => panic!("expected a handler_error, got {other:?}"),
    }
    let missing = client.call(&queue, Some("nope"), json!({}), CALL_TIMEOUT).await;
    assert_eq!(remote_code(&missing), Some("handler_error"), "{missing:?}");
}

#[tokio::test]
async fn an_unreachable_http_handler_takes_no_work_until_it_answers() {
    let _broker = broker::shared().await;
    let queue = unique_name("rpc-http-down");
    let _cleanup = QueueCleanup::service(&queue);
    let port = warren_tests::operator_process::free_port();
    let url = format!("http://127.0.0.1:{port}/rpc");
    let mut worker = WorkerCommand::new(&queue).handler(&url).arg("--declare").spawn().unwrap();
    worker.wait_healthy(CALL_TIMEOUT).await.unwrap();
    let client = client().await;
    // Not an error reply: the request waits in the queue while the worker, not ready, probes its backend.
    client.notify(&queue, Some("add"), json!([1, 2])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!worker.ready().await);
    assert_eq!(worker.metric(r#"warren_worker_requests_total{method="add",outcome="internal"}"#).await, 0.0);
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let waiting = channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(waiting.message_count(), 1);
    let _ = connection.close(200, "done".into()).await;
}
