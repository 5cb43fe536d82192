//! Leader election over a Lease, so that of several operator replicas only one reconciles and scales.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;

/// Lease timing: a new leader takes over within `DURATION` seconds of the old one dying.
const DURATION: u64 = 15;
const GRACE: u64 = 5;

/// Holds a leadership lease for as long as the returned receiver says `true`.
pub struct Leadership {
    pub is_leader: watch::Receiver<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Starts competing for the Lease `name` in `namespace`.
    pub async fn campaign(client: Client, namespace: &str, name: &str, identity: String) -> anyhow::Result<Self> {
        let manager = LeaseManagerBuilder::new(client, name)
            .with_namespace(namespace)
            .with_parameters(LeaseParams::new(identity, DURATION, GRACE))
            .build()
            .await?;
        let (is_leader, task) = manager.watch().await;
        let task = tokio::spawn(async move {
            match task.await {
                Ok(Err(e)) => tracing::error!("leader election stopped: {e}"),
                Err(e) => tracing::error!("leader election task failed: {e}"),
                Ok(Ok(_)) => {}
            }
        });
        Ok(Self { is_leader, _task: task })
    }

    /// Waits until this replica leads.
    pub async fn acquired(&mut self) {
        while !*self.is_leader.borrow_and_update() {
            if self.is_leader.changed().await.is_err() {
                // The manager is gone: never return as leader.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when this replica stops leading.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.is_leader.clone();
        async move {
            loop {
                if !*rx.borrow_and_update() {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
