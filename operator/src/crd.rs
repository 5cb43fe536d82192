//! The `RpcService` custom resource (group `warren.dev`, version `v1alpha1`).
//!
//! Every field carries a doc comment: they become the CRD's descriptions, which is what
//! `kubectl explain rpcservice.spec...` shows. Defaults are schema defaults, applied by the API server, so an
//! object with only `spec.broker.secretRef.name` is complete. What the API server can reject (ranges, immutable
//! fields, min <= max) is expressed as OpenAPI bounds and CEL rules rather than checked in the operator.

#![allow(clippy::duplicated_attributes)] // printcolumn(...) repeats by design

use k8s_openapi::api::core::v1::{Container, EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use warren_client::topology::QueueKind;

/// An RPC service: a RabbitMQ request queue (with its dead-letter queue) and a pool of workers that consume it,
/// run the handler and reply to each caller. The operator sizes the pool from the queue's backlog, arrival rate
/// and the measured throughput of one worker.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "RpcService",
    plural = "rpcservices",
    shortname = "rpcsvc",
    category = "warren",
    namespaced,
    doc = "An RPC service served over RabbitMQ: a request queue with dead-lettering and an autoscaled worker pool.",
    // The name is the worker pods' label value (at most 63) and part of the default queue name `<namespace>.<name>`
    // (RabbitMQ's limit is 255 bytes, `.dead` included): both fit when the name does.
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name must be at most 63 characters: it is the worker pods' label value and part of the queue name"),
    validation = Rule::new("!self.metadata.name.endsWith('.dead')").message("metadata.name must not end in '.dead': <namespace>.<name> would be another service's dead-letter queue"),
    status = "RpcServiceStatus",
    derive = "PartialEq",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas", priority = "1"),
    printcolumn(name = "Backlog", type_ = "integer", json_path = ".status.queue.ready"),
    printcolumn(
        name = "Delay",
        type_ = "number",
        json_path = ".status.queue.queueingDelaySeconds",
        description = "estimated queueing delay (s): backlog ÷ the rate the ready workers drain it"
    ),
    printcolumn(
        name = "Target",
        type_ = "number",
        json_path = ".status.queue.targetDelaySeconds",
        description = "the queueing delay (s) the pool is sized to stay under"
    ),
    printcolumn(
        name = "Rate",
        type_ = "number",
        json_path = ".status.queue.publishRate",
        description = "requests per second arriving"
    ),
    printcolumn(
        name = "Per-Replica",
        type_ = "number",
        json_path = ".status.scaling.perReplicaThroughput",
        priority = "1",
        description = "requests per second one worker completes, as the last decision used it"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.scaling.reason",
        priority = "1",
        description = "why the last scaling decision is what it is"
    ),
    printcolumn(name = "Queue", type_ = "string", json_path = ".status.queue.name", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    scale(
        spec_replicas_path = ".spec.worker.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RpcServiceSpec {
    /// The RabbitMQ broker that holds this service's queues.
    #[serde(default)]
    pub broker: BrokerRef,

    /// The request queue and its dead-letter queue.
    #[serde(default)]
    pub queue: QueueSpec,

    /// The worker pods that consume the request queue.
    #[serde(default)]
    pub worker: WorkerSpec,

    /// How the operator sizes the worker pool from what it observes on the broker.
    #[serde(default)]
    pub scaling: ScalingSpec,
}

/// Where the broker is and how to log in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerRef {
    /// A Secret in the RpcService's namespace with the keys `uri` (amqp:// or amqps://, with credentials and
    /// vhost) and `managementUri` (http:// or https://, the management API, with credentials). When omitted, the
    /// operator's default broker Secret is used (`--default-broker-secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
}

/// A reference to a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The request queue. Its dead-letter queue is `<name>.dead`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)").message("queue.name is immutable: it cannot be set, changed or removed after creation"))]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// The request queue's name on the broker; callers publish to it. Defaults to `<namespace>.<name>`.
    /// Immutable once the object exists. At most 250 bytes (RabbitMQ's limit is 255, and the dead-letter queue
    /// adds `.dead`); it must not end in `.dead`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    #[x_kube(
        validation = Rule::new("!self.startsWith('amq.')").message("queue names starting with 'amq.' are reserved by RabbitMQ"),
        validation = Rule::new("bytes(self).size() <= 250").message("queue.name must be at most 250 bytes: RabbitMQ allows 255 and the dead-letter queue adds '.dead'"),
        validation = Rule::new("!self.endsWith('.dead')").message("queue.name must not end in '.dead': that is a dead-letter queue's name")
    )]
    pub name: Option<String>,

    /// The queue type: `quorum` (replicated, with a delivery limit that dead-letters poison requests) or
    /// `classic`. Immutable: RabbitMQ cannot change the type of an existing queue.
    #[serde(rename = "type", default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("queue.type is immutable: RabbitMQ cannot change the type of an existing queue"))]
    pub queue_type: QueueType,

    /// How many times a request may be delivered before the broker moves it to the dead-letter queue instead.
    /// Protects the workers from a request that crashes them. Quorum queues only.
    #[serde(default = "default_delivery_limit")]
    #[schemars(range(min = 1))]
    pub delivery_limit: i32,

    /// The most requests the queue holds; when full, new requests are rejected so callers fail fast instead of
    /// waiting behind a backlog no one can drain. Unbounded when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<i64>,

    /// How long a request may wait in the queue before the broker dead-letters it. Callers also set a per-call
    /// expiration; this is the upper bound. Unbounded when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub message_ttl_seconds: Option<i64>,

    /// What happens to the queues when the RpcService is deleted: `Retain` (default) keeps them, so requests
    /// waiting in them are never lost by deleting the resource; `Delete` removes both queues.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            name: None,
            queue_type: QueueType::default(),
            delivery_limit: default_delivery_limit(),
            max_length: None,
            message_ttl_seconds: None,
            deletion_policy: DeletionPolicy::default(),
        }
    }
}

