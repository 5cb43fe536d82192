//! Building a reply (docs/protocol.md): pure functions of the request and the outcome.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;
use warren_client::protocol::{
    CONTENT_TYPE_JSON, ErrorBody, ErrorCode, HEADER_STATUS, HEADER_TRACEPARENT, HEADER_TRACESTATE, STATUS_ERROR,
    STATUS_OK,
};

use crate::handler::HandlerError;
use crate::request::{Request, is_json};

/// How one request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok(Value),
    Error { code: ErrorCode, message: String, details: Option<Value> },
}

impl Outcome {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error { code, message: message.into(), details: None }
    }

    /// The `outcome` metric label: `ok` or the error code.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ok(_) => "ok",
            Self::Error { code, .. } => code.as_str(),
        }
    }
}

impl From<Result<Value, HandlerError>> for Outcome {
    fn from(result: Result<Value, HandlerError>) -> Self {
        match result {
            Ok(value) => Self::Ok(value),
            Err(error) => {
                let code = error.code();
                let (message, details) = match error {
                    HandlerError::BadRequest { message, details }
                    | HandlerError::Failed { message, details }
                    | HandlerError::Internal { message, details } => (message, details),
                    HandlerError::Unavailable { message } => (message, None),
                };
                Self::Error { code, message, details }
            }
        }
    }
}

/// A reply ready to publish on the default exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Reply {
    /// The reply to `request`, or `None` for a one-way request (no `reply_to`).
    pub fn to(request: &Request, outcome: &Outcome) -> Option<Self> {
        let routing_key = request.reply_to.clone()?;
        let (status, body) = match outcome {
            Outcome::Ok(value) => (STATUS_OK, serde_json::to_vec(value)),
            Outcome::Error { code, message, details } => {
                let mut error = ErrorBody::new(*code, message.clone());
                error.details = details.clone();
                (STATUS_ERROR, serde_json::to_vec(&error))
            }
        };
        // Serializing a `Value` cannot fail; fall back to an honest error rather than a panic anyway.
        let (status, body) = match body {
            Ok(body) => (status, body),
            Err(e) => (STATUS_ERROR, internal_error_body(&format!("could not encode the reply: {e}"))),
        };

        let mut headers = FieldTable::default();
        headers.insert(HEADER_STATUS.into(), long_string(status));
        if let Some(traceparent) = &request.trace.traceparent {
            headers.insert(HEADER_TRACEPARENT.into(), long_string(traceparent));
        }
        if let Some(tracestate) = &request.trace.tracestate {
            headers.insert(HEADER_TRACESTATE.into(), long_string(tracestate));
        }
        // Echo the request's content type when it is a JSON one (it may carry a charset); JSON otherwise.
        let content_type = request.content_type.as_deref().filter(|c| is_json(c)).unwrap_or(CONTENT_TYPE_JSON);
        let mut properties = BasicProperties::default().with_content_type(content_type.into()).with_headers(headers);
        if let Some(correlation_id) = &request.correlation_id {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        Some(Self { routing_key, properties, body })
    }
}

impl Reply {
    /// The small `internal` error sent instead of a reply of `size` bytes, over `limit` (the worker's own limit,
    /// or the broker's `max_message_size`); `None` for a one-way request.
    pub fn too_large(request: &Request, size: usize, limit: usize) -> Option<Self> {
        let outcome = Outcome::Error {
            code: ErrorCode::Internal,
            message: format!("the reply ({size} bytes) is larger than the limit of {limit} bytes"),
            details: Some(serde_json::json!({ "reason": "reply_too_large", "size": size, "limit": limit })),
        };
        Self::to(request, &outcome)
    }
}

fn internal_error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&ErrorBody::new(ErrorCode::Internal, message)).unwrap_or_default()
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::TraceContext;
    use serde_json::json;

    fn request() -> Request {
        Request {
            method: Some("add".into()),
            reply_to: Some("amq.rabbitmq.reply-to.xyz".into()),
            correlation_id: Some("corr-7".into()),
            content_type: None,
            deadline_ms: None,
            trace: TraceContext { traceparent: Some("00-t-p-01".into()), tracestate: Some("k=v".into()) },
        }
    }

    fn header(reply: &Reply, name: &str) -> Option<String> {
        match reply.properties.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8(s.as_bytes().to_vec()).unwrap()),
            other => panic!("unexpected header value {other:?}"),
        }
    }

    #[test]
    fn ok_reply_carries_result_correlation_and_trace() {
        let reply = Reply::to(&request(), &Outcome::Ok(json!(3))).unwrap();
        assert_eq!(reply.routing_key.as_str(), "amq.rabbitmq.reply-to.xyz");
        assert_eq!(reply.body, b"3");
        assert_eq!(reply.properties.correlation_id().as_ref().map(ShortString::as_str), Some("corr-7"));
        assert_eq!(reply.properties.content_type().as_ref().map(ShortString::as_str), Some("application/json"));
        assert_eq!(header(&reply, "x-status").as_deref(), Some("ok"));
        assert_eq!(header(&reply, "traceparent").as_deref(), Some("00-t-p-01"));
        assert_eq!(header(&reply, "tracestate").as_deref(), Some("k=v"));
    }

    #[test]
    fn error_reply_has_code_message_and_details() {
        let outcome = Outcome::from(Err(HandlerError::failed("boom").with_details(json!({"n": 1}))));
        assert_eq!(outcome.label(), "handler_error");
        let reply = Reply::to(&request(), &outcome).unwrap();
        assert_eq!(header(&reply, "x-status").as_deref(), Some("error"));
        let body: ErrorBody = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body, ErrorBody::new(ErrorCode::HandlerError, "boom").with_details(json!({"n": 1})));
    }

    #[test]
    fn json_content_type_is_echoed_and_others_become_json() {
        let mut with_charset = request();
        with_charset.content_type = Some("application/json; charset=utf-8".into());
        let reply = Reply::to(&with_charset, &Outcome::Ok(json!(1))).unwrap();
        assert_eq!(
            reply.properties.content_type().as_ref().map(ShortString::as_str),
            Some("application/json; charset=utf-8")
        );
        let mut msgpack = request();
        msgpack.content_type = Some("application/msgpack".into());
        let reply = Reply::to(&msgpack, &Outcome::error(ErrorCode::BadRequest, "no")).unwrap();
        assert_eq!(reply.properties.content_type().as_ref().map(ShortString::as_str), Some("application/json"));
    }

    #[test]
    fn a_reply_too_large_becomes_a_small_internal_error() {
        let reply = Reply::too_large(&request(), 3 << 20, 1 << 20).unwrap();
        assert!(reply.body.len() < 256);
        let body: ErrorBody = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body.code, "internal");
        assert_eq!(body.details.unwrap()["reason"], "reply_too_large");
        assert_eq!(reply.properties.correlation_id().as_ref().map(ShortString::as_str), Some("corr-7"));
    }

    #[test]
    fn one_way_requests_get_no_reply() {
        let mut one_way = request();
        one_way.reply_to = None;
        assert_eq!(Reply::to(&one_way, &Outcome::Ok(json!(null))), None);
    }
}
