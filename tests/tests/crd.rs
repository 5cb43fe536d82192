//! The RpcService CRD against a real kube-apiserver: it installs, the API server fills in the defaults, and it
//! rejects what the schema and the CEL rules forbid, with messages a user can act on.

use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use warren_operator::RpcService;
use warren_operator::crd::{BuiltinHandler, DeletionPolicy, QueueType};
use warren_tests::cluster::{self, TestNamespace, rejection, run_kubectl, wait_for};

async fn setup(prefix: &str) -> (Client, TestNamespace) {
    let client = cluster::client().await.expect("test cluster client");
    cluster::install_crd(&client).await.expect("install the RpcService CRD");
    let ns = TestNamespace::create(&client, prefix).await.expect("test namespace");
    (client, ns)
}

/// RpcServices as raw JSON, so the assertions see what the API server stored, not the Rust defaults.
fn raw_api(ns: &TestNamespace) -> Api<DynamicObject> {
    Api::namespaced_with(ns.client().clone(), ns.name(), &ApiResource::erase::<RpcService>(&()))
}

fn rpcservice(name: &str, spec: Value) -> DynamicObject {
    DynamicObject::new(name, &ApiResource::erase::<RpcService>(&())).data(json!({ "spec": spec }))
}

fn minimal_spec() -> Value {
    json!({ "broker": { "secretRef": { "name": "rabbitmq" } } })
}

/// Creates an RpcService and expects the API server to refuse it with a message containing each of `expected`.
async fn assert_create_rejected(ns: &TestNamespace, spec: Value, expected: &[&str]) {
    let err = raw_api(ns)
        .create(&PostParams::default(), &rpcservice(&warren_tests::unique_name("bad"), spec.clone()))
        .await
        .expect_err(&format!("the API server accepted {spec}"));
    let message = rejection(&err).unwrap_or_else(|| panic!("not an API rejection: {err}"));
    for part in expected {
        assert!(message.contains(part), "rejection of {spec} should mention {part:?}: {message}");
    }
}

fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn crd_installs_and_is_established() {
    let client = cluster::client().await.expect("test cluster client");
    let crd = cluster::install_crd(&client).await.expect("install the RpcService CRD");
    assert_eq!(crd.name_any(), "rpcservices.warren.dev");
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["rpcsvc".to_string()][..]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let subresources = version.subresources.as_ref().expect("subresources");
    assert!(subresources.status.is_some(), "status subresource");
    let scale = subresources.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.worker.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");

    // Installing again (every test does) changes nothing and stays Established.
    cluster::install_crd(&client).await.expect("install the CRD a second time");
}

