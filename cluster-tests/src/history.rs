//! What a chaos run records, and what it reads back at the end.
//!
//! A run's clients record every send they make in a [`History`]: the send is
//! *invoked* (written down before the request leaves) and later *completed*
//! with its [`Outcome`]: `Ok` with the server's answer, `Failed` for a
//! definite refusal (nothing happened), or `Unknown` when the client cannot
//! tell (a timeout, a lost connection). An op never completed (the run ended
//! first) stays `Unknown`.
//!
//! Every invocation and completion also takes the next number of one counter,
//! under the same lock that records it: `complete_index` of op A below
//! `invoke_index` of op B means A's answer had arrived before B was sent. The
//! checker orders ops by these numbers; the millisecond times, which tie on a
//! fast machine, are for people reading the history.
//!
//! After the faults stop, the run reads back what the cluster holds: every
//! user's inbox, possibly through several nodes, and every node's per-shard
//! applied index and digest from `/status`. That is the [`Observed`] state,
//! which [`crate::checker::check`] judges against the history.
//!
//! A send is identified by its body: the run gives every send a body of its
//! own, and a retry of a send (same sender, same `client_msg_id`) carries the
//! same body. The checker relies on this.
//!
//! Everything here is plain data with serde, so a failed run's history and
//! final state can be saved as JSON and checked again later.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A user's id.
pub type UserId = u64;
/// A group's id.
pub type GroupId = u64;
/// A node's id (1-based).
pub type NodeId = u64;
/// A shard's number.
pub type ShardId = u32;
/// The members of each group, fixed for the whole run (set up before it).
pub type GroupMembers = BTreeMap<GroupId, BTreeSet<UserId>>;

/// The id of one op of a history: its position, from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(pub u64);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op {}", self.0)
    }
}

/// Whom a send goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// One user's inbox.
    User(UserId),
    /// Every member of a group.
    Group(GroupId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::User(user) => write!(f, "user {user}"),
            Target::Group(group) => write!(f, "group {group}"),
        }
    }
}

/// How a send ended, as its client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged. `version` is the entry's version in the recipient's
    /// inbox for a send to a user, its group_seq for a send to a group.
    Ok {
        /// The message's cluster-wide id.
        message_id: u64,
        /// Recipient's version (user send) or group_seq (group send).
        version: u64,
    },
    /// A definite refusal: nothing was stored.
    Failed {
        /// The error code the server gave.
        code: String,
    },
    /// The client cannot tell whether it was stored.
    Unknown {
        /// Why not: timeout, lost connection, never completed.
        why: String,
    },
}

/// One send a client made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Unique in the history.
    pub id: OpId,
    /// The client (worker) that made it.
    pub client: u64,
    /// The user it was sent as.
    pub sender: UserId,
    /// Whom it was sent to.
    pub target: Target,
    /// The client's idempotency key; a retry reuses it.
    pub client_msg_id: String,
    /// The message text, unique to this send (and to its retries).
    pub body: String,
    /// When it was invoked, in ms since the history began.
    pub invoked_ms: u64,
    /// When it completed, in ms since the history began (`None`: never).
    pub completed_ms: Option<u64>,
    /// Position of the invocation among all invocations and completions.
    pub invoke_index: u64,
    /// Position of the completion among all invocations and completions.
    pub complete_index: Option<u64>,
    /// How it ended; `Unknown` until completed.
    pub outcome: Outcome,
}

impl Op {
    /// The message id and version of an acknowledged send.
    pub fn ack(&self) -> Option<(u64, u64)> {
        match self.outcome {
            Outcome::Ok {
                message_id,
                version,
            } => Some((message_id, version)),
            _ => None,
        }
    }
}

/// The ops of a run, recorded by many clients at once. Clones share it.
#[derive(Clone, Debug)]
pub struct History {
    start: Instant,
    log: Arc<Mutex<Log>>,
}

#[derive(Debug, Default)]
struct Log {
    ops: Vec<Op>,
    /// Invocations and completions recorded so far.
    events: u64,
    own_reads: Vec<OwnRead>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            log: Arc::new(Mutex::new(Log::default())),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records that `client`, as `sender`, is about to send `body` to
    /// `target` with `client_msg_id`. Call it before the request leaves.
    pub fn invoke(
        &self,
        client: u64,
        sender: UserId,
        target: Target,
        client_msg_id: &str,
        body: &str,
    ) -> OpId {
        let invoked_ms = self.now_ms();
        let mut log = self.lock();
        let id = OpId(log.ops.len() as u64);
        let invoke_index = log.events;
        log.events += 1;
        log.ops.push(Op {
            id,
            client,
            sender,
            target,
            client_msg_id: client_msg_id.to_string(),
            body: body.to_string(),
            invoked_ms,
            completed_ms: None,
            invoke_index,
            complete_index: None,
            outcome: Outcome::Unknown {
                why: "never completed".to_string(),
            },
        });
        id
    }

    /// Records how op `id` ended. Call it as soon as the answer (or the
    /// give-up) is in hand.
    ///
    /// # Panics
    /// If `id` was not returned by [`History::invoke`] or is completed
    /// already: both are bugs of the run, not of the cluster.
    pub fn complete(&self, id: OpId, outcome: Outcome) {
        let completed_ms = self.now_ms();
        let mut log = self.lock();
        let complete_index = log.events;
        log.events += 1;
        let Some(op) = usize::try_from(id.0).ok().and_then(|i| log.ops.get_mut(i)) else {
            panic!("{id} was never invoked");
        };
        assert!(op.complete_index.is_none(), "{id} completed twice");
        op.completed_ms = Some(completed_ms);
        op.complete_index = Some(complete_index);
        op.outcome = outcome;
    }

