//! What every reconcile shares: the API client, configuration, brokers, the observer, metrics, the event recorder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use warren_client::backoff::Backoff;

use crate::broker::{BrokerEndpoint, BrokerPool};
use crate::crd::RpcService;
use crate::metrics::Metrics;
use crate::observer::Observer;

/// The field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "warren-operator";

/// Operator-wide settings, from the command line.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// The worker image for RpcServices that name none.
    pub worker_image: String,
    /// The broker Secret (in the RpcService's namespace) for RpcServices that name none.
    pub default_broker_secret: Option<String>,
    /// How often the observer reads queue figures from the management API.
    pub poll_interval: Duration,
    /// How long after deletion began `deletionPolicy: Delete` keeps retrying to delete the queues on a broker that
    /// does not answer or refuses, before the finalizer lets the object go and reports the queues left behind.
    pub cleanup_timeout: Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            worker_image: format!("ghcr.io/warren-dev/warren-worker:{}", env!("CARGO_PKG_VERSION")),
            default_broker_secret: None,
            poll_interval: Duration::from_secs(5),
            cleanup_timeout: Duration::from_secs(300),
        }
    }
}

pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub brokers: BrokerPool,
    pub observer: Arc<Observer>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<RpcService>, u32>>,
    /// The controller's cache of the Deployments the operator manages (set by [`crate::controller::run`]); a
    /// reconcile reads the current Deployment from it once it has synced, else from the API server.
    deployments: OnceLock<Store<Deployment>>,
    /// What the last server-side apply of each service's Deployment sent and got back, to skip an apply that would
    /// change nothing.
    applied: Mutex<HashMap<ObjectRef<RpcService>, AppliedDeployment>>,
    /// The last state of each managed Deployment the operator has acted on (see [`DeploymentFingerprint`]).
    seen: Mutex<HashMap<ObjectRef<Deployment>, DeploymentFingerprint>>,
    /// The controller's metadata-only cache of Secrets (set by [`crate::controller::run`]): their resourceVersions.
    secret_versions: OnceLock<Store<PartialObjectMeta<Secret>>>,
    /// The broker endpoint read from each broker Secret, with the Secret's resourceVersion then: a reconcile reads
    /// the Secret again only when that moved (at 1,000 services on one Secret, one read instead of one each pass).
    endpoints: Mutex<HashMap<ObjectRef<Secret>, (String, BrokerEndpoint)>>,
}

/// A server-side apply of a service's Deployment as it was sent and as the API server stored it.
#[derive(Clone, Debug)]
pub struct AppliedDeployment {
    /// A hash of the Deployment the operator built (what it sent).
    pub desired: u64,
    pub uid: Option<String>,
    /// `metadata.generation` after the apply: an edit of the spec by anyone else moves it.
    pub generation: Option<i64>,
    pub at: Instant,
}

/// What of a Deployment the reconcile uses: a watch event that changes none of it (status conditions, observed
/// generation, the echo of the operator's own apply) triggers no reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentFingerprint {
    uid: Option<String>,
    generation: Option<i64>,
    replicas: Option<i32>,
    pods: Option<i32>,
    ready: Option<i32>,
    deleting: bool,
}

impl DeploymentFingerprint {
    pub fn of(d: &Deployment) -> Self {
        let status = d.status.as_ref();
        Self {
            uid: d.metadata.uid.clone(),
            generation: d.metadata.generation,
            replicas: d.spec.as_ref().and_then(|s| s.replicas),
            pods: status.and_then(|s| s.replicas),
            ready: status.and_then(|s| s.ready_replicas),
            deleting: d.metadata.deletion_timestamp.is_some(),
        }
    }
}

