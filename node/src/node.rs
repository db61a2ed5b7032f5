//! Starting a node: open storage, open every shard, form the cluster on the
//! first start, serve operators; and stopping it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fishchat_proto::client::kick::Reason;
use fishchat_raft::{GroupHost, GroupId, HostConfig, HostError, TagError};
use fishchat_shard::{ChatMachine, ShardId, ShardMap};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::admin;
use crate::chat::Chat;
use crate::config::Settings;
use crate::courier::Courier;
use crate::directory::Directory;
use crate::events::Events;
use crate::meta::{self, ClusterRecord, MetaMachine, META_GROUP};
use crate::quic::ClientEndpoint;
use crate::sessions::Sessions;
use crate::token::TokenKey;
use crate::{outbox, tls};

/// The Raft group that holds shard `shard` (group 0 is kept for the meta group).
pub fn group_of(shard: ShardId) -> GroupId {
    GroupId::from(shard) + 1
}

/// The node that initialises `shard` when a cluster is formed: shards are
/// dealt round-robin over the nodes, which also spreads their first leaders.
fn initializer(shard: ShardId, nodes: &[u64]) -> u64 {
    nodes[shard as usize % nodes.len()]
}

/// What a data directory was created for; checked on every start so a node
/// never opens another node's data or a cluster of another shape.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    node_id: u64,
    shards: u32,
}

/// A running node.
pub struct Node {
    settings: Settings,
    host: Arc<GroupHost>,
    map: ShardMap,
    admin_stop: Option<oneshot::Sender<()>>,
    admin_task: Option<JoinHandle<()>>,
    sessions: Arc<Sessions>,
    clients: Option<ClientEndpoint>,
    pump_stop: tokio::sync::watch::Sender<bool>,
    pump_task: Option<JoinHandle<()>>,
    settle_task: JoinHandle<()>,
}

