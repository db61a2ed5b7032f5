//! [`ChatMachine`]: the state machine of one user shard.

use fishchat_raft::{ApplyError, StateMachine, StateTxn};

use crate::command::{Command, CommandError, Delivery, InboxEntry, Reply};
use crate::keys::{self, Account, DeviceSession, SendReceipt};
use crate::{ShardId, ShardMap, UserId, Version};

/// Longest accepted username, in characters.
const MAX_USERNAME: usize = 32;
/// Longest accepted client message id, in bytes.
const MAX_CLIENT_MSG_ID: usize = 128;

/// Counter of user sequence numbers.
const USERS: &str = "users";
/// Counter of message sequence numbers.
const MESSAGES: &str = "messages";
/// Counter of outbox item sequence numbers.
const OUTBOX: &str = "outbox";

/// The state machine of shard `shard` of a cluster partitioned by `map`.
pub struct ChatMachine {
    shard: ShardId,
    map: ShardMap,
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
        state.put(&keys::user(user_id), username.as_bytes());
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
        if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Ok(Reply::Refused(CommandError::InvalidClientMessageId));
        }
        if self.map.shard_of_user(recipient) != self.shard {
            return Ok(self.wrong_shard(format!("user {recipient}")));
        }
        let receipt_key = keys::receipt(sender, &client_msg_id);
        if let Some(bytes) = state.get(&receipt_key)? {
            let first: SendReceipt = keys::decode(&bytes).map_err(corrupt)?;
            let copy = match first.outbox_item {
                0 => None,
                item => match state.get(&keys::outbox_item(item))? {
                    Some(bytes) => Some(keys::decode(&bytes).map_err(corrupt)?),
                    None => None,
                },
            };
            return Ok(Reply::Sent {
                message_id: first.message_id,
                version: first.version,
                timestamp_ms: first.timestamp_ms,
                duplicate: true,
                copy,
            });
        }
        if state.get(&keys::user(recipient))?.is_none() {
            return Ok(Reply::Refused(CommandError::UnknownUser(recipient)));
        }
        let message_id = self.map.id_in_shard(self.shard, next(state, MESSAGES)?);
        let entry = InboxEntry {
            version: 0,
            message_id,
            from: sender,
            to: recipient,
            body,
            content_type,
            timestamp_ms: now_ms,
        };
        let version = append(state, recipient, entry.clone())?;
        let copy = if sender == recipient {
            None
        } else {
            self.copy_to_sender(state, sender, entry)?
        };
        let receipt = SendReceipt {
            message_id,
            version,
            timestamp_ms: now_ms,
            outbox_item: copy.as_ref().map_or(0, |c| c.item),
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
    ) -> Result<Option<Delivery>, ApplyError> {
        if self.map.shard_of_user(sender) == self.shard {
            append(state, sender, entry)?;
            return Ok(None);
        }
        let item = next(state, OUTBOX)?;
        let delivery = Delivery {
            source: self.shard,
            item,
            owner: sender,
            entry,
        };
        state.put(&keys::outbox_item(item), &keys::encode(&delivery));
        Ok(Some(delivery))
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

    fn deliver(&self, state: &mut dyn StateTxn, delivery: Delivery) -> Result<Reply, ApplyError> {
        if self.map.shard_of_user(delivery.owner) != self.shard {
            return Ok(self.wrong_shard(format!("user {}", delivery.owner)));
        }
        let marker = keys::received(delivery.source, delivery.item);
        if let Some(bytes) = state.get(&marker)? {
            let version = keys::decode_u64(&bytes).map_err(corrupt)?;
            return Ok(Reply::Delivered { version });
        }
        let version = append(state, delivery.owner, delivery.entry)?;
        state.put(&marker, &version.to_be_bytes());
        Ok(Reply::Delivered { version })
    }

    fn wrong_shard(&self, what: String) -> Reply {
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
            Command::Deliver(delivery) => self.deliver(state, delivery)?,
            Command::OutboxDone { items } => {
                for item in items {
                    state.delete(&keys::outbox_item(item));
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
        };
        Ok(reply.encode())
    }
}

/// Appends `entry` to `owner`'s inbox under the next version, and returns it.
fn append(
    state: &mut dyn StateTxn,
    owner: UserId,
    mut entry: InboxEntry,
) -> Result<Version, ApplyError> {
    let latest_key = keys::latest_version_key(owner);
    let latest = match state.get(&latest_key)? {
        Some(bytes) => keys::decode_u64(&bytes).map_err(corrupt)?,
        None => 0,
    };
    let version = latest + 1;
    entry.version = version;
    state.put(&keys::inbox_entry(owner, version), &keys::encode(&entry));
    state.put(&latest_key, &version.to_be_bytes());
    Ok(version)
}

/// Takes the next number (1, 2, …) of the counter `name`.
fn next(state: &mut dyn StateTxn, name: &str) -> Result<u64, ApplyError> {
    let key = keys::counter(name);
    let current = match state.get(&key)? {
        Some(bytes) => keys::decode_u64(&bytes).map_err(corrupt)?,
        None => 0,
    };
    let taken = current + 1;
    state.put(&key, &taken.to_be_bytes());
    Ok(taken)
}

fn corrupt(e: keys::DecodeError) -> ApplyError {
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
