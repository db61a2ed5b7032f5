//! The operators' HTTP API: `GET /status` (JSON) and `GET /metrics`
//! (Prometheus text).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fishchat_raft::{GroupHost, Role};
use fishchat_shard::ShardMap;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::chat::Chat;
use crate::config::Settings;
use crate::meta::{ClusterRecord, META_GROUP};
use crate::node::group_of;
use crate::sessions::Sessions;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    settings: Arc<Settings>,
    host: Arc<GroupHost>,
    map: ShardMap,
    chat: Arc<Chat>,
    sessions: Arc<Sessions>,
    cluster: Arc<OnceLock<ClusterRecord>>,
}

impl AdminState {
    /// State for the node with `settings`, `host` and `map`, serving clients
    /// with `chat` and `sessions`.
    pub fn new(
        settings: Settings,
        host: Arc<GroupHost>,
        map: ShardMap,
        chat: Arc<Chat>,
        sessions: Arc<Sessions>,
        cluster: Arc<OnceLock<ClusterRecord>>,
    ) -> Self {
        Self {
            settings: Arc::new(settings),
            host,
            map,
            chat,
            sessions,
            cluster,
        }
    }
}

/// Serves the admin API on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = stop.await;
        })
        .await
}

/// `GET /status`.
#[derive(Debug, Serialize)]
pub struct NodeStatus {
    /// This node's id.
    pub node: u64,
    /// Every node of the cluster: id → peer address.
    pub peers: BTreeMap<u64, String>,
    /// This node's client (QUIC) address.
    pub client_addr: String,
    /// The cluster's id from the meta group (null until it is known).
    pub cluster_id: Option<String>,
    /// The meta group's leader, if known.
    pub meta_leader: Option<u64>,
    /// One entry per shard.
    pub shards: Vec<ShardStatus>,
    /// WAL syncs since start.
    pub wal_syncs: u64,
    /// Appends and votes made durable per WAL sync, on average.
    pub writes_per_sync: f64,
    /// Raft appends carried per append RPC to a peer, on average.
    pub appends_per_peer_rpc: f64,
}

/// This node's view of one shard.
#[derive(Debug, Serialize)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u32,
    /// Its Raft group.
    pub group: u64,
    /// This replica's role: leader, follower, candidate, learner, shutdown.
    pub role: String,
    /// The leader this replica knows, if any.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Highest index known committed.
    pub committed: u64,
    /// Highest index applied.
    pub applied: u64,
    /// Digest of the shard's state at `digest_index` (hex), equal on
    /// replicas that applied the same log.
    pub digest: String,
    /// The applied index the digest was taken at.
    pub digest_index: u64,
    /// Leadership confirmations this replica ran for linearizable reads
    /// (reads waiting at the same time share one).
    pub read_rounds: u64,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::Learner => "learner",
        Role::Shutdown => "shutdown",
    }
}

fn collect(state: &AdminState) -> NodeStatus {
    let stats = state.host.storage_stats();
    let shards = (0..state.map.shard_count())
        .filter_map(|shard| {
            let group = group_of(shard);
            let status = state.host.status(group)?;
            let (digest_index, digest) = state.host.digest(group).unwrap_or((0, 0));
            Some(ShardStatus {
                shard,
                group,
                role: role_name(status.role).into(),
                leader: status.leader,
                term: status.term,
                last_log_index: status.last_log_index,
                committed: status.committed,
                applied: status.applied,
                digest: format!("{digest:016x}"),
                digest_index,
                read_rounds: status.read_rounds,
            })
        })
        .collect();
    NodeStatus {
        node: state.settings.node_id,
        peers: state.settings.peers.clone(),
        client_addr: state.settings.client_listen.to_string(),
        cluster_id: state.cluster.get().map(|c| c.cluster_id.clone()),
        meta_leader: state.host.status(META_GROUP).and_then(|s| s.leader),
        shards,
        wal_syncs: stats.wal_syncs.load(Ordering::Relaxed),
        writes_per_sync: stats.writes_per_sync(),
        appends_per_peer_rpc: state.host.peer_stats().appends_per_rpc(),
    }
}

async fn status(State(state): State<AdminState>) -> Response {
    // Digests read every shard's state: off the async workers.
    match tokio::task::spawn_blocking(move || collect(&state)).await {
        Ok(status) => Json(status).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "status collection failed");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    }
}

/// Labels of the client request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RequestLabel {
    operation: &'static str,
    outcome: &'static str,
}

/// Labels of per-shard metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ShardLabel {
    shard: u32,
}

