//! Why a call failed, as the caller sees it.

use std::fmt;

/// The outcome of a failed [`Client::call`](crate::Client::call) or [`Client::notify`](crate::Client::notify).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No reply arrived within the call's timeout.
    #[error("no reply within the call's timeout")]
    Timeout,
    /// The broker could not route the request: no queue of that name exists.
    #[error("no service queue named {queue:?}")]
    NoSuchService { queue: String },
    /// The broker did not take the request: it nacked the publish (the queue is full and rejects publishes, or could
    /// not store it). A call fails with this at once instead of waiting for its timeout.
    #[error("service queue {queue:?} refused the request (the broker nacked it: queue full or unavailable)")]
    Rejected { queue: String },
    /// The responder replied with an error.
    #[error("{code}: {message}")]
    Remote { code: String, message: String, details: Option<serde_json::Value> },
    /// The broker connection failed or was lost before the reply arrived.
    #[error("broker connection failed: {0}")]
    Connection(#[source] lapin::Error),
    /// The reply does not follow the wire protocol.
    #[error("malformed reply: {0}")]
    BadReply(String),
    /// The call cannot be sent as asked (e.g. a queue or method name over 255 bytes).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<lapin::Error> for CallError {
    fn from(error: lapin::Error) -> Self {
        Self::Connection(error)
    }
}

impl CallError {
    /// A stable, lower-case label of the error's kind, for metrics, bench reports and logs.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Timeout => ErrorKind::Timeout,
            Self::NoSuchService { .. } => ErrorKind::NoSuchService,
            Self::Rejected { .. } => ErrorKind::Rejected,
            Self::Remote { .. } => ErrorKind::Remote,
            Self::Connection(_) => ErrorKind::Connection,
            Self::BadReply(_) => ErrorKind::BadReply,
            Self::InvalidRequest(_) => ErrorKind::InvalidRequest,
        }
    }
}

/// [`CallError`] without its data: what bench reports count and the CLI maps to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    Timeout,
    NoSuchService,
    Rejected,
    Remote,
    Connection,
    BadReply,
    InvalidRequest,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NoSuchService => "no_such_service",
            Self::Rejected => "rejected",
            Self::Remote => "remote",
            Self::Connection => "connection",
            Self::BadReply => "bad_reply",
            Self::InvalidRequest => "invalid_request",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
