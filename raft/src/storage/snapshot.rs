//! Snapshots of a group's state range, and the digest that compares replicas.
//!
//! A snapshot is every application key-value pair of the group, read from one
//! consistent RocksDB view, as a sequence of records:
//! `key length (u32 BE) · key · value length (u32 BE) · value`. The applied log
//! id and membership travel beside it in openraft's `SnapshotMeta`. openraft
//! sends the bytes to a follower in chunks of `snapshot_max_chunk_size`.

use std::hash::Hasher;
use std::io;
use std::sync::{Arc, Mutex};

use openraft::RaftSnapshotBuilder;
use rocksdb::{Direction, IteratorMode, ReadOptions};

use super::engine::{state_system_key, StateTag};
use super::{io_error, state_data_range, Engine, CF_STATE};
use crate::codec::decode;
use crate::types::{GroupId, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};

/// A built or installed snapshot, kept to serve followers that need it.
#[derive(Clone)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta,
    pub(crate) data: Arc<Vec<u8>>,
}

impl StoredSnapshot {
    pub(crate) fn to_snapshot(&self) -> Snapshot {
        Snapshot {
            meta: self.meta.clone(),
            snapshot: self.data.as_ref().clone(),
        }
    }
}

/// The snapshot of one group most recently built or installed.
pub(crate) type CurrentSnapshot = Arc<Mutex<Option<StoredSnapshot>>>;

/// Makes `candidate` the current snapshot unless a newer one is there already
/// (a build that started before an install may finish after it).
pub(crate) fn keep_newest(current: &CurrentSnapshot, candidate: StoredSnapshot) {
    let mut current = current.lock().unwrap_or_else(|p| p.into_inner());
    let newer = match current.as_ref() {
        Some(kept) => candidate.meta.last_log_id >= kept.meta.last_log_id,
        None => true,
    };
    if newer {
        *current = Some(candidate);
    }
}

/// Builds snapshots of one group from a consistent view of the database.
pub struct GroupSnapshotBuilder {
    pub(crate) group: GroupId,
    pub(crate) engine: Engine,
    pub(crate) current: CurrentSnapshot,
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let (engine, group) = (self.engine.clone(), self.group);
        let built = tokio::task::spawn_blocking(move || build(&engine, group))
            .await
            .map_err(|e| io_error("building a snapshot", e))??;
        let snapshot = built.to_snapshot();
        keep_newest(&self.current, built);
        Ok(snapshot)
    }
}

/// Reads the group's state range and applied state from one RocksDB snapshot.
pub(crate) fn build(engine: &Engine, group: GroupId) -> io::Result<StoredSnapshot> {
    let failed = |e: &dyn std::fmt::Display| io_error("building a snapshot", e);
    let db = engine.db();
    let view = db.snapshot();
    let cf = engine.cf(CF_STATE);
    let applied: Option<LogId> = match view
        .get_cf(cf, state_system_key(group, StateTag::Applied))
        .map_err(|e| failed(&e))?
    {
        Some(bytes) => decode(&bytes).map_err(|e| failed(&e))?,
        None => None,
    };
    let membership: StoredMembership = match view
        .get_cf(cf, state_system_key(group, StateTag::Membership))
        .map_err(|e| failed(&e))?
    {
        Some(bytes) => decode(&bytes).map_err(|e| failed(&e))?,
        None => StoredMembership::default(),
    };
    let (start, end) = state_data_range(group);
    let mut options = ReadOptions::default();
    options.set_iterate_upper_bound(end);
    let mut data = Vec::new();
    for item in view.iterator_cf_opt(cf, options, IteratorMode::From(&start, Direction::Forward)) {
        let (key, value) = item.map_err(|e| failed(&e))?;
        push_record(&mut data, &key[start.len()..], &value);
    }
    Ok(StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
        },
        data: Arc::new(data),
    })
}

/// Appends one key-value record to a snapshot.
fn push_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    for part in [key, value] {
        // Keys and values are far below 4 GiB: RocksDB itself limits them.
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
}

/// A snapshot whose bytes do not parse as records.
#[derive(Debug, thiserror::Error)]
#[error("snapshot is malformed at byte {offset}")]
pub(crate) struct MalformedSnapshot {
    offset: usize,
}

/// One key-value pair of a snapshot, borrowed from its bytes.
pub(crate) type Record<'a> = (&'a [u8], &'a [u8]);

/// Splits snapshot bytes into key-value records.
pub(crate) fn parse_records(data: &[u8]) -> Result<Vec<Record<'_>>, MalformedSnapshot> {
    let mut records = Vec::new();
    let mut at = 0;
    let take = |at: &mut usize| -> Result<&[u8], MalformedSnapshot> {
        let malformed = MalformedSnapshot { offset: *at };
        let len_bytes: [u8; 4] = data
            .get(*at..*at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or(MalformedSnapshot { offset: *at })?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        let start = *at + 4;
        let part = data.get(start..start.checked_add(len).ok_or(malformed)?);
        let part = part.ok_or(MalformedSnapshot { offset: *at })?;
        *at = start + len;
        Ok(part)
    };
    while at < data.len() {
        let key = take(&mut at)?;
        let value = take(&mut at)?;
        records.push((key, value));
    }
    Ok(records)
}

/// A fingerprint of a group's state-machine data: equal on two replicas that
/// applied the same log. Returns the applied index it was taken at, and the
/// 64-bit FNV-1a hash of the group's records in key order.
pub(crate) fn digest(engine: &Engine, group: GroupId) -> io::Result<(u64, u64)> {
    let built = build(engine, group)?;
    let index = built.meta.last_log_id.map(|id| id.index).unwrap_or(0);
    Ok((index, fnv1a64(&built.data)))
}

/// 64-bit FNV-1a: stable across builds and platforms, and good enough to tell
/// replicas apart (this is a consistency check, not a security one).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut data = Vec::new();
        push_record(&mut data, b"k1", b"v1");
        push_record(&mut data, b"", b"empty key");
        let records = parse_records(&data).expect("well-formed");
        assert_eq!(
            records,
            vec![(&b"k1"[..], &b"v1"[..]), (&b""[..], &b"empty key"[..])]
        );
    }

    #[test]
    fn truncated_or_lying_snapshots_are_rejected_not_panicked_on() {
        let mut data = Vec::new();
        push_record(&mut data, b"key", b"value");
        for cut in 1..data.len() {
            assert!(parse_records(&data[..cut]).is_err(), "cut at {cut}");
        }
        let huge = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(parse_records(&huge).is_err());
    }

    #[test]
    fn digest_hash_depends_on_every_byte() {
        assert_ne!(fnv1a64(b"ab"), fnv1a64(b"ba"));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    }
}
