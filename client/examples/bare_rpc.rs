//! The baseline of scripts/bench-rpc: request/reply over RabbitMQ with plain lapin and no warren code.
//!
//!   bare_rpc responder --queue Q [--prefetch 64] [--queue-type quorum|classic] [--confirm]
//!                                                          echoes each request to its reply_to, then acks it
//!                                                          (with --confirm: once the broker confirmed the reply)
//!   bare_rpc caller --queue Q [--concurrency 64] [--duration 10s] [--warmup 1s] [--shared-channel]
//!
//! The caller publishes to the default exchange with `reply_to = amq.rabbitmq.reply-to` and prints one JSON object
//! (calls/s and latency percentiles in µs). By default each concurrent caller owns a channel (its own direct
//! reply-to) and runs a plain publish → wait-for-reply loop; `--shared-channel` multiplexes every caller over one
//! channel by correlation id instead, the way warren-client does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;
use warren_client::endpoint::{BROKER_URI_ENV, LOCAL_BROKER_URI};

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[derive(Parser)]
struct Cli {
    #[arg(long, env = BROKER_URI_ENV, default_value = LOCAL_BROKER_URI)]
    broker_uri: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Responder {
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 64)]
        prefetch: u16,
        /// The queue type it declares (warren services use quorum queues).
        #[arg(long, default_value = "quorum")]
        queue_type: String,
        /// Ack a request only after the broker confirmed its reply (publisher confirms): warren-worker's guarantee.
        #[arg(long)]
        confirm: bool,
    },
    Caller {
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        #[arg(long, default_value = "[1,2]")]
        body: String,
        #[arg(long)]
        shared_channel: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let connection = Connection::connect(&cli.broker_uri, ConnectionProperties::default()).await?;
    match cli.mode {
        Mode::Responder { queue, prefetch, queue_type, confirm } => {
            respond(&connection, &queue, prefetch, &queue_type, confirm).await
        }
        Mode::Caller { queue, concurrency, duration, warmup, body, shared_channel } => {
            let started = Instant::now();
            let window = (started + warmup, started + warmup + duration);
            let cpu_at_start = tokio::spawn(async move {
                tokio::time::sleep_until(window.0.into()).await;
                process_cpu_time()
            });
            let tallies = if shared_channel {
                call_shared(&connection, &queue, concurrency, window, body.into_bytes()).await?
            } else {
                call_per_channel(&connection, &queue, concurrency, window, body.into_bytes()).await?
            };
            let mut latency = new_histogram();
            let mut last = window.0;
            for (h, done) in tallies {
                latency.add(&h)?;
                last = last.max(done);
            }
            let elapsed = last.saturating_duration_since(window.0).as_secs_f64().max(1e-6);
            let cpu_us = match (cpu_at_start.await?, process_cpu_time()) {
                (Some(start), Some(end)) => Some(end.saturating_sub(start).as_secs_f64() * 1e6),
                _ => None,
            };
            let us = |q: f64| (latency.value_at_quantile(q) as f64 / 100.0).round() / 10.0;
            let report = serde_json::json!({
                "concurrency": concurrency,
                "shared_channel": shared_channel,
                "calls": latency.len(),
                "elapsed_s": elapsed,
                "calls_per_sec": (latency.len() as f64 / elapsed * 10.0).round() / 10.0,
                "latency_us": { "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "max": us(1.0) },
                "client_cpu_us_per_call": cpu_us.map(|cpu| (cpu / latency.len().max(1) as f64 * 10.0).round() / 10.0),
            });
            println!("{report}");
            // The per-caller channels may still be closing; the report is out, so a close error changes nothing.
            let _ = connection.close(200, "done".into()).await;
            Ok(())
        }
    }
}

/// CPU time of this process, all threads (user + system), from /proc/self/stat in 1/100 s ticks.
fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds")
}

/// Echo responder: manual acks, `prefetch` requests in flight.
async fn respond(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    queue_type: &str,
    confirm: bool,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    if confirm {
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from(queue_type)));
    channel.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(queue.into(), "bare".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    eprintln!("consuming {queue}");
    consumer
        .for_each_concurrent(usize::from(prefetch), |delivery| {
            let channel = channel.clone();
            async move {
                let Ok(delivery) = delivery else { return };
                if let Some(reply_to) = delivery.properties.reply_to() {
                    let mut props = BasicProperties::default().with_content_type("application/json".into());
                    if let Some(id) = delivery.properties.correlation_id() {
                        props = props.with_correlation_id(id.clone());
                    }
                    let published = channel
                        .basic_publish(
                            "".into(),
                            reply_to.clone(),
                            BasicPublishOptions::default(),
                            &delivery.data,
                            props,
                        )
                        .await;
                    if let (true, Ok(confirmation)) = (confirm, published) {
                        let _ = confirmation.await;
                    }
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        })
        .await;
    Ok(())
}

type Tally = (Histogram<u64>, Instant);

fn request(id: u64) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_reply_to(REPLY_TO.into())
        .with_correlation_id(id.to_string().into())
}

/// Each caller on its own channel: publish, wait for the one reply, repeat.
async fn call_per_channel(
    connection: &Connection,
    queue: &str,
    concurrency: usize,
    (from, until): (Instant, Instant),
    body: Vec<u8>,
) -> anyhow::Result<Vec<Tally>> {
    let body = Arc::new(body);
    let mut callers = Vec::new();
    for _ in 0..concurrency {
        let channel = connection.create_channel().await?;
        let mut replies = channel
            .basic_consume(
                REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let (queue, body) = (queue.to_owned(), body.clone());
        callers.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let mut last = from;
            let mut id = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                id += 1;
                channel
                    .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, request(id))
                    .await?;
                let Some(reply) = replies.next().await else { anyhow::bail!("reply consumer ended") };
                reply?;
                let done = Instant::now();
                if sent >= from {
                    latency.record(done.duration_since(sent).as_nanos() as u64)?;
                    last = done;
                }
            }
            anyhow::Ok((latency, last))
        }));
    }
    let mut tallies = Vec::new();
    for caller in callers {
        tallies.push(caller.await??);
    }
    Ok(tallies)
}

/// Every caller on one channel, replies matched to callers by correlation id.
async fn call_shared(
    connection: &Connection,
    queue: &str,
    concurrency: usize,
    (from, until): (Instant, Instant),
    body: Vec<u8>,
) -> anyhow::Result<Vec<Tally>> {
    let channel = connection.create_channel().await?;
    let mut replies = channel
        .basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
    let router = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(reply)) = replies.next().await {
                let id = reply.properties.correlation_id().as_ref().and_then(|id| id.as_str().parse::<u64>().ok());
                if let Some(tx) = id.and_then(|id| waiting.lock().unwrap().remove(&id)) {
                    let _ = tx.send(());
                }
            }
        })
    };
    let body = Arc::new(body);
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..concurrency {
        let (channel, queue, body, waiting, next_id) =
            (channel.clone(), queue.to_owned(), body.clone(), waiting.clone(), next_id.clone());
        callers.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let mut last = from;
            loop {
                let sent = Instant::now();
                if sent >= until {
                    break;
                }
                let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                waiting.lock().unwrap().insert(id, tx);
                channel
                    .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, request(id))
                    .await?;
                rx.await?;
                let done = Instant::now();
                if sent >= from {
                    latency.record(done.duration_since(sent).as_nanos() as u64)?;
                    last = done;
                }
            }
            anyhow::Ok((latency, last))
        }));
    }
    let mut tallies = Vec::new();
    for caller in callers {
        tallies.push(caller.await??);
    }
    router.abort();
    Ok(tallies)
}
