//! The caller: one connection, one channel, many concurrent calls multiplexed over direct reply-to.
//!
//! Calls are published `mandatory` on a channel in confirm mode. The reply itself proves the request arrived; the
//! confirm is there for the requests that never will be answered: lapin 4 hands a returned request (`basic.return`,
//! no queue of that name) only to a publisher confirm, as `Confirmation::Ack(Some(returned))`, and a nack means the
//! queue refused the request (full, `reject-publish`). Each call awaits its own confirm alongside its reply, inside
//! its own future (no task, no timer: nothing runs while calls wait), and keeps waiting on a plain ack.
//!
//! lapin pairs a return with whichever confirm the next ack completes (a `multiple` ack completes several in no
//! set order), so a returned request is routed by its `correlation_id`, not to the call whose confirm carried it.
//! A call that ends before its confirm (reply first, timeout, cancelled) hands the confirm to the session's
//! [`settle_orphan_confirms`] task, which routes any return it carries and otherwise just lets it go; lapin would
//! keep a dropped, unresolved confirm until the next `wait_for_confirms`, which this client never calls.
//!
//! One-way calls (`notify`) use a second confirmed channel: their requests carry no `correlation_id`, so a return
//! of theirs that lapin paired with a call's confirm could not be routed back.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::message::{Delivery, DeliveryResult};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Consumer, ConsumerDelegate, PublisherConfirm};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::broker_uri::{BrokerAddresses, Redacted};
use crate::envelope::{self, RequestMeta, TraceContext};
use crate::error::CallError;
use crate::failover::Rotation;
use crate::pending::{Outcome, PendingCalls};
use crate::protocol::DIRECT_REPLY_TO;

/// How long opening a connection (TCP, TLS, the AMQP handshake, the reply channel) may take by default: a broker
/// address that accepts TCP but never answers must not hang a caller for minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed reconnect, calls fail at once with [`CallError::Connection`] for this long before the next try.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// How long [`Client::notify`] waits for the broker to take the request.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-call settings beyond the method and params.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// How long to wait for the reply; also sent as `expiration` and `x-deadline`.
    pub timeout: Duration,
    /// W3C trace context to send with the request.
    pub trace: Option<TraceContext>,
}

impl CallOptions {
    pub fn timeout(timeout: Duration) -> Self {
        Self { timeout, trace: None }
    }
}

/// A connection to the broker that calls warren services. Cheap to clone; clones share the connection.
///
/// When the connection is lost every waiting call fails with [`CallError::Connection`]; the next call opens a new
/// connection (at most one attempt per [`RECONNECT_INTERVAL`]; in between, calls fail at once). A URI of several
/// nodes (`amqp://user:pass@rabbit-0,rabbit-1,rabbit-2/%2f`) is tried from a random node on, and every new
/// connection starts at the node after the one that was lost.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    addresses: BrokerAddresses,
    /// The node the next connection attempt goes to.
    rotation: Rotation,
    connect_timeout: Duration,
    session: RwLock<Arc<Session>>,
    /// Serialises reconnects and remembers the last failed one.
    reconnect: tokio::sync::Mutex<Option<(Instant, lapin::Error)>>,
    unmatched_replies: Arc<AtomicU64>,
}

impl Client {
    /// Connects to the broker at `uri` (`amqp://user:pass@host:port/vhost`, or several nodes:
    /// `amqp://user:pass@host:port,host:port/vhost`), giving up on a node after [`CONNECT_TIMEOUT`].
    pub async fn connect(uri: &str) -> Result<Client, CallError> {
        Self::connect_with_timeout(uri, CONNECT_TIMEOUT).await
    }

    /// [`Client::connect`] giving up on a node after `timeout` (reconnects later are bounded by it too), after
    /// trying each node once. A malformed `uri` is [`CallError::InvalidRequest`], whose message never contains the
    /// URI's password.
    pub async fn connect_with_timeout(uri: &str, timeout: Duration) -> Result<Client, CallError> {
        let addresses = BrokerAddresses::parse(uri).map_err(|e| CallError::InvalidRequest(e.to_string()))?;
        let rotation = Rotation::random(addresses.len());
        let unmatched_replies = Arc::new(AtomicU64::new(0));
        let session = Session::open_first(&addresses, &rotation, timeout, &unmatched_replies).await?;
        Ok(Client {
            shared: Arc::new(Shared {
                addresses,
                rotation,
                connect_timeout: timeout,
                session: RwLock::new(Arc::new(session)),
                reconnect: tokio::sync::Mutex::new(None),
                unmatched_replies,
            }),
        })
    }

