//! The contract between the host and an application's state machine.

use std::collections::{BTreeMap, HashMap};

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

/// The host's [`StateTxn`] for one apply call: reads see the batch's own
/// writes, then RocksDB. Writes stay in memory until
/// [`ApplyTxn::into_writes`], so a key written many times in one batch (a
/// counter, a latest version) reaches RocksDB once.
pub(crate) struct ApplyTxn<'a> {
    group: GroupId,
    engine: &'a Engine,
    pending: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> ApplyTxn<'a> {
    pub(crate) fn new(group: GroupId, engine: &'a Engine) -> Self {
        Self {
            group,
            engine,
            pending: HashMap::new(),
        }
    }

    /// The batch's writes, the last one of each key, in key order (so the
    /// same commands always give the same `WriteBatch`).
    pub(crate) fn into_writes(self) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut writes: Vec<_> = self.pending.into_iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        writes
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
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
    }

    fn delete(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(n: u64) -> Option<Vec<u8>> {
        Some(n.to_be_bytes().to_vec())
    }

    #[test]
    fn a_batch_writes_each_key_once_with_its_last_value_in_key_order() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let engine = Engine::open(dir.path()).expect("open RocksDB");
        let mut txn = ApplyTxn::new(7, &engine);
        for n in 1..=5u64 {
            txn.put(b"n/counter", &n.to_be_bytes());
            assert_eq!(txn.get(b"n/counter").expect("read"), counter(n));
        }
        txn.put(b"b/gone", b"x");
        txn.delete(b"b/gone");
        txn.put(b"a/first", b"y");
        assert_eq!(txn.get(b"b/gone").expect("read"), None);
        assert_eq!(
            txn.into_writes(),
            vec![
                (b"a/first".to_vec(), Some(b"y".to_vec())),
                (b"b/gone".to_vec(), None),
                (b"n/counter".to_vec(), counter(5)),
            ]
        );
    }
}
