//! The receiving side: dispatches peer messages to the groups of this node.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fishchat_proto::peer::raft_peer_server::RaftPeer;
use fishchat_proto::peer::{
    peer_error, propose_reply, raft_reply, route_error, KeyValue, PeerError, ProposeReply,
    ProposeRequest, RaftMessage, RaftMessages, RaftReplies, RaftReply, RouteError, ScanReply,
    ScanRequest,
};
use futures::future::join_all;
use openraft::raft::{SnapshotResponse, TransferLeaderRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status, Streaming};

use super::batch::MAX_BATCH;
use super::stand::Stand;
use super::{ClusterTag, RemoteOutcome, SnapshotChunk, CLUSTER_HEADER};
use crate::codec;
use crate::error::{ReadError, WriteError};
use crate::local::LocalGroups;
use crate::types::{GroupId, NodeId, Raft, Snapshot, TypeConfig};

/// The groups this node hosts, by id. Read on every peer message; written only
/// when a group is opened or the node stops.
#[derive(Default)]
pub struct GroupTable {
    groups: RwLock<HashMap<GroupId, Raft>>,
}

impl GroupTable {
    /// The group's Raft handle, if this node hosts it.
    pub fn get(&self, group: GroupId) -> Option<Raft> {
        self.groups
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&group)
            .cloned()
    }

    /// Adds a group; returns false if one with that id is already hosted.
    pub(crate) fn insert(&self, group: GroupId, raft: Raft) -> bool {
        let mut groups = self
            .groups
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if groups.contains_key(&group) {
            return false;
        }
        groups.insert(group, raft);
        true
    }

    /// Removes and returns every group.
    pub(crate) fn drain(&self) -> Vec<(GroupId, Raft)> {
        self.groups
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .drain()
            .collect()
    }

    /// The ids of every hosted group, in order.
    pub fn ids(&self) -> Vec<GroupId> {
        let mut ids: Vec<GroupId> = self
            .groups
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// The `RaftPeer` gRPC service of one node. Clones share everything: an
/// append stream is served by a task of its own.
#[derive(Clone)]
pub(crate) struct PeerService {
    local: Arc<LocalGroups>,
    stand: Arc<Stand>,
    /// Per group, the snapshot being received, piece by piece.
    receiving: Arc<Mutex<HashMap<GroupId, SnapshotChunk>>>,
    /// Turns true when the node stops: open append streams end, so the
    /// server's graceful shutdown does not wait for peers to close them.
    closing: watch::Receiver<bool>,
    /// This node's cluster tag: an append stream's opening tag is checked
    /// against it with every message (it may have been set since).
    tag: ClusterTag,
}

impl PeerService {
    /// Serves the groups open in `local`, whose leaders hold a lease of
    /// `lease` (openraft: election_max), until `closing` turns true.
    pub(crate) fn new(
        local: Arc<LocalGroups>,
        lease: Duration,
        closing: watch::Receiver<bool>,
        tag: ClusterTag,
    ) -> Self {
        Self {
            local,
            stand: Arc::new(Stand::new(lease)),
            receiving: Arc::new(Mutex::new(HashMap::new())),
            closing,
            tag,
        }
    }

    /// Decodes `message` for its group, runs `handle`, encodes the outcome.
    /// Hands one group its append and answers with the group's reply.
    async fn append_one(&self, message: RaftMessage) -> RaftReply {
        let group = message.group_id;
        self.dispatch(message, |raft, rpc| async move {
            let outcome = raft.append_entries(rpc).await;
            if let Ok(response) = &outcome {
                self.stand.appended(group, response);
            }
            outcome
        })
        .await
    }

    /// Hands each append of one stream message to its group, all at once,
    /// and answers with their replies in order.
    async fn append_batch(&self, batch: RaftMessages) -> Result<RaftReplies, Status> {
        if batch.messages.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} appends in one message; at most {MAX_BATCH}",
                batch.messages.len()
            )));
        }
        let replies = join_all(batch.messages.into_iter().map(|m| self.append_one(m))).await;
        Ok(RaftReplies { replies })
    }

    /// Serves one append stream, opened with the cluster tag `theirs`:
    /// reads a message, answers it, reads the next, until the sender closes
    /// the stream or goes away, this node stops, or the tags differ.
    async fn serve_append_stream(
        self,
        theirs: Option<MetadataValue<Ascii>>,
        mut incoming: Streaming<RaftMessages>,
        replies: mpsc::Sender<Result<RaftReplies, Status>>,
    ) {
        let mut closing = self.closing.clone();
        loop {
            let next = tokio::select! {
                next = incoming.message() => next,
                _ = closing.wait_for(|closing| *closing) => return,
            };
            let batch = match next {
                Ok(Some(batch)) => batch,
                Ok(None) => return,
                Err(status) => {
                    tracing::debug!(%status, "append stream from a peer broke");
                    return;
                }
            };
            let answer = match self.tag.admits(theirs.as_ref()) {
                Ok(()) => self.append_batch(batch).await,
                Err(refusal) => Err(refusal),
            };
            let refused = answer.is_err();
            if replies.send(answer).await.is_err() || refused {
                return;
            }
        }
    }

    async fn dispatch<Q, P, E, F, Fut>(&self, message: RaftMessage, handle: F) -> RaftReply
    where
        Q: DeserializeOwned,
        P: Serialize,
        E: std::fmt::Display,
        F: FnOnce(Raft, Q) -> Fut,
        Fut: Future<Output = Result<P, E>>,
    {
        let Some(raft) = self.local.groups.get(message.group_id) else {
            return refusal(
                peer_error::Code::UnknownGroup,
                format!("this node hosts no group {}", message.group_id),
            );
        };
        let request: Q = match codec::decode(&message.payload) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(group = message.group_id, error = %e, "undecodable peer message");
                return refusal(peer_error::Code::BadPayload, e.to_string());
            }
        };
        let outcome: RemoteOutcome<P> = handle(raft, request).await.map_err(|e| e.to_string());
        match codec::encode(&outcome) {
            Ok(bytes) => RaftReply {
                result: Some(raft_reply::Result::Payload(bytes)),
            },
            Err(e) => refusal(peer_error::Code::Unspecified, e.to_string()),
        }
    }
}