    /// Calls `method` (`None` = the service's default method) of the service on `queue` and waits up to `timeout`
    /// for its result.
    pub async fn call(
        &self,
        queue: &str,
        method: Option<&str>,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        self.call_with(queue, method, &params, &CallOptions::timeout(timeout)).await
    }

    /// [`Client::call`] with any serialisable params and a trace context.
    pub async fn call_with<P: Serialize + ?Sized>(
        &self,
        queue: &str,
        method: Option<&str>,
        params: &P,
        options: &CallOptions,
    ) -> Result<Value, CallError> {
        let now = Instant::now();
        // Duration::MAX means "wait as long as it takes": a year is that on any human scale.
        let deadline = now.checked_add(options.timeout).unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        let body = encode_params(params)?;
        let routing_key = envelope::short_string("queue", queue)?;
        let outcome = tokio::time::timeout_at(deadline, async {
            let session = self.live_session().await?;
            let mut waiter = session.calls.register()?;
            let props = envelope::request_properties(RequestMeta {
                method,
                correlation_id: Some(waiter.seq.to_string().into()),
                reply_to: Some(DIRECT_REPLY_TO.into()),
                message_id: session.message_id(waiter.seq),
                timeout: Some(options.timeout),
                now_unix_ms: envelope::unix_ms_now(),
                trace: options.trace.as_ref(),
            })?;
            let mandatory = BasicPublishOptions { mandatory: true, ..Default::default() };
            let confirm = session.channel.basic_publish("".into(), routing_key, mandatory, &body, props).await?;
            let mut confirm = ConfirmGuard { confirm: Some(confirm), orphans: &session.orphan_confirms };
            // The reply first: once it is there the confirm no longer matters (the guard hands it on).
            loop {
                tokio::select! {
                    biased;
                    outcome = waiter.outcome() => break Ok::<_, CallError>(outcome),
                    confirmation = confirm.wait(), if confirm.is_pending() => {
                        if let Some(outcome) = settle_confirm(&session.calls, confirmation) {
                            break Ok(outcome);
                        }
                    }
                }
            }
        })
        .await
        .map_err(|_| CallError::Timeout)??;
        match outcome {
            Outcome::Reply(delivery) => envelope::decode_reply(&delivery.properties, &delivery.data),
            Outcome::Unroutable => Err(CallError::NoSuchService { queue: queue.to_owned() }),
            Outcome::Nacked => Err(CallError::Rejected { queue: queue.to_owned() }),
            Outcome::Lost(error) => Err(CallError::Connection(error)),
        }
    }

    /// Sends a one-way call (no `reply_to`, nothing comes back). Returns once the broker has taken the request:
    /// [`CallError::NoSuchService`] when no queue has that name, [`CallError::Rejected`] when the queue is full.
    pub async fn notify(&self, queue: &str, method: Option<&str>, params: Value) -> Result<(), CallError> {
        self.notify_with(queue, method, &params, None).await
    }

