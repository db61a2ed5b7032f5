//! The FishChat node process.
//!
//! A node is the whole system in one process: it hosts a replica of every
//! shard (one Raft group each, run by `fishchat-raft` with the chat state
//! machine of `fishchat-shard`), serves its peers over gRPC and its operators
//! over HTTP. The QUIC endpoint for clients joins it with the client protocol
//! (`proto/client.proto`).
//!
//! It owns configuration ([`config`]), forming or reopening the cluster on
//! start ([`node`]), and the admin API ([`admin`]). It promises that a node
//! started on an empty data directory with a peer list forms the shards with
//! those peers, that a node restarted on its data directory rejoins them, and
//! that SIGTERM stops it cleanly.

pub mod admin;
pub mod config;
pub mod node;

pub use config::Settings;
pub use node::Node;
