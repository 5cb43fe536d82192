//! A local stand-in for kubelet and the Deployment controller: the test cluster has neither, so worker
//! Deployments the operator writes would never run. [`LocalRuntime`] watches the Deployments labelled
//! `app.kubernetes.io/managed-by=warren-operator` in one namespace and runs one real `warren-worker` process per
//! replica asked for, on loopback, with the worker container's arguments and environment from the pod template.
//!
//! What it does, like the real parts:
//! - a new replica is a pod that is *starting* for [`RuntimeOptions::start_delay`] (image pull, container start),
//!   then a process; it counts as ready once its `/readyz` answers 200 (three failures in a row make it unready,
//!   like the template's readiness probe);
//! - fewer replicas: the replica set controller's choice of victims — starting pods first (they just go), then
//!   unready ones, then the newest — and each process gets SIGTERM, is reaped when it exits, and gets SIGKILL only
//!   if the pod's `terminationGracePeriodSeconds` passes first;
//! - a process that exits on its own is replaced (restartPolicy: Always / the ReplicaSet), and recorded;
//! - the Deployment's status subresource: `replicas` (pods starting or running, not terminating),
//!   `readyReplicas`, `availableReplicas`, `updatedReplicas`, `unavailableReplicas`, `terminatingReplicas` and
//!   `observedGeneration`, written when they change.
//!
//! What it does not do: rollouts (a changed pod template applies to new pods only), other containers of the pod
//! (an HTTP handler's backend must be run by the test), probes other than `/readyz`, `envFrom`.
//!
//! For assertions: [`LocalRuntime::stats`] (processes now and at most, pods, the timeline of replica changes, how
//! every process ended, errors such as an env var that cannot be resolved).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The label the operator puts on the Deployments it manages: what the runtime watches.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=warren-operator";
/// The container that runs `warren-worker` (the first container when none has this name).
const WORKER_CONTAINER: &str = "worker";
/// Consecutive `/readyz` failures that make a ready pod unready (the template's `failureThreshold`).
const READINESS_FAILURE_THRESHOLD: u32 = 3;
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How the runtime behaves.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// How long a new pod is starting before its process is spawned (image pull, container start). Default 0.
    pub start_delay: Duration,
    /// How often processes are checked, probed and the Deployment status is written (a change of
    /// `spec.replicas` is acted on at once). Default 200 ms.
    pub sync_interval: Duration,
    /// `RUST_LOG` of the workers (default: `WARREN_WORKER_LOG`, or `info`).
    pub worker_log: String,
    /// Keep the workers' logs after a clean stop (default: whether `WARREN_KEEP_WORKER_LOGS` is set); they are
    /// always kept when a test panics or a worker did not stop cleanly.
    pub keep_logs: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            start_delay: Duration::ZERO,
            sync_interval: Duration::from_millis(200),
            worker_log: std::env::var("WARREN_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            keep_logs: std::env::var_os("WARREN_KEEP_WORKER_LOGS").is_some(),
        }
    }
}

impl RuntimeOptions {
    pub fn start_delay(mut self, delay: Duration) -> Self {
        self.start_delay = delay;
        self
    }
}

/// One change of a Deployment's replicas, as the runtime saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaChange {
    pub at: Instant,
    pub deployment: String,
    /// `spec.replicas`: what the operator asked for.
    pub desired: i32,
    /// Pods starting or running (not terminating): `status.replicas`.
    pub pods: usize,
    /// Pods whose process answers `/readyz`: `status.readyReplicas`.
    pub ready: usize,
    /// Worker processes alive, terminating ones included.
    pub processes: usize,
}

/// How a worker process ended.
#[derive(Clone, Debug)]
pub struct Termination {
    pub at: Instant,
    pub deployment: String,
    pub pod: String,
    /// The runtime stopped it (scale-in, Deployment deleted, runtime dropped); false: it exited on its own.
    pub requested: bool,
    /// SIGKILLed after its grace period.
    pub killed: bool,
    /// It was ready (consuming) when the runtime sent SIGTERM.
    pub was_ready: bool,
    pub status: ExitStatus,
    /// From SIGTERM to exit (requested terminations).
    pub drain: Option<Duration>,
    /// The end of the process's log (its stdout and stderr).
    pub log_tail: String,
}

