//! Benchmarks warren-operator at scale (issue 4): N RpcServices created at once against the real API server and
//! broker; measures the time until all of them report QueueReady=True, the operator's memory, its AMQP connections,
//! its management API polls and RabbitMQ's memory. Writes the "## Operator" section of docs/benchmarks.md.
//!
//! ```text
//! eval "$(scripts/env up)"
//! scripts/bench-operator                       # N=1000 quorum queues (the target)
//! scripts/bench-operator -n 50                 # small, while developing
//! scripts/bench-operator -n 1000 --queue-type classic
//! scripts/bench-operator --no-docs             # measure only, leave docs/benchmarks.md alone
//! ```
//!
//! `scripts/bench-operator` is `cargo run --release -p warren-tests --bin bench-operator -- ARGS`.
//!
//! What it does: a fresh namespace `bench-op-<hex>`, a broker Secret (`uri`, `managementUri`) in it, the CRD
//! (server-side apply of `warren_operator::crd()`, what `crds/` holds), the release operator (`warren-operator run
//! --namespace NS --leader-election false --metrics-addr 127.0.0.1:PORT`), then N minimal RpcServices POSTed by 16
//! concurrent requests as fast as the API server takes them. A watch on the namespace's RpcServices tracks them;
//! every second it samples the operator's /proc status and CPU time; at the end it reads VmHWM, /metrics, the
//! broker's connections (matched to the operator by its sockets' local ports) and the API server's request
//! counters. Cleanup (always, also on failure, Ctrl-C or SIGTERM): delete the RpcServices while the operator runs
//! (their finalizer is removed by it; stripped by hand when it does not), stop the operator, delete the
//! Deployments, events, Secret and namespace, and DELETE the 2N queues through the management API.
//!
//! Environment: KUBECONFIG (else `scripts/env up` is run), WARREN_BROKER_URI (default
//! amqp://guest:guest@127.0.0.1:5672/%2f), WARREN_MANAGEMENT_URI (default http://guest:guest@127.0.0.1:15672).
//! Bounded: the wait for readiness stops after --timeout seconds (default 300), cleanup takes at most a few minutes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Map, Value, json};
use warren_client::management::Management;
use warren_operator::RpcService;
use warren_tests::cluster::{self, TestNamespace};
use warren_tests::operator_process::{OperatorProcess, free_port};
use warren_tests::prometheus::{self, Sample};

const GROUP_PATH: &str = "/apis/warren.dev/v1alpha1";

fn root() -> PathBuf {
    warren_tests::workspace_root()
}

fn say(message: impl std::fmt::Display) {
    eprintln!("bench-operator: {message}");
}

#[derive(Parser, Clone)]
#[command(
    about = "Benchmarks warren-operator at scale: N RpcServices created at once; time until all are QueueReady, \
                   the operator's memory, connections and polls, RabbitMQ's memory; writes the \"## Operator\" \
                   section of docs/benchmarks.md"
)]
struct Args {
    /// RpcServices to create
    #[arg(short = 'n', default_value_t = 1000)]
    n: usize,
    /// spec.queue.type of every RpcService (quorum is the CRD's default)
    #[arg(long, value_parser = ["quorum", "classic"], default_value = "quorum")]
    queue_type: String,
    /// give up waiting for QueueReady after this (s)
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// status sample interval (s)
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// keep measuring this long after all are ready (s)
    #[arg(long, default_value_t = 15.0)]
    settle: f64,
    /// wait this long for the operator to finalize deletions (s)
    #[arg(long, default_value_t = 120.0)]
    cleanup_wait: f64,
    /// concurrent create requests
    #[arg(long, default_value_t = 16)]
    create_threads: usize,
    /// namespace to create (default bench-op-<random>); must not exist
    #[arg(long)]
    namespace: Option<String>,
    /// operator binary (default: the workspace's target/release/warren-operator)
    #[arg(long)]
    operator: Option<PathBuf>,
    /// extra argument for `warren-operator run` (repeat for several)
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_arg: Vec<String>,
    /// do not run cargo build first
    #[arg(long)]
    no_build: bool,
    /// first wait up to this long for the machine to be quiet (< 25 % busy over 5 s): the API server, etcd and
    /// RabbitMQ share the cores, so other work skews the result
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    wait_quiet: f64,
    /// do not write docs/benchmarks.md
    #[arg(long)]
    no_docs: bool,
    /// the benchmarks document to write
    #[arg(long, default_value_os_t = root().join("docs").join("benchmarks.md"))]
    docs: PathBuf,
    /// where the JSON results go (default: a temp dir)
    #[arg(long)]
    results_dir: Option<PathBuf>,
    /// run nothing: print the summary of saved results and write their rows to --docs
    #[arg(long, num_args = 1.., value_name = "RESULTS_JSON")]
    report: Vec<PathBuf>,
}

// --- /proc --------------------------------------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn cpu_count() -> usize {
    // SAFETY: as above. Like Python's os.cpu_count(): every online CPU, whatever the affinity.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

/// VmRSS, VmHWM (KiB) and threads of a live process.
struct ProcStatus {
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
}

fn proc_status(pid: i32) -> Option<ProcStatus> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcStatus { rss_kib: field("VmRSS"), hwm_kib: field("VmHWM"), threads: field("Threads") })
}

/// utime + stime of a process, in seconds (`self` for this one, plus its reaped children's then).
fn proc_cpu_seconds(pid: &str, with_children: bool) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let mut total = ticks(11)? + ticks(12)?;
    if with_children {
        total += ticks(13)? + ticks(14)?;
    }
    Some(total / clock_ticks())
}

fn pid_cpu(pid: i32) -> Option<f64> {
    proc_cpu_seconds(&pid.to_string(), false)
}

/// Local ports of the process's established TCP connections to the broker's AMQP port.
fn amqp_local_ports(pid: i32, amqp_port: u16) -> Vec<u16> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || !inodes.contains(cols[9]) || cols[3] != "01" {
                continue;
            }
            let port = |addr: &str| u16::from_str_radix(addr.rsplit_once(':')?.1, 16).ok();
            if port(cols[2]) == Some(amqp_port)
                && let Some(local) = port(cols[1])
            {
                ports.push(local);
            }
        }
    }
    ports
}

/// (busy, total) CPU seconds of the whole machine since boot, from /proc/stat.
fn machine_cpu_seconds() -> (f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let hz = clock_ticks();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0.0);
    let idle = get(3) + get(4);
    let total: f64 = fields.iter().take(8).sum();
    ((total - idle) / hz, total / hz)
}

fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} cores, {model}, Linux {}", cpu_count(), release.trim())
}

/// The pid of a component `scripts/env up` started (for CPU accounting only).
fn env_pid(name: &str) -> Option<i32> {
    let state = std::env::var_os("WARREN_ENV_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("WARREN_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
                .join("warren")
        });
        cache.join("env")
    });
    std::fs::read_to_string(state.join(format!("{name}.pid"))).ok()?.trim().parse().ok()
}

