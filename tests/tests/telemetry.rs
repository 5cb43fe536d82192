//! Traces: the worker's span for each delivery, exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! continues the caller's W3C `traceparent` and names the queue, the method and the correlation id; the operator's
//! span for each reconcile names the RpcService and its namespace. The collector
//! here is an OTLP/HTTP receiver of the test's own that decodes the protobuf the exporter sends (no OpenTelemetry
//! Collector build is available on this machine); the worker is the real binary on the real broker.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use warren_client::{CallOptions, Client, TraceContext};
use warren_operator::RpcService;
use warren_tests::broker::{self, QueueCleanup};
use warren_tests::cluster::{self, TestNamespace};
use warren_tests::operator_process::OperatorProcess;
use warren_tests::worker_process::WorkerCommand;
use warren_tests::{broker_uri, unique_name};

/// Every span the receiver got, with its resource's `service.name`.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }
}

async fn start_receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP/HTTP protobuf export");
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| string_value(a.value.as_ref()?.value.as_ref()?))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            store.0.lock().unwrap().push((service.clone(), span));
                        }
                    }
                }
                let response = ExportTraceServiceResponse::default().encode_to_vec();
                ([("content-type", "application/x-protobuf")], response)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, received)
}

fn string_value(value: &AnyValue) -> Option<String> {
    match value {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::BoolValue(b) => Some(b.to_string()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        _ => None,
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| string_value(a.value.as_ref()?.value.as_ref()?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn the_workers_delivery_span_continues_the_callers_trace_over_otlp() {
    let _broker = broker::shared().await;
    let queue = unique_name("otlp");
    let _cleanup = QueueCleanup::service(&queue);
    let (collector, received) = start_receiver().await;
    let _worker = WorkerCommand::new(&queue)
        .arg("--declare")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{collector}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();

    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traced = CallOptions {
        timeout: Duration::from_secs(10),
        trace: Some(TraceContext {
            traceparent: format!("00-{trace_id}-{parent_id}-01"),
            tracestate: Some("vendor=1".into()),
        }),
    };
    let answer = client.call_with(&queue, Some("echo"), &json!({"traced": true}), &traced).await.unwrap();
    assert_eq!(answer, json!({"traced": true}));
    // A caller that sends no trace context (the tutorial's, pika's) starts a new trace at the worker.
    client.call(&queue, Some("add"), json!([1, 2]), Duration::from_secs(10)).await.unwrap();

    let deliveries = || -> Vec<Span> {
        received.spans().into_iter().filter(|(_, s)| s.name == "delivery").map(|(_, s)| s).collect()
    };
    let mut waited = Duration::ZERO;
    while deliveries().len() < 2 && waited < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    let spans = received.spans();
    for (service, span) in &spans {
        eprintln!(
            "OTLP span {service}/{} trace={} parent={} attributes={:?}",
            span.name,
            hex(&span.trace_id),
            hex(&span.parent_span_id),
            span.attributes.iter().map(|a| &a.key).collect::<Vec<_>>()
        );
    }
    let deliveries = deliveries();
    assert_eq!(deliveries.len(), 2, "one delivery span per call, exported within 30 s: {} spans", spans.len());
    assert!(spans.iter().all(|(service, _)| service == "warren-worker"), "service.name");

    let continued = deliveries.iter().find(|s| attribute(s, "method").as_deref() == Some("echo")).unwrap();
    assert_eq!(hex(&continued.trace_id), trace_id, "the caller's trace continues at the worker");
    assert_eq!(hex(&continued.parent_span_id), parent_id, "the caller's span is the parent");
    assert_eq!(attribute(continued, "queue").as_deref(), Some(queue.as_str()));
    assert!(attribute(continued, "correlation_id").is_some_and(|c| !c.is_empty()), "the correlation id is recorded");
    assert_eq!(continued.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Consumer as i32);

    let root = deliveries.iter().find(|s| attribute(s, "method").as_deref() == Some("add")).unwrap();
    assert_ne!(hex(&root.trace_id), trace_id);
    assert!(root.parent_span_id.is_empty(), "no traceparent: a root span");
}

/// With traces exported, the HTTP handler's backend is called as a child of the worker's delivery span (so the
/// backend's own span nests under it, not beside it), in the caller's trace.
#[tokio::test]
async fn the_http_backend_is_called_as_a_child_of_the_delivery_span() {
    let _broker = broker::shared().await;
    let queue = unique_name("otlp-http");
    let _cleanup = QueueCleanup::service(&queue);
    let (collector, received) = start_receiver().await;
    let seen = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let store = seen.clone();
    let backend = axum::Router::new()
        .route(
            "/rpc/{method}",
            post(move |headers: axum::http::HeaderMap, body: Bytes| {
                let store = store.clone();
                async move {
                    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok()).map(String::from);
                    store.lock().unwrap().push(traceparent);
                    body
                }
            }),
        )
        .route("/rpc", axum::routing::get(|| async { "up" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/rpc", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, backend).await });
    let _worker = WorkerCommand::new(&queue)
        .handler(&url)
        .arg("--declare")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &format!("http://{collector}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .start()
        .await
        .unwrap();
    let client = Client::connect(&broker_uri()).await.unwrap();

    let (trace_id, parent_id) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let traced = CallOptions {
        timeout: Duration::from_secs(10),
        trace: Some(TraceContext { traceparent: format!("00-{trace_id}-{parent_id}-01"), tracestate: None }),
    };
    assert_eq!(client.call_with(&queue, Some("echo"), &json!([5]), &traced).await.unwrap(), json!([5]));

    let mut waited = Duration::ZERO;
    let delivery = loop {
        let found = received.spans().into_iter().map(|(_, s)| s).find(|s| s.name == "delivery");
        if let Some(span) = found {
            break span;
        }
        assert!(waited < Duration::from_secs(30), "no delivery span exported within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    };
    let forwarded = seen.lock().unwrap().clone();
    eprintln!(
        "delivery span {} (parent {}); the backend saw {forwarded:?}",
        hex(&delivery.span_id),
        hex(&delivery.parent_span_id)
    );
    assert_eq!(hex(&delivery.trace_id), trace_id);
    assert_eq!(hex(&delivery.parent_span_id), parent_id, "the caller's span is the delivery's parent");
    let expected = format!("00-{trace_id}-{}-01", hex(&delivery.span_id));
    assert_eq!(forwarded, vec![Some(expected)], "the backend's parent is the delivery span, in the caller's trace");
}

/// The operator exports a span per reconcile, named for the RpcService and its namespace, with no credentials in it.
#[tokio::test]
async fn the_operators_reconcile_spans_name_the_service_over_otlp() {
    let _broker = broker::shared().await;
    let client = cluster::client().await.unwrap();
    cluster::install_crd(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "otlp-op").await.unwrap();
    ns.create_broker_secret("rabbitmq").await.unwrap();
    let _cleanup = QueueCleanup::service(&format!("{}.calc", ns.name()));
    let (collector, received) = start_receiver().await;
    let endpoint = format!("http://{collector}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let _operator = OperatorProcess::start_with_env(ns.name(), &[], &env).unwrap();
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": "calc" },
        "spec": { "broker": { "secretRef": { "name": "rabbitmq" } } },
    }))
    .unwrap();
    ns.api::<RpcService>().create(&Default::default(), &svc).await.unwrap();

    let ours = |span: &Span| {
        span.name == "reconcile"
            && attribute(span, "name").as_deref() == Some("calc")
            && attribute(span, "namespace").as_deref() == Some(ns.name())
    };
    let mut waited = Duration::ZERO;
    while !received.spans().iter().any(|(_, s)| ours(s)) && waited < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        waited += Duration::from_millis(200);
    }
    let spans = received.spans();
    let names: BTreeSet<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    eprintln!("{} OTLP spans from the operator, named {names:?}", spans.len());
    let reconciles: Vec<&Span> = spans.iter().map(|(_, s)| s).filter(|s| ours(s)).collect();
    assert!(!reconciles.is_empty(), "a reconcile span for {}/calc within 60 s: {names:?}", ns.name());
    assert!(spans.iter().all(|(service, _)| service == "warren-operator"), "service.name");
    assert!(reconciles.iter().all(|s| s.end_time_unix_nano >= s.start_time_unix_nano && s.parent_span_id.is_empty()));
    // The Secret's URI carries the broker's password: no span attribute may.
    let uri = warren_tests::broker_uri();
    let userinfo = uri.split("://").nth(1).and_then(|rest| rest.split_once('@')).map(|(u, _)| u.to_owned());
    let password = userinfo.and_then(|u| u.split_once(':').map(|(_, p)| p.to_owned())).unwrap_or_default();
    let leaked =
        spans.iter().flat_map(|(_, s)| &s.attributes).filter_map(|a| string_value(a.value.as_ref()?.value.as_ref()?));
    assert!(
        password.is_empty() || leaked.clone().all(|v| !v.contains(&format!(":{password}@"))),
        "a credential in a span"
    );
    ns.cleanup().await.unwrap();
}
