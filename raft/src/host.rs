//! [`GroupHost`]: one node's set of Raft groups, their storage and transport.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fishchat_proto::peer::raft_peer_server::RaftPeerServer;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::Instrument;

use crate::balance;
use crate::error::{HostError, ReadError, WriteError};
use crate::local::{LocalGroups, WriteLimits};
use crate::network::{
    ClusterTag, GroupNetwork, PeerService, PeerStats, PeerTransport, TagError,
    MAX_PEER_MESSAGE_BYTES,
};
use crate::state_machine::StateMachine;
use crate::storage::{
    self, Engine, GroupLogStore, GroupStateStore, StorageStats, WalSyncer, CF_META,
};
use crate::types::{GroupId, KeyValue, NodeId, Raft};

/// Raft timing and log-retention settings, the same for every group of a node.
#[derive(Clone, Debug)]
pub struct RaftTiming {
    /// Leader heartbeat period.
    pub heartbeat: Duration,
    /// Lower bound of the randomised election timeout.
    pub election_min: Duration,
    /// Upper bound of the randomised election timeout.
    pub election_max: Duration,
    /// Build a snapshot after this many entries applied since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot, for followers slightly behind.
    pub entries_kept_after_snapshot: u64,
    /// Largest snapshot chunk sent in one message.
    pub snapshot_chunk_bytes: u64,
    /// Most entries sent in one append-entries message.
    pub max_entries_per_append: u64,
    /// How often each node checks whether it leads too many groups and
    /// hands one over (see `balance`); `None` leaves leaders where they are.
    pub balance_every: Option<Duration>,
}

impl Default for RaftTiming {
    fn default() -> Self {
        Self {
            // A follower stands for election only after the leader's lease
            // (openraft: election_max) *and* its own random timeout have
            // passed since the last heartbeat, so a dead leader is replaced
            // after 0.8-1 s; five heartbeats at least fit in that.
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(300),
            election_max: Duration::from_millis(500),
            snapshot_every_entries: 10_000,
            entries_kept_after_snapshot: 1_000,
            snapshot_chunk_bytes: 1024 * 1024,
            max_entries_per_append: 512,
            balance_every: Some(Duration::from_secs(10)),
        }
    }
}

impl RaftTiming {
    fn openraft_config(&self) -> Result<Config, HostError> {
        let millis = |d: Duration| d.as_millis().min(u128::from(u64::MAX)) as u64;
        Config {
            cluster_name: "fishchat".into(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_min),
            election_timeout_max: millis(self.election_max),
            install_snapshot_timeout: millis(self.election_max).max(2000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.entries_kept_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_payload_entries: self.max_entries_per_append,
            // A candidate first asks whether it would win: a node back from
            // a partition cannot raise the term and depose a healthy leader.
            enable_pre_vote: Some(true),
            ..Config::default()
        }
        .validate()
        .map_err(|e| HostError::Config(e.to_string()))
    }
}

/// Settings of one node's group host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// This node's id, stable for the life of its data directory.
    pub node_id: NodeId,
    /// Where the node's RocksDB lives.
    pub data_dir: PathBuf,
    /// Where to listen for peers (port 0 picks a free one).
    pub peer_listen: SocketAddr,
    /// Raft timing, the same on every node of a cluster.
    pub timing: RaftTiming,
    /// How long a write may wait for its commit before it is reported unknown.
    pub write_timeout: Duration,
    /// Largest command accepted by [`GroupHost::write`]; keeps every
    /// append-entries message far below the peer message limit.
    pub max_command_bytes: usize,
    /// More gRPC services to serve on the peer port beside Raft's own (the
    /// layer above uses it for its node-to-node messages).
    pub services: Option<tonic::service::Routes>,
    /// Where to dial some peers instead of the address their group
    /// membership records (a tunnel or a proxy in between).
    pub peer_routes: BTreeMap<NodeId, String>,
}

