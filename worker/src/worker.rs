//! The consume → handle → reply → ack loop, across broker sessions.
//!
//! A session is two AMQP connections: one consuming the request queue (manual acks, prefetch), one publishing
//! replies (publisher confirms). They are separate because the broker blocks publishing connections during a memory
//! or disk alarm: on a shared connection the blocked replies would hold up the acks too, and the requests would be
//! redelivered and run again although their replies go out once the alarm clears. Per request: run the handler,
//! publish the reply and wait for its confirm, then ack. A late confirm is waited for as long as the reply channel
//! and its connection live (see [`ConfirmWait`]): giving up on it would run the request twice if the reply still
//! goes out.
//! When the session dies, its unacked requests go back to the queue on the broker side; handlers still running
//! finish, but their replies and acks go nowhere (an ack on a dead channel is a no-op in lapin, never sent on the
//! next session). The worker reconnects with backoff and consumes again. A broker URI of several nodes
//! (`amqp://user:pass@rabbit-0,rabbit-1,rabbit-2/%2f`) is tried from a random node on; each failed attempt and
//! each lost session moves on to the next node, without delay until every node of the round has been tried.
//!
//! A handler that reports itself unavailable (an HTTP backend not listening) makes the worker requeue the request,
//! cancel its consumer (so it takes no more work and `/readyz` fails), probe the handler with backoff, and consume
//! again once it answers.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{SelectAll, select_all};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{DeliveryTag, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind, Event};
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tracing::{Instrument, debug, info, warn};
use warren_client::broker_uri::{BrokerAddresses, InvalidBrokerUri, Redacted};
use warren_client::failover::Rotation;
use warren_client::topology::{QueueOptions, dead_letter_queue_name, declare_service_queues};

use crate::answered::Answered;
use crate::backoff::Backoff;
use crate::dispatch::{Dispatcher, Verdict};
use crate::handler::Handlers;
use crate::isolation::{Admission, Kind, Step};
use crate::metrics::{InFlightGuard, Metrics};
use crate::reply::Reply;
use crate::reply_to::ReplyToPolicy;
use crate::request::Request;

/// The default prefetch: requests a worker holds unacked, and so runs concurrently.
pub const DEFAULT_PREFETCH: u16 = 32;

/// The largest reply published, by default (RabbitMQ 4's default `max_message_size`); a larger one is replaced
/// by a small `internal` error.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;
/// RabbitMQ 4's default `max_message_size` too: a request a default 4.x broker takes is run.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// The AMQP frame size the worker asks for unless the URI sets `frame_max`. lapin keeps two zero-filled I/O
/// buffers of 32 frames each, so RabbitMQ's default 128 KiB would cost 8 MiB of resident memory; RPC messages are
/// small, and larger ones are merely split into more frames.
pub const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// A session that lasted this long resets the reconnect backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

/// How long closing a session's connection may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting and starting to consume may take (a broker that accepts TCP but never finishes the
/// handshake must not hang the worker).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long sending an ack or a nack may take before the settler moves on (the session is presumably dying; the
/// broker then redelivers).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply's confirm that takes longer than this is late: counted (`warren_worker_reply_confirms_late_total`),
/// logged, and still waited for (see [`ConfirmWait`]).
const REPLY_CONFIRM_LATE: Duration = Duration::from_secs(10);
/// How often a late confirm's wait looks at the reply connection and at the shutdown.
const REPLY_CONFIRM_CHECK: Duration = Duration::from_secs(1);
/// Between two warnings about the same late confirm.
const REPLY_CONFIRM_WARN_INTERVAL: Duration = Duration::from_secs(30);
/// The longest a confirm is waited for while the broker does not block the reply connection: far beyond a quorum
/// queue's leader election or a broker's stall, far below RabbitMQ's `consumer_timeout` (30 min). Past it the
/// reply channel is presumed wedged (alive to heartbeats, serving nothing) and the session is torn down.
const REPLY_CONFIRM_LIMIT: Duration = Duration::from_secs(5 * 60);
/// While the worker drains for shutdown, a confirm is waited for at most this long (not counting the time the
/// broker blocks the reply connection) after the later of its publish and the shutdown: the drain ends within the
/// handler timeout and this, as it did before confirms were waited for past [`REPLY_CONFIRM_LATE`].
const DRAIN_CONFIRM_WAIT: Duration = Duration::from_secs(10);

/// Times a reply is published again after the broker closed the reply channel under it.
const REPLY_ATTEMPTS: u32 = 3;

/// Delays between probes of an unavailable handler.
const PROBE_BACKOFF: Backoff = Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(2) };

/// At most one "refused reply_to" warning per this interval (the rest are logged at debug level).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    InvalidUri(#[from] InvalidBrokerUri),
    #[error("failed to declare queue {queue}: it exists with different arguments")]
    QueueConflict {
        queue: String,
        #[source]
        source: lapin::Error,
    },
}

