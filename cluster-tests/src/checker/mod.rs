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
    /// G4: the sender's sync right after `op` was acknowledged did not hold
    /// the message.
    StaleRead {
        user: UserId,
        op: OpId,
        message_id: u64,
    },
    /// What a watching client was given is not its stored inbox, entry for
    /// entry: first at position `index` (from 1) of `delivered` entries
    /// given and `stored` stored.
    DeliveryDiffers {
        user: UserId,
        index: u64,
        delivered: u64,
        stored: u64,
    },
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
            Violation::DeliveryDiffers { .. } => "delivery_differs",
            Violation::StaleRead { .. } => "stale_read",
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
            Violation::StaleRead { user, op, message_id } => write!(
                f,
                "{op} was acknowledged as message {message_id}, yet user {user}'s next sync lacked it"
            ),
            Violation::DeliveryDiffers { user, index, delivered, stored } => write!(
                f,
                "user {user}'s watching client was given {delivered} entries where {stored} are \
                 stored, first differing at entry {index}"
            ),
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

/// One check's verdict: what it proves and how many violations it found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The check, in words, with the guarantee it proves.
    pub check: String,
    /// True when it found nothing.
    pub passed: bool,
    /// Violations it found.
    pub violations: u64,
}

/// The checks, each with the violation kinds it reports.
const CHECKS: [(&str, &[&str]); 10] = [
    (
        "G1 every acknowledged message is stored where its ack says",
        &["lost", "version_mismatch", "group_seq_mismatch"],
    ),
    (
        "G3 exactly once: no send stored twice, no refused send stored",
        &["duplicate_entry", "duplicate_send", "failed_stored"],
    ),
    ("G2 every inbox's versions are 1..n", &["gap"]),
    (
        "order: one client's sends to one user keep their order",
        &["reorder"],
    ),
    (
        "G5 every member holds one group order",
        &["group_out_of_order", "group_diverged"],
    ),
    (
        "G6 no message nobody sent, none to a user it was not for",
        &["phantom", "misdelivered"],
    ),
    (
        "every inbox reads the same through every node",
        &["reads_differ", "not_read"],
    ),
    (
        "G4 read your writes: a sender's sync right after an ack holds the message",
        &["stale_read"],
    ),
    (
        "G4/G7 a watching client is given every stored entry once, in order, as stored",
        &["delivery_differs"],
    ),
    (
        "every shard's replicas agree (applied index and digest)",
        &["not_converged", "replicas_diverged"],
    ),
];

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

    /// Each check's verdict, in a fixed order.
    pub fn verdicts(&self) -> Vec<Verdict> {
        CHECKS
            .iter()
            .map(|(check, kinds)| {
                let found = self
                    .violations
                    .iter()
                    .filter(|v| kinds.contains(&v.kind()))
                    .count() as u64;
                Verdict {
                    check: check.to_string(),
                    passed: found == 0,
                    violations: found,
                }
            })
            .collect()
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
    run.check_deliveries();
    run.check_own_reads();
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

/// How the ops of `history` ended.
pub fn counts(history: &[Op]) -> Counts {
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

/// One inbox's message entries (events left out) by message id: finding
/// an acknowledged message costs a lookup, not a scan of the inbox, which
/// matters with hundreds of thousands of ops.
type ById<'a> = HashMap<u64, Vec<&'a InboxEntry>>;

/// The message entry of `op`'s acknowledged message in `index`.
fn find<'e>(index: &ById<'e>, op: &Op, message_id: u64) -> Option<&'e InboxEntry> {
    index
        .get(&message_id)?
        .iter()
        .copied()
        .find(|e| e.body == op.body)
}

/// One check's working state.
struct Run<'a> {
    history: &'a [Op],
    observed: &'a Observed,
    groups: &'a GroupMembers,
    /// Each user's inbox as first read: what the content checks judge.
    inboxes: BTreeMap<UserId, &'a [InboxEntry]>,
    /// The same inboxes' message entries by message id.
    by_id: BTreeMap<UserId, ById<'a>>,
    /// The ops of each send (a send and its retries), by body.
    sends: HashMap<&'a str, Vec<&'a Op>>,
    /// Users whose inbox a check needed but nobody read.
    not_read: BTreeSet<UserId>,
    violations: Vec<Violation>,
}

impl<'a> Run<'a> {
    fn new(history: &'a [Op], observed: &'a Observed, groups: &'a GroupMembers) -> Self {
        let inboxes: BTreeMap<UserId, &[InboxEntry]> = observed
            .inboxes
            .iter()
            .filter_map(|(user, reads)| Some((*user, reads.first()?.entries.as_slice())))
            .collect();
        let by_id = inboxes
            .iter()
            .map(|(user, entries)| {
                let mut index: ById = HashMap::new();
                for e in entries.iter().filter(|e| !e.is_event) {
                    index.entry(e.message_id).or_default().push(e);
                }
                (*user, index)
            })
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
            by_id,
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

    fn check_own_reads(&mut self) {
        let stale = self.observed.own_reads.iter().filter(|r| !r.found);
        self.violations.extend(stale.map(|r| Violation::StaleRead {
            user: r.user,
            op: r.op,
            message_id: r.message_id,
        }));
    }

    fn check_deliveries(&mut self) {
        for (&user, delivered) in &self.observed.delivered {
            let Some(stored) = self.inboxes.get(&user).copied() else {
                self.not_read.insert(user);
                continue;
            };
            if delivered.as_slice() == stored {
                continue;
            }
            let same = delivered
                .iter()
                .zip(stored)
                .take_while(|(a, b)| a == b)
                .count();
            self.violations.push(Violation::DeliveryDiffers {
                user,
                index: same as u64 + 1,
                delivered: delivered.len() as u64,
                stored: stored.len() as u64,
            });
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
                if self.inbox(user).is_none() {
                    continue;
                }
                let Some(entry) = self.by_id.get(&user).and_then(|i| find(i, op, message_id))
                else {
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
                .by_id
                .get(&to)
                .and_then(|index| find(index, op, message_id));
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
mod tests;
