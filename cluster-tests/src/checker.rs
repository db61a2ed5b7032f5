//! Judges a recorded [history](crate::history) against what the cluster
//! holds at the end of a run, for the guarantees of DESIGN.md section 2.
//!
//! The checker knows nothing of how the cluster works; it compares what
//! clients were told with what users can read. Each finding is a
//! [`Violation`] naming the users, versions and ops involved:
//!
//! - **G1 lost**: an acknowledged send is in the recipient's inbox, in the
//!   sender's own copy (unless the sender is the recipient) and, for a group
//!   send, in every member's inbox; matched by message id and body. Its
//!   acknowledged version (group_seq for a group) is where it is stored.
//! - **G3 exactly once**: no message id twice in one inbox; no send stored as
//!   two messages (a retried send, acknowledged or not, is at most one
//!   message); a send refused every time it was tried is stored nowhere.
//! - **G2 gap-free**: an inbox's versions are exactly 1, 2, …, n.
//! - **Order**: two acknowledged sends that one client made one after the
//!   other (the first answered before the second was invoked) to the same
//!   user are in that order in the recipient's inbox. Overlapping sends may
//!   land in either order.
//! - **G5 groups**: in each member's inbox a group's entries (messages and
//!   events) have increasing group_seqs, and all members hold the same
//!   (group_seq, message id) sequence from the point where both hold the
//!   group. Membership is fixed for the run, so past that point they must be
//!   identical.
//! - **Reads agree**: a user's inbox read through different nodes is
//!   identical. The run reads after the faults stop and the replicas have
//!   caught up, so a shorter read is a stale node, and a violation.
//! - **Replicas agree**: each shard's replicas are at one applied index and
//!   have one digest there.
//! - **Phantoms and misdeliveries**: every message in an inbox comes from a
//!   send of the history, and only to a user that send was for.
//!
//! A send is known by its body (see [`crate::history`]): the ops sharing a
//! body are one send and its retries. When a user's inbox was read through
//! several nodes, the content checks judge the first read; any other read
//! that differs is reported as such.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::history::{
    GroupId, GroupMembers, InboxEntry, NodeId, Observed, Op, OpId, Outcome, ShardId, Target, UserId,
};

/// Where a group entry sits in one member's inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPosition {
    /// The entry's version in the member's inbox.
    pub version: u64,
    /// Its position in the group's order.
    pub group_seq: u64,
    /// The message (or event) id.
    pub message_id: u64,
}

/// One way the run broke a guarantee.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    /// G1: an acknowledged send is missing from an inbox it must be in.
    Lost {
        user: UserId,
        op: OpId,
        message_id: u64,
    },
    /// G1: a user send is stored at another version than its ack said.
    VersionMismatch {
        user: UserId,
        op: OpId,
        acked: u64,
        stored: u64,
    },
    /// G1/G5: a group send is stored at another group_seq than its ack said.
    GroupSeqMismatch {
        user: UserId,
        op: OpId,
        acked: u64,
        stored: u64,
    },
    /// G3: one message id is in an inbox more than once.
    DuplicateEntry {
        user: UserId,
        message_id: u64,
        versions: Vec<u64>,
    },
    /// G3: one send (these ops: it and its retries) is stored as several messages.
    DuplicateSend {
        user: UserId,
        ops: Vec<OpId>,
        versions: Vec<u64>,
    },
    /// G3: a send refused every time it was tried is stored.
    FailedStored {
        user: UserId,
        ops: Vec<OpId>,
        versions: Vec<u64>,
    },
    /// A message that no op of the history sent.
    Phantom {
        user: UserId,
        version: u64,
        message_id: u64,
    },
    /// G6: a message in the inbox of a user it was not sent to.
    Misdelivered {
        user: UserId,
        ops: Vec<OpId>,
        versions: Vec<u64>,
    },
    /// G2: the inbox's versions are not 1..n; the first wrong one.
    Gap {
        user: UserId,
        expected: u64,
        found: u64,
    },
    /// Sends one client made one after the other are stored the other way round.
    Reorder {
        user: UserId,
        earlier: OpId,
        later: OpId,
        earlier_version: u64,
        later_version: u64,
    },
    /// G5: a member's group_seqs for a group do not increase.
    GroupOutOfOrder {
        group: GroupId,
        user: UserId,
        previous: GroupPosition,
        next: GroupPosition,
    },
    /// G5: two members hold the group's order differently; the first
    /// difference (`None`: that member's sequence has ended).
    GroupDiverged {
        group: GroupId,
        user: UserId,
        other: UserId,
        mine: Option<GroupPosition>,
        theirs: Option<GroupPosition>,
    },
    /// A user's inbox read through two nodes differs, first at `version`.
    ReadsDiffer {
        user: UserId,
        node: NodeId,
        other_node: NodeId,
        version: u64,
    },
    /// An inbox the checks need was not read.
    NotRead { user: UserId },
    /// A shard's replicas are at different applied indexes.
    NotConverged {
        shard: ShardId,
        applied: Vec<(NodeId, u64)>,
    },
    /// A shard's replicas have different digests at the same applied index.
    ReplicasDiverged {
        shard: ShardId,
        applied: u64,
        digests: Vec<(NodeId, String)>,
    },
}

