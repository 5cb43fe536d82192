//! The reconciler in-process, controller-rs's middle test tier: a `Context` built against the environment's API
//! server and broker, `reconcile()` called directly, and what it wrote — the Deployment, the queues, the
//! conditions, the events — checked right after. No operator process, no watches, no timing: each test says which
//! pass it runs. (tests/operator.rs runs the real operator process end to end.)

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::channel::mpsc;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, store::Writer};
use kube::{Client, ResourceExt};
use serde_json::json;
use warren_operator::RpcService;
use warren_operator::context::{Context, OperatorConfig};
use warren_operator::metrics::Metrics;
use warren_operator::observer::Observer;
use warren_operator::reconcile::{FINALIZER, reconcile};
use warren_tests::broker;
use warren_tests::cluster::{self, TestNamespace};

/// A `Context` as `warren-operator run` builds one, without its watches: the observer's cache stays empty and
/// nothing consumes its triggers, so a pass runs only when a test calls [`reconcile`].
struct InProcess {
    ctx: Arc<Context>,
    _cache: Writer<RpcService>,
    _triggers: mpsc::UnboundedReceiver<kube::runtime::reflector::ObjectRef<RpcService>>,
}

async fn setup(prefix: &str) -> anyhow::Result<(InProcess, TestNamespace)> {
    let client = cluster::client().await?;
    cluster::install_crd(&client).await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    let (cache, writer) = reflector::store();
    let (trigger, triggers) = mpsc::unbounded();
    let metrics = Arc::new(Metrics::default());
    let observer = Arc::new(Observer::new(cache, trigger, metrics.clone()));
    let config = OperatorConfig { worker_image: "warren-worker:test".into(), ..OperatorConfig::default() };
    let ctx = Arc::new(Context::new(client, config, observer, metrics));
    Ok((InProcess { ctx, _cache: writer, _triggers: triggers }, ns))
}

/// Creates an RpcService that already carries the operator's finalizer, so the first pass applies it (kube's
/// finalizer helper would otherwise spend that pass adding the finalizer), and returns it as the API server has it.
async fn create_service(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> anyhow::Result<Arc<RpcService>> {
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": name, "finalizers": [FINALIZER] },
        "spec": spec,
    }))?;
    ns.api::<RpcService>().create(&PostParams::default(), &svc).await?;
    current(ns, name).await
}

async fn current(ns: &TestNamespace, name: &str) -> anyhow::Result<Arc<RpcService>> {
    Ok(Arc::new(ns.api::<RpcService>().get(name).await?))
}

fn condition<'a>(svc: &'a RpcService, type_: &str) -> anyhow::Result<&'a Condition> {
    let conditions = &svc.status.as_ref().context("a status")?.conditions;
    conditions.iter().find(|c| c.type_ == type_).with_context(|| format!("condition {type_} in {conditions:?}"))
}

fn status_of(c: &Condition) -> (&str, &str) {
    (c.status.as_str(), c.reason.as_str())
}

/// The reasons of the events about `name`, oldest first.
async fn event_reasons(client: &Client, ns: &TestNamespace, name: &str) -> anyhow::Result<Vec<String>> {
    let events = kube::Api::<Event>::namespaced(client.clone(), ns.name()).list(&ListParams::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect())
}

#[tokio::test]
async fn one_pass_declares_the_queues_applies_the_deployment_and_reports_it() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (op, ns) = setup("rec-apply").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let svc = create_service(
        &ns,
        "calc",
        json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "worker": { "handler": { "builtin": "add" } } }),
    )
    .await?;

    let action = reconcile(svc.clone(), op.ctx.clone()).await?;
    assert_eq!(action, Action::requeue(Duration::from_secs(300)), "a healthy service is re-checked every 5 min");

    let queue = format!("{}.calc", ns.name());
    let declared = broker::queue("/", &queue).await?.context("the request queue")?;
    assert_eq!(declared["arguments"]["x-queue-type"], "quorum");
    assert!(broker::queue("/", &format!("{queue}.dead")).await?.is_some(), "the dead-letter queue");

    let deployment = ns.api::<Deployment>().get("calc").await?;
    assert_eq!(deployment.owner_references()[0].uid, svc.uid().unwrap());
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1), "minReplicas before the first observation");
    let worker = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(worker.image.as_deref(), Some("warren-worker:test"));
    assert!(worker.args.as_ref().unwrap().windows(2).any(|w| w == ["--default-method", "add"]));

    let svc = current(&ns, "calc").await?;
    let status = svc.status.as_ref().context("a status")?;
    assert_eq!(status.observed_generation, svc.metadata.generation);
    assert_eq!(status.desired_replicas, Some(1));
    assert_eq!(status.selector.as_deref(), Some("app.kubernetes.io/name=warren-worker,warren.dev/service=calc"));
    assert_eq!(status_of(condition(&svc, "QueueReady")?), ("True", "Declared"));
    // No kubelet here: the Deployment's pods never become ready.
    assert_eq!(status_of(condition(&svc, "WorkersReady")?), ("False", "NoReplicasReady"));
    assert_eq!(status_of(condition(&svc, "Ready")?), ("False", "NoReplicasReady"));
    assert_eq!(status_of(condition(&svc, "Scaling")?), ("True", "Waiting"));

    let reasons = event_reasons(ns.client(), &ns, "calc").await?;
    // A new service's workers not ready yet is where every service starts: no warning event for it.
    assert_eq!(reasons, ["Declared"]);
    assert_eq!(op.ctx.metrics.reconciles.get(), 1);

    // A second pass finds nothing new: the same conditions, no new transition events.
    reconcile(svc.clone(), op.ctx.clone()).await?;
    let again = current(&ns, "calc").await?;
    assert_eq!(again.status.as_ref().map(|s| &s.conditions), svc.status.as_ref().map(|s| &s.conditions));
    assert_eq!(event_reasons(ns.client(), &ns, "calc").await?.len(), reasons.len());

    broker::delete_service_queues(&queue).await?;
    ns.cleanup().await
}