/// Registers a counter named `name` that reads `value`.
fn counter(registry: &mut Registry, name: &str, help: &str, value: &AtomicU64) {
    let counter = Counter::<u64>::default();
    counter.inc_by(value.load(Ordering::Relaxed));
    registry.register(name, help, counter);
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut registry = Registry::with_prefix("fishchat");
    let is_leader = Family::<ShardLabel, Gauge>::default();
    let applied = Family::<ShardLabel, Gauge>::default();
    let committed = Family::<ShardLabel, Gauge>::default();
    let term = Family::<ShardLabel, Gauge>::default();
    registry.register(
        "shard_is_leader",
        "1 when this node leads the shard",
        is_leader.clone(),
    );
    registry.register(
        "shard_applied_index",
        "Highest log index applied",
        applied.clone(),
    );
    registry.register(
        "shard_committed_index",
        "Highest log index known committed",
        committed.clone(),
    );
    registry.register("shard_term", "Current Raft term", term.clone());
    for shard in 0..state.map.shard_count() {
        let Some(status) = state.host.status(group_of(shard)) else {
            continue;
        };
        let label = ShardLabel { shard };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        is_leader
            .get_or_create(&label)
            .set(i64::from(status.role == Role::Leader));
        applied.get_or_create(&label).set(gauge(status.applied));
        committed.get_or_create(&label).set(gauge(status.committed));
        term.get_or_create(&label).set(gauge(status.term));
    }
    let stats = state.host.storage_stats();
    counter(
        &mut registry,
        "wal_syncs",
        "WAL syncs performed",
        &stats.wal_syncs,
    );
    counter(
        &mut registry,
        "wal_synced_writes",
        "Appends and votes made durable by WAL syncs",
        &stats.synced_writes,
    );
    let peers = state.host.peer_stats();
    counter(
        &mut registry,
        "peer_append_rpcs",
        "Append exchanges with peers: Append requests and AppendStream messages (one may carry several groups' appends)",
        &peers.append_rpcs,
    );
    counter(
        &mut registry,
        "peer_appends",
        "Raft appends those exchanges carried",
        &peers.appends,
    );
    let requests = Family::<RequestLabel, Counter<u64>>::default();
    let bound = Gauge::<i64>::default();
    registry.register(
        "client_requests",
        "Client requests answered, by operation and outcome (OK or the error code)",
        requests.clone(),
    );
    registry.register(
        "client_sessions_bound",
        "Client connections bound to a session on this node",
        bound.clone(),
    );
    for ((operation, outcome), count) in state.chat.stats().snapshot() {
        requests
            .get_or_create(&RequestLabel { operation, outcome })
            .inc_by(count);
    }
    bound.set(i64::try_from(state.sessions.bound()).unwrap_or(i64::MAX));
    let directory = state.chat.events.directory();
    let peers_known = Gauge::<i64>::default();
    registry.register(
        "session_directory_peers_known",
        "Peers whose set of session holders this node knows (it sends every inbox event to the others)",
        peers_known.clone(),
    );
    peers_known.set(i64::try_from(directory.peers_known()).unwrap_or(i64::MAX));
    let stats = directory.stats();
    counter(
        &mut registry,
        "peer_inbox_events_sent",
        "Inbox events queued for peers that may hold a session of the user",
        &stats.events_sent,
    );
    counter(
        &mut registry,
        "peer_inbox_events_skipped",
        "Inbox events not sent to a peer: the session directory says it holds no session of the user",
        &stats.events_skipped,
    );
    counter(
        &mut registry,
        "peer_inbox_events_received",
        "Inbox events received from peers (one per user per batch)",
        &stats.events_received,
    );
    if let Some(rss) = resident_bytes() {
        let resident = Gauge::<i64>::default();
        registry.register(
            "process_resident_bytes",
            "Resident memory of this node's process (VmRSS), in bytes",
            resident.clone(),
        );
        resident.set(i64::try_from(rss).unwrap_or(i64::MAX));
    }
    if let Some(seconds) = cpu_seconds() {
        let cpu = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "process_cpu_seconds",
            "CPU time this node's process has used, user and system together, in seconds",
            cpu.clone(),
        );
        cpu.inc_by(seconds);
    }
    let mut body = String::new();
    match encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// This process's resident memory, from `/proc/self/status` (Linux only).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// Clock ticks per second of the times in `/proc/<pid>/stat` (Linux's
/// `USER_HZ`, which its ABI fixes at 100 on the architectures we build for).
const PROC_TICKS_PER_SECOND: f64 = 100.0;

/// CPU time this process has used so far, from `/proc/self/stat` (Linux only).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_seconds(&stat)
}

/// User plus system time of a `/proc/<pid>/stat` text, in seconds. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from the last `)`: utime and stime are the 12th and 13th after it.
fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / PROC_TICKS_PER_SECOND)
}

/// The `VmRSS` line of a `/proc/<pid>/status` text, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::{parse_cpu_seconds, parse_vm_rss};

    #[test]
    fn resident_memory_is_read_from_the_vm_rss_line_in_bytes() {
        let status = "Name:\tfishchat-node\nVmPeak:\t  900 kB\nVmRSS:\t  231428 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss(status), Some(231_428 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 pages\n"), None);
    }

    #[test]
    fn cpu_time_is_user_plus_system_ticks_counted_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat =
            "4242 (node (x) y) S 1 4242 4242 0 -1 4194560 900 0 3 0 1234 566 0 0 20 0 9 0 77 0 0";
        assert_eq!(parse_cpu_seconds(stat), Some(18.0));
        assert_eq!(parse_cpu_seconds("4242 (node) S 1 2"), None);
        assert_eq!(parse_cpu_seconds("4242 node S"), None);
        assert_eq!(
            parse_cpu_seconds("1 (n) S 1 1 1 0 -1 0 0 0 0 0 lots 5 0"),
            None
        );
    }

    #[test]
    fn this_process_reports_some_resident_memory() {
        assert!(super::resident_bytes().is_some_and(|bytes| bytes > 0));
        assert!(super::cpu_seconds().is_some_and(|seconds| seconds >= 0.0));
    }
}