fn default_delivery_limit() -> i32 {
    5
}

/// RabbitMQ queue type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable, with a delivery limit.
    #[default]
    Quorum,
    /// A classic durable queue (no delivery limit).
    Classic,
}

impl From<QueueType> for QueueKind {
    fn from(t: QueueType) -> Self {
        match t {
            QueueType::Quorum => QueueKind::Quorum,
            QueueType::Classic => QueueKind::Classic,
        }
    }
}

/// What deleting the RpcService does to its queues.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep both queues and any requests in them.
    #[default]
    Retain,
    /// Delete both queues.
    Delete,
}

/// The worker pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// The warren-worker image. Defaults to the operator's configured worker image (`--worker-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// What runs each request: a built-in handler, an HTTP handler in a container of your own, or a container of
    /// your own that is itself the responder (e.g. built on the warren Python SDK).
    #[serde(default)]
    pub handler: HandlerSpec,

    /// The method used for requests that carry no method (no AMQP `type` property), e.g. RabbitMQ-tutorial-style
    /// callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_method: Option<String>,

    /// How many requests one worker holds unacknowledged at once; it runs up to this many handlers concurrently.
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 2000))]
    pub prefetch: i32,

    /// The replica count when autoscaling is off (`scaling.enabled: false`). This is the field the scale
    /// subresource moves, so `kubectl scale`, an HPA or KEDA can drive it. Ignored while autoscaling is on.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// Compute resources of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables for the worker container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// How long a worker may take to finish its in-flight requests after SIGTERM before it is killed.
    #[serde(default = "default_grace_period")]
    #[schemars(range(min = 1))]
    pub termination_grace_period_seconds: i64,

    /// How long the HTTP handler may take per request when the caller's deadline is later or absent; a request
    /// cut off gets a `deadline_exceeded` error reply. (`WARREN_HANDLER_TIMEOUT` of warren-worker.)
    #[serde(default = "default_handler_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub handler_timeout_seconds: i64,

    /// The largest reply (and HTTP handler response) in bytes; a larger one is answered with an `internal` error
    /// instead, so a reply the broker would refuse never makes a request run again. Keep it at or below the
    /// broker's `max_message_size` (16 MiB by default). (`WARREN_MAX_REPLY_BYTES` of warren-worker.)
    #[serde(default = "default_max_reply_bytes")]
    #[schemars(range(min = 1024, max = 536870912))]
    pub max_reply_bytes: i64,

    /// The largest request body a worker runs, in bytes; a larger request is answered with a `bad_request` error
    /// (`details.reason: request_too_large`) without running. (`WARREN_MAX_REQUEST_BYTES` of warren-worker.)
    #[serde(default = "default_max_request_bytes")]
    #[schemars(range(min = 1024, max = 536870912))]
    pub max_request_bytes: i64,

    /// Queues the workers may publish replies to besides reply addresses (direct reply-to and server-named
    /// `amq.gen-` queues, always allowed): a queue name, a prefix ending in `*` (`replies.*`), or `*` alone
    /// (any queue: lets a caller make the workers publish into another service's queue; not recommended).
    /// The service's own queues are never reply addresses. (`WARREN_ALLOW_REPLY_TO` of warren-worker.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 255)))]
    #[x_kube(validation = Rule::new("self.all(p, p.size() > 0 && !p.contains(',') && (p.indexOf('*') == -1 || p.indexOf('*') == p.size() - 1))").message("allowReplyTo entries are queue names or prefixes ending in '*' ('*' only at the end, no commas)"))]
    pub allow_reply_to: Vec<String>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            image: None,
            handler: HandlerSpec::default(),
            default_method: None,
            prefetch: default_prefetch(),
            replicas: default_replicas(),
            resources: None,
            env: Vec::new(),
            termination_grace_period_seconds: default_grace_period(),
            handler_timeout_seconds: default_handler_timeout(),
            max_reply_bytes: default_max_reply_bytes(),
            max_request_bytes: default_max_request_bytes(),
            allow_reply_to: Vec::new(),
        }
    }
}