/// A worker serving one request queue. Build it with [`Worker::builder`].
#[derive(Debug)]
pub struct Worker {
    uri: String,
    queue: String,
    prefetch: u16,
    declare: Option<QueueOptions>,
    backoff: Backoff,
    context: Arc<RequestContext>,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
pub struct WorkerBuilder {
    uri: String,
    queue: String,
    prefetch: u16,
    handlers: Handlers,
    default_method: Option<String>,
    declare: Option<QueueOptions>,
    backoff: Backoff,
    metrics: Option<Arc<Metrics>>,
    reply_to: ReplyToPolicy,
    max_reply_bytes: usize,
    max_request_bytes: usize,
    span_level: tracing::Level,
}

impl Worker {
    /// A worker consuming `queue` on the broker at `uri` (`amqp://user:pass@host:5672/%2f`, or several nodes of a
    /// cluster: `amqp://user:pass@host:5672,host:5672/%2f`).
    pub fn builder(uri: impl Into<String>, queue: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            uri: uri.into(),
            queue: queue.into(),
            prefetch: DEFAULT_PREFETCH,
            handlers: Handlers::new(),
            default_method: None,
            declare: None,
            backoff: Backoff::default(),
            metrics: None,
            reply_to: ReplyToPolicy::default(),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            span_level: tracing::Level::INFO,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves until `shutdown` completes, then cancels the consumer, finishes, replies to and acks every request
    /// already received, closes the connections and returns. Broker loss is retried forever, and so is an
    /// unavailable handler; only configuration errors that no retry can fix end it early.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), WorkerError> {
        let mut addresses = BrokerAddresses::parse(&self.uri)?;
        addresses.for_each_node(|node| {
            node.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
        });
        let rotation = Rotation::random(addresses.len());
        let mut shutdown = Shutdown::new(shutdown);
        let mut attempt: u32 = 0;
        let mut sessions: u64 = 0;
        loop {
            let uri = addresses.node(rotation.advance()).clone();
            let opened = tokio::select! {
                _ = shutdown.requested() => return Ok(()),
                opened = tokio::time::timeout(OPEN_TIMEOUT, Session::open(&self, uri.clone())) => {
                    opened.unwrap_or_else(|_| Err(OpenError::Retry(format!("no session within {OPEN_TIMEOUT:?}"))))
                }
            };
            let mut session = match opened {
                Ok(session) => session,
                Err(OpenError::Fatal(error)) => return Err(error),
                Err(OpenError::Retry(error)) => {
                    let delay = self.backoff.random_failover_delay(attempt, addresses.len());
                    warn!(queue = %self.queue, broker = %Redacted(&uri), %error, attempt, retry_in = ?delay, "could not start consuming");
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = shutdown.requested() => return Ok(()),
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            sessions += 1;
            if sessions > 1 {
                self.metrics.reconnected();
            }
            info!(queue = %self.queue, broker = %Redacted(&uri), "connected to the broker");
            let started = Instant::now();
            match session.serve(&self, &mut shutdown).await {
                SessionEnd::Shutdown => {
                    match session.drain_and_close().await {
                        Drained::All => info!(queue = %self.queue, "stopped: every received request was answered"),
                        Drained::Unconfirmed(requests) => warn!(
                            queue = %self.queue,
                            requests,
                            "stopped without the confirms of some replies: the broker redelivers those requests"
                        ),
                        Drained::SessionDied => {
                            warn!(queue = %self.queue, "stopped; the session died while draining: the broker redelivers")
                        }
                    }
                    return Ok(());
                }
                SessionEnd::Lost(reason) => {
                    warn!(queue = %self.queue, broker = %Redacted(&uri), %reason, "broker session lost; unacked requests return to the queue");
                    session.abandon();
                    // A session that dies right after it opened counts as a failed attempt, so it cannot spin.
                    if started.elapsed() >= STABLE_SESSION {
                        attempt = 0;
                    }
                    let delay = self.backoff.random_failover_delay(attempt, addresses.len());
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = shutdown.requested() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

impl WorkerBuilder {
    /// Requests held unacked at once, which is also how many handlers run concurrently (at least 1).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    pub fn handlers(mut self, handlers: Handlers) -> Self {
        self.handlers = handlers;
        self
    }

    /// The method of requests that name none (no `type` property), e.g. from RabbitMQ-tutorial style clients.
    pub fn default_method(mut self, method: impl Into<String>) -> Self {
        self.default_method = Some(method.into());
        self
    }

    /// Declare the queue and its dead-letter queue on every (re)connection, with the shared topology builder.
    pub fn declare(mut self, options: QueueOptions) -> Self {
        self.declare = Some(options);
        self
    }

    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Metrics to record into, e.g. the ones the HTTP server exposes; a private set otherwise.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Which `reply_to` addresses replies may go to (default: direct reply-to and server-named queues only).
    pub fn reply_to_policy(mut self, policy: ReplyToPolicy) -> Self {
        self.reply_to = policy;
        self
    }

    /// The largest reply body published; a larger reply becomes a small `internal` error (default 16 MiB).
    pub fn max_reply_bytes(mut self, max: usize) -> Self {
        self.max_reply_bytes = max.max(1024);
        self
    }

    /// The largest request body run; a larger request is answered with `bad_request` (reason
    /// `request_too_large`) without running (default 16 MiB).
    pub fn max_request_bytes(mut self, max: usize) -> Self {
        self.max_request_bytes = max;
        self
    }

    /// The level of each delivery's span: INFO (the default) or DEBUG (any other level). Below the subscriber's
    /// level no span is made, which saves the cost of recording its fields, but logs within a request then lack
    /// its method and queue (warnings name the correlation id themselves), and no span is exported.
    pub fn delivery_span_level(mut self, level: tracing::Level) -> Self {
        self.span_level = level;
        self
    }

    pub fn build(self) -> Worker {
        let metrics = self.metrics.unwrap_or_default();
        let own_queues = [self.queue.clone(), dead_letter_queue_name(&self.queue)];
        let availability = Availability::new(!self.handlers.has_probe(), metrics.clone());
        let context = Arc::new(RequestContext {
            dispatcher: Dispatcher::new(self.handlers, self.default_method, metrics.clone())
                .max_request_bytes(self.max_request_bytes),
            reply_to: self.reply_to.excluding(own_queues),
            availability,
            max_reply_bytes: self.max_reply_bytes,
            broker_max_message_size: AtomicUsize::new(usize::MAX),
            last_refusal_log: std::sync::Mutex::new(None),
            pauses: AtomicU32::new(0),
            own_requeues: std::sync::Mutex::new(HashSet::new()),
            answered: Answered::for_prefetch(self.prefetch),
            span_level: self.span_level,
        });
        Worker {
            uri: self.uri,
            queue: self.queue,
            prefetch: self.prefetch,
            declare: self.declare,
            backoff: self.backoff,
            context,
            metrics,
        }
    }

    /// `build().run(shutdown)`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), WorkerError> {
        self.build().run(shutdown).await
    }
}

/// What every request's task needs, shared across sessions.
#[derive(Debug)]
struct RequestContext {
    dispatcher: Dispatcher,
    reply_to: ReplyToPolicy,
    availability: Availability,
    max_reply_bytes: usize,
    /// Learned from the broker's refusal of a larger reply (`max_message_size`); `usize::MAX` until then.
    broker_max_message_size: AtomicUsize,
    last_refusal_log: std::sync::Mutex<Option<Instant>>,
    /// `message_id`s of requests this worker gave back itself because its handler was unavailable: when they come
    /// back they are known not to have killed anyone, and need not run alone.
    own_requeues: std::sync::Mutex<HashSet<String>>,
    /// Pauses for an unavailable handler since a request was last answered: a handler that passes its probe but
    /// fails every request is probed less and less often, so its requests are not requeued in a tight loop.
    pauses: AtomicU32,
    /// Requests whose reply was confirmed here: their redeliveries (the ack lost with a session) are not run again.
    answered: Answered,
    /// The level of each delivery's span.
    span_level: tracing::Level,
}

/// Bounds the memory of [`RequestContext::own_requeues`].
const MAX_OWN_REQUEUES: usize = 10_000;

impl RequestContext {
    /// Remembers that this worker requeued `delivery` itself (its handler was unavailable).
    fn requeued_own(&self, delivery: &Delivery) {
        if let Some(id) = delivery.properties.message_id() {
            let mut ids = self.own_requeues.lock().unwrap_or_else(|e| e.into_inner());
            if ids.len() >= MAX_OWN_REQUEUES {
                ids.clear();
            }
            ids.insert(id.to_string());
        }
    }

    /// Whether a redelivered `delivery` is one this worker requeued itself (forgetting it).
    fn returns_own(&self, delivery: &Delivery) -> bool {
        let Some(id) = delivery.properties.message_id() else { return false };
        self.own_requeues.lock().unwrap_or_else(|e| e.into_inner()).remove(id.as_str())
    }

    /// The largest reply body that can be published.
    fn reply_limit(&self) -> usize {
        self.max_reply_bytes.min(self.broker_max_message_size.load(Ordering::Relaxed))
    }

    /// Logs a refused `reply_to` (its value and the correlation id, never the body), at most once per interval at
    /// warn level so a flood of hostile requests cannot flood the log.
    fn log_refusal(&self, request: &Request) {
        let reply_to = request.reply_to.as_ref().map(|r| r.as_str()).unwrap_or_default();
        let correlation_id = request.correlation_id.as_ref().map(|c| c.as_str());
        let mut last = self.last_refusal_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
            *last = Some(Instant::now());
            warn!(
                ?reply_to,
                ?correlation_id,
                allowed = %self.reply_to,
                "refused a request: its reply_to is not a reply address (acked without running; \
                 more refusals are counted in warren_worker_requests_refused_total and logged at debug level)"
            );
        } else {
            debug!(?reply_to, ?correlation_id, "refused a request: its reply_to is not a reply address");
        }
    }
}

/// Whether the handler can run: shared by the request tasks (which report it down) and the session (which stops
/// consuming, probes, and consumes again).
#[derive(Debug)]
struct Availability {
    up: watch::Sender<bool>,
    metrics: Arc<Metrics>,
}

impl Availability {
    fn new(up: bool, metrics: Arc<Metrics>) -> Self {
        metrics.set_handler_available(up);
        Self { up: watch::Sender::new(up), metrics }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
        self.metrics.set_handler_available(up);
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }
}

/// Probes the handler with backoff until it answers, then marks it available.
async fn probe_until_available(context: Arc<RequestContext>) {
    let mut attempt = 0;
    let started = Instant::now();
    let pauses = context.pauses.load(Ordering::Relaxed);
    if pauses > 1 {
        tokio::time::sleep(PROBE_BACKOFF.random_delay(pauses - 2)).await;
    }
    loop {
        let Some(probe) = context.dispatcher.probe() else { break };
        if probe.await {
            break;
        }
        if attempt == 0 {
            info!("the handler does not answer; probing it with backoff before taking work");
        }
        tokio::time::sleep(PROBE_BACKOFF.random_delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
    if attempt > 0 || !context.availability.is_up() {
        info!(after = ?started.elapsed(), "the handler answers");
    }
    context.availability.set(true);
}

/// The shutdown request, remembered once it fired.
struct Shutdown(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Shutdown {
    fn new(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Some(Box::pin(signal)))
    }

    /// Completes when shutdown is (or was) requested; cancel-safe.
    async fn requested(&mut self) {
        if let Some(signal) = &mut self.0 {
            signal.as_mut().await;
            self.0 = None;
        }
    }
}

enum OpenError {
    /// Worth retrying; the message says what failed.
    Retry(String),
    Fatal(WorkerError),
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// How a drain ended.
enum Drained {
    /// Every request received was answered and acked.
    All,
    /// This many requests were left unacked because their replies' confirms did not come in time.
    Unconfirmed(u64),
    /// A connection died meanwhile: some requests may not have been answered.
    SessionDied,
}

/// How requests come in during a session. A prefetch change takes a new consumer (RabbitMQ applies `basic.qos` only
/// to consumers started after it), so a cancelled consumer may still be delivering what it had sent next to its
/// successor: the intake reads them all.
enum Intake {
    /// Deliveries are handled. `active`: the tag of the consumer taking more, `None` while the admission waits for
    /// quiet before starting the next one.
    Consuming { consumers: SelectAll<Consumer>, active: Option<String> },
    /// The handler became unavailable: the consumer is being cancelled, deliveries still arriving are requeued.
    Pausing { consumers: SelectAll<Consumer> },
    /// No consumer; probing the handler until it answers.
    Paused { probe: Pin<Box<dyn Future<Output = ()> + Send>> },
}

#[allow(clippy::large_enum_variant)] // short-lived, never stored
enum IntakeEvent {
    Delivery(Option<Result<Delivery, lapin::Error>>),
    HandlerAnswers,
}

impl Intake {
    /// The next delivery, or the end of the probe; cancel-safe. Without an active consumer the end of the
    /// cancelled ones is no end: a new one is coming (unless `draining`).
    async fn next(&mut self, draining: bool) -> IntakeEvent {
        match self {
            Self::Consuming { consumers, active } => match consumers.next().await {
                None if active.is_none() && !draining => std::future::pending().await,
                delivery => IntakeEvent::Delivery(delivery),
            },
            Self::Pausing { consumers } => IntakeEvent::Delivery(consumers.next().await),
            Self::Paused { probe } => {
                probe.await;
                IntakeEvent::HandlerAnswers
            }
        }
    }
}

/// Two connections: requests are consumed on one, replies published on the other.
struct Session {
    consume_connection: Connection,
    consume_channel: Channel,
    intake: Intake,
    publisher: Arc<Publisher>,
    /// Which deliveries run now; redelivered ones run alone.
    admission: Admission<Delivery>,
    /// What the admission decided and the session has yet to carry out; empty between turns, kept for its capacity.
    steps: Vec<Step<Delivery>>,
    /// Every ack and nack of the session goes through here (see [`settle_loop`]); `None` once draining ended.
    settle: Option<mpsc::UnboundedSender<Settle>>,
    /// The settler reports here how each request was admitted once its ack or nack is sent.
    done_rx: mpsc::UnboundedReceiver<Kind>,
    /// Every spawned request holds a sender; all dropped = nothing in flight.
    in_flight: Option<mpsc::Sender<()>>,
    in_flight_done: mpsc::Receiver<()>,
}

static CONSUMER_SEQ: AtomicU64 = AtomicU64::new(0);

impl Session {
    async fn open(worker: &Worker, uri: AMQPUri) -> Result<Self, OpenError> {
        let name = |role: &str| {
            ConnectionProperties::default()
                .with_connection_name(format!("warren-worker {} {role}", worker.queue).into())
        };
        let consume_connection = Connection::connect_uri(uri.clone(), name("consume")).await.map_err(retry)?;
        let publish_connection = match Connection::connect_uri(uri, name("reply")).await {
            Ok(connection) => connection,
            Err(error) => {
                close(&consume_connection, "could not open the reply connection").await;
                return Err(retry(error));
            }
        };
        match Self::start(worker, &consume_connection, &publish_connection).await {
            Ok((consume_channel, reply_channel, intake)) => {
                let (in_flight, in_flight_done) = mpsc::channel(1);
                let (done, done_rx) = mpsc::unbounded_channel();
                let (settle, settle_rx) = mpsc::unbounded_channel();
                tokio::spawn(settle_loop(consume_channel.clone(), settle_rx, done, in_flight.clone()));
                let publisher = Arc::new(Publisher::new(publish_connection, reply_channel, worker.metrics.clone()));
                Ok(Session {
                    consume_connection,
                    consume_channel,
                    intake,
                    publisher,
                    admission: Admission::new(worker.prefetch),
                    steps: Vec::new(),
                    settle: Some(settle),
                    done_rx,
                    in_flight: Some(in_flight),
                    in_flight_done,
                })
            }
            Err(error) => {
                close(&consume_connection, "could not start consuming").await;
                close(&publish_connection, "could not start consuming").await;
                Err(error)
            }
        }
    }

    /// The consuming channel (declared, prefetch set), the reply channel, and how requests come in.
    async fn start(
        worker: &Worker,
        consume_connection: &Connection,
        publish_connection: &Connection,
    ) -> Result<(Channel, Channel, Intake), OpenError> {
        let consume_channel = consume_connection.create_channel().await.map_err(retry)?;
        if let Some(options) = &worker.declare {
            declare_service_queues(&consume_channel, &worker.queue, options).await.map_err(|error| {
                if is_soft_error(&error, AMQPSoftError::PRECONDITIONFAILED) {
                    OpenError::Fatal(WorkerError::QueueConflict { queue: worker.queue.clone(), source: error })
                } else {
                    OpenError::Retry(error.to_string())
                }
            })?;
        }
        let reply_channel = open_reply_channel(publish_connection).await.map_err(retry)?;
        // A session starts cautious: it may be taking over the requests of a worker that just died.
        let prefetch = Admission::<Delivery>::new(worker.prefetch).initial_prefetch();
        consume_channel.basic_qos(prefetch, BasicQosOptions { global: false }).await.map_err(retry)?;
        // A handler that does not answer yet (a backend container slower to start than the worker) is waited for
        // before consuming, so no request is taken only to be given back.
        let intake = if worker.context.availability.is_up() {
            let (consumer, tag) = consume(&consume_channel, worker).await.map_err(retry)?;
            Intake::Consuming { consumers: select_all([consumer]), active: Some(tag) }
        } else {
            Intake::Paused { probe: Box::pin(probe_until_available(worker.context.clone())) }
        };
        Ok((consume_channel, reply_channel, intake))
    }

    /// Receives and spawns requests until shutdown (consumer cancelled, everything received answered or given
    /// back) or the session dies; pauses while the handler is unavailable.
    async fn serve(&mut self, worker: &Worker, shutdown: &mut Shutdown) -> SessionEnd {
        if matches!(self.intake, Intake::Consuming { .. }) {
            worker.metrics.set_consuming(true);
            info!(queue = %worker.queue, prefetch = worker.prefetch, "consuming");
        }
        let mut availability = worker.context.availability.subscribe();
        let mut draining = false;
        // Draining, and no delivery will arrive any more.
        let mut intake_ended = false;
        let mut last_error = None;
        let end = loop {
            if intake_ended && self.admission.idle() {
                break SessionEnd::Shutdown;
            }
            let consuming = matches!(self.intake, Intake::Consuming { .. });
            tokio::select! {
                biased;
                _ = shutdown.requested(), if !draining => {
                    draining = true;
                    self.publisher.draining();
                    worker.metrics.set_consuming(false);
                    self.admission.suspend();
                    info!(queue = %worker.queue, "shutting down: cancelling the consumer, finishing requests in flight");
                    match &mut self.intake {
                        Intake::Consuming { consumers, active } => {
                            // Requests already delivered still arrive on the stream, which ends after the cancel-ok.
                            if let Some(tag) = active.take() {
                                cancel(&self.consume_channel, &tag).await;
                            }
                            intake_ended = consumers.is_empty();
                        }
                        Intake::Pausing { .. } => {}
                        Intake::Paused { .. } => intake_ended = true,
                    }
                }
                reason = self.publisher.torn_down() => {
                    break SessionEnd::Lost(reason.into());
                }
                // The watch guard is not held past the wait.
                () = async { let _ = availability.wait_for(|up| !*up).await; }, if consuming && !draining => {
                    let Intake::Consuming { consumers, active } =
                        std::mem::replace(&mut self.intake, Intake::Paused { probe: Box::pin(std::future::pending()) })
                    else {
                        unreachable!("checked by the branch condition")
                    };
                    worker.metrics.set_consuming(false);
                    worker.context.pauses.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        queue = %worker.queue,
                        "the handler is unavailable: stopped consuming; requests that cannot run go back to the queue"
                    );
                    if let Some(tag) = active {
                        cancel(&self.consume_channel, &tag).await;
                    }
                    self.intake = if consumers.is_empty() {
                        Intake::Paused { probe: Box::pin(probe_until_available(worker.context.clone())) }
                    } else {
                        Intake::Pausing { consumers }
                    };
                    self.admission.suspend();
                    for (delivery, kind) in self.admission.take_waiting() {
                        self.requeue_unrun(delivery, kind == Kind::Suspect, worker);
                    }
                }
                Some(kind) = self.done_rx.recv() => {
                    self.admission.finished_into(kind, &mut self.steps);
                    // The settler reports a batch of acks together: take them all in this turn.
                    while let Ok(kind) = self.done_rx.try_recv() {
                        self.admission.finished_into(kind, &mut self.steps);
                    }
                    if let Err(error) = self.apply(worker, draining).await {
                        break SessionEnd::Lost(error.to_string());
                    }
                }
                event = self.intake.next(draining), if !intake_ended => match event {
                    IntakeEvent::Delivery(Some(Ok(delivery))) => match self.intake {
                        // Its reply was confirmed before the session that held it died: ack it, do not run it again.
                        Intake::Consuming { .. } if delivery.redelivered && worker.context.answered.take(&delivery.properties) => {
                            self.ack_answered(delivery, worker);
                        }
                        Intake::Consuming { .. } => {
                            let count = crate::request::delivery_count(&delivery.properties);
                            let redelivered = delivery.redelivered && !worker.context.returns_own(&delivery);
                            self.admission.admit_into(delivery, redelivered, count, &mut self.steps);
                            if let Err(error) = self.apply(worker, draining).await {
                                break SessionEnd::Lost(error.to_string());
                            }
                        }
                        _ => {
                            let suspect = delivery.redelivered;
                            self.requeue_unrun(delivery, suspect, worker)
                        }
                    },
                    // Always followed by `None`.
                    IntakeEvent::Delivery(Some(Err(error))) => last_error = Some(error),
                    IntakeEvent::Delivery(None) if draining => intake_ended = true,
                    IntakeEvent::Delivery(None) => match self.intake {
                        Intake::Pausing { .. } => {
                            let probe = probe_until_available(worker.context.clone());
                            self.intake = Intake::Paused { probe: Box::pin(probe) };
                        }
                        _ => break SessionEnd::Lost(match last_error.take() {
                            Some(error) => error.to_string(),
                            None => "the broker cancelled the consumer (queue deleted?)".into(),
                        }),
                    },
                    IntakeEvent::HandlerAnswers => match start_intake(&self.consume_channel, self.admission.resume(), worker).await {
                        Ok((consumer, tag)) => {
                            self.intake = Intake::Consuming { consumers: select_all([consumer]), active: Some(tag) };
                            worker.metrics.set_consuming(true);
                            info!(queue = %worker.queue, prefetch = worker.prefetch, "consuming");
                        }
                        Err(error) => break SessionEnd::Lost(error.to_string()),
                    },
                }
            }
        };
        worker.metrics.set_consuming(false);
        end
    }

    /// Carries out what the admission decided (`self.steps`), leaving the buffer empty with its capacity for the
    /// next turn: no allocation per request.
    async fn apply(&mut self, worker: &Worker, draining: bool) -> Result<(), lapin::Error> {
        let mut steps = std::mem::take(&mut self.steps);
        for step in steps.drain(..) {
            match step {
                Step::StopIntake => {
                    if let Intake::Consuming { active, .. } = &mut self.intake
                        && let Some(tag) = active.take()
                    {
                        debug!("no more requests until those received are done");
                        cancel(&self.consume_channel, &tag).await;
                    }
                }
                Step::StartIntake(prefetch) => {
                    if draining || !matches!(self.intake, Intake::Consuming { active: None, .. }) {
                        continue;
                    }
                    let (consumer, tag) = start_intake(&self.consume_channel, prefetch, worker).await?;
                    if let Intake::Consuming { consumers, active } = &mut self.intake {
                        consumers.push(consumer);
                        *active = Some(tag);
                    }
                }
                Step::Run(delivery, kind) => {
                    if kind == Kind::Suspect {
                        worker.metrics.request_run_alone();
                        info!(
                            delivery_count = crate::request::delivery_count(&delivery.properties),
                            "a redelivered request runs alone (it may be what stopped a worker before)"
                        );
                    }
                    self.spawn(delivery, kind, worker);
                }
            }
        }
        self.steps = steps;
        Ok(())
    }

    fn spawn(&self, delivery: Delivery, kind: Kind, worker: &Worker) {
        let context = worker.context.clone();
        let publisher = self.publisher.clone();
        let in_flight = self.in_flight.clone();
        let settle = self.settle.clone();
        tokio::spawn(async move {
            let tag = delivery.delivery_tag;
            // Counted until its ack or nack is sent.
            let in_flight_gauge = context.dispatcher.metrics().in_flight();
            // Whatever panics on the way (a handler's panic is answered as `internal` before this), the request
            // must not keep its prefetch slot: give it back, so the delivery limit can dead-letter a poison.
            let alone = kind == Kind::Suspect;
            // Boxed: the handling future is large, and tokio moves a spawned future into its task and its output
            // over it; a pointer is cheap to move (the profile's memcpy, docs/benchmarks.md "## Worker").
            let handling = Box::pin(handle(delivery, &context, &publisher, alone));
            let settlement = AssertUnwindSafe(handling).catch_unwind().await;
            let settlement = settlement.unwrap_or_else(|_| {
                tracing::error!("handling a request panicked; requeueing it");
                Settlement::Requeue
            });
            if let Some(settle) = settle {
                let _ = settle.send(Settle { tag, settlement, kind: Some(kind), _gauge: Some(in_flight_gauge) });
            }
            drop(in_flight);
        });
    }

    /// A delivery that arrived while the consumer was being cancelled for an unavailable handler: back to the
    /// queue without running, so another worker (or this one, later) takes it.
    /// `suspect`: it was redelivered and has not run here, so it stays suspect when it comes back.
    fn requeue_unrun(&self, delivery: Delivery, suspect: bool, worker: &Worker) {
        if !suspect {
            worker.context.requeued_own(&delivery);
        }
        worker.metrics.request_requeued("handler_unavailable");
        if let Some(settle) = &self.settle {
            let requeue =
                Settle { tag: delivery.delivery_tag, settlement: Settlement::Requeue, kind: None, _gauge: None };
            let _ = settle.send(requeue);
        }
    }

    /// A redelivered request whose reply this worker already had confirmed: acked without running the handler.
    fn ack_answered(&self, delivery: Delivery, worker: &Worker) {
        worker.metrics.redelivery_answered();
        info!(
            delivery_count = crate::request::delivery_count(&delivery.properties),
            "a redelivered request was already answered here (its reply confirmed, or never deliverable); acking it without running it again"
        );
        if let Some(settle) = &self.settle {
            let ack = Settle { tag: delivery.delivery_tag, settlement: Settlement::Ack, kind: None, _gauge: None };
            let _ = settle.send(ack);
        }
    }

    /// Waits for every request of this session to be answered and acked (or given up on: see
    /// [`DRAIN_CONFIRM_WAIT`]), then closes the connections.
    async fn drain_and_close(mut self) -> Drained {
        self.in_flight.take();
        // The settler ends once every request task is done with it, after their last acks.
        self.settle.take();
        while self.in_flight_done.recv().await.is_some() {}
        let alive = self.consume_connection.status().connected() && self.publisher.connection.status().connected();
        close(&self.consume_connection, "worker shutting down").await;
        close(&self.publisher.connection, "worker shutting down").await;
        match self.publisher.unconfirmed.load(Ordering::Relaxed) {
            _ if !alive => Drained::SessionDied,
            0 => Drained::All,
            requests => Drained::Unconfirmed(requests),
        }
    }

    /// Gives up on the session: its handlers keep running, but nothing they send can reach the broker.
    /// Closes what is left of a lost session in the background: closing a connection to a node that is gone can
    /// take [`CLOSE_TIMEOUT`], and the next node must not wait for it.
    fn abandon(self) {
        let Session { consume_connection, publisher, .. } = self;
        tokio::spawn(async move {
            tokio::join!(close(&consume_connection, "session lost"), close(&publisher.connection, "session lost"));
        });
    }
}

async fn cancel(channel: &Channel, tag: &str) {
    if let Err(error) = channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await {
        warn!(%error, "could not cancel the consumer");
    }
}

/// A new consumer with `prefetch` (a prefetch applies to the consumers started after it).
async fn start_intake(channel: &Channel, prefetch: u16, worker: &Worker) -> Result<(Consumer, String), lapin::Error> {
    debug!(prefetch, "consuming with a new prefetch");
    channel.basic_qos(prefetch, BasicQosOptions { global: false }).await?;
    consume(channel, worker).await
}

/// Starts a consumer on the request queue.
async fn consume(channel: &Channel, worker: &Worker) -> Result<(Consumer, String), lapin::Error> {
    let tag = format!("warren-worker-{}-{}", std::process::id(), CONSUMER_SEQ.fetch_add(1, Ordering::Relaxed));
    let consumer = channel
        .basic_consume(
            worker.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .inspect_err(|error| {
            if is_soft_error(error, AMQPSoftError::NOTFOUND) && worker.declare.is_none() {
                warn!(queue = %worker.queue, "the queue does not exist (run with --declare to create it)");
            }
        })?;
    Ok((consumer, tag))
}

/// One delivery in a span of its own (exported over OTLP when configured) that continues the caller's trace.
/// `alone`: nothing else of this session runs (a redelivered request), so its reply is alone on the reply connection.
async fn handle(delivery: Delivery, context: &RequestContext, publisher: &Publisher, alone: bool) -> Settlement {
    let request = Request::from_properties(&delivery.properties);
    macro_rules! delivery_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "delivery",
                otel.kind = "consumer",
                queue = %delivery.routing_key,
                method = request.method.as_deref().unwrap_or(""),
                correlation_id = request.correlation_id.as_ref().map_or("", |c| c.as_str()),
                redelivered = delivery.redelivered,
            )
        };
    }
    // `span!` takes a constant level.
    let span = if context.span_level == tracing::Level::INFO {
        delivery_span!(tracing::Level::INFO)
    } else {
        delivery_span!(tracing::Level::DEBUG)
    };
    if !span.is_disabled() {
        let trace = &request.trace;
        warren_client::telemetry::continue_trace(&span, trace.traceparent.as_deref(), trace.tracestate.as_deref());
    }
    handle_in_span(delivery, request, context, publisher, alone).instrument(span).await
}

/// Handler → reply (confirmed), for one delivery; then what to do with it: ack it only once its reply is confirmed.
async fn handle_in_span(
    delivery: Delivery,
    request: Request,
    context: &RequestContext,
    publisher: &Publisher,
    alone: bool,
) -> Settlement {
    let metrics = context.dispatcher.metrics();
    if let Some(reply_to) = &request.reply_to
        && !context.reply_to.allows(reply_to.as_str())
    {
        metrics.request_refused("reply_to");
        context.log_refusal(&request);
        return Settlement::Ack;
    }
    let handled = context.dispatcher.handle(&request, &delivery.data, delivery.redelivered, SystemTime::now()).await;
    metrics.request_done(&handled.method_label, handled.outcome_label());
    debug!(method = %handled.method_label, outcome = handled.outcome_label(), "handled");
    let outcome = match handled.verdict {
        Verdict::Answer(outcome) => {
            context.pauses.store(0, Ordering::Relaxed);
            outcome
        }
        Verdict::Unavailable(reason) => {
            if context.availability.is_up() {
                let correlation_id = request.correlation_id.as_ref().map(|c| c.as_str());
                warn!(%reason, ?correlation_id, "the handler is unavailable; requeueing the request");
            } else {
                debug!(%reason, "the handler is unavailable; requeueing the request");
            }
            context.availability.set(false);
            metrics.request_requeued("handler_unavailable");
            context.requeued_own(&delivery);
            return Settlement::Requeue;
        }
    };

    if let Some(reply) = Reply::to(&request, &outcome)
        && let Err(error) = publish_reply(context, publisher, &request, reply).await
    {
        metrics.reply_failed();
        // 3.10 kills the connection on a reply to a caller whose node is down: running the request again would kill
        // the next session too, until the delivery limit dead-letters it; its redelivery is acked instead.
        if alone
            && let ReplyError::Publish(cause) = &error
            && crate::answered::reply_undeliverable(request.reply_to.as_ref().map_or("", |r| r.as_str()), cause)
        {
            metrics.reply_undeliverable();
            context.answered.record(&delivery.properties);
            warn!(%cause, "the broker closed the connection on this reply: its caller's node is down, it can never be delivered (its redelivery to this worker is acked without running)");
        }
        // A broken session requeues the request on the broker side; otherwise give it back ourselves. Not when the
        // confirm never came: the reply may still be delivered, and its session is closing (drain) or being replaced.
        if delivery.acker.usable() && !publisher.is_broken() && !matches!(error, ReplyError::Unconfirmed(_)) {
            let correlation_id = request.correlation_id.as_ref().map(|c| c.as_str());
            warn!(%error, ?correlation_id, "the reply was not published; requeueing the request");
            metrics.request_requeued("reply_failed");
            return Settlement::Requeue;
        }
        debug!(%error, "the request is left to its session, lost or closing: the broker redelivers it");
        return Settlement::Leave;
    }
    // Confirmed (or one-way and done): a redelivery after a lost ack need not run again.
    context.answered.record(&delivery.properties);
    Settlement::Ack
}

/// What becomes of a delivery once its task is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    /// Answered (reply confirmed, or no reply wanted): ack.
    Ack,
    /// Not answered: back to the queue (nack with requeue).
    Requeue,
    /// Nothing: its session is dying, and the broker requeues it anyway.
    Leave,
}

/// A delivery's settlement, sent to the session's settler; `kind` is reported to the admission once it is sent.
#[derive(Debug)]
struct Settle {
    tag: DeliveryTag,
    settlement: Settlement,
    kind: Option<Kind>,
    /// The request's share of `warren_worker_requests_in_flight`, released once its ack or nack is sent.
    _gauge: Option<InFlightGuard>,
}

/// An ack or a nack to send on the consuming channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Ack { tag: DeliveryTag, multiple: bool },
    Requeue { tag: DeliveryTag },
}

/// Which acks and nacks to send for one channel's deliveries, so that answered requests are acked with as few
/// frames as possible (one `multiple` ack for a contiguous run) and none is acked that was not answered.
///
/// A `multiple` ack of tag T acks every unacked delivery up to T on the broker: it is only sent when every tag from
/// the last one known settled up to T is either answered now or already settled by a frame sent earlier on the same
/// channel (frames reach the broker in order). A delivery still running, or not even received yet, stops the run;
/// answered deliveries past it are acked on their own at once, so no request holds its prefetch slot longer than
/// with one ack each. Tags are per channel and start at 1: one ledger per session.
#[derive(Debug, Default)]
struct Ledger {
    /// Every tag up to here is settled.
    floor: DeliveryTag,
    /// Tags above `floor` already settled (acked or nacked on their own).
    settled: std::collections::BTreeSet<DeliveryTag>,
}

impl Ledger {
    /// The frames, in the order they must be sent, for a batch of settlements.
    fn plan(&mut self, batch: impl IntoIterator<Item = (DeliveryTag, Settlement)>) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut answered = std::collections::BTreeSet::new();
        for (tag, settlement) in batch {
            match settlement {
                Settlement::Ack => {
                    answered.insert(tag);
                }
                // Sent before any `multiple` ack that covers it.
                Settlement::Requeue => {
                    frames.push(Frame::Requeue { tag });
                    self.settled.insert(tag);
                }
                Settlement::Leave => {}
            }
        }
        let (mut top, mut acked) = (None, 0);
        let mut next = self.floor + 1;
        loop {
            if answered.remove(&next) {
                top = Some(next);
                acked += 1;
            } else if !self.settled.remove(&next) {
                break;
            }
            next += 1;
        }
        self.floor = next - 1;
        if let Some(tag) = top {
            frames.push(Frame::Ack { tag, multiple: acked > 1 });
        }
        for tag in answered {
            frames.push(Frame::Ack { tag, multiple: false });
            self.settled.insert(tag);
        }
        frames
    }
}

/// Sends a session's acks and nacks in order, as many settlements at a time as have come in (a burst of replies
/// confirmed together is acked with one frame), then tells the session the requests are done. Ends once every
/// sender is gone (the session drained or abandoned, its request tasks done).
async fn settle_loop(
    channel: Channel,
    mut settlements: mpsc::UnboundedReceiver<Settle>,
    done: mpsc::UnboundedSender<Kind>,
    in_flight: mpsc::Sender<()>,
) {
    let mut ledger = Ledger::default();
    let mut batch = Vec::new();
    while settlements.recv_many(&mut batch, usize::MAX).await > 0 {
        for frame in ledger.plan(batch.iter().map(|s| (s.tag, s.settlement))) {
            // Bounded: the session may be dying without having noticed yet; the broker then redelivers.
            let sent = match frame {
                Frame::Ack { tag, multiple } => {
                    let ack = channel.basic_ack(tag, BasicAckOptions { multiple });
                    tokio::time::timeout(SETTLE_TIMEOUT, ack).await
                }
                Frame::Requeue { tag } => {
                    let nack = channel.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true });
                    tokio::time::timeout(SETTLE_TIMEOUT, nack).await
                }
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%error, ?frame, "ack or nack failed; the broker redelivers the request"),
                Err(_) => {
                    debug!(?frame, "no answer to the ack or nack; the broker redelivers the request if it was lost")
                }
            }
        }
        for settle in batch.drain(..) {
            if let Some(kind) = settle.kind {
                let _ = done.send(kind);
            }
        }
    }
    drop(in_flight);
}

