//! The Rust handler API: async functions registered by method name.
//!
//! ```
//! use serde_json::json;
//! use warren_worker::{HandlerError, Handlers, Params};
//!
//! #[derive(serde::Deserialize)]
//! struct Greeting { name: String }
//!
//! let handlers = Handlers::new()
//!     // Typed params: a mismatch is answered with `bad_request`.
//!     .method("greet", |params: Params| async move {
//!         let Greeting { name } = params.parse()?;
//!         Ok(json!(format!("hello, {name}")))
//!     })
//!     // Any other error is a `handler_error`.
//!     .method("divide", |params: Params| async move {
//!         let (a, b): (f64, f64) = params.parse()?;
//!         if b == 0.0 {
//!             return Err(HandlerError::failed("division by zero").with_details(json!({"a": a})));
//!         }
//!         Ok(json!(a / b))
//!     });
//! assert_eq!(handlers.names(), ["divide", "greet"]);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde_json::Value;
use warren_client::protocol::ErrorCode;

/// What a handler returns: the result value, or why it failed.
pub type HandlerResult = Result<Value, HandlerError>;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;
type BoxHandler = Arc<dyn Fn(Call) -> BoxFuture + Send + Sync>;
type BoxProbe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send + 'static>> + Send + Sync>;

/// Why a handler failed. Each variant becomes an error reply with its own code; all of them are acked, since
/// running the same request again would fail the same way.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    /// The params do not fit the method (`bad_request`).
    #[error("bad request: {message}")]
    BadRequest { message: String, details: Option<Value> },
    /// The handler ran and failed (`handler_error`).
    #[error("{message}")]
    Failed { message: String, details: Option<Value> },
    /// The handler failed for a reason of the worker's own, e.g. its answer was too large (`internal`).
    #[error("internal: {message}")]
    Internal { message: String, details: Option<Value> },
    /// The handler cannot run right now (e.g. its HTTP backend is not listening yet, restarting or gone). Not a
    /// verdict on the request: it is requeued, never answered, and the worker stops taking work until the
    /// handlers' probe succeeds (see [`Handlers::probe`]).
    #[error("unavailable: {message}")]
    Unavailable { message: String },
}

impl HandlerError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), details: None }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self::Failed { message: message.into(), details: None }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal { message: message.into(), details: None }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable { message: message.into() }
    }

    /// Attaches a JSON value the caller receives as the error's `details` (an unavailable handler sends none).
    pub fn with_details(mut self, value: Value) -> Self {
        match &mut self {
            Self::BadRequest { details, .. } | Self::Failed { details, .. } | Self::Internal { details, .. } => {
                *details = Some(value)
            }
            Self::Unavailable { .. } => {}
        }
        self
    }

    /// The wire error code of this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest { .. } => ErrorCode::BadRequest,
            Self::Failed { .. } => ErrorCode::HandlerError,
            Self::Internal { .. } | Self::Unavailable { .. } => ErrorCode::Internal,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::BadRequest { message, .. }
            | Self::Failed { message, .. }
            | Self::Internal { message, .. }
            | Self::Unavailable { message } => message,
        }
    }

    pub fn details(&self) -> Option<&Value> {
        match self {
            Self::BadRequest { details, .. } | Self::Failed { details, .. } | Self::Internal { details, .. } => {
                details.as_ref()
            }
            Self::Unavailable { .. } => None,
        }
    }
}

/// `?` on an `anyhow::Error` inside a handler makes a `handler_error` reply carrying the error chain.
impl From<anyhow::Error> for HandlerError {
    fn from(error: anyhow::Error) -> Self {
        Self::failed(format!("{error:#}"))
    }
}

/// A request's params: the JSON body, an array for positional params or an object for named ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Params(Value);

impl Params {
    pub fn new(value: Value) -> Self {
        Self(value)
    }

    pub fn as_value(&self) -> &Value {
        &self.0
    }

    pub fn into_value(self) -> Value {
        self.0
    }

    /// Deserializes the params into `T`; a mismatch is the caller's fault (`bad_request`).
    pub fn parse<T: DeserializeOwned>(self) -> Result<T, HandlerError> {
        serde_json::from_value(self.0).map_err(|e| HandlerError::bad_request(format!("invalid params: {e}")))
    }

    /// One argument, given either positionally (`[a, b]` → index) or by name (`{"a": .., "b": ..}` → name).
    pub fn arg(&self, index: usize, name: &str) -> Option<&Value> {
        match &self.0 {
            Value::Array(items) => items.get(index),
            Value::Object(fields) => fields.get(name),
            _ => None,
        }
    }
}

impl From<Value> for Params {
    fn from(value: Value) -> Self {
        Self(value)
    }
}

/// W3C trace context of the request, propagated to the reply and to HTTP backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Everything a handler may want to know about one request.
#[derive(Debug, Clone)]
pub struct Call {
    /// The method being called (the request's `type`, or the service's default method).
    pub method: String,
    pub params: Params,
    pub trace: TraceContext,
    /// When the caller stops waiting (`x-deadline`), if it said.
    pub deadline: Option<SystemTime>,
    /// The broker delivered this request before, to a worker that did not ack it (maybe this handler crashed it).
    pub redelivered: bool,
}

