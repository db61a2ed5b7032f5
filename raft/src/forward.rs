//! Reaching a group's leader from any node: [`GroupHost::propose`] and
//! [`GroupHost::scan`] serve locally when this node leads the group and
//! otherwise forward to the leader over the peer connection, following
//! "not leader" hints and backing off (bounded) while the group elects.
//!
//! A forwarded write whose answer is lost may still take effect, and
//! `propose` then tries again: commands sent through it must be idempotent
//! (FishChat's carry their own dedup keys). The deadline is the host's
//! `write_timeout`; past it the outcome is reported unknown.

use std::time::{Duration, Instant};

use crate::error::{ReadError, WriteError};
use crate::host::GroupHost;
use crate::types::{GroupId, KeyValue, NodeId};

/// First pause after a refusal that named no usable leader.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Where the next attempt goes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    /// This node's own replica.
    Local,
    /// A peer, by id and address.
    Peer(NodeId, String),
}

/// Attempt bookkeeping shared by writes and scans.
struct Attempts {
    deadline: Instant,
    backoff: Duration,
    target: Target,
}

impl Attempts {
    fn new(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now() + timeout,
            backoff: FIRST_BACKOFF,
            target: Target::Local,
        }
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Follows a refusal's leader hint; pauses when the hint is missing or
    /// points where we just were. Returns false once the deadline has passed.
    async fn follow(&mut self, me: NodeId, leader: Option<NodeId>, addr: Option<String>) -> bool {
        let next = match (leader, addr) {
            (Some(id), _) if id == me => Target::Local,
            (Some(id), Some(addr)) => Target::Peer(id, addr),
            _ => Target::Local,
        };
        if next == self.target || next == Target::Local {
            self.pause().await;
        }
        self.target = next;
        Instant::now() < self.deadline
    }

    /// Backs off, then asks this node again (it learns leaders from Raft).
    async fn retry_locally(&mut self) -> bool {
        self.pause().await;
        self.target = Target::Local;
        Instant::now() < self.deadline
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff.min(self.remaining())).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

impl GroupHost {
    /// Proposes `command` to `group` through its leader, wherever it is, and
    /// returns the state machine's response. The command must be idempotent
    /// (see the module documentation).
    #[tracing::instrument(level = "debug", skip(self, command), fields(node = self.node_id()))]
    pub async fn propose(&self, group: GroupId, command: Vec<u8>) -> Result<Vec<u8>, WriteError> {
        let timeout = self.write_timeout();
        let mut attempts = Attempts::new(timeout);
        loop {
            let outcome = match &attempts.target {
                Target::Local => self.write(group, command.clone()).await,
                Target::Peer(id, addr) => {
                    self.transport()
                        .propose(*id, addr, group, command.clone(), attempts.remaining())
                        .await
                }
            };
            let again = match outcome {
                Err(WriteError::NotLeader {
                    leader,
                    leader_addr,
                    ..
                }) => attempts.follow(self.node_id(), leader, leader_addr).await,
                Err(WriteError::Unreachable { .. } | WriteError::Timeout { .. }) => {
                    attempts.retry_locally().await
                }
                other => return other,
            };
            if !again {
                return Err(WriteError::Timeout { group, timeout });
            }
        }
    }

    /// Up to `limit` application pairs of `group` with keys in `[from, to)`,
    /// read linearizably at the group's leader, wherever it is.
    pub async fn scan(
        &self,
        group: GroupId,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, ReadError> {
        let mut attempts = Attempts::new(self.write_timeout());
        loop {
            let outcome = match &attempts.target {
                Target::Local => self.local().scan_linearized(group, from, to, limit).await,
                Target::Peer(id, addr) => {
                    self.transport()
                        .scan(*id, addr, group, from, to, limit, attempts.remaining())
                        .await
                }
            };
            let again = match outcome {
                Err(ReadError::NotLeader {
                    leader,
                    leader_addr,
                    ..
                }) => attempts.follow(self.node_id(), leader, leader_addr).await,
                Err(ReadError::Unavailable { .. }) => attempts.retry_locally().await,
                other => return other,
            };
            if !again {
                return Err(ReadError::Unavailable {
                    group,
                    detail: "no leader answered before the deadline".into(),
                });
            }
        }
    }
}
