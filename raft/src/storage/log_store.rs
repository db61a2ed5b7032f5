//! The Raft log and Raft metadata of one group, in the shared RocksDB.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use tokio::sync::watch;

use super::engine::{index_of_log_key, log_key, meta_key, MetaTag};
use super::log_tail::LogTail;
use super::{io_error, Engine, WalSyncer, CF_LOG, CF_META};
use crate::codec::{decode, encode};
use crate::types::{Entry, GroupId, LogId, TypeConfig, Vote};

/// Log storage of one group. Cheap to clone: openraft's replication tasks read
/// the log through clones while the group's core appends to it.
#[derive(Clone)]
pub(crate) struct GroupLogStore {
    group: GroupId,
    engine: Engine,
    syncer: WalSyncer,
    /// Last committed index seen, for the group's status (0: none).
    committed: Arc<AtomicU64>,
    /// The group's applied index: a purge waits until it covers the purge.
    applied: watch::Receiver<u64>,
    /// The newest entries, decoded, shared with the readers.
    tail: Arc<Mutex<LogTail>>,
}

impl GroupLogStore {
    /// The log of `group`; `committed` is updated as openraft reports commits,
    /// `applied` is the group's applied index.
    pub(crate) fn new(
        group: GroupId,
        engine: Engine,
        syncer: WalSyncer,
        committed: Arc<AtomicU64>,
        applied: watch::Receiver<u64>,
    ) -> Self {
        Self {
            group,
            engine,
            syncer,
            committed,
            applied,
            tail: Arc::default(),
        }
    }

    fn tail(&self) -> MutexGuard<'_, LogTail> {
        // The tail is left consistent between statements: a panic elsewhere
        // while it was locked poisons nothing it holds.
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, tag: MetaTag) -> io::Result<Option<T>> {
        let doing = "reading raft metadata";
        let db = self.engine.db();
        let bytes = db
            .get_pinned_cf(self.engine.cf(CF_META), meta_key(self.group, tag))
            .map_err(|e| io_error(doing, e))?;
        bytes
            .map(|b| decode(&b).map_err(|e| io_error(doing, e)))
            .transpose()
    }

    /// Adds a put of metadata record `tag` to `batch`.
    fn put_meta<T: serde::Serialize>(
        &self,
        batch: &mut WriteBatch,
        tag: MetaTag,
        value: &T,
    ) -> io::Result<()> {
        let bytes = encode(value).map_err(|e| io_error("encoding raft metadata", e))?;
        batch.put_cf(self.engine.cf(CF_META), meta_key(self.group, tag), bytes);
        Ok(())
    }

    /// The last entry of the log, if any.
    fn last_entry_id(&self) -> io::Result<Option<LogId>> {
        let db = self.engine.db();
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(log_key(self.group, 0).to_vec());
        let end = log_key(self.group, u64::MAX);
        let mut iter = db.iterator_cf_opt(
            self.engine.cf(CF_LOG),
            options,
            IteratorMode::From(&end, Direction::Reverse),
        );
        match iter.next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(|e| io_error("reading the log", e))?;
                let entry: Entry = decode(&value).map_err(|e| io_error("reading the log", e))?;
                Ok(Some(entry.log_id))
            }
        }
    }

    /// A batch deleting log entries `[from, to)` of this group.
    fn delete_batch(&self, from: u64, to: u64) -> WriteBatch {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.engine.cf(CF_LOG),
            log_key(self.group, from),
            log_key(self.group, to),
        );
        batch
    }
}

impl RaftLogReader<TypeConfig> for GroupLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        if let Some(entries) = self.tail().get(start, end) {
            return Ok(entries);
        }
        let db = self.engine.db();
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(log_key(self.group, end).to_vec());
        let first = log_key(self.group, start);
        let iter = db.iterator_cf_opt(
            self.engine.cf(CF_LOG),
            options,
            IteratorMode::From(&first, Direction::Forward),
        );
        let mut entries = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(|e| io_error("reading the log", e))?;
            let entry: Entry = decode(&value).map_err(|e| {
                let index = index_of_log_key(&key).unwrap_or(0);
                io_error(&format!("reading log entry {index}"), e)
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.read_meta(MetaTag::Vote)
    }
}

impl RaftLogStorage<TypeConfig> for GroupLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.read_meta(MetaTag::Purged)?;
        let last_log_id = self.last_entry_id()?.max(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        self.put_meta(&mut batch, MetaTag::Vote, vote)?;
        self.engine
            .write(batch)
            .map_err(|e| io_error("writing the vote", e))?;
        self.syncer
            .sync()
            .await
            .map_err(|e| io_error("syncing the vote", e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        if let Some(id) = &committed {
            self.committed.store(id.index, Ordering::Relaxed);
        }
        let mut batch = WriteBatch::default();
        self.put_meta(&mut batch, MetaTag::Committed, &committed)?;
        self.engine
            .write(batch)
            .map_err(|e| io_error("writing the committed index", e))
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        let committed: Option<Option<LogId>> = self.read_meta(MetaTag::Committed)?;
        let committed = committed.flatten();
        if let Some(id) = &committed {
            self.committed.store(id.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut batch = WriteBatch::default();
        let cf = self.engine.cf(CF_LOG);
        for entry in &entries {
            let bytes = encode(entry).map_err(|e| io_error("encoding a log entry", e))?;
            batch.put_cf(cf, log_key(self.group, entry.log_id.index), bytes);
        }
        if let Some(first) = entries.first() {
            self.tail().forget_from(first.log_id.index);
        }
        // Readable now; durable once the syncer has synced the WAL.
        self.engine
            .write(batch)
            .map_err(|e| io_error("appending to the log", e))?;
        self.tail().appended(entries);
        self.syncer
            .after_sync(callback)
            .await
            .map_err(|e| io_error("syncing the log", e))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> io::Result<()> {
        let from = last_log_id.map_or(0, |id| id.index + 1);
        self.tail().forget_from(from);
        self.engine
            .write(self.delete_batch(from, u64::MAX))
            .map_err(|e| io_error("truncating the log", e))
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        // openraft purges right after queueing a snapshot install, before the
        // install is written. Purging first could leave, after a crash, a log
        // that starts past the applied state: wait until the state covers it.
        let mut applied = self.applied.clone();
        let covered = applied.wait_for(|index| *index >= log_id.index).await;
        if covered.is_err() {
            return Err(io_error(
                "purging the log",
                "state machine stopped before the purge was covered",
            ));
        }
        self.tail().forget_through(log_id.index);
        let mut batch = self.delete_batch(0, log_id.index.saturating_add(1));
        self.put_meta(&mut batch, MetaTag::Purged, &log_id)?;
        self.engine
            .write(batch)
            .map_err(|e| io_error("purging the log", e))
    }
}