impl PeerService {
    /// Adds one piece of a snapshot for `group`; on the last piece, installs
    /// the whole snapshot and returns the group's answer. A piece that does
    /// not continue the snapshot being gathered is refused, and the leader
    /// starts the transfer over.
    async fn receive_snapshot(
        &self,
        group: GroupId,
        raft: &Raft,
        chunk: SnapshotChunk,
    ) -> Result<Option<SnapshotResponse<TypeConfig>>, String> {
        let complete = {
            let mut receiving = self.receiving.lock().unwrap_or_else(|p| p.into_inner());
            if chunk.offset == 0 {
                receiving.remove(&group);
            }
            let gathered = match receiving.remove(&group) {
                None if chunk.offset == 0 => chunk,
                None => {
                    return Err(format!(
                        "snapshot piece at {} without a start",
                        chunk.offset
                    ))
                }
                Some(mut gathered) => {
                    let continues = gathered.vote == chunk.vote
                        && gathered.meta == chunk.meta
                        && gathered.data.len() as u64 == chunk.offset;
                    if !continues {
                        return Err(format!(
                            "snapshot piece at {} does not continue the one received",
                            chunk.offset
                        ));
                    }
                    gathered.data.extend_from_slice(&chunk.data);
                    gathered.done = chunk.done;
                    gathered
                }
            };
            if !gathered.done {
                receiving.insert(group, gathered);
                return Ok(None);
            }
            gathered
        };
        let snapshot = Snapshot {
            meta: complete.meta,
            snapshot: complete.data.into_vec(),
        };
        raft.install_full_snapshot(complete.vote, snapshot)
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

fn refusal(code: peer_error::Code, message: String) -> RaftReply {
    RaftReply {
        result: Some(raft_reply::Result::Error(PeerError {
            code: code as i32,
            message,
        })),
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let reply = self.append_one(request.into_inner()).await;
        Ok(tonic::Response::new(reply))
    }

    type AppendStreamStream = ReceiverStream<Result<RaftReplies, Status>>;

    async fn append_stream(
        &self,
        request: Request<Streaming<RaftMessages>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, Status> {
        // One answer is out at a time: the sender waits for it before its
        // next message.
        let (replies, answers) = mpsc::channel(1);
        let theirs = request.metadata().get(CLUSTER_HEADER).cloned();
        tokio::spawn(
            self.clone()
                .serve_append_stream(theirs, request.into_inner(), replies),
        );
        Ok(tonic::Response::new(ReceiverStream::new(answers)))
    }

    async fn vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let message = request.into_inner();
        let group = message.group_id;
        let reply = self
            .dispatch(message, |raft, rpc: VoteRequest<TypeConfig>| async move {
                let outcome = raft.vote(rpc.clone()).await;
                if let Ok(response) = &outcome {
                    self.stand.after_vote(group, &raft, &rpc, response).await;
                }
                outcome
            })
            .await;
        Ok(tonic::Response::new(reply))
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let reply = self
            .dispatch(
                request.into_inner(),
                |raft, rpc: VoteRequest<TypeConfig>| async move { raft.pre_vote(rpc).await },
            )
            .await;
        Ok(tonic::Response::new(reply))
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let reply = self
            .dispatch(
                request.into_inner(),
                |raft, rpc: TransferLeaderRequest<TypeConfig>| async move {
                    raft.handle_transfer_leader(rpc).await
                },
            )
            .await;
        Ok(tonic::Response::new(reply))
    }

    async fn snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let message = request.into_inner();
        let group = message.group_id;
        let reply = self
            .dispatch(message, |raft, chunk: SnapshotChunk| async move {
                self.receive_snapshot(group, &raft, chunk).await
            })
            .await;
        Ok(tonic::Response::new(reply))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<tonic::Response<ProposeReply>, Status> {
        let request = request.into_inner();
        let result = match self.local.write(request.group_id, request.command).await {
            Ok(response) => propose_reply::Result::Response(response),
            Err(e) => propose_reply::Result::Error(write_refusal(&e)),
        };
        Ok(tonic::Response::new(ProposeReply {
            result: Some(result),
        }))
    }

    async fn scan(
        &self,
        request: Request<ScanRequest>,
    ) -> Result<tonic::Response<ScanReply>, Status> {
        let request = request.into_inner();
        let limit = usize::try_from(request.limit).unwrap_or(usize::MAX);
        let scanned = self
            .local
            .scan_linearized(request.group_id, &request.from, &request.to, limit)
            .await;
        let reply = match scanned {
            Ok(pairs) => ScanReply {
                pairs: pairs
                    .into_iter()
                    .map(|(key, value)| KeyValue { key, value })
                    .collect(),
                error: None,
            },
            Err(e) => ScanReply {
                pairs: Vec::new(),
                error: Some(read_refusal(&e)),
            },
        };
        Ok(tonic::Response::new(reply))
    }
}

/// A refused write as it crosses the wire.
fn write_refusal(err: &WriteError) -> RouteError {
    let (code, leader, addr) = match err {
        WriteError::NotLeader {
            leader,
            leader_addr,
            ..
        } => (route_error::Code::NotLeader, *leader, leader_addr.clone()),
        WriteError::UnknownGroup(_) => (route_error::Code::UnknownGroup, None, None),
        WriteError::TooLarge { .. } => (route_error::Code::TooLarge, None, None),
        WriteError::Timeout { .. } | WriteError::Unreachable { .. } => {
            (route_error::Code::Timeout, None, None)
        }
        WriteError::Stopped { .. } => (route_error::Code::Stopped, None, None),
    };
    route_error(code, err.to_string(), leader, addr)
}

/// A refused read as it crosses the wire.
fn read_refusal(err: &ReadError) -> RouteError {
    let (code, leader, addr) = match err {
        ReadError::NotLeader {
            leader,
            leader_addr,
            ..
        } => (route_error::Code::NotLeader, *leader, leader_addr.clone()),
        ReadError::UnknownGroup(_) => (route_error::Code::UnknownGroup, None, None),
        ReadError::Storage(_) | ReadError::Unavailable { .. } => {
            (route_error::Code::Unavailable, None, None)
        }
    };
    route_error(code, err.to_string(), leader, addr)
}

fn route_error(
    code: route_error::Code,
    message: String,
    leader: Option<NodeId>,
    leader_addr: Option<String>,
) -> RouteError {
    RouteError {
        code: code as i32,
        message,
        leader_id: leader.unwrap_or(0),
        leader_addr: leader_addr.unwrap_or_default(),
    }
}
