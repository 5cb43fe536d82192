//! The `warren-worker` command line.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use warren_client::endpoint::BROKER_URI_ENV;
use warren_client::topology::{QueueKind, QueueOptions};

use crate::builtin;
use crate::handler::Handlers;
use crate::http_handler::{HttpHandler, HttpHandlerError, HttpLimits};
use crate::metrics::DEFAULT_MAX_METHOD_LABELS;
use crate::reply_to::{InvalidPattern, ReplyToPolicy};
use crate::worker::{DEFAULT_MAX_REPLY_BYTES, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PREFETCH, Worker, WorkerBuilder};

/// Serves RPC requests from a RabbitMQ queue: runs the handler, replies, acks.
#[derive(Debug, Clone, Parser)]
#[command(name = "warren-worker", version)]
pub struct Args {
    /// The request queue to consume.
    #[arg(long, env = "WARREN_QUEUE")]
    pub queue: String,

    /// `builtin` (echo, add, sleep, fail) or the URL of an HTTP handler, e.g. http://127.0.0.1:8080/rpc
    /// (each request is POSTed to <URL>/<method>).
    #[arg(long, env = "WARREN_HANDLER", default_value = "builtin")]
    pub handler: String,

    /// The method of requests that name none (no AMQP `type` property).
    #[arg(long, env = "WARREN_DEFAULT_METHOD")]
    pub default_method: Option<String>,

    /// Requests held unacked at once, which is also how many run concurrently.
    #[arg(long, env = "WARREN_PREFETCH", default_value_t = DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// Declare the queue and its dead-letter queue `<queue>.dead` (as the operator would) before consuming.
    #[arg(long, env = "WARREN_DECLARE")]
    pub declare: bool,

    /// Queue type used by --declare.
    #[arg(long, value_enum, default_value_t = QueueKind::Quorum)]
    pub queue_type: QueueKind,

    /// Deliveries before a request is dead-lettered (quorum queues; used by --declare).
    #[arg(long, default_value_t = 5)]
    pub delivery_limit: i64,

    /// Most requests the queue holds; past it new requests are refused (used by --declare).
    #[arg(long)]
    pub max_length: Option<i64>,

    /// How long a request may wait in the queue (used by --declare).
    #[arg(long)]
    pub message_ttl_seconds: Option<i64>,

    /// AMQP URI of the broker (its password is never logged); several nodes of a cluster as
    /// amqp://user:pass@host1:5672,host2:5672/%2f, tried from a random one on.
    #[arg(long, env = BROKER_URI_ENV, hide_env_values = true)]
    pub broker_uri: String,

    /// Queues replies may go to besides reply addresses (direct reply-to, server-named `amq.gen-*` queues): a name,
    /// or a prefix ending in `*`. Repeat or separate with commas. Requests whose reply_to is neither are acked
    /// without running.
    #[arg(long = "allow-reply-to", env = "WARREN_ALLOW_REPLY_TO", value_delimiter = ',', value_name = "QUEUE")]
    pub allow_reply_to: Vec<String>,

    /// The largest reply (and HTTP handler response) body, in bytes; a larger one is answered with an `internal`
    /// error instead.
    #[arg(long, env = "WARREN_MAX_REPLY_BYTES", default_value_t = DEFAULT_MAX_REPLY_BYTES)]
    pub max_reply_bytes: usize,

    /// The largest request body run, in bytes; a larger request is answered with `bad_request` (details.reason
    /// `request_too_large`) without running.
    #[arg(long, env = "WARREN_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// How long the HTTP handler may take per request when the caller's deadline is later or absent (e.g. 30s).
    #[arg(long, env = "WARREN_HANDLER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub handler_timeout: Duration,

    /// Distinct method names the HTTP handler's metrics label on their own; the rest are counted as `_other`.
    #[arg(long, env = "WARREN_MAX_METHOD_LABELS", default_value_t = DEFAULT_MAX_METHOD_LABELS)]
    pub max_method_labels: usize,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "WARREN_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// FOR TESTS ONLY: serve a `crash` method that aborts the process (to test poison-message dead-lettering).
    #[arg(long, env = "WARREN_ENABLE_CRASH_METHOD", hide = true)]
    pub enable_crash_method: bool,
}