impl Context {
    pub fn new(client: Client, config: OperatorConfig, observer: Arc<Observer>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            brokers: BrokerPool::default(),
            observer,
            metrics,
            failures: Mutex::default(),
            deployments: OnceLock::new(),
            applied: Mutex::default(),
            seen: Mutex::default(),
            secret_versions: OnceLock::new(),
            endpoints: Mutex::default(),
        }
    }

    /// Hands the reconciles the controller's metadata cache of Secrets.
    pub fn set_secret_cache(&self, store: Store<PartialObjectMeta<Secret>>) {
        let _ = self.secret_versions.set(store);
    }

    /// The endpoint last read from Secret `name` in `namespace`, if the Secret has not changed since (its
    /// resourceVersion in the synced cache is the one it was read at); `None`: read it.
    pub fn known_endpoint(&self, namespace: &str, name: &str) -> Option<BrokerEndpoint> {
        let store = self.secret_versions.get()?;
        if !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
            return None;
        }
        let key = ObjectRef::<Secret>::new(name).within(namespace);
        let current = store.get(&ObjectRef::new(name).within(namespace))?.metadata.resource_version.clone()?;
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        endpoints.get(&key).filter(|(version, _)| *version == current).map(|(_, endpoint)| endpoint.clone())
    }

    /// Remembers the endpoint read from `secret`.
    pub fn remember_endpoint(&self, secret: &Secret, endpoint: &BrokerEndpoint) {
        let Some(version) = secret.metadata.resource_version.clone() else { return };
        let key = ObjectRef::from_obj(secret);
        self.endpoints.lock().expect("endpoints lock").insert(key, (version, endpoint.clone()));
    }

    /// Hands the reconciles the controller's Deployment cache.
    pub fn set_deployment_cache(&self, store: Store<Deployment>) {
        let _ = self.deployments.set(store);
    }

    /// The cached Deployment `name` in `namespace`: `None` when the cache is not there or has not synced yet (ask
    /// the API server), `Some(None)` when it has and holds no such Deployment.
    pub fn cached_deployment(&self, namespace: &str, name: &str) -> Option<Option<Deployment>> {
        let store = self.deployments.get()?;
        if !matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
            return None;
        }
        let key = ObjectRef::<Deployment>::new(name).within(namespace);
        Some(store.get(&key).map(|d| (*d).clone()))
    }

    /// Remembers a Deployment as the operator last saw it; returns whether that differs from what it saw before.
    pub fn deployment_seen(&self, deployment: &Deployment) -> bool {
        let key = ObjectRef::from_obj(deployment);
        let print = DeploymentFingerprint::of(deployment);
        let mut seen = self.seen.lock().expect("seen lock");
        if seen.get(&key) == Some(&print) {
            return false;
        }
        seen.insert(key, print);
        true
    }

    /// Forgets a Deployment that is gone.
    pub fn deployment_gone(&self, deployment: &Deployment) {
        self.seen.lock().expect("seen lock").remove(&ObjectRef::from_obj(deployment));
    }

    pub fn last_applied(&self, key: &ObjectRef<RpcService>) -> Option<AppliedDeployment> {
        self.applied.lock().expect("applied lock").get(key).cloned()
    }

    pub fn record_applied(&self, key: &ObjectRef<RpcService>, desired: u64, deployment: &Deployment) {
        let record = AppliedDeployment {
            desired,
            uid: deployment.uid(),
            generation: deployment.metadata.generation,
            at: Instant::now(),
        };
        self.applied.lock().expect("applied lock").insert(key.clone(), record);
    }

    /// Forgets the service's last apply (it is being deleted, or its apply must run again).
    pub fn forget_applied(&self, key: &ObjectRef<RpcService>) {
        self.applied.lock().expect("applied lock").remove(key);
    }

    /// Records one more failure of `key` and returns how many in a row.
    pub fn failed(&self, key: &ObjectRef<RpcService>) -> u32 {
        let mut failures = self.failures.lock().expect("failures lock");
        let n = failures.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub fn succeeded(&self, key: &ObjectRef<RpcService>) {
        self.failures.lock().expect("failures lock").remove(key);
    }
}

/// The requeue schedule: 1 s, 2 s, 4 s ... capped at a minute.
const REQUEUE: Backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60) };

/// The requeue delay after the `n`th consecutive transient failure, within ±10 % of [`REQUEUE`]'s ceiling: enough
/// that many objects failing together (a broker outage) do not retry in lockstep, close enough to stay predictable.
pub fn backoff(n: u32) -> Duration {
    let jitter = rand::random::<f64>() * 0.2 + 0.9;
    REQUEUE.ceiling(n.saturating_sub(1)).mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(1100));
        assert!(backoff(3) >= Duration::from_millis(3600));
        assert!(backoff(50) <= Duration::from_secs(66));
        assert!(backoff(50) >= Duration::from_secs(54));
    }
}
