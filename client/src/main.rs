//! `warren`: call a warren service, or drive load against one, from the command line.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use warren_client::bench::{self, BenchSpec};
use warren_client::endpoint::{BROKER_URI_ENV, LOCAL_BROKER_URI};
use warren_client::{CallError, Client, ErrorKind};

/// Call warren RPC services over RabbitMQ.
#[derive(Parser)]
#[command(name = "warren", version, after_help = EXIT_CODES)]
struct Cli {
    /// AMQP URI of the broker (its password is never printed); several nodes of a cluster as
    /// amqp://user:pass@host1:5672,host2:5672/%2f, tried from a random one on.
    #[arg(long, env = BROKER_URI_ENV, hide_env_values = true, default_value = LOCAL_BROKER_URI, global = true)]
    broker_uri: String,
    /// How long connecting to one broker node may take (e.g. 500ms, 10s).
    #[arg(long, env = "WARREN_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, global = true)]
    connect_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Call METHOD on the service at QUEUE and print the result as JSON.
    Call {
        #[command(flatten)]
        target: Target,
        /// How long to wait for the reply (e.g. 500ms, 5s).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Send a one-way call (no reply); succeeds once the broker has taken it.
    Notify {
        #[command(flatten)]
        target: Target,
    },
    /// Drive load against METHOD and report throughput and latency.
    Bench {
        #[command(flatten)]
        target: Target,
        /// Calls in flight at most.
        #[arg(short, long, default_value_t = 1)]
        concurrency: usize,
        /// How long to measure.
        #[arg(short, long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Calls before measuring starts, not counted.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Fixed total rate in calls/s (open loop); without it each caller calls again as soon as it has a reply.
        #[arg(long)]
        rate: Option<f64>,
        /// Per-call timeout.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct Target {
    /// The service's request queue.
    queue: String,
    /// The method (the AMQP `type`); `-` calls the service's default method.
    method: String,
    /// The params as JSON (array = positional, object = named).
    #[arg(default_value = "[]")]
    params: String,
}

impl Target {
    fn method(&self) -> Option<&str> {
        (self.method != "-").then_some(self.method.as_str())
    }
}

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the service replied with an error (code and message on stderr)
  2  usage error (bad arguments or PARAMS JSON)
  3  timeout: no reply in time
  4  no such service: no queue of that name
  5  rejected: the queue is full
  6  broker connection failed
  7  malformed reply";

fn exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Remote => 1,
        ErrorKind::InvalidRequest => 2,
        ErrorKind::Timeout => 3,
        ErrorKind::NoSuchService => 4,
        ErrorKind::Rejected => 5,
        ErrorKind::Connection => 6,
        ErrorKind::BadReply => 7,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            // lapin warns about every returned message; `NoSuchService` already says it.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin::returned_messages=error".into()),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Call(error)) => {
            match &error {
                CallError::Remote { code, message, details } => {
                    eprintln!("error: {code}: {message}");
                    if let Some(details) = details {
                        eprintln!("details: {details}");
                    }
                }
                other => eprintln!("error: {other}"),
            }
            ExitCode::from(exit_code(error.kind()))
        }
    }
}

enum Failure {
    Usage(String),
    Call(CallError),
}

impl From<CallError> for Failure {
    fn from(error: CallError) -> Self {
        Self::Call(error)
    }
}

fn parse_params(params: &str) -> Result<Value, Failure> {
    serde_json::from_str(params).map_err(|e| Failure::Usage(format!("PARAMS is not JSON: {e}")))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Call { target, timeout } => {
            let params = parse_params(&target.params)?;
            let client = Client::connect_with_timeout(&cli.broker_uri, cli.connect_timeout).await?;
            let result = client.call(&target.queue, target.method(), params, timeout).await;
            let _ = client.close().await;
            println!("{}", result?);
        }
        Command::Notify { target } => {
            let params = parse_params(&target.params)?;
            let client = Client::connect_with_timeout(&cli.broker_uri, cli.connect_timeout).await?;
            let sent = client.notify(&target.queue, target.method(), params).await;
            let _ = client.close().await;
            sent?;
        }
        Command::Bench { target, concurrency, duration, warmup, rate, timeout, json } => {
            if concurrency == 0 {
                return Err(Failure::Usage("--concurrency must be at least 1".into()));
            }
            if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                return Err(Failure::Usage("--rate must be a positive number".into()));
            }
            let spec = BenchSpec {
                queue: target.queue.clone(),
                method: target.method().map(str::to_owned),
                params: parse_params(&target.params)?,
                concurrency,
                duration,
                warmup,
                rate,
                timeout,
            };
            let client = Client::connect_with_timeout(&cli.broker_uri, cli.connect_timeout).await?;
            let report = bench::run(&client, &spec).await;
            let _ = client.close().await;
            if json {
                println!("{}", serde_json::to_string(&report).expect("a report serialises"));
            } else {
                print!("{report}");
            }
        }
    }
    Ok(())
}
