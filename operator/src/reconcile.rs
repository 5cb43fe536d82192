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
use warren_client::topology::{self, MAX_QUEUE_NAME_BYTES};

use crate::build::{self, BuildInputs};
use crate::context::{AppliedDeployment, Context, FIELD_MANAGER, backoff};
use crate::crd::{DeletionPolicy, RpcService, RpcServiceStatus};
use crate::dereference;
use crate::error::{Error, Result};
use crate::observer::{Announcements, Registration};
use crate::{ownership, status};

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
    // The pass that adds the finalizer goes on with the object the API server returned (kube's helper would stop
    // there and wait for the watch event of its own patch: one more pass, and QueueReady a round later).
    let svc = match ensure_finalizer(&api, svc, &ctx).await {
        Ok(Some(svc)) => svc,
        Ok(None) => return Ok(Action::await_change()),
        Err(error) => return Err(error),
    };
    let result = finalizer(&api, FINALIZER, svc, |event| async {
        match event {
            Finalizer::Apply(svc) => apply(&svc, &ctx).await,
            Finalizer::Cleanup(svc) => {
                let done = cleanup(&svc, &ctx).await;
                if done.is_ok() {
                    // kube's helper removes the finalizer next.
                    ctx.metrics.kubernetes_request("patch", "rpcservices");
                }
                done
            }
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

/// The object with the operator's finalizer on it, added now if it was not (or the object as it is once its
/// deletion has begun); `None` when the object is gone. The patch carries the cached `resourceVersion`: it is
/// refused (409) rather than overwrite a list someone else changed meanwhile, and then the object is read again.
async fn ensure_finalizer(
    api: &Api<RpcService>,
    svc: Arc<RpcService>,
    ctx: &Context,
) -> Result<Option<Arc<RpcService>>> {
    let finalized =
        |s: &RpcService| s.metadata.deletion_timestamp.is_some() || s.finalizers().iter().any(|f| f == FINALIZER);
    if finalized(&svc) {
        return Ok(Some(svc));
    }
    let mut finalizers = svc.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    let patch = json!({
        "metadata": { "resourceVersion": svc.resource_version(), "finalizers": finalizers },
    });
    ctx.metrics.kubernetes_request("patch", "rpcservices");
    let error = match api.patch(&svc.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(patched) => return Ok(Some(Arc::new(patched))),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
        Err(error) => error,
    };
    let lost_race = matches!(&error, kube::Error::Api(s) if s.code == 409 || s.code == 422);
    if lost_race {
        ctx.metrics.kubernetes_request("get", "rpcservices");
        match api.get_opt(&svc.name_any()).await {
            Ok(None) => return Ok(None),
            Ok(Some(fresh)) if finalized(&fresh) => return Ok(Some(Arc::new(fresh))),
            _ => {}
        }
    }
    Err(Error::Finalizer(Box::new(kube::runtime::finalizer::Error::AddFinalizer(error))))
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
        F::AddFinalizer(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => match api.get_opt(name).await {
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
    if let Some(error) = invalid_queue_name(svc) {
        return Err(blocked(svc, ctx, error).await);
    }
    let found = match dereference::broker(svc, ctx).await {
        Ok(found) => found,
        Err(error) => return Err(blocked(svc, ctx, error.into()).await),
    };
    if let Some(owner) = ownership::owner(svc, &found.broker, &ctx.observer.claims()) {
        return Err(blocked(svc, ctx, queue_claimed(svc, &owner)).await);
    }
    let declared = found.broker.declare_queues(&svc.queue_name(), &build::queue_options(svc)).await;
    let current = current_deployment(svc, ctx).await?;
    let view = ctx.observer.register(Registration::new(key.clone(), svc, found.broker.clone(), current.as_ref()));
    let replicas = if svc.spec.scaling.enabled { view.desired_replicas } else { svc.spec.worker.replicas };
    let inputs = BuildInputs {
        broker_secret: found.secret_name,
        default_worker_image: ctx.config.worker_image.clone(),
        replicas,
    };
    let desired = build::deployment(svc, &inputs);
    let fingerprint = hash_of(&desired);
    let (applied, view) = match current.filter(|c| unchanged(ctx.last_applied(&key).as_ref(), fingerprint, &desired, c))
    {
        // The API server already holds exactly this: an apply would change nothing.
        Some(current) => (current, view),
        None => {
            let applied = apply_deployment(svc, ctx, &desired).await?;
            ctx.record_applied(&key, fingerprint, &applied);
            // The counts as the apply returned them, fresher than the cache's.
            let view = ctx.observer.register(Registration::new(key.clone(), svc, found.broker.clone(), Some(&applied)));
            (applied, view)
        }
    };
    // The watch event of this very state is no news.
    ctx.deployment_seen(&applied);
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

/// A queue name RabbitMQ cannot hold (the CRD refuses them; an object stored before it did may still have one).
fn invalid_queue_name(svc: &RpcService) -> Option<Error> {
    let dead = topology::dead_letter_queue_name(&svc.queue_name());
    (dead.len() > MAX_QUEUE_NAME_BYTES).then(|| Error::InvalidQueueName { queue: svc.queue_name() })
}

fn queue_claimed(svc: &RpcService, owner: &RpcService) -> Error {
    Error::QueueClaimed {
        queue: svc.queue_name(),
        owner: format!("{}/{}", owner.namespace().unwrap_or_default(), owner.name_any()),
    }
}

/// Without the broker, or with a queue this service may not use, nothing can be declared or run: say so, and
/// wait for a change.
async fn blocked(svc: &RpcService, ctx: &Context, error: Error) -> Error {
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

/// The service's Deployment: from the controller's cache once it has synced, else from the API server.
async fn current_deployment(svc: &RpcService, ctx: &Context) -> Result<Option<Deployment>> {
    let (ns, name) = (svc.namespace().unwrap_or_default(), svc.name_any());
    if let Some(cached) = ctx.cached_deployment(&ns, &name) {
        return Ok(cached);
    }
    ctx.metrics.kubernetes_request("get", "deployments");
    deployments(svc, ctx).get_opt(&name).await.map_err(|source| Error::ReadDeployment { name, source })
}

/// Whether `current` is what the last apply of `desired` (by its hash `fingerprint`) left: the same object, its
/// spec not edited since (the generation would have moved), the operator's labels, annotations and owner
/// reference still on it, and the apply recent (a periodic one re-asserts every field, as before).
fn unchanged(last: Option<&AppliedDeployment>, fingerprint: u64, desired: &Deployment, current: &Deployment) -> bool {
    let Some(last) = last else { return false };
    let subset = |want: &Option<std::collections::BTreeMap<String, String>>,
                  have: &Option<std::collections::BTreeMap<String, String>>| {
        want.iter().flatten().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let (want, have) = (&desired.metadata, &current.metadata);
    last.desired == fingerprint
        && last.at.elapsed() < RESYNC / 2
        && have.deletion_timestamp.is_none()
        && last.uid.is_some()
        && last.uid == have.uid
        && last.generation.is_some()
        && last.generation == have.generation
        && subset(&want.labels, &have.labels)
        && subset(&want.annotations, &have.annotations)
        && want
            .owner_references
            .iter()
            .flatten()
            .all(|o| have.owner_references.iter().flatten().any(|h| h.uid == o.uid))
}

fn hash_of(deployment: &Deployment) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(deployment).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// Server-side apply under the operator's field manager, forced: edits by others to its fields are undone.
async fn apply_deployment(svc: &RpcService, ctx: &Context, deployment: &Deployment) -> Result<Deployment> {
    ctx.metrics.kubernetes_request("patch", "deployments");
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
    ctx.metrics.kubernetes_request("patch", "rpcservices/status");
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
        ctx.metrics.kubernetes_request("create", "events");
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::debug!("could not publish event: {e}");
            all = false;
        }
    }
    all
}

/// Applies `deletionPolicy` to the queues; the Deployment goes with the object through its owner reference.
/// Deleting them is retried with backoff, but never holds the object (or its namespace) forever: see
/// [`leave_queues_because`].
async fn cleanup(svc: &RpcService, ctx: &Context) -> Result<Action> {
    ctx.observer.forget(&ObjectRef::from_obj(svc));
    ctx.forget_applied(&ObjectRef::from_obj(svc));
    let done = apply_deletion_policy(svc, ctx).await;
    // Once the object may go, its broker may too (a failed cleanup is retried with it).
    if done.is_ok() {
        ctx.brokers.release(&ObjectRef::from_obj(svc));
    }
    done
}

async fn apply_deletion_policy(svc: &RpcService, ctx: &Context) -> Result<Action> {
    let skip = svc.annotations().get(SKIP_BROKER_CLEANUP).is_some_and(|v| v == "true");
    if svc.spec.queue.deletion_policy != DeletionPolicy::Delete || skip {
        return Ok(Action::await_change());
    }
    let queue = svc.queue_name();
    let event = match delete_queues(svc, ctx).await {
        Ok(None) => event(
            EventType::Normal,
            "QueuesDeleted",
            format!("deleted {queue} and {queue}.dead (deletionPolicy: Delete)"),
        ),
        Ok(Some(owner)) => {
            let note = format!("kept {queue} and {queue}.dead: they belong to RpcService {owner}");
            tracing::warn!("{note}");
            event(EventType::Warning, "QueuesRetained", note)
        }
        Err(error) => {
            let Some(why) = leave_queues_because(&error, svc, ctx.config.cleanup_timeout, &Timestamp::now()) else {
                return Err(error);
            };
            let note =
                format!("{queue} and {queue}.dead may be left on the broker: {why} ({error}); delete them by hand");
            tracing::warn!("{note}");
            event(EventType::Warning, "QueuesLeftBehind", note)
        }
    };
    publish(svc, ctx, vec![event]).await;
    Ok(Action::await_change())
}

/// Deletes the service's queues unless another service owns them; returns that owner.
async fn delete_queues(svc: &RpcService, ctx: &Context) -> Result<Option<String>> {
    if let Some(error) = invalid_queue_name(svc) {
        return Err(error);
    }
    let found = dereference::broker(svc, ctx).await?;
    if let Some(owner) = ownership::owner(svc, &found.broker, &ctx.observer.claims()) {
        return Ok(Some(format!("{}/{}", owner.namespace().unwrap_or_default(), owner.name_any())));
    }
    found.broker.delete_queues(&svc.queue_name()).await.map_err(Error::DeleteQueues)?;
    Ok(None)
}

/// Why the finalizer stops trying to delete the queues after `error`, or `None` to retry with backoff. It stops
/// when no retry can succeed (the broker Secret is gone, as when its namespace is being deleted, or invalid; the
/// queue name is one RabbitMQ cannot hold) and once `timeout` has passed since deletion began (a broker that
/// stays unreachable or refuses).
pub fn leave_queues_because(error: &Error, svc: &RpcService, timeout: Duration, now: &Timestamp) -> Option<String> {
    use crate::dereference::DereferenceError as D;
    match error {
        Error::Dereference(D::NoBrokerSecret | D::SecretNotFound { .. } | D::InvalidBrokerSecret { .. }) => {
            Some("the broker Secret is gone or invalid, so the broker cannot be reached".to_owned())
        }
        Error::InvalidQueueName { .. } => Some("RabbitMQ cannot hold such a queue name".to_owned()),
        _ => {
            let since = svc.metadata.deletion_timestamp.as_ref()?.0;
            let waited = Duration::try_from(now.duration_since(since)).unwrap_or_default();
            (waited >= timeout).then(|| format!("gave up after {} of retries", humantime::format_duration(timeout)))
        }
    }
}

fn event(type_: EventType, reason: &str, note: String) -> Event {
    Event { type_, reason: reason.into(), note: Some(note), action: "DeleteQueues".into(), secondary: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerError;
    use crate::crd::RpcServiceSpec;
    use crate::dereference::DereferenceError;

    fn deleting(seconds_ago: i64, now: &Timestamp) -> RpcService {
        let mut svc = RpcService::new("calc", RpcServiceSpec::default());
        svc.metadata.namespace = Some("shop".into());
        let since = now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(seconds_ago)).unwrap();
        svc.metadata.deletion_timestamp = Some(Time(since));
        svc
    }

    #[test]
    fn cleanup_leaves_the_queues_when_no_retry_can_succeed_or_the_bound_has_passed() {
        let now = Timestamp::now();
        let timeout = Duration::from_secs(300);
        let gone = Error::from(DereferenceError::SecretNotFound { namespace: "shop".into(), name: "rabbitmq".into() });
        let down = Error::DeleteQueues(BrokerError::ManagementUnavailable("connection refused".into()));
        let refused = Error::DeleteQueues(BrokerError::Refused("HTTP 403".into()));

        let why = leave_queues_because(&gone, &deleting(1, &now), timeout, &now).expect("a gone Secret ends it");
        assert!(why.contains("broker Secret is gone"), "{why}");
        for error in [&down, &refused] {
            assert_eq!(leave_queues_because(error, &deleting(60, &now), timeout, &now), None, "retried: {error}");
            let why = leave_queues_because(error, &deleting(301, &now), timeout, &now).expect("bounded");
            assert!(why.contains("5m"), "{why}");
        }
    }
}
