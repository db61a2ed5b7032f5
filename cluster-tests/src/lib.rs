//! Black-box harness for FishChat clusters: starts real `fishchat-node`
//! processes the way `scripts/cluster.sh` does (own data directory, the
//! port rule), and reads their admin API. It knows each node's pid, ports and
//! data, injects faults from outside (SIGKILL, SIGTERM), and stops every
//! process it started when dropped, also when a test fails or panics.
//!
//! It links no server crate: what it checks is what a user sees. Tests drive
//! the cluster as users do, with the client SDK (`fishchat-client`) and the
//! `fishchat` command-line client.
//!
//! Chaos runs: [`history`] records what clients were told; [`checker`]
//! judges it; [`proxy`] puts a proxy on every peer link so a test can
//! partition the network; [`chaos`] runs the whole thing from a seed.

pub mod chaos;
pub mod checker;
pub mod history;
pub mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use crate::history::ShardReplica;
use crate::proxy::PeerLinks;

/// One node process of a test cluster.
pub struct NodeProcess {
    /// Node id (1-based).
    pub id: u64,
    child: Option<Child>,
}

/// A cluster of real node processes in a temporary directory.
pub struct Cluster {
    dir: tempfile::TempDir,
    binary: PathBuf,
    base_port: u16,
    nodes: Vec<NodeProcess>,
    shards: u32,
    extra_args: Vec<String>,
    /// The proxies on the peer links, when the cluster can be partitioned.
    links: Option<PeerLinks>,
}

/// What cluster to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// How many nodes (ids 1..=nodes).
    pub nodes: u64,
    /// How many shards.
    pub shards: u32,
    /// More arguments for every node.
    pub args: Vec<String>,
    /// Route every peer link through a proxy the harness owns, so that
    /// [`Cluster::partition`] can cut it.
    pub partitionable: bool,
}

/// Node processes started by any cluster of this process and not reaped yet.
static LIVE: std::sync::Mutex<BTreeSet<u32>> = std::sync::Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits for a killed child and forgets it.
fn reap(child: &mut Child) {
    let _ = child.wait();
    live().remove(&child.id());
}

