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
//! | `o` · item sequence (u64 BE) | [`Delivery`] waiting to reach its target shard |
//! | `r` · source shard (u32 BE) · item sequence | version the item got here (u64 BE) |
//! | `k` · user id · session id (u64 BE) | revoked session: its expiry (u64 BE ms) |
//! | `e` · user id · device name | [`DeviceSession`]: the device's current session |
//!
//! Integers are big-endian so that keys sort numerically: an inbox is one
//! contiguous range in version order, which is what sync scans.

use serde::{Deserialize, Serialize};

use crate::{Delivery, InboxEntry, MessageId, ShardId, UserId, Version};

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
    /// The outbox item carrying the sender's copy (0: none, the copy was
    /// appended directly or the sender is the recipient).
    #[serde(default)]
    pub(crate) outbox_item: u64,
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

/// `[from, to)` of every outbox item of a shard, in item order.
pub fn outbox_range() -> (Vec<u8>, Vec<u8>) {
    (vec![b'o'], vec![b'p'])
}

/// Decodes an outbox item (a value of [`outbox_range`]).
pub fn decode_delivery(bytes: &[u8]) -> Result<Delivery, DecodeError> {
    decode(bytes)
}

/// `[from, to)` of the delivery markers a shard holds for items `first..=last`
/// of `source`'s outbox. The last 8 bytes of each key are the item number.
pub fn received_range(source: ShardId, first: u64, last: u64) -> (Vec<u8>, Vec<u8>) {
    let to = match last.checked_add(1) {
        Some(next) => received(source, next),
        None => received(source.saturating_add(1), 0),
    };
    (received(source, first), to)
}

/// The item number in a key of [`received_range`].
pub fn received_item(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

pub(crate) fn account(username: &str) -> Vec<u8> {
    let mut key = vec![b'a'];
    key.extend_from_slice(username.to_lowercase().as_bytes());
    key
}

pub(crate) fn user(user: UserId) -> Vec<u8> {
    with_u64(b'u', user)
}

pub(crate) fn counter(name: &str) -> Vec<u8> {
    let mut key = vec![b'n'];
    key.extend_from_slice(name.as_bytes());
    key
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

pub(crate) fn outbox_item(item: u64) -> Vec<u8> {
    with_u64(b'o', item)
}

pub(crate) fn received(source: ShardId, item: u64) -> Vec<u8> {
    let mut key = vec![b'r'];
    key.extend_from_slice(&source.to_be_bytes());
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

pub(crate) fn decode_u64(bytes: &[u8]) -> Result<u64, DecodeError> {
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
}
