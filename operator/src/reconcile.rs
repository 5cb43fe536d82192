//! The reconcile pipeline: read (the broker Secret) → build (queue options, Deployment) → apply (queues on the
//! broker, the Deployment by server-side apply) → observe (queue figures, Deployment status) → scale → status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::broker::{Broker, BrokerEndpoint, BrokerError};
use crate::build::{self, BuildInputs};
use crate::context::{Context, FIELD_MANAGER, backoff};
use crate::crd::{DeletionPolicy, QueueStatus, RpcService, RpcServiceStatus};
use crate::error::{Error, Result};
use crate::scaling::{ServiceRegistration, ServiceView};
use crate::status::{self, ConditionUpdate};

/// The finalizer that lets the operator apply `deletionPolicy` before the object goes.
pub const FINALIZER: &str = "warren.dev/queues";
/// Set to "true" to let a deletion finish without touching the broker (e.g. it is gone for good).
pub const SKIP_BROKER_CLEANUP: &str = "warren.dev/skip-broker-cleanup";
/// Periodic re-check even when nothing changes: re-declares queues and refreshes status.
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(svc: Arc<RpcService>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let ns = svc.namespace().unwrap_or_default();
    let api: Api<RpcService> = Api::namespaced(ctx.client.clone(), &ns);
    let key = ObjectRef::from_obj(svc.as_ref());
    let result = finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            Finalizer::Apply(svc) => apply(&svc, &ctx).await,
            Finalizer::Cleanup(svc) => cleanup(&svc, &ctx).await,
        }
    })
    .await;
    let result = match result {
        Ok(action) => Ok(action),
        Err(error) => settle_finalizer_error(error, &api, &key.name).await,
    };
    if result.is_ok() {
        ctx.succeeded(&key);
    }
    result
}

/// The step's own error keeps its reason (not "failed to apply object: …"). A finalizer patch that lost a race is
/// not a failure when the object is gone, going, or already has the finalizer: a watch event follows. (Adding it is
/// refused with 422 when the patch's `test` ran against a cache that is behind, or once deletion has begun.)
async fn settle_finalizer_error(
    error: kube::runtime::finalizer::Error<Error>,
    api: &Api<RpcService>,
    name: &str,
) -> Result<Action> {
    use kube::runtime::finalizer::Error as F;
    let moot = match &error {
        F::ApplyFailed(_) | F::CleanupFailed(_) => false,
        F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404 => true,
        F::AddFinalizer(kube::Error::Api(s)) if s.code == 422 => match api.get_opt(name).await {
            Ok(Some(svc)) => {
                svc.metadata.deletion_timestamp.is_some() || svc.finalizers().iter().any(|f| f == FINALIZER)
            }
            Ok(None) => true,
            Err(_) => false,
        },
        _ => false,
    };
    match error {
        _ if moot => Ok(Action::await_change()),
        F::ApplyFailed(e) | F::CleanupFailed(e) => Err(e),
        other => Err(Error::Finalizer(Box::new(other))),
    }
}

pub fn error_policy(svc: Arc<RpcService>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.reason());
    let failures = ctx.failed(&ObjectRef::from_obj(svc.as_ref()));
    tracing::warn!(name = %svc.name_any(), namespace = ?svc.namespace(), reason = error.reason(), failures, "{error}");
    if error.is_permanent() {
        // The user (or a watched Secret) has to change something; a slow re-check is enough.
        Action::requeue(backoff(failures).max(Duration::from_secs(30)))
    } else {
        Action::requeue(backoff(failures))
    }
}

