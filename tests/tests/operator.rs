//! The operator against the real API server and the real broker: queues, Deployment, status, deletion policy,
//! failures and leader election. Each test runs its own operator process scoped to its own namespace.

use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use warren_operator::RpcService;
use warren_tests::chaos_broker::ChaosCluster;
use warren_tests::cluster::{self, TestNamespace, wait_for};
use warren_tests::local_runtime::{LocalRuntime, RuntimeOptions};
use warren_tests::operator_process::OperatorProcess;
use warren_tests::{broker, broker_uri};

const WAIT: Duration = Duration::from_secs(60);

async fn setup(prefix: &str) -> anyhow::Result<(Client, TestNamespace)> {
    let client = cluster::client().await?;
    cluster::install_crd(&client).await?;
    let ns = TestNamespace::create(&client, prefix).await?;
    Ok((client, ns))
}

async fn create_service(ns: &TestNamespace, name: &str, spec: serde_json::Value) -> anyhow::Result<RpcService> {
    let svc: RpcService = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "RpcService",
        "metadata": { "name": name },
        "spec": spec,
    }))?;
    Ok(ns.api::<RpcService>().create(&PostParams::default(), &svc).await?)
}

fn condition<'a>(
    svc: &'a RpcService,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    svc.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until condition `type_` has `status` and `reason`; returns the object then.
async fn wait_condition(
    ns: &TestNamespace,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> anyhow::Result<RpcService> {
    let api = ns.api::<RpcService>();
    wait_for(&format!("{name} {type_}={status} ({reason})"), WAIT, || async {
        let svc = api.get(name).await?;
        Ok(condition(&svc, type_).filter(|c| c.status == status && c.reason == reason).map(|_| svc.clone()))
    })
    .await
}

fn queue_name(ns: &TestNamespace, name: &str) -> String {
    format!("{}.{name}", ns.name())
}

async fn wait_queue(name: &str) -> anyhow::Result<serde_json::Value> {
    wait_for(&format!("queue {name} on the broker"), WAIT, || async { broker::queue("/", name).await }).await
}

#[tokio::test]
async fn minimal_service_gets_its_queues_a_deployment_and_a_status() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-minimal").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "calc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;

    let svc = wait_condition(&ns, "calc", "QueueReady", "True", "Declared").await?;
    assert_eq!(svc.status.as_ref().unwrap().observed_generation, svc.metadata.generation);

    let queue = wait_queue(&queue_name(&ns, "calc")).await?;
    let args = &queue["arguments"];
    assert_eq!(args["x-queue-type"], "quorum");
    assert_eq!(args["x-delivery-limit"], 5);
    assert_eq!(args["x-dead-letter-exchange"], "");
    assert_eq!(args["x-dead-letter-routing-key"], format!("{}.dead", queue_name(&ns, "calc")));
    assert_eq!(queue["durable"], true);
    let dead = wait_queue(&format!("{}.dead", queue_name(&ns, "calc"))).await?;
    assert_eq!(dead["arguments"]["x-queue-type"], "quorum");

    let deployment = ns.api::<Deployment>().get("calc").await?;
    let owner = &deployment.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("RpcService", "calc", Some(true)));
    let pod = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let worker = &pod.containers[0];
    let args = worker.args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--queue".to_owned(), queue_name(&ns, "calc")]), "{args:?}");
    assert!(args.windows(2).any(|w| w == ["--prefetch", "32"]), "{args:?}");
    let env = worker.env.as_ref().unwrap().iter().find(|e| e.name == "WARREN_BROKER_URI").unwrap();
    assert!(env.value.is_none());
    let secret_ref = env.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((secret_ref.name.as_str(), secret_ref.key.as_str()), ("rabbitmq", "uri"));
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(1));

    // The credentials appear nowhere in status.
    let status = serde_json::to_string(&svc.status)?;
    assert!(!status.contains("guest:guest"), "{status}");
    let selector = svc.status.as_ref().unwrap().selector.clone().unwrap();
    assert_eq!(selector, "app.kubernetes.io/name=warren-worker,warren.dev/service=calc");

    // observedGeneration follows a spec change, and the Deployment follows the spec.
    let patch = json!({ "spec": { "worker": { "prefetch": 7 } } });
    let changed = ns.api::<RpcService>().patch("calc", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let generation = changed.metadata.generation;
    let api = ns.api::<RpcService>();
    wait_for("observedGeneration to follow", WAIT, || async {
        let svc = api.get("calc").await?;
        Ok((svc.status.as_ref().and_then(|s| s.observed_generation) == generation).then_some(()))
    })
    .await?;
    let deployment = ns.api::<Deployment>().get("calc").await?;
    let args = deployment.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--prefetch", "7"]), "{args:?}");

    ns.cleanup().await
}

