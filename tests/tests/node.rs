//! The user's path on a real node: the images built from the Dockerfile (`scripts/build-images`), the chart
//! installed with `helm install`, the operator running as a pod under the chart's ServiceAccount and RBAC, worker
//! pods started by the kubelet, terminated with SIGTERM on scale-in and killed through the container runtime.
//!
//! These tests are `#[ignore]`d in a plain `cargo test`: they need `scripts/env up --node` and the images.
//! `make test-node` builds and loads the images and runs them with `--ignored`, passing:
//! - `WARREN_CHART_SET`: the `--set` flags `scripts/build-images` printed (the images it loaded into the node);
//! - `WARREN_HELM`: the helm binary (`scripts/build-helm`);
//! - `WARREN_POD_BROKER_URI`, `WARREN_POD_MANAGEMENT_URI`: the broker as pods reach it (`scripts/env up --node`);
//! - `CONTAINERD_ADDRESS`: the node's containerd socket, to kill a container the way a crash would;
//! - `WARREN_PYTHON_EXAMPLE_IMAGE`: the Python SDK's example responder (`scripts/build-images --python-only`).
//!
//! Every namespace enforces the `restricted` Pod Security Standard, so the operator's pod and every worker pod it
//! creates is admitted under it, or the test fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use warren_operator::RpcService;
use warren_tests::broker;
use warren_tests::cluster::{self, TestNamespace, wait_for};

const WAIT: Duration = Duration::from_secs(180);
/// The operator's poll interval in these tests (`--poll-interval`): one observation period.
const POLL: Duration = Duration::from_secs(1);

// The service under load: `sleep` 100 ms at prefetch 4, so one worker completes at most 40 requests/s.
const SLEEP_MS: u64 = 100;
const PREFETCH: i32 = 4;
const MAX_REPLICAS: i32 = 4;
const SCALE_DOWN_DELAY_S: i32 = 10;

fn repo_root() -> PathBuf {
    warren_tests::workspace_root()
}

fn required_env(name: &str) -> anyhow::Result<String> {
    let value = std::env::var(name).ok().filter(|v| !v.is_empty());
    value.with_context(|| format!("{name} is not set: run these tests with `make test-node`"))
}

/// Runs a command, failing with its output when it fails; returns stdout.
fn run(mut cmd: Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("failed to run {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(std::env::var("WARREN_HELM").unwrap_or_else(|_| "helm".into()));
    cmd.args(args).env("KUBECONFIG", cluster::kubeconfig_path());
    run(cmd)
}

fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = cluster::kubectl();
    cmd.args(args);
    run(cmd)
}

