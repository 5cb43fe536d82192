//! The test cluster: a real kube-apiserver (with etcd) started by `scripts/env up` and reached through
//! `KUBECONFIG`. There is no kube-controller-manager, so nothing cleans up after a test but the test:
//! [`TestNamespace`] deletes what it holds and finalizes itself, the way the namespace controller would.

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition, await_condition, conditions};
use kube::{Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use warren_client::endpoint::{SECRET_MANAGEMENT_URI_KEY, SECRET_URI_KEY};
use warren_operator::RpcService;

/// The field manager the tests write with.
pub const FIELD_MANAGER: &str = "warren-tests";

/// Label on every namespace a test creates, so a leftover one can be found: `kubectl get ns -l warren.dev/test`.
pub const TEST_LABEL: &str = "warren.dev/test";

/// Path of the kubeconfig `scripts/env up` wrote (`KUBECONFIG`).
pub fn kubeconfig_path() -> String {
    std::env::var("KUBECONFIG")
        .ok()
        .filter(|path| !path.is_empty())
        .expect("KUBECONFIG is not set: start the test environment with `eval \"$(scripts/env up)\"`")
}

/// A client for the test cluster, from `KUBECONFIG` (never from `~/.kube/config` or an in-cluster account).
pub async fn client() -> anyhow::Result<Client> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("failed to read kubeconfig {path}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("failed to load kubeconfig {path}"))?;
    Client::try_from(config).context("failed to build a kube client")
}

/// `kubectl` with the test cluster's kubeconfig (`WARREN_KUBECTL` overrides which binary).
pub fn kubectl() -> Command {
    let mut cmd = Command::new(std::env::var("WARREN_KUBECTL").unwrap_or_else(|_| "kubectl".into()));
    cmd.env("KUBECONFIG", kubeconfig_path());
    cmd
}

/// Runs `kubectl ARGS` and returns its stdout, or an error with its stderr.
pub fn run_kubectl(args: &[&str]) -> anyhow::Result<String> {
    let out = kubectl().args(args).output().context("failed to run kubectl (is it installed?)")?;
    if !out.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Applies the RpcService CRD (server-side apply, forced, so a changed schema replaces the old one) and waits
/// until it is Established and its resource is served. Safe to call from many tests at once.
pub async fn install_crd(client: &Client) -> anyhow::Result<CustomResourceDefinition> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = warren_operator::crd();
    let name = crd.name_any();
    crds.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
        .await
        .with_context(|| format!("failed to apply CRD {name}"))?;
    let established = await_timeout(crds, &name, conditions::is_crd_established(), Duration::from_secs(30))
        .await
        .with_context(|| format!("CRD {name} did not become Established"))?;
    // Established comes a moment before the API server serves the resource.
    let rpcservices: Api<RpcService> = Api::all(client.clone());
    wait_for("the rpcservices resource to be served", Duration::from_secs(30), || async {
        Ok(rpcservices.list(&ListParams::default().limit(1)).await.ok().map(|_| ()))
    })
    .await?;
    Ok(established)
}

/// Polls `probe` every 100 ms until it returns `Some`, or fails after `timeout` with the last error it saw.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last_error {
                Some(err) => err.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Watches the object `name` until `condition` holds, for at most `timeout`; returns the object then.
pub async fn await_timeout<K>(
    api: Api<K>,
    name: &str,
    condition: impl Condition<K>,
    timeout: Duration,
) -> anyhow::Result<K>
where
    K: Clone + std::fmt::Debug + Send + DeserializeOwned + Resource + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api, name, condition)).await {
        Ok(Ok(Some(object))) => Ok(object),
        Ok(Ok(None)) => bail!("{name} was deleted while waiting for it"),
        Ok(Err(err)) => Err(err).with_context(|| format!("failed to watch {name}")),
        Err(_) => bail!("timed out after {timeout:?} waiting for {name}"),
    }
}

/// The API server's message when it rejects a write: the `Status` message of an API error.
pub fn rejection(err: &kube::Error) -> Option<&str> {
    match err {
        kube::Error::Api(status) => Some(&status.message),
        _ => None,
    }
}

/// A namespace of one test's own, with a unique name. Call [`TestNamespace::cleanup`] at the end of a test; if the
/// test panics first, dropping it cleans up (`WARREN_KEEP_NAMESPACES=1` keeps it for a post-mortem).
pub struct TestNamespace {
    client: Client,
    name: String,
    cleaned: bool,
}

