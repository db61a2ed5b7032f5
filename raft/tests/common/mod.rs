//! A three-host cluster in one process for tests and the benchmark: real
//! RocksDB in temporary directories, real gRPC on loopback, and a small
//! key-value state machine that exists only here.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use fishchat_raft::{
    ApplyError, GroupHost, GroupId, HostConfig, RaftTiming, Role, StateMachine, StateTxn,
    WriteError,
};

/// A key-value store: the command `key=value` sets a key and answers with the
/// number of writes the group has applied so far.
#[derive(Default)]
pub struct KvMachine;

/// Key under which the machine counts applied writes.
pub const COUNT_KEY: &[u8] = b"__writes";

impl StateMachine for KvMachine {
    fn apply(&mut self, command: &[u8], state: &mut dyn StateTxn) -> Result<Vec<u8>, ApplyError> {
        let Some(split) = command.iter().position(|b| *b == b'=') else {
            return Ok(b"error: expected key=value".to_vec());
        };
        state.put(&command[..split], &command[split + 1..]);
        let count = match state.get(COUNT_KEY)? {
            Some(bytes) => parse_count(&bytes)? + 1,
            None => 1,
        };
        state.put(COUNT_KEY, count.to_string().as_bytes());
        Ok(count.to_string().into_bytes())
    }
}

fn parse_count(bytes: &[u8]) -> Result<u64, ApplyError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ApplyError::Corrupt("write counter is not a number".into()))
}

/// Timing fast enough for tests on a busy two-core machine without churn.
pub fn test_timing() -> RaftTiming {
    RaftTiming {
        heartbeat: Duration::from_millis(150),
        election_min: Duration::from_millis(900),
        election_max: Duration::from_millis(1800),
        // Leaders stay where the tests put them, unless a test moves them.
        balance_every: None,
        ..RaftTiming::default()
    }
}

/// Three (or more) hosts sharing `groups` Raft groups, one replica on each.
pub struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    addrs: Vec<SocketAddr>,
    hosts: Vec<Option<Arc<GroupHost>>>,
    pub groups: Vec<GroupId>,
    timing: RaftTiming,
}

