//! The newest entries of a group's log, kept decoded in memory.
//!
//! openraft reads every entry back soon after it was appended: the leader
//! once per follower to replicate it, and every replica once more to apply
//! it. From RocksDB each read costs an iterator and a decode of the whole
//! entry; from here it costs a clone.
//!
//! The tail holds consecutive entries and only ever the log's own: an
//! append adds what it wrote once it is in RocksDB, and a truncate or a
//! purge drops entries before RocksDB does. A read is served here only when
//! the tail holds every entry of the range; anything else (a follower far
//! behind, a range open at the end) is read from RocksDB as before.

use std::collections::VecDeque;

use openraft::EntryPayload;

use crate::types::Entry;

/// Most entries kept per group.
const TAIL_ENTRIES: usize = 512;
/// Most bytes of commands kept per group (at least the newest entry is
/// kept, whatever its size).
const TAIL_BYTES: usize = 2 * 1024 * 1024;

/// The newest entries of one group's log; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct LogTail {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl LogTail {
    /// Index of the first entry held.
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    /// Entries `[start, end)`, if the tail holds every one of them.
    pub(crate) fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first()?;
        let next = first + self.entries.len() as u64;
        if start < first || end > next || start >= end {
            return None;
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).cloned().collect())
    }

    /// Drops the entries at `index` and after (the log is about to lose or
    /// overwrite them).
    pub(crate) fn forget_from(&mut self, index: u64) {
        let Some(first) = self.first() else {
            return;
        };
        let keep = index.saturating_sub(first) as usize;
        while self.entries.len() > keep {
            if let Some(entry) = self.entries.pop_back() {
                self.bytes -= size(&entry);
            }
        }
    }

    /// Drops the entries up to and including `index` (about to be purged).
    pub(crate) fn forget_through(&mut self, index: u64) {
        while self.first().is_some_and(|first| first <= index) {
            if let Some(entry) = self.entries.pop_front() {
                self.bytes -= size(&entry);
            }
        }
    }

    /// Adds entries the log now holds. Each must follow the one before it
    /// (after [`LogTail::forget_from`] their first index); one that does not
    /// starts the tail again from itself.
    pub(crate) fn appended(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            if let Some(last) = self.entries.back() {
                if entry.log_id.index != last.log_id.index + 1 {
                    self.entries.clear();
                    self.bytes = 0;
                }
            }
            self.bytes += size(&entry);
            self.entries.push_back(entry);
        }
        while self.entries.len() > 1
            && (self.entries.len() > TAIL_ENTRIES || self.bytes > TAIL_BYTES)
        {
            if let Some(entry) = self.entries.pop_front() {
                self.bytes -= size(&entry);
            }
        }
    }
}

/// The bytes an entry's commands hold, plus a fixed overhead.
fn size(entry: &Entry) -> usize {
    let commands = match &entry.payload {
        EntryPayload::Normal(batch) => batch.0.iter().map(|c| c.0.len() + 24).sum(),
        EntryPayload::Blank | EntryPayload::Membership(_) => 0,
    };
    commands + 64
}

#[cfg(test)]
mod tests {
    use openraft::impls::leader_id_adv::LeaderId;

    use super::*;
    use crate::types::{Batch, Command, LogId};

    fn entry(index: u64, body_bytes: usize) -> Entry {
        Entry {
            log_id: LogId::new(
                LeaderId {
                    term: 1,
                    node_id: 1,
                },
                index,
            ),
            payload: EntryPayload::Normal(Batch(vec![Command(vec![7; body_bytes])])),
        }
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|es| es.iter().map(|e| e.log_id.index).collect())
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let mut tail = LogTail::default();
        tail.appended((5..=9).map(|i| entry(i, 10)).collect());
        assert_eq!(indexes(tail.get(5, 10)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(tail.get(7, 9)), Some(vec![7, 8]));
        assert_eq!(indexes(tail.get(4, 10)), None, "entry 4 is not held");
        assert_eq!(indexes(tail.get(5, 11)), None, "entry 10 is not held");
        assert_eq!(indexes(tail.get(7, 7)), None);
    }

    #[test]
    fn follows_truncation_purge_and_overwrite_like_the_log() {
        let mut tail = LogTail::default();
        tail.appended((1..=6).map(|i| entry(i, 10)).collect());
        tail.forget_from(5);
        assert_eq!(indexes(tail.get(1, 5)), Some(vec![1, 2, 3, 4]));
        assert_eq!(tail.get(1, 6), None);
        tail.appended(vec![entry(5, 20)]);
        assert_eq!(indexes(tail.get(5, 6)), Some(vec![5]));
        tail.forget_through(2);
        assert_eq!(tail.get(2, 4), None);
        assert_eq!(indexes(tail.get(3, 6)), Some(vec![3, 4, 5]));
        // An append that does not follow the tail starts it again.
        tail.appended(vec![entry(9, 10)]);
        assert_eq!(tail.get(3, 4), None);
        assert_eq!(indexes(tail.get(9, 10)), Some(vec![9]));
        assert_eq!(tail.bytes, size(&entry(9, 10)));
    }

    #[test]
    fn stays_within_its_bounds_but_keeps_the_newest_entry() {
        let mut tail = LogTail::default();
        tail.appended((1..=2000).map(|i| entry(i, 100)).collect());
        assert_eq!(tail.entries.len(), TAIL_ENTRIES);
        assert_eq!(indexes(tail.get(2000, 2001)), Some(vec![2000]));
        tail.appended(vec![entry(2001, 3 * TAIL_BYTES)]);
        assert_eq!(indexes(tail.get(2001, 2002)), Some(vec![2001]));
        assert_eq!(tail.entries.len(), 1);
    }
}
