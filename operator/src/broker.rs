//! Broker access: one shared AMQP connection and one management HTTP client per broker, reused by every
//! reconcile, and the two things the operator does on a broker — declare a service's queues and read queue
//! figures for all services of a vhost in one request.
//!
//! A broker may be a cluster: its Secret's URIs then name several nodes, the shared connection goes to one of them
//! (from a random one on; a lost connection is re-opened on the next) and the management client fails over between
//! them. Brokers that no service uses any more (a rotated Secret, deleted services) leave the pool, and their
//! connection closes once the last reconcile or observer registration holding them lets go.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::reflector::ObjectRef;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{Connection, ConnectionProperties, ErrorKind};
pub use warren_client::broker_uri::redact;
use warren_client::broker_uri::{BrokerAddresses, Redacted};
pub use warren_client::endpoint::BrokerEndpoint;
use warren_client::failover::Rotation;
use warren_client::management::{Management, ManagementError};
pub use warren_client::management::{QueueFigures, QueueReading, UnknownFigures};
use warren_client::topology::{self, QueueOptions};

use crate::crd::RpcService;

/// How long a failed connection attempt is remembered before the next one: a thousand reconciles during an
/// outage make one connection attempt per window, not a thousand.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(2);
/// How long connecting to one node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker URI: {0}")]
    InvalidUri(String),
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("queue {queue} exists with different arguments ({argument}): {message}")]
    QueueConflict { queue: String, argument: String, message: String },
    #[error("broker refused the operation: {0}")]
    Refused(String),
    #[error("management API unavailable: {0}")]
    ManagementUnavailable(String),
}

impl From<ManagementError> for BrokerError {
    fn from(e: ManagementError) -> Self {
        match e {
            ManagementError::InvalidUri(reason) => Self::InvalidUri(format!("managementUri: {reason}")),
            ManagementError::Unavailable(reason) => Self::ManagementUnavailable(reason),
            ManagementError::Refused(reason) => Self::Refused(reason),
        }
    }
}

impl BrokerError {
    /// The condition reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidUri(_) => "InvalidBrokerSecret",
            Self::QueueConflict { .. } => "QueueConflict",
            Self::Refused(_) => "BrokerRefused",
            Self::Unavailable(_) | Self::ManagementUnavailable(_) => "BrokerUnavailable",
        }
    }

    /// Whether only a change by the user (a Secret, the queue on the broker, a permission) can fix it.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::InvalidUri(_) | Self::QueueConflict { .. } | Self::Refused(_) => true,
            Self::Unavailable(_) | Self::ManagementUnavailable(_) => false,
        }
    }
}

/// One broker: a shared AMQP connection (opened lazily, re-opened when lost) and a management client.
pub struct Broker {
    endpoint: BrokerEndpoint,
    addresses: BrokerAddresses,
    /// The node the next connection attempt goes to.
    rotation: Rotation,
    connection: tokio::sync::Mutex<ConnectionSlot>,
    /// The channel the observer's probes use, kept open between rounds (re-opened after a probe of a missing
    /// queue closed it).
    probe_channel: tokio::sync::Mutex<Option<lapin::Channel>>,
    /// Open channels that declarations reuse (opening and closing one per declaration cost two round trips).
    idle_channels: Mutex<Vec<lapin::Channel>>,
    management: Management,
}

/// Idle declaration channels kept open at most: as many as reconciles usually run at once.
const IDLE_CHANNELS: usize = 32;

/// A queue as a passive `queue.declare` shows it: fresher than the management API's figures, no counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueProbe {
    pub ready: u64,
    pub consumers: u64,
}

#[derive(Default)]
struct ConnectionSlot {
    connection: Option<Connection>,
    last_failure: Option<(Instant, String)>,
    opened: u64,
}

