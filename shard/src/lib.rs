//! FishChat's chat domain: what a user shard stores and how it changes.
//!
//! Users are spread over a fixed number of shards; each shard is one Raft
//! group run by `fishchat-raft`, and this crate is the state machine those
//! groups run ([`ChatMachine`]) plus the arithmetic that says which shard owns
//! what ([`ShardMap`]).
//!
//! # What a shard holds
//!
//! * **Accounts** of the users whose username hashes to it. A user id is
//!   assigned by that shard and encodes it (`id mod shards = shard`), so a
//!   user's account, inbox and username index entry all live in one shard and
//!   registering is a single-shard write.
//! * **Inboxes.** Each user's inbox is a counter and entries under versions
//!   1, 2, 3, … The version is assigned when the send is *applied*, inside
//!   the Raft state machine, so it is atomic and gap-free by construction
//!   (guarantee G2); FishChatServer2's read-then-write counter in etcd was not.
//! * **The dedup table**: (sender, client message id) → the first result, so a
//!   retried send returns the same message id and version and creates nothing
//!   (G3).
//! * **Revoked sessions** of its users (logout, a device's newer login), kept
//!   until the session's token expires, and each named device's current
//!   session.
//! * **Groups** whose id maps to it: name, owner, members with roles, and
//!   the group sequence that orders everything that happens in the group
//!   (guarantee G5). A group message commits here first; its fan-out to the
//!   members' inboxes goes through the outbox. Each user's list of groups
//!   lives in the user's shard and follows the membership entries in the
//!   user's inbox.
//! * **The outbox**: entries this shard committed that must reach inboxes in
//!   another shard (the sender's own copy of a message when the sender
//!   lives elsewhere; a group entry for the members who live elsewhere).
//!   Items form one channel per target shard, numbered 1, 2, 3, … The
//!   target remembers the last item of each source it applied, so a channel
//!   delivers exactly once and in order; the source deletes items once
//!   delivery is acknowledged.
//!
//! # What it promises
//!
//! [`ChatMachine::apply`](fishchat_raft::StateMachine::apply) is deterministic
//! and pure: it sees only the command (which carries the time) and the key-value
//! state, so every replica computes the same result. A command that is invalid
//! (unknown user, username taken, wrong shard) gets a [`Reply`] saying so and
//! changes nothing; only a storage failure is an error.
//!
//! # What it must not know
//!
//! Sockets, sessions, QUIC, gRPC or which node leads what. Password hashing
//! happens before a command is proposed; the shard stores the hash.

mod command;
mod groups;
mod keys;
mod machine;
mod shard_map;

pub use command::{
    Command, CommandError, Delivery, DeliveryBatch, GroupChange, GroupEvent, GroupEventKind,
    InboxEntry, NewMember, OutboxRef, Outgoing, Reply, Role,
};
pub use groups::{valid_group_name, MAX_GROUP_NAME};
pub use keys::{
    account_key, channel_watermark_key, decode_account, decode_delivery, decode_entry,
    decode_group, decode_u64, group_key, group_seq_key, inbox_range, latest_version_key,
    membership_group, memberships_range, outbox_channel_range, outbox_counter_key, outbox_ref,
    revoked_key, user_key, Account, DecodeError, Group, Member,
};
pub use machine::{valid_username, ChatMachine};
pub use shard_map::{GroupId, ShardId, ShardMap, UserId};

/// A position in one user's inbox: 1 for the first entry, then 2, 3, …
pub type Version = u64;

/// A message's id, unique in the cluster: `sequence × shards + shard` of the
/// shard that committed it.
pub type MessageId = u64;
