//! What every reconcile shares: the API client, configuration, brokers, the observer, metrics, the event recorder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use warren_client::backoff::Backoff;

use crate::broker::BrokerPool;
use crate::crd::RpcService;
use crate::metrics::Metrics;
use crate::observer::Observer;

/// The field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "warren-operator";

/// Operator-wide settings, from the command line.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// The worker image for RpcServices that name none.
    pub worker_image: String,
    /// The broker Secret (in the RpcService's namespace) for RpcServices that name none.
    pub default_broker_secret: Option<String>,
    /// How often the observer reads queue figures from the management API.
    pub poll_interval: Duration,
    /// How long after deletion began `deletionPolicy: Delete` keeps retrying to delete the queues on a broker that
    /// does not answer or refuses, before the finalizer lets the object go and reports the queues left behind.
    pub cleanup_timeout: Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            worker_image: format!("ghcr.io/warren-dev/warren-worker:{}", env!("CARGO_PKG_VERSION")),
            default_broker_secret: None,
            poll_interval: Duration::from_secs(5),
            cleanup_timeout: Duration::from_secs(300),
        }
    }
}

pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub brokers: BrokerPool,
    pub observer: Arc<Observer>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<RpcService>, u32>>,
}

impl Context {
    pub fn new(client: Client, config: OperatorConfig, observer: Arc<Observer>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            brokers: BrokerPool::default(),
            observer,
            metrics,
            failures: Mutex::default(),
        }
    }

    /// Records one more failure of `key` and returns how many in a row.
    pub fn failed(&self, key: &ObjectRef<RpcService>) -> u32 {
        let mut failures = self.failures.lock().expect("failures lock");
        let n = failures.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    }

    pub fn succeeded(&self, key: &ObjectRef<RpcService>) {
        self.failures.lock().expect("failures lock").remove(key);
    }
}

/// The requeue schedule: 1 s, 2 s, 4 s ... capped at a minute.
const REQUEUE: Backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(60) };

/// The requeue delay after the `n`th consecutive transient failure, within ±10 % of [`REQUEUE`]'s ceiling: enough
/// that many objects failing together (a broker outage) do not retry in lockstep, close enough to stay predictable.
pub fn backoff(n: u32) -> Duration {
    let jitter = rand::random::<f64>() * 0.2 + 0.9;
    REQUEUE.ceiling(n.saturating_sub(1)).mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(1100));
        assert!(backoff(3) >= Duration::from_millis(3600));
        assert!(backoff(50) <= Duration::from_secs(66));
        assert!(backoff(50) >= Duration::from_secs(54));
    }
}