impl Broker {
    /// The broker an endpoint names; nothing is contacted yet. Errors never contain the URIs.
    pub fn new(endpoint: BrokerEndpoint) -> Result<Self, BrokerError> {
        let addresses = BrokerAddresses::parse(&endpoint.amqp_uri)
            .map_err(|e| BrokerError::InvalidUri(format!("uri: {}", e.reason())))?;
        let management = Management::new(&endpoint.management_uri)?;
        let rotation = Rotation::random(addresses.len());
        let (connection, probe_channel, idle_channels) = Default::default();
        Ok(Self { addresses, rotation, endpoint, connection, probe_channel, idle_channels, management })
    }

    pub fn vhost(&self) -> &str {
        self.addresses.vhost()
    }

    /// The management URI without credentials, which identifies the broker in logs.
    pub fn display_name(&self) -> String {
        redact(&self.endpoint.management_uri)
    }

    /// How many AMQP connections this broker has opened so far (1 while it stays up).
    pub async fn connections_opened(&self) -> u64 {
        self.connection.lock().await.opened
    }

    /// Whether the shared connection is currently open.
    pub async fn is_connected(&self) -> bool {
        self.connection.lock().await.connection.as_ref().is_some_and(|c| c.status().connected())
    }

    async fn channel(&self) -> Result<lapin::Channel, BrokerError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = &slot.connection
            && conn.status().connected()
        {
            return conn.create_channel().await.map_err(|e| BrokerError::Unavailable(e.to_string()));
        }
        if let Some((at, reason)) = &slot.last_failure
            && at.elapsed() < RECONNECT_COOLDOWN
        {
            return Err(BrokerError::Unavailable(reason.clone()));
        }
        let conn = match self.connect_any_node().await {
            Ok(conn) => conn,
            Err(reason) => return Err(slot.failed(reason)),
        };
        slot.opened += 1;
        slot.last_failure = None;
        let channel = conn.create_channel().await.map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        slot.connection = Some(conn);
        Ok(channel)
    }

    /// Opens a connection to the first node that answers, each tried once from the rotation's next node on.
    async fn connect_any_node(&self) -> Result<Connection, String> {
        let mut failures = Vec::new();
        for _ in 0..self.addresses.len() {
            let node = self.addresses.node(self.rotation.advance());
            let props = ConnectionProperties::default().with_connection_name("warren-operator".into());
            let failure =
                match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(node.clone(), props)).await {
                    Ok(Ok(conn)) => {
                        tracing::info!(broker = %Redacted(node), "opened the shared AMQP connection");
                        return Ok(conn);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
                };
            if self.addresses.len() > 1 {
                tracing::warn!(broker = %Redacted(node), reason = %failure, "could not connect to this node; trying the next");
            }
            failures.push(format!("{}: {failure}", Redacted(node)));
        }
        Err(if failures.len() == 1 {
            failures.remove(0)
        } else {
            format!("no node answered ({})", failures.join("; "))
        })
    }

    /// Declares the service's request queue and its dead-letter queue (idempotent; re-creates deleted ones).
    pub async fn declare_queues(&self, queue: &str, options: &QueueOptions) -> Result<(), BrokerError> {
        let reused = {
            let mut idle = self.idle_channels.lock().expect("idle channels lock");
            idle.retain(|c| c.status().connected());
            idle.pop()
        };
        let channel = match reused {
            Some(channel) => channel,
            None => self.channel().await?,
        };
        let declared = topology::declare_service_queues(&channel, queue, options).await;
        // A refused declaration already closed the channel on the broker's side; an open one serves the next.
        if channel.status().connected() {
            let surplus = {
                let mut idle = self.idle_channels.lock().expect("idle channels lock");
                if idle.len() < IDLE_CHANNELS {
                    idle.push(channel);
                    None
                } else {
                    Some(channel)
                }
            };
            if let Some(channel) = surplus {
                let _ = channel.close(200, "done".into()).await;
            }
        }
        declared.map_err(|e| classify(queue, e))
    }

    /// Deletes the service's queues; a queue that does not exist counts as deleted.
    pub async fn delete_queues(&self, queue: &str) -> Result<(), BrokerError> {
        for name in [queue.to_owned(), topology::dead_letter_queue_name(queue)] {
            self.management.delete_queue(self.vhost(), &name).await?;
        }
        Ok(())
    }

    /// The queue's ready requests and consumers right now, by a passive `queue.declare` on the shared connection.
    pub async fn probe_queue(&self, queue: &str) -> Result<QueueProbe, BrokerError> {
        let mut slot = self.probe_channel.lock().await;
        let channel = match slot.as_ref().filter(|c| c.status().connected()) {
            Some(channel) => channel.clone(),
            None => slot.insert(self.channel().await?).clone(),
        };
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let declared = channel.queue_declare(queue.into(), options, Default::default()).await;
        let declared = declared.map_err(|e| classify(queue, e))?;
        Ok(QueueProbe { ready: u64::from(declared.message_count()), consumers: u64::from(declared.consumer_count()) })
    }

    /// Every queue of this broker's vhost, with the figures the autoscaler needs (or why they are unknown), in one
    /// request.
    pub async fn queue_figures(&self) -> Result<Vec<QueueReading>, BrokerError> {
        Ok(self.management.queue_figures(self.vhost()).await?)
    }
}

