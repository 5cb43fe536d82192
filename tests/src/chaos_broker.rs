//! RabbitMQ nodes of a test's own, for faults that must not touch the shared broker: a memory alarm, a lowered
//! `max_message_size`, a restart, a cluster losing a node. Each node runs from a temporary directory on free loopback
//! ports (AMQP, management, Erlang distribution) with its own node name; the nodes of a [`ChaosCluster`] share a
//! cookie and are joined with `rabbitmqctl join_cluster`. The RabbitMQ is the environment's: 4.x from the tree
//! `WARREN_RABBITMQ_TREE` names (run with chroot; scripts/env mounts its /proc and /dev), or bookworm's 3.10 when it
//! is empty. Everything is stopped and deleted when dropped.

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
    /// `cluster_partition_handling` (RabbitMQ's default, `ignore`, when `None`).
    pub partition_handling: Option<&'static str>,
    /// The Erlang distribution's tick time in seconds (60 by default): how soon a silent peer counts as gone.
    pub net_ticktime: Option<u32>,
    /// Run the node's processes as this uid (and gid) instead of root, so that a firewall rule can tell its
    /// traffic apart (see [`Partition`]).
    pub run_as: Option<u32>,
}

/// Where the RabbitMQ scripts run: on the host (3.10) or inside the 4.x tree.
#[derive(Clone, Debug)]
struct Install {
    tree: Option<PathBuf>,
}

impl Install {
    fn from_env() -> Self {
        let tree = std::env::var("WARREN_RABBITMQ_TREE").ok().filter(|t| !t.is_empty()).map(PathBuf::from);
        Self { tree }
    }

    /// A fresh directory for a node: on the host, and as the node sees it.
    fn node_dir(&self, id: &str) -> (PathBuf, PathBuf) {
        let inside = PathBuf::from(format!("/tmp/warren-chaos-{id}"));
        let host = match &self.tree {
            Some(tree) => tree.join(inside.strip_prefix("/").unwrap()),
            None => std::env::temp_dir().join(format!("warren-chaos-{id}")),
        };
        let inside = if self.tree.is_some() { inside } else { host.clone() };
        (host, inside)
    }

    /// A command running RabbitMQ's `script` (rabbitmq-server, rabbitmqctl), as root or as `run_as`.
    fn command(&self, script: &str, run_as: Option<u32>) -> Command {
        let path = Path::new(RABBITMQ_BIN).join(script);
        match (&self.tree, run_as) {
            (Some(tree), None) => {
                let mut command = Command::new("chroot");
                command.arg(tree).arg(path);
                command
            }
            (Some(tree), Some(uid)) => {
                let mut command = Command::new("chroot");
                command.arg(format!("--userspec={uid}:{uid}")).arg(tree).arg(path);
                command
            }
            (None, None) => Command::new(path),
            (None, Some(uid)) => {
                let mut command = Command::new("setpriv");
                command.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]).arg(path);
                command
            }
        }
    }
}

/// How many times a node is started on new ports when a port it was given is taken before it binds it.
const BOOT_ATTEMPTS: u32 = 3;

/// A running RabbitMQ node owned by one test.
pub struct ChaosBroker {
    install: Install,
    child: Option<Child>,
    /// The node's directory on the host, and the same directory as the node sees it.
    dir: PathBuf,
    inside: PathBuf,
    node: String,
    pub amqp_port: u16,
    pub management_port: u16,
    pub dist_port: u16,
    run_as: Option<u32>,
}

impl ChaosBroker {
    /// Starts a node and waits until its management API answers (about 6 s on an idle 2-core machine).
    pub async fn start(config: ChaosBrokerConfig) -> anyhow::Result<Self> {
        Self::boot(&config, &new_cookie(), Duration::from_secs(120)).await
    }