/// The methods a worker serves: a handler per method name, optionally one for every other method, and optionally a
/// probe telling whether the handlers can run (e.g. their HTTP backend answers).
#[derive(Clone, Default)]
pub struct Handlers {
    methods: HashMap<String, BoxHandler>,
    fallback: Option<BoxHandler>,
    probe: Option<BoxProbe>,
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `name`; it receives the params only.
    pub fn method<F, Fut>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.method_with_call(name, move |call: Call| handler(call.params))
    }

    /// Registers `handler` for `name`; it receives the whole [`Call`] (method, trace context, deadline).
    pub fn method_with_call<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.methods.insert(name.into(), boxed(handler));
        self
    }

    /// Serves every method without a handler of its own (e.g. forwarding to an HTTP backend).
    pub fn fallback<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.fallback = Some(boxed(handler));
        self
    }

    /// How to tell whether the handlers can run: the worker calls it before it starts consuming and, after a
    /// handler returned [`HandlerError::Unavailable`], with backoff until it returns `true`; it consumes only then.
    pub fn probe<F, Fut>(mut self, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.probe = Some(Arc::new(move || Box::pin(probe())));
        self
    }

    /// Adds every handler of `other`, which wins on a name both have (and with its fallback and probe).
    pub fn merge(mut self, other: Handlers) -> Self {
        self.methods.extend(other.methods);
        if other.fallback.is_some() {
            self.fallback = other.fallback;
        }
        if other.probe.is_some() {
            self.probe = other.probe;
        }
        self
    }

    /// The registered method names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.methods.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Whether `method` is served, by its own handler or the fallback.
    pub fn serves(&self, method: &str) -> bool {
        self.methods.contains_key(method) || self.fallback.is_some()
    }

    /// Whether `method` has a handler of its own (not only the fallback).
    pub fn registered(&self, method: &str) -> bool {
        self.methods.contains_key(method)
    }

    /// Runs the handler of `call.method`; `None` if nothing serves it. A handler that panics while building its
    /// future is caught here too (the future's own panics are caught where it is polled).
    pub(crate) fn dispatch(&self, call: Call) -> Option<BoxFuture> {
        let handler = self.methods.get(&call.method).or(self.fallback.as_ref())?;
        Some(handler(call))
    }

    /// Whether the handlers can run now; `None` when there is no probe (they always can).
    pub(crate) fn probe_now(&self) -> Option<Pin<Box<dyn Future<Output = bool> + Send + 'static>>> {
        self.probe.as_ref().map(|probe| probe())
    }

    pub fn has_probe(&self) -> bool {
        self.probe.is_some()
    }
}

fn boxed<F, Fut>(handler: F) -> BoxHandler
where
    F: Fn(Call) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    Arc::new(move |call| Box::pin(handler(call)))
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handlers")
            .field("methods", &self.names())
            .field("fallback", &self.fallback.is_some())
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(method: &str, params: Value) -> Call {
        Call {
            method: method.into(),
            params: Params::new(params),
            trace: TraceContext::default(),
            deadline: None,
            redelivered: false,
        }
    }

    #[tokio::test]
    async fn dispatches_by_name_and_falls_back() {
        let handlers = Handlers::new()
            .method("echo", |p: Params| async move { Ok(p.into_value()) })
            .fallback(|c: Call| async move { Ok(json!({ "forwarded": c.method })) });
        assert_eq!(handlers.dispatch(call("echo", json!([1]))).unwrap().await, Ok(json!([1])));
        assert_eq!(handlers.dispatch(call("other", json!(null))).unwrap().await, Ok(json!({"forwarded": "other"})));
    }

    #[test]
    fn unknown_methods_have_no_handler() {
        let handlers = Handlers::new().method("echo", |p: Params| async move { Ok(p.into_value()) });
        assert!(handlers.dispatch(call("nope", json!(null))).is_none());
        assert!(handlers.registered("echo") && !handlers.registered("nope"));
    }

    #[tokio::test]
    async fn merge_keeps_the_probe() {
        let http = Handlers::new().fallback(|c: Call| async move { Ok(json!(c.method)) }).probe(|| async { false });
        let merged = crate::builtin::handlers().merge(http);
        assert!(merged.has_probe());
        assert!(!merged.probe_now().unwrap().await);
        assert!(crate::builtin::handlers().probe_now().is_none());
    }

    #[test]
    fn params_take_positional_or_named_args() {
        assert_eq!(Params::new(json!([1, 2])).arg(1, "b"), Some(&json!(2)));
        assert_eq!(Params::new(json!({"a": 1, "b": 2})).arg(1, "b"), Some(&json!(2)));
        assert_eq!(Params::new(json!(7)).arg(0, "a"), None);
    }

    #[test]
    fn parse_mismatch_is_a_bad_request() {
        let err = Params::new(json!("x")).parse::<Vec<i64>>().unwrap_err();
        assert_eq!(err.code(), ErrorCode::BadRequest);
    }
}
