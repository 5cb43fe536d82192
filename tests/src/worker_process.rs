//! The real `warren-worker` binary as a child process: spawn, wait until it consumes, read its metrics, SIGTERM or
//! SIGKILL it. Its log goes to a file whose tail failing assertions can show.

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How a worker is started; `--queue`, `--broker-uri` and a free `--metrics-addr` are always set.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    queue: String,
    handler: String,
    broker_uri: Option<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl WorkerCommand {
    /// A worker with the built-in handlers on `queue`.
    pub fn new(queue: &str) -> Self {
        Self { queue: queue.into(), handler: "builtin".into(), broker_uri: None, args: Vec::new(), env: Vec::new() }
    }

    /// Another broker than the test environment's (e.g. a chaos test's own node).
    pub fn broker_uri(mut self, uri: &str) -> Self {
        self.broker_uri = Some(uri.into());
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// `builtin` or an HTTP handler URL.
    pub fn handler(mut self, handler: &str) -> Self {
        self.handler = handler.into();
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn spawn(&self) -> anyhow::Result<WorkerProcess> {
        let metrics_port = crate::operator_process::free_port();
        let log_path = std::env::temp_dir().join(format!("{}.{}.log", self.queue, uuid::Uuid::new_v4().simple()));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(crate::bin_path("warren-worker"))
            .args(["--queue", &self.queue, "--handler", &self.handler])
            .args(["--broker-uri", &self.broker_uri.clone().unwrap_or_else(crate::broker_uri)])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(&self.args)
            .env("RUST_LOG", std::env::var("WARREN_WORKER_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting warren-worker")?;
        Ok(WorkerProcess { child, metrics_port, log_path, http: reqwest::Client::new() })
    }

    /// Spawns the worker and waits until it consumes.
    pub async fn start(&self) -> anyhow::Result<WorkerProcess> {
        let mut worker = self.spawn()?;
        worker.wait_ready(Duration::from_secs(30)).await?;
        Ok(worker)
    }
}

/// A running worker; SIGKILLed when dropped.
pub struct WorkerProcess {
    child: Child,
    pub metrics_port: u16,
    log_path: PathBuf,
    http: reqwest::Client,
}

impl WorkerProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }

    /// Waits until `/readyz` says the worker consumes (bounded by `timeout`), failing early if it exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("warren-worker exited ({status}) before consuming:\n{}", self.log_tail());
            }
            if self.ready().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("warren-worker not ready within {timeout:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the worker's HTTP port answers `/healthz` (it may not be ready: e.g. its backend is down).
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("warren-worker exited ({status}):\n{}", self.log_tail());
            }
            if self.healthy().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("warren-worker not healthy within {timeout:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        match self.http.get(self.url("/readyz")).send().await {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        }
    }

    /// Whether `/healthz` answers 200.
    pub async fn healthy(&self) -> bool {
        matches!(self.http.get(self.url("/healthz")).send().await, Ok(r) if r.status().is_success())
    }

    /// The `/metrics` text (empty when the worker does not answer).
    pub async fn metrics(&self) -> String {
        match self.http.get(self.url("/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of one series, e.g. `warren_worker_requests_total{method="add",outcome="ok"}` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Polls `series` until it reaches at least `value`; bounded by `timeout`.
    pub async fn wait_metric_at_least(&self, series: &str, value: f64, timeout: Duration) -> anyhow::Result<()> {
        self.wait_metric(series, |v| v >= value, &format!(">= {value}"), timeout).await
    }

    /// Polls `series` until it is at most `value` (e.g. the in-flight gauge back to 0 once the acks are done,
    /// which is just after the caller got its reply); bounded by `timeout`.
    pub async fn wait_metric_at_most(&self, series: &str, value: f64, timeout: Duration) -> anyhow::Result<()> {
        self.wait_metric(series, |v| v <= value, &format!("<= {value}"), timeout).await
    }

    async fn wait_metric(
        &self,
        series: &str,
        done: impl Fn(f64) -> bool,
        expected: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.metric(series).await;
            if done(current) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{series} = {current}, expected {expected} within {timeout:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("the worker already exited")?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("sending {signal} to {pid}"))
    }

    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// SIGKILL, then reap.
    pub async fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        Ok(self.child.wait().await?)
    }

    /// Waits for the process to exit, bounded by `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("warren-worker still running after {timeout:?}:\n{}", self.log_tail()),
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("--- warren-worker log ({}):\n{}", self.log_path.display(), self.log_tail());
        } else if std::env::var_os("WARREN_KEEP_WORKER_LOGS").is_some() {
            eprintln!("--- warren-worker log kept: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// The sum of every series of `metric` whatever its labels, e.g. all `warren_worker_requests_total{...}`.
pub fn metric_sum(text: &str, metric: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(metric) && line[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The value of `series` in Prometheus text (a series name with its exact label set); 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .filter_map(|value| value.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}
