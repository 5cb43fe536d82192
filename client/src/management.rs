//! The RabbitMQ management HTTP API, as the operator and the tests use it: queue figures for a whole vhost in one
//! request, a queue as the API shows it, deleting queues, closing connections. The credentials come from the
//! management URI (`http://user:password@host:15672`), percent-decoded, and are sent as basic auth.
//!
//! The URI may name several nodes of a cluster (`http://user:password@rabbit-0:15672,rabbit-1:15672`): every node
//! serves the whole cluster's API, so a request that finds its node unreachable (or answering 5xx) is sent to the
//! next one, and the node that answered is used first from then on. The first node is picked at random.
//!
//! Behind the `management` feature: a caller or a worker does not need it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::broker_uri::{UriParts, uri_list};

/// No request waits longer than this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("invalid management URI: {0}")]
    InvalidUri(String),
    #[error("management API unavailable: {0}")]
    Unavailable(String),
    #[error("management API refused: {0}")]
    Refused(String),
}

/// A queue's figures. Counters are cumulative; rates come from their deltas.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct QueueFigures {
    pub name: String,
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
    pub published_total: u64,
    pub acked_total: u64,
}

/// A queue the management API lists without its message counts: they are unknown, not 0. RabbitMQ lists a new
/// queue for several seconds before its first statistics emission, and never when metrics collection is disabled.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the management API reports no {} for queue {name} (its statistics are not emitted yet, or not collected)", missing.join(", "))]
pub struct UnknownFigures {
    pub name: String,
    /// The fields it lacks, as the API names them.
    pub missing: Vec<&'static str>,
}

/// One queue of a figures poll: its figures, or why they are unknown.
pub type QueueReading = Result<QueueFigures, UnknownFigures>;

