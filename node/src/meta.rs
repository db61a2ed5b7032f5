//! The meta group (Raft group 0): what the cluster is.
//!
//! It holds one record, written once when the cluster is formed: a random
//! cluster id, the shard count and the nodes (id → peer address). Shard
//! placement is "every shard on every node" (DESIGN's three-node layout), so
//! the node list is the placement. Every node proposes the record it was
//! started with; the first one committed wins and every node compares its own
//! settings with it, so a node started with another shard count or peer list
//! says so loudly instead of serving a different cluster.
//!
//! Leaders are not stored here: nodes learn them from Raft.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fishchat_raft::{ApplyError, GroupHost, GroupId, StateMachine, StateTxn};
use serde::{Deserialize, Serialize};

/// The meta group's id.
pub const META_GROUP: GroupId = 0;

const RECORD_KEY: &[u8] = b"cluster";

/// What the cluster is, as formed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Random id chosen when the cluster was formed (hex).
    pub cluster_id: String,
    /// Number of shards.
    pub shards: u32,
    /// Every node: id → peer address.
    pub nodes: BTreeMap<u64, String>,
    /// When the cluster was formed, ms since the Unix epoch.
    pub formed_ms: u64,
}

/// The meta group's state machine: the first `ClusterRecord` proposed is
/// kept; later proposals are answered with it.
pub struct MetaMachine;

impl StateMachine for MetaMachine {
    fn apply(&mut self, command: &[u8], state: &mut dyn StateTxn) -> Result<Vec<u8>, ApplyError> {
        if let Some(existing) = state.get(RECORD_KEY)? {
            return Ok(existing);
        }
        // A command that is not a record changes nothing; the proposer sees
        // an empty answer. Only nodes propose here.
        if rmp_serde::from_slice::<ClusterRecord>(command).is_err() {
            return Ok(Vec::new());
        }
        state.put(RECORD_KEY, command);
        Ok(command.to_vec())
    }
}

/// The record as this node's replica of the meta group holds it (from an
/// earlier start), if any. One that cannot be read is logged and left to
/// [`settle`], which reports it too.
pub fn stored(host: &GroupHost) -> Option<ClusterRecord> {
    let bytes = host
        .read_local(META_GROUP, RECORD_KEY)
        .map_err(|e| tracing::error!(error = %e, "cannot read the stored cluster record"))
        .ok()??;
    rmp_serde::from_slice(&bytes)
        .map_err(|e| tracing::error!(error = %e, "the stored cluster record does not decode"))
        .ok()
}

/// Proposes this node's view of the cluster until the meta group answers,
/// then checks it against the record that won. Returns the record.
pub async fn settle(host: Arc<GroupHost>, mine: ClusterRecord) -> Option<ClusterRecord> {
    let command = match rmp_serde::to_vec_named(&mine) {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the cluster record");
            return None;
        }
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match host.propose(META_GROUP, command.clone()).await {
            Ok(answer) => match rmp_serde::from_slice::<ClusterRecord>(&answer) {
                Ok(record) => {
                    if record.shards != mine.shards || record.nodes != mine.nodes {
                        tracing::error!(
                            cluster = %record.cluster_id,
                            formed_shards = record.shards,
                            my_shards = mine.shards,
                            formed_nodes = ?record.nodes,
                            my_nodes = ?mine.nodes,
                            "this node's settings differ from the cluster it belongs to"
                        );
                    } else {
                        tracing::info!(cluster = %record.cluster_id, "cluster record settled");
                    }
                    return Some(record);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the meta group holds no valid record");
                    return None;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "meta group not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use fishchat_raft::MemoryState;

    use super::*;

    fn record(id: &str, shards: u32) -> ClusterRecord {
        ClusterRecord {
            cluster_id: id.into(),
            shards,
            nodes: BTreeMap::from([(1, "127.0.0.1:7111".into())]),
            formed_ms: 1,
        }
    }

    #[test]
    fn the_first_record_wins_and_garbage_changes_nothing() {
        let mut state = MemoryState::default();
        let mut machine = MetaMachine;
        assert_eq!(
            machine.apply(b"garbage", &mut state).expect("apply"),
            Vec::<u8>::new()
        );
        assert!(state.0.is_empty());
        let first = rmp_serde::to_vec_named(&record("aa", 16)).expect("encode");
        let second = rmp_serde::to_vec_named(&record("bb", 8)).expect("encode");
        assert_eq!(machine.apply(&first, &mut state).expect("apply"), first);
        assert_eq!(
            machine.apply(&second, &mut state).expect("apply"),
            first,
            "a later record is answered with the first"
        );
    }
}
