//! warren-client against the real broker, with responders written here in plain lapin (no warren worker).
//!
//! Needs RabbitMQ at WARREN_BROKER_URI (default amqp://guest:guest@127.0.0.1:5672/%2f) and its management API at
//! WARREN_MANAGEMENT_URI (default http://guest:guest@127.0.0.1:15672).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use warren_client::endpoint::BrokerEndpoint;
use warren_client::envelope;
use warren_client::management::Management;
use warren_client::protocol::{DIRECT_REPLY_TO, ErrorBody, ErrorCode, HEADER_STATUS};
use warren_client::{CallError, CallOptions, Client, TraceContext};

fn broker_uri() -> String {
    BrokerEndpoint::from_env().amqp_uri
}

fn unique_queue(what: &str) -> String {
    format!("warren-client-test.{what}.{}", uuid::Uuid::new_v4().simple())
}

/// A broker connection of the test's own, with an exclusive (self-deleting) queue named `queue`.
async fn test_queue(queue: &str) -> (Connection, Channel) {
    let connection = Connection::connect(&broker_uri(), ConnectionProperties::default()).await.expect("broker");
    let channel = connection.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    channel.queue_declare(queue.into(), exclusive, FieldTable::default()).await.unwrap();
    (connection, channel)
}

/// What a hand-written responder publishes for one request: `(correlation_id, x-status, body)` triples.
type Replies = Vec<(String, &'static str, Vec<u8>)>;

/// Serves `queue` until the test ends: for each request, publishes what `answer` returns to its `reply_to`.
async fn responder<F>(queue: &str, answer: F) -> Connection
where
    F: Fn(&BasicProperties, &[u8]) -> Replies + Send + Sync + 'static,
{
    let (connection, channel) = test_queue(queue).await;
    let requests = channel
        .basic_consume(queue.into(), "test-responder".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        requests
            .for_each_concurrent(64, |request| {
                let (channel, answer) = (channel.clone(), answer.clone());
                async move {
                    let Ok(request) = request else { return };
                    let reply_to = request.properties.reply_to().clone().expect("a call has reply_to");
                    for (correlation_id, status, body) in answer(&request.properties, &request.data) {
                        let mut headers = FieldTable::default();
                        headers.insert(HEADER_STATUS.into(), AMQPValue::LongString(LongString::from(status)));
                        let props = BasicProperties::default()
                            .with_correlation_id(correlation_id.into())
                            .with_content_type("application/json".into())
                            .with_headers(headers);
                        channel
                            .basic_publish("".into(), reply_to.clone(), BasicPublishOptions::default(), &body, props)
                            .await
                            .unwrap();
                    }
                    request.ack(BasicAckOptions::default()).await.unwrap();
                }
            })
            .await;
    });
    connection
}

fn correlation_id(props: &BasicProperties) -> String {
    props.correlation_id().as_ref().unwrap().to_string()
}

fn echo(props: &BasicProperties, body: &[u8]) -> Replies {
    vec![(correlation_id(props), "ok", body.to_vec())]
}

