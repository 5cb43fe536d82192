//! Test support: the environment `scripts/env up` starts (a real RabbitMQ and a real kube-apiserver), reached
//! through the variables it exports, with defaults that match it.

pub mod amqp_proxy;
pub mod backend;
pub mod broker;
pub mod chaos_broker;
pub mod cluster;
pub mod local_runtime;
pub mod operator_process;
pub mod private_cluster;
pub mod prometheus;
pub mod worker_process;

use std::path::PathBuf;

use warren_client::endpoint::BrokerEndpoint;

/// The checkout under test. `cargo test` and `cargo run` set CARGO_MANIFEST_DIR at run time, so this is right even
/// when a shared CARGO_TARGET_DIR holds a binary built from another clone (the compile-time path is the fallback).
pub fn workspace_root() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest_dir.parent().expect("the workspace root").to_path_buf()
}

/// AMQP URI of the test broker (`WARREN_BROKER_URI`).
pub fn broker_uri() -> String {
    BrokerEndpoint::from_env().amqp_uri
}

/// Management API URI of the test broker (`WARREN_MANAGEMENT_URI`).
pub fn management_uri() -> String {
    BrokerEndpoint::from_env().management_uri
}

/// A name no other test (or earlier run) uses: `<prefix>-<8 hex>`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Path of a workspace binary (`warren`, `warren-worker`, `warren-operator`) next to the test executable:
/// `make test` builds the binaries before it runs the tests.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} not built: run `cargo build --workspace --bins` first", path.display());
    path
}