#[tokio::test]
async fn deployment_deleted_or_edited_by_hand_is_restored() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-restore").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "scaling": { "enabled": false }, "worker": { "replicas": 2 } })).await?;
    let deployments = ns.api::<Deployment>();
    let first = wait_for("the Deployment", WAIT, || async { Ok(deployments.get_opt("svc").await?) }).await?;

    deployments.delete("svc", &DeleteParams::default()).await?;
    let restored = wait_for("the Deployment to come back", WAIT, || async {
        Ok(deployments.get_opt("svc").await?.filter(|d| d.metadata.uid != first.metadata.uid))
    })
    .await?;
    assert_eq!(restored.spec.unwrap().replicas, Some(2));

    // An edit by someone else is overwritten on the next pass (server-side apply with force).
    let edit = json!({ "spec": { "replicas": 9 } });
    deployments.patch("svc", &PatchParams::default(), &Patch::Merge(&edit)).await?;
    wait_for("replicas to be restored", WAIT, || async {
        Ok((deployments.get("svc").await?.spec.unwrap().replicas == Some(2)).then_some(()))
    })
    .await?;
    ns.cleanup().await
}

#[tokio::test]
async fn queue_deleted_on_the_broker_is_declared_again() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-redeclare").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    let queue = queue_name(&ns, "svc");
    wait_queue(&queue).await?;

    // A message marks the queue the operator declared: the queue that comes back must be a new, empty one (the
    // operator may declare it again before a check for its absence could run).
    let connection = lapin::Connection::connect(&broker_uri(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
    let options = lapin::options::BasicPublishOptions::default();
    channel.basic_publish("".into(), queue.as_str().into(), options, b"marker", Default::default()).await?.await?;
    connection.close(200, "done".into()).await?;
    let messages = |n: u64| {
        let queue = queue.clone();
        move || {
            let queue = queue.clone();
            async move { Ok(broker::queue("/", &queue).await?.filter(|q| q["messages"] == n)) }
        }
    };
    wait_for("the marker in the queue", WAIT, messages(1)).await?;
    broker::delete_queue("/", &queue).await?;
    let back = wait_for("a new, empty queue", WAIT, messages(0)).await?;
    assert_eq!(back["arguments"]["x-queue-type"], "quorum");
    ns.cleanup().await
}

#[tokio::test]
async fn conflicting_queue_is_reported_and_not_retried_in_a_hot_loop() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-conflict").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let queue = queue_name(&ns, "svc");
    // Someone already declared the queue with other arguments.
    let conn = lapin::Connection::connect(&warren_tests::broker_uri(), Default::default()).await?;
    let channel = conn.create_channel().await?;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongLongInt(10));
    args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
            args,
        )
        .await?;

    let operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    let svc = wait_condition(&ns, "svc", "QueueReady", "False", "QueueConflict").await?;
    let message = &condition(&svc, "QueueReady").unwrap().message;
    assert!(message.contains("x-max-length") || message.contains("x-dead-letter"), "{message}");
    let ready = condition(&svc, "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "QueueConflict"));

    // A permanent error waits for a change: a handful of attempts over several seconds, not hundreds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failures = operator.metric("warren_operator_reconcile_failures_total{reason=\"QueueConflict\"}").await;
    assert!((1.0..=5.0).contains(&failures), "QueueConflict reconciles: {failures}");

    broker::delete_queue("/", &queue).await?;
    conn.close(200, "done".into()).await?;
    ns.cleanup().await
}