/// Publishes `reply`, or a small `internal` error instead when it is larger than the worker's limit or than the
/// broker accepts: the request ran, and running it again would produce the same reply.
async fn publish_reply(
    context: &RequestContext,
    publisher: &Publisher,
    request: &Request,
    reply: Reply,
) -> Result<(), ReplyError> {
    let size = reply.body.len();
    let limit = context.reply_limit();
    if size > limit {
        return publish_too_large(context, publisher, request, size, limit).await;
    }
    match publisher.publish(&reply, context).await {
        Err(ReplyError::TooLarge { limit }) => publish_too_large(context, publisher, request, size, limit).await,
        result => result,
    }
}

async fn publish_too_large(
    context: &RequestContext,
    publisher: &Publisher,
    request: &Request,
    size: usize,
    limit: usize,
) -> Result<(), ReplyError> {
    context.dispatcher.metrics().reply_too_large();
    let correlation_id = request.correlation_id.as_ref().map(|c| c.as_str());
    warn!(size, limit, ?correlation_id, "the reply is too large to publish; replying with an internal error instead");
    match Reply::too_large(request, size, limit) {
        Some(small) => publisher.publish(&small, context).await,
        None => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
enum ReplyError {
    #[error("failed to publish the reply")]
    Publish(#[source] lapin::Error),
    #[error("the broker nacked the reply")]
    Nacked,
    #[error("the broker refused the reply: larger than its max_message_size of {limit} bytes")]
    TooLarge { limit: usize },
    /// The confirm did not come while the worker drained, or within [`REPLY_CONFIRM_LIMIT`] (the session is then
    /// torn down). The reply may still be delivered: the request is left to the closing session, never nacked here.
    #[error("no confirm for the reply ({0})")]
    Unconfirmed(GiveUp),
}

/// The reply connection and its channel (publisher confirms). The broker may close the channel under a live
/// connection (a reply over `max_message_size` gets 406 PRECONDITION_FAILED): then a new channel is opened.
struct Publisher {
    connection: Connection,
    channel: Mutex<Channel>,
    /// Signalled when the session must be replaced: the reply connection died under it, or a confirm never came.
    broken: Notify,
    /// Why, for the log.
    broken_reason: std::sync::Mutex<&'static str>,
    /// When the session began draining for shutdown: late confirms are then waited for a bounded time only.
    drain_began: std::sync::OnceLock<Instant>,
    /// Replies whose confirms were given up on.
    unconfirmed: AtomicU64,
    metrics: Arc<Metrics>,
    blocked_watch: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn new(connection: Connection, channel: Channel, metrics: Arc<Metrics>) -> Self {
        // The broker tells a publishing connection when it blocks it (memory or disk alarm) and unblocks it.
        let events = connection.events_listener();
        let watch_metrics = metrics.clone();
        let blocked_watch = tokio::spawn(async move {
            futures::pin_mut!(events);
            while let Some(event) = events.next().await {
                match event {
                    Event::ConnectionBlocked(reason) => {
                        warn!(%reason, "the broker blocks the reply connection; replies (and so acks) wait for it");
                        watch_metrics.set_publisher_blocked(true);
                    }
                    Event::ConnectionUnblocked => {
                        info!("the broker unblocked the reply connection");
                        watch_metrics.set_publisher_blocked(false);
                    }
                    _ => {}
                }
            }
            watch_metrics.set_publisher_blocked(false);
        });
        Self {
            connection,
            channel: Mutex::new(channel),
            broken: Notify::new(),
            broken_reason: std::sync::Mutex::new("the reply connection closed"),
            drain_began: std::sync::OnceLock::new(),
            unconfirmed: AtomicU64::new(0),
            metrics,
            blocked_watch,
        }
    }

    fn is_broken(&self) -> bool {
        !self.connection.status().connected()
    }

    /// Asks the session to end (it is then replaced): `reason` is logged.
    fn tear_down(&self, reason: &'static str) {
        *self.broken_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.broken.notify_one();
    }

    /// Completes once the session must be replaced, with the reason; cancel-safe.
    async fn torn_down(&self) -> &'static str {
        self.broken.notified().await;
        *self.broken_reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// From now on, late confirms are waited for at most [`DRAIN_CONFIRM_WAIT`].
    fn draining(&self) {
        let _ = self.drain_began.set(Instant::now());
    }

    /// The open reply channel, opening a new one when the broker closed the last.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        let mut current = self.channel.lock().await;
        if current.status().connected() {
            return Ok(current.clone());
        }
        let fresh = open_reply_channel(&self.connection).await?;
        debug!("opened a new reply channel");
        *current = fresh.clone();
        Ok(fresh)
    }

    async fn publish(&self, reply: &Reply, context: &RequestContext) -> Result<(), ReplyError> {
        let mut attempt = 1;
        loop {
            let result = match self.channel().await {
                Ok(channel) => match self.publish_on(&channel, reply).await {
                    Ok(confirmation) => Ok(confirmation),
                    Err(Unconfirmed::GaveUp(why)) => return Err(ReplyError::Unconfirmed(why)),
                    Err(Unconfirmed::Failed(error)) => Err((Some(channel), error)),
                },
                Err(error) => Err((None, error)),
            };
            let (channel, error) = match result {
                Ok(confirmation) if confirmation.is_nack() => return Err(ReplyError::Nacked),
                Ok(_) => return Ok(()),
                Err(failure) => failure,
            };
            if self.is_broken() {
                self.tear_down("the reply connection closed");
                return Err(ReplyError::Publish(error));
            }
            if channel.is_some_and(|c| c.status().connected()) {
                // The channel is fine, and yet the publish failed: the session is presumably dying.
                return Err(ReplyError::Publish(error));
            }
            // The broker closed the reply channel, maybe because of this very reply.
            if let Some(max) = refused_for_size(&error) {
                context.broker_max_message_size.fetch_min(max, Ordering::Relaxed);
                if reply.body.len() > max {
                    return Err(ReplyError::TooLarge { limit: max });
                }
            }
            if attempt >= REPLY_ATTEMPTS {
                return Err(ReplyError::Publish(error));
            }
            debug!(%error, attempt, "the reply channel closed under the reply; publishing it again on a new channel");
            attempt += 1;
        }
    }

    /// Publishes and waits for the confirm: a confirm that does not come is a reply that may still go out, and
    /// timing out would requeue a request whose reply is delivered later (it would run twice, the caller get two
    /// replies). Late confirms are only counted and logged (see [`ConfirmWait`]).
    async fn publish_on(&self, channel: &Channel, reply: &Reply) -> Result<Confirmation, Unconfirmed> {
        let confirm = async {
            channel
                .basic_publish(
                    "".into(),
                    reply.routing_key.clone(),
                    BasicPublishOptions::default(),
                    &reply.body,
                    reply.properties.clone(),
                )
                .await?
                .await
        };
        futures::pin_mut!(confirm);
        let published = Instant::now();
        // Almost always a matter of milliseconds.
        if let Ok(result) = tokio::time::timeout(REPLY_CONFIRM_LATE, &mut confirm).await {
            return result.map_err(Unconfirmed::Failed);
        }
        // Chosen: await late confirms while the channel lives (a timeout re-runs requests whose replies still go out).
        self.metrics.reply_confirm_late();
        let correlation_id = reply.properties.correlation_id().as_ref().map(|c| c.as_str());
        let reply_to = reply.routing_key.as_str();
        let mut wait = ConfirmWait::new(published);
        loop {
            let blocked = self.connection.status().blocked();
            let open = channel.status().connected() && self.connection.status().connected();
            let now = Instant::now();
            match wait.check(now, Link { blocked, open }, self.drain_began.get().copied()) {
                Check::Wait => {}
                Check::Warn if blocked => {
                    debug!(waited = ?now - published, "the broker blocks the reply connection; still waiting for the confirm");
                }
                Check::Warn => warn!(
                    waited = ?now - published,
                    ?correlation_id,
                    reply_to,
                    "the broker has not confirmed the reply yet; still waiting (timing out could run the request twice)"
                ),
                Check::GiveUp(why) => {
                    self.unconfirmed.fetch_add(1, Ordering::Relaxed);
                    match why {
                        GiveUp::Draining => warn!(
                            waited = ?now - published,
                            ?correlation_id,
                            reply_to,
                            "shutting down without the reply's confirm: the request returns to the queue when the \
                             connections close, and runs again if the reply was lost"
                        ),
                        GiveUp::Limit => {
                            warn!(
                                waited = ?now - published,
                                ?correlation_id,
                                reply_to,
                                "no confirm for the reply while the connection lives: the reply channel is presumed \
                                 wedged; replacing the session (its unacked requests return to the queue)"
                            );
                            self.tear_down("a reply's confirm never came");
                        }
                    }
                    return Err(Unconfirmed::GaveUp(why));
                }
                // As if lapin had failed the confirm: the reply is published again on a new channel.
                Check::Closed => {
                    return Err(Unconfirmed::Failed(lapin::Error::from(ErrorKind::IOError(Arc::new(
                        std::io::Error::other("the reply channel closed without settling the reply's confirm"),
                    )))));
                }
            }
            if let Ok(result) = tokio::time::timeout(REPLY_CONFIRM_CHECK, &mut confirm).await {
                if result.is_ok() {
                    info!(waited = ?published.elapsed(), ?correlation_id, "the late confirm of the reply came");
                }
                return result.map_err(Unconfirmed::Failed);
            }
        }
    }
}

/// How a reply's confirm failed to come.
#[derive(Debug)]
enum Unconfirmed {
    /// The publish or the confirm failed (the channel or the connection closed, or the publish was refused).
    Failed(lapin::Error),
    /// The worker stopped waiting.
    GaveUp(GiveUp),
}

/// Why the worker stopped waiting for a confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum GiveUp {
    #[error("the worker drains for shutdown")]
    Draining,
    #[error("none within {REPLY_CONFIRM_LIMIT:?} while the connection lived")]
    Limit,
}

/// The reply connection as a late confirm's wait sees it.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// The broker blocks the connection (memory or disk alarm): the reply is held back, not lost.
    blocked: bool,
    /// The reply channel and its connection are open.
    open: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Check {
    Wait,
    /// Log that the confirm is still awaited.
    Warn,
    /// The channel or the connection was seen closed twice and lapin has not failed the confirm: fail it.
    Closed,
    GiveUp(GiveUp),
}

/// The wait for one late confirm. The worker keeps waiting while the reply channel and its connection live (a
/// closed channel or connection fails the confirm; heartbeats tell a dead connection), because timing out would
/// requeue (or leave to a dying session) a request whose reply may still be confirmed and delivered: it would run
/// twice. Only three things end the wait: the drain ([`DRAIN_CONFIRM_WAIT`]), [`REPLY_CONFIRM_LIMIT`], and a
/// channel seen closed at two checks in a row without lapin failing the confirm (a safety net). Time the broker
/// blocks the connection counts towards neither bound.
#[derive(Debug)]
struct ConfirmWait {
    published: Instant,
    last_check: Instant,
    last_warning: Option<Instant>,
    /// Time waited while the connection was not blocked.
    unblocked: Duration,
    /// `unblocked` when the drain began (zero when it began before the publish).
    drain_mark: Option<Duration>,
    closed_seen: bool,
}

impl ConfirmWait {
    fn new(published: Instant) -> Self {
        Self {
            published,
            last_check: published,
            last_warning: None,
            unblocked: Duration::ZERO,
            drain_mark: None,
            closed_seen: false,
        }
    }

    /// What to do at `now`, the confirm not having come (the time since the last check counts as unblocked when
    /// the connection is not blocked now).
    fn check(&mut self, now: Instant, link: Link, drain_began: Option<Instant>) -> Check {
        if !link.blocked {
            self.unblocked += now.saturating_duration_since(self.last_check);
        }
        self.last_check = now;
        if !link.open {
            if self.closed_seen {
                return Check::Closed;
            }
            self.closed_seen = true;
        }
        if let Some(began) = drain_began {
            // The time since the shutdown counts as unblocked unless the connection is blocked now.
            let since = if link.blocked { Duration::ZERO } else { now.saturating_duration_since(began) };
            let mark = *self.drain_mark.get_or_insert(self.unblocked.saturating_sub(since));
            if self.unblocked.saturating_sub(mark) >= DRAIN_CONFIRM_WAIT {
                return Check::GiveUp(GiveUp::Draining);
            }
        }
        if self.unblocked >= REPLY_CONFIRM_LIMIT {
            return Check::GiveUp(GiveUp::Limit);
        }
        let since = self.last_warning.unwrap_or(self.published);
        let interval = if self.last_warning.is_none() { REPLY_CONFIRM_LATE } else { REPLY_CONFIRM_WARN_INTERVAL };
        if now.saturating_duration_since(since) >= interval {
            self.last_warning = Some(now);
            return Check::Warn;
        }
        Check::Wait
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.blocked_watch.abort();
    }
}

async fn open_reply_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// The broker's `max_message_size` when `error` is its refusal of a message over it: RabbitMQ closes the channel
/// with 406 PRECONDITION_FAILED "message size N is larger than configured max size M".
fn refused_for_size(error: &lapin::Error) -> Option<usize> {
    let ErrorKind::ProtocolError(amqp) = error.kind() else { return None };
    if *amqp.kind() != AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
        return None;
    }
    max_size_in(amqp.get_message().as_str())
}

