//! From a request to its outcome: deadline check, method resolution, params, the handler. No broker here.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::FutureExt;
use warren_client::protocol::ErrorCode;

use crate::handler::{Call, Handlers, Params, UNKNOWN_METHOD_LABEL};
use crate::metrics::Metrics;
use crate::reply::Outcome;
use crate::request::Request;

/// One request's outcome and the `method` label it is counted under.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    pub method_label: String,
    pub outcome: Outcome,
}

/// Runs requests against a set of handlers.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    handlers: Arc<Handlers>,
    default_method: Option<String>,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    pub fn new(handlers: Handlers, default_method: Option<String>, metrics: Arc<Metrics>) -> Self {
        Self { handlers: Arc::new(handlers), default_method, metrics }
    }

    /// Every deterministic failure (expired, unknown method, malformed body, handler error, handler panic)
    /// becomes an error outcome here, so the caller can always reply and ack.
    pub async fn handle(&self, request: &Request, body: &[u8], redelivered: bool, now: SystemTime) -> Handled {
        let method = request.method.clone().or_else(|| self.default_method.clone());
        let method_label = match &method {
            Some(method) => self.handlers.method_label(method).to_owned(),
            None => UNKNOWN_METHOD_LABEL.into(),
        };
        let outcome = self.outcome(method, request, body, redelivered, now).await;
        Handled { method_label, outcome }
    }

    /// The checks in the order docs/protocol.md gives: deadline, method, then the body and params, then the run.
    async fn outcome(
        &self,
        method: Option<String>,
        request: &Request,
        body: &[u8],
        redelivered: bool,
        now: SystemTime,
    ) -> Outcome {
        if request.expired(now) {
            self.metrics.request_expired();
            return Outcome::error(ErrorCode::DeadlineExceeded, "the caller's deadline passed before the request ran");
        }
        let Some(method) = method else {
            return Outcome::error(
                ErrorCode::UnknownMethod,
                "the request names no method (AMQP `type` property) and this service has no default method",
            );
        };
        if !self.handlers.serves(&method) {
            return Outcome::error(
                ErrorCode::UnknownMethod,
                format!("unknown method {method:?}; this service serves {}", self.handlers.names().join(", ")),
            );
        }
        let params = match request.params(body) {
            Ok(params) => params,
            Err(error) => return Outcome::from(Err(error)),
        };
        let label = self.handlers.method_label(&method).to_owned();
        let call = Call {
            method,
            params: Params::new(params),
            trace: request.trace.clone(),
            deadline: request.deadline(),
            redelivered,
        };
        let Some(running) = self.handlers.dispatch(call) else {
            return Outcome::error(ErrorCode::UnknownMethod, "no handler serves this method");
        };
        let started = Instant::now();
        // A panicking handler must still get its request answered and acked, or it would hold a prefetch slot.
        let result = AssertUnwindSafe(running).catch_unwind().await;
        self.metrics.handler_ran(&label, started.elapsed());
        match result {
            Ok(result) => Outcome::from(result),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(method = %label, %message, "handler panicked");
                Outcome::error(ErrorCode::Internal, format!("the handler panicked: {message}"))
            }
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerError;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    fn dispatcher(default_method: Option<&str>) -> Dispatcher {
        let handlers = crate::builtin::handlers()
            .method("panic", |_p: Params| async move { panic!("kaboom") })
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
        match &handled.outcome {
            Outcome::Ok(_) => None,
            Outcome::Error { code, .. } => Some(*code),
        }
    }

    #[tokio::test]
    async fn runs_the_named_method() {
        let d = dispatcher(None);
        let handled = handle(&d, &request(Some("add")), "[1, 2]").await;
        assert_eq!(handled, Handled { method_label: "add".into(), outcome: Outcome::Ok(json!(3)) });
    }

    #[tokio::test]
    async fn no_method_uses_the_default_or_is_unknown() {
        let handled = handle(&dispatcher(Some("echo")), &request(None), r#"{"x": 1}"#).await;
        assert_eq!(handled.outcome, Outcome::Ok(json!({"x": 1})));
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