#[tokio::test]
async fn deletion_policy_retain_keeps_queues_and_delete_removes_them() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-delete").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "kept", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    create_service(
        &ns,
        "gone",
        json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "queue": { "deletionPolicy": "Delete" } }),
    )
    .await?;
    let (kept, gone) = (queue_name(&ns, "kept"), queue_name(&ns, "gone"));
    wait_condition(&ns, "kept", "QueueReady", "True", "Declared").await?;
    wait_condition(&ns, "gone", "QueueReady", "True", "Declared").await?;
    let api = ns.api::<RpcService>();
    assert!(api.get("kept").await?.finalizers().contains(&"warren.dev/queues".to_owned()));

    api.delete("kept", &DeleteParams::default()).await?;
    api.delete("gone", &DeleteParams::default()).await?;
    wait_for("both RpcServices to be gone", WAIT, || async {
        Ok((api.get_opt("kept").await?.is_none() && api.get_opt("gone").await?.is_none()).then_some(()))
    })
    .await?;
    assert!(broker::queue("/", &kept).await?.is_some(), "Retain keeps the request queue");
    assert!(broker::queue("/", &format!("{kept}.dead")).await?.is_some(), "Retain keeps the dead-letter queue");
    assert!(broker::queue("/", &gone).await?.is_none(), "Delete removes the request queue");
    assert!(broker::queue("/", &format!("{gone}.dead")).await?.is_none(), "Delete removes the dead-letter queue");

    broker::delete_queue("/", &kept).await?;
    broker::delete_queue("/", &format!("{kept}.dead")).await?;
    ns.cleanup().await
}

#[tokio::test]
async fn missing_secret_is_reported_and_heals_when_it_appears() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-secret").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "later" } } })).await?;
    let svc = wait_condition(&ns, "svc", "QueueReady", "False", "SecretNotFound").await?;
    assert!(condition(&svc, "QueueReady").unwrap().message.contains("later"));

    // The Secret watch brings the object back without waiting for a periodic retry.
    ns.create_broker_secret("later").await?;
    wait_condition(&ns, "svc", "QueueReady", "True", "Declared").await?;
    assert!(ns.api::<Deployment>().get_opt("svc").await?.is_some());
    ns.cleanup().await
}

#[tokio::test]
async fn broker_outage_is_reported_and_the_service_recovers() -> anyhow::Result<()> {
    let _broker = broker::disruption().await;
    let (_client, ns) = setup("op-outage").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    wait_condition(&ns, "svc", "QueueReady", "True", "Declared").await?;

    let restart = broker::RestartOnDrop;
    broker::stop_app()?;
    // Any change makes the operator try the broker; the periodic observer would too.
    let patch = json!({ "spec": { "worker": { "prefetch": 9 } } });
    ns.api::<RpcService>().patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let svc = wait_condition(&ns, "svc", "QueueReady", "False", "BrokerUnavailable").await?;
    assert_eq!(condition(&svc, "Ready").unwrap().status, "False");
    let failed_during_outage =
        operator.metric("warren_operator_reconcile_failures_total{reason=\"BrokerUnavailable\"}").await;

    drop(restart);
    broker::wait_until_up(WAIT).await?;
    // Recovery waits for the backed-off retry (at most a minute) or the observer's next poll.
    let api = ns.api::<RpcService>();
    wait_for("QueueReady=True after the outage", Duration::from_secs(150), || async {
        let svc = api.get("svc").await?;
        Ok(condition(&svc, "QueueReady").filter(|c| c.status == "True").map(|_| ()))
    })
    .await?;
    assert!(failed_during_outage >= 1.0);
    // No hot loop: retries back off, and observer triggers come at most once per 1 s poll, so an outage of up to
    // a minute costs tens of reconciles, not thousands.
    let failed = operator.metric("warren_operator_reconcile_failures_total{reason=\"BrokerUnavailable\"}").await;
    assert!(failed <= 80.0, "BrokerUnavailable reconciles: {failed}");
    ns.cleanup().await
}

