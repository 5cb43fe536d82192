//! From a request to its outcome: deadline check, method resolution, params, the handler. No broker here.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::FutureExt;
use warren_client::protocol::ErrorCode;

use crate::handler::{Call, HandlerError, Handlers, Params};
use crate::metrics::{Metrics, UNKNOWN_METHOD_LABEL};
use crate::reply::Outcome;
use crate::request::Request;

/// What becomes of one request, and the `method` label it is counted under.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub method_label: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Reply with the outcome (when the request has a `reply_to`), then ack.
    Answer(Outcome),
    /// The handler could not run (its backend is unavailable): give the request back to the queue unanswered,
    /// and stop taking work until the handler answers again.
    Unavailable(String),
}

impl Handled {
    /// The outcome, for a request that is answered.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.verdict {
            Verdict::Answer(outcome) => Some(outcome),
            Verdict::Unavailable(_) => None,
        }
    }

    /// The `outcome` metric label: `ok`, the error code, or `unavailable`.
    pub fn outcome_label(&self) -> &'static str {
        match &self.verdict {
            Verdict::Answer(outcome) => outcome.label(),
            Verdict::Unavailable(_) => "unavailable",
        }
    }
}

/// Runs requests against a set of handlers.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    handlers: Arc<Handlers>,
    default_method: Option<String>,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
}

impl Dispatcher {
    pub fn new(handlers: Handlers, default_method: Option<String>, metrics: Arc<Metrics>) -> Self {
        Self { handlers: Arc::new(handlers), default_method, metrics, max_request_bytes: usize::MAX }
    }

    /// Requests with a larger body are answered with `bad_request` without running (default: no limit).
    pub fn max_request_bytes(mut self, max: usize) -> Self {
        self.max_request_bytes = max;
        self
    }

    /// Every deterministic failure (expired, unknown method, malformed body, handler error, handler panic)
    /// becomes an error outcome here, so the caller can always reply and ack; only an unavailable handler is not
    /// a verdict on the request.
    pub async fn handle(&self, request: &Request, body: &[u8], redelivered: bool, now: SystemTime) -> Handled {
        let method = request.method.clone().or_else(|| self.default_method.clone());
        let method_label = match &method {
            Some(method) => self.method_label(method),
            None => UNKNOWN_METHOD_LABEL.into(),
        };
        let verdict = match self.outcome(method, &method_label, request, body, redelivered, now).await {
            Err(HandlerError::Unavailable { message }) => Verdict::Unavailable(message),
            result => Verdict::Answer(result.unwrap_or_else(|e| Outcome::from(Err(e)))),
        };
        Handled { method_label, verdict }
    }

    /// The metric label for `method`: its own name when a handler is registered for it, a capped set of names
    /// for methods the fallback serves (callers choose those), a fixed label for methods nobody serves.
    fn method_label(&self, method: &str) -> String {
        if self.handlers.registered(method) {
            method.to_owned()
        } else if self.handlers.serves(method) {
            self.metrics.forwarded_method_label(method)
        } else {
            UNKNOWN_METHOD_LABEL.into()
        }
    }