    /// [`Client::notify`] with any serialisable params and a trace context.
    pub async fn notify_with<P: Serialize + ?Sized>(
        &self,
        queue: &str,
        method: Option<&str>,
        params: &P,
        trace: Option<&TraceContext>,
    ) -> Result<(), CallError> {
        let body = encode_params(params)?;
        let routing_key = envelope::short_string("queue", queue)?;
        let confirmation = tokio::time::timeout(NOTIFY_TIMEOUT, async {
            let session = self.live_session().await?;
            let seq = session.one_way.fetch_add(1, Ordering::Relaxed);
            let props = envelope::request_properties(RequestMeta {
                method,
                correlation_id: None,
                reply_to: None,
                message_id: session.message_id_one_way(seq),
                timeout: None,
                now_unix_ms: envelope::unix_ms_now(),
                trace,
            })?;
            let mandatory = BasicPublishOptions { mandatory: true, ..Default::default() };
            let channel = session.confirmed_channel().await?;
            let confirm = channel.basic_publish("".into(), routing_key, mandatory, &body, props).await?;
            Ok::<_, CallError>(confirm.await?)
        })
        .await
        .map_err(|_| CallError::Timeout)??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(CallError::NoSuchService { queue: queue.to_owned() })
            }
            Confirmation::Nack(None) => Err(CallError::Rejected { queue: queue.to_owned() }),
        }
    }

    /// Replies that matched no waiting call (late after a timeout, duplicates after a redelivery, foreign ids),
    /// dropped since this client was created.
    pub fn unmatched_replies(&self) -> u64 {
        self.shared.unmatched_replies.load(Ordering::Relaxed)
    }

    /// Calls sent and still waiting for their reply.
    pub fn pending_calls(&self) -> usize {
        self.current().calls.len()
    }

    /// The current connection's name, as the management UI shows it (`warren-client <uuid>`).
    pub fn connection_name(&self) -> String {
        self.current().connection_name()
    }

    /// The node the current connection went to, without the password (`amqp://user@host:port/vhost`).
    pub fn broker_address(&self) -> String {
        self.current().address.clone()
    }

    /// Closes the connection; waiting calls fail with [`CallError::Connection`], later calls reconnect.
    pub async fn close(&self) -> Result<(), CallError> {
        let session = self.current();
        session
            .calls
            .close(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed)));
        session.connection.close(200, "client closed".into()).await?;
        Ok(())
    }

    fn current(&self) -> Arc<Session> {
        self.shared.session.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The open session, reconnecting first when the last one died.
    async fn live_session(&self) -> Result<Arc<Session>, CallError> {
        let session = self.current();
        if !session.is_dead() {
            return Ok(session);
        }
        let mut last_failure = self.shared.reconnect.lock().await;
        // Another call may have reconnected while this one waited for the lock.
        let session = self.current();
        if !session.is_dead() {
            return Ok(session);
        }
        session.fail_waiting_calls();
        if let Some((at, error)) = last_failure.as_ref()
            && at.elapsed() < RECONNECT_INTERVAL
        {
            return Err(CallError::Connection(error.clone()));
        }
        let shared = &self.shared;
        match Session::open_first(
            &shared.addresses,
            &shared.rotation,
            shared.connect_timeout,
            &shared.unmatched_replies,
        )
        .await
        {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *self.shared.session.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                *last_failure = None;
                Ok(fresh)
            }
            Err(error) => {
                *last_failure = Some((Instant::now(), error.clone()));
                Err(CallError::Connection(error))
            }
        }
    }
}

fn encode_params<P: Serialize + ?Sized>(params: &P) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(params).map_err(|e| CallError::InvalidRequest(format!("params are not JSON: {e}")))
}

/// One connection and its channel, with what routes replies and returned requests to waiting calls.
struct Session {
    connection: Connection,
    channel: Channel,
    calls: Arc<PendingCalls>,
    /// Where a call that ends before its confirm leaves the confirm, for [`settle_orphan_confirms`].
    orphan_confirms: mpsc::UnboundedSender<PublisherConfirm>,
    orphans_watch: JoinHandle<()>,
    end_watch: JoinHandle<()>,
    /// The channel of one-way calls, in confirm mode; opened on the first `notify`.
    confirmed: OnceCell<Channel>,
    /// Makes message ids unique across clients and reconnects.
    instance: String,
    /// The node it is connected to, redacted.
    address: String,
    one_way: AtomicU64,
    /// Dropping the consumer cancels it; it lives as long as the session.
    _replies: Consumer,
}