/// SIGKILLs every node process that a cluster of this process started and
/// has not reaped: for a program stopped by a signal, whose clusters are
/// never dropped.
pub fn kill_every_node() {
    for pid in live().iter() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

/// Next candidate base port; each cluster takes 40 ports.
static NEXT_BASE: AtomicU16 = AtomicU16::new(0);

impl Cluster {
    /// Starts `nodes` nodes with `shards` shards.
    pub fn start(nodes: u64, shards: u32) -> anyhow::Result<Self> {
        Self::start_with(nodes, shards, &[])
    }

    /// Starts `nodes` nodes with `shards` shards, passing `extra_args` to
    /// every node. The cluster's keys are made first, as
    /// `scripts/cluster.sh start` does.
    pub fn start_with(nodes: u64, shards: u32, extra_args: &[&str]) -> anyhow::Result<Self> {
        Self::launch(ClusterSpec {
            nodes,
            shards,
            args: extra_args.iter().map(|a| a.to_string()).collect(),
            partitionable: false,
        })
    }

    /// Starts the cluster `spec` describes.
    pub fn launch(spec: ClusterSpec) -> anyhow::Result<Self> {
        let ClusterSpec {
            nodes,
            shards,
            args,
            partitionable,
        } = spec;
        let binary = sibling_binary("fishchat-node", "FISHCHAT_NODE_BIN")?;
        let base_port = free_base_port(nodes)?;
        let ids: Vec<u64> = (1..=nodes).collect();
        let links = if partitionable {
            Some(PeerLinks::start(&ids, |id| {
                format!("127.0.0.1:{}", base_port as u64 + 10 + id)
            })?)
        } else {
            None
        };
        let mut cluster = Self {
            dir: tempfile::tempdir()?,
            binary,
            base_port,
            nodes: Vec::new(),
            shards,
            extra_args: args,
            links,
        };
        let init = Command::new(&cluster.binary)
            .arg("init")
            .arg("--dir")
            .arg(cluster.dir.path())
            .stdout(Stdio::null())
            .status()?;
        if !init.success() {
            bail!("fishchat-node init failed: {init}");
        }
        cluster.nodes = (1..=nodes)
            .map(|id| NodeProcess { id, child: None })
            .collect();
        for id in 1..=nodes {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    fn peers(&self) -> String {
        (1..=self.nodes.len() as u64)
            .map(|id| format!("{id}={}", self.peer_addr(id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node `id`'s peer (gRPC) address.
    pub fn peer_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.base_port as u64 + 10 + id)
    }

    /// The ids of the cluster's nodes.
    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Cuts every peer link between nodes on different `sides` (see
    /// [`proxy`]); fails when the cluster was not started partitionable.
    pub fn partition(&self, sides: &[BTreeSet<u64>]) -> anyhow::Result<()> {
        self.links
            .as_ref()
            .ok_or_else(|| anyhow!("the cluster was not started partitionable"))?
            .partition(sides);
        Ok(())
    }

    /// Heals every partition.
    pub fn heal(&self) {
        if let Some(links) = &self.links {
            links.heal();
        }
    }

    /// The data directory of node `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}"))
    }

    /// Starts (or restarts) node `id` on its data directory.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let child = self.spawn(id, id)?;
        self.node_mut(id)?.child = Some(child);
        Ok(())
    }

    /// Undoes every fault: heals every partition, thaws (SIGCONT) every
    /// running node and starts every node that is not running.
    pub fn repair(&mut self) -> anyhow::Result<()> {
        self.heal();
        for id in self.node_ids() {
            if self.node_mut(id)?.child.is_some() {
                self.signal(id, "CONT")?;
            } else {
                self.start_node(id)?;
            }
        }
        Ok(())
    }

    /// Spawns the node binary as node `as_id` on the data directory of node `dir_of`.
    fn spawn(&self, as_id: u64, dir_of: u64) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{as_id}.log")))?;
        let mut command = Command::new(&self.binary);
        if let Some(links) = &self.links {
            command.arg("--peer-routes").arg(links.routes_of(as_id));
        }
        command
            .arg("--node-id")
            .arg(as_id.to_string())
            .arg("--data-dir")
            .arg(self.data_dir(dir_of))
            .arg("--base-port")
            .arg(self.base_port.to_string())
            .arg("--peers")
            .arg(self.peers())
            .arg("--shards")
            .arg(self.shards.to_string())
            .args(&self.extra_args)
            .env("FISHCHAT_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .inspect(|child| {
                live().insert(child.id());
            })
            .with_context(|| format!("spawning {}", self.binary.display()))
    }

    /// Runs the node binary as node `as_id` on node `dir_of`'s data and
    /// waits for it to exit (for start-up errors).
    pub fn run_to_exit(
        &self,
        as_id: u64,
        dir_of: u64,
        timeout: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let mut child = self.spawn(as_id, dir_of)?;
        wait_exit(&mut child, timeout)
    }

    fn node_mut(&mut self, id: u64) -> anyhow::Result<&mut NodeProcess> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut child) = self.node_mut(id)?.child.take() {
            child.kill()?;
            reap(&mut child);
        }
        Ok(())
    }

    /// Sends `signal` (a name `kill` knows: "STOP", "CONT", …) to node `id`.
    pub fn signal(&mut self, id: u64, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .node_mut(id)?
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("node {id} is not running"))?
            .id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} failed for node {id}");
        }
        Ok(())
    }

    /// SIGTERMs node `id` and returns its exit status.
    pub fn terminate(&mut self, id: u64, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let mut child = self
            .node_mut(id)?
            .child
            .take()
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM failed for node {id}");
        }
        wait_exit(&mut child, timeout)
    }

    /// The client (QUIC) address of node `id`.
    pub fn client_addr(&self, id: u64) -> String {
        format!("127.0.0.1:{}", self.base_port as u64 + id)
    }

    /// The client addresses of every node, node 1 first.
    pub fn client_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| self.client_addr(n.id)).collect()
    }

    /// The cluster CA's certificate file, which clients trust.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Waits until node `id` reports a leader for every shard.
    pub fn wait_ready(&self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        self.eventually(
            &format!("node {id} sees every shard's leader"),
            timeout,
            |c| {
                let status = c.status(id)?;
                let shards = status["shards"]
                    .as_array()
                    .ok_or_else(|| anyhow!("/status has no shards"))?;
                let led = !shards.is_empty() && shards.iter().all(|s| !s["leader"].is_null());
                Ok(led.then_some(()))
            },
        )
    }

    /// The admin port of node `id`.
    pub fn admin_port(&self, id: u64) -> u16 {
        self.base_port + 20 + id as u16
    }

    /// Node `id`'s `/status`, parsed.
    pub fn status(&self, id: u64) -> anyhow::Result<Value> {
        let body = http_get(self.admin_port(id), "/status")?;
        serde_json::from_str(&body).context("parsing /status")
    }

    /// Every running node's replicas: (shard, applied index, digest) from `/status`.
    pub fn replicas(&self) -> anyhow::Result<BTreeMap<u64, Vec<ShardReplica>>> {
        let mut all = BTreeMap::new();
        for id in self.node_ids() {
            let status = self.status(id)?;
            let shards = status["shards"]
                .as_array()
                .ok_or_else(|| anyhow!("node {id}'s /status has no shards"))?;
            let mut replicas = Vec::new();
            for s in shards {
                let number = |name: &str| {
                    s[name]
                        .as_u64()
                        .ok_or_else(|| anyhow!("node {id}'s /status: a shard without {name}"))
                };
                replicas.push(ShardReplica {
                    shard: number("shard")? as u32,
                    applied: number("digest_index")?,
                    digest: s["digest"]
                        .as_str()
                        .ok_or_else(|| anyhow!("node {id}'s /status: a shard without digest"))?
                        .to_string(),
                });
            }
            all.insert(id, replicas);
        }
        Ok(all)
    }

    /// Every node's replicas, when every node's replica of every shard is
    /// at the same applied index with the same digest (for
    /// [`Cluster::eventually`]). The replicas are read once, node by node,
    /// so an entry committed during the read can make a settled cluster
    /// disagree for that one read; poll rather than trust a single `None`.
    pub fn replicas_agree(&self) -> anyhow::Result<Option<BTreeMap<u64, Vec<ShardReplica>>>> {
        let all = self.replicas()?;
        let mut views = all.values();
        let first = views.next();
        let agree = views.all(|view| Some(view) == first);
        Ok(agree.then_some(all))
    }

    /// Node `id`'s `/metrics` text.
    pub fn metrics(&self, id: u64) -> anyhow::Result<String> {
        http_get(self.admin_port(id), "/metrics")
    }

    /// Polls `check` every 200 ms until it returns `Ok(Some(_))` or `timeout`.
    pub fn eventually<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check(self) {
                Ok(Some(found)) => return Ok(found),
                Ok(None) => "condition not met".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                let tails: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| {
                        let log = self.log(n.id);
                        let tail: Vec<&str> = log.lines().rev().take(8).collect();
                        format!(
                            "--- node {} log, newest line first:\n{}",
                            n.id,
                            tail.join("\n")
                        )
                    })
                    .collect();
                bail!(
                    "{what}: not within {timeout:?} (last: {last})\n{}",
                    tails.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The log of node `id` so far.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{id}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // FISHCHAT_KEEP_TEST_DATA=1 keeps data and logs for a post-mortem.
        if std::env::var_os("FISHCHAT_KEEP_TEST_DATA").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept cluster data in {}", self.dir.path().display());
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                reap(&mut child);
            }
        }
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            live().remove(&child.id());
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            reap(child);
            bail!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `fishchat` command-line client beside this test's binaries.
