//! Reconnect delays: the retry schedule shared with the operator ([`warren_client::backoff`]).

pub use warren_client::backoff::Backoff;
