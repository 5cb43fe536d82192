//! warren-worker: the request/reply runtime.
//!
//! It consumes a service's request queue, runs the handler of each request's method, publishes the reply to the
//! caller (publisher confirms) and only then acks the request, so a worker that dies mid-request gets it
//! redelivered. See docs/protocol.md for the wire protocol and the worker semantics.
//!
//! ```no_run
//! use serde_json::json;
//! use warren_worker::{HandlerError, Handlers, Params, Worker};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let handlers = Handlers::new().method("add", |params: Params| async move {
//!     let (a, b): (i64, i64) = params.parse()?;
//!     a.checked_add(b).map(|sum| json!(sum)).ok_or_else(|| HandlerError::bad_request("overflow"))
//! });
//! Worker::builder("amqp://guest:guest@127.0.0.1:5672/%2f", "default.calculator")
//!     .prefetch(32)
//!     .handlers(handlers)
//!     .run(warren_worker::shutdown_signal())
//!     .await?;
//! # Ok(()) }
//! ```

pub mod answered;
pub mod backoff;
pub mod builtin;
pub mod cli;
pub mod dispatch;
pub mod handler;
pub mod http_handler;
pub mod isolation;
pub mod metrics;
pub mod reply;
pub mod reply_to;
pub mod request;
pub mod server;
pub mod signal;
pub mod worker;

pub use handler::{Call, HandlerError, HandlerResult, Handlers, Params, TraceContext};
pub use http_handler::HttpHandler;
pub use metrics::Metrics;
pub use signal::shutdown_signal;
pub use worker::{Worker, WorkerBuilder, WorkerError};
