//! The contract between the host and an application's state machine.

use std::collections::{BTreeMap, HashMap};

use rocksdb::WriteBatch;

use crate::storage::Engine;
use crate::types::GroupId;

/// Why applying a committed command failed in a way that is not the command's
/// fault: storage is broken or holds bytes the state machine cannot read.
///
/// Such a failure is not deterministic (another replica may not see it), so
/// the host stops the group instead of letting its replicas diverge. A command
/// that is merely invalid is *not* an `ApplyError`: the state machine answers
/// it with a response that says so, identically on every replica.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading the group's state failed.
    #[error("state storage failed: {0}")]
    Storage(String),
    /// A stored value could not be decoded.
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
}

/// An application state machine run by every replica of a group.
///
/// The host applies each committed batch of commands inside one [`StateTxn`]:
/// `apply` is called once per command, in log order, and every write of the
/// batch reaches RocksDB in one `WriteBatch` together with the new applied
/// index. The state machine keeps its whole state in that key-value view, which
/// is what lets the host snapshot, ship and install it without help, and lets
/// the state machine be tested against an in-memory [`StateTxn`] alone.
///
/// `apply` must be deterministic: the same state and command give the same
/// writes and response on every replica. It gets no clock, randomness or I/O of
/// its own; anything of that kind travels inside the command.
pub trait StateMachine: Send + Sync + 'static {
    /// Applies one committed command and returns the response for its proposer.
    fn apply(&mut self, command: &[u8], state: &mut dyn StateTxn) -> Result<Vec<u8>, ApplyError>;

    /// Called after a snapshot replaced the group's state, so a state machine
    /// that caches anything can drop it.
    fn restored(&mut self) {}
}

/// The key-value view a state machine reads and writes while applying.
///
/// Reads see the batch's own earlier writes. Keys are the application's own;
/// the host keeps each group's keys apart.
pub trait StateTxn {
    /// The current value of `key`, including writes earlier in this batch.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError>;

    /// Sets `key` to `value`.
    fn put(&mut self, key: &[u8], value: &[u8]);

    /// Removes `key`.
    fn delete(&mut self, key: &[u8]);
}

/// A [`StateTxn`] over an in-memory map: for testing a [`StateMachine`]
/// without RocksDB or Raft. Writes apply at once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryState(pub BTreeMap<Vec<u8>, Vec<u8>>);

impl StateTxn for MemoryState {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError> {
        Ok(self.0.get(key).cloned())
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.insert(key.to_vec(), value.to_vec());
    }

    fn delete(&mut self, key: &[u8]) {
        self.0.remove(key);
    }
}

/// The host's [`StateTxn`]: a RocksDB `WriteBatch` over the group's key range,
/// with the batch's pending writes readable before it is written.
pub(crate) struct ApplyTxn<'a> {
    group: GroupId,
    engine: &'a Engine,
    pub(crate) batch: WriteBatch,
    pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> ApplyTxn<'a> {
    pub(crate) fn new(group: GroupId, engine: &'a Engine) -> Self {
        Self {
            group,
            engine,
            batch: WriteBatch::default(),
            pending: HashMap::new(),
        }
    }
}

impl StateTxn for ApplyTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ApplyError> {
        if let Some(value) = self.pending.get(key) {
            return Ok(value.clone());
        }
        crate::storage::read_state(self.engine, self.group, key)
            .map_err(|e| ApplyError::Storage(e.to_string()))
    }

    fn put(&mut self, key: &[u8], value: &[u8]) {
        crate::storage::put_state(self.engine, &mut self.batch, self.group, key, value);
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
    }

    fn delete(&mut self, key: &[u8]) {
        crate::storage::delete_state(self.engine, &mut self.batch, self.group, key);
        self.pending.insert(key.to_vec(), None);
    }
}