#[tokio::test]
async fn the_pass_that_adds_the_finalizer_applies_too_and_a_pass_with_nothing_new_writes_nothing() -> anyhow::Result<()>
{
    let _broker = broker::shared().await;
    let (op, ns) = setup("rec-nowrite").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": "calc" },
        // No workers: the Deployment controller has nothing to change that status shows between the passes.
        "spec": {
            "broker": { "secretRef": { "name": "rabbitmq" } },
            "scaling": { "enabled": false },
            "worker": { "replicas": 0 },
        },
    }))?;
    ns.api::<RpcService>().create(&PostParams::default(), &svc).await?;

    // One pass: the finalizer, the queues, the Deployment and the status, without waiting for a second one.
    reconcile(current(&ns, "calc").await?, op.ctx.clone()).await?;
    let svc = current(&ns, "calc").await?;
    assert!(svc.finalizers().iter().any(|f| f == FINALIZER), "{:?}", svc.finalizers());
    assert_eq!(status_of(condition(&svc, "QueueReady")?), ("True", "Declared"));
    assert!(ns.api::<Deployment>().get_opt("calc").await?.is_some(), "the Deployment");

    // The next pass finds everything as it left it: no patch (Deployment, status, finalizer), no event.
    let writes = |verb| op.ctx.metrics.kubernetes_requests_of(Some(verb));
    let (patches, creates) = (writes("patch"), writes("create"));
    let deployment_version = ns.api::<Deployment>().get("calc").await?.resource_version();
    reconcile(svc.clone(), op.ctx.clone()).await?;
    assert_eq!(writes("patch"), patches, "no patch: {:?}", op.ctx.metrics.encode());
    assert_eq!(writes("create"), creates, "no event");
    assert_eq!(current(&ns, "calc").await?.resource_version(), svc.resource_version());
    assert_eq!(ns.api::<Deployment>().get("calc").await?.resource_version(), deployment_version);

    // An edit of the Deployment's spec by someone else is undone by the next pass.
    let edit = json!({ "spec": { "replicas": 7 } });
    let patch = kube::api::Patch::Merge(&edit);
    ns.api::<Deployment>().patch("calc", &kube::api::PatchParams::default(), &patch).await?;
    reconcile(current(&ns, "calc").await?, op.ctx.clone()).await?;
    let deployment = ns.api::<Deployment>().get("calc").await?;
    assert_eq!(deployment.spec.as_ref().and_then(|s| s.replicas), Some(0), "the operator's replicas again");

    broker::delete_service_queues(&format!("{}.calc", ns.name())).await?;
    ns.cleanup().await
}

#[tokio::test]
async fn a_missing_secret_is_a_permanent_error_reported_in_status() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (op, ns) = setup("rec-secret").await?;
    let svc = create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "later" } } })).await?;

    let error = reconcile(svc, op.ctx.clone()).await.expect_err("no Secret, no broker");
    assert_eq!((error.reason(), error.is_permanent()), ("SecretNotFound", true));
    assert!(error.to_string().contains(&format!("{}/later", ns.name())), "{error}");

    let svc = current(&ns, "svc").await?;
    let queue_ready = condition(&svc, "QueueReady")?;
    assert_eq!(status_of(queue_ready), ("False", "SecretNotFound"));
    assert!(queue_ready.message.contains("later"), "{}", queue_ready.message);
    assert_eq!(status_of(condition(&svc, "Ready")?), ("False", "SecretNotFound"));
    assert!(ns.api::<Deployment>().get_opt("svc").await?.is_none(), "nothing runs without the broker");
    ns.cleanup().await
}

#[tokio::test]
async fn a_queue_the_observer_finds_missing_is_declared_again_and_announced() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (op, ns) = setup("rec-redeclare").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let svc = create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    reconcile(svc, op.ctx.clone()).await?;
    let queue = format!("{}.svc", ns.name());
    broker::delete_queue("/", &queue).await?;

    // One real poll of the management API: the observer notes the queue is gone.
    op.ctx.observer.poll_once().await;
    assert!(!event_reasons(ns.client(), &ns, "svc").await?.contains(&"QueueRedeclared".to_owned()));
    reconcile(current(&ns, "svc").await?, op.ctx.clone()).await?;
    assert!(broker::queue("/", &queue).await?.is_some(), "declared again");
    let reasons = event_reasons(ns.client(), &ns, "svc").await?;
    assert_eq!(reasons.iter().filter(|r| *r == "QueueRedeclared").count(), 1, "{reasons:?}");

    // Announced once: the next pass has nothing to say about it.
    reconcile(current(&ns, "svc").await?, op.ctx.clone()).await?;
    let again = event_reasons(ns.client(), &ns, "svc").await?;
    assert_eq!(again.iter().filter(|r| *r == "QueueRedeclared").count(), 1, "{again:?}");

    broker::delete_service_queues(&queue).await?;
    ns.cleanup().await
}
