//! Forwarding each request to a user container over HTTP (`--handler http://127.0.0.1:8080/rpc`).
//!
//! `POST <url>/<method>` with the params as the JSON body and headers `X-Warren-Method`, `traceparent`,
//! `tracestate` and `X-Warren-Deadline` (unix ms, when the caller set one; the request is also cut off then).
//! A 2xx answer's JSON body is the result (an empty body is `null`); any other status is a `handler_error` whose
//! details carry the status and the body; a backend that cannot be reached is `internal`, since the handler never
//! ran and a retry may well succeed.

use std::time::{Duration, SystemTime};

use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};
use warren_client::protocol::CONTENT_TYPE_JSON;

use crate::handler::{Call, HandlerError, HandlerResult, Handlers};

pub const HEADER_METHOD: &str = "X-Warren-Method";
pub const HEADER_DEADLINE: &str = "X-Warren-Deadline";

/// How long establishing a connection to the backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
}

impl HttpHandler {
    pub fn new(url: &str) -> Result<Self, HttpHandlerError> {
        let invalid = |reason: String| HttpHandlerError::InvalidUrl { url: url.into(), reason };
        let base = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("expected an http:// or https:// URL".into()));
        }
        let client =
            reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).build().map_err(HttpHandlerError::Client)?;
        Ok(Self { base, client })
    }

    /// Handlers that forward every method here.
    pub fn into_handlers(self) -> Handlers {
        Handlers::new().fallback(move |call: Call| {
            let handler = self.clone();
            async move { handler.forward(call).await }
        })
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
        if let Some(traceparent) = &call.trace.traceparent {
            request = request.header("traceparent", traceparent);
        }
        if let Some(tracestate) = &call.trace.tracestate {
            request = request.header("tracestate", tracestate);
        }
        if let Some(deadline) = call.deadline {
            request = request.header(HEADER_DEADLINE, crate::request::unix_ms(deadline).to_string());
            // Stop waiting when the caller does; a deadline already past still gets a moment to answer.
            let remaining = deadline.duration_since(SystemTime::now()).unwrap_or(Duration::from_millis(1));
            request = request.timeout(remaining);
        }

        let response = request.send().await.map_err(|e| transport_error(&url, e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| transport_error(&url, e))?;
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

fn transport_error(url: &reqwest::Url, error: reqwest::Error) -> HandlerError {
    if error.is_timeout() {
        return HandlerError::failed(format!("the handler at {url} did not answer before the deadline"));
    }
    // `{:#}`-style chain: reqwest's own message is terse ("error sending request").
    let mut message = format!("the handler at {url} could not be reached: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    HandlerError::internal(message)
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