impl Termination {
    /// Stopped by the runtime with SIGTERM and exited 0 within its grace period.
    pub fn clean(&self) -> bool {
        self.requested && !self.killed && self.status.success()
    }
}

/// A snapshot for assertions.
#[derive(Clone, Debug, Default)]
pub struct RuntimeStats {
    /// Worker processes alive now (terminating ones included).
    pub processes: usize,
    /// The most worker processes alive at once.
    pub max_processes: usize,
    /// Pods starting or running now, over all Deployments.
    pub pods: usize,
    /// The most pods starting or running at once.
    pub max_pods: usize,
    /// Every change of any Deployment's desired, pods, ready or process count, in order.
    pub timeline: Vec<ReplicaChange>,
    /// Every process that has ended.
    pub terminations: Vec<Termination>,
    /// What went wrong on the runtime's side (an env var it could not resolve, a status write that failed...).
    pub errors: Vec<String>,
}

impl RuntimeStats {
    /// The timeline of one Deployment.
    pub fn timeline_of(&self, deployment: &str) -> Vec<ReplicaChange> {
        self.timeline.iter().filter(|c| c.deployment == deployment).cloned().collect()
    }

    /// `(instant, spec.replicas)` each time the desired replicas of `deployment` changed.
    pub fn desired_changes(&self, deployment: &str) -> Vec<(Instant, i32)> {
        let mut out: Vec<(Instant, i32)> = Vec::new();
        for c in self.timeline.iter().filter(|c| c.deployment == deployment) {
            if out.last().is_none_or(|(_, d)| *d != c.desired) {
                out.push((c.at, c.desired));
            }
        }
        out
    }
}

/// Runs worker Deployments of one namespace as local processes; stops them all (SIGTERM, then waits) on drop.
pub struct LocalRuntime {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    client: Client,
    namespace: String,
    options: RuntimeOptions,
    log_dir: PathBuf,
    state: Mutex<State>,
    wake: Notify,
    http: reqwest::Client,
}

#[derive(Default)]
struct State {
    workloads: BTreeMap<String, Workload>,
    next_pod: u64,
    max_processes: usize,
    max_pods: usize,
    timeline: Vec<ReplicaChange>,
    terminations: Vec<Termination>,
    errors: Vec<String>,
}

struct Workload {
    deployment: Option<Deployment>,
    /// `spec.replicas`; 0 once the Deployment is deleted.
    desired: i32,
    generation: Option<i64>,
    grace: Duration,
    /// Oldest first.
    pods: Vec<Pod>,
    last_status: Option<serde_json::Value>,
    last_recorded: Option<(i32, usize, usize, usize)>,
}

struct Pod {
    name: String,
    phase: Phase,
}

enum Phase {
    Starting { at: Instant },
    Running { process: Process, ready: bool, failures: u32 },
    Terminating { process: Process, since: Instant, deadline: Instant, killed: bool, was_ready: bool },
}

struct Process {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Pod {
    fn live(&self) -> bool {
        !matches!(self.phase, Phase::Terminating { .. })
    }

    fn ready(&self) -> bool {
        matches!(self.phase, Phase::Running { ready: true, .. })
    }

    fn has_process(&self) -> bool {
        !matches!(self.phase, Phase::Starting { .. })
    }
}

impl Workload {
    fn new() -> Self {
        Self {
            deployment: None,
            desired: 0,
            generation: None,
            grace: DEFAULT_GRACE,
            pods: Vec::new(),
            last_status: None,
            last_recorded: None,
        }
    }

    fn counts(&self) -> (i32, usize, usize, usize) {
        let pods = self.pods.iter().filter(|p| p.live()).count();
        let ready = self.pods.iter().filter(|p| p.ready()).count();
        let processes = self.pods.iter().filter(|p| p.has_process()).count();
        (self.desired, pods, ready, processes)
    }
}

impl State {
    /// Appends to the timeline what changed for `name` and updates the maxima.
    fn record(&mut self, name: &str, now: Instant) {
        if let Some(w) = self.workloads.get_mut(name) {
            let counts = w.counts();
            if w.last_recorded != Some(counts) {
                w.last_recorded = Some(counts);
                let (desired, pods, ready, processes) = counts;
                self.timeline.push(ReplicaChange {
                    at: now,
                    deployment: name.to_owned(),
                    desired,
                    pods,
                    ready,
                    processes,
                });
            }
        }
        let (pods, processes) = self.totals();
        self.max_pods = self.max_pods.max(pods);
        self.max_processes = self.max_processes.max(processes);
    }

