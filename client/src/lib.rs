//! The FishChat client SDK.
//!
//! This crate owns the client side of the protocol in `docs/protocol.md`:
//! QUIC with TLS 1.3 trusting only the cluster CA, one framed `Request` and
//! `Response` per stream, the push stream, and the session life cycle. It
//! knows nothing of the server's internals (shards, Raft, storage): only the
//! wire types of `fishchat-proto`.
//!
//! Layers, lowest first:
//!
//! - [`Connection`]: one QUIC connection to one node. [`Connection::request`]
//!   sends one request and returns the server's answer as it came;
//!   [`Connection::raw`] writes arbitrary bytes (for tests of bad frames).
//! - [`Client`]: a session with the cluster. Every operation goes through
//!   one retry loop (policy in [`retry`]) that, on a retryable error, a
//!   timeout or a lost connection, repeats the *same* request, failing over
//!   to the next node and logging in again as needed, until the retry
//!   deadline. [`Client::request_once`] bypasses it.
//! - Group chat ([`Client::create_group`], [`Client::send_group`], membership
//!   changes and listings) on the same retry loop; group messages and
//!   membership events arrive as ordinary inbox entries.
//! - [`Client::incoming`]: every new inbox entry exactly once and in version
//!   order, from notifies, a sync timer and resyncs after reconnects.
//!
//! Promises: a `send` or `send_group` retried by this crate always repeats
//! its `client_msg_id`, and a `create_group` its `request_key`, so each is
//! carried out at most once; nothing from the network or a file can make
//! this crate panic; every network wait has a timeout.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fishchat_client::ClientError> {
//! use fishchat_client::{Client, ClientConfig};
//! let config = ClientConfig::from_ca_file(vec!["127.0.0.1:7101".into()], "data/ca.pem")?;
//! let client = Client::connect(config).await?;
//! client.login("alice", "correct horse", None).await?;
//! let bob = client.lookup("bob").await?;
//! client
//!     .send(bob.user_id, "a1b2c3", b"hello".to_vec(), "text/plain; charset=utf-8")
//!     .await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod client;
mod config;
mod connection;
mod error;
mod failover;
mod groups;
mod incoming;
pub mod retry;
mod tls;

pub use client::Client;
pub use config::{parse_server_list, ClientConfig, SharedEndpoint, DEFAULT_SERVER_NAME};
pub use connection::{Connection, PushStream};
pub use error::ClientError;
pub use tls::{quic_client_config, ALPN};

/// The wire types (`proto/client.proto`), re-exported for callers.
pub use fishchat_proto::client as proto;

/// A fresh client message id for [`Client::send`] and [`Client::send_group`]
/// (and the request key of [`Client::create_group`]): 16 bytes from the
/// system random source, as 32 hex digits, unique among a sender's messages
/// for all practical purposes.
pub fn new_client_msg_id() -> Result<String, ClientError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ClientError::Config("the system random source failed".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The content type of UTF-8 text messages.
pub const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_message_ids_are_32_hex_digits_and_differ() {
        let a = new_client_msg_id().expect("id");
        let b = new_client_msg_id().expect("id");
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