fn default_prefetch() -> i32 {
    warren_autoscale::DEFAULT_PREFETCH as i32
}
fn default_replicas() -> i32 {
    1
}
fn default_grace_period() -> i64 {
    60
}
/// warren-worker's own default (`--handler-timeout 30s`).
pub const DEFAULT_HANDLER_TIMEOUT_SECONDS: i64 = 30;
fn default_handler_timeout() -> i64 {
    DEFAULT_HANDLER_TIMEOUT_SECONDS
}
/// warren-worker's own default (`--max-reply-bytes`): RabbitMQ 4's default `max_message_size`.
pub const DEFAULT_MAX_REPLY_BYTES: i64 = 16 * 1024 * 1024;
fn default_max_reply_bytes() -> i64 {
    DEFAULT_MAX_REPLY_BYTES
}
/// warren-worker's own default (`--max-request-bytes`).
pub const DEFAULT_MAX_REQUEST_BYTES: i64 = 16 * 1024 * 1024;
fn default_max_request_bytes() -> i64 {
    DEFAULT_MAX_REQUEST_BYTES
}

/// Exactly one of `builtin`, `http` or `container`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("(has(self.builtin) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.container) ? 1 : 0) == 1").message("handler needs exactly one of builtin, http or container"))]
#[serde(rename_all = "camelCase")]
pub struct HandlerSpec {
    /// A handler built into the worker: `echo` (returns its params), `add` (sums numbers), `sleep`
    /// (`{"ms": N}`, for load tests) or `fail` (always a handler error, for tests). All four methods are served;
    /// this one is the default method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinHandler>,

    /// Forward each request to an HTTP server in a container of your own in the same pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHandler>,

    /// Your own container is the responder: it consumes the request queue and replies itself (no warren-worker
    /// in the pod). The operator wires it through the environment the warren SDKs read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ResponderContainer>,
}

impl Default for HandlerSpec {
    fn default() -> Self {
        Self { builtin: Some(BuiltinHandler::Echo), http: None, container: None }
    }
}

/// The handlers built into warren-worker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinHandler {
    /// Returns the params unchanged.
    Echo,
    /// Returns the sum of its numeric params (positional or named).
    Add,
    /// Sleeps `{"ms": N}` milliseconds, then returns; for load tests.
    Sleep,
    /// Always replies with a `handler_error`; for tests.
    Fail,
}

impl BuiltinHandler {
    pub fn method(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Add => "add",
            Self::Sleep => "sleep",
            Self::Fail => "fail",
        }
    }
}

