//! The test broker seen from outside: queues through the management API, and `rabbitmqctl` to stop and start
//! the broker. Tests that stop the broker take [`disruption`] exclusively; every other broker test holds it
//! shared, so an outage never lands in the middle of an unrelated test of the same binary.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::sync::RwLock;

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

fn management() -> (reqwest::Client, reqwest::Url) {
    let url = reqwest::Url::parse(&crate::management_uri()).expect("WARREN_MANAGEMENT_URI is a URL");
    (reqwest::Client::new(), url)
}

fn api_url(segments: &[&str]) -> (reqwest::Client, reqwest::Url, String, Option<String>) {
    let (http, mut url) = management();
    let user = url.username().to_owned();
    let password = url.password().map(str::to_owned);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.path_segments_mut().expect("http URL").pop_if_empty().push("api").extend(segments);
    (http, url, user, password)
}

/// The queue as the management API shows it, or `None` when it does not exist.
pub async fn queue(vhost: &str, name: &str) -> anyhow::Result<Option<Value>> {
    let (http, url, user, password) = api_url(&["queues", vhost, name]);
    let response = http.get(url).basic_auth(user, password).send().await.context("management API")?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    Ok(Some(response.error_for_status()?.json().await?))
}

/// Deletes a queue through the management API (a missing one is fine).
pub async fn delete_queue(vhost: &str, name: &str) -> anyhow::Result<()> {
    let (http, url, user, password) = api_url(&["queues", vhost, name]);
    let response = http.delete(url).basic_auth(user, password).send().await?;
    if !(response.status().is_success() || response.status() == reqwest::StatusCode::NOT_FOUND) {
        bail!("deleting queue {name}: HTTP {}", response.status());
    }
    Ok(())
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("rabbitmqctl").args(args).output().context("running rabbitmqctl")?;
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
    loop {
        let (http, url, user, password) = api_url(&["overview"]);
        if let Ok(r) = http.get(url).basic_auth(user, password).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the management API did not come back within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
