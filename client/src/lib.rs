//! warren-client: the wire protocol types, the queue topology shared with the operator, and the caller library.

pub mod protocol;
pub mod topology;