/// Resolves the broker Secret into an endpoint. Credentials stay in memory; they are never logged or written.
async fn read_broker(svc: &RpcService, ctx: &Context) -> Result<(String, BrokerEndpoint)> {
    let ns = svc.namespace().unwrap_or_default();
    let name = match (&svc.spec.broker.secret_ref, &ctx.config.default_broker_secret) {
        (Some(r), _) => r.name.clone(),
        (None, Some(default)) => default.clone(),
        (None, None) => return Err(Error::NoBrokerSecret),
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets
        .get_opt(&name)
        .await?
        .ok_or_else(|| Error::SecretNotFound { namespace: ns.clone(), name: name.clone() })?;
    let key = |k: &str| -> Result<String> {
        let data = secret.data.as_ref().and_then(|d| d.get(k)).map(|b| b.0.clone());
        let value = data.or_else(|| secret.string_data.as_ref().and_then(|d| d.get(k)).map(|s| s.clone().into_bytes()));
        let value = value
            .ok_or_else(|| Error::InvalidBrokerSecret { name: name.clone(), reason: format!("key {k} is missing") })?;
        String::from_utf8(value)
            .map(|s| s.trim().to_owned())
            .map_err(|_| Error::InvalidBrokerSecret { name: name.clone(), reason: format!("key {k} is not UTF-8") })
    };
    let endpoint = BrokerEndpoint { amqp_uri: key("uri")?, management_uri: key("managementUri")? };
    Ok((name, endpoint))
}

async fn apply(svc: &RpcService, ctx: &Context) -> Result<Action> {
    let key = ObjectRef::from_obj(svc);
    let queue = svc.queue_name();

    // read
    let (secret_name, broker) = match read_broker(svc, ctx).await.and_then(|(name, endpoint)| {
        ctx.brokers.get(&endpoint).map(|b| (name, b)).map_err(|e| match e {
            BrokerError::InvalidUri(reason) => Error::InvalidBrokerSecret { name: "broker".into(), reason },
            other => Error::Broker(other),
        })
    }) {
        Ok(found) => found,
        Err(error) => {
            // Nothing can be declared or run without the broker; say so and wait for the Secret to change.
            ctx.scaling.forget(&key);
            let q = ConditionUpdate::new(status::QUEUE_READY, false, error.reason(), error.to_string());
            let w =
                ConditionUpdate::new(status::WORKERS_READY, false, error.reason(), "workers need the broker Secret");
            write_status(svc, ctx, &[q, w], None, None).await?;
            return Err(error);
        }
    };

    // build + apply: the queues
    let declared = broker.declare_queues(&queue, &build::queue_options(svc)).await;

    // observe + scale: the autoscaler's latest view of this service (figures come from the observer's polls)
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let current = deployments.get_opt(&svc.name_any()).await?;
    let view = ctx.scaling.register(ServiceRegistration::new(key.clone(), svc, broker.clone(), current.as_ref()));
    let replicas = if svc.spec.scaling.enabled { view.desired_replicas } else { svc.spec.worker.replicas };

    // build + apply: the workers
    let inputs =
        BuildInputs { broker_secret: secret_name, default_worker_image: ctx.config.worker_image.clone(), replicas };
    let deployment = build::deployment(svc, &inputs);
    let applied = deployments
        .patch(&svc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&deployment))
        .await?;
    ctx.scaling.applied(&key, replicas);

    // status
    let queue_condition = match &declared {
        Ok(()) => ConditionUpdate::new(
            status::QUEUE_READY,
            true,
            "Declared",
            format!("queue {queue} and {queue}.dead are declared on {}", broker_name(&broker)),
        ),
        Err(e) => {
            let error = Error::Broker(clone_broker_error(e));
            ConditionUpdate::new(status::QUEUE_READY, false, error.reason(), error.to_string())
        }
    };
    let workers_condition = workers_condition(&applied, replicas);
    let events = write_status(svc, ctx, &[queue_condition, workers_condition], Some(&view), Some(replicas)).await?;
    publish_events(svc, ctx, &events, &view).await;

    match declared {
        Ok(()) => Ok(Action::requeue(RESYNC)),
        Err(e) => Err(Error::Broker(e)),
    }
}

/// `BrokerError` holds no non-cloneable sources; rebuild it for the condition while the original is returned.
fn clone_broker_error(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::InvalidUri(s) => BrokerError::InvalidUri(s.clone()),
        BrokerError::Unavailable(s) => BrokerError::Unavailable(s.clone()),
        BrokerError::QueueConflict { queue, argument, message } => {
            BrokerError::QueueConflict { queue: queue.clone(), argument: argument.clone(), message: message.clone() }
        }
        BrokerError::Refused(s) => BrokerError::Refused(s.clone()),
        BrokerError::ManagementUnavailable(s) => BrokerError::ManagementUnavailable(s.clone()),
    }
}

fn broker_name(broker: &Broker) -> String {
    format!("vhost {} of {}", broker.vhost(), broker.display_name())
}

fn workers_condition(deployment: &Deployment, desired: i32) -> ConditionUpdate {
    let ready = deployment.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    if desired == 0 {
        ConditionUpdate::new(status::WORKERS_READY, true, "ScaledToZero", "no workers: the service is idle")
    } else if ready >= desired {
        ConditionUpdate::new(
            status::WORKERS_READY,
            true,
            "AllReplicasReady",
            format!("{ready}/{desired} workers ready"),
        )
    } else if ready > 0 {
        ConditionUpdate::new(
            status::WORKERS_READY,
            true,
            "SomeReplicasReady",
            format!("{ready}/{desired} workers ready"),
        )
    } else {
        ConditionUpdate::new(status::WORKERS_READY, false, "NoReplicasReady", format!("0/{desired} workers ready"))
    }
}

/// What changed in this pass that deserves an event.
#[derive(Default)]
struct StatusChanges {
    transitions: Vec<(String, bool, String, String)>,
}

