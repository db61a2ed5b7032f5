//! Groups in the state machine, over a whole cluster's shards in memory:
//! every member gets every group entry committed while it is a member,
//! exactly once and in group order (G5), and membership rules hold.

mod common;

use std::collections::BTreeMap;

use common::{map, Shard, ShardView, SHARDS};
use fishchat_shard::{
    membership_group, memberships_range, outbox_ref, Command, CommandError, DeliveryBatch,
    GroupChange, GroupEventKind, GroupId, InboxEntry, NewMember, Reply, Role, UserId,
};

/// Every shard of a cluster, and the names of the users registered in it.
struct World {
    shards: Vec<Shard>,
    names: BTreeMap<UserId, String>,
}

const MAX: u32 = 6;

impl World {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(Shard::new).collect(),
            names: BTreeMap::new(),
        }
    }

    /// A user registered in `shard`.
    fn user(&mut self, shard: u32, hint: &str) -> UserId {
        let id = self.shards[shard as usize].register(hint);
        self.names.insert(id, hint.to_string());
        id
    }

    fn member(&self, user: UserId) -> NewMember {
        NewMember {
            user,
            username: self.names[&user].clone(),
        }
    }

    fn at(&mut self, shard: u32, command: &Command) -> Reply {
        self.shards[shard as usize].apply(command)
    }

    fn create(&mut self, creator: UserId, key: &str, members: &[UserId]) -> GroupId {
        let mut all = vec![self.member(creator)];
        all.extend(members.iter().map(|&m| self.member(m)));
        let command = Command::CreateGroup {
            creator,
            request_key: key.into(),
            name: "team".into(),
            members: all,
            max_members: MAX,
            now_ms: 1,
        };
        match self.at(map().shard_of_group_request(creator, key), &command) {
            Reply::GroupCreated { group, .. } => group,
            other => panic!("create: {other:?}"),
        }
    }

    fn change(&mut self, actor: UserId, group: GroupId, change: GroupChange) -> Reply {
        let command = Command::ChangeGroup {
            actor,
            group,
            change,
            max_members: MAX,
            now_ms: 2,
        };
        self.at(map().shard_of_group(group), &command)
    }

    fn add(&mut self, actor: UserId, group: GroupId, user: UserId) -> Reply {
        let member = self.member(user);
        self.change(
            actor,
            group,
            GroupChange::Add {
                member,
                role: Role::Member,
            },
        )
    }

    fn send(&mut self, sender: UserId, group: GroupId, id: &str) -> Reply {
        let command = Command::GroupSend {
            sender,
            group,
            client_msg_id: id.into(),
            body: id.as_bytes().to_vec(),
            content_type: String::new(),
            now_ms: 3,
        };
        self.at(map().shard_of_group(group), &command)
    }

    /// Delivers every outbox channel of every shard, the highest target
    /// first and each channel twice (as racing deliverers would), then
    /// forgets the items.
    fn flush(&mut self) {
        for source in 0..SHARDS {
            let mut channels: BTreeMap<u32, Vec<_>> = BTreeMap::new();
            for (key, _) in self.shards[source as usize].state.0.iter() {
                if let Some(r) = outbox_ref(key) {
                    channels.entry(r.target).or_default().push(r);
                }
            }
            let outbox = self.shards[source as usize].state.outbox();
            for (target, refs) in channels.into_iter().rev() {
                let items: Vec<_> = outbox
                    .iter()
                    .filter(|d| d.owners.iter().all(|&o| map().shard_of_user(o) == target))
                    .cloned()
                    .collect();
                for _ in 0..2 {
                    let batch = Command::Deliver(DeliveryBatch {
                        source,
                        items: items.clone(),
                    });
                    assert!(matches!(self.at(target, &batch), Reply::Delivered { .. }));
                }
                let done = Command::OutboxDone { items: refs };
                assert_eq!(self.at(source, &done), Reply::Forgotten);
            }
        }
    }

    /// `user`'s inbox entries of `group`.
    fn entries(&self, user: UserId, group: GroupId) -> Vec<InboxEntry> {
        self.shards[map().shard_of_user(user) as usize]
            .state
            .inbox(user, 0)
            .into_iter()
            .filter(|e| e.group == group)
            .collect()
    }

    /// The group sequences of `user`'s entries of `group`, in inbox order.
    fn seqs(&self, user: UserId, group: GroupId) -> Vec<u64> {
        self.entries(user, group)
            .iter()
            .map(|e| e.group_seq)
            .collect()
    }

    /// The groups `user`'s shard lists for it.
    fn groups_of(&self, user: UserId) -> Vec<GroupId> {
        let (from, to) = memberships_range(user);
        self.shards[map().shard_of_user(user) as usize]
            .state
            .0
            .range(from..to)
            .filter_map(|(k, _)| membership_group(k))
            .collect()
    }
}

