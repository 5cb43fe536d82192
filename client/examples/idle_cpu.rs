//! What a `Client` costs while its calls wait: keeps CALLS calls waiting on a queue nobody consumes for SECONDS and
//! prints the process's CPU time over that window (issue 13: the caller must cost nothing while calls wait).
//!
//!     cargo run --release -p warren-client --example idle_cpu -- [CALLS] [SECONDS]
//!
//! Prints one JSON object: CPU-ms per second of waiting (on-CPU time of every thread, from
//! /proc/self/task/*/schedstat, in ns) and the voluntary context switches per second (wake-ups). Declares a queue
//! of its own and deletes it after. WARREN_BROKER_URI as for the CLI.

use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use warren_client::Client;
use warren_client::endpoint::{BROKER_URI_ENV, LOCAL_BROKER_URI};
use warren_client::topology::{QueueOptions, dead_letter_queue_name, declare_service_queues};

/// On-CPU nanoseconds of every thread of this process so far, and its voluntary context switches.
fn cpu_ns_and_switches() -> (u64, u64) {
    let mut ns = 0;
    let mut switches = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += stat.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            switches += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (ns, switches)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let calls: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let seconds: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5.0);
    let uri = std::env::var(BROKER_URI_ENV).unwrap_or_else(|_| LOCAL_BROKER_URI.to_owned());

    let queue = format!("bench.idle-cpu.{}", uuid::Uuid::new_v4().simple());
    let admin = Connection::connect(&uri, ConnectionProperties::default()).await?;
    let channel = admin.create_channel().await?;
    declare_service_queues(&channel, &queue, &QueueOptions::default()).await?;

    let client = Client::connect(&uri).await?;
    let timeout = Duration::from_secs_f64(seconds * 2.0 + 2.0);
    let waiting: Vec<_> = (0..calls)
        .map(|i| {
            let client = client.clone();
            let queue = queue.clone();
            tokio::spawn(async move { client.call(&queue, Some("echo"), json!(i), timeout).await })
        })
        .collect();
    // Every call published and settled (confirmed) before the window opens.
    let settle = Instant::now() + Duration::from_secs(2);
    while client.pending_calls() < calls && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pending_before = client.pending_calls();

    let (ns0, sw0) = cpu_ns_and_switches();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let (ns1, sw1) = cpu_ns_and_switches();
    let window = started.elapsed().as_secs_f64();
    let pending_after = client.pending_calls();

    for call in &waiting {
        call.abort();
    }
    let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = channel.queue_delete(dead_letter_queue_name(&queue).as_str().into(), QueueDeleteOptions::default()).await;
    let _ = admin.close(200, "done".into()).await;
    println!(
        "{}",
        json!({
            "calls_waiting": [pending_before, pending_after],
            "window_s": window,
            "cpu_ms_per_s": (ns1 - ns0) as f64 / 1e6 / window,
            "wakeups_per_s": (sw1 - sw0) as f64 / window,
        })
    );
    Ok(())
}