#[tokio::test]
async fn only_the_leader_reconciles() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-leader").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let lease = ["--leader-election", "true", "--lease-name", "warren-test"];
    let mut first = OperatorProcess::start(ns.name(), &lease)?;
    let second = OperatorProcess::start(ns.name(), &lease)?;
    create_service(&ns, "svc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    wait_condition(&ns, "svc", "QueueReady", "True", "Declared").await?;

    let (a, b) = (first.metric("warren_operator_leader").await, second.metric("warren_operator_leader").await);
    assert_eq!(a + b, 1.0, "exactly one leader (first {a}, second {b})");
    let (ra, rb) = (
        first.metric("warren_operator_reconciles_total").await,
        second.metric("warren_operator_reconciles_total").await,
    );
    let (leader, standby) = if a == 1.0 { (ra, rb) } else { (rb, ra) };
    assert!(leader >= 1.0 && standby == 0.0, "leader reconciled {leader}, standby {standby}");

    // The standby takes over when the leader goes away.
    if a == 1.0 {
        first.stop();
        let api = ns.api::<RpcService>();
        let patch = json!({ "spec": { "worker": { "prefetch": 3 } } });
        api.patch("svc", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        wait_for("the standby to take over", Duration::from_secs(90), || async {
            Ok((second.metric("warren_operator_reconciles_total").await >= 1.0).then_some(()))
        })
        .await?;
    }
    ns.cleanup().await
}

#[tokio::test]
async fn scale_subresource_drives_replicas_when_autoscaling_is_off() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-scale").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(
        &ns,
        "svc",
        json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "scaling": { "enabled": false } }),
    )
    .await?;
    wait_condition(&ns, "svc", "QueueReady", "True", "Declared").await?;
    cluster::run_kubectl(&["-n", ns.name(), "scale", "rpcservice/svc", "--replicas=4"])?;
    let deployments = ns.api::<Deployment>();
    wait_for("the Deployment to follow kubectl scale", WAIT, || async {
        Ok((deployments.get("svc").await?.spec.unwrap().replicas == Some(4)).then_some(()))
    })
    .await?;
    let svc = ns.api::<RpcService>().get("svc").await?;
    let scaling = condition(&svc, "Scaling").context("Scaling condition")?;
    if scaling.reason != "Disabled" {
        bail!("Scaling reason {} while autoscaling is off", scaling.reason);
    }
    ns.cleanup().await
}

/// The operator's AMQP connections on a broker, by the broker-given name of each.
async fn operator_connections(management: &warren_client::management::Management) -> anyhow::Result<Vec<String>> {
    let connections = management.connections().await?;
    Ok(connections
        .iter()
        .filter(|c| c["client_properties"]["connection_name"] == "warren-operator")
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
async fn rotating_the_broker_secret_leaves_one_operator_connection() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    // A node of the test's own: every operator connection on it is this test's operator's.
    let node = warren_tests::chaos_broker::ChaosBroker::start(Default::default()).await?;
    let management = warren_client::management::Management::new(&node.management_uri())?;
    let (_client, ns) = setup("op-rotate").await?;
    let secret = |uri: &str| Secret {
        metadata: kube::api::ObjectMeta { name: Some("rabbitmq".into()), ..Default::default() },
        string_data: Some([("uri".into(), uri.to_owned()), ("managementUri".into(), node.management_uri())].into()),
        ..Secret::default()
    };
    ns.api::<Secret>().create(&PostParams::default(), &secret(&node.uri())).await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "calc", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    wait_condition(&ns, "calc", "QueueReady", "True", "Declared").await?;
    let first = wait_for("the operator's first connection", WAIT, || async {
        Ok(operator_connections(&management).await?.into_iter().next())
    })
    .await?;
    let mut seen = std::collections::BTreeSet::from([first]);

    // Credential rotations as the operator sees them: a different `uri` for the same broker each time (the last
    // one names the node twice, as a cluster's URI would name its nodes).
    let port = node.amqp_port;
    let rotations = [
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=30"),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=31"),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=32"),
        format!("amqp://guest:guest@127.0.0.1:{port},127.0.0.1:{port}/%2f"),
    ];
    for uri in &rotations {
        ns.api::<Secret>().replace("rabbitmq", &PostParams::default(), &secret(uri)).await?;
        // The operator declares the queues again through the new endpoint, on a new connection.
        let known = seen.clone();
        let new = wait_for("an operator connection through the rotated uri", WAIT, || async {
            let now = operator_connections(&management).await?;
            Ok(now.into_iter().find(|c| !known.contains(c)))
        })
        .await?;
        seen.insert(new);
    }
    let open = wait_for("the operator's connections to settle at one", WAIT, || async {
        let open = operator_connections(&management).await?;
        Ok((open.len() == 1).then_some(open.len()))
    })
    .await;
    let still_open = operator_connections(&management).await?.len();
    eprintln!(
        "ROTATION rotations={} operator_connections_opened={} still_open={still_open}",
        rotations.len(),
        seen.len()
    );
    open.with_context(|| format!("{still_open} operator connections stay open after {} rotations", rotations.len()))?;
    wait_condition(&ns, "calc", "QueueReady", "True", "Declared").await?;
    ns.cleanup().await
}

