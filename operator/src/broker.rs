//! Broker access: one shared AMQP connection and one management HTTP client per broker, reused by every
//! reconcile, and the two things the operator does on a broker — declare a service's queues and read queue
//! figures for all services of a vhost in one request.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};
pub use warren_client::endpoint::{BrokerEndpoint, redact};
use warren_client::management::{Management, ManagementError};
pub use warren_client::management::{QueueFigures, QueueReading, UnknownFigures};
use warren_client::topology::{self, QueueOptions};

/// How long a failed connection attempt is remembered before the next one: a thousand reconciles during an
/// outage make one connection attempt per window, not a thousand.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(2);
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
    vhost: String,
    connection: tokio::sync::Mutex<ConnectionSlot>,
    management: Management,
}

#[derive(Default)]
struct ConnectionSlot {
    connection: Option<Connection>,
    last_failure: Option<(Instant, String)>,
    opened: u64,
}

impl Broker {
    fn new(endpoint: BrokerEndpoint) -> Result<Self, BrokerError> {
        let amqp = AMQPUri::from_str(&endpoint.amqp_uri).map_err(|e| BrokerError::InvalidUri(format!("uri: {e}")))?;
        let management = Management::new(&endpoint.management_uri)?;
        Ok(Self { vhost: amqp.vhost, endpoint, connection: Default::default(), management })
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
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
        if let Some(conn) = &slot.connection {
            if conn.status().connected() {
                return conn.create_channel().await.map_err(|e| BrokerError::Unavailable(e.to_string()));
            }
        }
        if let Some((at, reason)) = &slot.last_failure {
            if at.elapsed() < RECONNECT_COOLDOWN {
                return Err(BrokerError::Unavailable(reason.clone()));
            }
        }
        let props = ConnectionProperties::default().with_connection_name("warren-operator".into());
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&self.endpoint.amqp_uri, props)).await;
        let conn = match attempt {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(slot.failed(e.to_string())),
            Err(_) => return Err(slot.failed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
        };
        slot.opened += 1;
        slot.last_failure = None;
        tracing::info!(broker = %self.display_name(), "opened the shared AMQP connection");
        let channel = conn.create_channel().await.map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        slot.connection = Some(conn);
        Ok(channel)
    }

    /// Declares the service's request queue and its dead-letter queue (idempotent; re-creates deleted ones).
    pub async fn declare_queues(&self, queue: &str, options: &QueueOptions) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        let declared = topology::declare_service_queues(&channel, queue, options).await;
        // A refused declaration already closed the channel on the broker's side.
        if channel.status().connected() {
            let _ = channel.close(200, "done".into()).await;
        }
        declared.map_err(|e| classify(queue, e))
    }

    /// Deletes the service's queues; a queue that does not exist counts as deleted.
    pub async fn delete_queues(&self, queue: &str) -> Result<(), BrokerError> {
        for name in [queue.to_owned(), topology::dead_letter_queue_name(queue)] {
            self.management.delete_queue(&self.vhost, &name).await?;
        }
        Ok(())
    }

    /// Every queue of this broker's vhost, with the figures the autoscaler needs (or why they are unknown), in one
    /// request.
    pub async fn queue_figures(&self) -> Result<Vec<QueueReading>, BrokerError> {
        Ok(self.management.queue_figures(&self.vhost).await?)
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

/// The brokers in use, one [`Broker`] per endpoint, shared by every reconcile.
#[derive(Default)]
pub struct BrokerPool {
    brokers: Mutex<HashMap<BrokerEndpoint, Arc<Broker>>>,
}

impl BrokerPool {
    pub fn get(&self, endpoint: &BrokerEndpoint) -> Result<Arc<Broker>, BrokerError> {
        let mut brokers = self.brokers.lock().expect("broker pool lock");
        if let Some(broker) = brokers.get(endpoint) {
            return Ok(broker.clone());
        }
        let broker = Arc::new(Broker::new(endpoint.clone())?);
        brokers.insert(endpoint.clone(), broker.clone());
        Ok(broker)
    }

    /// Every broker in use, for the observer's polls.
    pub fn all(&self) -> Vec<Arc<Broker>> {
        self.brokers.lock().expect("broker pool lock").values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicting_argument_is_read_from_rabbitmq_message() {
        let msg = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'default.calc' in vhost '/': \
                   received the value '10' of type 'signedint' but current is none";
        assert_eq!(conflicting_argument(msg).as_deref(), Some("x-max-length"));
        assert_eq!(conflicting_argument("PRECONDITION_FAILED - something else"), None);
    }
}