pub fn cli_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("fishchat", "FISHCHAT_CLI_BIN")
}

/// A binary of the workspace: `$env_var`, or `name` in this test's own target
/// directory (built by `scripts/test.sh`).
fn sibling_binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test binary>, or target/<profile>/<binary>
    let mut profile_dir = exe
        .parent()
        .ok_or_else(|| anyhow!("unexpected binary location {}", exe.display()))?;
    if profile_dir.ends_with("deps") {
        profile_dir = profile_dir
            .parent()
            .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    }
    let binary = profile_dir.join(name);
    if !binary.exists() {
        bail!(
            "{} is missing: build it with `cargo build --workspace --all-targets` (scripts/test.sh does)",
            binary.display()
        );
    }
    Ok(binary)
}

/// A base port whose client, peer and admin ports for `nodes` nodes are free.
/// Bases lie in 10000..32000, below Linux's ephemeral range (32768 and up),
/// so a peer's outgoing connection cannot take a port a restarted node needs.
fn free_base_port(nodes: u64) -> anyhow::Result<u16> {
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    let start = (std::process::id() % 500) * 40;
    for _ in 0..200 {
        let offset = u32::from(NEXT_BASE.fetch_add(40, Ordering::Relaxed));
        let base = (LOW + (start + offset) % SPAN) as u16;
        let free = (1..=nodes).all(|n| {
            [0u64, 10, 20].iter().all(|rule| {
                let port = (base as u64 + rule + n) as u16;
                TcpListener::bind(("127.0.0.1", port)).is_ok()
                    && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            })
        });
        if free {
            return Ok(base);
        }
    }
    bail!("no free port range found")
}

/// A minimal HTTP/1.0 GET on loopback; returns the body of a 200 answer.
fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}
