//! The sending side: one channel per peer, one openraft network per group.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fishchat_proto::peer::raft_peer_client::RaftPeerClient;
use fishchat_proto::peer::{
    peer_error, propose_reply, raft_reply, route_error, ProposeRequest, RaftMessage, RouteError,
    ScanRequest,
};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Endpoint;

use super::batch::{AppendQueue, PeerStats};
use super::{ClusterTag, PeerClient, RemoteOutcome, SnapshotChunk, MAX_PEER_MESSAGE_BYTES};
use crate::codec;
use crate::error::{ReadError, WriteError};
use crate::types::{GroupId, KeyValue, NodeId, Snapshot, TypeConfig, Vote};

/// Largest append-entries message sent in one piece; a bigger batch is cut
/// and the rest follows in the next message.
const APPEND_BUDGET_BYTES: usize = 8 * 1024 * 1024;
/// Snapshot bytes per message when openraft names no chunk size.
const DEFAULT_SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Why a peer RPC failed before a Raft answer came back.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer's address is not a valid URI.
    #[error("bad peer address {addr:?}: {detail}")]
    BadAddress {
        /// The address as given in the group membership.
        addr: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The request could not be encoded.
    #[error("cannot encode request: {0}")]
    Encode(String),
    /// The reply could not be decoded.
    #[error("cannot decode reply: {0}")]
    Decode(String),
    /// The gRPC call failed.
    #[error("gRPC call failed: {0}")]
    Status(#[from] tonic::Status),
    /// No answer within the deadline openraft gave.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer refused the message before it reached the group.
    #[error("peer refused the message ({code:?}): {message}")]
    Refused {
        /// The peer's error code.
        code: peer_error::Code,
        /// The peer's explanation.
        message: String,
    },
    /// The reply held neither a payload nor an error.
    #[error("empty reply")]
    EmptyReply,
}

/// One gRPC channel per peer node, shared by every group of this node.
pub struct PeerTransport {
    channels: Mutex<HashMap<NodeId, PeerLink>>,
    connect_timeout: Duration,
    routes: BTreeMap<NodeId, String>,
    stats: Arc<PeerStats>,
    tag: ClusterTag,
}

impl PeerTransport {
    /// A transport whose connection attempts give up after `connect_timeout`
    /// and which dials the peers in `routes` at the address given there
    /// instead of the one their group membership records. Every request
    /// carries `tag` once it is set.
    pub fn new(
        connect_timeout: Duration,
        routes: BTreeMap<NodeId, String>,
        tag: ClusterTag,
    ) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
            routes,
            stats: Arc::default(),
            tag,
        }
    }

    /// Counters of the appends sent to peers.
    pub fn stats(&self) -> &Arc<PeerStats> {
        &self.stats
    }

    /// The link to `target` at `addr` (or its route), creating its channel
    /// and append queue on first use.
    fn link(&self, target: NodeId, addr: &str) -> Result<PeerLink, TransportError> {
        let addr = self.routes.get(&target).map_or(addr, String::as_str);
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(link) = channels.get(&target) {
            if link.addr == addr {
                return Ok(link.clone());
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| {
            TransportError::BadAddress {
                addr: addr.to_string(),
                detail: e.to_string(),
            }
        })?;
        let channel = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client = RaftPeerClient::with_interceptor(channel, self.tag.clone())
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let link = PeerLink {
            addr: addr.to_string(),
            appends: AppendQueue::start(client.clone(), self.stats.clone(), self.tag.clone()),
            client,
        };
        channels.insert(target, link.clone());
        Ok(link)
    }
}

/// The channel to one peer and the queue of appends to it.
#[derive(Clone)]
struct PeerLink {
    addr: String,
    client: PeerClient,
    appends: AppendQueue,
}