    /// A copy of every op so far, in invocation order.
    /// Records a sender's sync right after an acknowledgement.
    pub fn own_read(&self, read: OwnRead) {
        self.lock().own_reads.push(read);
    }

    /// Every sender's sync after an acknowledgement so far.
    pub fn own_reads(&self) -> Vec<OwnRead> {
        self.lock().own_reads.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn ops(&self) -> Vec<Op> {
        self.lock().ops.clone()
    }

    /// How the ops so far ended (one not completed yet counts as unknown),
    /// counted under the lock, without copying the history.
    pub fn counts(&self) -> crate::checker::Counts {
        crate::checker::counts(&self.lock().ops)
    }

    /// Writes every op so far to `path`, one JSON object a line.
    pub fn write_jsonl(&self, path: &Path) -> anyhow::Result<()> {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        for op in self.ops() {
            serde_json::to_writer(&mut out, &op)?;
            out.write_all(b"\n")?;
        }
        out.flush()
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Reads ops written by [`History::write_jsonl`].
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Op>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut ops = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let op = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not an op", path.display(), n + 1))?;
        ops.push(op);
    }
    Ok(ops)
}

/// One entry of a user's inbox, as read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Position in the inbox, from 1.
    pub version: u64,
    /// The message's cluster-wide id.
    pub message_id: u64,
    /// Who sent it (or made the membership change).
    pub sender_id: UserId,
    /// Whom it was sent to (for a group entry: the inbox owner).
    pub recipient_id: UserId,
    /// The message text (lossy UTF-8 of the bytes); empty for an event.
    pub body: String,
    /// Its group, or 0 for a message to one user.
    pub group_id: GroupId,
    /// Its position in the group's order, or 0 for a message to one user.
    pub group_seq: u64,
    /// A change of group membership, not a message.
    pub is_event: bool,
}

/// A user's whole inbox as read through one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxRead {
    /// The node it was read through.
    pub node: NodeId,
    /// Every entry, in the order read (by version).
    pub entries: Vec<InboxEntry>,
}

/// One node's replica of one shard, from its `/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardReplica {
    /// The shard.
    pub shard: ShardId,
    /// The applied index the digest was taken at (`/status` `digest_index`).
    pub applied: u64,
    /// The digest of the shard's state at `applied` (hex).
    pub digest: String,
}

/// A sender's sync right after one of its sends was acknowledged: G4 says
/// it must hold the sender's copy (read your writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnRead {
    /// The acknowledged send.
    pub op: OpId,
    /// Its sender, whose inbox was synced.
    pub user: UserId,
    /// The message the ack named.
    pub message_id: u64,
    /// Whether the sync held it.
    pub found: bool,
}

/// What the cluster holds when the run is over.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Each user's inbox, read through one or more nodes.
    pub inboxes: BTreeMap<UserId, Vec<InboxRead>>,
    /// Each node's replicas.
    pub replicas: BTreeMap<NodeId, Vec<ShardReplica>>,
    /// What each watching client's SDK (`Client::incoming`, fed by pushed
    /// entries and syncs) gave it during and after the run, in order.
    #[serde(default)]
    pub delivered: BTreeMap<UserId, Vec<InboxEntry>>,
    /// The senders' syncs right after acknowledgements, made during the run.
    #[serde(default)]
    pub own_reads: Vec<OwnRead>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_and_complete_are_numbered_in_the_order_they_happen() {
        let history = History::new();
        let a = history.invoke(0, 1, Target::User(2), "m-a", "a");
        let b = history.invoke(1, 3, Target::Group(10), "m-b", "b");
        history.complete(
            b,
            Outcome::Failed {
                code: "NOT_A_MEMBER".into(),
            },
        );
        let ops = history.ops();
        assert_eq!((ops[0].id, ops[1].id), (a, b));
        assert_eq!(ops[0].invoke_index, 0);
        assert_eq!(ops[1].invoke_index, 1);
        assert_eq!(ops[1].complete_index, Some(2));
        assert_eq!(ops[0].complete_index, None);
        assert!(matches!(ops[0].outcome, Outcome::Unknown { .. }));
    }

    #[test]
    fn history_survives_a_round_trip_through_json_lines() -> anyhow::Result<()> {
        let history = History::new();
        let a = history.invoke(0, 1, Target::User(2), "m-a", "a");
        history.complete(
            a,
            Outcome::Ok {
                message_id: 7,
                version: 1,
            },
        );
        let b = history.invoke(0, 1, Target::Group(10), "m-b", "b");
        history.complete(
            b,
            Outcome::Unknown {
                why: "timeout".into(),
            },
        );
        history.invoke(1, 2, Target::User(1), "m-c", "c");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("history.jsonl");
        history.write_jsonl(&path)?;
        assert_eq!(std::fs::read_to_string(&path)?.lines().count(), 3);
        assert_eq!(read_jsonl(&path)?, history.ops());
        Ok(())
    }

    #[test]
    fn a_line_that_is_not_an_op_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, "{\"id\": 0}\n")?;
        let err = read_jsonl(&path).err().map(|e| format!("{e:#}"));
        assert!(err.is_some_and(|e| e.contains("line 1")));
        Ok(())
    }
}
