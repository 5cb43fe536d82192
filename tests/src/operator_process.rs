//! The real `warren-operator run` as a child process, scoped to one test's namespace.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A running operator; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct OperatorProcess {
    child: Child,
    pub metrics_port: u16,
    /// Where stdout and stderr go, for a test that reads the logs.
    log: Option<std::path::PathBuf>,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl OperatorProcess {
    /// Starts the operator watching only `namespace`, polling the broker every second, without leader election
    /// unless `extra` turns it on.
    pub fn start(namespace: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_against(&crate::cluster::kubeconfig_path(), namespace, extra)
    }

    /// [`OperatorProcess::start`] against the API server `kubeconfig` names.
    pub fn start_against(kubeconfig: &str, namespace: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(kubeconfig, namespace, extra, &[])
    }

    /// [`OperatorProcess::start`] with extra environment variables (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn start_with_env(namespace: &str, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn(&crate::cluster::kubeconfig_path(), namespace, extra, env)
    }

    /// [`OperatorProcess::start_with_env`] with its stdout and stderr written to a file [`OperatorProcess::logs`]
    /// reads (and not shown in the test's output).
    pub fn start_logged(namespace: &str, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("warren-operator-{namespace}-{}.log", free_port()));
        let mut operator = Self::spawn_to(&crate::cluster::kubeconfig_path(), namespace, extra, env, Some(&path))?;
        operator.log = Some(path);
        Ok(operator)
    }

    /// Everything the operator has logged so far (empty unless started with [`OperatorProcess::start_logged`]).
    pub fn logs(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    fn spawn(kubeconfig: &str, namespace: &str, extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_to(kubeconfig, namespace, extra, env, None)
    }

    fn spawn_to(
        kubeconfig: &str,
        namespace: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let metrics_port = free_port();
        let mut cmd = Command::new(crate::bin_path("warren-operator"));
        cmd.args(["run", "--namespace", namespace, "--poll-interval", "1s", "--worker-image", "warren-worker:test"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")]);
        if !extra.contains(&"--leader-election") {
            cmd.args(["--leader-election", "false"]);
        }
        cmd.args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", namespace)
            .env("RUST_LOG", std::env::var("WARREN_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        if let Some(path) = log {
            let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        } else if std::env::var_os("WARREN_TEST_QUIET").is_some() {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = cmd.spawn().context("starting warren-operator")?;
        Ok(Self { child, metrics_port, log: None })
    }

    /// `binary run ARGS` as it is, without the tests' defaults (so the operator's own poll interval, log filter and
    /// so on apply): `args` name the namespace and `--metrics-addr 127.0.0.1:<metrics_port>`. Its stdout and stderr
    /// go to `log`; it runs in a process group of its own, so a Ctrl-C at the terminal reaches only the caller,
    /// which can still use the operator while it cleans up (the benchmark deletes its RpcServices that way).
    pub fn spawn_binary(
        binary: &std::path::Path,
        kubeconfig: &str,
        metrics_port: u16,
        args: &[String],
        log: &std::path::Path,
    ) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child, metrics_port, log: None })
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        matches!(reqwest::get(url).await, Ok(r) if r.status().is_success())
    }

    /// The exit status once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The operator's /metrics text, or None while it is not serving yet.
    pub async fn metrics(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        reqwest::get(url).await.ok()?.text().await.ok()
    }

    /// A counter or gauge's value from /metrics (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Whether the process still runs (it has not exited, crashed or been killed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the operator with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.stop();
        if let Some(path) = &self.log {
            let _ = std::fs::remove_file(path);
        }
    }
}