fn max_size_in(message: &str) -> Option<usize> {
    let (_, after) = message.split_once("larger than configured max size")?;
    after.trim().trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()
}

fn retry(error: lapin::Error) -> OpenError {
    OpenError::Retry(error.to_string())
}

fn is_soft_error(error: &lapin::Error, expected: AMQPSoftError) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(e) if *e.kind() == AMQPErrorKind::Soft(expected))
}

async fn close(connection: &Connection, reason: &str) {
    if !connection.status().connected() {
        return;
    }
    match tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, reason.into())).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => debug!(%error, "closing the connection failed"),
        Err(_) => debug!("closing the connection timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_from_the_brokers_refusal() {
        let message = "PRECONDITION_FAILED - message size 3145767 is larger than configured max size 1048576";
        assert_eq!(max_size_in(message), Some(1_048_576));
        assert_eq!(max_size_in("PRECONDITION_FAILED - inequivalent arg 'x-queue-type'"), None);
    }

    use Settlement::{Ack, Leave, Requeue};

    fn ack(tag: DeliveryTag, multiple: bool) -> Frame {
        Frame::Ack { tag, multiple }
    }

    #[test]
    fn a_contiguous_run_of_answers_is_one_multiple_ack() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.plan([(2, Ack), (1, Ack), (3, Ack)]), [ack(3, true)]);
        assert_eq!(ledger.plan([(4, Ack)]), [ack(4, false)]);
        assert_eq!(ledger.floor, 4);
    }

    #[test]
    fn a_request_still_running_stops_the_run_and_later_answers_are_acked_alone() {
        let mut ledger = Ledger::default();
        // 2 still runs: 1 is acked, 3 and 4 on their own, never by a `multiple` ack that would cover 2.
        assert_eq!(ledger.plan([(1, Ack), (3, Ack), (4, Ack)]), [ack(1, false), ack(3, false), ack(4, false)]);
        // 2 answered: the run continues over 3 and 4 (settled already) to 5.
        assert_eq!(ledger.plan([(5, Ack), (2, Ack)]), [ack(5, true)]);
        assert_eq!((ledger.floor, ledger.settled.len()), (5, 0));
    }

    #[test]
    fn a_requeue_goes_out_before_any_multiple_ack_covering_it() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.plan([(1, Ack), (2, Requeue), (3, Ack)]), [Frame::Requeue { tag: 2 }, ack(3, true)]);
        // A requeue in an earlier batch is settled: the run goes over it.
        assert_eq!(ledger.plan([(5, Requeue)]), [Frame::Requeue { tag: 5 }]);
        assert_eq!(ledger.plan([(4, Ack), (6, Ack)]), [ack(6, true)]);
    }

    #[test]
    fn a_request_left_to_a_dying_session_is_never_covered_by_an_ack() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.plan([(1, Leave), (2, Ack), (3, Ack)]), [ack(2, false), ack(3, false)]);
        assert_eq!(ledger.floor, 0);
    }

    const UP: Link = Link { blocked: false, open: true };
    const BLOCKED: Link = Link { blocked: true, open: true };

    /// Checks `wait` every second from `from` to `to` seconds after the publish; the checks that were not `Wait`.
    fn checks(wait: &mut ConfirmWait, from: u64, to: u64, link: Link, drain: Option<Instant>) -> Vec<(u64, Check)> {
        let published = wait.published;
        (from..=to)
            .map(|s| (s, wait.check(published + Duration::from_secs(s), link, drain)))
            .filter(|(_, check)| *check != Check::Wait)
            .collect()
    }

    #[test]
    fn a_late_confirm_is_waited_for_with_a_warning_every_30_s_until_the_limit() {
        let published = Instant::now();
        let mut wait = ConfirmWait::new(published);
        let limit = REPLY_CONFIRM_LIMIT.as_secs();
        let seen = checks(&mut wait, 10, limit, UP, None);
        let warnings: Vec<u64> = seen.iter().filter(|(_, c)| *c == Check::Warn).map(|(s, _)| *s).collect();
        assert_eq!(warnings, (10..limit).step_by(30).collect::<Vec<_>>());
        assert_eq!(seen.last(), Some(&(limit, Check::GiveUp(GiveUp::Limit))));
    }

    #[test]
    fn time_blocked_by_the_broker_counts_towards_no_bound() {
        let published = Instant::now();
        let mut wait = ConfirmWait::new(published);
        // An hour of memory alarm, then the limit counts from the unblocking.
        assert!(!checks(&mut wait, 10, 3600, BLOCKED, None).iter().any(|(_, c)| matches!(c, Check::GiveUp(_))));
        let limit = REPLY_CONFIRM_LIMIT.as_secs();
        let give_up = checks(&mut wait, 3601, 3600 + limit + 1, UP, None).into_iter().find(|(_, c)| *c != Check::Warn);
        assert_eq!(give_up, Some((3600 + limit, Check::GiveUp(GiveUp::Limit))));
    }

    #[test]
    fn the_drain_waits_for_a_late_confirm_10_s_after_the_later_of_publish_and_shutdown() {
        let published = Instant::now();
        // Shutdown before the publish: 10 s after the publish, at the first check.
        let mut wait = ConfirmWait::new(published);
        let before = Some(published - Duration::from_secs(3));
        assert_eq!(wait.check(published + DRAIN_CONFIRM_WAIT, UP, before), Check::GiveUp(GiveUp::Draining));
        // Shutdown before the confirm is late: 10 s after the shutdown.
        let mut wait = ConfirmWait::new(published);
        let early = Some(published + Duration::from_secs(3));
        assert_eq!(checks(&mut wait, 10, 13, UP, early), [(10, Check::Warn), (13, Check::GiveUp(GiveUp::Draining))]);
        // Shutdown while the confirm is late already: 10 s more.
        let mut wait = ConfirmWait::new(published);
        assert_eq!(checks(&mut wait, 10, 60, UP, None).len(), 2);
        let during = Some(published + Duration::from_secs(60));
        assert_eq!(checks(&mut wait, 61, 70, UP, during), [(70, Check::GiveUp(GiveUp::Draining))]);
        // Time blocked during the drain does not count.
        let mut wait = ConfirmWait::new(published);
        let _ = checks(&mut wait, 10, 10, UP, early);
        assert_eq!(checks(&mut wait, 11, 100, BLOCKED, early).len(), 3);
        assert_eq!(checks(&mut wait, 101, 103, UP, early), [(103, Check::GiveUp(GiveUp::Draining))]);
    }

    #[test]
    fn a_channel_seen_closed_twice_fails_the_confirm() {
        let published = Instant::now();
        let mut wait = ConfirmWait::new(published);
        let closed = Link { blocked: false, open: false };
        assert_eq!(wait.check(published + Duration::from_secs(10), UP, None), Check::Warn);
        assert_eq!(wait.check(published + Duration::from_secs(11), closed, None), Check::Wait);
        assert_eq!(wait.check(published + Duration::from_secs(12), closed, None), Check::Closed);
    }

    #[test]
    fn a_worker_with_a_probe_starts_unavailable() {
        let http = Handlers::new().probe(|| async { true });
        assert!(!Worker::builder("amqp://x", "q").handlers(http).build().context.availability.is_up());
        assert!(Worker::builder("amqp://x", "q").build().context.availability.is_up());
    }

    #[test]
    fn the_own_queues_are_never_reply_addresses() {
        let policy = ReplyToPolicy::new(&["*"]).unwrap();
        let worker = Worker::builder("amqp://x", "svc").reply_to_policy(policy).build();
        assert!(!worker.context.reply_to.allows("svc"));
        assert!(!worker.context.reply_to.allows("svc.dead"));
        assert!(worker.context.reply_to.allows("other"));
    }
}