impl HostConfig {
    /// A configuration with default timing for `node_id` storing under `data_dir`.
    pub fn new(node_id: NodeId, data_dir: impl Into<PathBuf>, peer_listen: SocketAddr) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            peer_listen,
            timing: RaftTiming::default(),
            write_timeout: Duration::from_secs(10),
            max_command_bytes: 1024 * 1024,
            services: None,
            peer_routes: BTreeMap::new(),
        }
    }
}

/// A replica's role in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Receives the log but does not vote.
    Learner,
    /// Votes and follows the leader.
    Follower,
    /// Asking for votes.
    Candidate,
    /// Leads the group.
    Leader,
    /// Stopped.
    Shutdown,
}

/// One group's state as seen by this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// This replica's role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader this replica knows of.
    pub leader: Option<NodeId>,
    /// Index of the last entry in this replica's log (0: empty).
    pub last_log_index: u64,
    /// Highest index this replica knows to be committed (0: none).
    pub committed: u64,
    /// Highest index applied to this replica's state machine (0: none).
    pub applied: u64,
    /// Index the replica's latest snapshot covers (0: none).
    pub snapshot: u64,
    /// Highest index purged from the replica's log (0: none).
    pub purged: u64,
    /// The group's voters.
    pub voters: Vec<NodeId>,
    /// Leadership confirmations this replica ran for linearizable reads
    /// (reads that wait at the same time share one).
    pub read_rounds: u64,
}

/// Per-group counters the host keeps beside openraft's metrics.
struct GroupCounters {
    committed: Arc<AtomicU64>,
    applied: watch::Receiver<u64>,
}

/// The peer server task and the signal that stops it.
struct PeerServer {
    /// Ends the append streams peers hold open.
    closing: watch::Sender<bool>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// One node: hosts many Raft groups over one RocksDB and one peer transport.
pub struct GroupHost {
    config: HostConfig,
    raft_config: Arc<Config>,
    syncer: Mutex<Option<WalSyncer>>,
    sync_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    local: Arc<LocalGroups>,
    opening: tokio::sync::Mutex<()>,
    counters: Mutex<BTreeMap<GroupId, GroupCounters>>,
    transport: Arc<PeerTransport>,
    peer_addr: SocketAddr,
    server: Mutex<Option<PeerServer>>,
    balancer: Mutex<Option<JoinHandle<()>>>,
    tag: ClusterTag,
}

impl GroupHost {
    /// Opens the node's storage and starts serving peers. Groups are opened
    /// one by one with [`GroupHost::open_group`].
    pub async fn start(config: HostConfig) -> Result<Self, HostError> {
        if config.node_id == 0 {
            // 0 means "unknown" in leader hints on the wire.
            return Err(HostError::Config("node ids start at 1".into()));
        }
        let raft_config = Arc::new(config.timing.openraft_config()?);
        std::fs::create_dir_all(&config.data_dir).map_err(|e| HostError::Storage(e.to_string()))?;
        let engine = Engine::open(&config.data_dir.join("rocksdb"))
            .map_err(|e| HostError::Storage(e.to_string()))?;
        let (syncer, sync_thread) =
            WalSyncer::start(engine.clone()).map_err(|e| HostError::Storage(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(config.peer_listen)
            .await
            .map_err(|source| HostError::Listen {
                addr: config.peer_listen,
                source,
            })?;
        let peer_addr = listener.local_addr().map_err(|source| HostError::Listen {
            addr: config.peer_listen,
            source,
        })?;
        let local = Arc::new(LocalGroups::new(
            engine.clone(),
            WriteLimits {
                timeout: config.write_timeout,
                max_command_bytes: config.max_command_bytes,
            },
        ));
        let (closing, closing_seen) = watch::channel(false);
        let tag = ClusterTag::default();
        let service = RaftPeerServer::new(PeerService::new(
            local.clone(),
            config.timing.election_max,
            closing_seen,
            tag.clone(),
        ))
        .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let routes = config
            .services
            .clone()
            .unwrap_or_default()
            .add_service(service);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .layer(tonic::service::InterceptorLayer::new(tag.check()))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming_nodelay(listener), async {
                    let _ = stopped.await;
                }),
        );
        let balancer = config
            .timing
            .balance_every
            .map(|period| tokio::spawn(balance::run(config.node_id, local.clone(), period)));
        tracing::info!(node = config.node_id, %peer_addr, "group host started");
        Ok(Self {
            transport: Arc::new(PeerTransport::new(
                config.timing.election_min,
                config.peer_routes.clone(),
                tag.clone(),
            )),
            config,
            raft_config,
            syncer: Mutex::new(Some(syncer)),
            sync_thread: Mutex::new(Some(sync_thread)),
            local,
            opening: tokio::sync::Mutex::new(()),
            counters: Mutex::new(BTreeMap::new()),
            peer_addr,
            server: Mutex::new(Some(PeerServer {
                closing,
                stop,
                task,
            })),
            balancer: Mutex::new(balancer),
            tag,
        })
    }