#[tokio::test]
async fn minimal_rpcservice_is_completed_with_defaults_by_the_api_server() {
    let (_client, ns) = setup("crd-defaults").await;
    let created = raw_api(&ns).create(&PostParams::default(), &rpcservice("calculator", minimal_spec())).await.unwrap();
    let spec = &created.data["spec"];

    assert_eq!(spec["broker"]["secretRef"]["name"], "rabbitmq");
    assert_eq!(spec["queue"]["type"], "quorum");
    assert_eq!(spec["queue"]["deliveryLimit"], 5);
    assert_eq!(spec["queue"]["deletionPolicy"], "Retain");
    assert!(spec["queue"].get("name").is_none(), "queue.name has no schema default: {spec}");
    assert_eq!(spec["worker"]["prefetch"], 32);
    assert_eq!(spec["worker"]["replicas"], 1);
    assert_eq!(spec["worker"]["terminationGracePeriodSeconds"], 60);
    assert_eq!(spec["worker"]["handler"], json!({ "builtin": "echo" }));
    assert_eq!(spec["scaling"]["enabled"], true);
    assert_eq!(spec["scaling"]["minReplicas"], 1);
    assert_eq!(spec["scaling"]["maxReplicas"], 10);
    assert_eq!(spec["scaling"]["targetQueueDelaySeconds"], 2.0);
    assert_eq!(spec["scaling"]["scaleDownDelaySeconds"], 60);
    assert_eq!(spec["scaling"]["targetUtilization"], 0.8);

    // And it reads back as the typed resource the operator works with.
    let typed = ns.api::<RpcService>().get("calculator").await.unwrap();
    assert_eq!(typed.spec.queue.queue_type, QueueType::Quorum);
    assert_eq!(typed.spec.queue.deletion_policy, DeletionPolicy::Retain);
    assert_eq!(typed.spec.worker.handler.builtin, Some(BuiltinHandler::Echo));
    assert_eq!(typed.queue_name(), format!("{}.calculator", ns.name()));

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn invalid_specs_are_rejected() {
    let (_client, ns) = setup("crd-invalid").await;
    let with = |patch: Value| {
        let mut spec = minimal_spec();
        json_merge(&mut spec, patch);
        spec
    };

    assert_create_rejected(
        &ns,
        with(json!({ "scaling": { "minReplicas": 3, "maxReplicas": 2 } })),
        &["scaling.minReplicas must be less than or equal to scaling.maxReplicas"],
    )
    .await;
    assert_create_rejected(
        &ns,
        with(json!({ "worker": { "prefetch": 0 } })),
        &["spec.worker.prefetch", "greater than or equal to 1"],
    )
    .await;
    assert_create_rejected(
        &ns,
        with(json!({ "worker": { "prefetch": 2001 } })),
        &["spec.worker.prefetch", "less than or equal to 2000"],
    )
    .await;
    assert_create_rejected(
        &ns,
        with(json!({ "queue": { "deliveryLimit": 0 } })),
        &["spec.queue.deliveryLimit", "greater than or equal to 1"],
    )
    .await;
    assert_create_rejected(
        &ns,
        with(json!({ "queue": { "type": "stream" } })),
        &["spec.queue.type", "Unsupported value"],
    )
    .await;
    assert_create_rejected(&ns, with(json!({ "queue": { "name": "amq.gen-1" } })), &["reserved by RabbitMQ"]).await;
    assert_create_rejected(
        &ns,
        with(json!({ "worker": { "handler": { "builtin": "add", "http": { "container": { "name": "app" } } } } })),
        &["handler needs exactly one of builtin, http or container"],
    )
    .await;
    assert_create_rejected(
        &ns,
        with(
            json!({ "worker": { "handler": { "builtin": "add", "container": { "name": "app", "image": "app:1" } } } }),
        ),
        &["handler needs exactly one of builtin, http or container"],
    )
    .await;
    assert_create_rejected(
        &ns,
        with(json!({ "worker": { "handler": {} } })),
        &["handler needs exactly one of builtin, http or container"],
    )
    .await;

    // The bounds themselves are allowed.
    for prefetch in [1, 2000] {
        let name = format!("prefetch-{prefetch}");
        raw_api(&ns)
            .create(&PostParams::default(), &rpcservice(&name, with(json!({ "worker": { "prefetch": prefetch } }))))
            .await
            .unwrap_or_else(|err| panic!("prefetch {prefetch} must be accepted: {err}"));
    }
    // A stand-alone responder container alone is a valid handler.
    let responder = with(json!({ "worker": { "handler": { "container": { "name": "app", "image": "app:1" } } } }));
    let created = raw_api(&ns)
        .create(&PostParams::default(), &rpcservice("responder", responder))
        .await
        .unwrap_or_else(|err| panic!("a container handler must be accepted: {err}"));
    assert_eq!(created.data["spec"]["worker"]["handler"]["container"]["port"], json!(9090));

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn names_that_would_not_fit_a_queue_or_a_label_are_rejected() {
    let (_client, ns) = setup("crd-names").await;
    let api = raw_api(&ns);
    let create = |name: String, spec: Value| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &rpcservice(&name, spec)).await }
    };
    let rejected = |result: Result<DynamicObject, kube::Error>, expected: &str| {
        let err = result.expect_err("the API server accepted a name that cannot work");
        let message = rejection(&err).unwrap_or_else(|| panic!("not an API rejection: {err}")).to_string();
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
    };
    let with_queue = |queue: &str| {
        let mut spec = minimal_spec();
        json_merge(&mut spec, json!({ "queue": { "name": queue } }));
        spec
    };

    // 64 characters: a valid object name, but not a label value (and `<namespace>.<name>.dead` could pass 255 bytes).
    rejected(create("a".repeat(64), minimal_spec()).await, "metadata.name must be at most 63 characters");
    create("a".repeat(63), minimal_spec()).await.expect("63 characters are accepted");
    rejected(create("orders.dead".into(), minimal_spec()).await, "metadata.name must not end in '.dead'");

    // 130 two-byte characters are 260 bytes: within maxLength (characters), over RabbitMQ's limit (bytes).
    rejected(create("wide".into(), with_queue(&"é".repeat(130))).await, "queue.name must be at most 250 bytes");
    create("wide-ok".into(), with_queue(&"é".repeat(125))).await.expect("250 bytes are accepted");
    rejected(create("dead".into(), with_queue("billing.dead")).await, "queue.name must not end in '.dead'");

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn the_http_handler_container_may_not_loosen_the_pod_security() {
    let (_client, ns) = setup("crd-http-security").await;
    let with_security = |security: Value| {
        let mut spec = minimal_spec();
        let container = json!({ "name": "app", "image": "app:1", "securityContext": security });
        json_merge(&mut spec, json!({ "worker": { "handler": { "http": { "container": container } } } }));
        spec
    };
    let refused = [
        (json!({ "privileged": true }), "privileged containers are not allowed"),
        (json!({ "allowPrivilegeEscalation": true }), "allowPrivilegeEscalation must not be true"),
        (json!({ "capabilities": { "add": ["SYS_ADMIN"] } }), "only NET_BIND_SERVICE may be added"),
        (json!({ "runAsUser": 0 }), "must not run as root"),
        (json!({ "runAsNonRoot": false }), "must not run as root"),
        (json!({ "seccompProfile": { "type": "Unconfined" } }), "an Unconfined seccomp profile is not allowed"),
    ];
    for (security, expected) in &refused {
        assert_create_rejected(&ns, with_security(security.clone()), &[expected]).await;
    }
    let mut host_port = minimal_spec();
    let container = json!({ "name": "app", "image": "app:1", "ports": [{ "containerPort": 8080, "hostPort": 8080 }] });
    json_merge(&mut host_port, json!({ "worker": { "handler": { "http": { "container": container } } } }));
    assert_create_rejected(&ns, host_port, &["host ports are not allowed"]).await;

    // What the restricted profile allows is accepted, and so are references to the namespace's Secrets.
    let mut allowed = with_security(json!({
        "runAsUser": 1000, "allowPrivilegeEscalation": false, "capabilities": { "add": ["NET_BIND_SERVICE"], "drop": ["ALL"] }
    }));
    let env = json!([{ "name": "DB_PASSWORD", "valueFrom": { "secretKeyRef": { "name": "db", "key": "password" } } }]);
    json_merge(&mut allowed, json!({ "worker": { "handler": { "http": { "container": { "env": env } } } } }));
    raw_api(&ns)
        .create(&PostParams::default(), &rpcservice("allowed", allowed))
        .await
        .unwrap_or_else(|err| panic!("a restricted container must be accepted: {err}"));
    println!("http container: {} refused settings, 1 restricted container accepted", refused.len() + 1);
    ns.cleanup().await.unwrap();
}

