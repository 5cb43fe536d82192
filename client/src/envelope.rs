//! How a call and its reply map onto AMQP properties and headers (docs/protocol.md), as pure functions so the
//! caller, the worker and the tests share one reading of the wire format.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::Value;

use crate::error::CallError;
use crate::protocol::{
    CONTENT_TYPE_JSON, ErrorBody, HEADER_DEADLINE, HEADER_STATUS, HEADER_TRACEPARENT, HEADER_TRACESTATE, STATUS_ERROR,
    STATUS_OK,
};

/// W3C trace context carried by a request and copied onto its reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

/// Everything a request carries besides its body.
#[derive(Clone, Debug)]
pub struct RequestMeta<'a> {
    /// The `type` property; `None` asks for the service's default method.
    pub method: Option<&'a str>,
    /// `None` for a one-way call.
    pub correlation_id: Option<ShortString>,
    /// `None` for a one-way call.
    pub reply_to: Option<ShortString>,
    pub message_id: ShortString,
    /// Sent as `expiration` (ms) and `x-deadline` (unix ms); `None` = the request never expires.
    pub timeout: Option<Duration>,
    /// The caller's clock, the base of `x-deadline`.
    pub now_unix_ms: u64,
    pub trace: Option<&'a TraceContext>,
}

/// Milliseconds since the unix epoch on this machine's clock.
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A name that must fit an AMQP short string (queue, method, ids).
pub fn short_string(what: &str, value: &str) -> Result<ShortString, CallError> {
    ShortString::try_new(value).map_err(|e| CallError::InvalidRequest(format!("{what} {value:.40?}...: {e}")))
}

/// The largest `expiration` RabbitMQ accepts (2^32 - 1 ms, ~49 days); more is a channel error.
pub const MAX_EXPIRATION_MS: u64 = u32::MAX as u64;

/// Rounded up so a sub-millisecond timeout still gives the request a chance to be delivered.
fn ceil_millis(timeout: Duration) -> u64 {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    if Duration::from_millis(ms) < timeout { ms.saturating_add(1) } else { ms }
}

/// The properties of a request.
pub fn request_properties(meta: RequestMeta<'_>) -> Result<BasicProperties, CallError> {
    let mut props =
        BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into()).with_message_id(meta.message_id);
    if let Some(method) = meta.method {
        props = props.with_type(short_string("method", method)?);
    }
    if let Some(id) = meta.correlation_id {
        props = props.with_correlation_id(id);
    }
    if let Some(reply_to) = meta.reply_to {
        props = props.with_reply_to(reply_to);
    }
    let mut headers = FieldTable::default();
    if let Some(timeout) = meta.timeout {
        let ms = ceil_millis(timeout).clamp(1, MAX_EXPIRATION_MS);
        props = props.with_expiration(ms.to_string().into());
        let deadline = meta.now_unix_ms.saturating_add(ms).min(i64::MAX as u64) as i64;
        headers.insert(HEADER_DEADLINE.into(), AMQPValue::LongLongInt(deadline));
    }
    if let Some(trace) = meta.trace {
        headers.insert(HEADER_TRACEPARENT.into(), AMQPValue::LongString(trace.traceparent.as_str().into()));
        if let Some(state) = &trace.tracestate {
            headers.insert(HEADER_TRACESTATE.into(), AMQPValue::LongString(state.as_str().into()));
        }
    }
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    Ok(props)
}

/// A header's value as text (long or short string, UTF-8).
pub fn header_str<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A header's value as an integer, whatever width the sender's client library chose.
pub fn header_int(props: &BasicProperties, name: &str) -> Option<i64> {
    Some(match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok()?,
        // JavaScript clients send large integers as doubles.
        AMQPValue::Double(v) if v.is_finite() => *v as i64,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok()?,
        _ => return None,
    })
}

/// A request's `x-deadline` (unix ms), if it has one.
pub fn deadline_unix_ms(props: &BasicProperties) -> Option<i64> {
    header_int(props, HEADER_DEADLINE)
}

