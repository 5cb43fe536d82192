//! Forwarding each request to a user container over HTTP (`--handler http://127.0.0.1:8080/rpc`).
//!
//! `POST <url>/<method>` with the params as the JSON body and headers `X-Warren-Method`, `traceparent` and
//! `tracestate` (naming the worker's delivery span when traces are exported, else the caller's as they came) and
//! `X-Warren-Deadline` (unix ms, when the caller set one). A 2xx answer's JSON body is the result
//! (an empty body is `null`); any other status is a `handler_error` whose details carry the status and the body.
//!
//! Limits: each request is cut off after the handler timeout (or at the caller's deadline, if sooner) with a
//! `handler_error`, and a response body over the size limit is an `internal` error, read no further.
//!
//! A backend that cannot be reached (connection refused or reset, not listening yet, gone) is not an answer:
//! [`HandlerError::Unavailable`] makes the worker requeue the request and stop consuming until [`HttpHandler::probe`]
//! gets an HTTP answer again.

use std::time::{Duration, SystemTime};

use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use warren_client::protocol::CONTENT_TYPE_JSON;

use crate::handler::{Call, HandlerError, HandlerResult, Handlers};

pub const HEADER_METHOD: &str = "X-Warren-Method";
pub const HEADER_DEADLINE: &str = "X-Warren-Deadline";

/// How long establishing a connection to the backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a probe of the backend may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take when the caller set no earlier deadline, by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest response body read from the backend, by default (RabbitMQ 4's default `max_message_size`).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The HTTP handler's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Each request is cut off after this (or at the caller's `x-deadline`, when sooner).
    pub timeout: Duration,
    /// A response body larger than this is an `internal` error; the rest is not read.
    pub max_response_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { timeout: DEFAULT_TIMEOUT, max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpHandlerError {
    #[error("invalid handler URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("failed to build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Forwards calls to one HTTP base URL.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    base: reqwest::Url,
    client: reqwest::Client,
    limits: HttpLimits,
}

impl HttpHandler {
    /// A handler with the default limits.
    pub fn new(url: &str) -> Result<Self, HttpHandlerError> {
        Self::with_limits(url, HttpLimits::default())
    }

    pub fn with_limits(url: &str, limits: HttpLimits) -> Result<Self, HttpHandlerError> {
        let invalid = |reason: String| HttpHandlerError::InvalidUrl { url: url.into(), reason };
        let base = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("expected an http:// or https:// URL".into()));
        }
        let client =
            reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build().map_err(HttpHandlerError::Client)?;
        Ok(Self { base, client, limits })
    }

    /// Handlers that forward every method here, probing the backend when it was unavailable.
    pub fn into_handlers(self) -> Handlers {
        let prober = self.clone();
        Handlers::new()
            .fallback(move |call: Call| {
                let handler = self.clone();
                async move { handler.forward(call).await }
            })
            .probe(move || {
                let prober = prober.clone();
                async move { prober.probe().await }
            })
    }

    /// Whether the backend answers HTTP at all: `GET <url>`, any status counts (a 404 or 405 still proves that the
    /// server listens and speaks HTTP); refused, reset or no answer within 2 s does not.
    pub async fn probe(&self) -> bool {
        match self.client.get(self.base.clone()).timeout(PROBE_TIMEOUT).send().await {
            Ok(_) => true,
            Err(error) => {
                tracing::debug!(url = %self.base, error = %error_chain(&error), "the handler does not answer yet");
                false
            }
        }
    }

    /// `<base>/<method>`, the method as one percent-encoded path segment.
    pub fn method_url(&self, method: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(method);
        }
        url
    }

    pub async fn forward(&self, call: Call) -> HandlerResult {
        let url = self.method_url(&call.method);
        let body = serde_json::to_vec(call.params.as_value()).unwrap_or_default();
        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, CONTENT_TYPE_JSON)
            .header(HEADER_METHOD, &call.method)
            .body(body);
        // The backend's span is a child of this delivery's span when it is exported, else of the caller's.
        let (traceparent, tracestate) = match warren_client::telemetry::trace_headers(&tracing::Span::current()) {
            Some((traceparent, tracestate)) => (Some(traceparent), tracestate),
            None => (call.trace.traceparent.clone(), call.trace.tracestate.clone()),
        };
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(tracestate) = tracestate {
            request = request.header("tracestate", tracestate);
        }
        let mut timeout = self.limits.timeout;
        if let Some(deadline) = call.deadline {
            request = request.header(HEADER_DEADLINE, crate::request::unix_ms(deadline).to_string());
            // Stop waiting when the caller does; a deadline already past still gets a moment to answer.
            let remaining = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::from_millis(1));
            timeout = timeout.min(remaining);
        }
        let limit = self.limits.max_response_bytes;
        // One bound for the whole exchange, body included: a backend that trickles its answer is cut off too.
        let exchange = async {
            let response = request.send().await.map_err(|e| transport_error(&url, e, timeout))?;
            let status = response.status();
            let bytes = read_limited(response, limit).await.map_err(|e| match e {
                ReadError::Transport(e) => transport_error(&url, e, timeout),
                ReadError::TooLarge => too_large(status, limit),
            })?;
            Ok::<_, HandlerError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(timeout, exchange).await.map_err(|_| timed_out(&url, timeout))??;
        if status.is_success() {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| {
                HandlerError::failed(format!("the handler answered {status} with a body that is not JSON: {e}"))
                    .with_details(json!({ "status": status.as_u16(), "body": body_value(&bytes) }))
            });
        }
        Err(HandlerError::failed(format!("the handler answered {status}"))
            .with_details(json!({ "status": status.as_u16(), "body": body_value(&bytes) })))
    }
}