impl TestNamespace {
    /// Creates `<prefix>-<8 hex>`, labelled [`TEST_LABEL`].
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        Self::create_named(client, &crate::unique_name(prefix)).await
    }

    /// Creates the namespace `name` (it must not exist), labelled [`TEST_LABEL`].
    pub async fn create_named(client: &Client, name: &str) -> anyhow::Result<Self> {
        let name = name.to_owned();
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("failed to create namespace {name}"))?;
        Ok(Self { client: client.clone(), name, cleaned: false })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// An API for namespaced objects of kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Creates the broker Secret an RpcService's `spec.broker.secretRef` names, pointing at the test broker.
    pub async fn create_broker_secret(&self, name: &str) -> anyhow::Result<Secret> {
        self.create_broker_secret_for(name, &crate::broker_uri(), &crate::management_uri()).await
    }

    /// A broker Secret naming another broker than the environment's (e.g. a test's own cluster).
    pub async fn create_broker_secret_for(
        &self,
        name: &str,
        uri: &str,
        management_uri: &str,
    ) -> anyhow::Result<Secret> {
        let secret = Secret {
            metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
            string_data: Some(
                [
                    (SECRET_URI_KEY.to_string(), uri.to_owned()),
                    (SECRET_MANAGEMENT_URI_KEY.to_string(), management_uri.to_owned()),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        self.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
            .with_context(|| format!("failed to create Secret {}/{name}", self.name))
    }

    /// Deletes everything a warren test creates in the namespace, then the namespace, and finalizes it (there is no
    /// namespace controller to do that). RpcServices lose their finalizers: no operator may be left to remove them.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        self.cleaned = true;
        delete_namespace(&self.client, &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        if std::env::var_os("WARREN_KEEP_NAMESPACES").is_some() {
            eprintln!("keeping namespace {} (WARREN_KEEP_NAMESPACES is set)", self.name);
            return;
        }
        // The test's runtime may be the one dropping us: clean up on a runtime and client of our own.
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let client = client().await?;
                delete_namespace(&client, &name).await
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("failed to clean up namespace {}: {err:#}", self.name),
            Err(_) => eprintln!("cleaning up namespace {} panicked", self.name),
        }
    }
}

async fn delete_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let rpcservices: Api<RpcService> = Api::namespaced(client.clone(), name);
    let all = ListParams::default();
    let dp = DeleteParams::default();
    if let Ok(list) = rpcservices.list(&all).await {
        for rpcservice in list {
            let rpcservice_name = rpcservice.name_any();
            if !rpcservice.finalizers().is_empty() {
                let patch = serde_json::json!({ "metadata": { "finalizers": null } });
                ignore_not_found(
                    rpcservices.patch(&rpcservice_name, &PatchParams::default(), &Patch::Merge(&patch)).await,
                )?;
            }
            ignore_not_found(rpcservices.delete(&rpcservice_name, &dp).await)?;
        }
    }
    // Terminating first: the API server then refuses to create objects in it, so an operator still reconciling
    // cannot re-create a Deployment after it is deleted below (with no garbage collector it would stay for good).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    ignore_not_found(namespaces.delete(name, &dp).await.map(|_| ()))?;
    delete_all::<Deployment>(client, name).await?;
    delete_all::<ReplicaSet>(client, name).await?;
    delete_all::<Pod>(client, name).await?;
    delete_all::<Service>(client, name).await?;
    delete_all::<Secret>(client, name).await?;
    delete_all::<ConfigMap>(client, name).await?;
    delete_all::<ServiceAccount>(client, name).await?;
    delete_all::<Lease>(client, name).await?;
    delete_all::<Event>(client, name).await?;

    // What the namespace controller does once the namespace is empty: clear its finalizers so it goes away.
    let finalized = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name },
        "spec": { "finalizers": [] },
    });
    ignore_not_found(namespaces.replace_subresource("finalize", name, &PostParams::default(), &finalized).await)?;
    Ok(())
}

async fn delete_all<K>(client: &Client, namespace: &str) -> anyhow::Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope> + Clone + DeserializeOwned + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    // Foreground would wait for a garbage collector that does not run here.
    let dp = DeleteParams { propagation_policy: Some(kube::api::PropagationPolicy::Orphan), ..DeleteParams::default() };
    ignore_not_found(api.delete_collection(&dp, &ListParams::default()).await.map(|_| ()))
        .with_context(|| format!("failed to delete {} in {namespace}", K::plural(&Default::default())))
}

fn ignore_not_found<T>(result: Result<T, kube::Error>) -> anyhow::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(err) => Err(err.into()),
    }
}
