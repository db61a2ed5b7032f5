//! Raft traffic between nodes, over the `RaftPeer` gRPC service of
//! `fishchat-proto`.
//!
//! Every group on a node sends through one [`PeerTransport`], which keeps one
//! lazily connected HTTP/2 channel per peer node: all groups' append-entries,
//! votes and snapshot chunks to that peer are multiplexed over it, and tonic
//! reconnects it after a failure. Appends that wait while earlier ones to the
//! same peer are unanswered go together in one RPC (see `batch`). A peer that cannot be reached is reported to
//! openraft as `Unreachable`, which makes the group back off before retrying.
//!
//! The receiving side, [`PeerService`], looks the group up by id and hands the
//! decoded request to its openraft instance. A message for a group the node
//! does not host, or one whose payload does not decode, is answered with a
//! typed `PeerError`; it never reaches openraft and never panics. A request
//! tagged with another cluster's tag is refused before that (see
//! `cluster_tag`). It also
//! watches votes, so that a follower with a longer log stands at once when a
//! candidate with a shorter one cannot win (see `stand`).

mod batch;
mod client;
mod cluster_tag;
mod server;
mod stand;

pub use batch::PeerStats;
pub(crate) use client::GroupNetwork;
pub use client::PeerTransport;
pub use cluster_tag::{ClusterTag, TagError, CLUSTER_HEADER};
pub use server::GroupTable;
pub(crate) use server::PeerService;

/// Largest gRPC message a node sends or accepts on the peer port. Snapshot
/// chunks are far smaller (see `RaftTiming::snapshot_chunk_bytes`); this bounds
/// append-entries batches of large commands.
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The client of a peer's `RaftPeer` service: every request carries this
/// node's cluster tag.
type PeerClient = fishchat_proto::peer::raft_peer_client::RaftPeerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ClusterTag>,
>;

/// What a peer's group answered: its reply, or why it could not (the group
/// stopped). The sender treats the latter like a network failure.
type RemoteOutcome<P> = Result<P, String>;

/// One piece of a snapshot on its way to a follower. The follower gathers
/// the pieces of one snapshot in order and installs it on the last; the
/// answer to every other piece is `None`.
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotChunk {
    /// The leader's vote.
    vote: crate::types::Vote,
    /// What the snapshot covers.
    meta: crate::types::SnapshotMeta,
    /// Where this piece starts in the snapshot's bytes.
    offset: u64,
    /// The piece.
    data: serde_bytes::ByteBuf,
    /// Whether this is the last piece.
    done: bool,
}
