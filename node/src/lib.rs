//! The FishChat node process.
//!
//! A node is the whole system in one process: it hosts a replica of every
//! shard (one Raft group each, run by `fishchat-raft` with the chat state
//! machine of `fishchat-shard`), serves its peers over gRPC and its operators
//! over HTTP, and its clients over QUIC with the client protocol
//! (`proto/client.proto`).
//!
//! It owns configuration ([`config`]), the cluster's keys ([`tls`], [`token`]),
//! forming or reopening the cluster on start ([`node`], with the meta group
//! in [`meta`]), the client endpoint
//! ([`quic`]) and the operations it serves ([`chat`], with failed logins
//! throttled by [`throttle`]), the session table and
//! its cluster-wide events ([`sessions`], [`events`], [`news`], with the
//! [`directory`] of which node holds whose sessions), the outbox pump
//! ([`outbox`]) and the admin API ([`admin`]). It promises that a node
//! started on an empty data directory with a peer list forms the shards with
//! those peers, that a node restarted on its data directory rejoins them, and
//! that SIGTERM stops it cleanly.

pub mod admin;
pub mod chat;
pub mod config;
pub mod courier;
pub mod directory;
pub mod events;
pub mod groups;
pub mod meta;
pub mod news;
pub mod node;
pub mod outbox;
pub mod quic;
pub mod revocations;
pub mod sessions;
pub mod throttle;
pub mod tls;
pub mod token;

pub use config::Settings;
pub use node::Node;
