//! The reconcile pipeline. [`apply`] reads as the steps, one line each:
//!
//! ```text
//! dereference  the broker Secret → the shared broker                  (dereference.rs)
//! build        queue options, the worker Deployment — pure            (build.rs)
//! apply        the queues on the broker, the Deployment by server-side apply
//! status       the next status and its transitions — pure             (status.rs)
//! patch        one status patch, then the events
//! ```
//!
//! The replicas come from the observer ([`crate::observer`]), which polls the broker beside the pipeline and
//! triggers a reconcile when its decision changes; the reconcile is the only writer.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::instrument;

use crate::build::{self, BuildInputs};
use crate::context::{Context, FIELD_MANAGER, backoff};
use crate::crd::{DeletionPolicy, RpcService, RpcServiceStatus};
use crate::dereference;
use crate::error::{Error, Result};
use crate::observer::{Announcements, Registration};
use crate::status;

/// The finalizer that lets the operator apply `deletionPolicy` before the object goes.
pub const FINALIZER: &str = "warren.dev/queues";
/// Set to "true" to let a deletion finish without touching the broker (e.g. it is gone for good).
pub const SKIP_BROKER_CLEANUP: &str = "warren.dev/skip-broker-cleanup";
/// Periodic re-check even when nothing changes: re-declares queues and refreshes status.
const RESYNC: Duration = Duration::from_secs(300);

/// Runs the pipeline through kube's finalizer helper: [`apply`] while the object lives, [`cleanup`] once it is
/// being deleted. Every log line of a pass carries the service's name and namespace.
#[instrument(skip_all, fields(name = %svc.name_any(), namespace = %svc.namespace().unwrap_or_default()))]
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

/// One pass over a live RpcService.
async fn apply(svc: &RpcService, ctx: &Context) -> Result<Action> {
    let key = ObjectRef::from_obj(svc);
    let found = match dereference::broker(svc, ctx).await {
        Ok(found) => found,
        Err(error) => return Err(broker_unreachable(svc, ctx, error.into()).await),
    };
    let declared = found.broker.declare_queues(&svc.queue_name(), &build::queue_options(svc)).await;
    let current = current_deployment(svc, ctx).await?;
    let view = ctx.observer.register(Registration::new(key.clone(), svc, found.broker.clone(), current.as_ref()));
    let replicas = if svc.spec.scaling.enabled { view.desired_replicas } else { svc.spec.worker.replicas };
    let inputs = BuildInputs {
        broker_secret: found.secret_name,
        default_worker_image: ctx.config.worker_image.clone(),
        replicas,
    };
    let applied = apply_deployment(svc, ctx, &build::deployment(svc, &inputs)).await?;
    ctx.observer.applied(&key, replicas);
    let conditions = [
        status::queue_condition(&declared, &svc.queue_name(), &found.broker),
        status::workers_condition(&applied, replicas),
    ];
    let (next, transitions) = status::next(svc, &conditions, Some(&view), Some(replicas), &now());
    patch_status(svc, ctx, &next).await?;
    // The queue was declared again only if the declaration succeeded; otherwise that news waits for the pass that does.
    let news =
        Announcements { queue_missing: view.announcements.queue_missing && declared.is_ok(), ..view.announcements };
    if publish(svc, ctx, status::events(svc, &transitions, &news)).await {
        ctx.observer.announced(&key, &news);
    }
    declared.map(|()| Action::requeue(RESYNC)).map_err(Error::DeclareQueues)
}

/// Without the broker nothing can be declared or run: say so, and wait for the Secret to change.
async fn broker_unreachable(svc: &RpcService, ctx: &Context, error: Error) -> Error {
    ctx.observer.forget(&ObjectRef::from_obj(svc));
    let (next, _) = status::next(svc, &status::unreachable_conditions(&error), None, None, &now());
    match patch_status(svc, ctx, &next).await {
        Ok(()) => error,
        Err(patch_failed) => patch_failed,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn deployments(svc: &RpcService, ctx: &Context) -> Api<Deployment> {
    Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default())
}

async fn current_deployment(svc: &RpcService, ctx: &Context) -> Result<Option<Deployment>> {
    deployments(svc, ctx)
        .get_opt(&svc.name_any())
        .await
        .map_err(|source| Error::ReadDeployment { name: svc.name_any(), source })
}

/// Server-side apply under the operator's field manager, forced: edits by others to its fields are undone.
async fn apply_deployment(svc: &RpcService, ctx: &Context, deployment: &Deployment) -> Result<Deployment> {
    deployments(svc, ctx)
        .patch(&svc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(deployment))
        .await
        .map_err(|source| Error::ApplyDeployment { name: svc.name_any(), source })
}

/// The status subresource by server-side apply, only when it changed.
async fn patch_status(svc: &RpcService, ctx: &Context, next: &RpcServiceStatus) -> Result<()> {
    if svc.status.as_ref() == Some(next) {
        return Ok(());
    }
    let api: Api<RpcService> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": RpcService::api_version(&()),
        "kind": RpcService::kind(&()),
        "status": next,
    });
    api.patch_status(&svc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(Error::PatchStatus)?;
    Ok(())
}

/// Publishes `events`; returns whether all of them were.
async fn publish(svc: &RpcService, ctx: &Context, events: Vec<Event>) -> bool {
    let reference = svc.object_ref(&());
    let mut all = true;
    for event in events {
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::debug!("could not publish event: {e}");
            all = false;
        }
    }
    all
}

/// Applies `deletionPolicy` to the queues; the Deployment goes with the object through its owner reference.
async fn cleanup(svc: &RpcService, ctx: &Context) -> Result<Action> {
    ctx.observer.forget(&ObjectRef::from_obj(svc));
    let skip = svc.annotations().get(SKIP_BROKER_CLEANUP).is_some_and(|v| v == "true");
    if svc.spec.queue.deletion_policy == DeletionPolicy::Delete && !skip {
        let found = dereference::broker(svc, ctx).await?;
        found.broker.delete_queues(&svc.queue_name()).await.map_err(Error::DeleteQueues)?;
        let deleted = Event {
            type_: EventType::Normal,
            reason: "QueuesDeleted".into(),
            note: Some(format!("deleted {0} and {0}.dead (deletionPolicy: Delete)", svc.queue_name())),
            action: "DeleteQueues".into(),
            secondary: None,
        };
        publish(svc, ctx, vec![deleted]).await;
    }
    ctx.brokers.release(&ObjectRef::from_obj(svc));
    Ok(Action::await_change())
}
