//! [`ChatMachine`]: the state machine of one user shard.

use fishchat_raft::{ApplyError, StateMachine, StateTxn};

use crate::command::{
    Command, CommandError, Delivery, DeliveryBatch, GroupEventKind, InboxEntry, OutboxRef,
    Outgoing, Reply,
};
use crate::keys::{self, Account, Addressee, DeviceSession, SendReceipt};
use crate::{ShardId, ShardMap, UserId, Version};

/// Longest accepted username, in characters.
const MAX_USERNAME: usize = 32;
/// Longest accepted client message id (and group request key), in bytes.
const MAX_CLIENT_MSG_ID: usize = 128;

/// True when a client's id for a message or a group creation is 1 to 128
/// bytes.
pub(crate) fn valid_client_key(key: &str) -> bool {
    (1..=MAX_CLIENT_MSG_ID).contains(&key.len())
}

/// Counter of user sequence numbers.
const USERS: &str = "users";
/// Counter of message sequence numbers.
const MESSAGES: &str = "messages";
/// Where [`ChatMachine::distribute`] put an entry.
pub(crate) struct Spread {
    /// The outbox items carrying it to other shards, by target.
    pub(crate) fanout: Vec<Outgoing>,
    /// The inboxes here it was appended to: (owner, version).
    pub(crate) appended: Vec<(UserId, Version)>,
}

/// The state machine of shard `shard` of a cluster partitioned by `map`.
pub struct ChatMachine {
    pub(crate) shard: ShardId,
    pub(crate) map: ShardMap,
}

impl ChatMachine {
    /// The machine of `shard` under `map`.
    pub fn new(shard: ShardId, map: ShardMap) -> Self {
        Self { shard, map }
    }

    fn register(
        &self,
        state: &mut dyn StateTxn,
        username: String,
        password_hash: String,
        now_ms: u64,
    ) -> Result<Reply, ApplyError> {
        if !valid_username(&username) {
            return Ok(Reply::Refused(CommandError::InvalidUsername));
        }
        if self.map.shard_of_username(&username) != self.shard {
            return Ok(self.wrong_shard(format!("username {username:?}")));
        }
        let key = keys::account(&username);
        if let Some(bytes) = state.get(&key)? {
            let existing: Account = keys::decode(&bytes).map_err(corrupt)?;
            // A password hash carries a random salt: the same hash means the
            // same registration, retried after its answer was lost.
            if existing.password_hash == password_hash {
                return Ok(Reply::Registered {
                    user_id: existing.user_id,
                });
            }
            return Ok(Reply::Refused(CommandError::UsernameTaken));
        }
        let user_id = self.map.id_in_shard(self.shard, next(state, USERS)?);
        let account = Account {
            user_id,
            username: username.clone(),
            password_hash,
            created_ms: now_ms,
        };
        state.put(&key, &keys::encode(&account));
        state.put(&keys::user_key(user_id), username.as_bytes());
        Ok(Reply::Registered { user_id })
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        state: &mut dyn StateTxn,
        sender: UserId,
        client_msg_id: String,
        recipient: UserId,
        body: Vec<u8>,
        content_type: String,
        now_ms: u64,
    ) -> Result<Reply, ApplyError> {
        if !valid_client_key(&client_msg_id) {
            return Ok(Reply::Refused(CommandError::InvalidClientMessageId));
        }
        if self.map.shard_of_user(recipient) != self.shard {
            return Ok(self.wrong_shard(format!("user {recipient}")));
        }
        let receipt_key = keys::receipt(sender, &client_msg_id);
        if let Some(first) = receipt(state, &receipt_key)? {
            if first
                .addressee
                .is_some_and(|a| a != Addressee::User(recipient))
            {
                return Ok(Reply::Refused(CommandError::ClientMessageIdReused));
            }
            return Ok(Reply::Sent {
                message_id: first.message_id,
                version: first.version,
                timestamp_ms: first.timestamp_ms,
                duplicate: true,
                copy: first
                    .fanout
                    .first()
                    .map(|&to| Outgoing { to, delivery: None }),
            });
        }
        if state.get(&keys::user_key(recipient))?.is_none() {
            return Ok(Reply::Refused(CommandError::UnknownUser(recipient)));
        }
        let message_id = self.next_message_id(state)?;
        let entry = InboxEntry::direct(message_id, sender, recipient, body, content_type, now_ms);
        let version = receive(state, recipient, entry.clone())?;
        let copy = if sender == recipient {
            None
        } else {
            self.copy_to_sender(state, sender, entry)?
        };
        let receipt = SendReceipt {
            message_id,
            version,
            timestamp_ms: now_ms,
            fanout: copy.iter().map(|c| c.to).collect(),
            addressee: Some(Addressee::User(recipient)),
        };
        state.put(&receipt_key, &keys::encode(&receipt));
        Ok(Reply::Sent {
            message_id,
            version,
            timestamp_ms: now_ms,
            duplicate: false,
            copy,
        })
    }