/// An HTTP handler: the worker POSTs each request's params to `http://127.0.0.1:<port><path>/<method>`
/// (the method also in the `X-Warren-Method` header); a 2xx response body is the result, anything else an error.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHandler {
    /// The port your container listens on, on the pod's loopback.
    #[serde(default = "default_http_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// The path prefix requests are POSTed to.
    #[serde(default = "default_http_path")]
    pub path: String,

    /// Your container, run beside the worker in each pod. It runs under the restricted profile: where its
    /// `securityContext` leaves them unset, the operator sets `allowPrivilegeEscalation: false`,
    /// `runAsNonRoot: true` and drops all capabilities; privileged containers, privilege escalation, added
    /// capabilities other than `NET_BIND_SERVICE`, running as root (uid 0 or `runAsNonRoot: false`), an
    /// `Unconfined` seccomp profile and host ports are refused.
    #[x_kube(
        validation = Rule::new("!has(self.securityContext) || !has(self.securityContext.privileged) || !self.securityContext.privileged").message("handler.http.container: privileged containers are not allowed"),
        validation = Rule::new("!has(self.securityContext) || !has(self.securityContext.allowPrivilegeEscalation) || !self.securityContext.allowPrivilegeEscalation").message("handler.http.container: allowPrivilegeEscalation must not be true"),
        validation = Rule::new("!has(self.securityContext) || !has(self.securityContext.capabilities) || !has(self.securityContext.capabilities.add) || self.securityContext.capabilities.add.all(c, c == 'NET_BIND_SERVICE')").message("handler.http.container: only NET_BIND_SERVICE may be added to the capabilities"),
        validation = Rule::new("!has(self.securityContext) || ((!has(self.securityContext.runAsNonRoot) || self.securityContext.runAsNonRoot) && (!has(self.securityContext.runAsUser) || self.securityContext.runAsUser != 0))").message("handler.http.container: must not run as root (runAsUser 0 or runAsNonRoot false)"),
        validation = Rule::new("!has(self.securityContext) || !has(self.securityContext.seccompProfile) || self.securityContext.seccompProfile.type != 'Unconfined'").message("handler.http.container: an Unconfined seccomp profile is not allowed"),
        validation = Rule::new("!has(self.ports) || self.ports.all(p, !has(p.hostPort) || p.hostPort == 0)").message("handler.http.container: host ports are not allowed")
    )]
    pub container: Container,
}

/// A stand-alone responder: your container, the only one in each worker pod. The operator sets
/// `WARREN_BROKER_URI` (from the broker Secret's `uri` key, by reference), `WARREN_QUEUE`, `WARREN_PREFETCH`,
/// `WARREN_DEFAULT_METHOD` (when `worker.defaultMethod` is set), `WARREN_DECLARE=false` (the operator declares the
/// queues) and `WARREN_METRICS_ADDR=0.0.0.0:<port>`, then your `env`; it probes `/readyz` and `/healthz` on `port`
/// and runs the container non-root (uid 65532), with a read-only root filesystem and all capabilities dropped.
///
/// A subset of a Kubernetes Container rather than the full type: the operator owns the probes, the ports and
/// the security context (they are what the protocol and the autoscaler rely on), so fields that would compete
/// with them are not offered, and the schema stays small. `worker.image`, `worker.env` and `worker.resources`
/// configure the warren-worker container and are not used with this handler.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponderContainer {
    /// The container's name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// Your responder's image.
    #[schemars(length(min = 1))]
    pub image: String,

    /// The entrypoint; the image's when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,

    /// Arguments to the entrypoint; the image's when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,

    /// Your environment variables, set after warren's (a name repeated here overrides warren's value).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Compute resources of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The port your responder serves `/healthz`, `/readyz` and `/metrics` on (`WARREN_METRICS_ADDR`).
    #[serde(default = "default_responder_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_responder_port() -> i32 {
    9090
}

fn default_http_port() -> i32 {
    8080
}
fn default_http_path() -> String {
    "/rpc".into()
}

/// Autoscaling of the worker pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("scaling.minReplicas must be less than or equal to scaling.maxReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// Whether the operator sizes the worker pool. When false, `worker.replicas` (the scale subresource) does.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// The fewest workers. 0 lets an idle service scale to zero; the first waiting request brings one back.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,

    /// The most workers.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,

    /// The queueing delay callers tolerate: the pool is sized so that the backlog drains within this many
    /// seconds while new requests keep arriving.
    #[serde(default = "default_target_delay")]
    #[schemars(range(min = 0.01))]
    pub target_queue_delay_seconds: f64,

    /// How long the load must stay low before the pool shrinks: the pool only shrinks to the highest
    /// recommendation of this window, which keeps it from flapping.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0))]
    pub scale_down_delay_seconds: i32,

    /// The share of a worker's measured throughput the sizing plans to use (headroom for bursts).
    #[serde(default = "default_utilization")]
    #[schemars(range(min = 0.1, max = 1.0))]
    pub target_utilization: f64,

    /// Requests per second one worker completes, used only until the operator has measured it under load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.001))]
    pub per_replica_throughput_hint: Option<f64>,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_queue_delay_seconds: default_target_delay(),
            scale_down_delay_seconds: default_scale_down_delay(),
            target_utilization: default_utilization(),
            per_replica_throughput_hint: None,
        }
    }
}