/// The request's trace context, to copy onto its reply and into the responder's spans.
pub fn trace_context(props: &BasicProperties) -> Option<TraceContext> {
    Some(TraceContext {
        traceparent: header_str(props, HEADER_TRACEPARENT)?.to_owned(),
        tracestate: header_str(props, HEADER_TRACESTATE).map(str::to_owned),
    })
}

/// Whether a `content_type` means JSON (absent means JSON; parameters such as `; charset=utf-8` are ignored).
pub fn is_json(content_type: Option<&ShortString>) -> bool {
    content_type.is_none_or(|ct| {
        let essence = ct.as_str().split(';').next().unwrap_or_default().trim();
        essence.eq_ignore_ascii_case(CONTENT_TYPE_JSON)
    })
}

/// The properties of a reply to `request`: same correlation id and content type, `x-status`, trace context.
pub fn reply_properties(request: &BasicProperties, ok: bool) -> BasicProperties {
    let mut headers = FieldTable::default();
    let status = if ok { STATUS_OK } else { STATUS_ERROR };
    headers.insert(HEADER_STATUS.into(), AMQPValue::LongString(LongString::from(status)));
    for name in [HEADER_TRACEPARENT, HEADER_TRACESTATE] {
        if let Some(value) = request.headers().as_ref().and_then(|h| h.inner().get(name)) {
            headers.insert(name.into(), value.clone());
        }
    }
    let mut props = BasicProperties::default().with_content_type(CONTENT_TYPE_JSON.into()).with_headers(headers);
    if let Some(id) = request.correlation_id() {
        props = props.with_correlation_id(id.clone());
    }
    props
}

/// The result of a call from its reply: the body for `x-status: ok` (or no `x-status`, as plain tutorial-style
/// responders send), a [`CallError::Remote`] for `x-status: error`.
pub fn decode_reply(props: &BasicProperties, body: &[u8]) -> Result<Value, CallError> {
    if !is_json(props.content_type().as_ref()) {
        let ct = props.content_type().as_ref().map(ShortString::as_str).unwrap_or_default();
        return Err(CallError::BadReply(format!("unsupported content type {ct:?}")));
    }
    match header_str(props, HEADER_STATUS) {
        None | Some(STATUS_OK) => decode_result(body),
        Some(STATUS_ERROR) => Err(decode_error(body)),
        Some(other) => Err(CallError::BadReply(format!("unknown {HEADER_STATUS} {other:?}"))),
    }
}

fn decode_result(body: &[u8]) -> Result<Value, CallError> {
    // An empty body is `null` (a responder with nothing to say).
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| CallError::BadReply(format!("result is not JSON: {e}")))
}

