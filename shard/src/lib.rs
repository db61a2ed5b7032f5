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
//! * **The outbox**: entries this shard committed that must reach another
//!   shard (the sender's own copy of a message when the sender lives
//!   elsewhere). Each item has a shard-local sequence number; the receiving
//!   shard remembers (source shard, item) so delivery is idempotent, and the
//!   source deletes an item once delivery is acknowledged.
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
mod keys;
mod machine;
mod shard_map;

pub use command::{Command, CommandError, Delivery, InboxEntry, Reply};
pub use keys::{
    account_key, decode_account, decode_delivery, decode_entry, inbox_range, latest_version_key,
    outbox_range, received_item, received_range, revoked_key, Account, DecodeError,
};
pub use machine::{valid_username, ChatMachine};
pub use shard_map::{ShardId, ShardMap, UserId};

/// A position in one user's inbox: 1 for the first entry, then 2, 3, …
pub type Version = u64;

/// A message's id, unique in the cluster: `sequence × shards + shard` of the
/// shard that committed it.
pub type MessageId = u64;