fn default_true() -> bool {
    true
}
// The policy's own defaults: a spec that states nothing gets what `PolicySpec::default()` holds.
fn default_min_replicas() -> i32 {
    warren_autoscale::DEFAULT_MIN_REPLICAS
}
fn default_max_replicas() -> i32 {
    warren_autoscale::DEFAULT_MAX_REPLICAS
}
fn default_target_delay() -> f64 {
    warren_autoscale::DEFAULT_TARGET_QUEUE_DELAY_SECONDS
}
fn default_scale_down_delay() -> i32 {
    warren_autoscale::DEFAULT_SCALE_DOWN_DELAY_SECONDS
}
fn default_utilization() -> f64 {
    warren_autoscale::DEFAULT_TARGET_UTILIZATION
}

/// What the operator observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RpcServiceStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `QueueReady`, `WorkersReady` and `Scaling`, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The request queue as last observed on the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,

    /// Worker pods that exist (the scale subresource's status replicas).
    #[serde(default)]
    pub replicas: i32,

    /// Worker pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// The replica count the operator last asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// The label selector of the worker pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Requests per second one worker completes, as measured while the workers were saturated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_replica_throughput: Option<f64>,

    /// When the operator last changed the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,

    /// Why the operator last changed the replica count, with the figures it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,

    /// The autoscaler's latest decision and its inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<ScalingStatus>,
}

/// The request queue's figures from the management API, and the queueing delay they imply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// The queue's name on the broker.
    pub name: String,
    /// Requests waiting to be delivered (the backlog), as of the latest look at the queue: the operator's probe
    /// between polls, else the management API. Absent until the management API reports it (a new queue has no
    /// statistics for its first seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<i64>,
    /// Requests delivered to a worker and not yet acknowledged (in flight). Absent until reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unacked: Option<i64>,
    /// Consumers attached (one per worker). Absent until reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumers: Option<i64>,
    /// Requests arriving per second. Absent until two polls span a rate window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_rate: Option<f64>,
    /// Requests completed (acknowledged) per second. Absent until two polls span a rate window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_rate: Option<f64>,
    /// The estimated queueing delay in seconds: how long a request arriving now waits before a worker takes it.
    /// By the latency model (docs/autoscaling.md): the backlog ÷ the rate the ready workers drain it, i.e. ready
    /// replicas × the per-replica throughput. 0 when nothing waits. Absent when it cannot be estimated: no figures
    /// from the broker this round, no throughput measured or hinted yet (while requests wait, a throughput seen only
    /// below saturation is a bound, not a measurement), or requests wait and no worker is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queueing_delay_seconds: Option<f64>,
    /// The queueing delay the pool is sized to stay under (`spec.scaling.targetQueueDelaySeconds`), beside the
    /// estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_delay_seconds: Option<f64>,
}

/// The autoscaler's latest decision, with everything it was computed from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingStatus {
    /// The replica count decided.
    pub desired_replicas: i32,
    /// Why, in a word: `Backlog`, `ArrivalRate`, `InFlight`, `ScaleDownDelay`, `MinReplicas`, `MaxReplicas`,
    /// `Steady`, `MetricsUnavailable`, `ScaleFromZero`, `Idle`.
    pub reason: String,
    /// The decision in a sentence, with its figures.
    pub message: String,
    /// Backlog (ready requests) used.
    #[serde(default)]
    pub backlog: i64,
    /// In-flight (unacked) requests used.
    #[serde(default)]
    pub in_flight: i64,
    /// Arrival rate (requests/s) used.
    #[serde(default)]
    pub arrival_rate: f64,
    /// Per-replica throughput (requests/s) used.
    #[serde(default)]
    pub per_replica_throughput: f64,
    /// Where that throughput came from: `measured` (while the workers were saturated), `lowerBound` (the most one
    /// worker was seen to complete, above the hint or prior), `hint` (`scaling.perReplicaThroughputHint`) or
    /// `prior` (a conservative guess, before anything is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_source: Option<String>,
    /// When it was decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

impl RpcService {
    /// The request queue's name: `spec.queue.name`, or `<namespace>.<name>`.
    pub fn queue_name(&self) -> String {
        use kube::ResourceExt;
        match &self.spec.queue.name {
            Some(name) => name.clone(),
            None => format!("{}.{}", self.namespace().unwrap_or_default(), self.name_any()),
        }
    }
}
