use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use warren_operator::context::{Context, OperatorConfig};
use warren_operator::metrics::Metrics;
use warren_operator::observer::Observer;
use warren_operator::{controller, http, leader};

/// warren's Kubernetes operator.
#[derive(Parser)]
#[command(name = "warren-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the `Run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print the RpcService CRD as YAML (what crds/rpcservice.yaml holds).
    Crd,
    /// Run the operator: reconcile RpcServices and autoscale their workers.
    Run(RunArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The worker image for RpcServices that name none.
    #[arg(long, env = "WARREN_WORKER_IMAGE", default_value_t = OperatorConfig::default().worker_image)]
    worker_image: String,
    /// The broker Secret (in each RpcService's namespace) for RpcServices that name none.
    #[arg(long, env = "WARREN_DEFAULT_BROKER_SECRET")]
    default_broker_secret: Option<String>,
    /// How often queue figures are read from the management API.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// How often each autoscaled service's backlog is read between polls with a passive `queue.declare` on the
    /// operator's AMQP connection (one per service per round); 0 turns the probes off.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    probe_interval: Duration,
    /// How long deleting an RpcService with `deletionPolicy: Delete` retries on a broker that does not answer
    /// or refuses, before it lets the object go and reports the queues it left behind.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    cleanup_timeout: Duration,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "WARREN_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Reconciles run at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Compete for a Lease so that only one replica reconciles.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// The Lease's namespace (default: $POD_NAMESPACE, or `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// The Lease's name.
    #[arg(long, default_value = "warren-operator")]
    lease_name: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", warren_operator::crd_yaml()),
        Command::Run(args) => {
            // Logs (RUST_LOG, default info,kube=warn); reconcile spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
            let _telemetry = warren_client::telemetry::init("warren-operator", "info,kube=warn");
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run(args))?;
        }
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(http::serve(args.metrics_addr, http::Health { metrics: metrics.clone(), ready: ready.clone() }));

    controller::wait_for_crd(client.clone()).await?;
    let mut leadership = if args.leader_election {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| format!("warren-operator-{}", std::process::id()));
        let l = leader::Leadership::campaign(client.clone(), &args.lease_namespace, &args.lease_name, identity).await?;
        Some(l)
    } else {
        None
    };
    ready.store(true, Ordering::Relaxed);
    if let Some(l) = leadership.as_mut() {
        tracing::info!("waiting for the leader lease {}/{}", args.lease_namespace, args.lease_name);
        l.acquired().await;
    }
    tracing::info!("leading: reconciling RpcServices");
    metrics.leader.set(1);

    let (cache, cache_writer) = kube::runtime::reflector::store();
    let (trigger, triggers) = futures::channel::mpsc::unbounded();
    let observer = Arc::new(Observer::new(cache, trigger, metrics.clone()));
    let config = OperatorConfig {
        worker_image: args.worker_image,
        default_broker_secret: args.default_broker_secret,
        poll_interval: args.poll_interval,
        cleanup_timeout: args.cleanup_timeout,
    };
    let polls = tokio::spawn(observer.clone().run(config.poll_interval));
    let probes =
        (!args.probe_interval.is_zero()).then(|| tokio::spawn(observer.clone().run_probes(args.probe_interval)));
    let ctx = Arc::new(Context::new(client, config, observer, metrics));
    let lost = leadership.as_ref().map(|l| l.lost());
    let shutdown = async move {
        let signal = shutdown_signal();
        match lost {
            Some(lost) => tokio::select! { _ = signal => {}, _ = lost => tracing::warn!("lost the leader lease") },
            None => signal.await,
        }
    };
    controller::run(ctx, args.namespace, args.concurrency, cache_writer, triggers, shutdown).await;
    polls.abort();
    if let Some(probes) = probes {
        probes.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