/// Cores a process used on average over the next `seconds`.
async fn cpu_rate(pid: Option<i32>, seconds: f64) -> Option<f64> {
    let a = pid.and_then(pid_cpu);
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let b = pid.and_then(pid_cpu);
    Some(round((b? - a?) / seconds, 3))
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn mib_bytes(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

// --- values -------------------------------------------------------------------------------------------------------

/// A number of a JSON value (0 when absent or not a number).
fn num(v: Option<&Value>) -> f64 {
    v.and_then(Value::as_f64).unwrap_or(0.0)
}

fn opt(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|v| !v.is_null())
}

/// `str()` of a value as Python prints it (the summary's format): None, 1.0, 'a', ['a'], {'k': 1}.
fn py(v: Option<&Value>) -> String {
    fn repr(v: &Value, top: bool) -> String {
        match v {
            Value::Null => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 && f.abs() < 1e16 { format!("{f:.1}") } else { format!("{f}") }
            }
            Value::Number(n) => n.to_string(),
            Value::String(s) if top => s.clone(),
            Value::String(s) => format!("'{s}'"),
            Value::Array(items) => {
                format!("[{}]", items.iter().map(|i| repr(i, false)).collect::<Vec<_>>().join(", "))
            }
            Value::Object(map) => format!(
                "{{{}}}",
                map.iter().map(|(k, v)| format!("'{k}': {}", repr(v, false))).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    v.map(|v| repr(v, true)).unwrap_or_else(|| "None".into())
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators): object sizes stay comparable with the
/// earlier runs' figures.
fn python_json_len(v: &Value) -> usize {
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first { Ok(()) } else { w.write_all(b", ") }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    serde::Serialize::serialize(v, &mut ser).map(|_| out.len()).unwrap_or(0)
}

// --- the broker -------------------------------------------------------------------------------------------------

/// A management API GET, tried three times (the broker may be slow under the load of the run).
async fn mgmt_get(mgmt: &Management, segments: &[&str], query: Option<(&str, &str)>) -> anyhow::Result<Value> {
    let mut attempt = 0;
    loop {
        match mgmt.get_json(segments, query).await {
            Ok(v) => return Ok(v),
            Err(e) if attempt == 2 => return Err(anyhow!("management GET {}: {e}", segments.join("/"))),
            Err(_) => attempt += 1,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn rabbit_pid(mgmt: &Management) -> Option<i32> {
    let nodes = mgmt_get(mgmt, &["nodes"], Some(("columns", "os_pid"))).await.ok()?;
    match nodes.get(0)?.get("os_pid")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64().map(|n| n as i32),
        _ => None,
    }
}

async fn rabbit_memory(mgmt: &Management) -> Value {
    let nodes = match mgmt_get(mgmt, &["nodes"], Some(("columns", "name,mem_used,mem_limit"))).await {
        Ok(nodes) => nodes,
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let Some(node) = nodes.get(0) else { return json!({ "error": "no node listed" }) };
    let mut breakdown = Map::new();
    let mut total = json!({});
    let name = node.get("name").and_then(Value::as_str).unwrap_or("");
    if let Ok(mem) = mgmt_get(mgmt, &["nodes", name, "memory"], None).await
        && let Some(mem) = mem.get("memory")
    {
        for key in BREAKDOWN {
            breakdown.insert(key.into(), mem.get(key).cloned().unwrap_or(json!(0)));
        }
        total = mem.get("total").cloned().unwrap_or(json!({}));
    }
    json!({ "mem_used": node.get("mem_used"), "mem_limit": node.get("mem_limit"), "breakdown": breakdown,
            "total": total })
}

const BREAKDOWN: [&str; 11] = [
    "quorum_queue_procs",
    "queue_procs",
    "quorum_ets",
    "mnesia",
    "mgmt_db",
    "metrics",
    "binary",
    "code",
    "other_proc",
    "allocated_unused",
    "reserved_unallocated",
];

// --- the API server -----------------------------------------------------------------------------------------------

/// `apiserver_request_total` and the request duration sums, per "resource[/subresource] VERB", for the resources
/// the operator touches. Server-wide: other clients' requests to these resources are counted too.
type ApiCounts = BTreeMap<String, (f64, f64)>;

async fn apiserver_requests(client: &Client) -> Option<ApiCounts> {
    let request = kube::core::Request::new("").get("metrics", &Default::default()).ok()?;
    let text = client.request_text(request).await.ok()?;
    let mut out = ApiCounts::new();
    for sample in prometheus::parse(&text) {
        let field = match sample.name.as_str() {
            "apiserver_request_total" => 0,
            "apiserver_request_duration_seconds_sum" => 1,
            _ => continue,
        };
        let resource = sample.label("resource").unwrap_or("");
        if !["rpcservices", "deployments", "secrets", "events", "leases"].contains(&resource) {
            continue;
        }
        let sub = sample.label("subresource").filter(|s| !s.is_empty()).map(|s| format!("/{s}")).unwrap_or_default();
        let key = format!("{resource}{sub} {}", sample.label("verb").unwrap_or(""));
        let entry = out.entry(key).or_insert((0.0, 0.0));
        if field == 0 { entry.0 += sample.value } else { entry.1 += sample.value }
    }
    Some(out)
}

fn requests_diff(a: Option<&ApiCounts>, b: Option<&ApiCounts>) -> Value {
    let (Some(a), Some(b)) = (a, b) else { return Value::Null };
    let mut out = Map::new();
    for (key, (count, seconds)) in b {
        let (count0, seconds0) = a.get(key).copied().unwrap_or((0.0, 0.0));
        let n = count - count0;
        if n > 0.0 {
            out.insert(
                key.clone(),
                json!({ "count": n as u64, "mean_ms": round(1000.0 * (seconds - seconds0) / n, 1) }),
            );
        }
    }
    Value::Object(out)
}

// --- the benchmark ------------------------------------------------------------------------------------------------

/// What the watch saw of one RpcService, in seconds since the first create.
#[derive(Clone, Default)]
struct Seen {
    finalized: Option<f64>,
    status: Option<f64>,
    reason: Option<String>,
    ready: Option<f64>,
    ready_ltt: Option<f64>,
    ready_now: bool,
    created_ts: Option<f64>,
}

fn parse_time(v: Option<&Value>) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(v?.as_str()?).ok()?;
    Some(t.timestamp() as f64 + f64::from(t.timestamp_subsec_micros()) / 1e6)
}

/// The state the watch task shares with the benchmark.
#[derive(Clone)]
struct Tracker {
    t0: Arc<Mutex<Instant>>,
    objects: Arc<Mutex<HashMap<String, Seen>>>,
    events: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
}

impl Tracker {
    fn elapsed(&self) -> f64 {
        self.t0.lock().unwrap().elapsed().as_secs_f64()
    }

    fn observe(&self, obj: &DynamicObject) {
        let now = self.elapsed();
        let value = serde_json::to_value(obj).unwrap_or_default();
        let mut objects = self.objects.lock().unwrap();
        let seen = objects.entry(obj.name_any()).or_default();
        if !obj.finalizers().is_empty() && seen.finalized.is_none() {
            seen.finalized = Some(now);
        }
        let status = get(&value, "status");
        if status.is_some_and(|s| s.as_object().is_none_or(|m| !m.is_empty())) && seen.status.is_none() {
            seen.status = Some(now);
        }
        let condition = status
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c.get("type").and_then(Value::as_str) == Some("QueueReady")));
        if let Some(c) = condition {
            seen.reason = c.get("reason").and_then(Value::as_str).map(str::to_owned);
            if c.get("status").and_then(Value::as_str) == Some("True") {
                seen.ready.get_or_insert(now);
                if let Some(ltt) = parse_time(c.get("lastTransitionTime")) {
                    seen.ready_ltt = Some(ltt);
                }
                seen.ready_now = true;
            } else {
                seen.ready_now = false;
            }
        }
        seen.created_ts = parse_time(value.pointer("/metadata/creationTimestamp"));
    }

    /// One watch on the namespace's RpcServices (no repeated lists, which would load the API server with N objects a
    /// second); the time an event arrives is when the change became visible to a client. A dropped stream resumes
    /// from the last resourceVersion; 410 Gone starts again from a fresh list.
    async fn watch(self, api: Api<DynamicObject>, mut rv: String) {
        loop {
            let params = WatchParams::default().timeout(290); // bookmarks on by default
            let stream = match api.watch(&params, &rv).await {
                Ok(stream) => stream,
                Err(e) => {
                    *self.error.lock().unwrap() = Some(e.to_string());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(WatchEvent::Added(obj)) | Ok(WatchEvent::Modified(obj)) => {
                        rv = obj.resource_version().unwrap_or(rv);
                        self.events.fetch_add(1, Ordering::Relaxed);
                        self.observe(&obj);
                    }
                    Ok(WatchEvent::Deleted(obj)) => {
                        rv = obj.resource_version().unwrap_or(rv);
                        self.events.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(WatchEvent::Bookmark(bookmark)) => {
                        rv = bookmark.metadata.resource_version;
                        self.events.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(WatchEvent::Error(_)) => {
                        if let Ok(list) = api.list(&ListParams::default()).await {
                            for obj in &list.items {
                                self.observe(obj);
                            }
                            rv = list.metadata.resource_version.unwrap_or(rv);
                        }
                        break;
                    }
                    Err(e) => {
                        *self.error.lock().unwrap() = Some(e.to_string());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    }
}

#[derive(Clone)]
struct CpuSnapshot {
    machine: (f64, f64),
    bench: f64,
    processes: BTreeMap<String, Option<f64>>,
}

struct Bench {
    args: Args,
    n: usize,
    ns: String,
    work: PathBuf,
    amqp_uri: String,
    mgmt_uri: String,
    vhost: String,
    amqp_port: u16,
    client: Client,
    rpcservices: Api<DynamicObject>,
    mgmt: Management,
    binary: PathBuf,
    operator: Option<OperatorProcess>,
    operator_pid: Arc<AtomicI32>,
    operator_log: PathBuf,
    metrics_port: u16,
    result: Map<String, Value>,
    samples: Vec<Value>,
    namespace: Option<TestNamespace>,
    tracker: Tracker,
    watch_task: Option<tokio::task::JoinHandle<()>>,
    created_at: Arc<Mutex<HashMap<String, f64>>>,
    component_pids: Vec<(String, i32)>,
    rabbit_pid: Option<i32>,
    cpu_start: Option<CpuSnapshot>,
    cpu_ready: Option<CpuSnapshot>,
    t_ready: f64,
    api_before: Option<ApiCounts>,
}

impl Bench {
    async fn new(args: Args) -> anyhow::Result<Self> {
        let ns = args.namespace.clone().unwrap_or_else(|| warren_tests::unique_name("bench-op")[..15].to_owned());
        let work =
            std::env::temp_dir().join(format!("bench-operator.{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        std::fs::create_dir_all(&work)?;
        let amqp_uri = warren_tests::broker_uri();
        let mgmt_uri = warren_tests::management_uri();
        let parsed =
            warren_client::broker_uri::parse(&amqp_uri).map_err(|e| anyhow!("WARREN_BROKER_URI: {}", e.reason()))?;
        let client = cluster::client().await?;
        let resource = ApiResource::erase::<RpcService>(&());
        let rpcservices = Api::namespaced_with(client.clone(), &ns, &resource);
        let mgmt = Management::new(&mgmt_uri).map_err(|e| anyhow!("WARREN_MANAGEMENT_URI: {e}"))?;
        let mut result = Map::new();
        result.insert("n".into(), json!(args.n));
        result.insert("queue_type".into(), json!(args.queue_type));
        result.insert("namespace".into(), json!(ns));
        result.insert("machine".into(), json!(machine()));
        result.insert("date".into(), json!(chrono::Local::now().date_naive().to_string()));
        let component_pids =
            ["kube-apiserver", "etcd"].iter().filter_map(|name| Some((name.to_string(), env_pid(name)?))).collect();
        Ok(Self {
            n: args.n,
            operator_log: work.join("operator.log"),
            work,
            ns,
            vhost: parsed.vhost.clone(),
            amqp_port: parsed.authority.port,
            amqp_uri,
            mgmt_uri,
            client,
            rpcservices,
            mgmt,
            binary: PathBuf::new(),
            operator: None,
            operator_pid: Arc::new(AtomicI32::new(0)),
            metrics_port: free_port(),
            result,
            samples: Vec::new(),
            namespace: None,
            tracker: Tracker {
                t0: Arc::new(Mutex::new(Instant::now())),
                objects: Arc::default(),
                events: Arc::default(),
                error: Arc::default(),
            },
            watch_task: None,
            created_at: Arc::default(),
            component_pids,
            rabbit_pid: None,
            cpu_start: None,
            cpu_ready: None,
            t_ready: 0.0,
            api_before: None,
            args,
        })
    }

    fn set(&mut self, key: &str, value: impl serde::Serialize) {
        self.result.insert(key.into(), serde_json::to_value(value).unwrap_or(Value::Null));
    }

    fn operator_pid(&self) -> i32 {
        self.operator.as_ref().map(|o| o.pid() as i32).unwrap_or(0)
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        self.setup().await?;
        self.start_operator().await?;
        self.start_watch().await?;
        self.create_all().await?;
        self.wait_ready().await?;
        self.measure_end().await
    }

    // setup

    fn operator_binary(&self) -> anyhow::Result<PathBuf> {
        if let Some(path) = &self.args.operator {
            return Ok(path.clone());
        }
        let out = Command::new("cargo")
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(root())
            .stderr(Stdio::inherit())
            .output()
            .context("running cargo metadata")?;
        let meta: Value = serde_json::from_slice(&out.stdout).context("cargo metadata's output")?;
        let target = meta["target_directory"].as_str().context("cargo metadata: no target_directory")?;
        Ok(Path::new(target).join("release").join("warren-operator"))
    }

    async fn background_load(seconds: f64) -> f64 {
        let a = machine_cpu_seconds();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let b = machine_cpu_seconds();
        (b.0 - a.0) / (b.1 - a.1).max(1e-9)
    }

    async fn wait_quiet(&mut self) {
        let deadline = Instant::now() + Duration::from_secs_f64(self.args.wait_quiet);
        let load = loop {
            let load = Self::background_load(5.0).await;
            if load < 0.25 || Instant::now() >= deadline {
                break load;
            }
            say(format!("machine {:.0} % busy; waiting for it to be quiet", 100.0 * load));
        };
        self.set("background_busy_before", round(load, 2));
        self.rabbit_pid = rabbit_pid(&self.mgmt).await;
        let idle = cpu_rate(self.rabbit_pid, 5.0).await;
        self.set("rabbit_cores_idle_before", idle);
        if load >= 0.25 {
            say(format!(
                "warning: the machine was {:.0} % busy before the run: the numbers include that contention",
                100.0 * load
            ));
        }
    }

    async fn setup(&mut self) -> anyhow::Result<()> {
        if !self.args.no_build {
            say("building the release operator (cargo build --release -p warren-operator)");
            let status = Command::new("cargo")
                .args(["build", "--release", "-p", "warren-operator"])
                .current_dir(root())
                .stdout(Stdio::inherit())
                .status()
                .context("running cargo build")?;
            if !status.success() {
                bail!("cargo build --release -p warren-operator failed ({status})");
            }
        }
        self.binary = self.operator_binary()?;
        let meta =
            std::fs::metadata(&self.binary).map_err(|_| anyhow!("no operator binary at {}", self.binary.display()))?;
        if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 == 0 {
            bail!("no operator binary at {}", self.binary.display());
        }
        if let Ok(out) = Command::new("sha256sum").arg(&self.binary).output() {
            let sum = String::from_utf8_lossy(&out.stdout);
            self.set("operator_binary_sha256", sum.get(..16).unwrap_or(""));
        }
        if let Ok(mtime) = meta.modified() {
            let local: chrono::DateTime<chrono::Local> = mtime.into();
            self.set("operator_binary_mtime", local.format("%Y-%m-%dT%H:%M:%S").to_string());
        }
        if let Ok(out) = Command::new("git").args(["describe", "--always", "--dirty"]).current_dir(root()).output() {
            self.set("git", String::from_utf8_lossy(&out.stdout).trim());
        }
        cluster::install_crd(&self.client).await?;
        say(format!("namespace {}", self.ns));
        let namespace = TestNamespace::create_named(&self.client, &self.ns).await?;
        namespace.create_broker_secret_for("rabbitmq", &self.amqp_uri, &self.mgmt_uri).await?;
        self.namespace = Some(namespace);
        let existing = mgmt_get(&self.mgmt, &["queues", &self.vhost], Some(("columns", "name"))).await?;
        self.set("broker_queues_before", existing.as_array().map_or(0, Vec::len));
        let rabbit = rabbit_memory(&self.mgmt).await;
        self.set("rabbit_before", rabbit);
        self.api_before = apiserver_requests(&self.client).await;
        self.wait_quiet().await;
        Ok(())
    }

    async fn start_operator(&mut self) -> anyhow::Result<()> {
        let mut args: Vec<String> =
            ["run", "--namespace", self.ns.as_str(), "--leader-election", "false", "--metrics-addr"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.push(format!("127.0.0.1:{}", self.metrics_port));
        args.extend(self.args.operator_arg.iter().cloned());
        let command = std::iter::once(self.binary.display().to_string())
            .chain(args.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        self.set("operator_command", &command);
        self.set("operator_args", self.args.operator_arg.clone());
        say(format!("starting {command}"));
        let operator = OperatorProcess::spawn_binary(
            &self.binary,
            &cluster::kubeconfig_path(),
            self.metrics_port,
            &args,
            &self.operator_log,
        )?;
        self.operator_pid.store(operator.pid() as i32, Ordering::Relaxed);
        let operator = self.operator.insert(operator);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = operator.exit_status() {
                bail!("the operator exited ({status}); see {}", self.operator_log.display());
            }
            if tokio::time::timeout(Duration::from_secs(2), operator.ready()).await.unwrap_or(false) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("the operator was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Ready means the CRD is there; "leading" follows at once without leader election. Let the watches start.
        while Instant::now() < deadline
            && !std::fs::read_to_string(&self.operator_log).unwrap_or_default().contains("leading")
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pid = self.operator_pid();
        self.set("operator_idle_rss_kib", proc_status(pid).map(|s| s.rss_kib));
        self.component_pids.push(("operator".into(), pid));
        if let Some(rabbit) = rabbit_pid(&self.mgmt).await {
            self.component_pids.push(("rabbitmq".into(), rabbit));
        }
        self.component_pids.retain(|(_, pid)| pid_cpu(*pid).is_some());
        Ok(())
    }

    fn manifest(&self, i: usize) -> Value {
        let mut spec = json!({ "broker": { "secretRef": { "name": "rabbitmq" } } });
        if self.args.queue_type != "quorum" {
            spec["queue"] = json!({ "type": self.args.queue_type });
        }
        json!({ "apiVersion": "warren.dev/v1alpha1", "kind": "RpcService",
                "metadata": { "name": format!("svc-{i:05}") }, "spec": spec })
    }

    async fn create_all(&mut self) -> anyhow::Result<()> {
        say(format!(
            "creating {} RpcServices ({} queues) with {} concurrent requests",
            self.n, self.args.queue_type, self.args.create_threads
        ));
        self.cpu_start = Some(self.cpu_snapshot());
        *self.tracker.t0.lock().unwrap() = Instant::now();
        let manifests: Vec<DynamicObject> =
            (0..self.n).map(|i| serde_json::from_value(self.manifest(i))).collect::<Result<_, _>>()?;
        let errors: Vec<String> = futures::stream::iter(manifests)
            .map(|obj| {
                let (api, tracker, created_at) =
                    (self.rpcservices.clone(), self.tracker.clone(), self.created_at.clone());
                async move {
                    match api.create(&PostParams::default(), &obj).await {
                        Ok(_) => {
                            created_at.lock().unwrap().insert(obj.name_any(), tracker.elapsed());
                            None
                        }
                        Err(e) => Some(format!("POST {}: {e}", obj.name_any())),
                    }
                }
            })
            .buffer_unordered(self.args.create_threads.max(1))
            .filter_map(|e| async move { e })
            .collect()
            .await;
        let seconds = self.tracker.elapsed();
        self.set("create_seconds", seconds);
        if let Some(first) = errors.first() {
            bail!("{} creates failed, e.g. {first}", errors.len());
        }
        say(format!("created {} in {seconds:.1} s", self.n));
        Ok(())
    }

    async fn start_watch(&mut self) -> anyhow::Result<()> {
        let list = self.rpcservices.list_metadata(&ListParams::default()).await?;
        let rv = list.metadata.resource_version.unwrap_or_default();
        self.watch_task = Some(tokio::spawn(self.tracker.clone().watch(self.rpcservices.clone(), rv)));
        Ok(())
    }

    fn cpu_snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            machine: machine_cpu_seconds(),
            bench: proc_cpu_seconds("self", true).unwrap_or(0.0),
            processes: self.component_pids.iter().map(|(name, pid)| (name.clone(), pid_cpu(*pid))).collect(),
        }
    }

    fn sample(&mut self) -> Value {
        let t = self.tracker.elapsed();
        let objects: Vec<Seen> = self.tracker.objects.lock().unwrap().values().cloned().collect();
        let pid = self.operator_pid();
        let status = proc_status(pid);
        let mut not_ready = BTreeMap::<String, u64>::new();
        for o in &objects {
            if !o.ready_now
                && let Some(reason) = &o.reason
            {
                *not_ready.entry(reason.clone()).or_default() += 1;
            }
        }
        let s = json!({
            "t": round(t, 2), "objects": objects.len(),
            "finalized": objects.iter().filter(|o| o.finalized.is_some()).count(),
            "with_status": objects.iter().filter(|o| o.status.is_some()).count(),
            "queue_ready": objects.iter().filter(|o| o.ready_now).count(),
            "not_ready_reasons": not_ready,
            "rss_kib": status.as_ref().map(|s| s.rss_kib), "threads": status.as_ref().map(|s| s.threads),
            "cpu_s": pid_cpu(pid),
        });
        self.samples.push(s.clone());
        s
    }

    fn operator_died(&mut self) -> Option<String> {
        let status = self.operator.as_mut()?.exit_status()?;
        Some(format!("the operator died ({status}); see {}", self.operator_log.display()))
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let t0 = *self.tracker.t0.lock().unwrap();
        let deadline = t0 + Duration::from_secs_f64(self.args.timeout);
        let mut last_print: Option<Instant> = None;
        let mut last_rabbit: Option<Instant> = None;
        let mut rabbit_peak = 0.0f64;
        let start_busy = self.cpu_start.as_ref().map_or(0.0, |c| c.machine.0);
        loop {
            if let Some(died) = self.operator_died() {
                bail!(died);
            }
            let s = self.sample();
            if last_rabbit.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                rabbit_peak = rabbit_peak.max(num(rabbit_memory(&self.mgmt).await.get("mem_used")));
                last_rabbit = Some(Instant::now());
            }
            let ready = s["queue_ready"].as_u64().unwrap_or(0) as usize;
            let t = num(s.get("t"));
            if last_print.is_none_or(|p| p.elapsed() >= Duration::from_secs(5)) || ready == self.n {
                let busy = machine_cpu_seconds().0 - start_busy;
                let reasons = &s["not_ready_reasons"];
                say(format!(
                    "t={t:6.1}s finalized={} status={} QueueReady={ready}/{} rss={:.1}MiB cpu={:.1}s machine-busy={:.0}%{}",
                    s["finalized"],
                    s["with_status"],
                    self.n,
                    mib(num(s.get("rss_kib"))),
                    num(s.get("cpu_s")),
                    100.0 * busy / t.max(0.1) / cpu_count() as f64,
                    if reasons.as_object().is_some_and(|m| !m.is_empty()) {
                        format!(" notReady={}", py(Some(reasons)))
                    } else {
                        String::new()
                    }
                ));
                last_print = Some(Instant::now());
            }
            if ready == self.n {
                break;
            }
            if Instant::now() > deadline {
                say(format!("timeout: {ready}/{} QueueReady after {} s", self.n, self.args.timeout));
                break;
            }
            let next = t0 + Duration::from_secs_f64(t + self.args.interval);
            tokio::time::sleep(next.saturating_duration_since(Instant::now()).max(Duration::from_millis(50))).await;
        }
        self.t_ready = self.tracker.elapsed();
        self.cpu_ready = Some(self.cpu_snapshot());
        let objects = self.tracker.objects.lock().unwrap().clone();
        let created_at = self.created_at.lock().unwrap().clone();
        let n = self.n;
        let mut ready: Vec<f64> = objects.values().filter_map(|o| o.ready).collect();
        ready.sort_by(f64::total_cmp);
        let ready_now = objects.values().filter(|o| o.ready_now).count();
        let all_ready = ready_now == n;
        self.set("all_ready", all_ready);
        self.set("queue_ready", ready_now);
        self.set("ready_seconds", if all_ready { ready.last().copied() } else { None });
        for q in [50usize, 90, 99] {
            let enough = ready.len() as f64 >= q as f64 / 100.0 * n as f64 && !ready.is_empty();
            let at = ready.get((q * n / 100).min(ready.len().saturating_sub(1))).copied();
            self.set(&format!("ready_p{q}_seconds"), if enough { at } else { None });
        }
        // Per object: from its create request's answer to its QueueReady (includes the wait in the work queue).
        let mut latency: Vec<f64> =
            objects.iter().filter_map(|(name, o)| Some(o.ready? - created_at.get(name)?)).collect();
        latency.sort_by(f64::total_cmp);
        if !latency.is_empty() {
            self.set("object_latency_p50_seconds", latency[latency.len() / 2]);
            self.set("object_latency_max_seconds", latency[latency.len() - 1]);
        }
        // The same from the objects themselves (second resolution, API server clock).
        let ltt = objects
            .values()
            .filter_map(|o| o.ready_ltt)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let created = objects
            .values()
            .filter_map(|o| o.created_ts)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        if let (Some(ltt), Some(created)) = (ltt, created) {
            self.set("ready_seconds_conditions", ltt - created);
        }
        let mut finalized: Vec<f64> = objects.values().filter_map(|o| o.finalized).collect();
        finalized.sort_by(f64::total_cmp);
        self.set("finalized_all_seconds", if finalized.len() == n { finalized.last().copied() } else { None });
        self.set("rabbit_peak_sampled_mem_used", rabbit_peak);
        self.set("watch_events", self.tracker.events.load(Ordering::Relaxed));
        let watch_error = self.tracker.error.lock().unwrap().clone();
        self.set("watch_error", watch_error);
        Ok(())
    }

    fn cpu_report(start: &CpuSnapshot, end: &CpuSnapshot, wall: f64) -> Value {
        let mut out = Map::new();
        out.insert("wall_seconds".into(), json!(round(wall, 1)));
        out.insert("cores".into(), json!(cpu_count()));
        let busy = end.machine.0 - start.machine.0;
        out.insert("machine_busy_seconds".into(), json!(round(busy, 1)));
        let mut known = 0.0;
        for name in ["operator", "kube-apiserver", "etcd", "rabbitmq", "bench"] {
            let (a, b) = if name == "bench" {
                (Some(start.bench), Some(end.bench))
            } else {
                (start.processes.get(name).copied().flatten(), end.processes.get(name).copied().flatten())
            };
            if let (Some(a), Some(b)) = (a, b) {
                out.insert(name.into(), json!(round(b - a, 1)));
                known += b - a;
            }
        }
        out.insert("other".into(), json!(round((busy - known).max(0.0), 1)));
        Value::Object(out)
    }

    async fn measure_end(&mut self) -> anyhow::Result<()> {
        let pid = self.operator_pid();
        let status = proc_status(pid);
        self.set("operator_rss_at_ready_kib", status.as_ref().map(|s| s.rss_kib));
        self.set("operator_cpu_at_ready_s", pid_cpu(pid));
        if let (Some(start), Some(ready)) = (&self.cpu_start, &self.cpu_ready) {
            let report = Self::cpu_report(start, ready, self.t_ready);
            self.set("cpu_to_ready", report);
        }
        let ports = amqp_local_ports(pid, self.amqp_port);
        self.set("operator_amqp_sockets", ports.len());
        // The management API lists a new connection within its stats interval (5 s): retry until it shows.
        let mut connections = Ok((Vec::new(), Vec::new()));
        for _ in 0..12 {
            connections = mgmt_get(&self.mgmt, &["connections"], None).await.map(|all| {
                let all = all.as_array().cloned().unwrap_or_default();
                let ours: Vec<Value> = all
                    .iter()
                    .filter(|c| {
                        c.get("peer_port").and_then(Value::as_u64).is_some_and(|p| ports.contains(&(p as u16)))
                            && matches!(c.get("peer_host").and_then(Value::as_str), Some("127.0.0.1" | "::1"))
                    })
                    .cloned()
                    .collect();
                (all, ours)
            });
            match &connections {
                Ok((_, ours)) if ours.is_empty() && !ports.is_empty() => {
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
                _ => break,
            }
        }
        match connections {
            Ok((all, ours)) => {
                let name = |c: &Value| {
                    c.pointer("/client_properties/connection_name").and_then(Value::as_str).unwrap_or("").to_owned()
                };
                let names: std::collections::BTreeSet<String> = ours.iter().map(name).collect();
                self.set("broker_connections_of_operator", ours.len());
                self.set("broker_connection_names", names);
                self.set(
                    "broker_channels_of_operator",
                    ours.iter().map(|c| num(c.get("channels"))).sum::<f64>() as u64,
                );
                self.set(
                    "broker_connections_named_warren_operator_all",
                    all.iter().filter(|c| name(c) == "warren-operator").count(),
                );
            }
            Err(e) => self.set("broker_connections_error", e.to_string()),
        }
        let queues = mgmt_get(&self.mgmt, &["queues", &self.vhost], Some(("columns", "name,type"))).await?;
        let prefix = format!("{}.", self.ns);
        let mine: Vec<&Value> = queues
            .as_array()
            .into_iter()
            .flatten()
            .filter(|q| q.get("name").and_then(Value::as_str).is_some_and(|n| n.starts_with(&prefix)))
            .collect();
        let types: std::collections::BTreeSet<String> =
            mine.iter().map(|q| q.get("type").and_then(Value::as_str).unwrap_or("?").to_owned()).collect();
        self.set("queues_created", mine.len());
        self.set("queue_types", types);
        let rabbit = rabbit_memory(&self.mgmt).await;
        self.set("rabbit_at_ready", rabbit);
        // How big the objects the operator caches are (its reflector keeps every RpcService).
        let path = format!("{GROUP_PATH}/namespaces/{}/rpcservices", self.ns);
        if let Ok(request) = kube::core::Request::new(path).list(&ListParams::default().limit(50))
            && let Ok(raw) = self.client.request::<Value>(request).await
        {
            let items = raw.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            if !items.is_empty() {
                self.set("rpcservice_json_bytes", python_json_len(&Value::Array(items.clone())) / items.len());
                let managed: usize = items
                    .iter()
                    .map(|o| python_json_len(o.pointer("/metadata/managedFields").unwrap_or(&json!([]))))
                    .sum();
                self.set("rpcservice_managed_fields_bytes", managed / items.len());
            } else {
                self.set("rpcservice_json_bytes", Value::Null);
                self.set("rpcservice_managed_fields_bytes", Value::Null);
            }
        }
        self.scrape("at_ready").await;
        let api_ready = apiserver_requests(&self.client).await;
        // Steady state: what the operator does once everything is declared (observer polls, resync triggers).
        let settle = self.args.settle;
        if settle > 0.0 {
            say(format!("watching the steady state for {settle:.0} s"));
            let start = self.cpu_snapshot();
            let end_at = Instant::now() + Duration::from_secs_f64(settle);
            while Instant::now() < end_at && self.operator_died().is_none() {
                self.sample();
                tokio::time::sleep(Duration::from_secs_f64(self.args.interval)).await;
            }
            self.scrape("after_settle").await;
            self.set("settle_seconds", settle);
            let report = Self::cpu_report(&start, &self.cpu_snapshot(), settle);
            self.set("cpu_settle", report);
        }
        let status = proc_status(pid);
        self.set("operator_hwm_kib", status.as_ref().map(|s| s.hwm_kib));
        self.set("operator_rss_end_kib", status.as_ref().map(|s| s.rss_kib));
        let max_rss = self.samples.iter().map(|s| s["rss_kib"].as_u64().unwrap_or(0)).max().unwrap_or(0);
        self.set("operator_rss_max_sampled_kib", max_rss);
        self.set("operator_cpu_end_s", pid_cpu(pid));
        let rabbit = rabbit_memory(&self.mgmt).await;
        self.set("rabbit_end", rabbit);
        let api_after = apiserver_requests(&self.client).await;
        self.set("apiserver_requests_to_ready", requests_diff(self.api_before.as_ref(), api_ready.as_ref()));
        self.set("apiserver_requests_settle", requests_diff(api_ready.as_ref(), api_after.as_ref()));
        let log = String::from_utf8_lossy(&std::fs::read(&self.operator_log).unwrap_or_default()).into_owned();
        self.set("log_connections_opened", log.matches("opened the shared AMQP connection").count());
        self.set("log_warnings", log.lines().filter(|l| l.contains(" WARN ")).count());
        self.set("log_errors", log.lines().filter(|l| l.contains(" ERROR ")).count());
        Ok(())
    }

    async fn scrape(&mut self, label: &str) {
        let key = format!("metrics_{label}");
        let Some(text) = (match &self.operator {
            Some(o) => tokio::time::timeout(Duration::from_secs(10), o.metrics()).await.ok().flatten(),
            None => None,
        }) else {
            self.set(&key, json!({ "error": "the operator's /metrics did not answer" }));
            return;
        };
        let m: Vec<Sample> = prometheus::parse(&text);
        let name = "warren_operator_reconcile_duration_seconds";
        let count = prometheus::sum(&m, &format!("{name}_count"), &[]);
        let failures: Map<String, Value> = m
            .iter()
            .filter(|s| s.name == "warren_operator_reconcile_failures_total" && s.value != 0.0)
            .map(|s| (s.label("reason").unwrap_or("").to_owned(), json!(s.value)))
            .collect();
        let buckets: Map<String, Value> = m
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .map(|s| (s.label("le").unwrap_or("").to_owned(), json!(s.value)))
            .collect();
        let value = json!({
            "reconciles": prometheus::sum(&m, "warren_operator_reconciles_total", &[]),
            "failures": failures,
            "duration_count": count,
            "duration_mean": if count > 0.0 { Some(prometheus::sum(&m, &format!("{name}_sum"), &[]) / count) } else { None },
            "duration_p50": prometheus::histogram_quantile(&m, name, 0.5),
            "duration_p90": prometheus::histogram_quantile(&m, name, 0.9),
            "duration_p99": prometheus::histogram_quantile(&m, name, 0.99),
            "duration_buckets": buckets,
            "observer_polls": prometheus::sum(&m, "warren_operator_observer_polls_total", &[]),
            "observer_failures": prometheus::sum(&m, "warren_operator_observer_failures_total", &[]),
            "services": prometheus::sum(&m, "warren_operator_services", &[]),
        });
        self.set(&key, value);
    }

    // cleanup

    async fn cleanup(&mut self) {
        if let Some(task) = self.watch_task.take() {
            task.abort();
        }
        let t = Instant::now();
        if self.namespace.is_some() {
            let deleted = self.rpcservices.delete_collection(&DeleteParams::default(), &ListParams::default()).await;
            match deleted {
                Err(e) => say(format!("cleanup: deleting RpcServices: {e}")),
                Ok(_) if self.operator.as_mut().is_some_and(|o| o.is_running()) => {
                    // The operator removes its finalizer (deletionPolicy Retain: the broker is not touched).
                    let deadline = Instant::now() + Duration::from_secs_f64(self.args.cleanup_wait);
                    while Instant::now() < deadline {
                        match self.rpcservices.list_metadata(&ListParams::default()).await {
                            Ok(list) if list.items.is_empty() => break,
                            Ok(_) => {}
                            Err(e) => {
                                say(format!("cleanup: listing RpcServices: {e}"));
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    self.set("delete_all_seconds", round(t.elapsed().as_secs_f64(), 1));
                }
                Ok(_) => {}
            }
        }
        if let Some(mut operator) = self.operator.take() {
            tokio::task::block_in_place(|| operator.stop());
            self.operator_pid.store(0, Ordering::Relaxed);
        }
        if num(self.result.get("queues_created")) > 0.0 {
            // What the 2N idle queues cost the broker by themselves (no operator polling them any more).
            let idle = cpu_rate(self.rabbit_pid, 5.0).await;
            self.set("rabbit_cores_idle_with_queues", idle);
            if let Err(e) = self.measure_poll_cost(5).await {
                say(format!("measuring the management poll: {e:#}"));
            }
        }
        if let Some(namespace) = self.namespace.take() {
            let left = self.rpcservices.list_metadata(&ListParams::default()).await.map(|l| l.items);
            if let Ok(left) = &left
                && !left.is_empty()
            {
                say(format!("cleanup: removing the finalizer of {} RpcServices by hand", left.len()));
                let patch = json!({ "metadata": { "finalizers": null } });
                let api = &self.rpcservices;
                let results: Vec<anyhow::Result<()>> = futures::stream::iter(left.iter().map(|o| o.name_any()))
                    .map(|name| {
                        let patch = &patch;
                        async move {
                            match api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await {
                                Ok(_) | Err(kube::Error::Api(_)) => {}
                                Err(e) => return Err(e.into()),
                            }
                            match api.delete(&name, &DeleteParams::default()).await {
                                Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
                                Err(e) => Err(e.into()),
                            }
                        }
                    })
                    .buffer_unordered(8)
                    .collect()
                    .await;
                if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                    say(format!("cleanup: {e:#}"));
                }
            }
            // No garbage collector in the test environment: the namespace helper deletes the children, events,
            // Secret and the namespace, and finalizes it as the namespace controller would.
            if let Err(e) = namespace.cleanup().await {
                say(format!("cleanup: {e:#}"));
            }
        }
        if let Err(e) = self.delete_queues().await {
            say(format!("cleanup: deleting queues: {e:#}"));
        }
        say(format!("cleanup done in {:.0} s", t.elapsed().as_secs_f64()));
    }

    /// What one observer poll (the operator's management API request: `Management::queue_figures`) costs RabbitMQ
    /// now that the 2N queues exist: wall time and broker CPU per request, net of the broker's idle rate.
    async fn measure_poll_cost(&mut self, polls: usize) -> anyhow::Result<()> {
        let pid = self.rabbit_pid;
        let idle = num(self.result.get("rabbit_cores_idle_with_queues"));
        let cpu0 = pid.and_then(pid_cpu);
        let t0 = Instant::now();
        let mut walls = Vec::new();
        for _ in 0..polls {
            let t = Instant::now();
            self.mgmt.queue_figures(&self.vhost).await?;
            walls.push(t.elapsed().as_secs_f64());
        }
        let wall = t0.elapsed().as_secs_f64();
        let cpu1 = pid.and_then(pid_cpu);
        walls.sort_by(f64::total_cmp);
        self.set("management_poll_seconds", round(walls[walls.len() / 2], 3));
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            self.set("management_poll_broker_cpu_seconds", round(((b - a) - idle * wall).max(0.0) / polls as f64, 3));
        }
        Ok(())
    }

    async fn delete_queues(&self) -> anyhow::Result<()> {
        let queues = mgmt_get(&self.mgmt, &["queues", &self.vhost], Some(("columns", "name"))).await?;
        let prefix = format!("{}.", self.ns);
        let names: Vec<String> = queues
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q.get("name")?.as_str().filter(|n| n.starts_with(&prefix)).map(str::to_owned))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        say(format!("cleanup: deleting {} queues", names.len()));
        let mgmt = &self.mgmt;
        let vhost = self.vhost.as_str();
        let failures: Vec<String> = futures::stream::iter(names)
            .map(|name| async move {
                for attempt in 0..3 {
                    match mgmt.delete_queue(vhost, &name).await {
                        Ok(()) => return None,
                        Err(e) if attempt == 2 => return Some(format!("{name}: {e}")),
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
                None
            })
            .buffer_unordered(4)
            .filter_map(|e| async move { e })
            .collect()
            .await;
        if let Some(first) = failures.first() {
            bail!("{} queues not deleted, e.g. {first}", failures.len());
        }
        Ok(())
    }

    // report

    fn report(&mut self) -> anyhow::Result<()> {
        let samples = std::mem::take(&mut self.samples);
        self.set("samples", samples);
        let dir = self.args.results_dir.clone().unwrap_or_else(|| self.work.clone());
        std::fs::create_dir_all(&dir)?;
        let out = dir.join(format!("bench-operator-{}.json", self.ns));
        let r = Value::Object(self.result.clone());
        std::fs::write(&out, serde_json::to_string_pretty(&r)?)
            .with_context(|| format!("writing {}", out.display()))?;
        self.set("results_file", out.display().to_string());
        say(format!("results: {}; operator log: {}", out.display(), self.operator_log.display()));
        let r = Value::Object(self.result.clone());
        println!("{}", summary(&r));
        if !self.args.no_docs {
            write_docs(&r, &self.args.docs)?;
            say(format!("wrote the Operator section of {}", self.args.docs.display()));
        }
        Ok(())
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "@%+=:,./-_".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\"'\"'"))
    }
}

// --- the summary and the docs ---------------------------------------------------------------------------------------

fn fmt_s(x: Option<&Value>) -> String {
    match opt(x) {
        None => "—".into(),
        Some(x) => format!("{x:.1} s"),
    }
}

fn fmt_cpu(c: Option<&Value>) -> String {
    let Some(c) = c.filter(|c| c.as_object().is_some_and(|m| !m.is_empty())) else { return "—".into() };
    let parts: Vec<String> = ["operator", "kube-apiserver", "etcd", "rabbitmq", "bench", "other"]
        .iter()
        .filter_map(|k| Some(format!("{k} {:.1}", c.get(*k)?.as_f64()?)))
        .collect();
    let available = num(c.get("wall_seconds")) * num(c.get("cores"));
    let busy = num(c.get("machine_busy_seconds"));
    format!(
        "{busy:.1} CPU-s busy of {available:.0} available ({:.0} %): {}",
        100.0 * busy / available.max(0.1),
        parts.join(", ")
    )
}

fn fmt_requests(reqs: Option<&Value>) -> String {
    let Some(reqs) = reqs.and_then(Value::as_object).filter(|m| !m.is_empty()) else { return "—".into() };
    let total: f64 = reqs.values().map(|v| num(v.get("count"))).sum();
    let parts: Vec<String> =
        reqs.iter().map(|(k, v)| format!("{k} {} ({:.0} ms)", py(v.get("count")), num(v.get("mean_ms")))).collect();
    format!("{total}: {}", parts.join(", "))
}

fn summary(r: &Value) -> String {
    let empty = json!({});
    let m = get(r, "metrics_at_ready").unwrap_or(&empty);
    let ms = get(r, "metrics_after_settle").filter(|v| v.as_object().is_some_and(|o| !o.is_empty()));
    let rb0 = get(r, "rabbit_before").unwrap_or(&empty);
    let rb1 = get(r, "rabbit_at_ready").unwrap_or(&empty);
    let tot = |rb: &Value, k: &str| num(rb.get("total").and_then(|t| t.get(k)));
    let ms_of = |v: &Value, k: &str| num(v.get(k)) * 1000.0;
    let breakdown = rb1.get("breakdown").cloned().unwrap_or_default();
    let big: Vec<String> = BREAKDOWN
        .iter()
        .filter_map(|k| Some((k, breakdown.get(*k)?.as_f64()?)))
        .filter(|(_, v)| *v > (1u64 << 20) as f64)
        .map(|(k, v)| format!("{k} {:.0}", mib_bytes(v)))
        .collect();
    let queue_types: Vec<String> = r
        .get("queue_types")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let n = py(r.get("n"));
    let mut lines = vec![
        format!("N={n} queue type={} machine: {}", py(r.get("queue_type")), py(r.get("machine"))),
        format!(
            "  creates: {}; finalizer on all: {}",
            fmt_s(r.get("create_seconds")),
            fmt_s(r.get("finalized_all_seconds"))
        ),
        format!(
            "  QueueReady=True: {}/{n}; all at {} ({} by the conditions' timestamps); 50 % at {}, 90 % at {}; per \
             object (create → QueueReady) p50 {}, max {}",
            py(r.get("queue_ready")),
            fmt_s(r.get("ready_seconds")),
            fmt_s(r.get("ready_seconds_conditions")),
            fmt_s(r.get("ready_p50_seconds")),
            fmt_s(r.get("ready_p90_seconds")),
            fmt_s(r.get("object_latency_p50_seconds")),
            fmt_s(r.get("object_latency_max_seconds")),
        ),
        format!(
            "  operator RSS: idle {:.1} MiB, at ready {:.1} MiB, peak (VmHWM) {:.1} MiB",
            mib(num(r.get("operator_idle_rss_kib"))),
            mib(num(r.get("operator_rss_at_ready_kib"))),
            mib(num(r.get("operator_hwm_kib")))
        ),
        format!("  CPU until all ready: {}", fmt_cpu(r.get("cpu_to_ready"))),
        format!(
            "  AMQP: {} socket(s) to the broker, {} connection(s) on the broker {}, opened {} time(s); channels open \
             at ready {}",
            py(r.get("operator_amqp_sockets")),
            py(r.get("broker_connections_of_operator")),
            py(r.get("broker_connection_names")),
            py(r.get("log_connections_opened")),
            py(r.get("broker_channels_of_operator"))
        ),
        format!("  queues: {} ({})", py(r.get("queues_created")), queue_types.join(", ")),
        format!(
            "  RabbitMQ mem_used: {:.0} MiB before → {:.0} MiB at ready (erlang-allocated {:.0} → {:.0} MiB; limit \
             {:.0} MiB); at ready (MiB): {}",
            mib_bytes(num(rb0.get("mem_used"))),
            mib_bytes(num(rb1.get("mem_used"))),
            mib_bytes(tot(rb0, "erlang")),
            mib_bytes(tot(rb1, "erlang")),
            mib_bytes(num(rb1.get("mem_limit"))),
            big.join(", ")
        ),
        format!(
            "  reconciles to ready: {:.0} (failures {}), duration mean {:.0} ms, p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} \
             ms; management polls {:.0}",
            num(m.get("reconciles")),
            py(m.get("failures")),
            ms_of(m, "duration_mean"),
            ms_of(m, "duration_p50"),
            ms_of(m, "duration_p90"),
            ms_of(m, "duration_p99"),
            num(m.get("observer_polls"))
        ),
        format!(
            "  API server requests to ready (count, mean server latency): {}",
            fmt_requests(r.get("apiserver_requests_to_ready"))
        ),
    ];
    if let Some(ms) = ms {
        lines.push(format!(
            "  the next {:.0} s: reconciles +{:.0}, management polls +{:.0}, API requests {}; CPU {}",
            num(r.get("settle_seconds")),
            num(ms.get("reconciles")) - num(m.get("reconciles")),
            num(ms.get("observer_polls")) - num(m.get("observer_polls")),
            fmt_requests(r.get("apiserver_requests_settle")),
            fmt_cpu(r.get("cpu_settle"))
        ));
    }
    lines.push(format!(
        "  an RpcService at ready is {} bytes of JSON ({} of them managedFields); one observer poll of the management \
         API takes {} s and {} CPU-s of the broker",
        py(r.get("rpcservice_json_bytes")),
        py(r.get("rpcservice_managed_fields_bytes")),
        py(r.get("management_poll_seconds")),
        py(r.get("management_poll_broker_cpu_seconds"))
    ));
    lines.push(format!(
        "  RabbitMQ CPU when idle: {} cores before, {} cores with the {} queues (operator stopped)",
        py(r.get("rabbit_cores_idle_before")),
        py(r.get("rabbit_cores_idle_with_queues")),
        py(r.get("queues_created"))
    ));
    if get(r, "delete_all_seconds").is_some() {
        lines.push(format!(
            "  deleting all {n} (the operator removes its finalizers): {} s",
            py(r.get("delete_all_seconds"))
        ));
    }
    lines.push(format!(
        "  operator log: {} warnings, {} errors; watch events {}",
        py(r.get("log_warnings")),
        py(r.get("log_errors")),
        py(r.get("watch_events"))
    ));
    lines.join("\n")
}

/// `| N | type | flags | quiet|shared ...` of an existing row: its key.
fn row_key(line: &str) -> Option<(u64, String, String, String)> {
    let cells: Vec<&str> = line.strip_prefix("| ")?.splitn(5, " | ").collect();
    if cells.len() < 4 {
        return None;
    }
    let n = cells[0].parse().ok().filter(|_| cells[0].chars().all(|c| c.is_ascii_digit()))?;
    let queue_type = cells[1];
    if queue_type.is_empty() || !queue_type.chars().all(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let flags = cells[2];
    if flags.contains('|') {
        return None;
    }
    let state = ["quiet", "shared"].into_iter().find(|s| cells[3].starts_with(s))?;
    Some((n, queue_type.to_owned(), flags.trim().to_owned(), state.to_owned()))
}

/// The "## Operator" section of `text`: its byte range, up to the next "## " heading or the end.
fn operator_section(text: &str) -> Option<(usize, usize)> {
    let start = if text.starts_with("## Operator\n") { 0 } else { text.find("\n## Operator\n")? + 1 };
    let body = start + "## Operator\n".len();
    let end = text[body..].find("\n## ").map_or(text.len(), |i| body + i + 1);
    Some((start, end))
}

/// Rewrites the "## Operator" section: one table row per (N, queue type, operator flags, machine state), the latest
/// run of each kept, so a quorum and a classic run (or a tuned one) stand side by side. Hand-written analysis under
/// "### Notes" survives a re-run; the table and the method above it are regenerated.
fn write_docs(r: &Value, path: &Path) -> anyhow::Result<()> {
    let mut text = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".into());
    let old = operator_section(&text).map(|(a, b)| text[a..b].to_owned());
    let mut rows: BTreeMap<(u64, String, String, String), String> = BTreeMap::new();
    for line in old.iter().flat_map(|s| s.lines()) {
        if let Some(key) = row_key(line) {
            rows.insert(key, line.to_owned());
        }
    }
    let empty = json!({});
    let m = get(r, "metrics_at_ready").unwrap_or(&empty);
    let rb0 = get(r, "rabbit_before").unwrap_or(&empty);
    let rb1 = get(r, "rabbit_at_ready").unwrap_or(&empty);
    let n = r.get("n").and_then(Value::as_u64).unwrap_or(0);
    let ready = if r.get("all_ready").and_then(Value::as_bool).unwrap_or(false) {
        fmt_s(r.get("ready_seconds"))
    } else {
        format!("**not reached**: {}/{n} after {:.0} s", py(r.get("queue_ready")), num(r.get("timeout")))
    };
    let conns =
        format!("{} (opened {}×)", py(r.get("broker_connections_of_operator")), py(r.get("log_connections_opened")));
    let failures: f64 = m
        .get("failures")
        .and_then(Value::as_object)
        .map_or(0.0, |f| f.values().map(|v| num(Some(v))).sum::<f64>() + 0.0); // an empty float sum is -0
    let args: Vec<String> = r
        .get("operator_args")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let flags = if args.is_empty() { "defaults".to_owned() } else { args.join(" ") };
    let c = get(r, "cpu_to_ready").unwrap_or(&empty);
    let cpu = ["operator", "kube-apiserver", "etcd", "rabbitmq", "other"]
        .iter()
        .map(|k| format!("{:.0}", num(c.get(*k))))
        .collect::<Vec<_>>()
        .join(" / ");
    let wall = c.get("wall_seconds").and_then(Value::as_f64).unwrap_or(1.0);
    let cores = c.get("cores").and_then(Value::as_f64).unwrap_or(1.0);
    let other = num(c.get("other")) / (wall * cores).max(0.1);
    let machine_state = if other < 0.10 { "quiet" } else { "shared" };
    let queue_type = r.get("queue_type").and_then(Value::as_str).unwrap_or("").to_owned();
    let date = r
        .get("date")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| chrono::Local::now().date_naive().to_string());
    rows.insert(
        (n, queue_type.clone(), flags.clone(), machine_state.to_owned()),
        format!(
            "| {n} | {queue_type} | {flags} | {machine_state}: other work {:.0} % | {ready} | {} | {:.1} MiB | {conns} | \
             {:.0} → {:.0} MiB | {:.0} ({failures:.0} failed) | {:.0} / {:.0} ms | {:.0} | {cpu} | {} {date} |",
            100.0 * other,
            fmt_s(r.get("ready_p50_seconds")),
            mib(num(r.get("operator_hwm_kib"))),
            mib_bytes(num(rb0.get("mem_used"))),
            mib_bytes(num(rb1.get("mem_used"))),
            num(m.get("reconciles")),
            num(m.get("duration_p50")) * 1000.0,
            num(m.get("duration_p99")) * 1000.0,
            num(m.get("observer_polls")),
            r.get("git").and_then(Value::as_str).unwrap_or(""),
        ),
    );
    let mut keys: Vec<_> = rows.keys().cloned().collect();
    keys.sort_by(|a, b| {
        let key = |k: &(u64, String, String, String)| {
            (std::cmp::Reverse(k.0), k.1 != "quorum", k.2 != "defaults", k.2.clone(), k.3.clone())
        };
        key(a).cmp(&key(b))
    });
    let mut lines: Vec<String> = vec![
        "## Operator".into(),
        String::new(),
        "<!-- generated by scripts/bench-operator (tests/src/bin/bench-operator.rs): change the program, not this section -->".into(),
        String::new(),
        format!(
            "Machine: {}. RabbitMQ {} (one node, Debian package) and a real kube-apiserver v1.34 + etcd on the same \
             two cores (`scripts/env up`), shared with other work.",
            py(r.get("machine")),
            r.get("rabbitmq_version").and_then(Value::as_str).unwrap_or("")
        ),
        String::new(),
        "N RpcServices (only `spec.broker.secretRef`, so the schema defaults apply — two queues each, the request \
         queue and its `.dead` queue — and `queue.type` as in the table) are created at once by 16 concurrent requests; \
         the clock starts at the first create. *All QueueReady*: when a watch on the namespace has seen every one \
         with condition QueueReady=True; *50 %*: half of them. *Peak RSS*: the operator's VmHWM at the end. \
         *Connections*: the operator's AMQP connections on the broker (matched by its sockets' ports) and how often \
         it opened one. *RabbitMQ memory*: the node's `mem_used` (RSS) before the creates and at all-ready. \
         *Reconciles*: `warren_operator_reconciles_total` until all-ready; *p50 / p99* from \
         `warren_operator_reconcile_duration_seconds`; *management polls*: `warren_operator_observer_polls_total` \
         (one request per broker per poll interval, whatever N). *CPU-s to ready*: user + system time from the first \
         create to all-ready of the operator / kube-apiserver / etcd / RabbitMQ / everything else on the machine \
         (other work sharing the cores; the two cores offer 2 CPU-s per second and were saturated in every run). \
         *Machine*: the share of the machine's CPU that other work took during the run — *quiet* under 10 %, \
         else *shared*; a run on a shared machine measures the contention as much as the operator."
            .into(),
        String::new(),
        "| N | queue type | operator flags | machine | all QueueReady | 50 % QueueReady | operator peak RSS | \
         connections | RabbitMQ memory | reconciles | reconcile p50 / p99 | management polls | CPU-s to ready: \
         operator / apiserver / etcd / RabbitMQ / other work | commit, date |"
            .into(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|".into(),
    ];
    lines.extend(keys.iter().map(|k| rows[k].clone()));
    lines.extend([
        String::new(),
        "Command: `scripts/bench-operator -n N [--queue-type classic] [--operator-arg=--concurrency=64]` (a wrapper \
         of `cargo run --release -p warren-tests --bin bench-operator --`; environment from \
         `eval \"$(scripts/env up)\"`; builds the release operator; cleans up its namespace, objects and queues). The \
         operator runs as `warren-operator run --namespace NS --leader-election false --metrics-addr \
         127.0.0.1:PORT` plus the flags in the table (defaults: 16 concurrent reconciles, 5 s poll interval). The \
         program prints more (CPU per process, API server requests by type with their mean latency, RabbitMQ's \
         memory breakdown) and keeps it in a JSON file."
            .into(),
        String::new(),
    ]);
    if let Some(old) = &old
        && let Some(at) = old.find("\n### Notes\n").map(|i| i + 1).or(old.starts_with("### Notes\n").then_some(0))
    {
        lines.push(old[at..].trim_end_matches('\n').to_owned());
        lines.push(String::new());
    }
    let section = lines.join("\n");
    text = match operator_section(&text) {
        Some((a, b)) => format!("{}{section}\n{}", &text[..a], &text[b..]),
        None => format!("{}\n\n{section}\n", text.trim_end_matches('\n')),
    };
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

// --- main -----------------------------------------------------------------------------------------------------------

/// KUBECONFIG unset: `scripts/env up`, and its exports taken over. Before any thread exists (set_var).
fn ensure_env() -> anyhow::Result<()> {
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return Ok(());
    }
    say("KUBECONFIG is not set: running scripts/env up");
    let out = Command::new(root().join("scripts").join("env")).arg("up").stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("scripts/env up failed ({})", out.status);
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((name, value)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) else { continue };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        // The first word, unquoted (`'...'` as scripts/env writes values).
        let value = value.split_whitespace().next().unwrap_or("").trim_matches('\'').trim_matches('"');
        let value = if name == "PATH" {
            value.replace("$PATH", &std::env::var("PATH").unwrap_or_default())
        } else {
            value.to_owned()
        };
        // SAFETY: single-threaded still: main calls this before it starts the runtime.
        unsafe { std::env::set_var(name, value) };
    }
    Ok(())
}

async fn bench(args: Args) -> ExitCode {
    let mut bench = match Bench::new(args.clone()).await {
        Ok(bench) => bench,
        Err(e) => {
            say(format!("{e:#}"));
            return ExitCode::FAILURE;
        }
    };
    bench.set("timeout", args.timeout);
    match bench.mgmt.overview().await {
        Ok(overview) => bench.set("rabbitmq_version", overview.get("rabbitmq_version")),
        Err(e) => {
            say(format!("the management API does not answer: {e}"));
            return ExitCode::FAILURE;
        }
    }
    // SIGTERM (e.g. `timeout`) cleans up like Ctrl-C.
    let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        say("cannot handle SIGTERM");
        return ExitCode::FAILURE;
    };
    let outcome = tokio::select! {
        result = bench.run() => Some(result),
        _ = tokio::signal::ctrl_c() => None,
        _ = sigterm.recv() => None,
    };
    let ok = match outcome {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            say(format!("{e:#}"));
            false
        }
        None => {
            say("interrupted; cleaning up");
            false
        }
    };
    // A second Ctrl-C or SIGTERM leaves the cleanup unfinished (but never the operator running).
    let operator_pid = bench.operator_pid.clone();
    let second = tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = sigterm.recv() => {},
        }
        let pid = operator_pid.load(Ordering::Relaxed);
        if pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        say("interrupted again: the cleanup is unfinished");
        std::process::exit(130);
    });
    bench.cleanup().await;
    second.abort();
    if ok && let Err(e) = bench.report() {
        say(format!("report: {e:#}"));
        return ExitCode::FAILURE;
    }
    if ok && bench.result.get("all_ready").and_then(Value::as_bool) == Some(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.report.is_empty() {
        for path in &args.report {
            let result = std::fs::read_to_string(path)
                .map_err(anyhow::Error::from)
                .and_then(|text| Ok(serde_json::from_str::<Value>(&text)?));
            let r = match result {
                Ok(r) => r,
                Err(e) => {
                    say(format!("{}: {e:#}", path.display()));
                    return ExitCode::FAILURE;
                }
            };
            println!("{}", summary(&r));
            if !args.no_docs
                && let Err(e) = write_docs(&r, &args.docs)
            {
                say(format!("{e:#}"));
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = ensure_env() {
        say(format!("{e:#}"));
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            say(format!("tokio runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(bench(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_formats() {
        assert_eq!(py(Some(&json!(null))), "None");
        assert_eq!(py(Some(&json!(12.0))), "12.0");
        assert_eq!(py(Some(&json!(3))), "3");
        assert_eq!(py(Some(&json!(["warren-operator"]))), "['warren-operator']");
        assert_eq!(py(Some(&json!({"broker": 2.0}))), "{'broker': 2.0}");
        assert_eq!(python_json_len(&json!({"a": [1, 2]})), r#"{"a": [1, 2]}"#.len());
    }

    #[test]
    fn the_docs_section_keeps_other_rows_and_the_notes() {
        let dir = std::env::temp_dir().join(format!("bench-operator-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("benchmarks.md");
        std::fs::write(
            &path,
            "# Benchmarks\n\n## RPC\n\nrpc text\n\n## Operator\n\nold method\n\n| N | ... |\n|---|\n\
             | 1000 | quorum | defaults | quiet: other work 5 % | 45.7 s | old |\n\
             | 1000 | classic | defaults | shared: other work 46 % | 147.8 s | old |\n\n\
             ### Notes\n\nkept analysis\n\n## Later\n\nlater text\n",
        )
        .unwrap();
        let r = json!({
            "n": 1000, "queue_type": "quorum", "machine": "2 cores", "all_ready": true, "ready_seconds": 30.04,
            "operator_args": [], "cpu_to_ready": {"wall_seconds": 30.0, "cores": 2, "other": 1.0},
            "git": "abc", "date": "2026-12-03", "broker_connections_of_operator": 1, "log_connections_opened": 1,
        });
        write_docs(&r, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("# Benchmarks\n\n## RPC\n\nrpc text\n\n## Operator\n"), "{text}");
        assert!(text.contains("| 1000 | quorum | defaults | quiet: other work 2 % | 30.0 s |"), "{text}");
        assert!(!text.contains("45.7 s"), "{text}");
        assert!(text.contains("| 1000 | classic | defaults | shared: other work 46 % | 147.8 s | old |"), "{text}");
        assert!(text.contains("\n### Notes\n\nkept analysis\n\n## Later\n\nlater text\n"), "{text}");
        assert!(!text.contains("old method"), "{text}");
    }
}