impl Session {
    /// Opens a session on the first node that answers, trying each once from the rotation's next node on (each
    /// within `timeout`). Which node it went to, and why others failed, is logged without the password.
    async fn open_first(
        addresses: &BrokerAddresses,
        rotation: &Rotation,
        timeout: Duration,
        unmatched_replies: &Arc<AtomicU64>,
    ) -> Result<Session, lapin::Error> {
        let mut failures = Vec::new();
        for _ in 0..addresses.len() {
            let uri = addresses.node(rotation.advance());
            match Self::open(uri, timeout, unmatched_replies.clone()).await {
                Ok(session) => {
                    info!(broker = %Redacted(uri), connection = %session.connection_name(), "connected to the broker");
                    return Ok(session);
                }
                Err(error) => {
                    if addresses.len() > 1 {
                        warn!(broker = %Redacted(uri), %error, "could not connect to this node; trying the next");
                    }
                    failures.push((Redacted(uri).to_string(), error));
                }
            }
        }
        if failures.len() == 1 {
            return Err(failures.remove(0).1);
        }
        let tried: Vec<String> = failures.iter().map(|(address, error)| format!("{address}: {error}")).collect();
        Err(lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::other(format!(
            "no broker node answered ({})",
            tried.join("; ")
        ))))))
    }

    /// Opens a session within `timeout`; a broker that never finishes the handshake is a connection error.
    async fn open(
        uri: &AMQPUri,
        timeout: Duration,
        unmatched_replies: Arc<AtomicU64>,
    ) -> Result<Session, lapin::Error> {
        tokio::time::timeout(timeout, Self::open_unbounded(uri, unmatched_replies)).await.unwrap_or_else(|_| {
            Err(lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the broker at {} did not complete the AMQP handshake within {timeout:?}", Redacted(uri)),
            )))))
        })
    }

    async fn open_unbounded(uri: &AMQPUri, unmatched_replies: Arc<AtomicU64>) -> Result<Session, lapin::Error> {
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let properties =
            ConnectionProperties::default().with_connection_name(format!("warren-client {instance}").into());
        let connection = Connection::connect_uri(uri.clone(), properties).await?;
        let channel = connection.create_channel().await?;
        // Confirms bring back the requests no queue takes (see the module doc).
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        // Direct reply-to must be consumed, with no-ack, on the channel that publishes the requests.
        let replies: Consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "warren-replies".into(),
                BasicConsumeOptions { no_ack: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let calls = Arc::new(PendingCalls::default());
        let router = ReplyRouter { calls: calls.clone(), unmatched: unmatched_replies };
        replies.set_delegate(router.clone());
        let end_watch = tokio::spawn(watch_reply_consumer_end(replies.clone(), router));
        let (orphan_confirms, orphans) = mpsc::unbounded_channel();
        let orphans_watch = tokio::spawn(settle_orphan_confirms(orphans, calls.clone()));
        Ok(Session {
            connection,
            channel,
            calls,
            orphan_confirms,
            orphans_watch,
            end_watch,
            confirmed: OnceCell::new(),
            instance,
            address: Redacted(uri).to_string(),
            one_way: AtomicU64::new(0),
            _replies: replies,
        })
    }

    /// Its reply consumer ended, or its channel closed without the consumer hearing of it (a connection that
    /// died mid-recovery): either way nothing published on it can be answered.
    fn is_dead(&self) -> bool {
        self.calls.is_closed() || !self.channel.status().connected()
    }

    fn fail_waiting_calls(&self) {
        if !self.calls.is_closed() {
            warn!(pending = self.calls.len(), "the channel closed; failing the waiting calls and reconnecting");
            self.calls.close(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "the channel closed",
            )));
        }
    }

    fn connection_name(&self) -> String {
        format!("warren-client {}", self.instance)
    }

    fn message_id(&self, seq: u64) -> ShortString {
        format!("{}-{seq}", self.instance).into()
    }

    fn message_id_one_way(&self, seq: u64) -> ShortString {
        format!("{}-n{seq}", self.instance).into()
    }

    async fn confirmed_channel(&self) -> Result<&Channel, lapin::Error> {
        self.confirmed
            .get_or_try_init(|| async {
                let channel = self.connection.create_channel().await?;
                channel.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok(channel)
            })
            .await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The watchers hold channel and consumer handles; stopping them lets the connection close.
        self.orphans_watch.abort();
        self.end_watch.abort();
    }
}

/// Hands each reply to the call waiting on its correlation id and drops the rest. It runs inline on lapin's I/O
/// thread (a delegate, not a stream read by a task), so a reply wakes its caller directly, with no hop in between.
#[derive(Clone)]
struct ReplyRouter {
    calls: Arc<PendingCalls>,
    unmatched: Arc<AtomicU64>,
}

impl ConsumerDelegate for ReplyRouter {
    fn on_new_delivery(&self, delivery: DeliveryResult) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        match delivery {
            Ok(Some(reply)) => self.route(reply),
            Ok(None) => self.lost(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                lapin::ChannelState::Closed,
                "the reply consumer was cancelled",
            ))),
            Err(error) => self.lost(error),
        }
        Box::pin(std::future::ready(()))
    }
}

impl ReplyRouter {
    fn route(&self, reply: Delivery) {
        let id = reply.properties.correlation_id().as_ref().map(ShortString::as_str);
        match id.and_then(|id| id.parse::<u64>().ok()) {
            Some(seq) => {
                if !self.calls.resolve(seq, Outcome::Reply(reply)) {
                    self.unmatched.fetch_add(1, Ordering::Relaxed);
                    debug!(correlation_id = seq, "dropped a reply no call waits for (late or duplicate)");
                }
            }
            None => {
                self.unmatched.fetch_add(1, Ordering::Relaxed);
                warn!(correlation_id = ?id, "dropped a reply with a correlation id this client never sent");
            }
        }
    }