/// Issue 11: with one node of a three-node cluster down, the operator (given every node in its broker Secret) still
/// declares queues, reads queue figures from another node's management API and scales.
#[tokio::test]
async fn the_operator_keeps_reconciling_and_scaling_while_a_cluster_node_is_down() -> anyhow::Result<()> {
    let mut rabbit = ChaosCluster::start(3).await?;
    let (client, ns) = setup("op-cluster").await?;
    ns.create_broker_secret_for("rabbitmq", &rabbit.uri(), &rabbit.management_uri()).await?;
    let operator = OperatorProcess::start(ns.name(), &[])?;
    // Workers as local processes (one per replica the operator asks for), given the cluster by the Secret; each runs
    // one 300 ms request at a time, so a backlog of 300 needs more than one of them.
    let _runtime = LocalRuntime::start(client.clone(), ns.name(), RuntimeOptions::default())?;
    let scaling = json!({ "minReplicas": 1, "maxReplicas": 8, "targetQueueDelaySeconds": 2 });
    let worker = json!({ "defaultMethod": "sleep", "prefetch": 1 });
    let spec = json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "scaling": scaling, "worker": worker });
    create_service(&ns, "before", spec).await?;
    wait_condition(&ns, "before", "QueueReady", "True", "Declared").await?;

    // Lose the node the operator's AMQP connection is on (listed once its first statistics are in).
    let http = reqwest::Client::new();
    let url = format!(
        "http://127.0.0.1:{}/api/connections?columns=node,client_properties.connection_name",
        rabbit.nodes[0].management_port
    );
    let mut operator_node = None;
    for _ in 0..60 {
        let connections: Vec<serde_json::Value> =
            http.get(&url).basic_auth("guest", Some("guest")).send().await?.json().await?;
        operator_node = connections
            .iter()
            .find(|c| c["client_properties"]["connection_name"] == "warren-operator")
            .and_then(|c| c["node"].as_str().map(str::to_owned));
        if operator_node.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let victim = rabbit.nodes.iter().position(|n| Some(n.node_name()) == operator_node.as_deref()).unwrap_or(0);
    eprintln!("operator connected to {operator_node:?}; stopping {}", rabbit.nodes[victim].node_name());
    rabbit.nodes[victim].stop()?;
    let survivor = rabbit.nodes.iter().find(|n| n.node_name() != rabbit.nodes[victim].node_name()).unwrap();

    // Reconciling: a new service gets its queues on the surviving nodes.
    create_service(&ns, "during", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    wait_condition(&ns, "during", "QueueReady", "True", "Declared").await?;

    // Observing and scaling: a backlog on `before` shows in its status and raises the replicas.
    let connection = lapin::Connection::connect(&survivor.uri(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
    let queue = queue_name(&ns, "before");
    for _ in 0..300 {
        let body = r#"{"ms":300}"#;
        let options = lapin::options::BasicPublishOptions::default();
        channel
            .basic_publish("".into(), queue.as_str().into(), options, body.as_bytes(), Default::default())
            .await?
            .await?;
    }
    connection.close(200, "done".into()).await?;
    let api = ns.api::<RpcService>();
    let scaled = wait_for("the backlog in the status and more replicas", WAIT, || async {
        let svc = api.get("before").await?;
        let status = svc.status.clone().unwrap_or_default();
        let backlog = status.queue.as_ref().and_then(|q| q.ready).unwrap_or(0);
        let desired = status.scaling.as_ref().map_or(0, |s| s.desired_replicas);
        Ok((backlog > 0 && desired > 1).then_some((backlog, desired)))
    })
    .await?;
    let failures = operator.metric("warren_operator_reconcile_failures_total").await;
    eprintln!(
        "OPERATOR on a cluster with a node down: backlog={} desired_replicas={} reconcile_failures={failures}",
        scaled.0, scaled.1
    );

    rabbit.nodes[victim].restart().await?;
    ns.cleanup().await
}

/// The notes of the events with `reason` the operator recorded about RpcService `name`.
async fn event_notes(ns: &TestNamespace, name: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let events = ns.api::<k8s_openapi::api::events::v1::Event>().list(&Default::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.note)
        .collect())
}

/// A broker Secret with the given URIs.
async fn create_secret(ns: &TestNamespace, name: &str, uri: &str, management_uri: &str) -> anyhow::Result<()> {
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": { "name": name },
        "stringData": { "uri": uri, "managementUri": management_uri },
    }))?;
    ns.api::<k8s_openapi::api::core::v1::Secret>().create(&PostParams::default(), &secret).await?;
    Ok(())
}

