//! Opening the node's RocksDB and the key encoding shared by every group.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::types::GroupId;

/// Column family of Raft log entries.
pub(crate) const CF_LOG: &str = "raft_log";
/// Column family of Raft metadata: vote, committed, purged.
pub(crate) const CF_META: &str = "raft_meta";
/// Column family of state-machine data and applied state.
pub(crate) const CF_STATE: &str = "state";

/// Tag byte of state-machine keys that hold host bookkeeping.
const STATE_SYSTEM: u8 = 0x00;
/// Tag byte of state-machine keys that hold application data.
const STATE_DATA: u8 = 0x01;

/// Counters an operator (or a benchmark) reads to see group commit at work.
#[derive(Debug, Default)]
pub struct StorageStats {
    /// WAL syncs performed.
    pub wal_syncs: AtomicU64,
    /// Appends and vote saves acknowledged by those syncs.
    pub synced_writes: AtomicU64,
}

impl StorageStats {
    /// Average number of writes one WAL sync made durable.
    pub fn writes_per_sync(&self) -> f64 {
        let syncs = self.wal_syncs.load(Ordering::Relaxed);
        if syncs == 0 {
            return 0.0;
        }
        self.synced_writes.load(Ordering::Relaxed) as f64 / syncs as f64
    }
}

/// The node's RocksDB, shared by all groups.
#[derive(Clone)]
pub struct Engine {
    db: Arc<DB>,
    stats: Arc<StorageStats>,
}

impl Engine {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, rocksdb::Error> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        // Column families must reach disk together: the WAL is not synced on
        // every write (see the module documentation).
        options.set_atomic_flush(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.increase_parallelism(2);
        let families = [CF_LOG, CF_META, CF_STATE]
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, family_options(name)));
        let db = DB::open_cf_descriptors(&options, dir, families)?;
        Ok(Self {
            db: Arc::new(db),
            stats: Arc::new(StorageStats::default()),
        })
    }

    /// The underlying database.
    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    /// Group-commit counters.
    pub fn stats(&self) -> &Arc<StorageStats> {
        &self.stats
    }

    /// A column family created at open.
    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        // Every family in the layout is created by `open`; its absence would be
        // a bug in this module, not bad input.
        self.db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("column family {name} is created at open"))
    }

    /// Writes a batch without syncing the WAL.
    pub(crate) fn write(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut options = WriteOptions::default();
        options.set_sync(false);
        self.db.write_opt(batch, &options)
    }

    /// Writes a batch and syncs the WAL before returning.
    pub(crate) fn write_synced(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options)
    }

    /// Makes every write issued so far durable.
    pub(crate) fn sync_wal(&self) -> Result<(), rocksdb::Error> {
        self.db.flush_wal(true)
    }

    /// True when nothing but this handle (and its clones' stats) holds the database.
    pub(crate) fn is_sole_owner(&self) -> bool {
        Arc::strong_count(&self.db) == 1
    }
}

/// Options of one column family. Applying a command looks up keys that are
/// almost always absent (a send's dedup receipt) or recently written
/// (counters), so the state family gets bloom filters in its memtable and
/// its table files: an absent key costs a filter probe, not a search.
fn family_options(name: &str) -> Options {
    let mut options = Options::default();
    if name == CF_STATE {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        table.set_whole_key_filtering(true);
        options.set_block_based_table_factory(&table);
        options.set_memtable_prefix_bloom_ratio(0.05);
        options.set_memtable_whole_key_filtering(true);
    }
    options
}

/// Key of log entry `index` of `group`.
pub(crate) fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&group.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

/// The log index stored in a log key, if the key is well formed.
pub(crate) fn index_of_log_key(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Key of a Raft metadata record of `group`.
pub(crate) fn meta_key(group: GroupId, tag: MetaTag) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[..8].copy_from_slice(&group.to_be_bytes());
    key[8] = tag as u8;
    key
}

/// The group a metadata key belongs to.
pub(crate) fn group_of_meta_key(key: &[u8]) -> Option<GroupId> {
    let bytes: [u8; 8] = key.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// The Raft metadata records of a group.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub(crate) enum MetaTag {
    /// The last vote.
    Vote = 1,
    /// The last known committed log id.
    Committed = 2,
    /// The last purged log id.
    Purged = 3,
}

/// Key of a host bookkeeping record in the state range of `group`.
pub(crate) fn state_system_key(group: GroupId, tag: StateTag) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..8].copy_from_slice(&group.to_be_bytes());
    key[8] = STATE_SYSTEM;
    key[9] = tag as u8;
    key
}

/// Host bookkeeping records kept beside a group's state-machine data.
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub(crate) enum StateTag {
    /// The last applied log id.
    Applied = 1,
    /// The last applied membership.
    Membership = 2,
}

/// Key of application key `key` in the state range of `group`.
pub(crate) fn state_data_key(group: GroupId, key: &[u8]) -> Vec<u8> {
    let mut full = Vec::with_capacity(9 + key.len());
    full.extend_from_slice(&group.to_be_bytes());
    full.push(STATE_DATA);
    full.extend_from_slice(key);
    full
}

/// `[start, end)` of all application keys of `group`.
pub(crate) fn state_data_range(group: GroupId) -> (Vec<u8>, Vec<u8>) {
    let mut start = group.to_be_bytes().to_vec();
    start.push(STATE_DATA);
    let mut end = group.to_be_bytes().to_vec();
    end.push(STATE_DATA + 1);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_group_then_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(7, 9) < log_key(7, 10));
        assert_eq!(index_of_log_key(&log_key(7, 300)), Some(300));
        assert_eq!(index_of_log_key(b"short"), None);
    }

    #[test]
    fn a_groups_data_range_holds_its_keys_and_no_other_groups() {
        let (start, end) = state_data_range(5);
        let inside = state_data_key(5, b"alice");
        assert!(start <= inside && inside < end);
        assert!(state_data_key(6, b"") >= end);
        assert!(state_data_key(4, &[0xff; 4]) < start);
        assert!(state_system_key(5, StateTag::Applied).as_slice() < start.as_slice());
    }
}