    /// Sets the tag of the cluster this node belongs to. From then on every
    /// request to a peer carries it, and a request tagged with another is
    /// refused on every service of the peer port (the application's too).
    /// Set once; the same tag again is fine.
    pub fn set_cluster_tag(&self, tag: &str) -> Result<(), TagError> {
        self.tag.set(tag)?;
        tracing::info!(tag, "peer requests carry and must match this cluster tag");
        Ok(())
    }

    /// This node's cluster tag, shared: an application client of the peer
    /// port (`tonic`'s `with_interceptor`) adds it to its requests.
    pub fn cluster_tag(&self) -> ClusterTag {
        self.tag.clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// The address peers reach this node at.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// How long a write may take before its outcome is reported unknown.
    pub(crate) fn write_timeout(&self) -> Duration {
        self.config.write_timeout
    }

    /// This node's replicas, served without forwarding.
    pub(crate) fn local(&self) -> &LocalGroups {
        &self.local
    }

    /// The node's connections to its peers.
    pub(crate) fn transport(&self) -> &PeerTransport {
        &self.transport
    }

    /// Counters of the appends this node sent to its peers.
    pub fn peer_stats(&self) -> Arc<PeerStats> {
        self.transport.stats().clone()
    }

    /// Group-commit counters of this node's storage.
    pub fn storage_stats(&self) -> Arc<StorageStats> {
        self.local.engine().stats().clone()
    }

    /// The groups this node has Raft state for on disk, whether open or not.
    pub fn stored_groups(&self) -> Result<Vec<GroupId>, HostError> {
        let db = self.local.engine().db();
        let mut groups = BTreeSet::new();
        for item in db.iterator_cf(
            self.local.engine().cf(CF_META),
            rocksdb::IteratorMode::Start,
        ) {
            let (key, _) = item.map_err(|e| HostError::Storage(e.to_string()))?;
            if let Some(group) = storage::group_of_meta_key(&key) {
                groups.insert(group);
            }
        }
        Ok(groups.into_iter().collect())
    }

    /// The groups open on this host.
    pub fn open_groups(&self) -> Vec<GroupId> {
        self.local.groups.ids()
    }

    /// Opens `group` on this node with `machine` as its state machine,
    /// reopening whatever the group has on disk.
    pub async fn open_group<S: StateMachine>(
        &self,
        group: GroupId,
        machine: S,
    ) -> Result<(), HostError> {
        // One open at a time: two concurrent opens of one group would both
        // replay its log into the same state.
        let _opening = self.opening.lock().await;
        if self.local.groups.get(group).is_some() {
            return Err(HostError::GroupExists(group));
        }
        let syncer = self
            .syncer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| HostError::Stopped("host is shutting down".into()))?;
        let (applied_tx, applied_rx) = watch::channel(0);
        let counters = GroupCounters {
            committed: Arc::new(AtomicU64::new(0)),
            applied: applied_rx.clone(),
        };
        let log = GroupLogStore::new(
            group,
            self.local.engine().clone(),
            syncer,
            counters.committed.clone(),
            applied_rx,
        );
        let state = GroupStateStore::open(
            group,
            self.local.engine().clone(),
            Box::new(machine),
            applied_tx,
        )
        .map_err(|e| HostError::Storage(e.to_string()))?;
        let network = GroupNetwork::new(group, self.transport.clone());
        // openraft runs the group's core task (and, from it, the replication
        // tasks) in the span current at creation: this one names the group
        // in every line the group logs.
        let raft = Raft::new(
            self.config.node_id,
            self.raft_config.clone(),
            network,
            log,
            state,
        )
        .instrument(tracing::info_span!("raft", group))
        .await
        .map_err(|e| HostError::Stopped(e.to_string()))?;
        self.local.insert(group, raft);
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, counters);
        Ok(())
    }