async fn wait_gone(ns: &TestNamespace, name: &str) -> anyhow::Result<()> {
    let api = ns.api::<RpcService>();
    wait_for(&format!("RpcService {name} to be gone"), WAIT, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

#[tokio::test]
async fn deleting_a_delete_policy_service_whose_secret_is_gone_finishes() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-secret-gone").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    let spec = json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "queue": { "deletionPolicy": "Delete" } });
    create_service(&ns, "svc", spec).await?;
    let queue = queue_name(&ns, "svc");
    let _cleanup = broker::QueueCleanup::service(&queue);
    wait_condition(&ns, "svc", "QueueReady", "True", "Declared").await?;

    // What deleting the namespace does: the Secret goes at once, the RpcService waits for its finalizer.
    ns.api::<k8s_openapi::api::core::v1::Secret>().delete("rabbitmq", &DeleteParams::default()).await?;
    ns.api::<RpcService>().delete("svc", &DeleteParams::default()).await?;
    wait_gone(&ns, "svc").await?;
    let notes = event_notes(&ns, "svc", "QueuesLeftBehind").await?;
    println!("secret gone: RpcService deleted; QueuesLeftBehind events: {notes:?}");
    assert!(notes.iter().any(|n| n.contains(&queue) && n.contains("broker Secret is gone")), "{notes:?}");
    assert!(broker::queue("/", &queue).await?.is_some(), "nothing could delete the queue without the Secret");
    ns.cleanup().await
}

#[tokio::test]
async fn deleting_a_delete_policy_service_on_an_unreachable_broker_finishes_after_the_bound() -> anyhow::Result<()> {
    let (_client, ns) = setup("op-broker-gone").await?;
    // Nothing listens on these ports: every connection is refused, as when the broker is gone.
    let port = warren_tests::operator_process::free_port();
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    create_secret(&ns, "gone", &uri, &format!("http://guest:guest@127.0.0.1:{port}")).await?;
    let operator = OperatorProcess::start(ns.name(), &["--cleanup-timeout", "8s"])?;
    let spec = json!({ "broker": { "secretRef": { "name": "gone" } }, "queue": { "deletionPolicy": "Delete" } });
    create_service(&ns, "svc", spec).await?;
    wait_condition(&ns, "svc", "QueueReady", "False", "BrokerUnavailable").await?;

    let api = ns.api::<RpcService>();
    api.delete("svc", &DeleteParams::default()).await?;
    let retried = wait_for("a failed cleanup attempt", WAIT, || async {
        let failures = operator.metric("warren_operator_reconcile_failures_total{reason=\"BrokerUnavailable\"}").await;
        Ok((api.get_opt("svc").await?.is_some() && failures >= 2.0).then_some(failures))
    })
    .await?;
    wait_gone(&ns, "svc").await?;
    let failures = operator.metric("warren_operator_reconcile_failures_total{reason=\"BrokerUnavailable\"}").await;
    let notes = event_notes(&ns, "svc", "QueuesLeftBehind").await?;
    println!(
        "broker unreachable: BrokerUnavailable failures {retried} while the object was held, {failures} in all; \
         QueuesLeftBehind events: {notes:?}"
    );
    assert!(notes.iter().any(|n| n.contains(&queue_name(&ns, "svc")) && n.contains("gave up after 8s")), "{notes:?}");
    assert!(!notes.iter().any(|n| n.contains("guest:guest")), "no credentials in events: {notes:?}");
    ns.cleanup().await
}

#[tokio::test]
async fn a_malformed_secret_uri_is_reported_without_its_password() -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::events::v1::Event;
    let (_client, ns) = setup("op-badsecret").await?;
    let password = "S3cretPassw0rd";
    let malformed = [
        format!("amqp:user:{password}@127.0.0.1"),
        format!("amqp://user:{password}@127.0.0.1:5672,,127.0.0.1:5673/%2f"),
    ];
    // Debug logs of warren's crates and of lapin: a user who turns them on must not get the password either.
    let log_levels = [("RUST_LOG", "info,warren_operator=debug,warren_client=debug,lapin=debug,kube=warn")];
    let operator = OperatorProcess::start_logged(ns.name(), &[], &log_levels)?;
    for (i, uri) in malformed.iter().enumerate() {
        let name = format!("bad-{i}");
        let secret = Secret {
            metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
            string_data: Some(
                [("uri".into(), uri.clone()), ("managementUri".into(), warren_tests::management_uri())].into(),
            ),
            ..Secret::default()
        };
        ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
        create_service(&ns, &name, json!({ "broker": { "secretRef": { "name": name } } })).await?;
        let svc = wait_condition(&ns, &name, "QueueReady", "False", "InvalidBrokerSecret").await?;
        let status = serde_json::to_string(&svc.status)?;
        eprintln!("BADSECRET {uri:?} -> {}", condition(&svc, "QueueReady").unwrap().message);
        assert!(!status.contains(password), "{status}");
    }
    // A well-formed URI whose password the broker refuses: reported as unavailable, the password nowhere either.
    let refused = format!("amqp://guest:{password}@127.0.0.1:5672/%2f");
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("refused".into()), ..Default::default() },
        string_data: Some(
            [("uri".into(), refused.clone()), ("managementUri".into(), warren_tests::management_uri())].into(),
        ),
        ..Secret::default()
    };
    ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
    create_service(&ns, "refused", json!({ "broker": { "secretRef": { "name": "refused" } } })).await?;
    let svc = wait_condition(&ns, "refused", "QueueReady", "False", "BrokerUnavailable").await?;
    eprintln!("BADSECRET {refused:?} -> {}", condition(&svc, "QueueReady").unwrap().message);
    assert!(!serde_json::to_string(&svc.status)?.contains(password));

    let events = ns.api::<Event>().list(&Default::default()).await?;
    let notes: Vec<String> = events.items.iter().filter_map(|e| e.note.clone()).collect();
    assert!(notes.iter().all(|n| !n.contains(password)), "{notes:?}");
    let logs = operator.logs();
    eprintln!("BADSECRET the operator logged {} lines at debug level", logs.lines().count());
    assert!(logs.lines().count() > 3, "the operator's logs were captured: {logs}");
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(password)).collect();
    assert!(leaks.is_empty(), "the password in the operator's logs: {leaks:?}");
    ns.cleanup().await
}