    fn totals(&self) -> (usize, usize) {
        self.workloads.values().map(|w| w.counts()).fold((0, 0), |(p, q), (_, pods, _, procs)| (p + pods, q + procs))
    }

    fn error(&mut self, message: String) {
        if self.errors.last() != Some(&message) {
            eprintln!("local runtime: {message}");
            self.errors.push(message);
        }
    }
}

impl LocalRuntime {
    /// Starts watching `namespace` and running what its managed Deployments ask for.
    pub fn start(client: Client, namespace: &str, options: RuntimeOptions) -> anyhow::Result<Self> {
        // A real node (`scripts/env up --node`) has a Deployment controller and a kubelet of its own that would race
        // this stand-in for them over the same Deployments.
        let nodes = crate::cluster::run_kubectl(&["get", "nodes", "-o", "name"])?;
        anyhow::ensure!(
            nodes.trim().is_empty(),
            "the local runtime cannot run beside a real node ({}): stop it with `scripts/env down --node`",
            nodes.trim()
        );
        let log_dir = std::env::temp_dir().join(format!("warren-local-runtime-{namespace}"));
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let inner = Arc::new(Inner {
            client,
            namespace: namespace.to_owned(),
            options,
            log_dir,
            state: Mutex::default(),
            wake: Notify::new(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?,
        });
        let watch = tokio::spawn(inner.clone().watch());
        let sync = tokio::spawn(inner.clone().sync_loop());
        Ok(Self { inner, tasks: vec![watch, sync] })
    }

    pub fn stats(&self) -> RuntimeStats {
        let state = self.inner.state.lock().expect("runtime state");
        let (pods, processes) = state.totals();
        RuntimeStats {
            processes,
            max_processes: state.max_processes,
            pods,
            max_pods: state.max_pods,
            timeline: state.timeline.clone(),
            terminations: state.terminations.clone(),
            errors: state.errors.clone(),
        }
    }

    /// Worker processes alive now (terminating ones included).
    pub fn process_count(&self) -> usize {
        self.stats().processes
    }

    /// The most worker processes alive at once so far.
    pub fn max_process_count(&self) -> usize {
        self.inner.state.lock().expect("runtime state").max_processes
    }

    /// The `(desired, pods, ready, processes)` of `deployment` now.
    pub fn counts(&self, deployment: &str) -> Option<(i32, usize, usize, usize)> {
        self.inner.state.lock().expect("runtime state").workloads.get(deployment).map(Workload::counts)
    }

    /// The metrics ports of the running processes of `deployment` (terminating ones excluded), oldest first.
    pub fn metrics_ports(&self, deployment: &str) -> Vec<u16> {
        let state = self.inner.state.lock().expect("runtime state");
        let Some(w) = state.workloads.get(deployment) else { return Vec::new() };
        w.pods
            .iter()
            .filter_map(|p| match &p.phase {
                Phase::Running { process, .. } => Some(process.port),
                _ => None,
            })
            .collect()
    }

    /// Waits until `deployment` runs exactly `ready` ready pods and no other process; bounded by `timeout`.
    pub async fn wait_settled(&self, deployment: &str, ready: usize, timeout: Duration) -> anyhow::Result<()> {
        crate::cluster::wait_for(
            &format!("{deployment} to run {ready} ready workers and nothing else"),
            timeout,
            || async {
                Ok(self.counts(deployment).filter(|&(_, p, r, q)| p == ready && r == ready && q == ready).map(|_| ()))
            },
        )
        .await
    }

    /// Stops every process (SIGTERM, then SIGKILL after its grace period) and returns the final stats.
    pub fn stop(mut self) -> RuntimeStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let names: Vec<String> = state.workloads.keys().cloned().collect();
        for name in &names {
            let w = state.workloads.get_mut(name).expect("listed");
            let grace = w.grace;
            w.desired = 0;
            let mut stopped = Vec::new();
            for pod in w.pods.drain(..) {
                if let Some(pod) = terminate(pod, now, grace) {
                    stopped.push(pod);
                }
            }
            w.pods = stopped;
        }
        // Reap what exits; SIGKILL what outlives its grace period.
        loop {
            let now = Instant::now();
            let mut ended = Vec::new();
            for (name, w) in state.workloads.iter_mut() {
                w.pods.retain_mut(|pod| match step_terminating(pod, now) {
                    Some(t) => {
                        ended.push(finish(name, pod, t, true));
                        false
                    }
                    None => true,
                });
            }
            state.terminations.extend(ended);
            if state.workloads.values().all(|w| w.pods.is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let keep =
            self.inner.options.keep_logs || std::thread::panicking() || state.terminations.iter().any(|t| !t.clean());
        drop(state);
        if keep {
            eprintln!("local runtime: worker logs kept in {}", self.inner.log_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.inner.log_dir);
        }
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        if !self.tasks.is_empty() {
            self.shutdown();
        }
    }
}

/// Moves a pod out of service: a starting pod just goes (`None`), a running one gets SIGTERM.
fn terminate(pod: Pod, now: Instant, grace: Duration) -> Option<Pod> {
    match pod.phase {
        Phase::Starting { .. } => None,
        Phase::Running { process, ready, .. } => {
            signal(&process.child, Signal::SIGTERM);
            let deadline = now + grace;
            Some(Pod {
                name: pod.name,
                phase: Phase::Terminating { process, since: now, deadline, killed: false, was_ready: ready },
            })
        }
        terminating @ Phase::Terminating { .. } => Some(Pod { name: pod.name, phase: terminating }),
    }
}

/// For a terminating pod: its exit status once it has exited (SIGKILL first if its grace period is over).
fn step_terminating(pod: &mut Pod, now: Instant) -> Option<ExitStatus> {
    let Phase::Terminating { process, deadline, killed, .. } = &mut pod.phase else { return None };
    match process.child.try_wait() {
        Ok(Some(status)) => Some(status),
        Ok(None) => {
            if now >= *deadline && !*killed {
                *killed = true;
                signal(&process.child, Signal::SIGKILL);
            }
            None
        }
        // Not our child any more (cannot happen while we hold it); treat as gone.
        Err(_) => Some(std::os::unix::process::ExitStatusExt::from_raw(0)),
    }
}

fn finish(deployment: &str, pod: &Pod, status: ExitStatus, requested: bool) -> Termination {
    let (log, killed, drain, was_ready) = match &pod.phase {
        Phase::Terminating { process, killed, since, was_ready, .. } => {
            (&process.log, *killed, Some(since.elapsed()), *was_ready)
        }
        Phase::Running { process, ready, .. } => (&process.log, false, None, *ready),
        Phase::Starting { .. } => unreachable!("a starting pod has no process"),
    };
    Termination {
        at: Instant::now(),
        deployment: deployment.to_owned(),
        pod: pod.name.clone(),
        requested,
        killed,
        was_ready,
        status,
        drain,
        log_tail: tail(log, 30),
    }
}

fn signal(child: &Child, signal: Signal) {
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
}

fn tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A pod to spawn, taken out of the state so the lock is not held while its env is resolved.
struct SpawnRequest {
    deployment: String,
    pod: String,
    container: Container,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("runtime state")
    }

    /// Follows the managed Deployments: desired replicas, pod template, generation.
    async fn watch(self: Arc<Self>) {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut events = watcher(api, watcher::Config::default().labels(MANAGED_SELECTOR)).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let now = Instant::now();
            match event {
                Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                    let name = d.name_any();
                    let mut state = self.lock();
                    let w = state.workloads.entry(name.clone()).or_insert_with(Workload::new);
                    let spec = d.spec.as_ref();
                    w.desired = if d.metadata.deletion_timestamp.is_some() {
                        0
                    } else {
                        spec.and_then(|s| s.replicas).unwrap_or(1).max(0)
                    };
                    if w.deployment.as_ref().is_some_and(|old| old.metadata.uid != d.metadata.uid) {
                        // Deleted and created again while the watch was down: its status starts empty.
                        w.last_status = None;
                    }
                    w.generation = d.metadata.generation;
                    w.grace = spec
                        .and_then(|s| s.template.spec.as_ref())
                        .and_then(|p| p.termination_grace_period_seconds)
                        .map_or(DEFAULT_GRACE, |s| Duration::from_secs(s.max(0) as u64));
                    w.deployment = Some(d);
                    state.record(&name, now);
                }
                Ok(watcher::Event::Delete(d)) => {
                    let name = d.name_any();
                    let mut state = self.lock();
                    if let Some(w) = state.workloads.get_mut(&name) {
                        w.desired = 0;
                        w.deployment = None;
                        w.last_status = None;
                    }
                    state.record(&name, now);
                }
                Ok(_) => continue,
                Err(e) => {
                    self.lock().error(format!("watching Deployments: {e}"));
                    continue;
                }
            }
            self.wake.notify_one();
        }
    }

