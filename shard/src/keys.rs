//! Where a shard keeps each kind of record in its key-value state.
//!
//! | key | value |
//! |---|---|
//! | `a` · lowercased username | [`Account`] |
//! | `u` · user id (u64 BE) | username as registered |
//! | `n` · counter name | next sequence number (u64 BE) |
//! | `v` · user id | latest inbox version (u64 BE) |
//! | `i` · user id · version (u64 BE) | [`InboxEntry`] |
//! | `d` · sender id · client message id | [`SendReceipt`] |
//! | `o` · target shard (u32 BE) · item (u64 BE) | [`Delivery`] waiting to reach its target shard |
//! | `r` · source shard (u32 BE) | last item of that source's channel applied here (u64 BE) |
//! | `k` · user id · session id (u64 BE) | revoked session: its expiry (u64 BE ms) |
//! | `e` · user id · device name | [`DeviceSession`]: the device's current session |
//! | `g` · group id | [`Group`]: name, owner, members |
//! | `q` · group id | the group's latest group sequence (u64 BE) |
//! | `c` · creator id · request key | [`CreateReceipt`]: the group a creation made |
//! | `m` · user id · group id | the user is a member of the group: its name |
//!
//! Integers are big-endian so that keys sort numerically: an inbox is one
//! contiguous range in version order, which is what sync scans.

use serde::{Deserialize, Serialize};

use crate::command::{OutboxRef, Role};
use crate::{Delivery, GroupId, InboxEntry, MessageId, ShardId, UserId, Version};

/// A registered user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The id the shard assigned.
    pub user_id: UserId,
    /// The name as registered.
    pub username: String,
    /// Argon2 hash in PHC string form.
    pub password_hash: String,
    /// When the account was created, ms since the Unix epoch.
    pub created_ms: u64,
}

/// The first result of a send, kept to answer its retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SendReceipt {
    pub(crate) message_id: MessageId,
    pub(crate) version: Version,
    pub(crate) timestamp_ms: u64,
    /// The outbox items the send made (the sender's copy of a message to
    /// one user; the fan-out of a group message).
    #[serde(default)]
    pub(crate) fanout: Vec<OutboxRef>,
    /// Whom the send was for, so that a client message id reused for
    /// another addressee is refused instead of answered as a repeat.
    #[serde(default)]
    pub(crate) addressee: Option<Addressee>,
}

/// Whom a send was addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Addressee {
    User(UserId),
    Group(GroupId),
}

/// What a group creation made, kept to answer its retries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CreateReceipt {
    pub(crate) group: GroupId,
    pub(crate) fanout: Vec<OutboxRef>,
}

/// A group, as its shard keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its id.
    pub id: GroupId,
    /// Its name.
    pub name: String,
    /// The creator.
    pub owner: UserId,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: u64,
    /// True once the owner dissolved it.
    pub dissolved: bool,
    /// Its members, by user id.
    pub members: Vec<Member>,
}

/// A member of a [`Group`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The user.
    pub user: UserId,
    /// The username as registered.
    pub username: String,
    /// What it may do.
    pub role: Role,
    /// The group sequence of the entry that made it a member.
    pub joined_seq: u64,
}

impl Group {
    /// `user`'s membership, if it is a member.
    pub fn member(&self, user: UserId) -> Option<&Member> {
        self.members
            .binary_search_by_key(&user, |m| m.user)
            .ok()
            .map(|i| &self.members[i])
    }
}

/// The session a named device holds, so a newer login of the same device
/// can end it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceSession {
    pub(crate) session: u64,
    pub(crate) expires_ms: u64,
    /// The session this one replaced, to answer a retried login alike.
    #[serde(default)]
    pub(crate) replaced: Option<u64>,
}

/// Key of the account named `username` (in any letter case).
pub fn account_key(username: &str) -> Vec<u8> {
    account(username)
}

