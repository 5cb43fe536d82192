//! `warren-worker`: serve a queue with the built-in handlers or an HTTP backend.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use warren_worker::cli::Args;
use warren_worker::{Metrics, server, signal};

// Requests allocate and free many short-lived buffers across the runtime and lapin's I/O threads; glibc's malloc
// and free were a quarter of the worker's instructions per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    // Logs to stderr (RUST_LOG, default info); traces over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry = warren_client::telemetry::init("warren-worker", "info");
    // One thread is plenty for I/O-bound handlers and keeps the idle footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::with_max_method_labels(args.max_method_labels));
    let addr = server::serve(args.metrics_addr, metrics.clone())
        .await
        .with_context(|| format!("failed to listen on {}", args.metrics_addr))?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    let handlers = args.handlers()?;
    let worker = args.worker(handlers)?.metrics(metrics);
    worker.run(signal::shutdown_signal_with_force_exit()).await?;
    Ok(())
}
