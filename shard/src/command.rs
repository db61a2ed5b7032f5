//! The commands a shard's Raft log carries, and the replies they produce.
//!
//! Both are encoded as MessagePack with named fields: they sit in the Raft log
//! for as long as it is kept, so an added field must not break old entries.

use serde::{Deserialize, Serialize};

use crate::{GroupId, MessageId, ShardId, UserId, Version};

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
    /// Applies a run of another shard's outbox items for this shard;
    /// proposed to the items' target. Items of one source apply exactly
    /// once and in item order (see [`DeliveryBatch`]).
    Deliver(DeliveryBatch),
    /// Forgets outbox items whose delivery the target acknowledged.
    OutboxDone {
        /// The delivered items.
        items: Vec<OutboxRef>,
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
    /// Creates a group; proposed to `shard_of_group_request(creator,
    /// request_key)`, which then owns the group. Idempotent by
    /// (creator, request key).
    CreateGroup {
        /// The creator, the group's owner.
        creator: UserId,
        /// The client's id for this creation.
        request_key: String,
        /// The group's name.
        name: String,
        /// The initial members, the creator among them; the proposer has
        /// checked that each exists (users are never deleted).
        members: Vec<NewMember>,
        /// The most members the group may have (a node setting, carried
        /// here so every replica judges alike).
        max_members: u32,
        /// Server time of the request, milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Changes a group's membership; proposed to `shard_of_group(group)`.
    ChangeGroup {
        /// Who asks for the change.
        actor: UserId,
        /// The group.
        group: GroupId,
        /// What changes.
        change: GroupChange,
        /// As in `CreateGroup`.
        max_members: u32,
        /// Server time of the request, milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Sends a message to every member of a group; proposed to
    /// `shard_of_group(group)`. Deduplicated like `Send`.
    GroupSend {
        /// The authenticated sender, who must be a member.
        sender: UserId,
        /// The group.
        group: GroupId,
        /// The sender's id for this message: a retry reuses it.
        client_msg_id: String,
        /// Opaque message bytes.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// MIME-like content type chosen by the client.
        content_type: String,
        /// Server time of the request, milliseconds since the Unix epoch.
        now_ms: u64,
    },
}

/// A user joining a group, with the name shown to the other members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMember {
    /// The user.
    pub user: UserId,
    /// The username as registered.
    pub username: String,
}

/// A change of a group's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupChange {
    /// Adds `member` with `role` (owner or admin only; admins only by the
    /// owner). Adding a member again changes nothing.
    Add {
        /// Who joins.
        member: NewMember,
        /// Its role: `Member` or `Admin`.
        role: Role,
    },
    /// Removes `user` (owner, or an admin removing a plain member).
    /// Removing a non-member changes nothing.
    Remove {
        /// Who is removed.
        user: UserId,
    },
    /// The actor leaves (not the owner). Leaving again changes nothing.
    Leave,
    /// The owner dissolves the group. Dissolving again changes nothing.
    Dissolve,
}

/// A member's role in a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The creator: may do everything.
    Owner,
    /// May add and remove plain members.
    Admin,
    /// May send, list members and leave.
    Member,
}

/// An outbox item a command made (or, for a repeated command, found), for
/// the proposer to hand to the courier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// Which item.
    pub to: OutboxRef,
    /// The item itself when the command just made it (the courier then
    /// needs not read it back); `None` in the answer to a repeat.
    pub delivery: Option<Delivery>,
}

/// Names one outbox item: the shard it goes to and its number in the
/// channel from this shard to that one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutboxRef {
    /// The shard that must apply the item.
    pub target: ShardId,
    /// The item's number in the (source, target) channel: 1, 2, 3, …
    pub item: u64,
}

/// An entry one shard committed that another shard must append to the
/// inboxes of some of its users: one outbox item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The item's number in the (source, target) channel: 1, 2, 3, …
    pub item: u64,
    /// Whose inboxes receive the entry, all in the target shard.
    pub owners: Vec<UserId>,
    /// The entry; its version is assigned in each owner's inbox.
    pub entry: InboxEntry,
}

/// Consecutive items of one source shard's channel to the shard that
/// applies them.
///
/// The target keeps, per source, the number of the last item it applied.
/// It skips items up to it (a repeat), applies the next ones in order, and
/// refuses a batch that would leave a hole. So items reach the target
/// exactly once and in the order the source committed them, whoever
/// delivers them and however often: that order is what keeps a group's
/// messages in group order in every member's inbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryBatch {
    /// The shard whose outbox holds the items.
    pub source: ShardId,
    /// Items with consecutive numbers, lowest first.
    pub items: Vec<Delivery>,
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
    /// The group it was sent to; 0 for a message to one user.
    #[serde(default)]
    pub group: GroupId,
    /// Its position in the group's order; 0 for a message to one user.
    #[serde(default)]
    pub group_seq: u64,
    /// Set when the entry is a membership change rather than a message.
    #[serde(default)]
    pub event: Option<GroupEvent>,
}

