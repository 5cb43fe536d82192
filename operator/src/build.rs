//! The build step: pure functions from a validated RpcService to what the operator applies — the queue
//! options and the worker Deployment. No client, no broker: unit-tested with fixtures.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use warren_client::endpoint::{BROKER_URI_ENV, SECRET_URI_KEY};
use warren_client::topology::QueueOptions;

use crate::crd::{ResponderContainer, RpcService, WorkerSpec};

/// The port of the worker's `/metrics`, `/healthz` and `/readyz`.
pub const WORKER_METRICS_PORT: i32 = 9090;
/// Label every worker pod carries with its RpcService's name.
pub const SERVICE_LABEL: &str = "warren.dev/service";
const NAME_LABEL: &str = "app.kubernetes.io/name";
const WORKER_APP: &str = "warren-worker";
/// The worker runs as this uid (the image's non-root user).
const WORKER_UID: i64 = 65532;

/// Everything the build step needs besides the RpcService itself, all already resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildInputs {
    /// The Secret holding the broker's `uri` (mounted into workers through `secretKeyRef`, never copied).
    pub broker_secret: String,
    /// The worker image when the spec names none.
    pub default_worker_image: String,
    /// The replica count to ask for.
    pub replicas: i32,
}

/// The request queue's declaration options from the spec.
pub fn queue_options(svc: &RpcService) -> QueueOptions {
    let q = &svc.spec.queue;
    QueueOptions::new(q.queue_type.into(), i64::from(q.delivery_limit), q.max_length, q.message_ttl_seconds)
}

/// The labels that select a service's worker pods.
pub fn selector_labels(svc: &RpcService) -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_LABEL.to_owned(), WORKER_APP.to_owned()), (SERVICE_LABEL.to_owned(), svc.name_any())])
}

/// The label selector as the string the scale subresource reports in `status.selector`.
pub fn selector_string(svc: &RpcService) -> String {
    selector_labels(svc).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The worker's `--handler` argument and its default method.
fn handler_args(svc: &RpcService) -> (String, Option<String>) {
    let spec = &svc.spec.worker;
    match (&spec.handler.http, spec.handler.builtin) {
        (Some(http), _) => {
            let path = if http.path.starts_with('/') { http.path.clone() } else { format!("/{}", http.path) };
            (format!("http://127.0.0.1:{}{}", http.port, path), spec.default_method.clone())
        }
        (None, builtin) => {
            let default = spec.default_method.clone().or_else(|| builtin.map(|b| b.method().to_owned()));
            ("builtin".to_owned(), default)
        }
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn worker_container(svc: &RpcService, inputs: &BuildInputs) -> Container {
    let spec = &svc.spec.worker;
    let (handler, default_method) = handler_args(svc);
    let mut args = vec![
        "--queue".to_owned(),
        svc.queue_name(),
        "--handler".to_owned(),
        handler,
        "--prefetch".to_owned(),
        spec.prefetch.to_string(),
        "--metrics-addr".to_owned(),
        format!("0.0.0.0:{WORKER_METRICS_PORT}"),
    ];
    if let Some(method) = default_method {
        args.extend(["--default-method".to_owned(), method]);
    }
    let mut env = vec![broker_uri_env(inputs)];
    env.extend(worker_policy_env(spec));
    env.extend(spec.env.iter().cloned());
    Container {
        name: "worker".to_owned(),
        image: Some(spec.image.clone().unwrap_or_else(|| inputs.default_worker_image.clone())),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![metrics_port(WORKER_METRICS_PORT)]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 2)),
        resources: spec.resources.clone(),
        security_context: Some(restricted_security_context()),
        ..Default::default()
    }
}

/// The worker's policies from the spec (warren-worker reads them from its environment); `worker.env` comes after
/// them, so an entry there still wins.
fn worker_policy_env(spec: &WorkerSpec) -> Vec<EnvVar> {
    let mut env = vec![
        value_env("WARREN_HANDLER_TIMEOUT", format!("{}s", spec.handler_timeout_seconds)),
        value_env("WARREN_MAX_REPLY_BYTES", spec.max_reply_bytes.to_string()),
        value_env("WARREN_MAX_REQUEST_BYTES", spec.max_request_bytes.to_string()),
    ];
    if !spec.allow_reply_to.is_empty() {
        env.push(value_env("WARREN_ALLOW_REPLY_TO", spec.allow_reply_to.join(",")));
    }
    env
}

/// The user's HTTP backend as written, with the restricted profile's settings filled in where it leaves them
/// unset: no privilege escalation, non-root, all capabilities dropped. What would loosen them (privileged,
/// escalation, added capabilities other than NET_BIND_SERVICE, root, host ports) the CRD's CEL rules refuse.
fn backend_container(container: &Container) -> Container {
    let mut c = container.clone();
    let sc = c.security_context.get_or_insert_with(SecurityContext::default);
    sc.allow_privilege_escalation.get_or_insert(false);
    sc.run_as_non_root.get_or_insert(true);
    sc.capabilities.get_or_insert_with(Capabilities::default).drop.get_or_insert_with(|| vec!["ALL".to_owned()]);
    c
}

/// `WARREN_BROKER_URI` by reference to the broker Secret's `uri` key: credentials are never copied into the spec.
fn broker_uri_env(inputs: &BuildInputs) -> EnvVar {
    EnvVar {
        name: BROKER_URI_ENV.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: inputs.broker_secret.clone(),
                key: SECRET_URI_KEY.to_owned(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        run_as_user: Some(WORKER_UID),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Default::default() }),
        ..Default::default()
    }
}