    fn raft(&self, group: GroupId) -> Result<Raft, HostError> {
        self.local
            .groups
            .get(group)
            .ok_or(HostError::UnknownGroup(group))
    }

    /// Makes a new group with `members` (node id → peer address) as its
    /// voters. Called once, on one node, for a group that has never existed.
    ///
    /// The node that initialises a group stands for election at once and, in
    /// practice, becomes its first leader: initialising each group from a
    /// different node spreads the leaders over the cluster.
    pub async fn initialize_group(
        &self,
        group: GroupId,
        members: &BTreeMap<NodeId, String>,
    ) -> Result<(), HostError> {
        let raft = self.raft(group)?;
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        match raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                Err(HostError::AlreadyInitialized(group))
            }
            Err(e) => Err(HostError::Membership {
                group,
                detail: e.to_string(),
            }),
        }
    }

    /// Proposes `command` to this node's replica of `group` and returns the
    /// state machine's response once the command is committed by a majority
    /// and applied here. Fails with [`WriteError::NotLeader`] on a follower;
    /// [`GroupHost::propose`] forwards instead.
    #[tracing::instrument(level = "debug", skip(self, command), fields(node = self.config.node_id))]
    pub async fn write(&self, group: GroupId, command: Vec<u8>) -> Result<Vec<u8>, WriteError> {
        self.local.write(group, command).await
    }

    /// Returns once this node has confirmed, with a quorum, that it leads
    /// `group` and has applied everything committed before the call began.
    /// Local reads made after it are linearizable.
    pub async fn linearize(&self, group: GroupId) -> Result<(), ReadError> {
        self.local.linearize(group).await
    }

    /// Reads application key `key` of `group` linearizably (see
    /// [`GroupHost::linearize`]).
    pub async fn read(&self, group: GroupId, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        self.local.linearize(group).await?;
        self.local.read(group, key)
    }

    /// Reads application key `key` from this replica's applied state, which
    /// may lag the leader's.
    pub fn read_local(&self, group: GroupId, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        self.local.read(group, key)
    }

    /// Up to `limit` application key-value pairs of `group` with keys in
    /// `[from, to)`, in key order, from this replica's applied state.
    pub fn scan_local(
        &self,
        group: GroupId,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, ReadError> {
        self.local.scan(group, from, to, limit)
    }

    /// The applied index of this replica and a digest of its state machine
    /// data at that index. Replicas at the same index have equal digests.
    pub fn digest(&self, group: GroupId) -> Result<(u64, u64), ReadError> {
        self.local.digest(group)
    }

    /// This replica's view of `group`.
    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let raft = self.local.groups.get(group)?;
        let metrics = {
            use openraft::async_runtime::WatchReceiver;
            raft.metrics().borrow_watched().clone()
        };
        let (committed, applied) = {
            let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            let c = counters.get(&group)?;
            let pair = (c.committed.load(Ordering::Relaxed), *c.applied.borrow());
            pair
        };
        let role = match metrics.state {
            ServerState::Learner => Role::Learner,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Leader => Role::Leader,
            ServerState::Shutdown => Role::Shutdown,
        };
        Some(GroupStatus {
            group,
            role,
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed: committed.max(applied),
            applied,
            snapshot: metrics.snapshot.map(|id| id.index).unwrap_or(0),
            purged: metrics.purged.map(|id| id.index).unwrap_or(0),
            voters: metrics.membership_config.membership().voter_ids().collect(),
            read_rounds: self.local.read_rounds(group),
        })
    }

    /// Waits until this replica knows a leader of `group`, and returns it.
    pub async fn wait_for_leader(
        &self,
        group: GroupId,
        timeout: Duration,
    ) -> Result<NodeId, HostError> {
        let raft = self.raft(group)?;
        let metrics = raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a known leader")
            .await
            .map_err(|_| HostError::Timeout {
                group,
                what: "a known leader".into(),
                timeout,
            })?;
        metrics.current_leader.ok_or(HostError::Timeout {
            group,
            what: "a known leader".into(),
            timeout,
        })
    }

    /// Waits until this replica has applied `index` of `group`.
    pub async fn wait_applied(
        &self,
        group: GroupId,
        index: u64,
        timeout: Duration,
    ) -> Result<(), HostError> {
        let raft = self.raft(group)?;
        raft.wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied index")
            .await
            .map(|_| ())
            .map_err(|_| HostError::Timeout {
                group,
                what: format!("applied index {index}"),
                timeout,
            })
    }

    /// Adds `node` (reachable at `addr`) to `group` as a learner and waits
    /// until it has caught up. Run on the leader.
    pub async fn add_learner(
        &self,
        group: GroupId,
        node: NodeId,
        addr: String,
    ) -> Result<(), HostError> {
        let raft = self.raft(group)?;
        raft.add_learner(node, BasicNode { addr }, true)
            .await
            .map(|_| ())
            .map_err(|e| HostError::Membership {
                group,
                detail: e.to_string(),
            })
    }

    /// Makes `voters` the voters of `group` (learners among them are
    /// promoted, voters not among them are removed). Run on the leader.
    pub async fn change_voters(
        &self,
        group: GroupId,
        voters: BTreeSet<NodeId>,
    ) -> Result<(), HostError> {
        let raft = self.raft(group)?;
        raft.change_membership(voters, false)
            .await
            .map(|_| ())
            .map_err(|e| HostError::Membership {
                group,
                detail: e.to_string(),
            })
    }

    /// Stops every group and the peer server, and waits (up to ten seconds)
    /// until storage is released, so the data directory can be reopened.
    pub async fn shutdown(&self) {
        if let Some(balancer) = self
            .balancer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            balancer.abort();
        }
        for (group, raft) in self.local.drain() {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group, error = %e, "group did not stop cleanly");
            }
        }
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            server.closing.send_replace(true);
            let _ = server.stop.send(());
            if let Err(e) = server.task.await {
                tracing::warn!(error = %e, "peer server task failed");
            }
        }
        drop(self.syncer.lock().unwrap_or_else(|p| p.into_inner()).take());
        let deadline = Instant::now() + Duration::from_secs(10);
        // Replication tasks of stopped groups drop their storage handles soon after.
        while !self.local.engine().is_sole_owner() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let thread = self
            .sync_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            if self.local.engine().is_sole_owner() {
                let _ = thread.join();
            } else {
                tracing::warn!(
                    node = self.config.node_id,
                    "storage still in use after shutdown"
                );
            }
        }
        tracing::info!(node = self.config.node_id, "group host stopped");
    }
}

/// Accepted peer connections with Nagle's algorithm off. Tonic's own
/// `tcp_nodelay` applies only to listeners it binds itself; without this,
/// small answers wait for the peer's delayed ACK (40 ms on Linux).
fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}
