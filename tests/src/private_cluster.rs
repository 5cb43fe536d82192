//! A control plane of one test's own: etcd and kube-apiserver started by `scripts/env up` with a private state
//! directory (`WARREN_ENV_DIR`, its own certificates and etcd data) on free loopback ports. For faults that would
//! disturb every other test on the shared API server: stopping and restarting it. The broker stays the shared one
//! (`scripts/env up` leaves a running broker alone). Everything it starts is stopped when it is dropped.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use kube::Client;
use kube::Config;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::operator_process::free_port;

pub struct PrivateCluster {
    dir: PathBuf,
    etcd_port: u16,
    etcd_peer_port: u16,
    apiserver_port: u16,
}

impl PrivateCluster {
    /// Starts etcd and kube-apiserver (about 10–30 s; the binaries are the environment's, already built).
    pub fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique_name("warren-private-cluster"));
        std::fs::create_dir_all(&dir)?;
        let cluster = Self { dir, etcd_port: free_port(), etcd_peer_port: free_port(), apiserver_port: free_port() };
        cluster.up()?;
        Ok(cluster)
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn apiserver_port(&self) -> u16 {
        self.apiserver_port
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig())?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// `scripts/env up` for this cluster: starts whichever of etcd and kube-apiserver is not running.
    pub fn up(&self) -> anyhow::Result<()> {
        let script = crate::workspace_root().join("scripts/env");
        let out = Command::new(script)
            .arg("up")
            .env("WARREN_ENV_DIR", &self.dir)
            .env("WARREN_ETCD_PORT", self.etcd_port.to_string())
            .env("WARREN_ETCD_PEER_PORT", self.etcd_peer_port.to_string())
            .env("WARREN_APISERVER_PORT", self.apiserver_port.to_string())
            .env_remove("WARREN_NODE")
            .env_remove("WARREN_CONTROLLER_MANAGER")
            .output()
            .context("running scripts/env up")?;
        if !out.status.success() {
            bail!("scripts/env up for a private cluster failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after 30 s) and waits until it is gone; etcd keeps the data.
    pub fn stop_apiserver(&self) -> anyhow::Result<()> {
        let pid = self.pid_of("kube-apiserver", &format!("--secure-port={}", self.apiserver_port))?;
        stop(pid);
        Ok(())
    }

    /// The pid of the `program` with the argument `flag` (naming a port of this cluster only).
    fn pid_of(&self, program: &str, flag: &str) -> anyhow::Result<i32> {
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_program = args.first().is_some_and(|exe| exe.ends_with(&format!("/{program}")));
            if is_program && args.iter().any(|a| a == flag) {
                return Ok(pid);
            }
        }
        bail!("no {program} with {flag} runs")
    }
}

fn stop(pid: i32) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    for _ in 0..300 {
        if kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let apiserver = self.pid_of("kube-apiserver", &format!("--secure-port={}", self.apiserver_port));
        let etcd = self.pid_of("etcd", &format!("http://127.0.0.1:{}", self.etcd_port));
        for pid in [apiserver, etcd].into_iter().flatten() {
            stop(pid);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
