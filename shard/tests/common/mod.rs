//! What the state machine tests share: shards over in-memory state, and
//! what a test reads from them.
#![allow(dead_code)]

use fishchat_raft::{MemoryState, StateMachine};
use fishchat_shard::{
    decode_entry, inbox_range, latest_version_key, ChatMachine, Command, Delivery, InboxEntry,
    Reply, ShardId, ShardMap, UserId,
};

/// What the tests read from a shard's in-memory state.
pub trait ShardView {
    /// What a sync of `user` since `since` reads.
    fn inbox(&self, user: UserId, since: u64) -> Vec<InboxEntry>;
    /// The latest version of `user`'s inbox.
    fn latest(&self, user: UserId) -> u64;
    /// The outbox items waiting for delivery, in item order.
    fn outbox(&self) -> Vec<Delivery>;
}

impl ShardView for MemoryState {
    fn inbox(&self, user: UserId, since: u64) -> Vec<InboxEntry> {
        let (from, to) = inbox_range(user, since);
        self.0
            .range(from..to)
            .map(|(_, v)| decode_entry(v).expect("stored entries decode"))
            .collect()
    }

    fn latest(&self, user: UserId) -> u64 {
        self.0
            .get(&latest_version_key(user))
            .map(|b| u64::from_be_bytes(b.as_slice().try_into().expect("8 bytes")))
            .unwrap_or(0)
    }

    fn outbox(&self) -> Vec<Delivery> {
        self.0
            .range(b"o".to_vec()..b"p".to_vec())
            .map(|(_, v)| rmp_serde::from_slice(v).expect("outbox items decode"))
            .collect()
    }
}

/// One shard of a cluster of `SHARDS`, with its state.
pub struct Shard {
    pub id: ShardId,
    pub machine: ChatMachine,
    pub state: MemoryState,
}

pub const SHARDS: u32 = 4;

pub fn map() -> ShardMap {
    ShardMap::new(SHARDS).expect("non-zero")
}

impl Shard {
    pub fn new(id: ShardId) -> Self {
        Self {
            id,
            machine: ChatMachine::new(id, map()),
            state: MemoryState::default(),
        }
    }

    pub fn apply(&mut self, command: &Command) -> Reply {
        self.apply_bytes(&command.encode())
    }

    pub fn apply_bytes(&mut self, bytes: &[u8]) -> Reply {
        let answer = self
            .machine
            .apply(bytes, &mut self.state)
            .expect("in-memory state does not fail");
        Reply::decode(&answer).expect("replies decode")
    }

    /// Registers a user whose name hashes to this shard; returns its id.
    pub fn register(&mut self, hint: &str) -> UserId {
        let name = name_in_shard(self.id, hint);
        match self.apply(&register(&name)) {
            Reply::Registered { user_id } => user_id,
            other => panic!("register {name}: {other:?}"),
        }
    }
}

pub fn name_in_shard(shard: ShardId, hint: &str) -> String {
    (0..)
        .map(|i| format!("{hint}{i}"))
        .find(|name| map().shard_of_username(name) == shard)
        .expect("some name hashes to every shard")
}

pub fn register(name: &str) -> Command {
    Command::Register {
        username: name.into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        now_ms: 1_000,
    }
}
