//! The receiving side: dispatches peer messages to the groups of this node.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use fishchat_proto::peer::raft_peer_server::RaftPeer;
use fishchat_proto::peer::{peer_error, raft_reply, PeerError, RaftMessage, RaftReply};
use openraft::error::RaftError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Status};

use crate::codec;
use crate::types::{GroupId, NodeId, Raft};

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

/// The `RaftPeer` gRPC service of one node.
pub struct PeerService {
    groups: Arc<GroupTable>,
}

impl PeerService {
    /// Serves the groups in `groups`.
    pub fn new(groups: Arc<GroupTable>) -> Self {
        Self { groups }
    }

    /// Decodes `message` for its group, runs `handle`, encodes the outcome.
    async fn dispatch<Q, P, E, F, Fut>(&self, message: RaftMessage, handle: F) -> RaftReply
    where
        Q: DeserializeOwned,
        P: Serialize,
        E: Serialize + std::error::Error,
        F: FnOnce(Raft, Q) -> Fut,
        Fut: Future<Output = Result<P, RaftError<NodeId, E>>>,
    {
        let Some(raft) = self.groups.get(message.group_id) else {
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
        let outcome = handle(raft, request).await;
        match codec::encode(&outcome) {
            Ok(bytes) => RaftReply {
                result: Some(raft_reply::Result::Payload(bytes)),
            },
            Err(e) => refusal(peer_error::Code::Unspecified, e.to_string()),
        }
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
        let reply = self
            .dispatch(request.into_inner(), |raft, rpc| async move {
                raft.append_entries(rpc).await
            })
            .await;
        Ok(tonic::Response::new(reply))
    }

    async fn vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let reply = self
            .dispatch(request.into_inner(), |raft, rpc| async move {
                raft.vote(rpc).await
            })
            .await;
        Ok(tonic::Response::new(reply))
    }

    async fn snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftReply>, Status> {
        let reply = self
            .dispatch(request.into_inner(), |raft, rpc| async move {
                raft.install_snapshot(rpc).await
            })
            .await;
        Ok(tonic::Response::new(reply))
    }
}
