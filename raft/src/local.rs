//! Serving a request on this node's own replica of a group: the path every
//! write and linearizable read takes on the node that leads the group, whether
//! the node's application asked or a peer forwarded it. Nothing here forwards.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::ForwardToLeader;

use crate::error::{ReadError, WriteError};
use crate::network::GroupTable;
use crate::proposer::Proposer;
use crate::read_rounds::ReadRounds;
use crate::storage::{self, Engine};
use crate::types::{GroupId, KeyValue, NodeId, Raft, TypeConfig};

/// Limits applied to every write, local or forwarded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriteLimits {
    /// How long a write may wait for its commit.
    pub(crate) timeout: Duration,
    /// Largest command accepted.
    pub(crate) max_command_bytes: usize,
}

/// The groups open on this node, their write queues and the storage they share.
pub(crate) struct LocalGroups {
    pub(crate) groups: GroupTable,
    proposers: RwLock<HashMap<GroupId, Proposer>>,
    reads: RwLock<HashMap<GroupId, Arc<ReadRounds>>>,
    engine: Engine,
    limits: WriteLimits,
}

impl LocalGroups {
    pub(crate) fn new(engine: Engine, limits: WriteLimits) -> Self {
        Self {
            groups: GroupTable::default(),
            proposers: RwLock::new(HashMap::new()),
            reads: RwLock::new(HashMap::new()),
            engine,
            limits,
        }
    }

    /// Hosts `group` and starts its write queue; false if it is already hosted.
    pub(crate) fn insert(&self, group: GroupId, raft: Raft) -> bool {
        if !self.groups.insert(group, raft.clone()) {
            return false;
        }
        self.reads
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                group,
                ReadRounds::new(group, raft.clone(), self.limits.timeout),
            );
        let proposer = Proposer::start(
            group,
            raft,
            self.limits.max_command_bytes,
            self.limits.timeout,
        );
        self.proposers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, proposer);
        true
    }

    /// Stops hosting every group (their write queues end) and returns them.
    pub(crate) fn drain(&self) -> Vec<(GroupId, Raft)> {
        self.proposers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.reads
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.groups.drain()
    }

    /// The node's storage.
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Proposes `command` to this node's replica of `group`, which must
    /// lead, through the group's write queue (see [`crate::proposer`]).
    pub(crate) async fn write(
        &self,
        group: GroupId,
        command: Vec<u8>,
    ) -> Result<Vec<u8>, WriteError> {
        let proposer = self
            .proposers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
            .ok_or(WriteError::UnknownGroup(group))?;
        if command.len() > self.limits.max_command_bytes {
            return Err(WriteError::TooLarge {
                size: command.len(),
                limit: self.limits.max_command_bytes,
            });
        }
        let timeout = self.limits.timeout;
        tokio::time::timeout(timeout, proposer.propose(command))
            .await
            .map_err(|_| WriteError::Timeout { group, timeout })?
    }

    /// Returns once this replica has confirmed, with a quorum, that it leads
    /// `group` and has applied everything committed before the call began.
    pub(crate) async fn linearize(&self, group: GroupId) -> Result<(), ReadError> {
        let rounds = self.rounds(group).ok_or(ReadError::UnknownGroup(group))?;
        rounds.linearize().await
    }

    /// Leadership confirmations run for `group`'s linearizable reads.
    pub(crate) fn read_rounds(&self, group: GroupId) -> u64 {
        self.rounds(group).map_or(0, |rounds| rounds.run())
    }

    fn rounds(&self, group: GroupId) -> Option<Arc<ReadRounds>> {
        self.reads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// Reads application key `key` of `group` from this replica.
    pub(crate) fn read(&self, group: GroupId, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        self.check_open(group)?;
        storage::read_state(&self.engine, group, key).map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// Up to `limit` application pairs of `group` in `[from, to)` from this replica.
    pub(crate) fn scan(
        &self,
        group: GroupId,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, ReadError> {
        self.check_open(group)?;
        storage::scan_state(&self.engine, group, from, to, limit)
            .map_err(|e| ReadError::Storage(e.to_string()))
    }

    /// A linearizable scan: only on the leader.
    pub(crate) async fn scan_linearized(
        &self,
        group: GroupId,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, ReadError> {
        self.linearize(group).await?;
        self.scan(group, from, to, limit)
    }

    /// The applied index and state digest of this replica of `group`.
    pub(crate) fn digest(&self, group: GroupId) -> Result<(u64, u64), ReadError> {
        self.check_open(group)?;
        storage::digest(&self.engine, group).map_err(|e| ReadError::Storage(e.to_string()))
    }

    fn check_open(&self, group: GroupId) -> Result<(), ReadError> {
        match self.groups.get(group) {
            Some(_) => Ok(()),
            None => Err(ReadError::UnknownGroup(group)),
        }
    }
}

/// The leader (id and peer address) an openraft refusal names, when known.
pub(crate) fn hint(forward: ForwardToLeader<TypeConfig>) -> (Option<NodeId>, Option<String>) {
    (forward.leader_id, forward.leader_node.map(|n| n.addr))
}