    /// The sender's own inbox gets a copy of what it sent: here when the
    /// sender lives in this shard, through the outbox otherwise (returned).
    fn copy_to_sender(
        &self,
        state: &mut dyn StateTxn,
        sender: UserId,
        entry: InboxEntry,
    ) -> Result<Option<Outgoing>, ApplyError> {
        let mut spread = self.distribute(state, &[sender], &entry)?;
        Ok(spread.fanout.pop())
    }

    /// Puts `entry` in the inbox of every one of `owners`: at once for those
    /// this shard owns, through one outbox item per other shard for the
    /// rest.
    pub(crate) fn distribute(
        &self,
        state: &mut dyn StateTxn,
        owners: &[UserId],
        entry: &InboxEntry,
    ) -> Result<Spread, ApplyError> {
        let mut by_target: std::collections::BTreeMap<ShardId, Vec<UserId>> = Default::default();
        for &owner in owners {
            by_target
                .entry(self.map.shard_of_user(owner))
                .or_default()
                .push(owner);
        }
        let mut fanout = Vec::new();
        let mut appended = Vec::new();
        for (target, owners) in by_target {
            if target == self.shard {
                for owner in owners {
                    appended.push((owner, receive(state, owner, entry.clone())?));
                }
                continue;
            }
            let item = next(state, &keys::outbox_counter(target))?;
            let delivery = Delivery {
                item,
                owners,
                entry: entry.clone(),
            };
            state.put(&keys::outbox_item(target, item), &keys::encode(&delivery));
            fanout.push(Outgoing {
                to: OutboxRef { target, item },
                delivery: Some(delivery),
            });
        }
        Ok(Spread { fanout, appended })
    }

    /// A new cluster-wide message id.
    pub(crate) fn next_message_id(&self, state: &mut dyn StateTxn) -> Result<u64, ApplyError> {
        Ok(self.map.id_in_shard(self.shard, next(state, MESSAGES)?))
    }

    #[allow(clippy::too_many_arguments)]
    fn open_session(
        &self,
        state: &mut dyn StateTxn,
        user: UserId,
        session: u64,
        device: String,
        expires_ms: u64,
        refreshes: u64,
    ) -> Result<Reply, ApplyError> {
        if self.map.shard_of_user(user) != self.shard {
            return Ok(self.wrong_shard(format!("user {user}")));
        }
        let key = keys::device(user, &device);
        let mut replaced = None;
        if let Some(bytes) = state.get(&key)? {
            let earlier: DeviceSession = keys::decode(&bytes).map_err(corrupt)?;
            if earlier.session == session {
                // A retry of this very login: the same answer again.
                return Ok(Reply::SessionOpened {
                    replaced: earlier.replaced,
                });
            }
            // A refresh on the connection bound to the device's session
            // keeps that session (and its token) valid.
            if earlier.session != refreshes {
                state.put(
                    &keys::revoked_key(user, earlier.session),
                    &earlier.expires_ms.to_be_bytes(),
                );
                replaced = Some(earlier.session);
            }
        }
        let current = DeviceSession {
            session,
            expires_ms,
            replaced,
        };
        state.put(&key, &keys::encode(&current));
        Ok(Reply::SessionOpened { replaced })
    }

    /// Applies the items of `batch` this shard has not applied yet, in
    /// order; refuses (changing nothing) a batch that would leave a hole.
    fn deliver(&self, state: &mut dyn StateTxn, batch: DeliveryBatch) -> Result<Reply, ApplyError> {
        for (i, delivery) in batch.items.iter().enumerate() {
            if let Some(&owner) = delivery
                .owners
                .iter()
                .find(|&&o| self.map.shard_of_user(o) != self.shard)
            {
                return Ok(self.wrong_shard(format!("user {owner}")));
            }
            let first = batch.items[0].item;
            if delivery.item != first.saturating_add(i as u64) {
                return Ok(Reply::Refused(CommandError::Malformed(
                    "delivery batch items are not consecutive".into(),
                )));
            }
        }
        let watermark_key = keys::channel_watermark_key(batch.source);
        let mut through = read_u64(state, &watermark_key)?;
        if let Some(first) = batch.items.first() {
            if first.item > through.saturating_add(1) {
                return Ok(Reply::Refused(CommandError::OutOfOrder {
                    source_shard: batch.source,
                    expected: through.saturating_add(1),
                    got: first.item,
                }));
            }
        }
        let mut appended = Vec::new();
        for delivery in batch.items {
            if delivery.item <= through {
                continue;
            }
            for owner in delivery.owners {
                appended.push((owner, receive(state, owner, delivery.entry.clone())?));
            }
            through = delivery.item;
        }
        state.put(&watermark_key, &through.to_be_bytes());
        Ok(Reply::Delivered { through, appended })
    }