impl Violation {
    /// The violation's kind, as in its JSON `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::Lost { .. } => "lost",
            Violation::VersionMismatch { .. } => "version_mismatch",
            Violation::GroupSeqMismatch { .. } => "group_seq_mismatch",
            Violation::DuplicateEntry { .. } => "duplicate_entry",
            Violation::DuplicateSend { .. } => "duplicate_send",
            Violation::FailedStored { .. } => "failed_stored",
            Violation::Phantom { .. } => "phantom",
            Violation::Misdelivered { .. } => "misdelivered",
            Violation::Gap { .. } => "gap",
            Violation::Reorder { .. } => "reorder",
            Violation::GroupOutOfOrder { .. } => "group_out_of_order",
            Violation::GroupDiverged { .. } => "group_diverged",
            Violation::ReadsDiffer { .. } => "reads_differ",
            Violation::NotRead { .. } => "not_read",
            Violation::NotConverged { .. } => "not_converged",
            Violation::ReplicasDiverged { .. } => "replicas_diverged",
        }
    }
}

impl fmt::Display for GroupPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "group_seq {} (message {}) at version {}",
            self.group_seq, self.message_id, self.version
        )
    }
}

fn position(p: &Option<GroupPosition>) -> String {
    p.map_or_else(|| "nothing more".to_string(), |p| p.to_string())
}

fn ids(ops: &[OpId]) -> String {
    let ids: Vec<String> = ops.iter().map(|op| op.0.to_string()).collect();
    format!("op {}", ids.join("/"))
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.kind())?;
        match self {
            Violation::Lost { user, op, message_id } => write!(
                f,
                "{op} was acknowledged as message {message_id}, which user {user}'s inbox lacks"
            ),
            Violation::VersionMismatch { user, op, acked, stored } => write!(
                f,
                "{op} was acknowledged at version {acked}; user {user} holds it at version {stored}"
            ),
            Violation::GroupSeqMismatch { user, op, acked, stored } => write!(
                f,
                "{op} was acknowledged at group_seq {acked}; user {user} holds it at group_seq {stored}"
            ),
            Violation::DuplicateEntry { user, message_id, versions } => write!(
                f,
                "user {user} holds message {message_id} at versions {versions:?}"
            ),
            Violation::DuplicateSend { user, ops, versions } => write!(
                f,
                "user {user} holds the send of {} as several messages, at versions {versions:?}",
                ids(ops)
            ),
            Violation::FailedStored { user, ops, versions } => write!(
                f,
                "{} was refused, yet user {user} holds it at versions {versions:?}",
                ids(ops)
            ),
            Violation::Phantom { user, version, message_id } => write!(
                f,
                "user {user} holds message {message_id} at version {version}, which no op sent"
            ),
            Violation::Misdelivered { user, ops, versions } => write!(
                f,
                "user {user} holds the send of {} at versions {versions:?}, but it was not for them",
                ids(ops)
            ),
            Violation::Gap { user, expected, found } => write!(
                f,
                "user {user}'s inbox has version {found} where {expected} belongs"
            ),
            Violation::Reorder { user, earlier, later, earlier_version, later_version } => write!(
                f,
                "{earlier} was answered before {later} was sent (same client), yet user {user} \
                 holds {earlier} at version {earlier_version} and {later} at version {later_version}"
            ),
            Violation::GroupOutOfOrder { group, user, previous, next } => write!(
                f,
                "in user {user}'s inbox, group {group} has {next} after {previous}"
            ),
            Violation::GroupDiverged { group, user, other, mine, theirs } => write!(
                f,
                "group {group}: user {user} holds {} where user {other} holds {}",
                position(mine),
                position(theirs)
            ),
            Violation::ReadsDiffer { user, node, other_node, version } => write!(
                f,
                "user {user}'s inbox read through node {node} and node {other_node} differs from version {version}"
            ),
            Violation::NotRead { user } => write!(f, "user {user}'s inbox was not read"),
            Violation::NotConverged { shard, applied } => write!(
                f,
                "shard {shard}'s replicas are at different applied indexes (node, index): {applied:?}"
            ),
            Violation::ReplicasDiverged { shard, applied, digests } => write!(
                f,
                "shard {shard}'s replicas differ at applied index {applied} (node, digest): {digests:?}"
            ),
        }
    }
}

/// How the run's ops ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Every op recorded.
    pub invoked: u64,
    /// Acknowledged.
    pub ok: u64,
    /// Definitely refused.
    pub failed: u64,
    /// Timed out, lost, or never completed.
    pub unknown: u64,
}

/// The checker's verdict on one run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// How the ops ended.
    pub counts: Counts,
    /// Every violation found; none when the run passed.
    pub violations: Vec<Violation>,
}

