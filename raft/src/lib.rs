//! Many Raft groups per node, on one RocksDB, over one gRPC connection per peer.
//!
//! `fishchat-raft` is FishChat's replacement for etcd, Kafka and HBase. It owns
//! consensus and durability and knows nothing about chat: a group runs whatever
//! [`StateMachine`] the application hands it.
//!
//! # How it works
//!
//! A [`GroupHost`] is one node. It hosts any number of Raft groups, each an
//! [`openraft`] instance identified by a [`GroupId`]. Three things are shared by
//! every group on the node, and that sharing is the point of the crate:
//!
//! * **One RocksDB.** Raft log entries, Raft metadata (vote, committed, purged)
//!   and state-machine data live in three column families, every key prefixed
//!   with the big-endian group id, so one group's data is one contiguous key
//!   range (see [`storage`]).
//! * **One write-ahead log, one fsync for many groups.** A log append is written
//!   to RocksDB without a sync, so it is readable at once, and openraft is told
//!   it is durable only after a dedicated syncer thread has synced the WAL. The
//!   syncer takes every append waiting at that moment, from every group, and
//!   covers them all with one `SyncWAL` (group commit). Under load one fsync
//!   acknowledges appends of many groups; idle, an append waits for one fsync.
//! * **One entry for many commands.** Writes to a group queue in front of it
//!   and leave as one Raft entry holding every command waiting, with at most
//!   two entries of a group in flight (see `proposer`): under load, one
//!   append, one replication round and one apply serve many commands; idle,
//!   a command leaves at once, alone.
//! * **Leaders spread over the nodes.** A node that leads two or more groups
//!   more than another hands one over (openraft's leader transfer) to a
//!   caught-up replica there, so the work returns to a node that restarts
//!   (see `balance`).
//! * **One gRPC connection per peer node.** Every group's append-entries, vote
//!   and snapshot-chunk RPCs to a peer share one HTTP/2 channel that reconnects
//!   by itself; openraft backs off while a peer is unreachable (see
//!   [`network`]).
//!
//! State machines are deterministic functions over a key-value view of their
//! group's key range ([`StateTxn`]): a committed batch is applied into one
//! RocksDB `WriteBatch` together with the new applied index, so applying is
//! atomic. Because the state lives in that key range, the host can snapshot any
//! state machine itself: a snapshot is the group's range read from a
//! consistent RocksDB view, shipped to a lagging follower in chunks, and the
//! log is purged behind it.
//!
//! # What it promises
//!
//! * A write returned `Ok` by [`GroupHost::write`] is committed by a majority
//!   of the group's voters, each of which synced it to disk.
//! * Every replica applies the same commands in the same order; a replica that
//!   restarts replays from disk, and one that fell behind the purged log gets a
//!   snapshot.
//! * A write on a follower fails with [`WriteError::NotLeader`], naming the
//!   leader when it is known. Traffic for a group a node does not host, and
//!   undecodable peer messages, get typed errors and never a panic.
//! * Once the application has set the node's cluster tag
//!   ([`GroupHost::set_cluster_tag`]), a peer request tagged with another
//!   cluster is refused before any group sees it, so groups formed apart
//!   never exchange entries.
//!
//! # What it must not know
//!
//! Users, messages, inboxes, shards: anything of the chat domain. Those belong
//! to `fishchat-shard`, which plugs in through [`StateMachine`].

mod balance;
mod codec;
pub mod error;
mod forward;
pub mod host;
mod local;
pub mod network;
mod proposer;
mod read_rounds;
pub mod state_machine;
pub mod storage;
pub mod types;

pub use error::{HostError, ReadError, WriteError};
pub use host::{GroupHost, GroupStatus, HostConfig, RaftTiming, Role};
pub use network::{ClusterTag, PeerStats, TagError, CLUSTER_HEADER};
pub use state_machine::{ApplyError, MemoryState, StateMachine, StateTxn};
pub use types::{Batch, Command, GroupId, KeyValue, NodeId, Response, Responses, TypeConfig};