impl Node {
    /// Starts the node: reopens its data or forms the cluster with its peers.
    pub async fn start(settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating {}", settings.data_dir.display()))?;
        check_identity(&settings)?;
        let keys = tls::load(&settings.tls_dir)?;
        let map = ShardMap::new(settings.shards).context("a cluster needs at least one shard")?;
        let sessions = Arc::new(Sessions::default());
        // Every other node: its id and the address to reach its peer port.
        let other_peers: Vec<(u64, String)> = settings
            .peers
            .iter()
            .filter(|(id, _)| **id != settings.node_id)
            .map(|(id, addr)| (*id, settings.peer_routes.get(id).unwrap_or(addr).clone()))
            .collect();
        let peer_ids: Vec<u64> = other_peers.iter().map(|(id, _)| *id).collect();
        let directory = Arc::new(Directory::new(settings.node_id, &peer_ids, incarnation()?));
        let mut host_config =
            HostConfig::new(settings.node_id, &settings.data_dir, settings.peer_listen);
        host_config.timing = settings.timing.clone();
        host_config.write_timeout = settings.write_timeout;
        host_config.max_command_bytes = crate::config::MAX_COMMAND_BYTES as usize;
        host_config.peer_routes = settings.peer_routes.clone();
        host_config.services = Some(tonic::service::Routes::new(Events::service(
            sessions.clone(),
            directory.clone(),
        )));
        let host = Arc::new(GroupHost::start(host_config).await?);
        let fresh = host.stored_groups()?.is_empty();
        // A node that knows its cluster from an earlier start refuses other
        // clusters' peers before any of its groups opens.
        if let Some(id) = recorded_cluster_id(&settings.data_dir) {
            host.set_cluster_tag(&id)?;
        }
        host.open_group(META_GROUP, MetaMachine).await?;
        // A data directory from before the id was recorded: its meta replica
        // knows, before the shards open.
        if let Some(record) = meta::stored(&host) {
            adopt_cluster_id(&host, &settings.data_dir, &record.cluster_id)?;
        }
        for shard in 0..settings.shards {
            host.open_group(group_of(shard), ChatMachine::new(shard, map))
                .await?;
        }
        // Every start, not only the first: a node stopped half-way through
        // forming must still initialise its share; initialised shards refuse.
        form_cluster(&host, &settings).await?;

        let events = Arc::new(Events::new(
            sessions.clone(),
            directory,
            &other_peers,
            host.cluster_tag(),
        ));
        let (pump_stop, pump_stopped) = tokio::sync::watch::channel(false);
        let courier = Arc::new(Courier::new(
            host.clone(),
            events.clone(),
            pump_stopped.clone(),
        ));
        let chat = Arc::new(Chat::new(
            host.clone(),
            map,
            TokenKey::new(&keys.token_secret),
            settings.limits.clone(),
            events.clone(),
            courier.clone(),
            client_addrs(&settings),
        ));
        let clients = ClientEndpoint::start(
            settings.client_listen,
            keys.server_crypto,
            chat.clone(),
            sessions.clone(),
        )?;
        let cluster = Arc::new(std::sync::OnceLock::new());
        let settle_task = tokio::spawn({
            let host = host.clone();
            let cluster = cluster.clone();
            let data_dir = settings.data_dir.clone();
            let mine = ClusterRecord {
                cluster_id: tls::random_hex(16)?,
                shards: settings.shards,
                nodes: settings.peers.clone(),
                formed_ms: crate::chat::now_ms(),
            };
            async move {
                if let Some(record) = meta::settle(host.clone(), mine).await {
                    if let Err(e) = adopt_cluster_id(&host, &data_dir, &record.cluster_id) {
                        tracing::error!(error = %e, "cannot take the settled cluster's id as tag");
                    }
                    let _ = cluster.set(record);
                }
            }
        });
        let pump_task = tokio::spawn(outbox::run(host.clone(), map, courier, pump_stopped));

        let (admin_stop, stopped) = oneshot::channel();
        let listener = tokio::net::TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("binding the admin port {}", settings.admin_listen))?;
        let state = admin::AdminState::new(
            settings.clone(),
            host.clone(),
            map,
            chat,
            sessions.clone(),
            cluster,
        );
        let admin_task = tokio::spawn(async move {
            if let Err(e) = admin::serve(listener, state, stopped).await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        tracing::info!(
            node = settings.node_id,
            client = %settings.client_listen,
            peer = %settings.peer_listen,
            admin = %settings.admin_listen,
            shards = settings.shards,
            fresh,
            "node started"
        );
        Ok(Self {
            settings,
            host,
            map,
            admin_stop: Some(admin_stop),
            admin_task: Some(admin_task),
            sessions,
            clients: Some(clients),
            pump_stop,
            pump_task: Some(pump_task),
            settle_task,
        })
    }

    /// The node's Raft groups.
    pub fn host(&self) -> &Arc<GroupHost> {
        &self.host
    }

    /// The shard map.
    pub fn shard_map(&self) -> ShardMap {
        self.map
    }

    /// Waits until every shard has a leader, or `timeout` passes.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> Result<(), HostError> {
        for shard in 0..self.settings.shards {
            self.host.wait_for_leader(group_of(shard), timeout).await?;
        }
        Ok(())
    }

    /// Stops serving and closes storage.
    pub async fn shutdown(mut self) {
        // Clients first: they are told to go elsewhere while peers still serve.
        self.sessions.end_all(Reason::ShuttingDown);
        if let Some(clients) = self.clients.take() {
            tokio::time::sleep(Duration::from_millis(300)).await;
            clients.shutdown().await;
        }
        // The pump may be waiting out a write timeout on a shard that lost its
        // quorum; every step of it is idempotent, so cutting it short is safe.
        self.settle_task.abort();
        let _ = self.pump_stop.send(true);
        if let Some(task) = self.pump_task.take() {
            task.abort();
            let _ = task.await;
        }
        if let Some(stop) = self.admin_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.admin_task.take() {
            let _ = task.await;
        }
        self.host.shutdown().await;
        tracing::info!(node = self.settings.node_id, "node stopped");
    }
}

/// The client address of every node, by the port rule: a node's QUIC port is
/// its peer port minus 10.
fn client_addrs(settings: &Settings) -> Vec<String> {
    settings
        .peers
        .values()
        .filter_map(|peer| {
            let (host, port) = peer.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            Some(format!("{host}:{}", port.checked_sub(10)?))
        })
        .collect()
}