#[tokio::test]
async fn a_queue_claimed_by_an_older_service_is_neither_used_nor_deleted() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-claimed").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    create_service(&ns, "orders", json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })).await?;
    let queue = queue_name(&ns, "orders");
    let _cleanup = broker::QueueCleanup::service(&queue);
    wait_condition(&ns, "orders", "QueueReady", "True", "Declared").await?;

    // A younger service names the same queue explicitly, with deletionPolicy Delete.
    let thief = json!({
        "broker": { "secretRef": { "name": "rabbitmq" } },
        "queue": { "name": queue, "deletionPolicy": "Delete" },
    });
    create_service(&ns, "thief", thief).await?;
    let svc = wait_condition(&ns, "thief", "QueueReady", "False", "QueueNameConflict").await?;
    let message = &condition(&svc, "QueueReady").unwrap().message;
    println!("conflict: {message}");
    assert!(message.contains(&format!("{}/orders", ns.name())), "{message}");
    assert_eq!(condition(&svc, "Ready").unwrap().status, "False");
    assert!(ns.api::<Deployment>().get_opt("thief").await?.is_none(), "no workers on another service's queue");

    ns.api::<RpcService>().delete("thief", &DeleteParams::default()).await?;
    wait_gone(&ns, "thief").await?;
    let retained = event_notes(&ns, "thief", "QueuesRetained").await?;
    println!("thief deleted; QueuesRetained events: {retained:?}; queue {queue} still there");
    assert!(broker::queue("/", &queue).await?.is_some(), "the owner's queue survives the thief's Delete policy");
    assert!(broker::queue("/", &format!("{queue}.dead")).await?.is_some());
    assert!(retained.iter().any(|n| n.contains(&format!("{}/orders", ns.name()))), "{retained:?}");
    let orders = ns.api::<RpcService>().get("orders").await?;
    assert_eq!(condition(&orders, "QueueReady").unwrap().status, "True");
    ns.cleanup().await
}