impl Report {
    /// True when no guarantee was broken.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// One line: the verdict, the op counts and the violations by kind.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let ops = format!(
            "{} ops ({} ok, {} failed, {} unknown)",
            c.invoked, c.ok, c.failed, c.unknown
        );
        if self.passed() {
            return format!("passed: {ops}; no violations");
        }
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for v in &self.violations {
            *kinds.entry(v.kind()).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!("FAILED: {ops}; violations: {}", kinds.join(", "))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

/// Judges `history` against the `observed` final state; `groups` gives each
/// group's members, fixed for the run.
pub fn check(history: &[Op], observed: &Observed, groups: &GroupMembers) -> Report {
    let mut run = Run::new(history, observed, groups);
    run.check_reads_agree();
    run.check_versions();
    run.check_contents();
    run.check_acks();
    run.check_order();
    run.check_groups();
    run.check_replicas();
    let mut violations = run.violations;
    violations.extend(
        run.not_read
            .into_iter()
            .map(|user| Violation::NotRead { user }),
    );
    Report {
        counts: counts(history),
        violations,
    }
}

fn counts(history: &[Op]) -> Counts {
    let mut c = Counts {
        invoked: history.len() as u64,
        ..Counts::default()
    };
    for op in history {
        match op.outcome {
            Outcome::Ok { .. } => c.ok += 1,
            Outcome::Failed { .. } => c.failed += 1,
            Outcome::Unknown { .. } => c.unknown += 1,
        }
    }
    c
}

/// The users whose inboxes must hold `op`'s message if it was stored.
fn recipients(op: &Op, groups: &GroupMembers) -> BTreeSet<UserId> {
    let mut users = match op.target {
        Target::User(user) => BTreeSet::from([user]),
        Target::Group(group) => groups.get(&group).cloned().unwrap_or_default(),
    };
    users.insert(op.sender);
    users
}

/// The message entry of `op`'s acknowledged message in `entries`.
fn find<'e>(entries: &'e [InboxEntry], op: &Op, message_id: u64) -> Option<&'e InboxEntry> {
    entries
        .iter()
        .find(|e| !e.is_event && e.message_id == message_id && e.body == op.body)
}

/// One check's working state.
struct Run<'a> {
    history: &'a [Op],
    observed: &'a Observed,
    groups: &'a GroupMembers,
    /// Each user's inbox as first read: what the content checks judge.
    inboxes: BTreeMap<UserId, &'a [InboxEntry]>,
    /// The ops of each send (a send and its retries), by body.
    sends: HashMap<&'a str, Vec<&'a Op>>,
    /// Users whose inbox a check needed but nobody read.
    not_read: BTreeSet<UserId>,
    violations: Vec<Violation>,
}

impl<'a> Run<'a> {
    fn new(history: &'a [Op], observed: &'a Observed, groups: &'a GroupMembers) -> Self {
        let inboxes = observed
            .inboxes
            .iter()
            .filter_map(|(user, reads)| Some((*user, reads.first()?.entries.as_slice())))
            .collect();
        let mut sends: HashMap<&str, Vec<&Op>> = HashMap::new();
        for op in history {
            sends.entry(op.body.as_str()).or_default().push(op);
        }
        Self {
            history,
            observed,
            groups,
            inboxes,
            sends,
            not_read: BTreeSet::new(),
            violations: Vec::new(),
        }
    }