    fn lost(&self, error: lapin::Error) {
        if self.calls.is_closed() {
            debug!(%error, "reply channel closed");
        } else {
            warn!(%error, pending = self.calls.len(), "lost the reply channel; failing the waiting calls");
            self.calls.close(error);
        }
    }
}

/// Fails the waiting calls when the reply consumer ends. lapin 4 drops a consumer's delegate as soon as a graceful
/// close starts (e.g. the broker closing the connection), so the end then reaches only the consumer's stream.
async fn watch_reply_consumer_end(mut replies: Consumer, router: ReplyRouter) {
    use futures::StreamExt;
    while let Some(item) = replies.next().await {
        match item {
            Ok(reply) => router.route(reply),
            Err(error) => router.lost(error),
        }
    }
    router.lost(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
        lapin::ChannelState::Closed,
        "the reply consumer was cancelled",
    )));
}

/// A call's publisher confirm until it resolves. Dropped unresolved (the reply came first, the call timed out or was
/// cancelled), it goes to the session's [`settle_orphan_confirms`] rather than to lapin's store of dropped confirms.
struct ConfirmGuard<'a> {
    confirm: Option<PublisherConfirm>,
    orphans: &'a mpsc::UnboundedSender<PublisherConfirm>,
}

impl ConfirmGuard<'_> {
    fn is_pending(&self) -> bool {
        self.confirm.is_some()
    }

    /// The confirmation; only while [`is_pending`](Self::is_pending). Cancel-safe: the confirm stays until it resolves.
    async fn wait(&mut self) -> lapin::Result<Confirmation> {
        let confirm = self.confirm.as_mut().expect("a pending confirm");
        let confirmation = confirm.await;
        self.confirm = None;
        confirmation
    }
}

impl Drop for ConfirmGuard<'_> {
    fn drop(&mut self) {
        if let Some(confirm) = self.confirm.take() {
            // Fails only once the session is torn down; lapin then drops its pending confirms with the channel.
            let _ = self.orphans.send(confirm);
        }
    }
}

/// What a call's own confirm means for it: `None` to keep waiting for the reply (a plain ack), or the outcome that
/// ends it. A returned request it carries (maybe another call's) goes to the call it belongs to.
fn settle_confirm(calls: &PendingCalls, confirmation: lapin::Result<Confirmation>) -> Option<Outcome> {
    match confirmation {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => None,
        Ok(Confirmation::Ack(Some(returned))) => {
            // Its own return reaches the call through the waiter like any other.
            route_return(calls, returned);
            None
        }
        Ok(Confirmation::Nack(returned)) => {
            if let Some(returned) = returned {
                route_return(calls, returned);
            }
            Some(Outcome::Nacked)
        }
        Err(error) => Some(Outcome::Lost(error)),
    }
}

/// Fails the call whose request the broker returned (`mandatory`, no queue of that name).
fn route_return(calls: &PendingCalls, returned: BasicReturnMessage) {
    let id = returned.delivery.properties.correlation_id().as_ref().map(ShortString::as_str);
    if let Some(seq) = id.and_then(|id| id.parse::<u64>().ok()) {
        calls.resolve(seq, Outcome::Unroutable);
    }
}

/// Waits for the confirms of calls that ended before them and routes the returns they carry. It sleeps until one
/// arrives: in the usual order (confirm, then reply) it never wakes.
async fn settle_orphan_confirms(mut orphans: mpsc::UnboundedReceiver<PublisherConfirm>, calls: Arc<PendingCalls>) {
    use futures::StreamExt;
    use futures::stream::FuturesUnordered;
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            orphan = orphans.recv() => match orphan {
                Some(confirm) => pending.push(confirm),
                None => return,
            },
            Some(confirmation) = pending.next(), if !pending.is_empty() => {
                if let Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) = confirmation {
                    route_return(&calls, returned);
                }
            }
        }
    }
}

// The contract with callers: one `Client` shared across tasks and threads.
const _: () = {
    const fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<Client>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_ack_keeps_the_call_waiting_and_a_nack_or_a_lost_channel_ends_it() {
        let calls = PendingCalls::default();
        assert!(settle_confirm(&calls, Ok(Confirmation::Ack(None))).is_none());
        assert!(settle_confirm(&calls, Ok(Confirmation::NotRequested)).is_none());
        assert!(matches!(settle_confirm(&calls, Ok(Confirmation::Nack(None))), Some(Outcome::Nacked)));
        let closed = lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed));
        assert!(matches!(settle_confirm(&calls, Err(closed)), Some(Outcome::Lost(_))));
    }
}
