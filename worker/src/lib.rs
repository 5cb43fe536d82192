//! warren-worker: the request/reply runtime.
