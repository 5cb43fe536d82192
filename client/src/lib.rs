//! warren-client: the wire protocol types, the caller library, and what the operator, the worker and the tests
//! share besides: the queue topology ([`topology`]), the broker's URIs and the names that carry them
//! ([`endpoint`]), parsing and redacting those URIs, of one node or several ([`broker_uri`]), the retry schedule
//! ([`backoff`]), the order in which a cluster's addresses are tried ([`failover`]) and, with the `management`
//! feature, the management API client (`management`).
//!
//! ```no_run
//! # async fn example() -> Result<(), warren_client::CallError> {
//! use std::time::Duration;
//! let client = warren_client::Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
//! let sum = client.call("default.calculator", Some("add"), serde_json::json!([1, 2]), Duration::from_secs(5)).await?;
//! assert_eq!(sum, 3);
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod bench;
pub mod bench_report;
pub mod broker_uri;
mod client;
pub mod endpoint;
pub mod envelope;
mod error;
pub mod failover;
#[cfg(feature = "management")]
pub mod management;
mod pending;
pub mod protocol;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod topology;

pub use client::{CONNECT_TIMEOUT, CallOptions, Client, NOTIFY_TIMEOUT, RECONNECT_INTERVAL};
pub use envelope::TraceContext;
pub use error::{CallError, ErrorKind};
