//! Errors of the group host, one enum per surface.

use std::time::Duration;

use crate::types::{GroupId, NodeId};

/// Starting the host or managing its groups failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// RocksDB could not be opened or read.
    #[error("storage: {0}")]
    Storage(String),
    /// The peer port could not be bound.
    #[error("cannot listen for peers on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The Raft settings are invalid.
    #[error("invalid Raft settings: {0}")]
    Config(String),
    /// The group is already open on this host.
    #[error("group {0} is already open")]
    GroupExists(GroupId),
    /// This host does not host the group.
    #[error("this node hosts no group {0}")]
    UnknownGroup(GroupId),
    /// The group was initialised before (on this or another node).
    #[error("group {0} is already initialised")]
    AlreadyInitialized(GroupId),
    /// A membership change was refused.
    #[error("membership change of group {group} failed: {detail}")]
    Membership {
        /// The group.
        group: GroupId,
        /// openraft's explanation.
        detail: String,
    },
    /// The awaited condition did not hold in time.
    #[error("group {group}: {what} not reached within {timeout:?}")]
    Timeout {
        /// The group.
        group: GroupId,
        /// What was awaited.
        what: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The host is shutting down or a group stopped on a fatal error.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// A write could not be committed. [`WriteError::is_retryable`] says whether
/// sending it again (to the same or another node) may succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// This node does not lead the group; `leader` leads it when known.
    #[error("group {group}: not the leader (leader: {leader:?} at {leader_addr:?})")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The current leader, when this node knows it.
        leader: Option<NodeId>,
        /// The leader's peer address, when known.
        leader_addr: Option<String>,
    },
    /// This node hosts no such group.
    #[error("this node hosts no group {0}")]
    UnknownGroup(GroupId),
    /// The command is larger than the host accepts.
    #[error("command of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The command's size.
        size: usize,
        /// `HostConfig::max_command_bytes` (0 when a peer refused it).
        limit: usize,
    },
    /// No commit within the deadline: the write may or may not take effect.
    #[error("group {group}: write not committed within {timeout:?} (outcome unknown)")]
    Timeout {
        /// The group.
        group: GroupId,
        /// The deadline.
        timeout: Duration,
    },
    /// A forwarded write got no answer from `node`: it may or may not take
    /// effect, like a timeout.
    #[error("group {group}: node {node} did not answer a forwarded write: {detail}")]
    Unreachable {
        /// The group.
        group: GroupId,
        /// The node the write was forwarded to.
        node: NodeId,
        /// What failed.
        detail: String,
    },
    /// The group stopped (shutdown, or a fatal storage error).
    #[error("group {group} stopped: {detail}")]
    Stopped {
        /// The group.
        group: GroupId,
        /// Why.
        detail: String,
    },
}

impl WriteError {
    /// True when the same write may succeed if sent again, here or elsewhere.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. } | Self::Timeout { .. } | Self::Unreachable { .. }
        )
    }
}

/// A read could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A linearizable read must go to the leader; `leader` when known.
    #[error("group {group}: not the leader (leader: {leader:?} at {leader_addr:?})")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The current leader, when known.
        leader: Option<NodeId>,
        /// The leader's peer address, when known.
        leader_addr: Option<String>,
    },
    /// This node hosts no such group.
    #[error("this node hosts no group {0}")]
    UnknownGroup(GroupId),
    /// Reading the state failed.
    #[error("storage: {0}")]
    Storage(String),
    /// The group stopped or could not confirm leadership in time.
    #[error("group {group}: {detail}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Why.
        detail: String,
    },
}