impl InboxEntry {
    /// A message from `from` to the user `to`, before it is placed in an
    /// inbox.
    pub fn direct(
        message_id: MessageId,
        from: UserId,
        to: UserId,
        body: Vec<u8>,
        content_type: String,
        timestamp_ms: u64,
    ) -> Self {
        Self {
            version: 0,
            message_id,
            from,
            to,
            body,
            content_type,
            timestamp_ms,
            group: 0,
            group_seq: 0,
            event: None,
        }
    }

    /// A message from `from` to `group` at `group_seq`, before it is placed
    /// in the members' inboxes.
    pub fn group_message(
        message_id: MessageId,
        from: UserId,
        group: GroupId,
        group_seq: u64,
        body: Vec<u8>,
        content_type: String,
        timestamp_ms: u64,
    ) -> Self {
        Self {
            group,
            group_seq,
            ..Self::direct(message_id, from, 0, body, content_type, timestamp_ms)
        }
    }

    /// The entry as it stands in `owner`'s inbox at `version`. One group
    /// entry serves every member, so its addressee becomes the owner.
    pub fn placed(mut self, owner: UserId, version: Version) -> Self {
        self.version = version;
        if self.group != 0 {
            self.to = owner;
        }
        self
    }
}

/// A change of a group's membership, as an inbox entry shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupEvent {
    /// What happened.
    pub kind: GroupEventKind,
    /// To whom.
    pub user: UserId,
    /// That user's name.
    pub username: String,
    /// The group's name.
    pub group_name: String,
}

/// What happened to a group's membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEventKind {
    /// The group was created by `user`.
    Created,
    /// `user` joined.
    Added,
    /// `user` was removed.
    Removed,
    /// `user` left.
    Left,
    /// The group was dissolved by `user`.
    Dissolved,
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
        /// The outbox item carrying the sender's copy, when the sender
        /// lives in another shard: the proposer delivers it before
        /// answering (the outbox pump would, later).
        copy: Option<Outgoing>,
    },
    /// The batch's items are applied (now or by an earlier delivery).
    Delivered {
        /// The number of the last item of the source applied here.
        through: u64,
        /// The inbox entries this command appended: (owner, version).
        appended: Vec<(UserId, Version)>,
    },
    /// The group exists.
    GroupCreated {
        /// Its id.
        group: GroupId,
        /// True when this repeats an earlier creation's reply.
        duplicate: bool,
        /// The outbox items carrying the creation to members elsewhere.
        fanout: Vec<Outgoing>,
        /// The inboxes in this shard the entry went to: (owner, version).
        appended: Vec<(UserId, Version)>,
    },
    /// A membership change was applied, or was found done already.
    GroupChanged {
        /// False when the change was done already; nothing changed.
        changed: bool,
        /// The change's group sequence (0 when unchanged).
        group_seq: u64,
        /// The outbox items carrying it to members elsewhere.
        fanout: Vec<Outgoing>,
        /// The inboxes in this shard the entry went to: (owner, version).
        appended: Vec<(UserId, Version)>,
    },
    /// The group message is committed in the group's order.
    GroupSent {
        /// The message's id.
        message_id: MessageId,
        /// Its group sequence.
        group_seq: u64,
        /// Its server timestamp.
        timestamp_ms: u64,
        /// As in `Sent`.
        duplicate: bool,
        /// The outbox items carrying it to members elsewhere.
        fanout: Vec<Outgoing>,
        /// The inboxes in this shard the entry went to: (owner, version).
        appended: Vec<(UserId, Version)>,
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
    /// The client message id was used before by this sender for a message
    /// to someone else; ids are unique among all of a sender's messages.
    #[error("this client message id was used for a message to another user or group")]
    ClientMessageIdReused,
    /// The command bytes did not decode, or break a rule no client input
    /// can (e.g. a delivery batch out of order within itself).
    #[error("undecodable command: {0}")]
    Malformed(String),
    /// A delivery batch starts after the next item the target expects from
    /// its source: applying it would leave a hole.
    #[error(
        "delivery from shard {source_shard} out of order: expected item {expected}, got {got}"
    )]
    OutOfOrder {
        /// The batch's source shard.
        source_shard: ShardId,
        /// The item the target applies next.
        expected: u64,
        /// The batch's first item.
        got: u64,
    },
    /// The request key of a group creation is empty or longer than 128 bytes.
    #[error("request key must be 1 to 128 bytes")]
    InvalidRequestKey,
    /// A group name is empty, longer than 64 characters or has control
    /// characters.
    #[error("a group name has 1 to 64 characters and no control characters")]
    InvalidGroupName,
    /// No group has this id.
    #[error("no such group: {0}")]
    UnknownGroup(GroupId),
    /// The group was dissolved.
    #[error("group {0} was dissolved")]
    GroupDissolved(GroupId),
    /// The group would have more members than allowed.
    #[error("a group has at most {max} members")]
    GroupFull {
        /// The limit.
        max: u32,
    },
    /// The actor is not a member of the group.
    #[error("not a member of group {0}")]
    NotAMember(GroupId),
    /// The actor's role does not allow the change.
    #[error("not allowed: {0}")]
    NotAllowed(String),
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