/// A management API that accepts connections and never answers (a black-holed `managementUri`): the real broker
/// cannot be made to do that on demand. Returns the port and a count of connections accepted.
async fn black_hole() -> anyhow::Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            held.push(socket);
        }
    });
    Ok((port, accepted))
}

#[tokio::test]
async fn a_black_holed_management_api_does_not_delay_other_services() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let (_client, ns) = setup("op-black-hole").await?;
    ns.create_broker_secret("rabbitmq").await?;
    let (port, accepted) = black_hole().await?;
    create_secret(&ns, "silent", &warren_tests::broker_uri(), &format!("http://guest:guest@127.0.0.1:{port}")).await?;
    let _operator = OperatorProcess::start(ns.name(), &[])?;
    let scaling_off = json!({ "enabled": false });
    create_service(&ns, "silent", json!({ "broker": { "secretRef": { "name": "silent" } }, "scaling": scaling_off }))
        .await?;
    create_service(
        &ns,
        "healthy",
        json!({ "broker": { "secretRef": { "name": "rabbitmq" } }, "scaling": scaling_off }),
    )
    .await?;
    let queue = queue_name(&ns, "healthy");
    let _cleanup = (broker::QueueCleanup::service(&queue), broker::QueueCleanup::service(&queue_name(&ns, "silent")));
    wait_condition(&ns, "healthy", "QueueReady", "True", "Declared").await?;
    wait_for("the silent broker to be polled", WAIT, || async {
        Ok((accepted.load(std::sync::atomic::Ordering::Relaxed) > 0).then_some(()))
    })
    .await?;

    // No workers run here (no kubelet): what is published stays ready, and status follows it poll by poll. The
    // management API itself shows a publish only at its next stats emission (5 s, sometimes two), so each step is
    // timed from when the management API shows it: the operator polls every second, and a poll held up by the
    // silent broker would add up to the management client's 10 s timeout.
    let conn = lapin::Connection::connect(&warren_tests::broker_uri(), Default::default()).await?;
    let channel = conn.create_channel().await?;
    let api = ns.api::<RpcService>();
    let mut took = Vec::new();
    for backlog in 1..=3i64 {
        channel
            .basic_publish("".into(), queue.as_str().into(), Default::default(), b"[]", Default::default())
            .await?
            .await?;
        let shown = wait_for(&format!("the management API to show {backlog} ready"), WAIT, || async {
            let figures = broker::queue("/", &queue).await?;
            let ready = figures.and_then(|q| q["messages_ready"].as_i64());
            Ok((ready == Some(backlog)).then(std::time::Instant::now))
        })
        .await?;
        wait_for(&format!("status.queue.ready = {backlog}"), WAIT, || async {
            let svc = api.get("healthy").await?;
            Ok((svc.status.and_then(|s| s.queue).and_then(|q| q.ready) == Some(backlog)).then_some(()))
        })
        .await?;
        took.push(shown.elapsed());
    }
    let silent = api.get("silent").await?;
    let scaling = condition(&silent, "Scaling").map(|c| (c.reason.clone(), c.message.clone()));
    println!(
        "black hole: {} connections accepted (never answered); healthy service's backlog 1..3 in status after {took:?} \
         from the management API showing it; \
         silent service's Scaling condition: {scaling:?}",
        accepted.load(std::sync::atomic::Ordering::Relaxed)
    );
    for t in &took {
        assert!(
            *t < warren_client::management::REQUEST_TIMEOUT / 2,
            "a status update waited for the silent broker: {took:?}"
        );
    }
    conn.close(200, "done".into()).await?;
    ns.cleanup().await
}