/// Writes the status with server-side apply on the status subresource and returns the condition transitions.
async fn write_status(
    svc: &RpcService,
    ctx: &Context,
    updates: &[ConditionUpdate],
    view: Option<&ServiceView>,
    desired: Option<i32>,
) -> Result<StatusChanges> {
    let previous = svc.status.clone().unwrap_or_default();
    let now = Time(Timestamp::now());
    let mut all: Vec<ConditionUpdate> = updates.to_vec();
    if let (Some(q), Some(w)) = (
        updates.iter().find(|c| c.type_ == status::QUEUE_READY),
        updates.iter().find(|c| c.type_ == status::WORKERS_READY),
    ) {
        all.push(status::ready_condition(q, w));
    }
    if let Some(view) = view {
        all.push(view.scaling_condition.clone());
    }
    let conditions = status::merge_conditions(&previous.conditions, &all, svc.meta().generation, &now);
    let mut changes = StatusChanges::default();
    for c in &conditions {
        let before = previous.conditions.iter().find(|p| p.type_ == c.type_);
        if before.is_none_or(|b| b.status != c.status || b.reason != c.reason) {
            changes.transitions.push((c.type_.clone(), c.status == "True", c.reason.clone(), c.message.clone()));
        }
    }
    let mut next = RpcServiceStatus {
        observed_generation: svc.meta().generation,
        conditions,
        selector: Some(build::selector_string(svc)),
        desired_replicas: desired,
        ..previous.clone()
    };
    if let Some(view) = view {
        next.replicas = view.replicas.current;
        next.ready_replicas = view.replicas.ready;
        next.queue = Some(match &view.figures {
            Some(f) => QueueStatus {
                name: svc.queue_name(),
                ready: f.ready as i64,
                unacked: f.unacked as i64,
                consumers: f.consumers as i64,
                publish_rate: view.arrival_rate.map(round2),
                ack_rate: view.completion_rate.map(round2),
            },
            None => QueueStatus { name: svc.queue_name(), ..previous.queue.clone().unwrap_or_default() },
        });
        if let Some(mu) = view.per_replica_throughput {
            next.per_replica_throughput = Some(round2(mu));
        }
        if let Some(decision) = &view.decision {
            next.scaling = Some(decision.clone());
        }
        if let Some((at, reason)) = &view.last_scale {
            next.last_scale_time = Some(Time(*at));
            next.last_scale_reason = Some(reason.clone());
        }
    }
    if next != previous || svc.status.is_none() {
        let api: Api<RpcService> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
        let patch = json!({
            "apiVersion": RpcService::api_version(&()),
            "kind": RpcService::kind(&()),
            "status": next,
        });
        api.patch_status(&svc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    }
    Ok(changes)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn publish_events(svc: &RpcService, ctx: &Context, changes: &StatusChanges, view: &ServiceView) {
    let reference = svc.object_ref(&());
    let mut events = Vec::new();
    for (type_, ok, reason, message) in &changes.transitions {
        if type_ == status::READY || type_ == status::SCALING {
            continue;
        }
        events.push(Event {
            type_: if *ok { EventType::Normal } else { EventType::Warning },
            reason: reason.clone(),
            note: Some(message.chars().take(1000).collect()),
            action: format!("Reconcile{type_}"),
            secondary: None,
        });
    }
    if view.queue_recreated {
        events.push(Event {
            type_: EventType::Warning,
            reason: "QueueRedeclared".into(),
            note: Some(format!("queue {} was missing on the broker and has been declared again", svc.queue_name())),
            action: "DeclareQueue".into(),
            secondary: None,
        });
    }
    if let Some(scale) = &view.scale_event {
        events.push(Event {
            type_: EventType::Normal,
            reason: "Scaled".into(),
            note: Some(scale.clone()),
            action: "Scale".into(),
            secondary: None,
        });
    }
    for event in events {
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::debug!("could not publish event: {e}");
        }
    }
}

/// Applies `deletionPolicy` to the queues; the Deployment goes with the object through its owner reference.
async fn cleanup(svc: &RpcService, ctx: &Context) -> Result<Action> {
    let key = ObjectRef::from_obj(svc);
    ctx.scaling.forget(&key);
    let skip = svc.annotations().get(SKIP_BROKER_CLEANUP).is_some_and(|v| v == "true");
    if svc.spec.queue.deletion_policy == DeletionPolicy::Delete && !skip {
        let (_, endpoint) = read_broker(svc, ctx).await?;
        let broker = ctx.brokers.get(&endpoint)?;
        broker.delete_queues(&svc.queue_name()).await?;
        let _ = ctx
            .recorder
            .publish(
                &Event {
                    type_: EventType::Normal,
                    reason: "QueuesDeleted".into(),
                    note: Some(format!("deleted {0} and {0}.dead (deletionPolicy: Delete)", svc.queue_name())),
                    action: "DeleteQueues".into(),
                    secondary: None,
                },
                &svc.object_ref(&()),
            )
            .await;
    }
    Ok(Action::await_change())
}