impl PeerTransport {
    /// Forwards a write to `target`, which should lead `group`.
    pub(crate) async fn propose(
        &self,
        target: NodeId,
        addr: &str,
        group: GroupId,
        command: Vec<u8>,
        ttl: Duration,
    ) -> Result<Vec<u8>, WriteError> {
        let unreachable = |detail: String| WriteError::Unreachable {
            group,
            node: target,
            detail,
        };
        let mut client = self
            .link(target, addr)
            .map_err(|e| unreachable(e.to_string()))?
            .client;
        let command_len = command.len();
        let mut request = tonic::Request::new(ProposeRequest {
            group_id: group,
            command,
        });
        request.set_timeout(ttl);
        let reply = match tokio::time::timeout(ttl, client.propose(request)).await {
            Err(_) => return Err(unreachable(format!("no answer within {ttl:?}"))),
            Ok(Err(status)) => return Err(unreachable(status.to_string())),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        match reply.result {
            Some(propose_reply::Result::Response(response)) => Ok(response),
            Some(propose_reply::Result::Error(refusal)) => {
                Err(write_error(group, target, refusal, ttl, command_len))
            }
            None => Err(unreachable("empty reply".into())),
        }
    }

    /// Forwards a linearizable scan to `target`, which should lead `group`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn scan(
        &self,
        target: NodeId,
        addr: &str,
        group: GroupId,
        from: &[u8],
        to: &[u8],
        limit: usize,
        ttl: Duration,
    ) -> Result<Vec<KeyValue>, ReadError> {
        let unavailable = |detail: String| ReadError::Unavailable {
            group,
            detail: format!("node {target}: {detail}"),
        };
        let mut client = self
            .link(target, addr)
            .map_err(|e| unavailable(e.to_string()))?
            .client;
        let mut request = tonic::Request::new(ScanRequest {
            group_id: group,
            from: from.to_vec(),
            to: to.to_vec(),
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
        });
        request.set_timeout(ttl);
        let reply = match tokio::time::timeout(ttl, client.scan(request)).await {
            Err(_) => return Err(unavailable(format!("no answer within {ttl:?}"))),
            Ok(Err(status)) => return Err(unavailable(status.to_string())),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        match reply.error {
            Some(refusal) => Err(read_error(group, refusal)),
            None => Ok(reply
                .pairs
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect()),
        }
    }
}

/// The leader named in a refusal (node id 0 and an empty address mean unknown).
fn leader_of(refusal: &RouteError) -> (Option<NodeId>, Option<String>) {
    let leader = (refusal.leader_id != 0).then_some(refusal.leader_id);
    let addr = (!refusal.leader_addr.is_empty()).then(|| refusal.leader_addr.clone());
    (leader, addr)
}

fn write_error(
    group: GroupId,
    target: NodeId,
    refusal: RouteError,
    ttl: Duration,
    command_len: usize,
) -> WriteError {
    let (leader, leader_addr) = leader_of(&refusal);
    match route_error::Code::try_from(refusal.code).unwrap_or(route_error::Code::Unspecified) {
        route_error::Code::NotLeader => WriteError::NotLeader {
            group,
            leader,
            leader_addr,
        },
        route_error::Code::UnknownGroup => WriteError::UnknownGroup(group),
        route_error::Code::Timeout => WriteError::Timeout {
            group,
            timeout: ttl,
        },
        // The peer's limit is only in its message; ours let the command pass.
        route_error::Code::TooLarge => WriteError::TooLarge {
            size: command_len,
            limit: 0,
        },
        route_error::Code::Stopped
        | route_error::Code::Unavailable
        | route_error::Code::Unspecified => WriteError::Unreachable {
            group,
            node: target,
            detail: refusal.message,
        },
    }
}

fn read_error(group: GroupId, refusal: RouteError) -> ReadError {
    let (leader, leader_addr) = leader_of(&refusal);
    match route_error::Code::try_from(refusal.code).unwrap_or(route_error::Code::Unspecified) {
        route_error::Code::NotLeader => ReadError::NotLeader {
            group,
            leader,
            leader_addr,
        },
        route_error::Code::UnknownGroup => ReadError::UnknownGroup(group),
        _ => ReadError::Unavailable {
            group,
            detail: refusal.message,
        },
    }
}

/// openraft's network factory for one group: every client it makes shares the
/// node's [`PeerTransport`].
#[derive(Clone)]
pub(crate) struct GroupNetwork {
    group: GroupId,
    transport: Arc<PeerTransport>,
}

impl GroupNetwork {
    pub(crate) fn new(group: GroupId, transport: Arc<PeerTransport>) -> Self {
        Self { group, transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = GroupPeer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> GroupPeer {
        GroupPeer {
            group: self.group,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// The RPCs of one group to one peer.
pub(crate) struct GroupPeer {
    group: GroupId,
    target: NodeId,
    addr: String,
    transport: Arc<PeerTransport>,
}

/// Which RPC of the `RaftPeer` service to call.
#[derive(Clone, Copy, Debug)]
enum Rpc {
    Append,
    Vote,
    PreVote,
    Snapshot,
    TransferLeader,
}

type PeerRpcError = RPCError<TypeConfig>;

impl GroupPeer {
    /// Encodes `request`, sends it and decodes the group's answer.
    async fn call<Q, P>(&self, rpc: Rpc, request: &Q, ttl: Duration) -> Result<P, PeerRpcError>
    where
        Q: Serialize,
        P: DeserializeOwned,
    {
        let payload = encode(request).map_err(network)?;
        self.send(rpc, payload, ttl).await
    }

    /// Sends an encoded request and decodes the group's answer. A group that
    /// answered with an error (it stopped) counts as a network failure:
    /// openraft retries, and the peer is no different from one that is down.
    async fn send<P>(&self, rpc: Rpc, payload: Vec<u8>, ttl: Duration) -> Result<P, PeerRpcError>
    where
        P: DeserializeOwned,
    {
        let PeerLink {
            mut client,
            appends,
            ..
        } = self
            .transport
            .link(self.target, &self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let message = RaftMessage {
            group_id: self.group,
            payload,
        };
        let sent = async {
            if let Rpc::Append = rpc {
                return appends.append(message, ttl).await;
            }
            let mut message = tonic::Request::new(message);
            message.set_timeout(ttl);
            let reply = match rpc {
                Rpc::Append => client.append(message).await,
                Rpc::Vote => client.vote(message).await,
                Rpc::PreVote => client.pre_vote(message).await,
                Rpc::Snapshot => client.snapshot(message).await,
                Rpc::TransferLeader => client.transfer_leader(message).await,
            };
            reply.map(tonic::Response::into_inner)
        };
        let reply = match tokio::time::timeout(ttl, sent).await {
            Err(_) => return Err(network(TransportError::Timeout(ttl))),
            Ok(Err(status)) => return Err(from_status(status)),
            Ok(Ok(reply)) => reply,
        };
        match reply.result {
            Some(raft_reply::Result::Payload(bytes)) => {
                let answer: RemoteOutcome<P> = codec::decode(&bytes)
                    .map_err(|e| network(TransportError::Decode(e.to_string())))?;
                answer.map_err(|message| {
                    network(TransportError::Refused {
                        code: peer_error::Code::Unspecified,
                        message,
                    })
                })
            }
            Some(raft_reply::Result::Error(refusal)) => {
                let code = peer_error::Code::try_from(refusal.code)
                    .unwrap_or(peer_error::Code::Unspecified);
                let err = TransportError::Refused {
                    code,
                    message: refusal.message,
                };
                // A peer that does not host the group yet, or is stopping,
                // will be retried after openraft's backoff.
                match code {
                    peer_error::Code::UnknownGroup | peer_error::Code::ShuttingDown => {
                        Err(RPCError::Unreachable(Unreachable::new(&err)))
                    }
                    _ => Err(network(err)),
                }
            }
            None => Err(network(TransportError::EmptyReply)),
        }
    }
}

fn encode<Q: Serialize>(request: &Q) -> Result<Vec<u8>, TransportError> {
    codec::encode(request).map_err(|e| TransportError::Encode(e.to_string()))
}

fn network(err: TransportError) -> PeerRpcError {
    RPCError::Network(NetworkError::new(&err))
}

/// A failed connection means "back off"; anything else is worth a retry.
///
/// The peer's service answers refusals inside the reply, never as a gRPC
/// status, so a status comes from the transport: `Unavailable` (no
/// connection), `Cancelled` (the connection went away under the call, or
/// dialling timed out) and `Unknown` (a transport error) all say the peer
/// cannot be reached now. Retrying those at once made a leader spin on a
/// dead peer, thousands of failed calls and log lines a second.
/// `FailedPrecondition` is a peer of another cluster (see `cluster_tag`):
/// unreachable for as long as it runs.
fn from_status(status: tonic::Status) -> PeerRpcError {
    let unreachable = matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::FailedPrecondition
    );
    let err = TransportError::Status(status);
    if unreachable {
        RPCError::Unreachable(Unreachable::new(&err))
    } else {
        network(err)
    }
}

/// The same failure, as a snapshot transfer reports it.
fn streaming(err: PeerRpcError) -> StreamingError<TypeConfig> {
    match err {
        RPCError::Timeout(e) => StreamingError::Timeout(e),
        RPCError::Unreachable(e) => StreamingError::Unreachable(e),
        RPCError::Network(e) => StreamingError::Network(e),
        RPCError::RemoteError(e) => StreamingError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetworkV2<TypeConfig> for GroupPeer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, PeerRpcError> {
        let mut payload = encode(&rpc).map_err(network)?;
        let mut cut = false;
        while payload.len() > APPEND_BUDGET_BYTES && rpc.entries.len() > 1 {
            // Too big for one message: send the first half now; openraft
            // sends the rest next, from what the follower reports it holds.
            let keep = rpc.entries.len() / 2;
            rpc.entries.truncate(keep);
            let last = rpc.entries.last().map(|e| e.log_id);
            rpc.leader_commit = rpc.leader_commit.min(last);
            payload = encode(&rpc).map_err(network)?;
            cut = true;
        }
        let last = rpc.entries.last().map(|e| e.log_id);
        let response = self.send(Rpc::Append, payload, option.hard_ttl()).await?;
        Ok(match response {
            AppendEntriesResponse::Success if cut => AppendEntriesResponse::PartialSuccess(last),
            other => other,
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, PeerRpcError> {
        self.call(Rpc::Vote, &rpc, option.hard_ttl()).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, PeerRpcError> {
        self.call(Rpc::PreVote, &rpc, option.hard_ttl()).await
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, PeerRpcError> {
        self.call(Rpc::TransferLeader, &rpc, option.hard_ttl())
            .await
    }

    /// Sends the snapshot in chunks of openraft's chunk size; the follower
    /// installs it when the last one arrives.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut cancel = std::pin::pin!(cancel);
        let chunk_bytes = option
            .snapshot_chunk_size()
            .unwrap_or(DEFAULT_SNAPSHOT_CHUNK_BYTES)
            .max(1);
        let total = snapshot.snapshot.len();
        let mut offset = 0;
        loop {
            let end = (offset + chunk_bytes).min(total);
            let chunk = SnapshotChunk {
                vote,
                meta: snapshot.meta.clone(),
                offset: offset as u64,
                data: serde_bytes::ByteBuf::from(snapshot.snapshot[offset..end].to_vec()),
                done: end == total,
            };
            let sent = self.call::<_, Option<SnapshotResponse<TypeConfig>>>(
                Rpc::Snapshot,
                &chunk,
                option.hard_ttl(),
            );
            let answer = tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                answer = sent => answer.map_err(streaming)?,
            };
            match answer {
                Some(response) => return Ok(response),
                None if end == total => {
                    return Err(streaming(network(TransportError::EmptyReply)));
                }
                None => offset = end,
            }
        }
    }

    /// After an unreachable peer: retry soon (a restarted peer is back in
    /// well under a second), then less and less often, at most every 500 ms.
    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new(unreachable_backoff()))
    }
}

/// The waits before each retry to an unreachable peer: 50 ms, doubling to
/// 500 ms.
fn unreachable_backoff() -> impl Iterator<Item = Duration> + Send + 'static {
    (0u32..).map(|n| {
        Duration::from_millis(50u64.saturating_mul(1 << n.min(4))).min(UNREACHABLE_WAIT_MAX)
    })
}

/// The longest wait before retrying an unreachable peer.
const UNREACHABLE_WAIT_MAX: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_failures_are_unreachable_and_back_off() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::Cancelled,
            tonic::Code::Unknown,
        ] {
            let err = from_status(tonic::Status::new(code, "transport error"));
            assert!(matches!(err, RPCError::Unreachable(_)), "{code:?}: {err:?}");
        }
        let err = from_status(tonic::Status::new(tonic::Code::DeadlineExceeded, "slow"));
        assert!(matches!(err, RPCError::Network(_)), "{err:?}");
        let waits: Vec<u64> = unreachable_backoff()
            .take(7)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![50, 100, 200, 400, 500, 500, 500]);
    }
}