/// Decodes a stored account (the value at [`account_key`]).
pub fn decode_account(bytes: &[u8]) -> Result<Account, DecodeError> {
    decode(bytes)
}

/// Key whose presence says that `session` of `user` was revoked.
pub fn revoked_key(user: UserId, session: u64) -> Vec<u8> {
    let mut key = with_u64(b'k', user);
    key.extend_from_slice(&session.to_be_bytes());
    key
}

pub(crate) fn device(user: UserId, device: &str) -> Vec<u8> {
    let mut key = with_u64(b'e', user);
    key.extend_from_slice(device.as_bytes());
    key
}

/// `[from, to)` of the outbox items for `target` numbered above `after`.
pub fn outbox_channel_range(target: ShardId, after: u64) -> (Vec<u8>, Vec<u8>) {
    let from = match after.checked_add(1) {
        Some(first) => outbox_item(target, first),
        None => channel_end(target),
    };
    (from, channel_end(target))
}

fn channel_end(target: ShardId) -> Vec<u8> {
    match target.checked_add(1) {
        Some(next) => {
            let mut key = vec![b'o'];
            key.extend_from_slice(&next.to_be_bytes());
            key
        }
        None => vec![b'p'],
    }
}

/// The item an outbox key names (a key of [`outbox_channel_range`]).
pub fn outbox_ref(key: &[u8]) -> Option<OutboxRef> {
    if key.len() != 13 || key[0] != b'o' {
        return None;
    }
    let target: [u8; 4] = key[1..5].try_into().ok()?;
    let item: [u8; 8] = key[5..13].try_into().ok()?;
    Some(OutboxRef {
        target: u32::from_be_bytes(target),
        item: u64::from_be_bytes(item),
    })
}

/// Decodes an outbox item (a value of [`outbox_channel_range`]).
pub fn decode_delivery(bytes: &[u8]) -> Result<Delivery, DecodeError> {
    decode(bytes)
}

/// Key of the number of the last item of `source`'s channel a shard applied.
pub fn channel_watermark_key(source: ShardId) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(&source.to_be_bytes());
    key
}

/// Key of a group's record.
pub fn group_key(group: GroupId) -> Vec<u8> {
    with_u64(b'g', group)
}

/// Decodes a group's record (the value at [`group_key`]).
pub fn decode_group(bytes: &[u8]) -> Result<Group, DecodeError> {
    decode(bytes)
}

/// Key of a group's latest group sequence.
pub fn group_seq_key(group: GroupId) -> Vec<u8> {
    with_u64(b'q', group)
}

pub(crate) fn create_receipt(creator: UserId, request_key: &str) -> Vec<u8> {
    let mut key = with_u64(b'c', creator);
    key.extend_from_slice(request_key.as_bytes());
    key
}

pub(crate) fn membership(user: UserId, group: GroupId) -> Vec<u8> {
    let mut key = with_u64(b'm', user);
    key.extend_from_slice(&group.to_be_bytes());
    key
}

/// `[from, to)` of the groups `user` is a member of; each value is the
/// group's name.
pub fn memberships_range(user: UserId) -> (Vec<u8>, Vec<u8>) {
    let to = match user.checked_add(1) {
        Some(next) => with_u64(b'm', next),
        None => vec![b'n'],
    };
    (with_u64(b'm', user), to)
}

/// The group a key of [`memberships_range`] names.
pub fn membership_group(key: &[u8]) -> Option<GroupId> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub(crate) fn account(username: &str) -> Vec<u8> {
    let mut key = vec![b'a'];
    key.extend_from_slice(username.to_lowercase().as_bytes());
    key
}

/// Key of a user's registered username; present exactly when the user exists.
pub fn user_key(user: UserId) -> Vec<u8> {
    with_u64(b'u', user)
}

pub(crate) fn counter(name: &str) -> Vec<u8> {
    let mut key = vec![b'n'];
    key.extend_from_slice(name.as_bytes());
    key
}