    /// Creates a node and waits until it is up, on new ports when the ones it was given were taken before it bound
    /// them: `free_port` hands out ephemeral ports, and any outgoing connection made meanwhile may take one.
    async fn boot(config: &ChaosBrokerConfig, cookie: &str, timeout: Duration) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            let mut broker = Self::create(config, cookie)?;
            match broker.wait_until_up(timeout).await {
                Err(error) if attempt < BOOT_ATTEMPTS && broker.lost_a_port() => {
                    eprintln!(
                        "chaos broker {} lost a port before binding it; again on new ports: {error:#}",
                        broker.node
                    );
                    attempt += 1;
                }
                result => return result.map(|()| broker),
            }
        }
    }

    /// Writes a node's directory and starts it, without waiting.
    fn create(config: &ChaosBrokerConfig, cookie: &str) -> anyhow::Result<Self> {
        let install = Install::from_env();
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let node = format!("warren-chaos-{id}@localhost");
        let (dir, inside) = install.node_dir(id);
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        let (amqp_port, management_port, dist_port) = (free_port(), free_port(), free_port());
        let mut conf = format!(
            "listeners.tcp.1 = 127.0.0.1:{amqp_port}\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}\n\
             disk_free_limit.absolute = 1MB\n"
        );
        if let Some(size) = config.max_message_size {
            conf.push_str(&format!("max_message_size = {size}\n"));
        }
        if let Some(handling) = config.partition_handling {
            conf.push_str(&format!("cluster_partition_handling = {handling}\n"));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n")?;
        let ticktime = config.net_ticktime.map(|t| format!("[{{kernel, [{{net_ticktime, {t}}}]}}].\n"));
        std::fs::write(dir.join("advanced.config"), ticktime.as_deref().unwrap_or("[].\n"))?;
        write_cookie(&dir, cookie)?;
        if let Some(uid) = config.run_as {
            let status = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(&dir).status()?;
            anyhow::ensure!(status.success(), "chown of {} failed", dir.display());
        }
        let run_as = config.run_as;
        let mut broker =
            Self { install, child: None, dir, inside, node, amqp_port, management_port, dist_port, run_as };
        broker.spawn()?;
        Ok(broker)
    }

    /// Starts the node's Erlang VM on its directory (its data survives a kill and a restart).
    fn spawn(&mut self) -> anyhow::Result<()> {
        let stdout = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("stdout.log"))?;
        let inside = &self.inside;
        let mut command = self.install.command("rabbitmq-server", self.run_as);
        command
            .envs(node_env(inside, &self.node))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", inside.join("advanced.config"))
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", inside.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", inside.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", inside.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", inside.join("log"))
            .env("RABBITMQ_PID_FILE", inside.join("pid"))
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout);
        self.child = Some(command.spawn().context("starting rabbitmq-server for a chaos test")?);
        Ok(())
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    pub fn management_uri(&self) -> String {
        format!("http://guest:guest@127.0.0.1:{}", self.management_port)
    }

    /// `rabbitmqctl -n <node> args...` against this node.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .install
            .command("rabbitmqctl", None)
            .envs(node_env(&self.inside, &self.node))
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

    /// Stops the whole node cleanly (`rabbitmqctl stop`): its connections are closed, as in a rolling restart.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.ctl(&["stop"])?;
        self.reap(Duration::from_secs(30));
        Ok(())
    }

    /// Kills the node's Erlang VM with SIGKILL: its connections die without a close, as when a machine is lost.
    pub fn kill(&mut self) {
        self.kill_vm();
        self.reap(Duration::from_secs(10));
    }

    /// Starts a stopped or killed node again on the same directory, ports and name, and waits until it is up.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_until_up(Duration::from_secs(120)).await?;
        self.ctl(&["await_startup", "--timeout", "120"]).map(drop)
    }

    fn kill_vm(&self) {
        // The node's Erlang VM is a grandchild when rabbitmq-server is a shell script: kill it by its pid file.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid"))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn reap(&mut self, timeout: Duration) {
        let Some(mut child) = self.child.take() else { return };
        let deadline = Instant::now() + timeout;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }

    /// Waits until the management API answers; fails at once if the node's VM has exited or could not bind a port.
    async fn wait_until_up(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/api/overview", self.management_port);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(response) = http.get(&url).basic_auth("guest", Some("guest")).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!("chaos broker {} exited ({status}) before it was up:\n{}", self.node, self.log_tail());
            }
            if self.lost_a_port() {
                bail!("chaos broker {} could not bind a port:\n{}", self.node, self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("chaos broker {} not up within {timeout:?}:\n{}", self.node, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether the node failed to bind one of its ports (its listener's or its distribution port).
    fn lost_a_port(&self) -> bool {
        std::fs::read_to_string(self.dir.join("stdout.log")).is_ok_and(|log| log.contains("eaddrinuse"))
            || std::fs::read_dir(self.dir.join("log"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|entry| std::fs::read_to_string(entry.path()).is_ok_and(|log| log.contains("eaddrinuse")))
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ChaosBroker {
    fn drop(&mut self) {
        if self.child.is_some() {
            // `rabbitmqctl stop` ends the whole node; kill it if that fails or hangs.
            let stopped = Command::new("timeout")
                .arg("30")
                .args(self.stop_command())
                .envs(node_env(&self.inside, &self.node))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !stopped {
                self.kill_vm();
            }
            self.reap(Duration::from_secs(30));
        }
        self.kill_vm();
        if std::thread::panicking() {
            eprintln!("--- chaos broker {} log ({}):\n{}", self.node, self.dir.display(), self.log_tail());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl ChaosBroker {
    fn stop_command(&self) -> Vec<String> {
        let ctl = format!("{RABBITMQ_BIN}/rabbitmqctl");
        let mut args = match &self.install.tree {
            Some(tree) => vec!["chroot".to_owned(), tree.display().to_string(), ctl],
            None => vec![ctl],
        };
        args.extend(["-n".to_owned(), self.node.clone(), "stop".to_owned()]);
        args
    }
}

/// RabbitMQ nodes of one test, joined into a cluster: quorum queues declared on it get a replica on every node.
pub struct ChaosCluster {
    pub nodes: Vec<ChaosBroker>,
}

impl ChaosCluster {
    /// Starts `size` nodes, joins the others to the first, and waits until every node runs the cluster.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        Self::start_with(size, |_| ChaosBrokerConfig::default()).await
    }

    /// [`ChaosCluster::start`] with node `i` configured by `config(i)`.
    pub async fn start_with(size: usize, config: impl Fn(usize) -> ChaosBrokerConfig) -> anyhow::Result<Self> {
        let cookie = new_cookie();
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            nodes.push(ChaosBroker::create(&config(i), &cookie)?);
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            if let Err(error) = node.wait_until_up(Duration::from_secs(180)).await {
                if !node.lost_a_port() {
                    return Err(error);
                }
                eprintln!("chaos broker {} lost a port before binding it; again on new ports: {error:#}", node.node);
                *node = ChaosBroker::boot(&config(i), &cookie, Duration::from_secs(180)).await?;
            }
        }
        let seed = nodes[0].node.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"])?;
            node.ctl(&["join_cluster", &seed])?;
            node.start_app()?;
        }
        let cluster = Self { nodes };
        cluster.wait_running(size, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    /// Cuts node `i` off from the other nodes (see [`Partition`]); it must run as its own uid (`run_as`).
    pub fn partition(&self, i: usize) -> anyhow::Result<Partition> {
        let node = &self.nodes[i];
        let uid = node.run_as.context("a partitioned node must run as its own uid (ChaosBrokerConfig::run_as)")?;
        let peers: Vec<u16> = self.nodes.iter().filter(|n| n.node != node.node).map(|n| n.dist_port).collect();
        Partition::isolate(uid, node.dist_port, &peers)
    }

    /// A multi-host URI naming every node (the format a broker Secret's `uri` takes for a cluster).
    pub fn uri(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.amqp_port)).collect();
        format!("amqp://guest:guest@{}/%2f", hosts.join(","))
    }

    pub fn management_uri(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.management_port)).collect();
        format!("http://guest:guest@{}", hosts.join(","))
    }

    /// Waits until `count` nodes report themselves running, as seen from any node that answers.
    pub async fn wait_running(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            for node in &self.nodes {
                match node.ctl(&["cluster_status", "--formatter", "json"]) {
                    Ok(status) => {
                        let running = serde_json::from_str::<serde_json::Value>(&status)
                            .ok()
                            .and_then(|s| s["running_nodes"].as_array().map(Vec::len))
                            .unwrap_or(0);
                        if running == count {
                            return Ok(());
                        }
                        last = status;
                        break;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster does not have {count} running nodes after {timeout:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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
        ("LANG", "C.UTF-8".to_owned()),
    ]
}

fn new_cookie() -> String {
    uuid::Uuid::new_v4().simple().to_string().to_uppercase()
}

fn write_cookie(dir: &Path, cookie: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(".erlang.cookie");
    std::fs::write(&path, cookie)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
    Ok(())
}

/// A network partition between one node and the rest of its cluster on loopback: firewall rules in a chain of the
/// test's own drop what the node's uid sends to its peers' distribution ports and from its own distribution port,
/// so every Erlang distribution connection between it and its peers goes silent (the peers see it gone after the
/// tick time), while its AMQP and management listeners stay reachable. Healed when dropped.
pub struct Partition {
    chain: String,
    healed: bool,
}

impl Partition {
    fn isolate(uid: u32, own_dist_port: u16, peer_dist_ports: &[u16]) -> anyhow::Result<Self> {
        let chain = format!("WARREN-PART-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        iptables(&["-N", &chain])?;
        let partition = Self { chain, healed: false };
        let uid = uid.to_string();
        let drop_from_node = |port_flag: &str, port: u16| {
            let port = port.to_string();
            iptables(&[
                "-A",
                &partition.chain,
                "-p",
                "tcp",
                "-m",
                "owner",
                "--uid-owner",
                &uid,
                port_flag,
                &port,
                "-j",
                "DROP",
            ])
        };
        for port in peer_dist_ports {
            drop_from_node("--dport", *port)?;
        }
        drop_from_node("--sport", own_dist_port)?;
        iptables(&["-I", "OUTPUT", "-o", "lo", "-j", &partition.chain])?;
        Ok(partition)
    }

    /// Removes the rules: the node's distribution connections work again.
    pub fn heal(mut self) -> anyhow::Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> anyhow::Result<()> {
        if self.healed {
            return Ok(());
        }
        self.healed = true;
        while iptables(&["-D", "OUTPUT", "-o", "lo", "-j", &self.chain]).is_ok() {}
        iptables(&["-F", &self.chain])?;
        iptables(&["-X", &self.chain])
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("could not remove the partition's firewall chain {}: {e:#}", self.chain);
        }
    }
}

fn iptables(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("iptables").args(["-w", "10"]).args(args).output().context("running iptables")?;
    if !out.status.success() {
        bail!("iptables {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
