//! The consume → handle → reply → ack loop, across broker sessions.
//!
//! A session is one AMQP connection with two channels: one consuming the request queue (manual acks, prefetch)
//! and one publishing replies (publisher confirms). Per request: run the handler, publish the reply and wait for
//! its confirm, then ack. When the session dies, its unacked requests go back to the queue on the broker side;
//! handlers still running finish, but their replies and acks go nowhere (an ack on a dead channel is a no-op in
//! lapin, never sent on the next session). The worker reconnects with backoff and consumes again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ErrorKind};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};
use warren_client::topology::{QueueOptions, declare_service_queues};

use crate::backoff::Backoff;
use crate::dispatch::Dispatcher;
use crate::handler::Handlers;
use crate::metrics::Metrics;
use crate::reply::Reply;
use crate::request::Request;

/// The default prefetch: requests a worker holds unacked, and so runs concurrently.
pub const DEFAULT_PREFETCH: u16 = 32;

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

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid broker URI: {0}")]
    InvalidUri(String),
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
    dispatcher: Dispatcher,
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
}

impl Worker {
    /// A worker consuming `queue` on the broker at `uri` (`amqp://user:pass@host:5672/%2f`).
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
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Serves until `shutdown` completes, then cancels the consumer, finishes, replies to and acks every request
    /// already received, closes the connection and returns. Broker loss is retried forever; only configuration
    /// errors that no retry can fix end it early.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), WorkerError> {
        let mut uri: AMQPUri = self.uri.parse().map_err(WorkerError::InvalidUri)?;
        uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
        let mut shutdown = Shutdown::new(shutdown);
        let mut attempt: u32 = 0;
        let mut sessions: u64 = 0;
        loop {
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
                    let delay = self.backoff.random_delay(attempt);
                    warn!(queue = %self.queue, %error, attempt, retry_in = ?delay, "could not start consuming");
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
            let started = Instant::now();
            match session.serve(&self, &mut shutdown).await {
                SessionEnd::Shutdown => {
                    if session.drain_and_close().await {
                        info!(queue = %self.queue, "stopped: every received request was answered");
                    } else {
                        warn!(queue = %self.queue, "stopped; the session died while draining: the broker redelivers");
                    }
                    return Ok(());
                }
                SessionEnd::Lost(reason) => {
                    warn!(queue = %self.queue, %reason, "broker session lost; unacked requests return to the queue");
                    session.abandon().await;
                    // A session that dies right after it opened counts as a failed attempt, so it cannot spin.
                    if started.elapsed() >= STABLE_SESSION {
                        attempt = 0;
                    }
                    let delay = self.backoff.random_delay(attempt);
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

    pub fn build(self) -> Worker {
        let metrics = self.metrics.unwrap_or_default();
        Worker {
            dispatcher: Dispatcher::new(self.handlers, self.default_method, metrics.clone()),
            uri: self.uri,
            queue: self.queue,
            prefetch: self.prefetch,
            declare: self.declare,
            backoff: self.backoff,
            metrics,
        }
    }

    /// `build().run(shutdown)`.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), WorkerError> {
        self.build().run(shutdown).await
    }
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

/// One connection: the consuming channel, the reply channel, and the requests received on them.
struct Session {
    connection: Connection,
    consume_channel: Channel,
    consumer: Consumer,
    consumer_tag: String,
    replies: Arc<ReplyChannel>,
    /// Every spawned request holds a sender; all dropped = nothing in flight.
    in_flight: Option<mpsc::Sender<()>>,
    in_flight_done: mpsc::Receiver<()>,
}

/// A session's channels, before they are tied to their connection.
struct SessionParts {
    consume_channel: Channel,
    consumer: Consumer,
    consumer_tag: String,
    reply_channel: Channel,
}

impl SessionParts {
    fn into_session(self, connection: Connection) -> Session {
        let (in_flight, in_flight_done) = mpsc::channel(1);
        Session {
            connection,
            consume_channel: self.consume_channel,
            consumer: self.consumer,
            consumer_tag: self.consumer_tag,
            replies: Arc::new(ReplyChannel { channel: self.reply_channel, broken: Notify::new() }),
            in_flight: Some(in_flight),
            in_flight_done,
        }
    }
}

static CONSUMER_SEQ: AtomicU64 = AtomicU64::new(0);

impl Session {
    async fn open(worker: &Worker, uri: AMQPUri) -> Result<Self, OpenError> {
        let properties =
            ConnectionProperties::default().with_connection_name(format!("warren-worker {}", worker.queue).into());
        let connection = Connection::connect_uri(uri, properties).await.map_err(retry)?;
        match Self::start(worker, &connection).await {
            Ok(parts) => Ok(parts.into_session(connection)),
            Err(error) => {
                close(&connection, "could not start consuming").await;
                Err(error)
            }
        }
    }

    async fn start(worker: &Worker, connection: &Connection) -> Result<SessionParts, OpenError> {
        let consume_channel = connection.create_channel().await.map_err(retry)?;
        if let Some(options) = &worker.declare {
            declare_service_queues(&consume_channel, &worker.queue, options).await.map_err(|error| {
                if is_soft_error(&error, AMQPSoftError::PRECONDITIONFAILED) {
                    OpenError::Fatal(WorkerError::QueueConflict { queue: worker.queue.clone(), source: error })
                } else {
                    OpenError::Retry(error.to_string())
                }
            })?;
        }
        let reply_channel = connection.create_channel().await.map_err(retry)?;
        reply_channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(retry)?;
        consume_channel.basic_qos(worker.prefetch, BasicQosOptions { global: false }).await.map_err(retry)?;
        let consumer_tag =
            format!("warren-worker-{}-{}", std::process::id(), CONSUMER_SEQ.fetch_add(1, Ordering::Relaxed));
        let consumer = consume_channel
            .basic_consume(
                worker.queue.as_str().into(),
                consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|error| {
                if is_soft_error(&error, AMQPSoftError::NOTFOUND) && worker.declare.is_none() {
                    warn!(queue = %worker.queue, "the queue does not exist (run with --declare to create it)");
                }
                retry(error)
            })?;
        Ok(SessionParts { consume_channel, consumer, consumer_tag, reply_channel })
    }

    /// Receives and spawns requests until shutdown (consumer cancelled and drained) or the session dies.
    async fn serve(&mut self, worker: &Worker, shutdown: &mut Shutdown) -> SessionEnd {
        worker.metrics.set_consuming(true);
        info!(queue = %worker.queue, prefetch = worker.prefetch, "consuming");
        let mut cancelling = false;
        let mut last_error = None;
        let end = loop {
            tokio::select! {
                biased;
                _ = shutdown.requested(), if !cancelling => {
                    cancelling = true;
                    worker.metrics.set_consuming(false);
                    info!(queue = %worker.queue, "shutting down: cancelling the consumer, finishing requests in flight");
                    // Requests already delivered still arrive on the stream, which ends after the cancel-ok.
                    let tag = self.consumer_tag.as_str().into();
                    if let Err(error) = self.consume_channel.basic_cancel(tag, BasicCancelOptions::default()).await {
                        warn!(%error, "could not cancel the consumer");
                    }
                }
                _ = self.replies.broken.notified() => {
                    break SessionEnd::Lost("the reply channel closed".into());
                }
                delivery = self.consumer.next() => match delivery {
                    Some(Ok(delivery)) => self.spawn(delivery, worker),
                    // Always followed by `None`.
                    Some(Err(error)) => last_error = Some(error),
                    None if cancelling => break SessionEnd::Shutdown,
                    None => break SessionEnd::Lost(match last_error.take() {
                        Some(error) => error.to_string(),
                        None => "the broker cancelled the consumer (queue deleted?)".into(),
                    }),
                }
            }
        };
        worker.metrics.set_consuming(false);
        end
    }

    fn spawn(&self, delivery: Delivery, worker: &Worker) {
        let dispatcher = worker.dispatcher.clone();
        let replies = self.replies.clone();
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            handle(delivery, &dispatcher, &replies).await;
            drop(in_flight);
        });
    }

    /// Waits for every request of this session to be answered and acked, then closes the connection; false if
    /// the connection died meanwhile (then some requests may not have been answered).
    async fn drain_and_close(mut self) -> bool {
        self.in_flight.take();
        while self.in_flight_done.recv().await.is_some() {}
        let alive = self.connection.status().connected();
        close(&self.connection, "worker shutting down").await;
        alive
    }

    /// Gives up on the session: its handlers keep running, but nothing they send can reach the broker.
    async fn abandon(self) {
        close(&self.connection, "session lost").await;
    }
}

/// How long a reply confirm or an ack may take before its session is presumed dead.
const REPLY_CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Handler → reply (confirmed) → ack, for one delivery.
async fn handle(delivery: Delivery, dispatcher: &Dispatcher, replies: &ReplyChannel) {
    let metrics = dispatcher.metrics();
    let _gauge = metrics.in_flight();
    let request = Request::from_properties(&delivery.properties);
    let handled = dispatcher.handle(&request, &delivery.data, delivery.redelivered, SystemTime::now()).await;
    metrics.request_done(&handled.method_label, handled.outcome.label());
    debug!(method = %handled.method_label, outcome = handled.outcome.label(), "handled");

    if let Some(reply) = Reply::to(&request, &handled.outcome)
        && let Err(error) = replies.publish(&reply).await
    {
        metrics.reply_failed();
        // A broken session requeues the request on the broker side; otherwise give it back ourselves.
        if delivery.acker.usable() && !replies.is_broken() {
            warn!(%error, "the reply was not published; requeueing the request");
            // Bounded like the ack: the session may be dying without having noticed yet.
            let requeue = delivery.acker.nack(BasicNackOptions { multiple: false, requeue: true });
            let _ = tokio::time::timeout(REPLY_CONFIRM_TIMEOUT, requeue).await;
        } else {
            debug!(%error, "reply lost with its session; the broker redelivers the request");
        }
        return;
    }
    let acked = tokio::time::timeout(REPLY_CONFIRM_TIMEOUT, delivery.acker.ack(BasicAckOptions::default())).await;
    let Ok(acked) = acked else {
        debug!("no answer to the ack; the broker redelivers the request if it was lost");
        return;
    };
    match acked {
        Ok(true) => {}
        Ok(false) => debug!("the channel closed before the ack; the broker redelivers the request"),
        Err(error) => debug!(%error, "ack failed; the broker redelivers the request"),
    }
}

/// The channel replies are published on, with publisher confirms.
struct ReplyChannel {
    channel: Channel,
    /// Signalled when the channel died under a live session, so the session is replaced.
    broken: Notify,
}

#[derive(Debug, thiserror::Error)]
enum ReplyError {
    #[error("failed to publish the reply")]
    Publish(#[source] lapin::Error),
    #[error("the broker nacked the reply")]
    Nacked,
}

impl ReplyChannel {
    async fn publish(&self, reply: &Reply) -> Result<(), ReplyError> {
        let confirm = async {
            self.channel
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
        // A confirm lost with a dying connection must not hold the request (and the drain) forever.
        let confirm = async {
            tokio::time::timeout(REPLY_CONFIRM_TIMEOUT, confirm).await.unwrap_or_else(|_| {
                Err(lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no publisher confirm for the reply",
                )))))
            })
        };
        match confirm.await {
            Ok(confirmation) if confirmation.is_nack() => Err(ReplyError::Nacked),
            Ok(_) => Ok(()),
            Err(error) => {
                if self.is_broken() {
                    self.broken.notify_one();
                }
                Err(ReplyError::Publish(error))
            }
        }
    }

    fn is_broken(&self) -> bool {
        !self.channel.status().connected()
    }
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
