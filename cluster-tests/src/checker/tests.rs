//! The checker's tests: a small model cluster stores sends correctly; each
//! test breaks one thing and asserts the exact violations reported.

use super::*;
use crate::history::{History, InboxRead, OwnRead, ShardReplica};

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
            delivered: self.inboxes.clone(),
            own_reads: Vec::new(),
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
    let verdicts = report.verdicts();
    assert_eq!(verdicts.len(), CHECKS.len());
    assert!(verdicts.iter().all(|v| v.passed && v.violations == 0));
}

#[test]
fn every_violation_kind_fails_exactly_one_check() {
    let kinds: Vec<&str> = CHECKS
        .iter()
        .flat_map(|(_, kinds)| kinds.iter().copied())
        .collect();
    let unique: BTreeSet<&str> = kinds.iter().copied().collect();
    assert_eq!(unique.len(), kinds.len(), "no kind in two checks");
    // A lost ack fails G1 and nothing else.
    let report = Report {
        counts: Counts::default(),
        violations: vec![
            Violation::Lost {
                user: 2,
                op: OpId(7),
                message_id: 9,
            },
            Violation::Gap {
                user: 2,
                expected: 3,
                found: 4,
            },
        ],
    };
    let failed: Vec<String> = report
        .verdicts()
        .into_iter()
        .filter(|v| !v.passed)
        .map(|v| format!("{} {}", v.violations, v.check))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed[0].starts_with("1 G1 "), "{failed:?}");
    assert!(failed[1].starts_with("1 G2 "), "{failed:?}");
    for kind in [
        "lost",
        "version_mismatch",
        "group_seq_mismatch",
        "duplicate_entry",
        "duplicate_send",
        "failed_stored",
        "phantom",
        "misdelivered",
        "gap",
        "reorder",
        "group_out_of_order",
        "group_diverged",
        "reads_differ",
        "not_read",
        "delivery_differs",
        "stale_read",
        "not_converged",
        "replicas_diverged",
    ] {
        assert!(unique.contains(kind), "{kind} belongs to a check");
    }
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
fn a_watcher_given_an_entry_twice_or_not_at_all_is_reported() {
    let (model, _) = chatter();
    let clean = model.observed();
    let stored = clean.delivered[&2].clone();
    assert!(stored.len() >= 2, "the chatter gives user 2 two entries");
    let given = |delivered: Vec<InboxEntry>| {
        let mut observed = clean.clone();
        observed.delivered.insert(2, delivered);
        model.check_observed(&observed).violations
    };
    let differs = |index: u64, delivered: usize| {
        vec![Violation::DeliveryDiffers {
            user: 2,
            index,
            delivered: delivered as u64,
            stored: stored.len() as u64,
        }]
    };
    let mut twice = stored.clone();
    twice.insert(1, stored[0].clone());
    assert_eq!(given(twice), differs(2, stored.len() + 1));
    let short = stored[..stored.len() - 1].to_vec();
    assert_eq!(given(short), differs(stored.len() as u64, stored.len() - 1));
    let mut changed = stored.clone();
    changed[0].body.push('!');
    assert_eq!(given(changed), differs(1, stored.len()));
    assert!(
        given(stored.clone()).is_empty(),
        "the stored inbox, once, passes"
    );
}

#[test]
fn a_sync_after_an_ack_that_lacks_the_message_is_a_stale_read() {
    let (model, [a, b, ..]) = chatter();
    let mut observed = model.observed();
    let read = |op, message_id, found| OwnRead {
        op,
        user: 1,
        message_id,
        found,
    };
    observed.own_reads = vec![read(a, 11, true), read(b, 12, false)];
    let report = model.check_observed(&observed);
    let stale = Violation::StaleRead {
        user: 1,
        op: b,
        message_id: 12,
    };
    assert_eq!(report.violations, vec![stale]);
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