/// A namespace of the test's own that enforces the `restricted` Pod Security Standard, with the broker Secret as
/// pods reach the broker.
async fn restricted_namespace(client: &Client, prefix: &str) -> anyhow::Result<TestNamespace> {
    let ns = TestNamespace::create(client, prefix).await?;
    let labels = json!({ "metadata": { "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }}});
    Api::<Namespace>::all(client.clone()).patch(ns.name(), &PatchParams::default(), &Patch::Merge(&labels)).await?;
    kubectl(&[
        "create",
        "secret",
        "generic",
        "rabbitmq",
        "-n",
        ns.name(),
        &format!("--from-literal=uri={}", required_env("WARREN_POD_BROKER_URI")?),
        &format!("--from-literal=managementUri={}", required_env("WARREN_POD_MANAGEMENT_URI")?),
    ])?;
    Ok(ns)
}

/// What the node shows when a release does not become Ready: the namespace's pods and events, the node, and the
/// tails of the kubelet's and containerd's logs (CI keeps only the test output).
fn node_diagnostics(namespace: &str, what: &str) -> String {
    let mut report = format!("{what} in {namespace}; what the node shows:");
    let commands: [&[&str]; 4] = [
        &[
            "get",
            "nodes",
            "-o",
            "custom-columns=NODE:.metadata.name,TAINTS:.spec.taints[*].key,TRUE:.status.conditions[?(@.status==\"True\")].type",
        ],
        &["get", "pods,events", "-n", namespace, "-o", "wide"],
        &["describe", "pods", "-n", namespace],
        &["get", "pods", "-A", "-o", "wide"],
    ];
    for args in commands {
        let shown = match kubectl(args) {
            Ok(out) => out,
            Err(error) => format!("{error:#}"),
        };
        report.push_str(&format!("\n--- kubectl {}\n{shown}", args.join(" ")));
    }
    let state = PathBuf::from(cluster::kubeconfig_path()).parent().map(PathBuf::from).unwrap_or_default();
    for (log, lines) in [("kubelet.log", 80), ("containerd.log", 40)] {
        let path = state.join(log);
        let tail = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(error) => format!("cannot read: {error}"),
        };
        report.push_str(&format!("\n--- last {lines} lines of {}\n{tail}", path.display()));
    }
    // The kubelet's own account of this namespace's pods (the tail above is mostly other chatter).
    if let Ok(text) = std::fs::read_to_string(state.join("kubelet.log")) {
        let about: Vec<&str> = text.lines().filter(|line| line.contains(namespace)).collect();
        report.push_str(&format!(
            "\n--- last 60 kubelet.log lines naming {namespace}\n{}",
            about[about.len().saturating_sub(60)..].join("\n")
        ));
    }
    report
}

/// Deletes what killed runs left: the chart's cluster-scoped RBAC whose release namespace is gone, and test
/// namespaces older than an hour (no node test runs that long), with any operator still running in them.
fn sweep_leftover_releases() -> anyhow::Result<()> {
    let stale_after = chrono::Duration::hours(1);
    let template = r#"{range .items[*]}{.metadata.name} {.metadata.creationTimestamp}{"\n"}{end}"#;
    let listed = kubectl(&["get", "namespaces", "-l", cluster::TEST_LABEL, "-o", &format!("jsonpath={template}")])?;
    let mut removed = Vec::new();
    for line in listed.lines() {
        let Some((name, created)) = line.split_once(' ') else { continue };
        let Ok(created) = chrono::DateTime::parse_from_rfc3339(created) else { continue };
        let age = chrono::Utc::now().signed_duration_since(created);
        if name.starts_with("node-") && age > stale_after {
            eprintln!("removing test namespace {name}, left by a killed run {} min ago", age.num_minutes());
            kubectl(&["delete", "namespace", name, "--wait=false", "--ignore-not-found"])?;
            removed.push(name.to_string());
        }
    }
    let live: Vec<String> = kubectl(&["get", "namespaces", "-o", "jsonpath={.items[*].metadata.name}"])?
        .split_whitespace()
        .filter(|name| !removed.iter().any(|r| r == name))
        .map(String::from)
        .collect();
    let template =
        r#"{range .items[*]}{.metadata.name} {.metadata.annotations.meta\.helm\.sh/release-namespace}{"\n"}{end}"#;
    for kind in ["clusterrole", "clusterrolebinding"] {
        let listed =
            kubectl(&["get", kind, "-l", "app.kubernetes.io/name=warren", "-o", &format!("jsonpath={template}")])?;
        for line in listed.lines() {
            if let Some((name, namespace)) = line.split_once(' ')
                && namespace.starts_with("node-")
                && !live.iter().any(|n| n == namespace)
            {
                eprintln!("removing {kind} {name}, left by a killed run (namespace {namespace} is gone)");
                kubectl(&["delete", kind, name, "--ignore-not-found"])?;
            }
        }
    }
    Ok(())
}

/// A helm release of the chart in `charts/warren`, watching its own namespace only, with the images the node has.
/// Dropped without [`Release::uninstall`] (a failed test), it is uninstalled so no operator is left behind.
struct Release {
    name: String,
    namespace: String,
    uninstalled: bool,
}

impl Release {
    /// Installs `<prefix>-<the namespace's random suffix>`: the chart's ClusterRole and ClusterRoleBinding are named
    /// after the release, so a run that was killed before its cleanup cannot collide with the next one.
    fn install(prefix: &str, namespace: &str) -> anyhow::Result<Self> {
        sweep_leftover_releases()?;
        let suffix = namespace.rsplit('-').next().unwrap_or(namespace);
        let name = format!("{prefix}-{suffix}");
        let chart = repo_root().join("charts/warren");
        let set = required_env("WARREN_CHART_SET")?;
        let mut args: Vec<String> = vec!["install".into(), name.clone(), chart.display().to_string()];
        args.extend(["--namespace", namespace, "--wait", "--timeout", "180s"].map(String::from));
        args.extend(set.split_whitespace().map(String::from));
        args.extend(["--set", &format!("watchNamespace={namespace}")].map(String::from));
        args.extend(["--set", "extraArgs={--poll-interval=1s}"].map(String::from));
        // Made before installing, so a release that never became Ready is uninstalled too (its cluster-scoped RBAC).
        let release = Self { name: name.clone(), namespace: namespace.into(), uninstalled: false };
        let started = Instant::now();
        helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .map_err(|error| error.context(node_diagnostics(namespace, "helm install did not become Ready")))?;
        eprintln!("helm install {name}: deployed and Ready in {:.1}s", started.elapsed().as_secs_f64());
        Ok(release)
    }

    fn selector(&self) -> String {
        format!("app.kubernetes.io/instance={}", self.name)
    }

    fn uninstall(mut self) -> anyhow::Result<()> {
        self.uninstalled = true;
        helm(&["uninstall", &self.name, "--namespace", &self.namespace, "--wait", "--timeout", "120s"])?;
        Ok(())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = helm(&["uninstall", &self.name, "--namespace", &self.namespace, "--wait", "--timeout", "60s"]);
        }
    }
}

async fn operator_pod(client: &Client, release: &Release) -> anyhow::Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &release.namespace);
    let list = pods.list(&ListParams::default().labels(&release.selector())).await?;
    list.items.into_iter().find(|p| p.metadata.deletion_timestamp.is_none()).context("no operator pod")
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum())
}

/// The operator runs in-cluster with the chart's ServiceAccount only: its pod's identity, and what that identity
/// may not do (no admin credentials inside the cluster).
async fn assert_operator_identity(client: &Client, release: &Release) -> anyhow::Result<()> {
    let pod = operator_pod(client, release).await?;
    let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default();
    eprintln!("operator pod {} runs as ServiceAccount {sa}", pod.name_any());
    ensure!(sa != "default" && !sa.is_empty(), "the operator pod uses ServiceAccount {sa:?}");
    let user = format!("system:serviceaccount:{}:{sa}", release.namespace);
    let can = |verb: &str, resource: &str| -> anyhow::Result<bool> {
        let mut cmd = cluster::kubectl();
        cmd.args(["auth", "can-i", verb, resource, "--as", &user, "-n", &release.namespace]);
        let out = cmd.output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
    };
    ensure!(can("patch", "rpcservices.warren.dev/status")?, "{user} cannot patch RpcService status");
    ensure!(can("create", "deployments.apps")?, "{user} cannot create Deployments");
    ensure!(!can("create", "pods")?, "{user} may create pods: more than the chart should grant");
    ensure!(!can("delete", "namespaces")?, "{user} may delete namespaces");
    let security = pod.spec.as_ref().and_then(|s| s.containers[0].security_context.clone()).unwrap_or_default();
    ensure!(security.read_only_root_filesystem == Some(true), "the operator's root filesystem is writable");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the node and the images: make test-node"]
async fn helm_install_upgrade_and_uninstall_the_operator() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    let ns = restricted_namespace(&client, "node-helm").await?;
    let release = Release::install("warren-helm", ns.name())?;

    let pod = operator_pod(&client, &release).await?;
    ensure!(pod_ready(&pod), "operator pod {} is not Ready after helm install --wait", pod.name_any());
    assert_operator_identity(&client, &release).await?;
    // In-cluster, it found the API server through the `kubernetes` Service, took the lease and runs its controller.
    let logs = kubectl(&["logs", "-n", ns.name(), &pod.name_any()])?;
    eprintln!("operator log (first lines):\n{}", logs.lines().take(8).collect::<Vec<_>>().join("\n"));
    wait_for("the operator's leader Lease", WAIT, || async {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), ns.name());
        Ok(leases.list(&ListParams::default()).await?.items.into_iter().find_map(|l| l.spec?.holder_identity))
    })
    .await?;

    // helm upgrade rolls the operator to a new pod with the new values.
    let set = required_env("WARREN_CHART_SET")?;
    let mut args = vec!["upgrade", &release.name, "--namespace", ns.name(), "--reuse-values", "--wait"];
    let chart = repo_root().join("charts/warren").display().to_string();
    args.insert(2, &chart);
    args.extend(set.split_whitespace());
    args.extend(["--set", "logLevel=debug", "--timeout", "180s"]);
    helm(&args)?;
    let upgraded = wait_for("the upgraded operator pod", WAIT, || async {
        let pod = operator_pod(&client, &release).await?;
        let env = pod.spec.as_ref().and_then(|s| s.containers[0].env.clone()).unwrap_or_default();
        let debug = env.iter().any(|e| e.name == "RUST_LOG" && e.value.as_deref() == Some("debug"));
        Ok((debug && pod_ready(&pod)).then_some(pod))
    })
    .await?;
    eprintln!("helm upgrade: operator pod {} with RUST_LOG=debug is Ready", upgraded.name_any());

    let selector = release.selector();
    release.uninstall()?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    ensure!(deployments.list(&ListParams::default()).await?.items.is_empty(), "helm uninstall left a Deployment");
    let crb = kubectl(&["get", "clusterrolebinding", "-l", &selector, "-o", "name"])?;
    ensure!(crb.trim().is_empty(), "helm uninstall left {crb}");
    ns.cleanup().await
}