/// Initialises this node's share of the groups with every peer as a voter:
/// the meta group by the first node, the shards round-robin; a group that
/// has Raft state already is left alone.
async fn form_cluster(host: &GroupHost, settings: &Settings) -> anyhow::Result<()> {
    let nodes: Vec<u64> = settings.peers.keys().copied().collect();
    let members: BTreeMap<u64, String> = settings.peers.clone();
    if nodes.first() == Some(&settings.node_id) {
        match host.initialize_group(META_GROUP, &members).await {
            Ok(()) => tracing::info!(group = META_GROUP, "formed the meta group"),
            Err(HostError::AlreadyInitialized(_)) => {}
            Err(e) => return Err(e).context("forming the meta group"),
        }
    }
    for shard in 0..settings.shards {
        if initializer(shard, &nodes) != settings.node_id {
            continue;
        }
        match host.initialize_group(group_of(shard), &members).await {
            Ok(()) => tracing::info!(shard, group = group_of(shard), "formed shard"),
            Err(HostError::AlreadyInitialized(_)) => {}
            Err(e) => return Err(e).with_context(|| format!("forming shard {shard}")),
        }
    }
    Ok(())
}

/// A random number naming this run of the process in the session directory.
fn incarnation() -> anyhow::Result<u64> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("the random source failed"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Records the data directory's identity on first use, and refuses a
/// directory made for another node id or shard count.
fn check_identity(settings: &Settings) -> anyhow::Result<()> {
    let path = settings.data_dir.join("identity.json");
    let wanted = Identity {
        node_id: settings.node_id,
        shards: settings.shards,
    };
    if path.exists() {
        let found = read_identity(&path)?;
        if found != wanted {
            bail!(
                "{} belongs to node {} of a {}-shard cluster, not node {} with {} shards",
                settings.data_dir.display(),
                found.node_id,
                found.shards,
                wanted.node_id,
                wanted.shards
            );
        }
        return Ok(());
    }
    let text = serde_json::to_string_pretty(&wanted)?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The file in the data directory that records the cluster id, so that a
/// restarted node refuses other clusters' peers before it opens a group.
const CLUSTER_ID_FILE: &str = "cluster_id";

/// The cluster id recorded in `data_dir`, if any (a damaged record is
/// ignored: the meta replica knows the id too).
fn recorded_cluster_id(data_dir: &Path) -> Option<String> {
    let path = data_dir.join(CLUSTER_ID_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let id = text.trim();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        tracing::warn!(path = %path.display(), "ignoring a damaged cluster id record");
        return None;
    }
    Some(id.to_string())
}

/// Makes `id` this node's cluster tag and records it in `data_dir` for the
/// next start.
fn adopt_cluster_id(host: &GroupHost, data_dir: &Path, id: &str) -> Result<(), TagError> {
    host.set_cluster_tag(id)?;
    record_cluster_id(data_dir, id);
    Ok(())
}

/// Records `id` in `data_dir` (written aside, then renamed into place).
/// Failing to is logged: the meta replica holds the id as well.
fn record_cluster_id(data_dir: &Path, id: &str) {
    if recorded_cluster_id(data_dir).as_deref() == Some(id) {
        return;
    }
    let path = data_dir.join(CLUSTER_ID_FILE);
    let aside = data_dir.join(format!("{CLUSTER_ID_FILE}.new"));
    let written = std::fs::write(&aside, format!("{id}\n"))
        .and_then(|()| std::fs::File::open(&aside)?.sync_all())
        .and_then(|()| std::fs::rename(&aside, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the cluster id");
    }
}

fn read_identity(path: &Path) -> anyhow::Result<Identity> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a node identity", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_dealt_round_robin_over_the_nodes() {
        let nodes = [1, 2, 3];
        let dealt: Vec<u64> = (0..6).map(|s| initializer(s, &nodes)).collect();
        assert_eq!(dealt, [1, 2, 3, 1, 2, 3]);
        assert_eq!(group_of(0), 1, "group 0 stays free for the meta group");
    }
}