impl Drop for Broker {
    /// Closes the shared connection: the broker left the pool and nothing holds it any more.
    fn drop(&mut self) {
        let Some(connection) = self.connection.get_mut().connection.take() else { return };
        if connection.status().connected()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            tracing::info!(broker = %self.display_name(), "closing the AMQP connection of a broker no longer used");
            runtime.spawn(async move {
                let _ = connection.close(200, "broker no longer used".into()).await;
            });
        }
    }
}

impl ConnectionSlot {
    fn failed(&mut self, reason: String) -> BrokerError {
        self.connection = None;
        self.last_failure = Some((Instant::now(), reason.clone()));
        BrokerError::Unavailable(reason)
    }
}

/// Turns a lapin error from a declaration into what the user needs to know.
fn classify(queue: &str, error: lapin::Error) -> BrokerError {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let message = amqp.get_message().to_string();
            match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => BrokerError::QueueConflict {
                    queue: queue.to_owned(),
                    argument: conflicting_argument(&message).unwrap_or_else(|| "arguments".to_owned()),
                    message,
                },
                _ => BrokerError::Refused(message),
            }
        }
        _ => BrokerError::Unavailable(error.to_string()),
    }
}

/// The argument named in RabbitMQ's "inequivalent arg 'x-max-length' for queue ..." message.
pub fn conflicting_argument(message: &str) -> Option<String> {
    let rest = &message[message.find("inequivalent arg '")? + "inequivalent arg '".len()..];
    Some(rest[..rest.find('\'')?].to_owned())
}

/// The brokers in use, one [`Broker`] per endpoint, shared by every reconcile, and which service uses which.
#[derive(Default)]
pub struct BrokerPool {
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    brokers: HashMap<BrokerEndpoint, Arc<Broker>>,
    /// The endpoint each service last used: a broker leaves the pool when no service uses it any more.
    users: HashMap<ObjectRef<RpcService>, BrokerEndpoint>,
}

impl BrokerPool {
    /// The shared broker of `endpoint`, now used by `user` (instead of the one it used before, if another).
    pub fn get(&self, user: &ObjectRef<RpcService>, endpoint: &BrokerEndpoint) -> Result<Arc<Broker>, BrokerError> {
        let mut state = self.state.lock().expect("broker pool lock");
        let broker = match state.brokers.get(endpoint) {
            Some(broker) => Ok(broker.clone()),
            None => Broker::new(endpoint.clone()).map(Arc::new),
        };
        let previous = match &broker {
            Ok(broker) => {
                state.brokers.entry(endpoint.clone()).or_insert_with(|| broker.clone());
                state.users.insert(user.clone(), endpoint.clone())
            }
            Err(_) => state.users.remove(user),
        };
        if let Some(previous) = previous.filter(|p| p != endpoint) {
            state.drop_if_unused(&previous);
        }
        broker
    }

