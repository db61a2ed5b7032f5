//! The openraft type configuration shared by every group.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a node of the cluster. Stable for the life of its data directory.
pub type NodeId = u64;

/// Identifies a Raft group (a shard or the meta group) across the cluster.
pub type GroupId = u64;

/// One application key and its value, as a scan returns them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// An opaque command for a group's state machine, as proposed by the application.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// What a state machine answered for one applied [`Command`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The payload of one Raft entry: the commands proposed together, applied
/// one after another in this order, in one storage transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

/// The answers to a [`Batch`], one per command, in its order (none for an
/// entry that carries no commands: a blank or a membership change).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Responses(pub Vec<Response>);

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes: usize = self.0.iter().map(|c| c.0.len()).sum();
        write!(f, "Batch({} commands, {bytes} bytes)", self.0.len())
    }
}

openraft::declare_raft_types!(
    /// openraft types for every FishChat Raft group.
    pub TypeConfig:
        D = Batch,
        R = Responses,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft log entry of any group.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// A log id (term, leader, index) of any group.
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote (term, candidate, committed) of any group.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A group's membership as stored with the log id that introduced it.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// A snapshot's metadata: the last log id and membership it covers.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// A built or received snapshot: its metadata and the bytes of the state.
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Vec<u8>>;
/// The openraft handle of one group.
pub type Raft = openraft::Raft<TypeConfig, crate::storage::GroupStateStore>;