    fn inbox(&mut self, user: UserId) -> Option<&'a [InboxEntry]> {
        let inbox = self.inboxes.get(&user).copied();
        if inbox.is_none() {
            self.not_read.insert(user);
        }
        inbox
    }

    fn check_reads_agree(&mut self) {
        for (&user, reads) in &self.observed.inboxes {
            let Some((first, others)) = reads.split_first() else {
                continue;
            };
            for other in others.iter().filter(|o| o.entries != first.entries) {
                let same = first
                    .entries
                    .iter()
                    .zip(&other.entries)
                    .take_while(|(a, b)| a == b)
                    .count();
                self.violations.push(Violation::ReadsDiffer {
                    user,
                    node: first.node,
                    other_node: other.node,
                    version: same as u64 + 1,
                });
            }
        }
    }

    fn check_versions(&mut self) {
        for (&user, entries) in &self.inboxes {
            let wrong = (1u64..).zip(entries.iter()).find(|(n, e)| e.version != *n);
            if let Some((expected, entry)) = wrong {
                self.violations.push(Violation::Gap {
                    user,
                    expected,
                    found: entry.version,
                });
            }
        }
    }

    fn check_contents(&mut self) {
        let inboxes = self.inboxes.clone();
        for (user, entries) in inboxes {
            let mut by_id: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut by_body: BTreeMap<&str, Vec<&InboxEntry>> = BTreeMap::new();
            for e in entries.iter() {
                by_id.entry(e.message_id).or_default().push(e.version);
                if !e.is_event {
                    by_body.entry(e.body.as_str()).or_default().push(e);
                }
            }
            for (message_id, versions) in by_id {
                if versions.len() > 1 {
                    self.violations.push(Violation::DuplicateEntry {
                        user,
                        message_id,
                        versions,
                    });
                }
            }
            for (body, found) in by_body {
                self.judge_send(user, body, &found);
            }
        }
    }

    /// Judges the entries of one body in `user`'s inbox.
    fn judge_send(&mut self, user: UserId, body: &str, found: &[&InboxEntry]) {
        let Some(ops) = self.sends.get(body) else {
            for e in found {
                self.violations.push(Violation::Phantom {
                    user,
                    version: e.version,
                    message_id: e.message_id,
                });
            }
            return;
        };
        let op_ids: Vec<OpId> = ops.iter().map(|op| op.id).collect();
        let versions: Vec<u64> = found.iter().map(|e| e.version).collect();
        let messages: BTreeSet<u64> = found.iter().map(|e| e.message_id).collect();
        let refused = ops
            .iter()
            .all(|op| matches!(op.outcome, Outcome::Failed { .. }));
        let violation = if refused {
            Violation::FailedStored {
                user,
                ops: op_ids,
                versions,
            }
        } else if !ops
            .iter()
            .any(|op| recipients(op, self.groups).contains(&user))
        {
            Violation::Misdelivered {
                user,
                ops: op_ids,
                versions,
            }
        } else if messages.len() > 1 {
            Violation::DuplicateSend {
                user,
                ops: op_ids,
                versions,
            }
        } else {
            return;
        };
        self.violations.push(violation);
    }

    fn check_acks(&mut self) {
        for op in self.history {
            let Some((message_id, acked)) = op.ack() else {
                continue;
            };
            for user in recipients(op, self.groups) {
                let Some(entries) = self.inbox(user) else {
                    continue;
                };
                let Some(entry) = find(entries, op, message_id) else {
                    self.violations.push(Violation::Lost {
                        user,
                        op: op.id,
                        message_id,
                    });
                    continue;
                };
                match op.target {
                    Target::User(to) if to == user && entry.version != acked => {
                        self.violations.push(Violation::VersionMismatch {
                            user,
                            op: op.id,
                            acked,
                            stored: entry.version,
                        })
                    }
                    Target::Group(_) if entry.group_seq != acked => {
                        self.violations.push(Violation::GroupSeqMismatch {
                            user,
                            op: op.id,
                            acked,
                            stored: entry.group_seq,
                        })
                    }
                    _ => {}
                }
            }
        }
    }

    /// For each client and recipient, every acknowledged send must be stored
    /// above every send of that client to that user answered before it was
    /// invoked. Sweeping the sends by invocation, with the highest version
    /// among those answered so far, finds each offender once.
    fn check_order(&mut self) {
        let mut lanes: BTreeMap<(u64, UserId), Vec<(&Op, u64)>> = BTreeMap::new();
        for op in self.history {
            let (Target::User(to), Some((message_id, _))) = (op.target, op.ack()) else {
                continue;
            };
            let stored = self
                .inboxes
                .get(&to)
                .and_then(|entries| find(entries, op, message_id));
            if let Some(entry) = stored {
                lanes
                    .entry((op.client, to))
                    .or_default()
                    .push((op, entry.version));
            }
        }
        for ((_, user), mut by_invoke) in lanes {
            let mut by_answer = by_invoke.clone();
            by_invoke.sort_by_key(|(op, _)| op.invoke_index);
            by_answer.sort_by_key(|(op, _)| op.complete_index.unwrap_or(u64::MAX));
            let mut answered = by_answer.iter().peekable();
            let mut highest: Option<(&Op, u64)> = None;
            for &(op, version) in &by_invoke {
                while let Some(&&(done, done_version)) = answered.peek() {
                    if done.complete_index.unwrap_or(u64::MAX) >= op.invoke_index {
                        break;
                    }
                    if highest.is_none_or(|(_, v)| done_version > v) {
                        highest = Some((done, done_version));
                    }
                    answered.next();
                }
                if let Some((earlier, earlier_version)) = highest {
                    if version < earlier_version {
                        self.violations.push(Violation::Reorder {
                            user,
                            earlier: earlier.id,
                            later: op.id,
                            earlier_version,
                            later_version: version,
                        });
                    }
                }
            }
        }
    }

    fn check_groups(&mut self) {
        for (&group, members) in self.groups {
            let mut reference: Option<(UserId, Vec<GroupPosition>)> = None;
            for &user in members {
                let Some(entries) = self.inbox(user) else {
                    continue;
                };
                let held: Vec<GroupPosition> = entries
                    .iter()
                    .filter(|e| e.group_id == group)
                    .map(|e| GroupPosition {
                        version: e.version,
                        group_seq: e.group_seq,
                        message_id: e.message_id,
                    })
                    .collect();
                let backwards = held.windows(2).find(|w| w[1].group_seq <= w[0].group_seq);
                if let Some(w) = backwards {
                    self.violations.push(Violation::GroupOutOfOrder {
                        group,
                        user,
                        previous: w[0],
                        next: w[1],
                    });
                }
                match &reference {
                    None => reference = Some((user, held)),
                    Some((other, theirs)) => {
                        if let Some((mine, theirs)) = first_difference(&held, theirs) {
                            self.violations.push(Violation::GroupDiverged {
                                group,
                                user,
                                other: *other,
                                mine,
                                theirs,
                            });
                        }
                    }
                }
            }
        }
    }

    fn check_replicas(&mut self) {
        let mut shards: BTreeMap<ShardId, Vec<(NodeId, u64, &str)>> = BTreeMap::new();
        for (&node, replicas) in &self.observed.replicas {
            for r in replicas {
                shards
                    .entry(r.shard)
                    .or_default()
                    .push((node, r.applied, r.digest.as_str()));
            }
        }
        for (shard, replicas) in shards {
            let applied: BTreeSet<u64> = replicas.iter().map(|r| r.1).collect();
            let digests: BTreeSet<&str> = replicas.iter().map(|r| r.2).collect();
            if applied.len() > 1 {
                self.violations.push(Violation::NotConverged {
                    shard,
                    applied: replicas.iter().map(|r| (r.0, r.1)).collect(),
                });
            } else if digests.len() > 1 {
                self.violations.push(Violation::ReplicasDiverged {
                    shard,
                    applied: replicas[0].1,
                    digests: replicas.iter().map(|r| (r.0, r.2.to_string())).collect(),
                });
            }
        }
    }
}