    async fn sync_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.options.sync_interval) => {}
            }
            self.sync().await;
        }
    }

    /// One pass: scale pods to the desired count, reap and replace exited processes, spawn pods whose start
    /// delay is over, probe readiness, write status.
    async fn sync(&self) {
        let spawns = self.scale();
        for request in spawns {
            self.spawn(request).await;
        }
        self.probe().await;
        self.write_status().await;
    }

    /// The Deployment and ReplicaSet controllers' part, and the reaping: returns the pods due to start.
    fn scale(&self) -> Vec<SpawnRequest> {
        let mut state = self.lock();
        let now = Instant::now();
        let delay = self.options.start_delay;
        let names: Vec<String> = state.workloads.keys().cloned().collect();
        let mut spawns = Vec::new();
        let mut ended = Vec::new();
        for name in &names {
            let mut next_pod = state.next_pod;
            let w = state.workloads.get_mut(name).expect("listed");

            // Reap: terminating processes that exited, and running ones that exited on their own.
            w.pods.retain_mut(|pod| {
                if let Some(status) = step_terminating(pod, now) {
                    ended.push(finish(name, pod, status, true));
                    return false;
                }
                if let Phase::Running { process, .. } = &mut pod.phase
                    && let Ok(Some(status)) = process.child.try_wait()
                {
                    ended.push(finish(name, pod, status, false));
                    return false;
                }
                true
            });

            // Scale in: the replica set controller's victims — starting, then unready, then newest.
            let live = w.pods.iter().filter(|p| p.live()).count();
            let desired = w.desired.max(0) as usize;
            if live > desired {
                let mut candidates: Vec<(u8, usize)> = w
                    .pods
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.live())
                    .map(|(i, p)| {
                        let rank = match &p.phase {
                            Phase::Starting { .. } => 0,
                            Phase::Running { ready: false, .. } => 1,
                            _ => 2,
                        };
                        (rank, i)
                    })
                    .collect();
                // Lowest rank first; within a rank, the newest (highest index) first.
                candidates.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
                let victims: Vec<usize> = candidates.iter().take(live - desired).map(|(_, i)| *i).collect();
                let grace = w.grace;
                let pods = std::mem::take(&mut w.pods);
                for (i, pod) in pods.into_iter().enumerate() {
                    if victims.contains(&i) {
                        if let Some(pod) = terminate(pod, now, grace) {
                            w.pods.push(pod);
                        }
                    } else {
                        w.pods.push(pod);
                    }
                }
            }

            // Scale out (and replace what exited).
            if w.deployment.is_some() {
                for _ in live..desired {
                    w.pods.push(Pod { name: format!("{name}-{next_pod}"), phase: Phase::Starting { at: now + delay } });
                    next_pod += 1;
                }
            }

            // Pods whose start delay is over.
            let container = w.deployment.as_ref().and_then(worker_container);
            for pod in &w.pods {
                if let Phase::Starting { at } = pod.phase
                    && at <= now
                    && let Some(container) = &container
                {
                    spawns.push(SpawnRequest {
                        deployment: name.clone(),
                        pod: pod.name.clone(),
                        container: container.clone(),
                    });
                }
            }
            state.next_pod = next_pod;
        }
        for t in &ended {
            if !t.requested {
                state.error(format!("{} exited on its own ({}); replacing it:\n{}", t.pod, t.status, t.log_tail));
            }
        }
        state.terminations.extend(ended);
        for name in &names {
            state.record(name, now);
        }
        // A deleted Deployment whose pods are all gone is forgotten.
        state.workloads.retain(|_, w| w.deployment.is_some() || !w.pods.is_empty());
        spawns
    }

    /// kubelet's part: resolves the container's env and starts its process.
    async fn spawn(&self, request: SpawnRequest) {
        let env = match self.resolve_env(&request.pod, &request.container).await {
            Ok(env) => env,
            Err(e) => {
                self.lock().error(format!("{}: cannot start: {e:#}", request.pod));
                return;
            }
        };
        let port = crate::operator_process::free_port();
        let log = self.log_dir.join(format!("{}.log", request.pod));
        let process = start_process(&request.container, env, port, &log, &self.options.worker_log)
            .map(|child| Process { child, port, log });
        let mut state = self.lock();
        let process = match process {
            Ok(process) => process,
            Err(e) => {
                state.error(format!("{}: cannot start: {e:#}", request.pod));
                return;
            }
        };
        let now = Instant::now();
        match state.workloads.get_mut(&request.deployment) {
            Some(w) => match w.pods.iter_mut().find(|p| p.name == request.pod) {
                Some(pod) if matches!(pod.phase, Phase::Starting { .. }) => {
                    pod.phase = Phase::Running { process, ready: false, failures: 0 };
                }
                // Scaled in while its env was resolved: stop it again, like any other pod.
                _ => {
                    let pod = Pod { name: request.pod, phase: Phase::Running { process, ready: false, failures: 0 } };
                    w.pods.extend(terminate(pod, now, w.grace));
                }
            },
            None => {
                let mut process = process;
                signal(&process.child, Signal::SIGTERM);
                let _ = process.child.wait();
            }
        }
        state.record(&request.deployment, now);
    }

    /// The container's environment as kubelet would set it: values, Secret and ConfigMap keys, the pod's
    /// name and namespace.
    async fn resolve_env(&self, pod: &str, container: &Container) -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut secrets: HashMap<String, Option<Secret>> = HashMap::new();
        for EnvVar { name, value, value_from } in container.env.iter().flatten() {
            if let Some(value) = value {
                out.push((name.clone(), value.clone()));
                continue;
            }
            let Some(from) = value_from else {
                out.push((name.clone(), String::new()));
                continue;
            };
            if let Some(sel) = &from.secret_key_ref {
                if !secrets.contains_key(&sel.name) {
                    let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
                    secrets.insert(sel.name.clone(), api.get_opt(&sel.name).await?);
                }
                let bytes = secrets[&sel.name].as_ref().and_then(|s| s.data.as_ref()).and_then(|d| d.get(&sel.key));
                match bytes {
                    Some(b) => {
                        out.push((name.clone(), String::from_utf8(b.0.clone()).context("Secret value is not UTF-8")?))
                    }
                    None if sel.optional == Some(true) => {}
                    None => bail!("env {name}: key {} of Secret {} not found", sel.key, sel.name),
                }
            } else if let Some(sel) = &from.config_map_key_ref {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
                let value = api.get_opt(&sel.name).await?.and_then(|c| c.data).and_then(|d| d.get(&sel.key).cloned());
                match value {
                    Some(v) => out.push((name.clone(), v)),
                    None if sel.optional == Some(true) => {}
                    None => bail!("env {name}: key {} of ConfigMap {} not found", sel.key, sel.name),
                }
            } else if let Some(field) = &from.field_ref {
                match field.field_path.as_str() {
                    "metadata.name" => out.push((name.clone(), pod.to_owned())),
                    "metadata.namespace" => out.push((name.clone(), self.namespace.clone())),
                    other => bail!("env {name}: fieldRef {other} is not supported by the local runtime"),
                }
            } else {
                return Err(anyhow!("env {name}: this valueFrom is not supported by the local runtime"));
            }
        }
        Ok(out)
    }

    /// The readiness probe: `/readyz` of every running process, all at once.
    async fn probe(&self) {
        let targets: Vec<(String, String, u16)> = {
            let state = self.lock();
            state
                .workloads
                .iter()
                .flat_map(|(d, w)| {
                    w.pods.iter().filter_map(move |p| match &p.phase {
                        Phase::Running { process, .. } => Some((d.clone(), p.name.clone(), process.port)),
                        _ => None,
                    })
                })
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let results = futures::future::join_all(targets.into_iter().map(|(d, pod, port)| async move {
            let url = format!("http://127.0.0.1:{port}/readyz");
            let ok = matches!(self.http.get(url).send().await, Ok(r) if r.status().is_success());
            (d, pod, ok)
        }))
        .await;
        let mut state = self.lock();
        let now = Instant::now();
        let mut touched = Vec::new();
        for (d, pod, ok) in results {
            let Some(p) = state.workloads.get_mut(&d).and_then(|w| w.pods.iter_mut().find(|p| p.name == pod)) else {
                continue;
            };
            if let Phase::Running { ready, failures, .. } = &mut p.phase {
                if ok {
                    *ready = true;
                    *failures = 0;
                } else {
                    *failures += 1;
                    if *failures >= READINESS_FAILURE_THRESHOLD {
                        *ready = false;
                    }
                }
            }
            touched.push(d);
        }
        for d in touched {
            state.record(&d, now);
        }
    }

    /// The Deployment controller's status, written when it changes.
    async fn write_status(&self) {
        let writes: Vec<(String, serde_json::Value)> = {
            let state = self.lock();
            state
                .workloads
                .iter()
                .filter(|(_, w)| w.deployment.is_some())
                .filter_map(|(name, w)| {
                    let (desired, pods, ready, _) = w.counts();
                    let (pods, ready) = (pods as i32, ready as i32);
                    let terminating = w.pods.iter().filter(|p| !p.live()).count() as i32;
                    let status = json!({
                        "observedGeneration": w.generation,
                        "replicas": pods,
                        "updatedReplicas": pods,
                        "readyReplicas": ready,
                        "availableReplicas": ready,
                        "unavailableReplicas": (desired - ready).max(0),
                        "terminatingReplicas": terminating,
                    });
                    (w.last_status.as_ref() != Some(&status)).then(|| (name.clone(), status))
                })
                .collect()
        };
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        for (name, status) in writes {
            let patch = json!({ "status": status });
            match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    if let Some(w) = self.lock().workloads.get_mut(&name) {
                        w.last_status = Some(status);
                    }
                }
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => self.lock().error(format!("writing the status of Deployment {name}: {e}")),
            }
        }
    }
}