impl Cluster {
    /// Starts `nodes` hosts (ids 1..=nodes), opens `groups` groups on each and
    /// initialises them with every host as a voter; waits for every leader.
    pub async fn start(nodes: usize, groups: u64, timing: RaftTiming) -> anyhow::Result<Self> {
        let mut cluster = Self {
            dirs: Vec::new(),
            addrs: Vec::new(),
            hosts: Vec::new(),
            groups: (1..=groups).collect(),
            timing,
        };
        for index in 0..nodes {
            let dir = tempfile::tempdir()?;
            let config = cluster.config(index, dir.path(), "127.0.0.1:0".parse()?);
            let host = GroupHost::start(config).await?;
            cluster.addrs.push(host.peer_addr());
            cluster.dirs.push(dir);
            cluster.hosts.push(Some(Arc::new(host)));
        }
        for index in 0..nodes {
            cluster.open_groups(index).await?;
        }
        let members: BTreeMap<u64, String> = cluster
            .addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| (i as u64 + 1, addr.to_string()))
            .collect();
        // Each group is initialised by a different host, which spreads the
        // first leaders over the cluster.
        for group in &cluster.groups {
            let initializer = cluster.host((*group as usize - 1) % nodes)?;
            initializer.initialize_group(*group, &members).await?;
        }
        cluster.wait_for_leaders(Duration::from_secs(30)).await?;
        cluster
            .wait_for_writable_leaders(Duration::from_secs(30))
            .await?;
        Ok(cluster)
    }

    fn config(&self, index: usize, dir: &std::path::Path, listen: SocketAddr) -> HostConfig {
        let mut config = HostConfig::new(index as u64 + 1, dir, listen);
        config.timing = self.timing.clone();
        config
    }

    async fn open_groups(&self, index: usize) -> anyhow::Result<()> {
        let host = self.host(index)?;
        for group in &self.groups {
            host.open_group(*group, KvMachine).await?;
        }
        Ok(())
    }

    /// The running host at `index` (node id `index + 1`).
    pub fn host(&self, index: usize) -> anyhow::Result<Arc<GroupHost>> {
        self.hosts
            .get(index)
            .and_then(|h| h.clone())
            .ok_or_else(|| anyhow!("host {index} is not running"))
    }

    /// Every running host.
    pub fn live(&self) -> Vec<Arc<GroupHost>> {
        self.hosts.iter().flatten().cloned().collect()
    }

    /// Stops the host at `index`, keeping its data directory.
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<()> {
        let host = self
            .hosts
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| anyhow!("host {index} is not running"))?;
        host.shutdown().await;
        drop(host);
        Ok(())
    }

    /// Restarts the host at `index` on its old address and data directory.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        let config = self.config(index, self.dirs[index].path(), self.addrs[index]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let host = loop {
            match GroupHost::start(config.clone()).await {
                Ok(host) => break host,
                // The old listener or RocksDB lock may take a moment to go.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "restart retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("restart"),
            }
        };
        assert_eq!(
            host.stored_groups()?,
            self.groups,
            "a restarted host finds every group it had on disk"
        );
        self.hosts[index] = Some(Arc::new(host));
        self.open_groups(index).await
    }

    /// Stops every running host.
    pub async fn shutdown(&self) {
        for host in self.live() {
            host.shutdown().await;
        }
    }

    /// Waits until every running host knows a leader of every group.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> anyhow::Result<()> {
        for host in self.live() {
            for group in &self.groups {
                host.wait_for_leader(*group, timeout).await?;
            }
        }
        Ok(())
    }

    /// Waits until every group's leader has committed the entries of its
    /// term (the first is its blank entry): openraft 0.10 refuses writes on a
    /// new leader until a quorum has acknowledged it, which this implies.
    pub async fn wait_for_writable_leaders(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for group in &self.groups {
            loop {
                let ready = self.live().iter().any(|host| {
                    host.status(*group).is_some_and(|s| {
                        s.role == Role::Leader && s.committed > 0 && s.committed >= s.last_log_index
                    })
                });
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("group {group}'s leader committed nothing within {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// The index of the host that leads `group`, as the running hosts see it.
    pub async fn leader_of(&self, group: GroupId, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            for (index, host) in self.hosts.iter().enumerate() {
                let Some(host) = host else { continue };
                if let Some(status) = host.status(group) {
                    if status.role == Role::Leader {
                        return Ok(index);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader for group {group} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running replica of every group has applied the same
    /// index as its leader and reports the same digest; returns the digests.
    pub async fn wait_converged(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<GroupId, u64>> {
        let deadline = Instant::now() + timeout;
        let mut digests = BTreeMap::new();
        for group in &self.groups {
            loop {
                let seen: Vec<(u64, u64)> = self
                    .live()
                    .iter()
                    .map(|h| h.digest(*group))
                    .collect::<Result<_, _>>()?;
                let first = seen[0];
                if seen.iter().all(|d| *d == first) && first.0 > 0 {
                    digests.insert(*group, first.1);
                    break;
                }
                if Instant::now() > deadline {
                    bail!("group {group} did not converge: (applied, digest) per host {seen:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(digests)
    }
}

/// Writes `command` to `group` through whichever host leads it, following
/// "not leader" hints and retrying retryable errors for up to `timeout`.
/// Returns the state machine's answer.
pub async fn write(
    hosts: &[Arc<GroupHost>],
    group: GroupId,
    command: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut target = 0usize;
    loop {
        let host = &hosts[target % hosts.len()];
        match host.write(group, command.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(WriteError::NotLeader {
                leader: Some(leader),
                ..
            }) => {
                target = hosts
                    .iter()
                    .position(|h| h.node_id() == leader)
                    .unwrap_or(target + 1);
                if hosts.iter().all(|h| h.node_id() != leader) {
                    // The leader is a stopped host; wait for a new election.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(e) if e.is_retryable() => {
                target += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            bail!("write to group {group} not acknowledged within {timeout:?}");
        }
    }
}

/// Sends `count` writes spread over `groups` from `writers` concurrent tasks;
/// write `i` sets `k{i}` to `v{i}` in group `groups[i % groups.len()]`.
/// Returns each write's latency.
pub async fn write_many(
    hosts: Vec<Arc<GroupHost>>,
    groups: &[GroupId],
    first: usize,
    count: usize,
    writers: usize,
) -> anyhow::Result<Vec<Duration>> {
    let hosts = Arc::new(hosts);
    let groups = Arc::new(groups.to_vec());
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let hosts = hosts.clone();
        let groups = groups.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = first + writer;
            while i < first + count {
                let group = groups[i % groups.len()];
                let started = Instant::now();
                write(
                    &hosts,
                    group,
                    format!("k{i}=v{i}").into_bytes(),
                    Duration::from_secs(30),
                )
                .await?;
                latencies.push(started.elapsed());
                i += writers;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(count);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

/// Which group write `i` of [`write_many`] went to, and its key and value.
pub fn written(groups: &[GroupId], i: usize) -> (GroupId, Vec<u8>, Vec<u8>) {
    (
        groups[i % groups.len()],
        format!("k{i}").into_bytes(),
        format!("v{i}").into_bytes(),
    )
}

/// Asserts that `host` holds writes `indices` of [`write_many`] in its applied state.
pub fn assert_holds_writes(
    host: &GroupHost,
    groups: &[GroupId],
    indices: &[usize],
) -> anyhow::Result<()> {
    for &i in indices {
        let (group, key, value) = written(groups, i);
        let held = host.read_local(group, &key)?;
        anyhow::ensure!(
            held.as_deref() == Some(value.as_slice()),
            "node {} lacks write {i}: holds {held:?}",
            host.node_id()
        );
    }
    Ok(())
}