#[test]
fn every_member_gets_every_group_entry_once_and_in_group_order() {
    let mut world = World::new();
    let users: Vec<UserId> = (0..5)
        .map(|i| world.user(i % SHARDS, &format!("u{i}")))
        .collect();
    let group = world.create(users[0], "k1", &users[1..]);
    for round in 0..4 {
        for (i, &sender) in users.iter().enumerate() {
            let reply = world.send(sender, group, &format!("m{round}-{i}"));
            assert!(matches!(reply, Reply::GroupSent { .. }), "{reply:?}");
        }
        // Fan-out of some messages lags behind later commits.
        if round % 2 == 1 {
            world.flush();
        }
    }
    world.flush();
    let expected: Vec<u64> = (1..=21).collect();
    for &user in &users {
        assert_eq!(world.seqs(user, group), expected, "user {user}");
        let entries = world.entries(user, group);
        assert_eq!(
            entries[0].event.as_ref().map(|e| e.kind),
            Some(GroupEventKind::Created)
        );
        assert!(
            entries.iter().all(|e| e.to == user),
            "each entry is the owner's"
        );
        assert_eq!(world.groups_of(user), vec![group]);
    }
    let retried = world.send(users[2], group, "m0-2");
    assert!(
        matches!(
            retried,
            Reply::GroupSent {
                group_seq: 4,
                duplicate: true,
                ..
            }
        ),
        "a retry answers the first commit: {retried:?}"
    );
    world.flush();
    assert_eq!(world.seqs(users[2], group), expected, "and stores nothing");

    // Another group in the same shard: the same client message id there is
    // a mistake of the client, refused rather than taken for a repeat.
    let other = (2..)
        .map(|i| world.create(users[0], &format!("k{i}"), &users[1..]))
        .find(|&g| map().shard_of_group(g) == map().shard_of_group(group))
        .expect("some group lands in the same shard");
    assert_eq!(
        world.send(users[2], other, "m0-2"),
        Reply::Refused(CommandError::ClientMessageIdReused)
    );
}

#[test]
fn members_get_exactly_what_was_committed_while_they_were_members() {
    let mut world = World::new();
    let owner = world.user(0, "owner");
    let stays = world.user(1, "stays");
    let leaves = world.user(2, "leaves");
    let late = world.user(3, "late");
    let group = world.create(owner, "k", &[stays, leaves]);
    world.send(owner, group, "before"); // seq 2
    assert!(matches!(
        world.change(owner, group, GroupChange::Remove { user: leaves }),
        Reply::GroupChanged {
            changed: true,
            group_seq: 3,
            ..
        }
    ));
    assert!(matches!(
        world.add(owner, group, late),
        Reply::GroupChanged {
            changed: true,
            group_seq: 4,
            ..
        }
    ));
    world.send(stays, group, "after"); // seq 5
    assert_eq!(
        world.send(leaves, group, "sneak"),
        Reply::Refused(CommandError::NotAMember(group)),
        "a removed member cannot send"
    );
    world.flush();
    assert_eq!(world.seqs(owner, group), vec![1, 2, 3, 4, 5]);
    assert_eq!(world.seqs(stays, group), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        world.seqs(leaves, group),
        vec![1, 2, 3],
        "nothing after removal"
    );
    assert_eq!(
        world.seqs(late, group),
        vec![4, 5],
        "nothing before joining"
    );
    let removal = world.entries(leaves, group).pop().and_then(|e| e.event);
    assert_eq!(
        removal.map(|e| (e.kind, e.user)),
        Some((GroupEventKind::Removed, leaves))
    );
    assert!(world.groups_of(leaves).is_empty());
    assert_eq!(world.groups_of(late), vec![group]);

    assert!(matches!(
        world.change(owner, group, GroupChange::Dissolve),
        Reply::GroupChanged { changed: true, .. }
    ));
    assert_eq!(
        world.send(owner, group, "gone"),
        Reply::Refused(CommandError::GroupDissolved(group))
    );
    assert!(matches!(
        world.change(owner, group, GroupChange::Dissolve),
        Reply::GroupChanged { changed: false, .. }
    ));
    world.flush();
    for user in [owner, stays, late] {
        assert!(
            world.groups_of(user).is_empty(),
            "dissolved: no longer listed"
        );
        let last = world.entries(user, group).pop().and_then(|e| e.event);
        assert_eq!(last.map(|e| e.kind), Some(GroupEventKind::Dissolved));
    }
}