impl Args {
    /// The handlers `--handler` names.
    pub fn handlers(&self) -> Result<Handlers, HttpHandlerError> {
        let handlers = if self.handler == "builtin" {
            builtin::handlers()
        } else {
            let limits = HttpLimits { timeout: self.handler_timeout, max_response_bytes: self.max_reply_bytes };
            HttpHandler::with_limits(&self.handler, limits)?.into_handlers()
        };
        Ok(if self.enable_crash_method { handlers.merge(builtin::crash_handler()) } else { handlers })
    }

    /// The queue arguments `--declare` uses, or `None` without it.
    pub fn queue_options(&self) -> Option<QueueOptions> {
        self.declare
            .then(|| QueueOptions::new(self.queue_type, self.delivery_limit, self.max_length, self.message_ttl_seconds))
    }

    /// The `reply_to` policy `--allow-reply-to` describes.
    pub fn reply_to_policy(&self) -> Result<ReplyToPolicy, InvalidPattern> {
        ReplyToPolicy::new(&self.allow_reply_to)
    }

    /// A worker configured from the arguments, with `handlers`.
    pub fn worker(&self, handlers: Handlers) -> Result<WorkerBuilder, InvalidPattern> {
        let mut builder = Worker::builder(&self.broker_uri, &self.queue)
            .prefetch(self.prefetch)
            .handlers(handlers)
            .reply_to_policy(self.reply_to_policy()?)
            .max_reply_bytes(self.max_reply_bytes)
            .max_request_bytes(self.max_request_bytes)
            // Formatting a span's fields for the log costs ~10 % of a request's CPU: made only when it is exported
            // (or RUST_LOG asks for debug).
            .delivery_span_level(if warren_client::telemetry::otlp_configured() {
                tracing::Level::INFO
            } else {
                tracing::Level::DEBUG
            });
        if let Some(method) = &self.default_method {
            builder = builder.default_method(method);
        }
        if let Some(options) = self.queue_options() {
            builder = builder.declare(options);
        }
        Ok(builder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(["warren-worker", "--broker-uri", "amqp://localhost"].iter().chain(args)).unwrap()
    }

    #[test]
    fn declare_defaults_match_the_crd() {
        let args = parse(&["--queue", "q", "--declare"]);
        assert_eq!(args.queue_options(), Some(QueueOptions::default()));
        assert_eq!(parse(&["--queue", "q"]).queue_options(), None);
    }

    #[test]
    fn ttl_is_given_in_seconds() {
        let args = parse(&["--queue", "q", "--declare", "--queue-type", "classic", "--message-ttl-seconds", "30"]);
        let options = args.queue_options().unwrap();
        assert_eq!(options.kind, QueueKind::Classic);
        assert_eq!(options.message_ttl_ms, Some(30_000));
    }

    #[test]
    fn crash_is_served_only_when_enabled() {
        assert!(!parse(&["--queue", "q"]).handlers().unwrap().serves("crash"));
        assert!(parse(&["--queue", "q", "--enable-crash-method"]).handlers().unwrap().serves("crash"));
    }

    #[test]
    fn reliability_limits_have_safe_defaults_and_flags() {
        let args = parse(&["--queue", "q"]);
        assert_eq!(args.max_reply_bytes, DEFAULT_MAX_REPLY_BYTES);
        assert_eq!(args.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(args.handler_timeout, crate::http_handler::DEFAULT_TIMEOUT);
        assert_eq!(args.reply_to_policy().unwrap(), ReplyToPolicy::default());
        let args = parse(&["--queue", "q", "--allow-reply-to", "replies.*,cb", "--handler-timeout", "2s"]);
        assert!(args.reply_to_policy().unwrap().allows("replies.x"));
        assert!(args.reply_to_policy().unwrap().allows("cb"));
        assert_eq!(args.handler_timeout, Duration::from_secs(2));
    }

    #[test]
    fn prefetch_zero_is_refused() {
        let args = ["warren-worker", "--broker-uri", "amqp://x", "--queue", "q", "--prefetch", "0"];
        assert!(Args::try_parse_from(args).is_err());
    }
}