#[test]
fn worker_policy_defaults_are_the_workers_own() {
    let spec = warren_operator::crd::WorkerSpec::default();
    assert_eq!(spec.max_reply_bytes as usize, warren_worker::worker::DEFAULT_MAX_REPLY_BYTES);
    assert_eq!(spec.max_request_bytes as usize, warren_worker::worker::DEFAULT_MAX_REQUEST_BYTES);
    assert_eq!(Duration::from_secs(spec.handler_timeout_seconds as u64), warren_worker::http_handler::DEFAULT_TIMEOUT);
    assert!(spec.allow_reply_to.is_empty());
}

#[tokio::test]
async fn worker_policies_have_the_workers_defaults_and_bounds() {
    let (_client, ns) = setup("crd-worker-policies").await;
    let created = raw_api(&ns).create(&PostParams::default(), &rpcservice("calc", minimal_spec())).await.unwrap();
    let worker = &created.data["spec"]["worker"];
    assert_eq!(worker["handlerTimeoutSeconds"], 30);
    assert_eq!(worker["maxReplyBytes"], 16 * 1024 * 1024);
    assert_eq!(worker["maxRequestBytes"], 16 * 1024 * 1024);
    assert!(worker.get("allowReplyTo").is_none(), "only reply addresses by default: {worker}");

    let with = |worker: Value| {
        let mut spec = minimal_spec();
        json_merge(&mut spec, json!({ "worker": worker }));
        spec
    };
    assert_create_rejected(&ns, with(json!({ "handlerTimeoutSeconds": 0 })), &["spec.worker.handlerTimeoutSeconds"])
        .await;
    assert_create_rejected(&ns, with(json!({ "maxReplyBytes": 10 })), &["spec.worker.maxReplyBytes"]).await;
    assert_create_rejected(&ns, with(json!({ "maxRequestBytes": 10 })), &["spec.worker.maxRequestBytes"]).await;
    for pattern in ["a*b", "a,b", ""] {
        assert_create_rejected(&ns, with(json!({ "allowReplyTo": [pattern] })), &["allowReplyTo entries"]).await;
    }
    let policies = json!({ "handlerTimeoutSeconds": 120, "maxReplyBytes": 1048576, "maxRequestBytes": 65536, "allowReplyTo": ["billing.replies.*", "audit", "*"] });
    raw_api(&ns)
        .create(&PostParams::default(), &rpcservice("tuned", with(policies)))
        .await
        .unwrap_or_else(|err| panic!("valid policies must be accepted: {err}"));
    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn queue_type_and_name_are_immutable() {
    let (_client, ns) = setup("crd-immutable").await;
    let api = raw_api(&ns);
    let queue_name = format!("{}.fixed", ns.name());
    let mut spec = minimal_spec();
    json_merge(&mut spec, json!({ "queue": { "name": queue_name } }));
    api.create(&PostParams::default(), &rpcservice("named", spec)).await.unwrap();
    api.create(&PostParams::default(), &rpcservice("unnamed", minimal_spec())).await.unwrap();

    let patch = |name: &'static str, spec: Value| {
        let api = api.clone();
        async move { api.patch(name, &PatchParams::default(), &Patch::Merge(json!({ "spec": spec }))).await }
    };
    let rejected = |result: Result<DynamicObject, kube::Error>, expected: &str| {
        let err = result.expect_err("the API server accepted a change to an immutable field");
        let message = rejection(&err).unwrap_or_else(|| panic!("not an API rejection: {err}")).to_string();
        assert!(message.contains(expected), "expected {expected:?} in: {message}");
    };

    rejected(patch("named", json!({ "queue": { "type": "classic" } })).await, "queue.type is immutable");
    rejected(patch("named", json!({ "queue": { "name": "other" } })).await, "queue.name is immutable");
    rejected(patch("named", json!({ "queue": { "name": null } })).await, "queue.name is immutable");
    rejected(patch("unnamed", json!({ "queue": { "name": "late" } })).await, "queue.name is immutable");

    // Everything else stays editable.
    let updated =
        patch("named", json!({ "queue": { "deliveryLimit": 9 }, "worker": { "prefetch": 64 } })).await.unwrap();
    assert_eq!(updated.data["spec"]["queue"]["deliveryLimit"], 9);
    assert_eq!(updated.data["spec"]["queue"]["name"], queue_name.as_str());

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn kubectl_explains_get_and_scales_rpcservices() {
    let (_client, ns) = setup("crd-kubectl").await;
    raw_api(&ns).create(&PostParams::default(), &rpcservice("calculator", minimal_spec())).await.unwrap();

    // The OpenAPI document that `kubectl explain` reads is published a moment after the CRD is established.
    let explained = wait_for("kubectl explain rpcservice.spec.scaling", Duration::from_secs(60), || async {
        Ok(run_kubectl(&["explain", "rpcservice.spec.scaling"]).ok())
    })
    .await
    .unwrap();
    let explained = collapse_whitespace(&explained);
    for expected in [
        "How the operator sizes the worker pool from what it observes on the broker.",
        "minReplicas <integer>",
        "The fewest workers.",
        "targetQueueDelaySeconds <number>",
    ] {
        assert!(explained.contains(expected), "kubectl explain should show {expected:?}: {explained}");
    }

    let table = run_kubectl(&["get", "rpcsvc", "-n", ns.name()]).unwrap();
    let header = collapse_whitespace(table.lines().next().unwrap_or_default());
    assert_eq!(header, "NAME READY REPLICAS BACKLOG DELAY TARGET RATE AGE", "{table}");
    assert!(table.contains("calculator"), "{table}");

    // The scale subresource moves spec.worker.replicas (what `kubectl scale`, HPA and KEDA use).
    run_kubectl(&["scale", "-n", ns.name(), "rpcservice/calculator", "--replicas=3"]).unwrap();
    let scaled = ns.api::<RpcService>().get("calculator").await.unwrap();
    assert_eq!(scaled.spec.worker.replicas, 3);

    ns.cleanup().await.unwrap();
}

#[tokio::test]
async fn cleanup_removes_the_namespace_without_a_namespace_controller() {
    let (client, ns) = setup("crd-cleanup").await;
    let name = ns.name().to_string();
    ns.create_broker_secret("rabbitmq").await.unwrap();
    // A finalizer nobody will remove: the operator is not running in this test.
    let mut object = rpcservice("stuck", minimal_spec());
    object.metadata.finalizers = Some(vec!["warren.dev/test-finalizer".into()]);
    raw_api(&ns).create(&PostParams::default(), &object).await.unwrap();

    ns.cleanup().await.unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    wait_for("the namespace to be gone", Duration::from_secs(30), || async {
        Ok(namespaces.get_opt(&name).await?.is_none().then_some(()))
    })
    .await
    .unwrap();
}

/// JSON merge patch (RFC 7386) of `patch` into `target`.
fn json_merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(&key);
                } else {
                    json_merge(target.entry(key).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch,
    }
}