fn decode_error(body: &[u8]) -> CallError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { code, message, details }) => CallError::Remote { code, message, details },
        Err(e) => CallError::BadReply(format!("error reply is not an error object: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;
    use serde_json::json;

    fn meta(method: Option<&str>) -> RequestMeta<'_> {
        RequestMeta {
            method,
            correlation_id: Some("7".into()),
            reply_to: Some(crate::protocol::DIRECT_REPLY_TO.into()),
            message_id: "m-7".into(),
            timeout: Some(Duration::from_millis(1500)),
            now_unix_ms: 1_700_000_000_000,
            trace: None,
        }
    }

    fn with_headers(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (k, v) in pairs {
            headers.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_request_carries_method_ids_expiration_and_deadline() {
        let props = request_properties(meta(Some("add"))).unwrap();
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "add");
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "7");
        assert_eq!(props.reply_to().as_ref().unwrap().as_str(), "amq.rabbitmq.reply-to");
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m-7");
        assert_eq!(props.content_type().as_ref().unwrap().as_str(), "application/json");
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "1500");
        assert_eq!(deadline_unix_ms(&props), Some(1_700_000_001_500));
    }

    #[test]
    fn the_default_method_sends_no_type_and_no_timeout_sends_no_expiry() {
        let props =
            request_properties(RequestMeta { timeout: None, correlation_id: None, reply_to: None, ..meta(None) })
                .unwrap();
        assert!(props.kind().is_none());
        assert!(props.expiration().is_none());
        assert!(props.reply_to().is_none());
        assert!(props.headers().is_none());
    }

    #[test]
    fn sub_millisecond_timeouts_round_up() {
        let props = request_properties(RequestMeta { timeout: Some(Duration::from_micros(10)), ..meta(None) }).unwrap();
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "1");
    }

    #[test]
    fn huge_timeouts_are_capped_at_what_the_broker_accepts() {
        let props = request_properties(RequestMeta { timeout: Some(Duration::MAX), ..meta(None) }).unwrap();
        assert_eq!(props.expiration().as_ref().unwrap().as_str(), "4294967295");
    }

    #[test]
    fn an_overlong_method_is_an_invalid_request_not_a_panic() {
        let long = "m".repeat(300);
        assert!(matches!(request_properties(meta(Some(&long))), Err(CallError::InvalidRequest(_))));
    }

    #[test]
    fn trace_context_goes_out_and_is_copied_onto_the_reply() {
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: Some("congo=t61rcWkgMzE".into()),
        };
        let request = request_properties(RequestMeta { trace: Some(&trace), ..meta(None) }).unwrap();
        assert_eq!(trace_context(&request), Some(trace.clone()));
        let reply = reply_properties(&request, true);
        assert_eq!(trace_context(&reply), Some(trace));
        assert_eq!(reply.correlation_id().as_ref().unwrap().as_str(), "7");
        assert_eq!(header_str(&reply, HEADER_STATUS), Some("ok"));
    }

    #[test]
    fn deadlines_are_read_from_any_integer_width() {
        for value in [
            AMQPValue::LongLongInt(1_700_000_000_000),
            AMQPValue::Timestamp(1_700_000_000_000),
            AMQPValue::Double(1_700_000_000_000.0),
            AMQPValue::LongString("1700000000000".into()),
        ] {
            assert_eq!(deadline_unix_ms(&with_headers(&[(HEADER_DEADLINE, value)])), Some(1_700_000_000_000));
        }
        assert_eq!(deadline_unix_ms(&with_headers(&[(HEADER_DEADLINE, AMQPValue::LongInt(5))])), Some(5));
        assert_eq!(deadline_unix_ms(&BasicProperties::default()), None);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(None));
        assert!(is_json(Some(&"application/json".into())));
        assert!(is_json(Some(&"Application/JSON; charset=utf-8".into())));
        assert!(!is_json(Some(&"application/msgpack".into())));
    }

    #[test]
    fn ok_replies_decode_to_their_body() {
        let props = with_headers(&[(HEADER_STATUS, AMQPValue::LongString("ok".into()))]);
        assert_eq!(decode_reply(&props, b"3").unwrap(), json!(3));
        assert_eq!(decode_reply(&props, b"").unwrap(), Value::Null);
    }

    #[test]
    fn replies_without_status_are_results() {
        assert_eq!(decode_reply(&BasicProperties::default(), br#"{"a":1}"#).unwrap(), json!({"a": 1}));
    }

    #[test]
    fn error_replies_become_remote_errors() {
        let props = with_headers(&[(HEADER_STATUS, AMQPValue::LongString("error".into()))]);
        let body = serde_json::to_vec(
            &ErrorBody::new(ErrorCode::UnknownMethod, "no method nope").with_details(json!({"method": "nope"})),
        )
        .unwrap();
        match decode_reply(&props, &body) {
            Err(CallError::Remote { code, message, details }) => {
                assert_eq!(code, "unknown_method");
                assert_eq!(message, "no method nope");
                assert_eq!(details, Some(json!({"method": "nope"})));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_replies_are_bad_replies() {
        let error = with_headers(&[(HEADER_STATUS, AMQPValue::LongString("error".into()))]);
        assert!(matches!(decode_reply(&error, b"\"boom\""), Err(CallError::BadReply(_))));
        assert!(matches!(decode_reply(&BasicProperties::default(), b"{nope"), Err(CallError::BadReply(_))));
        let weird = with_headers(&[(HEADER_STATUS, AMQPValue::LongString("maybe".into()))]);
        assert!(matches!(decode_reply(&weird, b"1"), Err(CallError::BadReply(_))));
        let msgpack = BasicProperties::default().with_content_type("application/msgpack".into());
        assert!(matches!(decode_reply(&msgpack, b"\x03"), Err(CallError::BadReply(_))));
    }
}
