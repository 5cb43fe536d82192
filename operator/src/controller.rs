//! Wires the reconciler to the API server: watches RpcServices, the Deployments they own and the Secrets they
//! reference, plus the observer's triggers; runs until shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::{Controller, WatchStreamExt, wait, watcher};
use kube::{Client, ResourceExt};

use crate::context::Context;
use crate::crd::RpcService;
use crate::reconcile;

/// Blocks until the RpcService CRD is installed and Established, logging while it waits.
pub async fn wait_for_crd(client: Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let name = "rpcservices.warren.dev";
    loop {
        match tokio::time::timeout(
            Duration::from_secs(30),
            wait::await_condition(crds.clone(), name, wait::conditions::is_crd_established()),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => tracing::warn!("waiting for CRD {name}: {e}"),
            Err(_) => tracing::warn!("CRD {name} is not established yet; install it with `kubectl apply -f crds/`"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first. `cache` fills the store
/// the observer was given.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    concurrency: u16,
    cache: Writer<RpcService>,
    triggers: impl Stream<Item = ObjectRef<RpcService>> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (services, deployments, secrets): (Api<RpcService>, Api<Deployment>, Api<PartialObjectMeta<Secret>>) =
        match &namespace {
            Some(ns) => {
                (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::namespaced(client, ns))
            }
            None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client)),
        };
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=warren-operator");
    // Status writes do not bump the generation: filtering on it keeps the operator's own status patches from
    // triggering another reconcile (a loop while the broker is down). Deletion and annotation changes still pass,
    // and so does a finalizer removed by someone else; the operator's own finalizer patch does not (the pass that
    // made it went on to apply).
    let store = cache.as_reader();
    let mut last_seen = HashMap::new();
    let changes = watcher(services, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|svc| svc.managed_fields_mut().clear())
        .reflect(cache)
        .filter_map(move |event| {
            let changed = match event {
                Ok(watcher::Event::Apply(svc) | watcher::Event::InitApply(svc)) => {
                    service_changed(&mut last_seen, &svc).then_some(Ok(svc))
                }
                Ok(watcher::Event::Delete(svc)) => {
                    last_seen.remove(&svc.uid().unwrap_or_default());
                    None
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(changed)
        });
    let controller = Controller::for_stream(changes, store.clone())
        .with_config(ControllerConfig::default().concurrency(concurrency));
    // The managed Deployments, cached for the reconciles; only a change the status shows (or that the operator must
    // undo: an edited spec, a deletion) triggers the owner's reconcile, not every status update of the Deployment
    // controller nor the echo of the operator's own apply.
    let (deployment_cache, deployment_writer) = reflector::store();
    ctx.set_deployment_cache(deployment_cache);
    let seen = ctx.clone();
    let deployment_changes =
        // Without managedFields (half of a stored object, read by nothing here): 1,000 cached Deployments cost less.
        watcher(deployments, managed)
            .default_backoff()
            .modify(|d| d.managed_fields_mut().clear())
            .reflect(deployment_writer)
            .filter_map(move |event| {
            let changed = match event {
                Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                    seen.deployment_seen(&d).then_some(Ok(d))
                }
                Ok(watcher::Event::Delete(d)) => {
                    seen.deployment_gone(&d);
                    Some(Ok(d))
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                Err(e) => Some(Err(e)),
            };
            futures::future::ready(changed)
        });
    // Secrets as metadata only: the operator caches no Secret. Their resourceVersions tell a reconcile whether the
    // endpoint it read from one before (as the broker pool keeps it) still holds, or the Secret must be read again.
    let (secret_cache, secret_writer) = reflector::store();
    ctx.set_secret_cache(secret_cache);
    let secret_changes =
        watcher(secrets, watcher::Config::default()).default_backoff().reflect(secret_writer).touched_objects();
    controller
        .owns_stream(deployment_changes)
        .watches_stream(secret_changes, move |secret| {
            let (ns, name) = (secret.namespace(), secret.name_any());
            store
                .state()
                .into_iter()
                .filter(|svc| svc.namespace() == ns && references_secret(svc, &name))
                .map(|svc| ObjectRef::from_obj(svc.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

/// What of an RpcService, besides the status the operator writes itself, calls for a reconcile.
#[derive(PartialEq)]
struct Seen {
    generation: Option<i64>,
    annotations: std::collections::BTreeMap<String, String>,
    deleting: bool,
    finalized: bool,
}

/// Whether `svc` changed in a way that calls for a reconcile since `last_seen` saw it: new, a new generation
/// (spec), annotations, deletion begun, or the operator's finalizer gone. Not: its status, or the finalizer added.
fn service_changed(last_seen: &mut HashMap<String, Seen>, svc: &RpcService) -> bool {
    let now = Seen {
        generation: svc.metadata.generation,
        annotations: svc.annotations().clone(),
        deleting: svc.metadata.deletion_timestamp.is_some(),
        finalized: svc.finalizers().iter().any(|f| f == reconcile::FINALIZER),
    };
    let changed = match last_seen.get(&svc.uid().unwrap_or_default()) {
        None => true,
        Some(before) => {
            before.generation != now.generation
                || before.annotations != now.annotations
                || before.deleting != now.deleting
                || (before.finalized && !now.finalized)
        }
    };
    last_seen.insert(svc.uid().unwrap_or_default(), now);
    changed
}

/// Whether the Secret named `name` is this service's broker Secret (or the default one it falls back to).
fn references_secret(svc: &RpcService, name: &str) -> bool {
    match &svc.spec.broker.secret_ref {
        Some(r) => r.name == name,
        // A service on the default Secret: any Secret may be it; reconciling it once more is cheap.
        None => true,
    }
}