fn metrics_port(port: i32) -> ContainerPort {
    ContainerPort {
        name: Some("metrics".to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    }
}

fn value_env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.to_owned(), value: Some(value.into()), ..Default::default() }
}

/// The user's stand-alone responder (`handler.container`), wired through the environment the warren SDKs read;
/// the user's own env entries come after warren's.
fn responder_container(svc: &RpcService, responder: &ResponderContainer, inputs: &BuildInputs) -> Container {
    let spec = &svc.spec.worker;
    let mut env = vec![
        broker_uri_env(inputs),
        value_env("WARREN_QUEUE", svc.queue_name()),
        value_env("WARREN_PREFETCH", spec.prefetch.to_string()),
    ];
    if let Some(method) = &spec.default_method {
        env.push(value_env("WARREN_DEFAULT_METHOD", method.clone()));
    }
    // The operator declares the queues (with the spec's options); the responder only consumes.
    env.push(value_env("WARREN_DECLARE", "false"));
    env.push(value_env("WARREN_METRICS_ADDR", format!("0.0.0.0:{}", responder.port)));
    env.extend(responder.env.iter().cloned());
    Container {
        name: responder.name.clone(),
        image: Some(responder.image.clone()),
        command: responder.command.clone(),
        args: responder.args.clone(),
        env: Some(env),
        ports: Some(vec![metrics_port(responder.port)]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 2)),
        resources: responder.resources.clone(),
        security_context: Some(restricted_security_context()),
        ..Default::default()
    }
}

