//! The test broker seen from outside: queues through the management API, and `rabbitmqctl` to stop and start
//! the broker. Tests that stop the broker take [`disruption`] exclusively; every other broker test holds it
//! shared, so an outage never lands in the middle of an unrelated test of the same binary.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::sync::RwLock;
use warren_client::management::Management;

fn disruption_lock() -> &'static RwLock<()> {
    static LOCK: OnceLock<RwLock<()>> = OnceLock::new();
    LOCK.get_or_init(|| RwLock::new(()))
}

/// Held by tests that only use the broker.
pub async fn shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    disruption_lock().read().await
}

/// Held by tests that stop and start the broker.
pub async fn disruption() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    disruption_lock().write().await
}

/// The test broker's management API (`WARREN_MANAGEMENT_URI`).
pub fn management() -> Management {
    Management::new(&crate::management_uri()).expect("WARREN_MANAGEMENT_URI is an http(s) URL")
}

/// The queue as the management API shows it, or `None` when it does not exist.
pub async fn queue(vhost: &str, name: &str) -> anyhow::Result<Option<Value>> {
    Ok(management().queue(vhost, name).await?)
}

/// Deletes a queue through the management API (a missing one is fine).
pub async fn delete_queue(vhost: &str, name: &str) -> anyhow::Result<()> {
    Ok(management().delete_queue(vhost, name).await?)
}

/// Deletes a service's request queue and its dead-letter queue, what a test leaves on the broker.
pub async fn delete_service_queues(queue: &str) -> anyhow::Result<()> {
    delete_queue("/", queue).await?;
    delete_queue("/", &format!("{queue}.dead")).await
}

/// `rabbitmqctl` for the environment's broker: scripts/env's wrapper for the node it runs (on the host or in the 4.x
/// tree), or the host's own for a broker started by someone else.
fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let ctl = std::env::var("WARREN_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let out = std::process::Command::new(&ctl).args(args).output().with_context(|| format!("running {ctl}"))?;
    if !out.status.success() {
        bail!("rabbitmqctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Stops the RabbitMQ application (the Erlang node stays up, so `start_app` brings it back quickly).
pub fn stop_app() -> anyhow::Result<()> {
    rabbitmqctl(&["stop_app"])
}

/// Starts the RabbitMQ application again and waits until it accepts work.
pub fn start_app() -> anyhow::Result<()> {
    rabbitmqctl(&["start_app"])?;
    rabbitmqctl(&["await_startup", "--timeout", "60"])
}

/// Starts the broker when dropped, so a failing test never leaves it stopped for the next one.
pub struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        if let Err(e) = start_app() {
            eprintln!("could not restart the broker: {e:#}");
        }
    }
}

/// Waits until the management API answers again after a restart.
pub async fn wait_until_up(timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let management = management();
    loop {
        if management.overview().await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the management API did not come back within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes a service's queues (the request queue and its `.dead` queue) on the environment's broker when dropped,
/// even when the test fails.
pub struct QueueCleanup(Vec<String>);

impl QueueCleanup {
    pub fn service(queue: &str) -> Self {
        Self(vec![queue.to_owned(), warren_client::topology::dead_letter_queue_name(queue)])
    }
}

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.0);
        // A fresh runtime on its own thread: Drop cannot await, and may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                for queue in &queues {
                    let _ = delete_queue("/", queue).await;
                }
            });
            Some(())
        })
        .join();
    }
}
