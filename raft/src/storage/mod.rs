//! One RocksDB per node, shared by every Raft group it hosts.
//!
//! # Layout
//!
//! | column family | key | value |
//! |---|---|---|
//! | `raft_log` | group (u64 BE) · index (u64 BE) | MessagePack openraft entry |
//! | `raft_meta` | group · tag (1 byte: vote, committed, purged) | MessagePack value |
//! | `state` | group · `0x00` · tag (applied, membership) | MessagePack value |
//! | `state` | group · `0x01` · application key | application value |
//!
//! Keys are prefixed by the group id first, so a group's log and its state are
//! each one contiguous range: purge and truncate are range deletes, a snapshot
//! is one range scan, installing one is a range delete plus a batch of puts.
//!
//! # Durability
//!
//! Writes go to the WAL without a sync; [`WalSyncer`] syncs the WAL once for
//! every caller waiting at that moment (group commit). Raft log appends and vote
//! changes wait for that sync before openraft hears they are durable. Applying
//! committed entries does not: the log they came from is durable, and the WAL is
//! replayed in order after a crash, so the state machine never gets ahead of
//! its log. `atomic_flush` keeps the column families consistent with each other
//! when memtables reach disk.

mod engine;
mod log_store;
mod log_tail;
mod snapshot;
mod state_store;
mod wal_sync;

pub(crate) use engine::{group_of_meta_key, state_data_range, CF_LOG, CF_META, CF_STATE};
pub use engine::{Engine, StorageStats};
pub(crate) use log_store::GroupLogStore;
pub use state_store::GroupStateStore;
pub(crate) use wal_sync::WalSyncer;

/// Turns a storage failure into the error openraft expects, saying what was
/// being done. Such a failure is not deterministic, so openraft stops the
/// group rather than let it diverge.
pub(crate) fn io_error(doing: &str, err: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{doing}: {err}"))
}

/// Reads application key `key` of `group` from the latest state.
pub(crate) fn read_state(
    engine: &Engine,
    group: crate::GroupId,
    key: &[u8],
) -> Result<Option<Vec<u8>>, rocksdb::Error> {
    engine
        .db()
        .get_cf(engine.cf(CF_STATE), engine::state_data_key(group, key))
}

/// Up to `limit` application pairs of `group` with keys in `[from, to)`.
pub(crate) fn scan_state(
    engine: &Engine,
    group: crate::GroupId,
    from: &[u8],
    to: &[u8],
    limit: usize,
) -> Result<Vec<crate::KeyValue>, rocksdb::Error> {
    let start = engine::state_data_key(group, from);
    let mut options = rocksdb::ReadOptions::default();
    options.set_iterate_upper_bound(engine::state_data_key(group, to));
    let prefix = start.len() - from.len();
    let mut pairs = Vec::new();
    let iter = engine.db().iterator_cf_opt(
        engine.cf(CF_STATE),
        options,
        rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
    );
    for item in iter.take(limit) {
        let (key, value) = item?;
        pairs.push((key[prefix..].to_vec(), value.to_vec()));
    }
    Ok(pairs)
}

/// Adds a put of application key `key` of `group` to `batch`.
pub(crate) fn put_state(
    engine: &Engine,
    batch: &mut rocksdb::WriteBatch,
    group: crate::GroupId,
    key: &[u8],
    value: &[u8],
) {
    batch.put_cf(
        engine.cf(CF_STATE),
        engine::state_data_key(group, key),
        value,
    );
}

/// Adds a delete of application key `key` of `group` to `batch`.
pub(crate) fn delete_state(
    engine: &Engine,
    batch: &mut rocksdb::WriteBatch,
    group: crate::GroupId,
    key: &[u8],
) {
    batch.delete_cf(engine.cf(CF_STATE), engine::state_data_key(group, key));
}

pub(crate) use snapshot::digest;