/// A row of `GET /api/queues/<vhost>`. Which absent field means what (RabbitMQ 3.10 to 4.x):
/// - `messages_ready`, `messages_unacknowledged`, `consumers`: absent until the queue's first statistics emission
///   (`collect_statistics_interval`, 5 s by default) or when collection is disabled: unknown.
/// - `message_stats`, and `publish` or `ack` inside it: absent while the counter has never moved since the queue
///   (or the broker) started: 0, as long as the counts above are present (then statistics are being collected).
#[derive(Deserialize)]
struct QueueRow {
    name: String,
    messages_ready: Option<u64>,
    messages_unacknowledged: Option<u64>,
    consumers: Option<u64>,
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

impl QueueRow {
    fn reading(self) -> QueueReading {
        match (self.messages_ready, self.messages_unacknowledged, self.consumers) {
            (Some(ready), Some(unacked), Some(consumers)) => {
                let stats = self.message_stats.unwrap_or_default();
                Ok(QueueFigures {
                    name: self.name,
                    ready,
                    unacked,
                    consumers,
                    published_total: stats.publish,
                    acked_total: stats.ack,
                })
            }
            (ready, unacked, consumers) => {
                let missing = [
                    ("messages_ready", ready.is_none()),
                    ("messages_unacknowledged", unacked.is_none()),
                    ("consumers", consumers.is_none()),
                ];
                let missing = missing.into_iter().filter(|(_, absent)| *absent).map(|(field, _)| field).collect();
                Err(UnknownFigures { name: self.name, missing })
            }
        }
    }
}

/// A client of one broker's management API (one node or several); cheap to clone, one connection pool.
#[derive(Clone)]
pub struct Management {
    http: reqwest::Client,
    nodes: Arc<[Node]>,
    /// The node tried first: the last one that answered.
    current: Arc<AtomicUsize>,
}

/// One node's API: its base URL (without credentials) and the credentials to send it.
struct Node {
    base: reqwest::Url,
    user: String,
    password: Option<String>,
}

impl Management {
    /// A client of the management API at `uri` (`http[s]://user:password@host:port[,host:port...][/prefix]`).
    /// Errors never contain the URI.
    pub fn new(uri: &str) -> Result<Self, ManagementError> {
        let mut nodes = Vec::new();
        for listed in uri_list(uri) {
            let parts = UriParts::split(listed).map_err(|e| ManagementError::InvalidUri(e.reason().to_owned()))?;
            if !matches!(parts.scheme, "http" | "https") {
                return Err(ManagementError::InvalidUri("scheme must be http or https".into()));
            }
            let without_credentials = UriParts { userinfo: None, ..parts.clone() };
            for i in 0..parts.hosts.len() {
                let mut base = reqwest::Url::parse(&without_credentials.single(i))
                    .map_err(|e| ManagementError::InvalidUri(format!("host {}: {e}", nodes.len() + 1)))?;
                base.set_query(None);
                base.set_fragment(None);
                if !base.path().ends_with('/') {
                    let path = format!("{}/", base.path());
                    base.set_path(&path);
                }
                let user = parts.user().map(percent_decode).unwrap_or_default();
                nodes.push(Node { base, user, password: parts.password().map(percent_decode) });
            }
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(2)
            .build()
            .map_err(|e| ManagementError::Unavailable(e.to_string()))?;
        let current = Arc::new(AtomicUsize::new(rand::random_range(0..nodes.len())));
        Ok(Self { http, nodes: nodes.into(), current })
    }

    /// The node requests go to first, without credentials (e.g. `http://rabbit-1:15672/`).
    pub fn current_base(&self) -> &reqwest::Url {
        &self.nodes[self.current.load(Ordering::Relaxed) % self.nodes.len()].base
    }

    /// `<base>/api/<segments...>` on node `node`, each segment percent-encoded (a vhost `/` is `%2F`).
    fn url_on(&self, node: usize, segments: &[&str]) -> reqwest::Url {
        let mut url = self.nodes[node % self.nodes.len()].base.clone();
        url.path_segments_mut().expect("http URL has a path").pop_if_empty().push("api").extend(segments);
        url
    }

    #[cfg(test)]
    fn url(&self, segments: &[&str]) -> reqwest::Url {
        self.url_on(self.current.load(Ordering::Relaxed), segments)
    }

    /// Sends the request to the current node, and on to the next ones while a node is unreachable or answers 5xx.
    /// The last 5xx answer is returned when every node gave one.
    async fn send(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: Option<(&str, &str)>,
    ) -> Result<reqwest::Response, ManagementError> {
        let count = self.nodes.len();
        let first = self.current.load(Ordering::Relaxed) % count;
        let mut last_error = None;
        let mut last_answer = None;
        for index in (first..first + count).map(|n| n % count) {
            let node = &self.nodes[index];
            let mut url = self.url_on(index, segments);
            if let Some((key, value)) = query {
                url.query_pairs_mut().append_pair(key, value);
            }
            let request = self.http.request(method.clone(), url).basic_auth(&node.user, node.password.as_ref());
            match request.send().await {
                Ok(response) if !response.status().is_server_error() => {
                    if index != first {
                        self.current.store(index, Ordering::Relaxed);
                        tracing::info!(node = %node.base, "the management API answers on another node");
                    }
                    return Ok(response);
                }
                Ok(response) => last_answer = Some(response),
                Err(e) => last_error = Some(e.without_url().to_string()),
            }
            if count > 1 {
                tracing::debug!(node = %node.base, "management API node did not answer; trying the next");
            }
        }
        match (last_answer, last_error) {
            (Some(response), _) => Ok(response),
            (None, Some(error)) if count > 1 => {
                Err(ManagementError::Unavailable(format!("{error} (and on every other node)")))
            }
            (None, error) => Err(ManagementError::Unavailable(error.unwrap_or_default())),
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: Option<(&str, &str)>,
    ) -> Result<T, ManagementError> {
        let unavailable = |e: reqwest::Error| ManagementError::Unavailable(e.without_url().to_string());
        let response = self.send(reqwest::Method::GET, segments, query).await?;
        response.error_for_status().map_err(unavailable)?.json().await.map_err(unavailable)
    }

    /// Every queue of `vhost` with the figures the autoscaler needs, in one request; a queue whose counts the API
    /// does not report is listed as [`UnknownFigures`], never as zeros.
    pub async fn queue_figures(&self, vhost: &str) -> Result<Vec<QueueReading>, ManagementError> {
        let columns = "name,messages_ready,messages_unacknowledged,consumers,message_stats.publish,message_stats.ack";
        let rows: Vec<QueueRow> = self.get(&["queues", vhost], Some(("columns", columns))).await?;
        Ok(rows.into_iter().map(QueueRow::reading).collect())
    }

    /// The queue as the management API shows it, or `None` when it does not exist.
    pub async fn queue(&self, vhost: &str, name: &str) -> Result<Option<Value>, ManagementError> {
        let response = self.send(reqwest::Method::GET, &["queues", vhost, name], None).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let unavailable = |e: reqwest::Error| ManagementError::Unavailable(e.without_url().to_string());
        Ok(Some(response.error_for_status().map_err(unavailable)?.json().await.map_err(unavailable)?))
    }

    /// Deletes a queue; one that does not exist counts as deleted.
    pub async fn delete_queue(&self, vhost: &str, name: &str) -> Result<(), ManagementError> {
        self.delete(&["queues", vhost, name], &format!("deleting queue {name}")).await
    }

    /// The broker's overview: answers once the broker is up.
    pub async fn overview(&self) -> Result<Value, ManagementError> {
        self.get(&["overview"], None).await
    }

    /// Every connection, with its broker-given `name` and the `client_properties` the client sent.
    pub async fn connections(&self) -> Result<Vec<Value>, ManagementError> {
        self.get(&["connections"], Some(("columns", "name,client_properties.connection_name"))).await
    }

    /// Any GET of the API as JSON, e.g. `get_json(&["nodes"], Some(("columns", "name,mem_used")))`: for the tests
    /// and the benchmarks, which read what the operator does not (nodes and their memory, connections with ports).
    pub async fn get_json(&self, segments: &[&str], query: Option<(&str, &str)>) -> Result<Value, ManagementError> {
        self.get(segments, query).await
    }

    /// Closes the connection the broker calls `name` (one that is gone counts as closed).
    pub async fn close_connection(&self, name: &str) -> Result<(), ManagementError> {
        self.delete(&["connections", name], &format!("closing connection {name}")).await
    }

    async fn delete(&self, segments: &[&str], what: &str) -> Result<(), ManagementError> {
        let response = self.send(reqwest::Method::DELETE, segments, None).await?;
        match response.status() {
            s if s.is_success() || s == reqwest::StatusCode::NOT_FOUND => Ok(()),
            s => Err(ManagementError::Refused(format!("{what}: HTTP {s}"))),
        }
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn management_url_encodes_the_vhost() {
        let m = Management::new("http://guest:gu%40st@127.0.0.1:15672").unwrap();
        assert_eq!(m.nodes[0].password.as_deref(), Some("gu@st"));
        assert_eq!(m.url(&["queues", "/"]).as_str(), "http://127.0.0.1:15672/api/queues/%2F");
        let m = Management::new("https://u:p@rabbit.example/mgmt").unwrap();
        assert_eq!(m.url(&["queues", "prod", "a.b"]).as_str(), "https://rabbit.example/mgmt/api/queues/prod/a.b");
        assert!(matches!(Management::new("amqp://h"), Err(ManagementError::InvalidUri(_))));
    }

    #[test]
    fn several_nodes_share_the_credentials_and_the_prefix() {
        let m = Management::new("https://u:p,w@rabbit-0:15672,rabbit-1:15673/mgmt").unwrap();
        assert_eq!((m.nodes[1].user.as_str(), m.nodes[1].password.as_deref()), ("u", Some("p,w")));
        let urls: Vec<String> = (0..2).map(|n| m.url_on(n, &["overview"]).to_string()).collect();
        assert_eq!(urls, ["https://rabbit-0:15672/mgmt/api/overview", "https://rabbit-1:15673/mgmt/api/overview"]);
        for malformed in ["http:u:s3cret@h", "http://u:s3cret@h1,,h2", "http://u:s3cret@h:port"] {
            let Err(error) = Management::new(malformed) else { panic!("{malformed} accepted") };
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
    }

    fn reading(row: serde_json::Value) -> QueueReading {
        serde_json::from_value::<QueueRow>(row).unwrap().reading()
    }

    #[test]
    fn counters_that_never_moved_are_zero_but_missing_counts_are_unknown() {
        // What RabbitMQ lists for a queue nobody has published to yet: no message_stats at all.
        let idle = reading(serde_json::json!({
            "name": "q", "messages_ready": 0, "messages_unacknowledged": 0, "consumers": 1,
        }));
        assert_eq!(idle, Ok(QueueFigures { name: "q".into(), consumers: 1, ..QueueFigures::default() }));
        // Published to, nothing acked yet: `ack` is absent.
        let published = reading(serde_json::json!({
            "name": "q", "messages_ready": 3, "messages_unacknowledged": 0, "consumers": 0,
            "message_stats": { "publish": 3 },
        }));
        assert_eq!(published.map(|f| (f.ready, f.published_total, f.acked_total)), Ok((3, 3, 0)));
        // A new queue before its first statistics emission: only its name.
        let fresh = reading(serde_json::json!({ "name": "q" }));
        let unknown = fresh.unwrap_err();
        assert_eq!(unknown.missing, ["messages_ready", "messages_unacknowledged", "consumers"]);
        assert!(unknown.to_string().contains("no messages_ready, messages_unacknowledged, consumers for queue q"));
        let partial = reading(serde_json::json!({ "name": "q", "messages_ready": 0, "consumers": 0 }));
        assert_eq!(partial.unwrap_err().missing, ["messages_unacknowledged"]);
    }
}
