//! Reading a request off the wire (docs/protocol.md): pure functions of the AMQP properties and body.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::Value;
use warren_client::protocol::{CONTENT_TYPE_JSON, HEADER_DEADLINE, HEADER_TRACEPARENT, HEADER_TRACESTATE};

use crate::handler::{HandlerError, TraceContext};

/// The parts of a request the worker acts on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Request {
    /// The `type` property; `None` means the service's default method.
    pub method: Option<String>,
    /// Where to reply; `None` makes a one-way call.
    pub reply_to: Option<ShortString>,
    pub correlation_id: Option<ShortString>,
    pub content_type: Option<String>,
    /// `x-deadline`: unix time in ms after which the caller no longer waits.
    pub deadline_ms: Option<u64>,
    pub trace: TraceContext,
}

impl Request {
    pub fn from_properties(properties: &BasicProperties) -> Self {
        let header = |name| properties.headers().as_ref().and_then(|h| header(h, name));
        Self {
            method: non_empty(properties.kind()),
            reply_to: properties.reply_to().clone().filter(|r| !r.as_str().is_empty()),
            correlation_id: properties.correlation_id().clone(),
            content_type: non_empty(properties.content_type()),
            deadline_ms: header(HEADER_DEADLINE).and_then(amqp_u64),
            trace: TraceContext {
                traceparent: header(HEADER_TRACEPARENT).and_then(amqp_string),
                tracestate: header(HEADER_TRACESTATE).and_then(amqp_string),
            },
        }
    }

    /// Whether the caller gave up before `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        deadline_passed(self.deadline_ms, unix_ms(now))
    }

    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// The body as params: JSON (the default when `content_type` is absent); an empty body is `null`, so that a
    /// method without params can be called with nothing in the body.
    pub fn params(&self, body: &[u8]) -> Result<Value, HandlerError> {
        if let Some(content_type) = &self.content_type
            && !is_json(content_type)
        {
            return Err(HandlerError::bad_request(format!(
                "unsupported content_type {content_type:?}: this worker speaks {CONTENT_TYPE_JSON}"
            )));
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(body).map_err(|e| HandlerError::bad_request(format!("the body is not valid JSON: {e}")))
    }
}

/// How many times the broker delivered this request before (a quorum queue's `x-delivery-count`; 0 when absent).
pub fn delivery_count(properties: &BasicProperties) -> u64 {
    properties.headers().as_ref().and_then(|h| header(h, "x-delivery-count")).and_then(amqp_u64).unwrap_or(0)
}

/// `deadline_ms` has passed at `now_ms` (a request without a deadline never expires).
pub fn deadline_passed(deadline_ms: Option<u64>, now_ms: u64) -> bool {
    deadline_ms.is_some_and(|deadline| deadline < now_ms)
}

pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `application/json`, with or without parameters such as `; charset=utf-8`.
pub fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(CONTENT_TYPE_JSON))
}

fn non_empty(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned()).filter(|s| !s.is_empty())
}

fn header<'a>(headers: &'a FieldTable, name: &str) -> Option<&'a AMQPValue> {
    headers.inner().get(name)
}

/// Any AMQP integer (clients pick different widths) or a decimal string.
fn amqp_u64(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::Double(v) if v.is_finite() && *v >= 0.0 => Some(*v as u64),
        other => amqp_string(other).and_then(|s| s.trim().parse().ok()),
    }
}

fn amqp_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => String::from_utf8(b.as_slice().to_vec()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;
    use serde_json::json;
    use warren_client::protocol::ErrorCode;

    fn headers(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (k, v) in entries {
            table.insert((*k).into(), v.clone());
        }
        table
    }

    #[test]
    fn reads_method_reply_address_deadline_and_trace() {
        let properties = BasicProperties::default()
            .with_type("add".into())
            .with_reply_to("amq.rabbitmq.reply-to.abc".into())
            .with_correlation_id("c-1".into())
            .with_headers(headers(&[
                ("x-deadline", AMQPValue::LongLongInt(1_700_000_000_000)),
                ("traceparent", AMQPValue::LongString(LongString::from("00-abc-def-01"))),
            ]));
        let request = Request::from_properties(&properties);
        assert_eq!(request.method.as_deref(), Some("add"));
        assert_eq!(request.reply_to.as_ref().map(ShortString::as_str), Some("amq.rabbitmq.reply-to.abc"));
        assert_eq!(request.correlation_id.as_ref().map(ShortString::as_str), Some("c-1"));
        assert_eq!(request.deadline_ms, Some(1_700_000_000_000));
        assert_eq!(request.trace.traceparent.as_deref(), Some("00-abc-def-01"));
        assert_eq!(request.trace.tracestate, None);
    }

    #[test]
    fn empty_type_and_reply_to_mean_absent() {
        let properties = BasicProperties::default().with_type("".into()).with_reply_to("".into());
        let request = Request::from_properties(&properties);
        assert_eq!(request.method, None);
        assert_eq!(request.reply_to, None);
    }

    #[test]
    fn deadline_accepts_every_integer_width_and_strings() {
        for value in [
            AMQPValue::LongInt(42),
            AMQPValue::LongUInt(42),
            AMQPValue::LongLongInt(42),
            AMQPValue::Timestamp(42),
            AMQPValue::LongString(LongString::from("42")),
        ] {
            let properties = BasicProperties::default().with_headers(headers(&[("x-deadline", value.clone())]));
            assert_eq!(Request::from_properties(&properties).deadline_ms, Some(42), "{value:?}");
        }
        let garbage = BasicProperties::default()
            .with_headers(headers(&[("x-deadline", AMQPValue::LongString(LongString::from("soon")))]));
        assert_eq!(Request::from_properties(&garbage).deadline_ms, None);
    }

    #[test]
    fn deadline_check() {
        assert!(!deadline_passed(None, 1_000));
        assert!(!deadline_passed(Some(1_000), 1_000));
        assert!(!deadline_passed(Some(1_001), 1_000));
        assert!(deadline_passed(Some(999), 1_000));
        let request = Request { deadline_ms: Some(1_000), ..Default::default() };
        assert!(request.expired(UNIX_EPOCH + Duration::from_millis(1_001)));
        assert!(!request.expired(UNIX_EPOCH + Duration::from_millis(999)));
    }

    #[test]
    fn params_are_json_and_an_empty_body_is_null() {
        let request = Request::default();
        assert_eq!(request.params(br#"{"a": 1}"#), Ok(json!({"a": 1})));
        assert_eq!(request.params(b""), Ok(Value::Null));
        assert_eq!(request.params(b"{not json").unwrap_err().code(), ErrorCode::BadRequest);
        let charset = Request { content_type: Some("application/json; charset=utf-8".into()), ..Default::default() };
        assert_eq!(charset.params(b"[1]"), Ok(json!([1])));
        let msgpack = Request { content_type: Some("application/msgpack".into()), ..Default::default() };
        assert_eq!(msgpack.params(b"\x91\x01").unwrap_err().code(), ErrorCode::BadRequest);
    }
}