/// The first place where two members' holdings of a group differ, from the
/// first group_seq both hold on (before it, one joined later).
fn first_difference(
    mine: &[GroupPosition],
    theirs: &[GroupPosition],
) -> Option<(Option<GroupPosition>, Option<GroupPosition>)> {
    let start = |held: &[GroupPosition]| held.first().map_or(0, |p| p.group_seq);
    let from = start(mine).max(start(theirs));
    let mine: Vec<&GroupPosition> = mine.iter().filter(|p| p.group_seq >= from).collect();
    let theirs: Vec<&GroupPosition> = theirs.iter().filter(|p| p.group_seq >= from).collect();
    let key = |p: Option<&&GroupPosition>| p.map(|p| (p.group_seq, p.message_id));
    (0..mine.len().max(theirs.len()))
        .find(|&i| key(mine.get(i)) != key(theirs.get(i)))
        .map(|i| (mine.get(i).map(|p| **p), theirs.get(i).map(|p| **p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{History, InboxRead, ShardReplica};

    /// A perfect cluster for tests: stores sends as the real one should and
    /// records them in a history. Tests then spoil its inboxes.
    struct Model {
        history: History,
        groups: GroupMembers,
        inboxes: BTreeMap<UserId, Vec<InboxEntry>>,
        next_message_id: u64,
        group_seqs: BTreeMap<GroupId, u64>,
    }

    const GROUP: GroupId = 10;

    impl Model {
        /// Users 1, 2, 3 and group 10 of all three, created by user 1.
        fn new() -> Self {
            let mut model = Self {
                history: History::new(),
                groups: BTreeMap::from([(GROUP, BTreeSet::from([1, 2, 3]))]),
                inboxes: (1..=3).map(|u| (u, Vec::new())).collect(),
                next_message_id: 100,
                group_seqs: BTreeMap::new(),
            };
            model.deliver(1, Target::Group(GROUP), "", true);
            model
        }

        fn append(&mut self, user: UserId, mut entry: InboxEntry) -> u64 {
            let inbox = self.inboxes.entry(user).or_default();
            entry.version = inbox.len() as u64 + 1;
            entry.recipient_id = user;
            inbox.push(entry);
            inbox.len() as u64
        }

        /// Stores a message (or group event) as the cluster would, and
        /// returns what the cluster would answer.
        fn deliver(&mut self, sender: UserId, target: Target, body: &str, event: bool) -> Outcome {
            self.next_message_id += 1;
            let mut entry = InboxEntry {
                version: 0,
                message_id: self.next_message_id,
                sender_id: sender,
                recipient_id: 0,
                body: body.to_string(),
                group_id: 0,
                group_seq: 0,
                is_event: event,
            };
            let message_id = entry.message_id;
            let version = match target {
                Target::User(to) => {
                    let version = self.append(to, entry.clone());
                    if to != sender {
                        self.append(sender, entry);
                    }
                    version
                }
                Target::Group(group) => {
                    let seq = self.group_seqs.entry(group).or_default();
                    *seq += 1;
                    entry.group_id = group;
                    entry.group_seq = *seq;
                    let members = self.groups.get(&group).cloned().unwrap_or_default();
                    for member in members {
                        self.append(member, entry.clone());
                    }
                    entry.group_seq
                }
            };
            Outcome::Ok {
                message_id,
                version,
            }
        }

        fn store(&mut self, sender: UserId, target: Target, body: &str) -> Outcome {
            self.deliver(sender, target, body, false)
        }

        /// An acknowledged send by `client`.
        fn send(&mut self, client: u64, sender: UserId, target: Target, body: &str) -> OpId {
            let op = self.history.invoke(client, sender, target, body, body);
            let outcome = self.store(sender, target, body);
            self.history.complete(op, outcome);
            op
        }

        /// A send that ended with `outcome`, stored `times` times.
        fn attempt(
            &mut self,
            sender: UserId,
            to: UserId,
            body: &str,
            times: usize,
            outcome: Outcome,
        ) -> OpId {
            let op = self.history.invoke(9, sender, Target::User(to), body, body);
            for _ in 0..times {
                self.store(sender, Target::User(to), body);
            }
            self.history.complete(op, outcome);
            op
        }

        fn entry(&self, user: UserId, body: &str) -> InboxEntry {
            self.inboxes[&user]
                .iter()
                .find(|e| e.body == body)
                .cloned()
                .unwrap_or_else(|| panic!("user {user} lacks {body:?}"))
        }

        fn versions(&self, user: UserId, body: &str) -> Vec<u64> {
            let inbox = &self.inboxes[&user];
            inbox
                .iter()
                .filter(|e| e.body == body)
                .map(|e| e.version)
                .collect()
        }

        /// Every inbox read through nodes 1 and 2; three nodes with two
        /// shards at applied index 10.
        fn observed(&self) -> Observed {
            let read = |entries: &Vec<InboxEntry>| {
                [1, 2]
                    .map(|node| InboxRead {
                        node,
                        entries: entries.clone(),
                    })
                    .to_vec()
            };
            let replicas = (0..2)
                .map(|shard| ShardReplica {
                    shard,
                    applied: 10,
                    digest: format!("d{shard}"),
                })
                .collect::<Vec<_>>();
            Observed {
                inboxes: self.inboxes.iter().map(|(u, e)| (*u, read(e))).collect(),
                replicas: (1..=3).map(|node| (node, replicas.clone())).collect(),
            }
        }

        fn check_observed(&self, observed: &Observed) -> Report {
            check(&self.history.ops(), observed, &self.groups)
        }

        fn check(&self) -> Report {
            self.check_observed(&self.observed())
        }
    }

    /// Sends between users 1 and 2 and to the group, all acknowledged.
    fn chatter() -> (Model, [OpId; 4]) {
        let mut model = Model::new();
        let a = model.send(0, 1, Target::User(2), "a");
        let b = model.send(0, 1, Target::User(2), "b");
        let c = model.send(1, 2, Target::User(1), "c");
        let g = model.send(2, 3, Target::Group(GROUP), "g");
        (model, [a, b, c, g])
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            why: "timeout".into(),
        }
    }

    fn refused() -> Outcome {
        Outcome::Failed {
            code: "RATE_LIMITED".into(),
        }
    }

    #[test]
    fn clean_history_passes() {
        let (mut model, _) = chatter();
        model.send(1, 3, Target::User(3), "note to self");
        model.send(0, 2, Target::Group(GROUP), "g2");
        model.attempt(1, 2, "timed out, not stored", 0, unknown());
        model.attempt(1, 2, "timed out, stored", 1, unknown());
        model.attempt(1, 3, "refused", 0, refused());
        // Refused, then retried with success: one send, stored once.
        model.attempt(2, 3, "refused then ok", 0, refused());
        model.send(1, 2, Target::User(3), "refused then ok");
        // Timed out though stored, then retried: the answer repeats the first.
        let first = model.history.invoke(1, 1, Target::User(3), "r", "retried");
        let ack = model.store(1, Target::User(3), "retried");
        model.history.complete(first, unknown());
        let retry = model.history.invoke(1, 1, Target::User(3), "r", "retried");
        model.history.complete(retry, ack);
        // Overlapping sends of one client may land in either order.
        let x = model.history.invoke(3, 3, Target::User(1), "x", "x");
        let y = model.history.invoke(3, 3, Target::User(1), "y", "y");
        let y_ack = model.store(3, Target::User(1), "y");
        let x_ack = model.store(3, Target::User(1), "x");
        model.history.complete(x, x_ack);
        model.history.complete(y, y_ack);
        model
            .history
            .invoke(4, 1, Target::User(2), "never", "never answered");

        let report = model.check();
        assert!(report.passed(), "{report}");
        let counts = Counts {
            invoked: 16,
            ok: 10,
            failed: 2,
            unknown: 4,
        };
        assert_eq!(report.counts, counts);
        assert!(report.summary().starts_with("passed: 16 ops"));
    }

    #[test]
    fn acknowledged_send_missing_from_the_recipient_is_lost() {
        let (mut model, _) = chatter();
        let lost = model.send(0, 1, Target::User(2), "lost");
        let message_id = model.entry(2, "lost").message_id;
        model.inboxes.entry(2).or_default().pop();
        let report = model.check();
        assert_eq!(
            report.violations,
            vec![Violation::Lost {
                user: 2,
                op: lost,
                message_id
            }]
        );
    }

    #[test]
    fn group_send_missing_from_one_member_is_lost() {
        let (mut model, [.., g]) = chatter();
        let theirs = model.entry(1, "g");
        model.inboxes.entry(2).or_default().pop();
        let report = model.check();
        let lost = Violation::Lost {
            user: 2,
            op: g,
            message_id: theirs.message_id,
        };
        // User 2's holding of the group ends early, too.
        let short = Violation::GroupDiverged {
            group: GROUP,
            user: 2,
            other: 1,
            mine: None,
            theirs: Some(GroupPosition {
                version: theirs.version,
                group_seq: theirs.group_seq,
                message_id: theirs.message_id,
            }),
        };
        assert_eq!(report.violations, vec![lost, short]);
    }

    #[test]
    fn retry_stored_twice_is_a_duplicate_send() {
        let (mut model, _) = chatter();
        let op = model.attempt(1, 2, "twice", 2, unknown());
        let report = model.check();
        let duplicate = |user| Violation::DuplicateSend {
            user,
            ops: vec![op],
            versions: model.versions(user, "twice"),
        };
        assert_eq!(report.violations, vec![duplicate(1), duplicate(2)]);
    }

    #[test]
    fn same_message_twice_in_an_inbox_is_a_duplicate_entry() {
        let (mut model, _) = chatter();
        let again = model.entry(2, "b");
        let version = model.append(2, again.clone());
        let report = model.check();
        let duplicate = Violation::DuplicateEntry {
            user: 2,
            message_id: again.message_id,
            versions: vec![again.version, version],
        };
        assert_eq!(report.violations, vec![duplicate]);
    }

    #[test]
    fn skipped_version_is_a_gap() {
        let (mut model, _) = chatter();
        // The last entry of user 1 is the sender's copy of this send: no ack names its version.
        model.send(0, 1, Target::User(2), "z");
        let last = model.inboxes.entry(1).or_default().last_mut();
        let expected = last.as_ref().map_or(0, |e| e.version);
        if let Some(e) = last {
            e.version += 1;
        }
        let report = model.check();
        let gap = Violation::Gap {
            user: 1,
            expected,
            found: expected + 1,
        };
        assert_eq!(report.violations, vec![gap]);
    }

    #[test]
    fn sends_of_one_client_stored_in_reverse_are_a_reorder() {
        let (mut model, _) = chatter();
        // The cluster stores the second send before the first is answered.
        let first = model
            .history
            .invoke(5, 3, Target::User(2), "first", "first");
        let second_ack = model.store(3, Target::User(2), "second");
        let first_ack = model.store(3, Target::User(2), "first");
        model.history.complete(first, first_ack);
        let second = model
            .history
            .invoke(5, 3, Target::User(2), "second", "second");
        model.history.complete(second, second_ack);
        let report = model.check();
        let reorder = Violation::Reorder {
            user: 2,
            earlier: first,
            later: second,
            earlier_version: model.entry(2, "first").version,
            later_version: model.entry(2, "second").version,
        };
        assert_eq!(report.violations, vec![reorder]);
    }

    #[test]
    fn replicas_with_different_digests_diverged() {
        let (model, _) = chatter();
        let mut observed = model.observed();
        if let Some(replicas) = observed.replicas.get_mut(&2) {
            replicas[1].digest = "bad".into();
        }
        let report = model.check_observed(&observed);
        let diverged = Violation::ReplicasDiverged {
            shard: 1,
            applied: 10,
            digests: vec![(1, "d1".into()), (2, "bad".into()), (3, "d1".into())],
        };
        assert_eq!(report.violations, vec![diverged]);
    }

    #[test]
    fn replicas_at_different_indexes_have_not_converged() {
        let (model, _) = chatter();
        let mut observed = model.observed();
        if let Some(replicas) = observed.replicas.get_mut(&3) {
            replicas[0] = ShardReplica {
                shard: 0,
                applied: 9,
                digest: "old".into(),
            };
        }
        let report = model.check_observed(&observed);
        let lagging = Violation::NotConverged {
            shard: 0,
            applied: vec![(1, 10), (2, 10), (3, 9)],
        };
        assert_eq!(report.violations, vec![lagging]);
    }

    #[test]
    fn member_holding_the_group_in_another_order_diverged() {
        let (mut model, [.., g]) = chatter();
        let g2 = model.send(0, 1, Target::Group(GROUP), "g2");
        // User 3 holds g2's message at g's group_seq and g's at g2's.
        let inbox = model.inboxes.entry(3).or_default();
        let n = inbox.len();
        let (older, newer) = (inbox[n - 2].clone(), inbox[n - 1].clone());
        for (slot, from) in [(n - 2, &newer), (n - 1, &older)] {
            inbox[slot].message_id = from.message_id;
            inbox[slot].body = from.body.clone();
            inbox[slot].sender_id = from.sender_id;
        }
        let report = model.check();
        let at = |e: &InboxEntry, message_id| GroupPosition {
            version: e.version,
            group_seq: e.group_seq,
            message_id,
        };
        let theirs = model.entry(1, "g");
        let expected = vec![
            Violation::GroupSeqMismatch {
                user: 3,
                op: g,
                acked: older.group_seq,
                stored: newer.group_seq,
            },
            Violation::GroupSeqMismatch {
                user: 3,
                op: g2,
                acked: newer.group_seq,
                stored: older.group_seq,
            },
            Violation::GroupDiverged {
                group: GROUP,
                user: 3,
                other: 1,
                mine: Some(at(&older, newer.message_id)),
                theirs: Some(at(&theirs, theirs.message_id)),
            },
        ];
        assert_eq!(report.violations, expected);
    }

    #[test]
    fn group_entries_out_of_sequence_are_reported() {
        let (mut model, _) = chatter();
        model.send(0, 1, Target::Group(GROUP), "late");
        // Every member holds "late" below "g" in the group's order.
        for inbox in model.inboxes.values_mut() {
            if let Some(last) = inbox.last_mut() {
                last.group_seq = 1;
            }
        }
        let report = model.check();
        let position = |e: InboxEntry| GroupPosition {
            version: e.version,
            group_seq: e.group_seq,
            message_id: e.message_id,
        };
        for user in 1..=3 {
            let out_of_order = Violation::GroupOutOfOrder {
                group: GROUP,
                user,
                previous: position(model.entry(user, "g")),
                next: position(model.entry(user, "late")),
            };
            assert!(report.violations.contains(&out_of_order), "{report}");
        }
        // Besides: each member holds "late" at another group_seq than acked.
        let kinds = ["group_out_of_order", "group_seq_mismatch"];
        assert!(report.violations.iter().all(|v| kinds.contains(&v.kind())));
        assert_eq!(report.violations.len(), 6);
    }

    #[test]
    fn refused_send_that_was_stored_is_reported() {
        let (mut model, _) = chatter();
        let op = model.attempt(2, 3, "refused", 1, refused());
        let report = model.check();
        let stored = |user| Violation::FailedStored {
            user,
            ops: vec![op],
            versions: model.versions(user, "refused"),
        };
        assert_eq!(report.violations, vec![stored(2), stored(3)]);
    }

    #[test]
    fn message_no_op_sent_is_a_phantom() {
        let (mut model, _) = chatter();
        let mut ghost = model.entry(2, "a");
        ghost.message_id = 999;
        ghost.body = "nobody sent this".into();
        let version = model.append(2, ghost);
        let report = model.check();
        let phantom = Violation::Phantom {
            user: 2,
            version,
            message_id: 999,
        };
        assert_eq!(report.violations, vec![phantom]);
    }

    #[test]
    fn message_in_a_stranger_inbox_is_misdelivered() {
        let (mut model, [a, ..]) = chatter();
        let copy = model.entry(2, "a");
        let version = model.append(3, copy);
        let report = model.check();
        let misdelivered = Violation::Misdelivered {
            user: 3,
            ops: vec![a],
            versions: vec![version],
        };
        assert_eq!(report.violations, vec![misdelivered]);
    }

    #[test]
    fn reads_through_two_nodes_must_be_identical() {
        let (model, _) = chatter();
        let mut observed = model.observed();
        let mut last = 0;
        if let Some(reads) = observed.inboxes.get_mut(&2) {
            last = reads[1].entries.len() as u64;
            reads[1].entries.pop();
        }
        let report = model.check_observed(&observed);
        let differ = Violation::ReadsDiffer {
            user: 2,
            node: 1,
            other_node: 2,
            version: last,
        };
        assert_eq!(report.violations, vec![differ]);
    }

    #[test]
    fn inbox_never_read_is_reported_once() {
        let (model, _) = chatter();
        let mut observed = model.observed();
        observed.inboxes.remove(&2);
        let report = model.check_observed(&observed);
        assert_eq!(report.violations, vec![Violation::NotRead { user: 2 }]);
    }

    #[test]
    fn report_round_trips_through_json_and_prints_plainly() -> anyhow::Result<()> {
        let (mut model, _) = chatter();
        let lost = model.send(0, 1, Target::User(2), "lost");
        model.inboxes.entry(2).or_default().pop();
        let report = model.check();
        let json = serde_json::to_string(&report)?;
        assert!(json.contains("\"kind\":\"lost\""));
        assert_eq!(serde_json::from_str::<Report>(&json)?, report);
        assert!(!report.passed());
        assert!(report
            .summary()
            .starts_with("FAILED: 5 ops (5 ok, 0 failed, 0 unknown); violations: 1 lost"));
        let text = report.to_string();
        assert!(
            text.contains(&format!("lost: {lost} was acknowledged as message")),
            "{text}"
        );
        Ok(())
    }
}
