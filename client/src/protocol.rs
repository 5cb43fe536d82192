//! The wire protocol's names and shapes (docs/protocol.md is the normative text).
//!
//! Everything here is plain data so the caller, the worker and other-language implementations agree on one
//! definition of every header, property value and error code.

use serde::{Deserialize, Serialize};

/// Routing key of RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Reply header carrying `ok` or `error`.
pub const HEADER_STATUS: &str = "x-status";
/// Request header: the unix time in milliseconds after which the caller no longer waits.
pub const HEADER_DEADLINE: &str = "x-deadline";
/// W3C trace context headers, propagated from request to reply.
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_TRACESTATE: &str = "tracestate";
/// `content_type` of JSON bodies; also what an absent `content_type` means.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Reserved for MessagePack bodies; not implemented (a worker answers `bad_request`, the client rejects the reply).
pub const CONTENT_TYPE_MSGPACK: &str = "application/msgpack";
/// `x-status` value of a successful reply.
pub const STATUS_OK: &str = "ok";
/// `x-status` value of an error reply.
pub const STATUS_ERROR: &str = "error";

/// Why a call failed on the responder's side; the `code` of an error reply.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON, or the params do not fit the method.
    BadRequest,
    /// No handler is registered for the method.
    UnknownMethod,
    /// The handler ran and failed.
    HandlerError,
    /// The request's `x-deadline` had passed before it was run.
    DeadlineExceeded,
    /// Anything else that went wrong in the worker.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownMethod => "unknown_method",
            Self::HandlerError => "handler_error",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of an error reply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    /// One of the [`ErrorCode`]s; kept as a string so a newer responder's codes still parse.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code: code.as_str().to_owned(), message: message.into(), details: None }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}
