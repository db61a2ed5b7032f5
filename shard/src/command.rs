//! The commands a shard's Raft log carries, and the replies they produce.
//!
//! Both are encoded as MessagePack with named fields: they sit in the Raft log
//! for as long as it is kept, so an added field must not break old entries.

use serde::{Deserialize, Serialize};

use crate::{MessageId, ShardId, UserId, Version};

/// A change to a shard's state, proposed by a node and applied by every
/// replica in log order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates an account; proposed to `shard_of_username(username)`.
    /// Idempotent: the same username with the same (salted) hash answers
    /// the first registration again.
    Register {
        /// The name, as typed; unique without regard to case.
        username: String,
        /// The password's Argon2 hash in PHC string form; never the password.
        password_hash: String,
        /// Server time of the request, milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Sends a message to `recipient`; proposed to `shard_of_user(recipient)`.
    Send {
        /// The authenticated sender.
        sender: UserId,
        /// The sender's id for this message: a retry reuses it.
        client_msg_id: String,
        /// The receiving user.
        recipient: UserId,
        /// Opaque message bytes.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// MIME-like content type chosen by the client, e.g. `text/plain`.
        content_type: String,
        /// Server time of the request, milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Delivers an outbox item of another shard; proposed to the item's target.
    Deliver(Delivery),
    /// Forgets outbox items whose delivery the target acknowledged.
    OutboxDone {
        /// Sequence numbers of the delivered items.
        items: Vec<u64>,
    },
    /// Records a named device's new session; proposed to the user's shard.
    /// The device's earlier session, if any, is revoked.
    OpenSession {
        /// The user logging in.
        user: UserId,
        /// The new session's id (random, chosen by the node).
        session: u64,
        /// The device name (not empty).
        device: String,
        /// When the new session's token expires, ms since the Unix epoch.
        expires_ms: u64,
        /// The session this login refreshes (the one the connection is
        /// bound to), which stays valid; 0 for none.
        #[serde(default)]
        refreshes: u64,
    },
    /// Revokes a session (logout); proposed to the user's shard. Idempotent.
    Revoke {
        /// The session's user.
        user: UserId,
        /// The session.
        session: u64,
        /// When the session's token expires anyway.
        expires_ms: u64,
    },
}

/// An entry one shard committed that another shard must append to an inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The shard whose outbox holds the item.
    pub source: ShardId,
    /// The item's sequence number in that outbox.
    pub item: u64,
    /// Whose inbox receives the entry.
    pub owner: UserId,
    /// The entry; its version is assigned by the receiving shard.
    pub entry: InboxEntry,
}

/// One entry of a user's inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Position in the owner's inbox (0 until the owner's shard assigns it).
    pub version: Version,
    /// The message's cluster-wide id: the same in the recipient's entry and
    /// the sender's copy.
    pub message_id: MessageId,
    /// Who sent it.
    pub from: UserId,
    /// Who it was sent to.
    pub to: UserId,
    /// Opaque message bytes.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The content type given by the sender.
    pub content_type: String,
    /// When the message was committed, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

/// What applying a [`Command`] produced. Invalid commands get a reply that
/// says why and change nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The account was created.
    Registered {
        /// The new user's id.
        user_id: UserId,
    },
    /// The message is in the recipient's inbox.
    Sent {
        /// The message's id.
        message_id: MessageId,
        /// Its version in the recipient's inbox.
        version: Version,
        /// Its server timestamp.
        timestamp_ms: u64,
        /// True when this repeats the reply to an earlier send with the same
        /// (sender, client message id); nothing new was stored.
        duplicate: bool,
        /// The sender's copy, when it lives in another shard and is still
        /// in this shard's outbox: the proposer delivers it at once (the
        /// outbox pump would, later).
        copy: Option<Delivery>,
    },
    /// The delivery is in the owner's inbox (now or by an earlier delivery of
    /// the same item).
    Delivered {
        /// The entry's version in the owner's inbox.
        version: Version,
    },
    /// Outbox items were forgotten.
    Forgotten,
    /// The device's session is recorded.
    SessionOpened {
        /// The device's earlier session, now revoked.
        replaced: Option<u64>,
    },
    /// The session is revoked.
    Revoked,
    /// The command was refused; nothing changed.
    Refused(CommandError),
}

/// Why a command was refused. Deterministic: every replica refuses alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The username is registered already (in any letter case).
    #[error("username is taken")]
    UsernameTaken,
    /// The username is empty, too long, or has characters outside
    /// `a-z A-Z 0-9 _ . -`.
    #[error("username must be 1 to 32 characters of a-z, A-Z, 0-9, '_', '.', '-'")]
    InvalidUsername,
    /// No user has this id.
    #[error("no such user: {0}")]
    UnknownUser(UserId),
    /// The command reached a shard that does not own its subject.
    #[error("shard {shard} does not own {what}")]
    WrongShard {
        /// The shard that applied the command.
        shard: ShardId,
        /// What it does not own.
        what: String,
    },
    /// The client message id is empty or longer than 128 bytes.
    #[error("client message id must be 1 to 128 bytes")]
    InvalidClientMessageId,
    /// The command bytes did not decode.
    #[error("undecodable command: {0}")]
    Malformed(String),
}

impl Command {
    /// Encodes the command for proposing.
    pub fn encode(&self) -> Vec<u8> {
        crate::keys::encode(self)
    }

    /// Decodes a proposed command.
    pub fn decode(bytes: &[u8]) -> Result<Self, CommandError> {
        crate::keys::decode(bytes).map_err(|e| CommandError::Malformed(e.to_string()))
    }
}

impl Reply {
    /// Encodes the reply for the proposer.
    pub fn encode(&self) -> Vec<u8> {
        crate::keys::encode(self)
    }

    /// Decodes a reply returned by the group host.
    pub fn decode(bytes: &[u8]) -> Result<Self, CommandError> {
        crate::keys::decode(bytes).map_err(|e| CommandError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies_round_trip() {
        let send = Command::Send {
            sender: 17,
            client_msg_id: "m-1".into(),
            recipient: 33,
            body: vec![0, 159, 146, 150],
            content_type: "application/octet-stream".into(),
            now_ms: 1_700_000_000_000,
        };
        assert_eq!(Command::decode(&send.encode()), Ok(send));
        let reply = Reply::Refused(CommandError::UnknownUser(5));
        assert_eq!(Reply::decode(&reply.encode()), Ok(reply));
    }

    #[test]
    fn garbage_is_a_typed_error() {
        assert!(matches!(
            Command::decode(b"\xc1garbage"),
            Err(CommandError::Malformed(_))
        ));
    }
}