/// The worker Deployment: named like the RpcService, owned by it (garbage-collected with it).
pub fn deployment(svc: &RpcService, inputs: &BuildInputs) -> Deployment {
    let labels = selector_labels(svc);
    let mut pod_labels = labels.clone();
    pod_labels.insert("app.kubernetes.io/managed-by".to_owned(), "warren-operator".to_owned());
    let handler = &svc.spec.worker.handler;
    let (containers, scrape_port) = match &handler.container {
        // The user's container is the responder: the only container, no warren-worker.
        Some(responder) => (vec![responder_container(svc, responder, inputs)], responder.port),
        None => {
            let mut containers = vec![worker_container(svc, inputs)];
            if let Some(http) = &handler.http {
                containers.push(backend_container(&http.container));
            }
            (containers, WORKER_METRICS_PORT)
        }
    };
    Deployment {
        metadata: ObjectMeta {
            name: Some(svc.name_any()),
            namespace: svc.namespace(),
            labels: Some(pod_labels.clone()),
            owner_references: svc.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(inputs.replicas),
            selector: LabelSelector { match_labels: Some(labels), ..Default::default() },
            // New workers first, then drain old ones: capacity never dips during a rollout.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".to_owned())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
                        ("prometheus.io/port".to_owned(), scrape_port.to_string()),
                    ])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    termination_grace_period_seconds: Some(svc.spec.worker.termination_grace_period_seconds),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RpcServiceSpec;
    use warren_client::topology::QueueKind;

    fn fixture(yaml: &str) -> RpcService {
        let spec: RpcServiceSpec = serde_yaml::from_str(yaml).expect("fixture parses");
        let mut svc = RpcService::new("calculator", spec);
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.uid = Some("0000-1111".into());
        svc
    }

    fn inputs() -> BuildInputs {
        BuildInputs {
            broker_secret: "rabbitmq".into(),
            default_worker_image: "ghcr.io/warren-dev/warren-worker:0.1.0".into(),
            replicas: 3,
        }
    }

    #[test]
    fn minimal_spec_builds_a_quorum_queue_named_after_namespace_and_name() {
        let svc = fixture("broker: { secretRef: { name: rabbitmq } }");
        assert_eq!(svc.queue_name(), "shop.calculator");
        let options = queue_options(&svc);
        assert_eq!(options.kind, QueueKind::Quorum);
        assert_eq!(options.delivery_limit, Some(5));
        assert_eq!(options.max_length, None);
    }

    #[test]
    fn ttl_is_converted_to_milliseconds() {
        let svc = fixture("queue: { type: classic, messageTtlSeconds: 30, maxLength: 100 }");
        let options = queue_options(&svc);
        assert_eq!(options.kind, QueueKind::Classic);
        assert_eq!(options.message_ttl_ms, Some(30_000));
        assert_eq!(options.max_length, Some(100));
    }

    #[test]
    fn deployment_runs_the_builtin_worker_with_the_broker_uri_from_the_secret() {
        let svc = fixture("worker: { handler: { builtin: add }, prefetch: 8 }");
        let d = deployment(&svc, &inputs());
        assert_eq!(d.metadata.name.as_deref(), Some("calculator"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("RpcService", Some(true)));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/warren-dev/warren-worker:0.1.0"));
        assert_eq!(
            c.args.clone().unwrap(),
            [
                "--queue",
                "shop.calculator",
                "--handler",
                "builtin",
                "--prefetch",
                "8",
                "--metrics-addr",
                "0.0.0.0:9090",
                "--default-method",
                "add"
            ]
        );
        let env = &c.env.as_ref().unwrap()[0];
        assert_eq!(env.name, "WARREN_BROKER_URI");
        assert!(env.value.is_none(), "credentials are never inlined");
        let secret = env.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("rabbitmq", "uri"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
        assert_eq!(pod.termination_grace_period_seconds, Some(60));
    }

    #[test]
    fn http_handler_adds_the_user_container_and_points_the_worker_at_it() {
        let svc = fixture(
            r#"
worker:
  image: registry.example/worker:dev
  handler:
    http: { port: 8000, path: rpc, container: { name: app, image: registry.example/app:1 } }
"#,
        );
        let d = deployment(&svc, &inputs());
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers.len(), 2);
        assert_eq!(pod.containers[1].name, "app");
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(args[3], "http://127.0.0.1:8000/rpc");
        assert!(!args.contains(&"--default-method".to_owned()));
        assert_eq!(pod.containers[0].image.as_deref(), Some("registry.example/worker:dev"));
    }

    fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env.as_ref().unwrap().iter().find(|e| e.name == name).and_then(|e| e.value.as_deref())
    }

    #[test]
    fn container_handler_is_the_only_container_wired_by_env() {
        let svc = fixture(
            r#"
worker:
  image: registry.example/worker:ignored
  prefetch: 16
  defaultMethod: price
  env: [{ name: WORKER_ONLY, value: "1" }]
  handler:
    container:
      name: pricing
      image: registry.example/pricing:2
      command: [python, -m, pricing]
      args: [--verbose]
      env: [{ name: LOG_LEVEL, value: debug }, { name: WARREN_PREFETCH, value: "4" }]
      resources: { limits: { memory: 256Mi } }
"#,
        );
        let d = deployment(&svc, &inputs());
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let template = spec.template;
        let annotations = template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["prometheus.io/port"], "9090");
        let pod = template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1, "the user's container is the only one");
        let c = &pod.containers[0];
        assert_eq!(c.name, "pricing");
        assert_eq!(c.image.as_deref(), Some("registry.example/pricing:2"));
        assert_eq!(c.command.clone().unwrap(), ["python", "-m", "pricing"]);
        assert_eq!(c.args.clone().unwrap(), ["--verbose"]);
        assert_eq!(c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0, "256Mi");

        let env = c.env.as_ref().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "WARREN_BROKER_URI",
                "WARREN_QUEUE",
                "WARREN_PREFETCH",
                "WARREN_DEFAULT_METHOD",
                "WARREN_DECLARE",
                "WARREN_METRICS_ADDR",
                "LOG_LEVEL",
                "WARREN_PREFETCH"
            ],
            "warren's entries first, then the user's (worker.env is the worker container's)"
        );
        assert!(env[0].value.is_none(), "credentials are never inlined");
        let secret = env[0].value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("rabbitmq", "uri"));
        assert_eq!(env_value(c, "WARREN_QUEUE"), Some("shop.calculator"));
        assert_eq!(env_value(c, "WARREN_PREFETCH"), Some("16"));
        assert_eq!(env_value(c, "WARREN_DEFAULT_METHOD"), Some("price"));
        assert_eq!(env_value(c, "WARREN_DECLARE"), Some("false"));
        assert_eq!(env_value(c, "WARREN_METRICS_ADDR"), Some("0.0.0.0:9090"));
        let yaml = serde_yaml::to_string(&d.metadata).unwrap() + &serde_yaml::to_string(&pod).unwrap();
        assert!(!yaml.contains("amqp"), "no broker URI anywhere in the Deployment");

        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.container_port), (Some("metrics"), 9090));
        for (probe, path) in [(&c.readiness_probe, "/readyz"), (&c.liveness_probe, "/healthz")] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::String("metrics".into()));
        }
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc, &restricted_security_context());
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }

    #[test]
    fn container_handler_port_moves_metrics_and_probes_and_default_method_is_optional() {
        let svc = fixture("worker: { handler: { container: { name: app, image: app:1, port: 8081 } } }");
        let d = deployment(&svc, &inputs());
        let template = d.spec.unwrap().template;
        assert_eq!(template.metadata.unwrap().annotations.unwrap()["prometheus.io/port"], "8081");
        let pod = template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(env_value(c, "WARREN_METRICS_ADDR"), Some("0.0.0.0:8081"));
        assert_eq!(env_value(c, "WARREN_PREFETCH"), Some(&*crate::crd::WorkerSpec::default().prefetch.to_string()));
        assert!(c.env.as_ref().unwrap().iter().all(|e| e.name != "WARREN_DEFAULT_METHOD"));
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8081);
        assert!(c.command.is_none() && c.args.is_none());
    }

    #[test]
    fn worker_policies_are_rendered_into_the_worker_env_with_the_workers_defaults() {
        let env_of = |svc: &RpcService| {
            deployment(svc, &inputs()).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap()
        };
        let defaults = env_of(&fixture("{}"));
        let value = |env: &[EnvVar], name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
        assert_eq!(value(&defaults, "WARREN_HANDLER_TIMEOUT").as_deref(), Some("30s"));
        assert_eq!(value(&defaults, "WARREN_MAX_REPLY_BYTES").as_deref(), Some("16777216"));
        assert_eq!(value(&defaults, "WARREN_MAX_REQUEST_BYTES").as_deref(), Some("16777216"));
        assert_eq!(value(&defaults, "WARREN_ALLOW_REPLY_TO"), None, "only reply addresses by default");

        let svc = fixture(
            r#"
worker:
  handlerTimeoutSeconds: 120
  maxReplyBytes: 1048576
  maxRequestBytes: 65536
  allowReplyTo: ["billing.replies.*", "audit"]
  env: [{ name: WARREN_HANDLER_TIMEOUT, value: 5s }]
"#,
        );
        let env = env_of(&svc);
        assert_eq!(value(&env, "WARREN_MAX_REPLY_BYTES").as_deref(), Some("1048576"));
        assert_eq!(value(&env, "WARREN_MAX_REQUEST_BYTES").as_deref(), Some("65536"));
        assert_eq!(value(&env, "WARREN_ALLOW_REPLY_TO").as_deref(), Some("billing.replies.*,audit"));
        let timeouts: Vec<_> = env.iter().filter(|e| e.name == "WARREN_HANDLER_TIMEOUT").collect();
        assert_eq!(timeouts.len(), 2);
        assert_eq!(
            (timeouts[0].value.as_deref(), timeouts[1].value.as_deref()),
            (Some("120s"), Some("5s")),
            "worker.env comes last, so an entry there wins"
        );
    }

    #[test]
    fn http_backend_gets_the_restricted_defaults_where_unset_and_keeps_what_it_sets() {
        let backend = |yaml: &str| {
            let svc = fixture(yaml);
            deployment(&svc, &inputs()).spec.unwrap().template.spec.unwrap().containers[1].clone()
        };
        let plain = backend("worker: { handler: { http: { container: { name: app, image: app:1 } } } }");
        let sc = plain.security_context.unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(sc.privileged, None);
        assert_eq!(sc.read_only_root_filesystem, None, "not imposed: many servers write to /tmp");

        let own = backend(
            r#"
worker:
  handler:
    http:
      container:
        name: app
        image: app:1
        env: [{ name: DB_PASSWORD, valueFrom: { secretKeyRef: { name: db, key: password } } }]
        securityContext:
          runAsUser: 1000
          readOnlyRootFilesystem: true
          capabilities: { add: [NET_BIND_SERVICE], drop: [NET_RAW] }
"#,
        );
        let sc = own.security_context.unwrap();
        assert_eq!((sc.run_as_user, sc.read_only_root_filesystem), (Some(1000), Some(true)));
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.add, Some(vec!["NET_BIND_SERVICE".to_owned()]));
        assert_eq!(caps.drop, Some(vec!["NET_RAW".to_owned()]), "the user's own drop list stands");
        assert_eq!((sc.allow_privilege_escalation, sc.run_as_non_root), (Some(false), Some(true)));
        let secret = own.env.unwrap()[0].value_from.clone().unwrap().secret_key_ref.unwrap();
        assert_eq!(secret.name, "db", "a Secret of the service's own namespace, by reference");
    }

    #[test]
    fn selector_matches_the_pod_labels() {
        let svc = fixture("{}");
        assert_eq!(selector_string(&svc), "app.kubernetes.io/name=warren-worker,warren.dev/service=calculator");
        let d = deployment(&svc, &inputs());
        let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        for (k, v) in selector_labels(&svc) {
            assert_eq!(pod_labels.get(&k), Some(&v));
        }
    }
}
