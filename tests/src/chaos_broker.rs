//! A RabbitMQ node of a test's own, for faults that must not touch the shared broker: a memory alarm, a lowered
//! `max_message_size`, a restart. Debian's RabbitMQ, run from a temporary directory on free loopback ports (AMQP,
//! management, Erlang distribution) with its own node name and cookie; stopped and deleted when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::operator_process::free_port;

const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";

/// How a test's node is configured beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct ChaosBrokerConfig {
    /// `max_message_size` in bytes (RabbitMQ's default when `None`).
    pub max_message_size: Option<u64>,
}

/// A running RabbitMQ node owned by one test.
pub struct ChaosBroker {
    child: Option<Child>,
    dir: PathBuf,
    node: String,
    pub amqp_port: u16,
    pub management_port: u16,
}

impl ChaosBroker {
    /// Starts a node and waits until its management API answers (about 6 s on an idle 2-core machine).
    pub async fn start(config: ChaosBrokerConfig) -> anyhow::Result<Self> {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let node = format!("warren-chaos-{id}@localhost");
        let dir = std::env::temp_dir().join(format!("warren-chaos-{id}"));
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        let (amqp_port, management_port, dist_port) = (free_port(), free_port(), free_port());
        let mut conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{amqp_port}\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}\n"
        );
        if let Some(size) = config.max_message_size {
            conf.push_str(&format!("max_message_size = {size}\n"));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n")?;
        write_cookie(&dir)?;
        let stdout = std::fs::File::create(dir.join("stdout.log"))?;
        let mut command = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmq-server"));
        command
            .envs(node_env(&dir, &node))
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout);
        let child = command.spawn().context("starting rabbitmq-server for a chaos test")?;
        let broker = Self { child: Some(child), dir, node, amqp_port, management_port };
        broker.wait_until_up(Duration::from_secs(120)).await?;
        Ok(broker)
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn management_uri(&self) -> String {
        format!("http://guest:guest@127.0.0.1:{}", self.management_port)
    }

    /// `rabbitmqctl -n <node> args...` against this node.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
            .envs(node_env(&self.dir, &self.node))
            .args(["-n", &self.node])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!("rabbitmqctl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Raises a memory alarm (the watermark far below what the node uses) and waits until the node reports it.
    pub async fn set_memory_alarm(&self) -> anyhow::Result<()> {
        self.ctl(&["set_vm_memory_high_watermark", "0.000001"])?;
        self.wait_memory_alarm(true, Duration::from_secs(30)).await
    }

    /// Restores the default watermark and waits until the alarm is cleared.
    pub async fn clear_memory_alarm(&self) -> anyhow::Result<()> {
        self.ctl(&["set_vm_memory_high_watermark", "0.4"])?;
        self.wait_memory_alarm(false, Duration::from_secs(30)).await
    }

    async fn wait_memory_alarm(&self, on: bool, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let alarms = self.ctl(&["eval", "rabbit_alarm:get_alarms()."])?;
            if alarms.contains("memory") == on {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("memory alarm still {} after {timeout:?}: {alarms}", if on { "off" } else { "on" });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the RabbitMQ application (the Erlang node stays up, so `start_app` brings it back quickly).
    pub fn stop_app(&self) -> anyhow::Result<()> {
        self.ctl(&["stop_app"]).map(drop)
    }

    /// Starts the application again and waits until it accepts work.
    pub fn start_app(&self) -> anyhow::Result<()> {
        self.ctl(&["start_app"])?;
        self.ctl(&["await_startup", "--timeout", "60"]).map(drop)
    }

    /// Kills the node's Erlang VM with SIGKILL (a node lost without warning: clients see their sockets close).
    pub fn kill(&self) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.dir.join("pid")).context("reading the node's pid file")?;
        let pid = pid.trim().parse::<i32>().context("the node's pid file")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)?;
        Ok(())
    }

    async fn wait_until_up(&self, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/api/overview", self.management_port);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = http.get(&url).basic_auth("guest", Some("guest")).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("chaos broker {} not up within {timeout:?}:\n{}", self.node, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ChaosBroker {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // `rabbitmqctl stop` ends the whole node; kill it if that fails or hangs.
        let stopped = Command::new("timeout")
            .args(["30", &format!("{RABBITMQ_BIN}/rabbitmqctl"), "-n", &self.node, "stop"])
            .envs(node_env(&self.dir, &self.node))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = child.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        // The node's Erlang VM is a grandchild when rabbitmq-server is a shell script: make sure it is gone.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        if std::thread::panicking() {
            eprintln!("--- chaos broker {} log ({}):\n{}", self.node, self.dir.display(), self.log_tail());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The environment every RabbitMQ script run for this node needs: its name, and a HOME holding its own cookie.
fn node_env(dir: &Path, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", dir.display().to_string()),
        ("RABBITMQ_NODENAME", node.to_owned()),
        ("RABBITMQ_CONF_ENV_FILE", "/dev/null".to_owned()),
        ("ERL_EPMD_ADDRESS", "127.0.0.1".to_owned()),
    ]
}

fn write_cookie(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(".erlang.cookie");
    std::fs::write(&path, uuid::Uuid::new_v4().simple().to_string().to_uppercase())?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
    Ok(())
}
