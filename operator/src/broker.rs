//! Broker access: one shared AMQP connection and one management HTTP client per broker, reused by every
//! reconcile, and the two things the operator does on a broker — declare a service's queues and read queue
//! figures for all services of a vhost in one request.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, ErrorKind};
use serde::Deserialize;
use warren_client::topology::{self, QueueOptions};

/// How long a failed connection attempt is remembered before the next one: a thousand reconciles during an
/// outage make one connection attempt per window, not a thousand.
const RECONNECT_COOLDOWN: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MANAGEMENT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Where a broker is, as read from an RpcService's Secret. `Debug` never prints credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BrokerEndpoint {
    pub amqp_uri: String,
    pub management_uri: String,
}

impl fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerEndpoint")
            .field("amqp", &redact(&self.amqp_uri))
            .field("management", &redact(&self.management_uri))
            .finish()
    }
}

/// A URI with its userinfo removed, for logs and status.
pub fn redact(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => format!("{}***@{}", &uri[..scheme_end + 3], &uri[at + 1..]),
        _ => uri.to_owned(),
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

    /// Every queue of this broker's vhost, with the figures the autoscaler needs, in one request.
    pub async fn queue_figures(&self) -> Result<Vec<QueueFigures>, BrokerError> {
        self.management.queues(&self.vhost).await
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

/// A queue's figures from the management API. Counters are cumulative; rates come from their deltas.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct QueueFigures {
    pub name: String,
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
    pub published_total: u64,
    pub acked_total: u64,
}

#[derive(Deserialize)]
struct QueueRow {
    name: String,
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    consumers: u64,
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

#[derive(Deserialize, Default)]
struct MessageStats {
    #[serde(default)]
    publish: u64,
    #[serde(default)]
    ack: u64,
}

/// The RabbitMQ management HTTP API, with the credentials from the management URI.
struct Management {
    http: reqwest::Client,
    base: reqwest::Url,
    user: String,
    password: Option<String>,
}

impl Management {
    fn new(uri: &str) -> Result<Self, BrokerError> {
        let mut base = reqwest::Url::parse(uri).map_err(|e| BrokerError::InvalidUri(format!("managementUri: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(BrokerError::InvalidUri("managementUri: scheme must be http or https".into()));
        }
        let user = percent_decode(base.username());
        let password = base.password().map(percent_decode);
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .timeout(MANAGEMENT_TIMEOUT)
            .pool_max_idle_per_host(2)
            .build()
            .map_err(|e| BrokerError::ManagementUnavailable(e.to_string()))?;
        Ok(Self { http, base, user, password })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http URL has a path").pop_if_empty().push("api").extend(segments);
        url
    }

    async fn queues(&self, vhost: &str) -> Result<Vec<QueueFigures>, BrokerError> {
        let mut url = self.url(&["queues", vhost]);
        url.query_pairs_mut().append_pair(
            "columns",
            "name,messages_ready,messages_unacknowledged,consumers,message_stats.publish,message_stats.ack",
        );
        let rows: Vec<QueueRow> = self
            .http
            .get(url)
            .basic_auth(&self.user, self.password.as_ref())
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| BrokerError::ManagementUnavailable(e.without_url().to_string()))?
            .json()
            .await
            .map_err(|e| BrokerError::ManagementUnavailable(e.without_url().to_string()))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let stats = r.message_stats.unwrap_or_default();
                QueueFigures {
                    name: r.name,
                    ready: r.messages_ready,
                    unacked: r.messages_unacknowledged,
                    consumers: r.consumers,
                    published_total: stats.publish,
                    acked_total: stats.ack,
                }
            })
            .collect())
    }

    async fn delete_queue(&self, vhost: &str, queue: &str) -> Result<(), BrokerError> {
        let response = self
            .http
            .delete(self.url(&["queues", vhost, queue]))
            .basic_auth(&self.user, self.password.as_ref())
            .send()
            .await
            .map_err(|e| BrokerError::ManagementUnavailable(e.without_url().to_string()))?;
        match response.status() {
            s if s.is_success() || s == reqwest::StatusCode::NOT_FOUND => Ok(()),
            s => Err(BrokerError::Refused(format!("deleting queue {queue}: HTTP {s}"))),
        }
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
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

    #[test]
    fn redact_hides_credentials() {
        assert_eq!(redact("amqp://user:secret@rabbit:5672/%2f"), "amqp://***@rabbit:5672/%2f");
        assert_eq!(redact("http://rabbit:15672"), "http://rabbit:15672");
        let e = BrokerEndpoint { amqp_uri: "amqp://u:p@h/".into(), management_uri: "http://u:p@h:15672".into() };
        assert!(!format!("{e:?}").contains(":p@"));
    }

    #[test]
    fn management_url_encodes_the_vhost() {
        let m = Management::new("http://guest:gu%40st@127.0.0.1:15672").unwrap();
        assert_eq!(m.password.as_deref(), Some("gu@st"));
        assert_eq!(m.url(&["queues", "/"]).as_str(), "http://127.0.0.1:15672/api/queues/%2F");
        let m = Management::new("https://u:p@rabbit.example/mgmt").unwrap();
        assert_eq!(m.url(&["queues", "prod", "a.b"]).as_str(), "https://rabbit.example/mgmt/api/queues/prod/a.b");
    }
}