    /// `user` uses no broker any more (deleted, or its Secret is gone or invalid).
    pub fn release(&self, user: &ObjectRef<RpcService>) {
        let mut state = self.state.lock().expect("broker pool lock");
        if let Some(previous) = state.users.remove(user) {
            state.drop_if_unused(&previous);
        }
    }

    /// Every broker in use, for the observer's polls.
    pub fn all(&self) -> Vec<Arc<Broker>> {
        self.state.lock().expect("broker pool lock").brokers.values().cloned().collect()
    }
}

impl PoolState {
    /// Forgets the broker of `endpoint` when no service uses it; its connection closes with its last holder.
    fn drop_if_unused(&mut self, endpoint: &BrokerEndpoint) {
        if self.users.values().any(|e| e == endpoint) {
            return;
        }
        if let Some(broker) = self.brokers.remove(endpoint) {
            tracing::info!(broker = %broker.display_name(), "no service uses this broker any more; dropping it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str) -> BrokerEndpoint {
        BrokerEndpoint {
            amqp_uri: format!("amqp://u:p@{host}/%2f"),
            management_uri: format!("http://u:p@{host}:15672"),
        }
    }

    fn user(name: &str) -> ObjectRef<RpcService> {
        ObjectRef::new(name).within("shop")
    }

    #[test]
    fn a_broker_leaves_the_pool_when_its_last_user_moves_on() {
        let pool = BrokerPool::default();
        let old = pool.get(&user("a"), &endpoint("old")).unwrap();
        assert!(Arc::ptr_eq(&old, &pool.get(&user("b"), &endpoint("old")).unwrap()));
        let new = pool.get(&user("a"), &endpoint("new")).unwrap();
        assert_eq!(pool.all().len(), 2, "b still uses the old broker");
        pool.get(&user("b"), &endpoint("new")).unwrap();
        assert_eq!(pool.all().len(), 1);
        assert!(Arc::ptr_eq(&pool.all()[0], &new));
        let weak = Arc::downgrade(&old);
        drop(old);
        assert!(weak.upgrade().is_none(), "nothing else holds the old broker (its connection closes)");
        pool.release(&user("a"));
        assert_eq!(pool.all().len(), 1);
        pool.release(&user("b"));
        assert!(pool.all().is_empty());
    }

    #[test]
    fn an_invalid_secret_releases_the_broker_used_before() {
        let pool = BrokerPool::default();
        pool.get(&user("a"), &endpoint("old")).unwrap();
        let invalid = BrokerEndpoint { amqp_uri: "amqp:u:s3cret@h".into(), ..endpoint("old") };
        let error = pool.get(&user("a"), &invalid).err().unwrap();
        assert!(!error.to_string().contains("s3cret"), "{error}");
        assert!(pool.all().is_empty());
    }

    #[test]
    fn several_nodes_share_one_vhost_and_hide_the_password() {
        let endpoint = BrokerEndpoint {
            amqp_uri: "amqp://u:s3cret@rabbit-0,rabbit-1:5673/prod".into(),
            management_uri: "http://u:s3cret@rabbit-0:15672,rabbit-1:15672".into(),
        };
        let broker = Broker::new(endpoint).unwrap();
        assert_eq!(broker.vhost(), "prod");
        assert_eq!(broker.display_name(), "http://u@rabbit-0:15672,rabbit-1:15672");
    }

    #[test]
    fn conflicting_argument_is_read_from_rabbitmq_message() {
        let msg = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'default.calc' in vhost '/': \
                   received the value '10' of type 'signedint' but current is none";
        assert_eq!(conflicting_argument(msg).as_deref(), Some("x-max-length"));
        assert_eq!(conflicting_argument("PRECONDITION_FAILED - something else"), None);
    }
}