/// Name of the counter that numbers the outbox items for `target`.
pub(crate) fn outbox_counter(target: ShardId) -> String {
    format!("outbox/{target}")
}

/// Key of that counter: its value is the last item made for `target`.
pub fn outbox_counter_key(target: ShardId) -> Vec<u8> {
    counter(&outbox_counter(target))
}

/// Key of the latest version of `user`'s inbox.
pub fn latest_version_key(user: UserId) -> Vec<u8> {
    with_u64(b'v', user)
}

pub(crate) fn inbox_entry(user: UserId, version: Version) -> Vec<u8> {
    let mut key = with_u64(b'i', user);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// `[from, to)` of the entries of `user`'s inbox with versions above `since`.
pub fn inbox_range(user: UserId, since: Version) -> (Vec<u8>, Vec<u8>) {
    let from = inbox_entry(user, since.saturating_add(1));
    let to = match user.checked_add(1) {
        Some(next) => with_u64(b'i', next),
        None => vec![b'j'],
    };
    (from, to)
}

pub(crate) fn receipt(sender: UserId, client_msg_id: &str) -> Vec<u8> {
    let mut key = with_u64(b'd', sender);
    key.extend_from_slice(client_msg_id.as_bytes());
    key
}

pub(crate) fn outbox_item(target: ShardId, item: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(13);
    key.push(b'o');
    key.extend_from_slice(&target.to_be_bytes());
    key.extend_from_slice(&item.to_be_bytes());
    key
}

fn with_u64(tag: u8, value: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(tag);
    key.extend_from_slice(&value.to_be_bytes());
    key
}

/// A stored record that does not decode: the state is corrupt.
#[derive(Debug, thiserror::Error)]
#[error("stored record does not decode: {0}")]
pub struct DecodeError(String);

/// Decodes a stored inbox entry (a value of the range [`inbox_range`] gives).
pub fn decode_entry(bytes: &[u8]) -> Result<InboxEntry, DecodeError> {
    decode(bytes)
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    rmp_serde::from_slice(bytes).map_err(|e| DecodeError(e.to_string()))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain data into a Vec: encoding cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Decodes a stored number (a version, a sequence, a watermark: 8 bytes,
/// big-endian).
pub fn decode_u64(bytes: &[u8]) -> Result<u64, DecodeError> {
    let array: [u8; 8] = bytes
        .try_into()
        .map_err(|_| DecodeError(format!("expected 8 bytes, got {}", bytes.len())))?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbox_range_holds_later_versions_of_that_user_only() {
        let (from, to) = inbox_range(7, 10);
        assert!(inbox_entry(7, 10) < from);
        assert!(from <= inbox_entry(7, 11) && inbox_entry(7, 11) < to);
        assert!(inbox_entry(7, u64::MAX) < to);
        assert!(inbox_entry(8, 1) >= to);
        assert!(
            inbox_entry(7, 256) > inbox_entry(7, 255),
            "versions sort numerically"
        );
    }

    #[test]
    fn a_channel_range_holds_later_items_for_that_target_only() {
        let (from, to) = outbox_channel_range(3, 10);
        assert!(outbox_item(3, 10) < from);
        assert!(from <= outbox_item(3, 11) && outbox_item(3, u64::MAX) < to);
        assert!(outbox_item(4, 1) >= to);
        assert_eq!(
            outbox_ref(&outbox_item(3, 11)),
            Some(OutboxRef {
                target: 3,
                item: 11
            })
        );
        let (from, to) = outbox_channel_range(u32::MAX, u64::MAX);
        assert_eq!(from, to, "nothing follows the last item");
    }

    #[test]
    fn a_memberships_range_holds_that_user_only() {
        let (from, to) = memberships_range(7);
        assert!(from <= membership(7, 1) && membership(7, u64::MAX) < to);
        assert!(membership(8, 0) >= to);
        assert_eq!(membership_group(&membership(7, 99)), Some(99));
    }
}