/// What the test saw of the worker pods, every quarter second.
#[derive(Default)]
struct PodLog {
    /// pod name → (first seen, first seen Running, first seen Ready, first seen terminating)
    pods: BTreeMap<String, [Option<Instant>; 4]>,
    /// pod name → the wall-clock time it was first seen (to compare with the worker's own log)
    seen_at: BTreeMap<String, SystemTime>,
    /// (when, spec.replicas of the worker Deployment)
    desired: Vec<(Instant, i32)>,
}

async fn record_pods(client: Client, namespace: String, deployment: String, log: Arc<Mutex<PodLog>>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client, &namespace);
    let selector = "app.kubernetes.io/managed-by=warren-operator";
    loop {
        let now = Instant::now();
        if let Ok(d) = deployments.get(&deployment).await {
            let replicas = d.spec.and_then(|s| s.replicas).unwrap_or(0);
            let mut log = log.lock().unwrap();
            if log.desired.last().is_none_or(|(_, r)| *r != replicas) {
                log.desired.push((now, replicas));
            }
        }
        if let Ok(list) = pods.list(&ListParams::default().labels(selector)).await {
            let mut log = log.lock().unwrap();
            for pod in list {
                let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                log.seen_at.entry(pod.name_any()).or_insert_with(SystemTime::now);
                let entry = log.pods.entry(pod.name_any()).or_default();
                let seen = [true, running, pod_ready(&pod), pod.metadata.deletion_timestamp.is_some()];
                for (slot, now_true) in entry.iter_mut().zip(seen) {
                    if now_true && slot.is_none() {
                        *slot = Some(now);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `warren bench` of `sleep` for SLEEP_MS at a fixed rate.
/// The worker Deployment the operator made in `ns`, and a recorder of its desired replicas and pods (abort it when done).
async fn record_worker_pods(
    client: &Client,
    ns: &TestNamespace,
) -> anyhow::Result<(String, Arc<Mutex<PodLog>>, tokio::task::JoinHandle<()>)> {
    let deployment_name = kubectl(&[
        "get",
        "deployments",
        "-n",
        ns.name(),
        "-l",
        "app.kubernetes.io/managed-by=warren-operator",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let log: Arc<Mutex<PodLog>> = Arc::default();
    let recorder =
        tokio::spawn(record_pods(client.clone(), ns.name().to_owned(), deployment_name.clone(), log.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((deployment_name, log, recorder))
}

fn bench(queue: &str, rate: f64, duration: Duration, concurrency: usize) -> tokio::process::Command {
    bench_calls(queue, "sleep", &format!("{{\"ms\":{SLEEP_MS}}}"), Some(rate), duration, concurrency)
}

/// `warren bench` of any method; without a rate, as fast as `concurrency` calls in flight allow.
fn bench_calls(
    queue: &str,
    method: &str,
    params: &str,
    rate: Option<f64>,
    duration: Duration,
    concurrency: usize,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(warren_tests::bin_path("warren"));
    cmd.args(["bench", queue, method, params]).args(["--concurrency", &concurrency.to_string()]);
    if let Some(rate) = rate {
        cmd.args(["--rate", &rate.to_string()]);
    }
    cmd.args(["--duration", &format!("{}ms", duration.as_millis()), "--timeout", "90s", "--json"])
        .env("WARREN_BROKER_URI", warren_tests::broker_uri())
        .kill_on_drop(true);
    cmd
}

/// Runs a bench to its end; returns (calls, answered, errors) and the report.
async fn finish_bench(cmd: &mut tokio::process::Command, limit: Duration) -> anyhow::Result<(u64, u64, u64, Value)> {
    let output = tokio::time::timeout(limit, cmd.output()).await.context("warren bench did not finish")??;
    ensure!(output.status.success(), "warren bench failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).context("bench JSON")?;
    let calls = report["calls"].as_u64().context("calls")?;
    let ok = report["ok"].as_u64().context("ok")?;
    let errors: u64 = report["errors"].as_object().context("errors")?.values().filter_map(Value::as_u64).sum();
    Ok((calls, ok, errors, report))
}

fn stat(queue: &Value, name: &str) -> u64 {
    queue["message_stats"][name].as_u64().unwrap_or(0)
}

fn secs(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the node and the images: make test-node"]
async fn rpcservice_runs_scales_and_survives_on_real_pods() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let client = cluster::client().await?;
    let ns = restricted_namespace(&client, "node-rpc").await?;
    let queue = format!("{}.sleepy", ns.name());
    let result = real_pods(&client, &ns, &queue).await;
    broker::delete_queue("/", &queue).await?;
    broker::delete_queue("/", &format!("{queue}.dead")).await?;
    result?;
    ns.cleanup().await
}

fn kubectl_apply(manifest: &str) -> anyhow::Result<()> {
    let mut cmd = cluster::kubectl();
    cmd.args(["apply", "-f", "-"]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, manifest.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "kubectl apply failed");
    Ok(())
}

/// The containerd id of a pod's container, as `ctr` names it.
fn container_id(pod: &Pod, container: &str) -> anyhow::Result<String> {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == container))
        .and_then(|c| c.container_id.clone())
        .with_context(|| format!("the id of container {container} of pod {}", pod.name_any()))?;
    Ok(id.trim_start_matches("containerd://").to_owned())
}

/// The scaling that keeps exactly two workers: the kill tests need one to answer while the other restarts.
fn pinned_at_two() -> Value {
    json!({ "spec": { "scaling": { "minReplicas": 2, "maxReplicas": 2 } } })
}

/// Waits until the kubelet has restarted a killed container of `victim` and the pod is Ready again. Fails at once,
/// saying so, if the pod is deleted meanwhile (nothing would restart it then).
async fn restarted_and_ready(
    pods: &Api<Pod>,
    victim: &Pod,
    restarts_before: i32,
    namespace: &str,
) -> anyhow::Result<Pod> {
    let name = victim.name_any();
    let outcome = wait_for("the killed container restarted and its pod Ready", WAIT, || async {
        match pods.get_opt(&name).await? {
            Some(pod) if pod.metadata.deletion_timestamp.is_none() => {
                Ok((restarts(&pod) > restarts_before && pod_ready(&pod)).then_some(Ok(pod)))
            }
            _ => Ok(Some(Err(anyhow!("pod {name} was deleted before its killed container restarted")))),
        }
    })
    .await
    .and_then(|deleted_or_ready| deleted_or_ready);
    outcome
        .map_err(|error| error.context(node_diagnostics(namespace, "a killed container was not restarted and Ready")))
}

/// Kills a container through the runtime, the way a crash would.
fn sigkill(container_id: &str) -> anyhow::Result<()> {
    let mut ctr = Command::new("ctr");
    ctr.args(["-a", &required_env("CONTAINERD_ADDRESS")?, "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL"])
        .arg(container_id);
    run(ctr)?;
    Ok(())
}

async fn real_pods(client: &Client, ns: &TestNamespace, queue: &str) -> anyhow::Result<()> {
    let release = Release::install("warren-rpc", ns.name())?;
    assert_operator_identity(client, &release).await?;

    // --- kubectl apply an RpcService: worker pods Running and Ready, the queue shows their consumers ------------
    let manifest = format!(
        r#"apiVersion: warren.dev/v1alpha1
kind: RpcService
metadata: {{ name: sleepy, namespace: {ns} }}
spec:
  broker: {{ secretRef: {{ name: rabbitmq }} }}
  worker: {{ handler: {{ builtin: sleep }}, prefetch: {PREFETCH}, terminationGracePeriodSeconds: 30 }}
  scaling:
    minReplicas: 1
    maxReplicas: {MAX_REPLICAS}
    targetQueueDelaySeconds: 2
    scaleDownDelaySeconds: {SCALE_DOWN_DELAY_S}
    perReplicaThroughputHint: 30
"#,
        ns = ns.name()
    );
    let applied = Instant::now();
    kubectl_apply(&manifest)?;

    let services: Api<RpcService> = ns.api();
    let pods: Api<Pod> = ns.api();
    let workers = ListParams::default().labels("app.kubernetes.io/managed-by=warren-operator");
    wait_for("a Ready worker pod", WAIT, || async {
        Ok(pods.list(&workers).await?.items.iter().any(pod_ready).then_some(()))
    })
    .await?;
    eprintln!("kubectl apply → first worker pod Ready: {:.1}s", applied.elapsed().as_secs_f64());
    wait_for("the RpcService Ready", WAIT, || async {
        let status = services.get("sleepy").await?.status.unwrap_or_default();
        Ok(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(()))
    })
    .await?;
    wait_for("the worker's consumer on the queue", WAIT, || async {
        Ok(broker::queue("/", queue).await?.filter(|q| q["consumers"].as_u64() == Some(1)).map(|_| ()))
    })
    .await?;
    println!("{}", kubectl(&["get", "pods", "-n", ns.name(), "-o", "wide"])?);

    // `warren call` from the host gets the answer from a pod.
    let mut call = Command::new(warren_tests::bin_path("warren"));
    call.args(["call", queue, "add", "[1, 2]", "--timeout", "30s"])
        .env("WARREN_BROKER_URI", warren_tests::broker_uri());
    let answer = run(call)?;
    eprintln!("warren call {queue} add [1, 2] → {}", answer.trim());
    ensure!(answer.trim() == "3", "add(1, 2) answered {answer:?}");

    let (deployment_name, log, recorder) = record_worker_pods(client, ns).await?;

    // --- a load step: the operator scales up, the kubelet starts real containers ----------------------------------
    // 2.5× one worker's capacity for 30 s: the pool must grow to about 3 (at most MAX_REPLICAS).
    let rate = 100.0;
    let load = Duration::from_secs(30);
    let step = Instant::now();
    // The queueing delay as status reports it (the operator's estimate: backlog ÷ the ready pods' drain rate).
    let delays = tokio::spawn({
        let services = services.clone();
        async move {
            let mut seen = Vec::new();
            while step.elapsed() < load + Duration::from_secs(15) {
                if let Ok(svc) = services.get("sleepy").await {
                    let delay = svc.status.and_then(|s| s.queue).and_then(|q| q.queueing_delay_seconds);
                    seen.push((step.elapsed().as_secs_f64(), delay));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            seen
        }
    });
    let (calls, ok, errors, report) = finish_bench(&mut bench(queue, rate, load, 1000), load + WAIT).await?;
    // --- load stops → scale-in while a trickle of calls goes on (checked below): started at once, so the
    // scale-in (a scale-down delay after the load) cannot come before it while the step's figures are read.
    // The trickle keeps requests in flight on the pods the kubelet sends SIGTERM to.
    let trickle_rate = 10.0;
    let trickle = Duration::from_secs(SCALE_DOWN_DELAY_S as u64 + 40);
    let trickle_start = Instant::now();
    let mut trickle_cmd = bench(queue, trickle_rate, trickle, 100);
    let trickle_run = tokio::spawn(async move { finish_bench(&mut trickle_cmd, trickle + WAIT).await });
    eprintln!("step load: {calls} calls, {ok} answered, {errors} errors: {report}");
    ensure!(errors == 0 && ok == calls, "calls were lost or failed under the step: {report}");
    let delays = delays.await?;

    let (first_up, peak) = {
        let log = log.lock().unwrap();
        let first = log.desired.iter().find(|(at, r)| *at >= step && *r > 1).copied();
        let peak = log.desired.iter().map(|(_, r)| *r).max().unwrap_or(0);
        (first, peak)
    };
    let (first_up_at, first_up_to) = first_up.context("the operator never scaled the Deployment up")?;
    eprintln!(
        "first scale-up (1 → {first_up_to}) {:.1}s after the step = {:.1} observation periods of {POLL:?}; peak {peak}",
        secs(step, first_up_at),
        secs(step, first_up_at) / POLL.as_secs_f64()
    );
    ensure!((2..=MAX_REPLICAS).contains(&peak), "peak replicas {peak}");
    // The operator's decisions as it logged them (from a poll or a probe of the backlog), for the reader.
    let operator = operator_pod(client, &release).await?.name_any();
    let logs = kubectl(&["logs", "-n", ns.name(), &operator, "--since=120s"]).unwrap_or_default();
    for line in logs.lines().filter(|l| l.contains(" replicas: ")) {
        eprintln!("operator: {}", line.chars().take(240).collect::<String>());
    }
    // Reaction on real pods (docs/autoscaling.md): when the delay went over T, its peak, when it was back under.
    let target = 2.0;
    let over = delays.iter().find(|(_, d)| d.is_some_and(|d| d > target)).map(|(t, _)| *t);
    let (peak_at, peak_delay) =
        delays.iter().filter_map(|(t, d)| Some((*t, (*d)?))).fold((0.0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let under =
        over.and_then(|o| delays.iter().find(|(t, d)| *t > o && d.is_some_and(|d| d <= target)).map(|(t, _)| *t));
    let show = |t: Option<f64>| t.map_or("never".to_owned(), |t| format!("+{t:.1}s"));
    eprintln!(
        "queueing delay (status, sampled every 0.5 s): over T={target}s at {}, peak {peak_delay:.1}s at +{peak_at:.1}s, \
         back under T at {} (load ends at +{:.0}s)",
        show(over),
        show(under),
        load.as_secs_f64()
    );
    ensure!(over.is_none() || under.is_some(), "the queueing delay never came back under T: {delays:?}");

    // Pod start as the worker itself saw it: from the pod's first appearance to its "consuming" log line (read now,
    // before the scale-in deletes these pods).
    let started: Vec<(String, SystemTime)> = {
        let log = log.lock().unwrap();
        let new = log.pods.iter().filter(|(_, t)| t[0].is_some_and(|at| at > step)).map(|(n, _)| n.clone());
        new.filter_map(|n| log.seen_at.get(&n).map(|at| (n, *at))).collect()
    };
    for (pod, seen) in started {
        let Ok(logs) = kubectl(&["logs", "-n", ns.name(), &pod, "-c", "worker"]) else { continue };
        let consuming = logs.lines().find(|l| l.contains(" consuming")).and_then(|l| l.split_whitespace().next());
        if let Some(at) = consuming.and_then(|ts| chrono::DateTime::parse_from_rfc3339(ts).ok()) {
            let at = SystemTime::from(at);
            let delay = at.duration_since(seen).map_or(0.0, |d| d.as_secs_f64());
            eprintln!("pod {pod}: created (first seen) → consuming (its log) {delay:.2}s");
        }
    }

    // --- scale-in under the trickle started after the step: every call answered ---------------------------------
    let scaled_in = wait_for("scale-in to one worker pod", WAIT, || async {
        let running: Vec<Pod> =
            pods.list(&workers).await?.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        Ok((running.len() == 1).then(Instant::now))
    })
    .await?;
    let (t_calls, t_ok, t_errors, t_report) = trickle_run.await??;
    eprintln!("scale-in under a trickle: {t_calls} calls, {t_ok} answered, {t_errors} errors: {t_report}");
    ensure!(t_errors == 0 && t_ok == t_calls, "calls were lost or failed during scale-in: {t_report}");
    let terminated: Vec<String> = {
        let log = log.lock().unwrap();
        log.pods.iter().filter(|(_, t)| t[3].is_some_and(|at| at >= trickle_start)).map(|(n, _)| n.clone()).collect()
    };
    eprintln!(
        "scale-in: {} pods terminated by the kubelet (SIGTERM) {:.1}s into the trickle: {terminated:?}",
        terminated.len(),
        secs(trickle_start, scaled_in)
    );
    ensure!(!terminated.is_empty(), "no pod was terminated during the scale-in");

    // --- a worker container killed through the runtime: restarted, its requests answered by another -------------
    // Two workers so that another one answers while the killed one restarts, pinned there: a scale-down while it
    // restarts would delete the killed pod (the ReplicaSet deletes not-ready and most recently Ready pods first).
    services.patch("sleepy", &PatchParams::default(), &Patch::Merge(pinned_at_two())).await?;
    wait_for("two Ready worker pods", WAIT, || async {
        let ready = pods.list(&workers).await?.items.iter().filter(|p| pod_ready(p)).count();
        Ok((ready == 2).then_some(()))
    })
    .await
    .map_err(|error| error.context(node_diagnostics(ns.name(), "two worker pods did not become Ready")))?;
    let victim = pods.list(&workers).await?.items.into_iter().find(pod_ready).context("a worker pod")?;
    let container_id = container_id(&victim, "worker")?;
    let restarts_before = restarts(&victim);
    let kill_load = Duration::from_secs(20);
    let mut kill_cmd = bench(queue, 40.0, kill_load, 500);
    let kill_run = tokio::spawn(async move { finish_bench(&mut kill_cmd, kill_load + WAIT).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before_kill = broker::queue("/", queue).await?.context("queue")?;
    sigkill(&container_id)?;
    let killed_at = Instant::now();
    eprintln!("killed container {} of pod {} with SIGKILL", &container_id[..12], victim.name_any());
    let (k_calls, k_ok, k_errors, k_report) = kill_run.await??;
    eprintln!("SIGKILL under load: {k_calls} calls, {k_ok} answered, {k_errors} errors: {k_report}");
    ensure!(k_errors == 0 && k_ok == k_calls, "calls were lost or failed when a worker was killed: {k_report}");
    restarted_and_ready(&pods, &victim, restarts_before, ns.name()).await?;
    eprintln!(
        "the kubelet restarted the killed container; Ready again {:.1}s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    let after = wait_for("the queue drained", WAIT, || async {
        let q = broker::queue("/", queue).await?.context("queue")?;
        let drained = q["messages_ready"].as_u64() == Some(0) && q["messages_unacknowledged"].as_u64() == Some(0);
        Ok(drained.then_some(q))
    })
    .await?;
    eprintln!(
        "queue across the kill: redelivered {} (requests the killed worker held), dead-lettered none: {}",
        stat(&after, "redeliver") - stat(&before_kill, "redeliver"),
        broker::queue("/", &format!("{queue}.dead")).await?.map_or(0, |q| q["messages"].as_u64().unwrap_or(0))
    );

    recorder.abort();
    print_pod_timeline(step, &log.lock().unwrap());
    let early = decreases_within_the_delay(&log.lock().unwrap().desired, SCALE_DOWN_DELAY_S as f64);
    ensure!(early.is_empty(), "spec.replicas decreased sooner than the scale-down delay after an increase: {early:?}");

    // --- deleting the RpcService: the garbage collector removes its Deployment and pods --------------------------
    let deleted = Instant::now();
    kubectl(&["delete", "rpcservice", "sleepy", "-n", ns.name(), "--timeout=60s"])?;
    let deployments: Api<Deployment> = ns.api();
    wait_for("the worker Deployment garbage-collected", WAIT, || async {
        Ok(deployments.get_opt(&deployment_name).await?.is_none().then_some(()))
    })
    .await?;
    wait_for("the worker pods gone", WAIT, || async { Ok(pods.list(&workers).await?.items.is_empty().then_some(())) })
        .await?;
    eprintln!(
        "kubectl delete rpcservice → Deployment and pods garbage-collected in {:.1}s",
        deleted.elapsed().as_secs_f64()
    );

    release.uninstall()?;
    Ok(())
}

/// Each decrease of spec.replicas that came less than `delay` seconds after an increase, as (seconds between, from,
/// to): a flap the scale-down delay exists to prevent. 1 s of slack for the watch latency of two observations (as in
/// tests/tests/autoscaling.rs): each change is seen when its reconcile's write comes back, 0.1-1 s after the decision.
fn decreases_within_the_delay(desired: &[(Instant, i32)], delay: f64) -> Vec<(f64, i32, i32)> {
    let mut last_increase = None;
    let mut early = Vec::new();
    for pair in desired.windows(2) {
        let ((_, from), (at, to)) = (pair[0], pair[1]);
        if to > from {
            last_increase = Some(at);
        } else if let Some(up) = last_increase.filter(|up: &Instant| to < from && secs(*up, at) < delay - 1.0) {
            early.push((secs(up, at), from, to));
        }
    }
    early
}

fn print_pod_timeline(step: Instant, log: &PodLog) {
    let t = |at: Option<Instant>| at.map_or("-".to_owned(), |at| format!("{:+.1}", secs(step, at) - 0.0));
    eprintln!("worker Deployment spec.replicas (seconds from the load step):");
    for (at, replicas) in &log.desired {
        let s = if *at >= step { secs(step, *at) } else { -secs(*at, step) };
        eprintln!("  {s:>+7.1}s  {replicas}");
    }
    eprintln!("worker pods: seen, Running, Ready, terminating (seconds from the step); created → Ready:");
    for (name, [seen, running, ready, gone]) in &log.pods {
        let start = match (seen, ready) {
            (Some(s), Some(r)) => format!("{:.1}s", secs(*s, *r)),
            _ => "-".into(),
        };
        eprintln!("  {name:<40} {:>7} {:>7} {:>7} {:>7}  {start}", t(*seen), t(*running), t(*ready), t(*gone));
    }
}

// --- a responder written with the Python SDK, in its own container ----------------------------------------------

/// The name of the responder container in the Python service's pods (`handler.container.name`).
const PY_CONTAINER: &str = "responder";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the node and the images: make test-node"]
async fn python_sdk_responder_runs_scales_and_survives_on_real_pods() -> anyhow::Result<()> {
    let _broker = broker::shared().await;
    let image = required_env("WARREN_PYTHON_EXAMPLE_IMAGE")?;
    let client = cluster::client().await?;
    let ns = restricted_namespace(&client, "node-py").await?;
    let queue = format!("{}.calculator", ns.name());
    let result = python_responder_pods(&client, &ns, &queue, &image).await;
    broker::delete_queue("/", &queue).await?;
    broker::delete_queue("/", &format!("{queue}.dead")).await?;
    result?;
    ns.cleanup().await
}

/// GET of one of the responder's own endpoints on a pod's IP (the host reaches the pod network, as the kubelet's
/// probes do); returns (status, body).
async fn responder_endpoint(pod: &Pod, path: &str) -> anyhow::Result<(u16, String)> {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).context("pod IP")?;
    let response = reqwest::Client::new()
        .get(format!("http://{ip}:9090{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("GET {path} on pod {} ({ip})", pod.name_any()))?;
    Ok((response.status().as_u16(), response.text().await?))
}

async fn python_responder_pods(client: &Client, ns: &TestNamespace, queue: &str, image: &str) -> anyhow::Result<()> {
    let release = Release::install("warren-py", ns.name())?;

    // --- an RpcService whose pods run the Python responder image itself (handler.container) --------------------
    let manifest = format!(
        r#"apiVersion: warren.dev/v1alpha1
kind: RpcService
metadata: {{ name: calculator, namespace: {ns} }}
spec:
  broker: {{ secretRef: {{ name: rabbitmq }} }}
  worker:
    handler: {{ container: {{ name: {PY_CONTAINER}, image: "{image}" }} }}
    prefetch: {PREFETCH}
    terminationGracePeriodSeconds: 30
  scaling:
    minReplicas: 1
    maxReplicas: {MAX_REPLICAS}
    targetQueueDelaySeconds: 2
    scaleDownDelaySeconds: {SCALE_DOWN_DELAY_S}
    perReplicaThroughputHint: 30
"#,
        ns = ns.name()
    );
    let applied = Instant::now();
    kubectl_apply(&manifest)?;
    let services: Api<RpcService> = ns.api();
    let pods: Api<Pod> = ns.api();
    let responders = ListParams::default().labels("app.kubernetes.io/managed-by=warren-operator");
    let first = wait_for("a Ready responder pod", WAIT, || async {
        Ok(pods.list(&responders).await?.items.into_iter().find(pod_ready))
    })
    .await?;
    eprintln!("kubectl apply → first Python responder pod Ready: {:.1}s", applied.elapsed().as_secs_f64());
    wait_for("the RpcService Ready", WAIT, || async {
        let status = services.get("calculator").await?.status.unwrap_or_default();
        Ok(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(()))
    })
    .await?;
    wait_for("the responder's consumer on the queue", WAIT, || async {
        Ok(broker::queue("/", queue).await?.filter(|q| q["consumers"].as_u64() == Some(1)).map(|_| ()))
    })
    .await?;
    println!("{}", kubectl(&["get", "pods", "-n", ns.name(), "-o", "wide"])?);

    // The pod is the user's image alone, under the operator's restricted security context, and its readiness is the
    // SDK's /readyz: the probe points there, and the endpoint answers 200 while the responder consumes.
    let spec = first.spec.clone().context("pod spec")?;
    ensure!(spec.containers.len() == 1, "{} containers in the responder pod", spec.containers.len());
    let container = &spec.containers[0];
    ensure!(container.name == PY_CONTAINER && container.image.as_deref() == Some(image), "container {container:?}");
    let readiness = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).context("readiness probe")?;
    ensure!(readiness.path.as_deref() == Some("/readyz"), "readiness probe {readiness:?}");
    let security = container.security_context.clone().unwrap_or_default();
    ensure!(
        security.read_only_root_filesystem == Some(true) && security.run_as_user == Some(65532),
        "security context {security:?}"
    );
    let (ready_status, ready_body) = responder_endpoint(&first, "/readyz").await?;
    eprintln!("pod {}: GET /readyz → {ready_status} {}", first.name_any(), ready_body.trim());
    ensure!(ready_status == 200, "/readyz answered {ready_status}");
    let logs = kubectl(&["logs", "-n", ns.name(), &first.name_any(), "-c", PY_CONTAINER])?;
    eprintln!("responder log (first lines):\n{}", logs.lines().take(4).collect::<Vec<_>>().join("\n"));

    // --- calls: `warren call` and the Rust client get the Python responder's answers ----------------------------
    let mut call = Command::new(warren_tests::bin_path("warren"));
    call.args(["call", queue, "add", "[1, 2]", "--timeout", "30s"])
        .env("WARREN_BROKER_URI", warren_tests::broker_uri());
    let answer = run(call)?;
    eprintln!("warren call {queue} add [1, 2] → {}", answer.trim());
    ensure!(answer.trim() == "3", "add(1, 2) answered {answer:?}");

    let caller = warren_client::Client::connect(&warren_tests::broker_uri()).await?;
    let timeout = Duration::from_secs(30);
    let remote_code = |result: Result<Value, warren_client::CallError>| match result {
        Err(warren_client::CallError::Remote { code, .. }) => Ok(code),
        other => Err(anyhow::anyhow!("expected an error reply, got {other:?}")),
    };
    let named = caller.call(queue, Some("add"), json!({ "a": 1.5, "b": 2 }), timeout).await?;
    ensure!(named == json!(3.5), "add(a=1.5, b=2) answered {named}");
    let codes = [
        remote_code(caller.call(queue, Some("divide"), json!([1, 0]), timeout).await)?,
        remote_code(caller.call(queue, Some("add"), json!([1, 2, 3]), timeout).await)?,
        remote_code(caller.call(queue, Some("no_such_method"), json!([]), timeout).await)?,
    ];
    eprintln!("error replies: divide(1, 0), add(1, 2, 3), no_such_method() → {codes:?}");
    ensure!(codes == ["handler_error", "bad_request", "unknown_method"], "error codes {codes:?}");

    // A burst on one connection: every answer is the right sum.
    let burst = 1000;
    let started = Instant::now();
    let answers =
        futures::future::join_all((0..burst).map(|i| caller.call(queue, Some("add"), json!([i, i]), timeout))).await;
    let wrong = answers.iter().enumerate().filter(|(i, a)| a.as_ref().ok() != Some(&json!(2 * i))).count();
    eprintln!(
        "burst: {burst} concurrent add(i, i) calls, {} right answers, {wrong} wrong or failed, in {:.2}s",
        burst - wrong,
        started.elapsed().as_secs_f64()
    );
    ensure!(wrong == 0, "{wrong} of {burst} calls in the burst were not answered 2i");
    let (calls, ok, errors, report) =
        finish_bench(&mut bench_calls(queue, "add", "[1, 2]", None, Duration::from_secs(5), 64), WAIT).await?;
    eprintln!(
        "warren bench add, 64 in flight for 5 s: {calls} calls, {ok} answered, {errors} errors, {} calls/s",
        report["calls_per_sec"]
    );
    ensure!(errors == 0 && ok == calls, "calls failed in the bench: {report}");

    let (deployment_name, log, recorder) = record_worker_pods(client, ns).await?;

    // --- a load step: the operator scales the Python pods from the queue, as for warren-worker -----------------
    let rate = 100.0;
    let load = Duration::from_secs(30);
    let step = Instant::now();
    let (calls, ok, errors, report) = finish_bench(&mut bench(queue, rate, load, 1000), load + WAIT).await?;
    eprintln!("step load (sleep {SLEEP_MS} ms at {rate}/s): {calls} calls, {ok} answered, {errors} errors: {report}");
    ensure!(errors == 0 && ok == calls, "calls were lost or failed under the step: {report}");
    // The burst and the bench above may have scaled the pool already: the replicas in effect at the step count.
    let (at_step, peak) = {
        let desired = &log.lock().unwrap().desired;
        let at_step = desired.iter().filter(|(at, _)| *at < step).map(|(_, r)| *r).next_back().unwrap_or(0);
        let after = desired.iter().filter(|(at, _)| *at >= step).map(|(_, r)| *r).max().unwrap_or(0);
        (at_step, after.max(at_step))
    };
    eprintln!("replicas at the step: {at_step}; peak under the step: {peak}");
    ensure!((2..=MAX_REPLICAS).contains(&peak), "peak replicas {peak}");

    // --- scale-in under a trickle: the kubelet's SIGTERM drains the Python responders, every call answered ------
    let trickle = Duration::from_secs(SCALE_DOWN_DELAY_S as u64 + 40);
    let trickle_start = Instant::now();
    let mut trickle_cmd = bench(queue, 10.0, trickle, 100);
    let trickle_run = tokio::spawn(async move { finish_bench(&mut trickle_cmd, trickle + WAIT).await });
    wait_for("scale-in to one responder pod", WAIT, || async {
        let running =
            pods.list(&responders).await?.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count();
        Ok((running == 1).then_some(()))
    })
    .await?;
    let (t_calls, t_ok, t_errors, t_report) = trickle_run.await??;
    let terminated = {
        let log = log.lock().unwrap();
        log.pods.values().filter(|t| t[3].is_some_and(|at| at >= trickle_start)).count()
    };
    eprintln!(
        "scale-in under a trickle: {terminated} pods terminated (SIGTERM); {t_calls} calls, {t_ok} answered, \
         {t_errors} errors"
    );
    ensure!(t_errors == 0 && t_ok == t_calls, "calls were lost or failed during scale-in: {t_report}");
    ensure!(terminated > 0, "no pod was terminated during the scale-in");

    // --- two responders: both answer; one SIGKILLed under load, restarted, its requests answered by the other ---
    // Pinned at two, as for the Rust worker above: no scale-down may delete the killed pod while it restarts.
    services.patch("calculator", &PatchParams::default(), &Patch::Merge(pinned_at_two())).await?;
    let ready: Vec<Pod> = wait_for("two Ready responder pods", WAIT, || async {
        let ready: Vec<Pod> = pods
            .list(&responders)
            .await?
            .items
            .into_iter()
            .filter(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none())
            .collect();
        Ok((ready.len() == 2).then_some(ready))
    })
    .await?;
    let mut answered_by: BTreeMap<String, usize> = BTreeMap::new();
    let hostnames =
        futures::future::join_all((0..200).map(|_| caller.call(queue, Some("hostname"), json!([]), timeout)));
    for name in hostnames.await {
        *answered_by.entry(name?.as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    eprintln!("200 hostname() calls answered by: {answered_by:?}");
    let ready_names: Vec<String> = ready.iter().map(|p| p.name_any()).collect();
    ensure!(
        answered_by.keys().all(|name| ready_names.contains(name)) && answered_by.len() == 2,
        "answers came from {answered_by:?}, the Ready pods are {ready_names:?}"
    );

    let victim = ready[0].clone();
    let id = container_id(&victim, PY_CONTAINER)?;
    let restarts_before = restarts(&victim);
    let kill_load = Duration::from_secs(20);
    let mut kill_cmd = bench(queue, 40.0, kill_load, 500);
    let kill_run = tokio::spawn(async move { finish_bench(&mut kill_cmd, kill_load + WAIT).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before_kill = broker::queue("/", queue).await?.context("queue")?;
    sigkill(&id)?;
    let killed_at = Instant::now();
    eprintln!("killed container {} of pod {} with SIGKILL", &id[..12], victim.name_any());
    let (k_calls, k_ok, k_errors, k_report) = kill_run.await??;
    eprintln!("SIGKILL under load: {k_calls} calls, {k_ok} answered, {k_errors} errors");
    ensure!(k_errors == 0 && k_ok == k_calls, "calls were lost or failed when a responder was killed: {k_report}");
    let restarted = restarted_and_ready(&pods, &victim, restarts_before, ns.name()).await?;
    eprintln!(
        "the kubelet restarted the killed Python responder; Ready again {:.1}s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    let (status, metrics) = responder_endpoint(&restarted, "/metrics").await?;
    let consuming = metrics.lines().find(|l| l.starts_with("warren_worker_consuming ")).unwrap_or("-");
    eprintln!("restarted pod: GET /metrics → {status}, {consuming}");
    let after = wait_for("the queue drained", WAIT, || async {
        let q = broker::queue("/", queue).await?.context("queue")?;
        let drained = q["messages_ready"].as_u64() == Some(0) && q["messages_unacknowledged"].as_u64() == Some(0);
        Ok(drained.then_some(q))
    })
    .await?;
    eprintln!(
        "queue across the kill: redelivered {} (requests the killed responder held), dead-lettered {}",
        stat(&after, "redeliver") - stat(&before_kill, "redeliver"),
        broker::queue("/", &format!("{queue}.dead")).await?.map_or(0, |q| q["messages"].as_u64().unwrap_or(0))
    );

    recorder.abort();
    print_pod_timeline(step, &log.lock().unwrap());
    let early = decreases_within_the_delay(&log.lock().unwrap().desired, SCALE_DOWN_DELAY_S as f64);
    ensure!(early.is_empty(), "spec.replicas decreased sooner than the scale-down delay after an increase: {early:?}");

    // --- deleting the RpcService: its Deployment and pods are garbage-collected ---------------------------------
    kubectl(&["delete", "rpcservice", "calculator", "-n", ns.name(), "--timeout=60s"])?;
    let deployments: Api<Deployment> = ns.api();
    wait_for("the responder Deployment garbage-collected", WAIT, || async {
        Ok(deployments.get_opt(&deployment_name).await?.is_none().then_some(()))
    })
    .await?;
    wait_for("the responder pods gone", WAIT, || async {
        Ok(pods.list(&responders).await?.items.is_empty().then_some(()))
    })
    .await?;
    release.uninstall()?;
    Ok(())
}