    /// The checks in the order docs/protocol.md gives: deadline, method, then the body and params, then the run.
    /// `Ok(outcome)` for everything decided before the handler runs; the handler's own result otherwise.
    async fn outcome(
        &self,
        method: Option<String>,
        label: &str,
        request: &Request,
        body: &[u8],
        redelivered: bool,
        now: SystemTime,
    ) -> Result<Outcome, HandlerError> {
        if request.expired(now) {
            self.metrics.request_expired();
            return Ok(Outcome::error(
                ErrorCode::DeadlineExceeded,
                "the caller's deadline passed before the request ran",
            ));
        }
        let Some(method) = method else {
            return Ok(Outcome::error(
                ErrorCode::UnknownMethod,
                "the request names no method (AMQP `type` property) and this service has no default method",
            ));
        };
        if !self.handlers.serves(&method) {
            return Ok(Outcome::error(
                ErrorCode::UnknownMethod,
                format!("unknown method {method:?}; this service serves {}", self.handlers.names().join(", ")),
            ));
        }
        if body.len() > self.max_request_bytes {
            let message = format!(
                "the request body has {} bytes; this service takes at most {}",
                body.len(),
                self.max_request_bytes
            );
            let details = serde_json::json!({"reason": "request_too_large", "bytes": body.len(), "limit": self.max_request_bytes});
            return Ok(Outcome::Error { code: ErrorCode::BadRequest, message, details: Some(details) });
        }
        let params = request.params(body)?;
        let call = Call {
            method,
            params: Params::new(params),
            trace: request.trace.clone(),
            deadline: request.deadline(),
            redelivered,
        };
        let started = Instant::now();
        // A panicking handler must still get its request answered and acked, or it would hold a prefetch slot:
        // whether it panics while building its future or while running it.
        let running = match std::panic::catch_unwind(AssertUnwindSafe(|| self.handlers.dispatch(call))) {
            Ok(Some(running)) => running,
            Ok(None) => return Ok(Outcome::error(ErrorCode::UnknownMethod, "no handler serves this method")),
            Err(panic) => return Ok(panicked(label, panic)),
        };
        let result = AssertUnwindSafe(running).catch_unwind().await;
        self.metrics.handler_ran(label, started.elapsed());
        match result {
            Ok(result) => result.map(Outcome::Ok),
            Err(panic) => Ok(panicked(label, panic)),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the handlers can run now; `None` when they have no probe (they always can).
    pub fn probe(&self) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>> {
        self.handlers.probe_now()
    }
}

fn panicked(label: &str, panic: Box<dyn std::any::Any + Send>) -> Outcome {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(method = %label, %message, "handler panicked");
    Outcome::error(ErrorCode::Internal, format!("the handler panicked: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerError;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    #[allow(unreachable_code)]
    fn dispatcher(default_method: Option<&str>) -> Dispatcher {
        let handlers = crate::builtin::handlers()
            .method("panic", |_p: Params| async move { panic!("kaboom") })
            .method("panic_early", |_p: Params| {
                panic!("before the future");
                async move { Ok(json!(null)) }
            })
            .method("down", |_p: Params| async move { Err(HandlerError::unavailable("connection refused")) })
            .method("picky", |_p: Params| async move { Err(HandlerError::bad_request("no")) });
        Dispatcher::new(handlers, default_method.map(Into::into), Arc::new(Metrics::new()))
    }

    fn request(method: Option<&str>) -> Request {
        Request { method: method.map(Into::into), reply_to: Some("r".into()), ..Default::default() }
    }

    async fn handle(d: &Dispatcher, r: &Request, body: &str) -> Handled {
        d.handle(r, body.as_bytes(), false, SystemTime::now()).await
    }

    fn code(handled: &Handled) -> Option<ErrorCode> {
        match handled.outcome().expect("an answer") {
            Outcome::Ok(_) => None,
            Outcome::Error { code, .. } => Some(*code),
        }
    }

    #[tokio::test]
    async fn runs_the_named_method() {
        let d = dispatcher(None);
        let handled = handle(&d, &request(Some("add")), "[1, 2]").await;
        assert_eq!(handled, Handled { method_label: "add".into(), verdict: Verdict::Answer(Outcome::Ok(json!(3))) });
    }

    #[tokio::test]
    async fn no_method_uses_the_default_or_is_unknown() {
        let handled = handle(&dispatcher(Some("echo")), &request(None), r#"{"x": 1}"#).await;
        assert_eq!(handled.outcome(), Some(&Outcome::Ok(json!({"x": 1}))));
        let handled = handle(&dispatcher(None), &request(None), "1").await;
        assert_eq!(code(&handled), Some(ErrorCode::UnknownMethod));
    }

    #[tokio::test]
    async fn deterministic_failures_have_their_codes() {
        let d = dispatcher(None);
        let unknown = handle(&d, &request(Some("nope")), "[]").await;
        assert_eq!(code(&unknown), Some(ErrorCode::UnknownMethod));
        assert_eq!(unknown.method_label, UNKNOWN_METHOD_LABEL);
        assert_eq!(code(&handle(&d, &request(Some("add")), "{oops").await), Some(ErrorCode::BadRequest));
        assert_eq!(code(&handle(&d, &request(Some("add")), r#"["1", 2]"#).await), Some(ErrorCode::BadRequest));
        assert_eq!(code(&handle(&d, &request(Some("picky")), "1").await), Some(ErrorCode::BadRequest));
        assert_eq!(code(&handle(&d, &request(Some("fail")), "1").await), Some(ErrorCode::HandlerError));
        assert_eq!(code(&handle(&d, &request(Some("panic")), "1").await), Some(ErrorCode::Internal));
        assert_eq!(code(&handle(&d, &request(Some("panic_early")), "1").await), Some(ErrorCode::Internal));
    }

    #[tokio::test]
    async fn an_unavailable_handler_is_no_answer() {
        let handled = handle(&dispatcher(None), &request(Some("down")), "1").await;
        assert_eq!(handled.verdict, Verdict::Unavailable("connection refused".into()));
        assert_eq!(handled.outcome_label(), "unavailable");
    }

    #[tokio::test]
    async fn forwarded_methods_share_a_capped_set_of_labels() {
        let handlers = Handlers::new()
            .method("echo", |p: Params| async move { Ok(p.into_value()) })
            .fallback(|_c: Call| async move { Ok(json!(null)) });
        let d = Dispatcher::new(handlers, None, Arc::new(Metrics::with_max_method_labels(3)));
        let mut labels = std::collections::BTreeSet::new();
        for i in 0..100 {
            labels.insert(handle(&d, &request(Some(&format!("m{i}"))), "1").await.method_label);
        }
        assert_eq!(labels.into_iter().collect::<Vec<_>>(), ["_other", "m0", "m1", "m2"]);
        assert_eq!(handle(&d, &request(Some("echo")), "1").await.method_label, "echo");
    }

    #[tokio::test]
    async fn expired_requests_do_not_run_and_are_counted() {
        let d = dispatcher(None);
        let mut expired = request(Some("fail"));
        expired.deadline_ms = Some(1_000);
        let handled = d.handle(&expired, b"1", false, UNIX_EPOCH + Duration::from_millis(1_001)).await;
        assert_eq!(code(&handled), Some(ErrorCode::DeadlineExceeded));
        assert!(d.metrics().encode().contains("warren_worker_requests_expired_total 1"));
        let in_time = d.handle(&expired, b"[1, 2]", false, UNIX_EPOCH + Duration::from_millis(999)).await;
        assert_eq!(code(&in_time), Some(ErrorCode::HandlerError));
    }

    #[tokio::test]
    async fn the_deadline_is_checked_before_anything_else() {
        let d = dispatcher(None);
        let late = UNIX_EPOCH + Duration::from_millis(1_001);
        for method in [None, Some("nope"), Some("add")] {
            let mut expired = request(method);
            expired.deadline_ms = Some(1_000);
            let handled = d.handle(&expired, b"{not json", false, late).await;
            assert_eq!(code(&handled), Some(ErrorCode::DeadlineExceeded), "method {method:?}");
        }
    }
}