#[tokio::test]
async fn a_call_returns_the_responders_result() {
    let queue = unique_queue("echo");
    let _responder = responder(&queue, echo).await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    let result = client.call(&queue, Some("echo"), json!({"a": [1, 2]}), Duration::from_secs(10)).await.unwrap();
    assert_eq!(result, json!({"a": [1, 2]}));
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn a_call_to_a_missing_queue_fails_with_no_such_service_instead_of_waiting() {
    let client = Client::connect(&broker_uri()).await.unwrap();
    let queue = unique_queue("missing");
    let timeout = Duration::from_secs(60);
    let started = Instant::now();
    let error = client.call(&queue, Some("add"), json!([1, 2]), timeout).await.unwrap_err();
    assert!(matches!(&error, CallError::NoSuchService { queue: q } if *q == queue), "{error:?}");
    assert!(started.elapsed() < timeout, "it returned before the call's timeout");
    // The channel survives a returned message.
    let again = client.call(&queue, None, json!(null), timeout).await.unwrap_err();
    assert!(matches!(again, CallError::NoSuchService { .. }), "{again:?}");
}

#[tokio::test]
async fn a_call_nobody_answers_times_out_after_its_timeout() {
    let queue = unique_queue("silent");
    let (_connection, _channel) = test_queue(&queue).await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let error = client.call(&queue, Some("add"), json!([1, 2]), timeout).await.unwrap_err();
    assert!(matches!(error, CallError::Timeout), "{error:?}");
    assert!(started.elapsed() >= timeout);
    assert_eq!(client.pending_calls(), 0, "a timed-out call leaves nothing behind");
}

/// The next request waiting in `queue`.
async fn next_request(channel: &Channel, queue: &str) -> lapin::message::Delivery {
    for _ in 0..400 {
        if let Some(message) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            return message.delivery;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no request arrived in {queue}");
}

#[tokio::test]
async fn a_request_carries_the_documented_properties() {
    let queue = unique_queue("inspect");
    let (_connection, channel) = test_queue(&queue).await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    let trace = TraceContext {
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        tracestate: Some("vendor=1".into()),
    };
    let options = CallOptions { timeout: Duration::from_secs(30), trace: Some(trace.clone()) };
    let before = envelope::unix_ms_now();
    // Nobody answers these calls; they wait in the background while the test reads their requests.
    let call = |method: Option<&'static str>, params: Value| {
        let (client, queue, options) = (client.clone(), queue.clone(), options.clone());
        tokio::spawn(async move { client.call_with(&queue, method, &params, &options).await })
    };
    let _first_call = call(Some("add"), json!([1, 2]));
    let first = next_request(&channel, &queue).await;
    let _second_call = call(None, json!([3]));
    let second = next_request(&channel, &queue).await;

    let props = &first.properties;
    assert_eq!(serde_json::from_slice::<Value>(&first.data).unwrap(), json!([1, 2]));
    assert_eq!(props.kind().as_ref().unwrap().as_str(), "add");
    assert_eq!(props.content_type().as_ref().unwrap().as_str(), "application/json");
    assert!(props.reply_to().as_ref().unwrap().as_str().starts_with(DIRECT_REPLY_TO));
    assert!(props.correlation_id().is_some());
    assert_eq!(props.expiration().as_ref().unwrap().as_str(), "30000");
    let deadline = envelope::deadline_unix_ms(props).expect("x-deadline") as u64;
    assert!(deadline >= before + 30_000 && deadline <= envelope::unix_ms_now() + 30_000, "deadline = now + timeout");
    assert_eq!(envelope::trace_context(props), Some(trace));

    assert!(second.properties.kind().is_none(), "the default method sends no type");
    assert_ne!(second.properties.message_id(), props.message_id(), "message ids are unique per call");
    assert_ne!(second.properties.correlation_id(), props.correlation_id());
}

#[tokio::test]
async fn a_thousand_concurrent_calls_each_get_their_own_answer_once() {
    let queue = unique_queue("fanout");
    // Every reply is sent twice, as after a redelivery: the duplicate must be dropped.
    let _responder = responder(&queue, |props, body| {
        let reply = (correlation_id(props), "ok", body.to_vec());
        vec![reply.clone(), reply]
    })
    .await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    let calls = (0..1000).map(|i| {
        let client = client.clone();
        let queue = queue.clone();
        tokio::spawn(async move { (i, client.call(&queue, Some("echo"), json!([i]), Duration::from_secs(60)).await) })
    });
    let mut answered = HashSet::new();
    for call in futures::future::join_all(calls).await {
        let (i, result) = call.unwrap();
        assert_eq!(result.unwrap(), json!([i]), "call {i} got another call's answer");
        assert!(answered.insert(i));
    }
    assert_eq!(answered.len(), 1000);
    // The 1,000 duplicates arrive after their originals; wait for them to be dropped.
    for _ in 0..200 {
        if client.unmatched_replies() >= 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.unmatched_replies(), 1000);
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn replies_with_unknown_correlation_ids_are_dropped_and_the_client_keeps_working() {
    let queue = unique_queue("stray");
    let _responder = responder(&queue, |props, body| {
        vec![
            ("not-a-number".into(), "ok", b"\"stray\"".to_vec()),
            ("987654321".into(), "ok", b"\"stray\"".to_vec()),
            (correlation_id(props), "ok", body.to_vec()),
        ]
    })
    .await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    for i in 0..3 {
        let result = client.call(&queue, Some("echo"), json!(i), Duration::from_secs(10)).await.unwrap();
        assert_eq!(result, json!(i));
    }
    assert!(client.unmatched_replies() >= 4, "the stray replies were seen and dropped");
}

#[tokio::test]
async fn a_late_reply_after_the_timeout_is_dropped() {
    let queue = unique_queue("late");
    let (_connection, channel) = test_queue(&queue).await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    let timeout = Duration::from_millis(300);
    let call = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(async move { client.call(&queue, Some("echo"), json!(1), timeout).await })
    };
    // A slow responder: takes the request at once, answers after the caller gave up.
    let request = next_request(&channel, &queue).await;
    let error = call.await.unwrap().unwrap_err();
    assert!(matches!(error, CallError::Timeout), "{error:?}");
    let props = BasicProperties::default().with_correlation_id(correlation_id(&request.properties).into());
    let reply_to = request.properties.reply_to().clone().unwrap();
    channel.basic_publish("".into(), reply_to, BasicPublishOptions::default(), b"1", props).await.unwrap();
    for _ in 0..200 {
        if client.unmatched_replies() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.unmatched_replies(), 1);
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn error_replies_become_typed_remote_errors() {
    let queue = unique_queue("failing");
    let _responder = responder(&queue, |props, _| {
        let error = ErrorBody::new(ErrorCode::HandlerError, "division by zero").with_details(json!({"divisor": 0}));
        vec![(correlation_id(props), "error", serde_json::to_vec(&error).unwrap())]
    })
    .await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    match client.call(&queue, Some("div"), json!([1, 0]), Duration::from_secs(10)).await {
        Err(CallError::Remote { code, message, details }) => {
            assert_eq!(code, "handler_error");
            assert_eq!(message, "division by zero");
            assert_eq!(details, Some(json!({"divisor": 0})));
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[tokio::test]
async fn notify_sends_a_one_way_request_and_reports_a_missing_queue() {
    let queue = unique_queue("oneway");
    let (_connection, channel) = test_queue(&queue).await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    client.notify(&queue, Some("log"), json!({"line": "hello"})).await.unwrap();
    let request = next_request(&channel, &queue).await;
    let props = &request.properties;
    assert!(props.reply_to().is_none() && props.correlation_id().is_none());
    assert_eq!(props.kind().as_ref().unwrap().as_str(), "log");
    assert!(props.message_id().is_some());

    let error = client.notify(&unique_queue("missing"), None, json!(null)).await.unwrap_err();
    assert!(matches!(error, CallError::NoSuchService { .. }), "{error:?}");
}

#[tokio::test]
async fn names_over_255_bytes_are_invalid_requests() {
    let client = Client::connect(&broker_uri()).await.unwrap();
    let long = "q".repeat(256);
    let error = client.call(&long, None, json!(null), Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(error, CallError::InvalidRequest(_)), "{error:?}");
    let error = client.call("q", Some(&long), json!(null), Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(error, CallError::InvalidRequest(_)), "{error:?}");
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_with_connection() {
    let error = Client::connect("amqp://guest:guest@127.0.0.1:1/%2f").await.err().expect("nothing listens on port 1");
    assert!(matches!(error, CallError::Connection(_)), "{error:?}");
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

#[tokio::test]
async fn every_node_down_fails_with_connection_naming_each_without_the_password() {
    let (a, b) = (closed_port(), closed_port());
    let uri = format!("amqp://guest:s3cret@127.0.0.1:{a},127.0.0.1:{b}/%2f");
    let error = Client::connect(&uri).await.err().expect("nothing listens on either port");
    let text = error.to_string();
    assert!(matches!(error, CallError::Connection(_)), "{error:?}");
    assert!(text.contains(&format!("127.0.0.1:{a}")) && text.contains(&format!("127.0.0.1:{b}")), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[tokio::test]
async fn the_management_client_moves_past_a_dead_node_and_stays_on_the_live_one() {
    let live = BrokerEndpoint::from_env().management_uri;
    let (credentials, host) = live.rsplit_once('@').expect("the management URI has credentials");
    let dead = closed_port();
    let uri = format!("{credentials}@127.0.0.1:{dead},{host}");
    let mut started_on_the_dead_node = 0;
    for _ in 0..6 {
        let management = Management::new(&uri).unwrap();
        started_on_the_dead_node += u32::from(management.current_base().port() == Some(dead));
        management.overview().await.expect("the live node answers");
        assert_ne!(management.current_base().port(), Some(dead));
        management.overview().await.unwrap();
    }
    eprintln!("management clients=6 started_on_the_dead_node={started_on_the_dead_node} all answered");
}

/// Closes the connection with this client-given name through the management API, waiting for the broker to list
/// it first.
async fn close_connection(connection_name: &str) {
    let management = Management::new(&BrokerEndpoint::from_env().management_uri).unwrap();
    for _ in 0..200 {
        let connections = management.connections().await.unwrap();
        let ours = connections.iter().find(|c| c["client_properties"]["connection_name"] == connection_name);
        if let Some(name) = ours.and_then(|c| c["name"].as_str()) {
            management.close_connection(name).await.unwrap_or_else(|e| panic!("closing {name}: {e}"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the broker never listed connection {connection_name:?}");
}

#[tokio::test]
async fn a_lost_connection_fails_waiting_calls_and_the_next_call_reconnects() {
    let queue = unique_queue("lost");
    let (_connection, _channel) = test_queue(&queue).await;
    let client = Client::connect(&broker_uri()).await.unwrap();
    let waiting = {
        let (client, queue) = (client.clone(), queue.clone());
        tokio::spawn(async move { client.call(&queue, Some("echo"), json!(1), Duration::from_secs(600)).await })
    };
    while client.pending_calls() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_connection = client.connection_name();
    close_connection(&first_connection).await;

    // A hang guard only: the call must end long before its own 600 s timeout.
    let result = tokio::time::timeout(Duration::from_secs(60), waiting).await.expect("the call did not hang").unwrap();
    assert!(matches!(result, Err(CallError::Connection(_))), "{result:?}");

    let error = client.call(&unique_queue("missing"), None, json!(null), Duration::from_secs(30)).await.unwrap_err();
    assert!(matches!(error, CallError::NoSuchService { .. }), "a fresh connection answers: {error:?}");
    assert_ne!(client.connection_name(), first_connection);
}