enum ReadError {
    Transport(reqwest::Error),
    TooLarge,
}

/// The response body, or `TooLarge` as soon as it exceeds `limit` bytes (by its Content-Length or as it arrives).
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ReadError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(status: reqwest::StatusCode, limit: usize) -> HandlerError {
    HandlerError::internal(format!("the handler's response ({status}) is larger than the limit of {limit} bytes"))
        .with_details(json!({ "reason": "reply_too_large", "limit": limit }))
}

fn timed_out(url: &reqwest::Url, timeout: Duration) -> HandlerError {
    HandlerError::failed(format!("the handler at {url} did not answer within {timeout:?}"))
        .with_details(json!({ "reason": "timeout", "timeout_ms": timeout.as_millis() as u64 }))
}

/// A failed exchange: a timeout is the handler's failure (it accepted the request and may have run it); anything
/// else means the backend is not there to take requests (connection refused or reset, closed mid-exchange).
fn transport_error(url: &reqwest::Url, error: reqwest::Error, timeout: Duration) -> HandlerError {
    if error.is_timeout() && !error.is_connect() {
        return timed_out(url, timeout);
    }
    HandlerError::unavailable(format!("the handler at {url} could not be reached: {}", error_chain(&error)))
}

/// `{:#}`-style chain: reqwest's own message is terse ("error sending request").
fn error_chain(error: &reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The body as JSON when it is JSON, as a string otherwise.
fn body_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_becomes_the_last_path_segment() {
        let handler = HttpHandler::new("http://127.0.0.1:8080/rpc").unwrap();
        assert_eq!(handler.method_url("add").as_str(), "http://127.0.0.1:8080/rpc/add");
        let trailing = HttpHandler::new("http://127.0.0.1:8080/rpc/").unwrap();
        assert_eq!(trailing.method_url("add").as_str(), "http://127.0.0.1:8080/rpc/add");
        assert_eq!(handler.method_url("a/b c").as_str(), "http://127.0.0.1:8080/rpc/a%2Fb%20c");
    }

    #[test]
    fn rejects_urls_that_are_not_http() {
        assert!(HttpHandler::new("builtin").is_err());
        assert!(HttpHandler::new("ftp://host/x").is_err());
    }

    #[test]
    fn error_bodies_stay_json_when_they_are() {
        assert_eq!(body_value(br#"{"e":1}"#), json!({"e": 1}));
        assert_eq!(body_value(b"oops"), json!("oops"));
    }
}