/// The container that runs warren-worker: `worker`, or the first one.
fn worker_container(d: &Deployment) -> Option<Container> {
    let pod = d.spec.as_ref()?.template.spec.as_ref()?;
    pod.containers.iter().find(|c| c.name == WORKER_CONTAINER).or_else(|| pod.containers.first()).cloned()
}

/// The container's args with `--metrics-addr` moved to `127.0.0.1:<port>` (added when absent).
pub fn local_args(container: &Container, port: u16) -> Vec<String> {
    let addr = format!("127.0.0.1:{port}");
    let mut args = Vec::new();
    let mut replaced = false;
    let mut iter = container.args.iter().flatten();
    while let Some(arg) = iter.next() {
        if arg == "--metrics-addr" {
            iter.next();
            args.extend(["--metrics-addr".to_owned(), addr.clone()]);
            replaced = true;
        } else if arg.starts_with("--metrics-addr=") {
            args.push(format!("--metrics-addr={addr}"));
            replaced = true;
        } else {
            args.push(arg.clone());
        }
    }
    if !replaced {
        args.extend(["--metrics-addr".to_owned(), addr]);
    }
    args
}

fn start_process(
    container: &Container,
    env: Vec<(String, String)>,
    port: u16,
    log: &PathBuf,
    rust_log: &str,
) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(crate::bin_path("warren-worker"));
    // A container's environment is its own: nothing of the test process leaks in (WARREN_* in particular).
    cmd.args(local_args(container, port))
        .env_clear()
        .envs(env)
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    // If the test process dies without dropping the runtime, its workers get SIGTERM and go too.
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("starting warren-worker")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addr_is_moved_to_loopback() {
        let c = Container {
            args: Some(
                ["--queue", "q", "--metrics-addr", "0.0.0.0:9090", "--prefetch", "4"].map(String::from).to_vec(),
            ),
            ..Default::default()
        };
        assert_eq!(local_args(&c, 4242), ["--queue", "q", "--metrics-addr", "127.0.0.1:4242", "--prefetch", "4"]);
        let c = Container { args: Some(vec!["--metrics-addr=0.0.0.0:9090".into()]), ..Default::default() };
        assert_eq!(local_args(&c, 1), ["--metrics-addr=127.0.0.1:1"]);
        let c = Container { args: Some(vec!["--queue".into(), "q".into()]), ..Default::default() };
        assert_eq!(local_args(&c, 2), ["--queue", "q", "--metrics-addr", "127.0.0.1:2"]);
    }
}