    pub(crate) fn wrong_shard(&self, what: String) -> Reply {
        Reply::Refused(CommandError::WrongShard {
            shard: self.shard,
            what,
        })
    }
}

impl StateMachine for ChatMachine {
    fn apply(&mut self, command: &[u8], state: &mut dyn StateTxn) -> Result<Vec<u8>, ApplyError> {
        let command = match Command::decode(command) {
            Ok(command) => command,
            Err(refusal) => return Ok(Reply::Refused(refusal).encode()),
        };
        let reply = match command {
            Command::Register {
                username,
                password_hash,
                now_ms,
            } => self.register(state, username, password_hash, now_ms)?,
            Command::Send {
                sender,
                client_msg_id,
                recipient,
                body,
                content_type,
                now_ms,
            } => self.send(
                state,
                sender,
                client_msg_id,
                recipient,
                body,
                content_type,
                now_ms,
            )?,
            Command::Deliver(batch) => self.deliver(state, batch)?,
            Command::OutboxDone { items } => {
                for OutboxRef { target, item } in items {
                    state.delete(&keys::outbox_item(target, item));
                }
                Reply::Forgotten
            }
            Command::OpenSession {
                user,
                session,
                device,
                expires_ms,
                refreshes,
            } => self.open_session(state, user, session, device, expires_ms, refreshes)?,
            Command::Revoke {
                user,
                session,
                expires_ms,
            } => {
                if self.map.shard_of_user(user) != self.shard {
                    self.wrong_shard(format!("user {user}"))
                } else {
                    state.put(&keys::revoked_key(user, session), &expires_ms.to_be_bytes());
                    Reply::Revoked
                }
            }
            Command::CreateGroup {
                creator,
                request_key,
                name,
                members,
                max_members,
                now_ms,
            } => self.create_group(
                state,
                creator,
                request_key,
                name,
                members,
                max_members,
                now_ms,
            )?,
            Command::ChangeGroup {
                actor,
                group,
                change,
                max_members,
                now_ms,
            } => self.change_group(state, actor, group, change, max_members, now_ms)?,
            Command::GroupSend {
                sender,
                group,
                client_msg_id,
                body,
                content_type,
                now_ms,
            } => self.group_send(
                state,
                sender,
                group,
                client_msg_id,
                body,
                content_type,
                now_ms,
            )?,
        };
        Ok(reply.encode())
    }
}

/// Appends `entry` to `owner`'s inbox under the next version, and returns
/// it. A group membership entry also updates the owner's list of groups, so
/// that list always matches what the inbox says.
fn receive(
    state: &mut dyn StateTxn,
    owner: UserId,
    entry: InboxEntry,
) -> Result<Version, ApplyError> {
    let latest_key = keys::latest_version_key(owner);
    let version = read_u64(state, &latest_key)? + 1;
    let entry = entry.placed(owner, version);
    if let Some(event) = &entry.event {
        let membership = keys::membership(owner, entry.group);
        match event.kind {
            GroupEventKind::Created => state.put(&membership, event.group_name.as_bytes()),
            GroupEventKind::Added if event.user == owner => {
                state.put(&membership, event.group_name.as_bytes())
            }
            GroupEventKind::Removed | GroupEventKind::Left if event.user == owner => {
                state.delete(&membership)
            }
            GroupEventKind::Dissolved => state.delete(&membership),
            _ => {}
        }
    }
    state.put(&keys::inbox_entry(owner, version), &keys::encode(&entry));
    state.put(&latest_key, &version.to_be_bytes());
    Ok(version)
}

/// The receipt stored at `key`, if any.
pub(crate) fn receipt(state: &dyn StateTxn, key: &[u8]) -> Result<Option<SendReceipt>, ApplyError> {
    match state.get(key)? {
        Some(bytes) => Ok(Some(keys::decode(&bytes).map_err(corrupt)?)),
        None => Ok(None),
    }
}

/// The big-endian number at `key`; 0 when absent.
pub(crate) fn read_u64(state: &dyn StateTxn, key: &[u8]) -> Result<u64, ApplyError> {
    match state.get(key)? {
        Some(bytes) => keys::decode_u64(&bytes).map_err(corrupt),
        None => Ok(0),
    }
}

/// Takes the next number (1, 2, …) of the counter `name`.
pub(crate) fn next(state: &mut dyn StateTxn, name: &str) -> Result<u64, ApplyError> {
    let key = keys::counter(name);
    let taken = read_u64(state, &key)? + 1;
    state.put(&key, &taken.to_be_bytes());
    Ok(taken)
}

pub(crate) fn corrupt(e: keys::DecodeError) -> ApplyError {
    ApplyError::Corrupt(e.to_string())
}

/// True when `name` is a valid username: 1 to 32 characters of `a-z A-Z 0-9 _ . -`.
pub fn valid_username(name: &str) -> bool {
    let length = name.chars().count();
    (1..=MAX_USERNAME).contains(&length)
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