#[test]
fn roles_and_limits_are_enforced_and_refusals_change_nothing() {
    let mut world = World::new();
    let owner = world.user(0, "owner");
    let admin = world.user(1, "admin");
    let plain = world.user(2, "plain");
    let other = world.user(3, "other");
    let outsider = world.user(1, "outsider");
    let group = world.create(owner, "k", &[plain]);
    let admin_member = world.member(admin);
    world.change(
        owner,
        group,
        GroupChange::Add {
            member: admin_member,
            role: Role::Admin,
        },
    );
    let shard = map().shard_of_group(group) as usize;
    let before = world.shards[shard].state.clone();
    let other_member = world.member(other);
    let refused = |reply: Reply| matches!(reply, Reply::Refused(_));
    assert!(
        refused(world.add(plain, group, other)),
        "a member cannot add"
    );
    assert!(refused(world.change(
        admin,
        group,
        GroupChange::Add {
            member: other_member,
            role: Role::Admin
        }
    )));
    assert!(refused(world.change(
        admin,
        group,
        GroupChange::Remove { user: owner }
    )));
    assert!(refused(world.change(plain, group, GroupChange::Dissolve)));
    assert!(refused(world.change(owner, group, GroupChange::Leave)));
    assert_eq!(
        world.send(outsider, group, "x"),
        Reply::Refused(CommandError::NotAMember(group))
    );
    assert_eq!(
        world.add(outsider, group, other),
        Reply::Refused(CommandError::NotAMember(group))
    );
    assert_eq!(
        world.send(owner, group + u64::from(SHARDS), "x"),
        Reply::Refused(CommandError::UnknownGroup(group + u64::from(SHARDS)))
    );
    assert_eq!(world.shards[shard].state, before, "refusals change nothing");

    assert!(matches!(
        world.add(admin, group, other),
        Reply::GroupChanged { changed: true, .. }
    ));
    assert!(
        matches!(
            world.add(admin, group, other),
            Reply::GroupChanged { changed: false, .. }
        ),
        "adding again changes nothing"
    );
    assert!(matches!(
        world.change(plain, group, GroupChange::Leave),
        Reply::GroupChanged { changed: true, .. }
    ));
    assert!(
        matches!(
            world.change(plain, group, GroupChange::Leave),
            Reply::GroupChanged { changed: false, .. }
        ),
        "leaving again changes nothing"
    );
    // owner, admin, other: 3 members; fill up to MAX.
    for i in 0..3 {
        let user = world.user(i, &format!("filler{i}"));
        assert!(matches!(
            world.add(owner, group, user),
            Reply::GroupChanged { changed: true, .. }
        ));
    }
    let one_more = world.user(3, "onemore");
    assert_eq!(
        world.add(owner, group, one_more),
        Reply::Refused(CommandError::GroupFull { max: MAX })
    );
}

#[test]
fn a_retried_creation_answers_the_first_group() {
    let mut world = World::new();
    let owner = world.user(0, "owner");
    let friend = world.user(1, "friend");
    let first = world.create(owner, "same-key", &[friend]);
    let shard = map().shard_of_group_request(owner, "same-key");
    let members = vec![world.member(owner), world.member(friend)];
    let again = world.at(
        shard,
        &Command::CreateGroup {
            creator: owner,
            request_key: "same-key".into(),
            name: "team".into(),
            members,
            max_members: MAX,
            now_ms: 9,
        },
    );
    assert!(matches!(
        again,
        Reply::GroupCreated { group, duplicate: true, .. } if group == first
    ));
    assert_eq!(
        map().shard_of_group(first),
        shard,
        "the group lives where it was created"
    );
    let second = world.create(owner, "other-key", &[]);
    assert_ne!(first, second);
    world.flush();
    assert_eq!(world.groups_of(friend), vec![first]);
    let mut owners_groups = world.groups_of(owner);
    owners_groups.sort();
    let mut both = vec![first, second];
    both.sort();
    assert_eq!(owners_groups, both);
}
