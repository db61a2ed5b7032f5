//! Inbox news: what a user's sessions are to learn of their inbox, its
//! newest committed version and, when at hand, the newest entries
//! themselves, so an online client takes a message from its Notify and
//! needs no Sync.
//!
//! News coalesces. It keeps the highest version heard of and a run of
//! entries with consecutive versions ending at that version, at most
//! [`NEWS_ENTRIES`] entries and [`NEWS_BYTES`] bytes; older entries fall off
//! the front and the client syncs for them. Any run that ends at the
//! newest version is correct: the client takes the entries only when the
//! first follows the version it holds (docs/protocol.md, "The push
//! stream").

use std::collections::VecDeque;
use std::sync::Arc;

use fishchat_proto::client as wire;
use prost::Message;

/// Most entries one piece of news keeps.
pub const NEWS_ENTRIES: usize = 32;
/// Most entry bytes (encoded) one piece of news keeps; a larger entry is
/// left to Sync.
pub const NEWS_BYTES: usize = 32 * 1024;

/// An entry shared by every session (and peer batch) it goes to.
pub type SharedEntry = Arc<wire::InboxEntry>;

/// The newest version of one inbox and its newest entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InboxNews {
    latest: u64,
    entries: VecDeque<SharedEntry>,
    bytes: usize,
}

impl InboxNews {
    /// The inbox reached `version`; `entry` is its entry at `version`
    /// when the caller has it. Older news than what is held changes
    /// nothing: notifies may arrive out of order.
    pub fn add(&mut self, version: u64, entry: Option<SharedEntry>) {
        if version <= self.latest {
            return;
        }
        self.latest = version;
        let entry = entry.filter(|e| e.version == version);
        let Some(entry) = entry else {
            self.clear_entries();
            return;
        };
        let size = entry.encoded_len();
        let follows = self
            .entries
            .back()
            .is_some_and(|last| last.version.checked_add(1) == Some(version));
        if !follows || size > NEWS_BYTES {
            self.clear_entries();
        }
        if size > NEWS_BYTES {
            return;
        }
        while self.entries.len() >= NEWS_ENTRIES || self.bytes + size > NEWS_BYTES {
            match self.entries.pop_front() {
                Some(old) => self.bytes -= old.encoded_len(),
                None => break,
            }
        }
        self.bytes += size;
        self.entries.push_back(entry);
    }

    /// Adds everything `other` says, in order.
    pub fn merge(&mut self, other: InboxNews) {
        let latest = other.latest;
        for entry in other.entries {
            self.add(entry.version, Some(entry));
        }
        self.add(latest, None);
    }

    /// The newest version heard of; 0 when there is no news.
    pub fn latest(&self) -> u64 {
        self.latest
    }

    /// Whether there is no news.
    pub fn is_empty(&self) -> bool {
        self.latest == 0
    }

    /// The entries, consecutive and ending at [`Self::latest`] (or none).
    pub fn entries(&self) -> impl ExactSizeIterator<Item = &SharedEntry> {
        self.entries.iter()
    }

    /// The news as a client Notify.
    pub fn to_notify(&self) -> wire::Notify {
        wire::Notify {
            latest_version: self.latest,
            entries: self.entries.iter().map(|e| (**e).clone()).collect(),
        }
    }

    fn clear_entries(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: u64, body_len: usize) -> SharedEntry {
        Arc::new(wire::InboxEntry {
            version,
            message_id: version * 10,
            body: vec![b'x'; body_len],
            ..Default::default()
        })
    }

    fn versions(news: &InboxNews) -> Vec<u64> {
        news.entries().map(|e| e.version).collect()
    }

    #[test]
    fn consecutive_entries_gather_and_end_at_the_newest_version() {
        let mut news = InboxNews::default();
        assert!(news.is_empty());
        for v in 3..=5 {
            news.add(v, Some(entry(v, 10)));
        }
        assert_eq!(news.latest(), 5);
        assert_eq!(versions(&news), [3, 4, 5]);
        let notify = news.to_notify();
        assert_eq!(notify.latest_version, 5);
        assert_eq!(notify.entries.len(), 3);
    }

    #[test]
    fn a_gap_or_a_version_without_its_entry_restarts_the_run() {
        let mut news = InboxNews::default();
        news.add(3, Some(entry(3, 10)));
        news.add(5, Some(entry(5, 10)));
        assert_eq!(versions(&news), [5], "4 is missing: only 5 may be taken");
        news.add(6, None);
        assert_eq!(news.latest(), 6);
        assert!(versions(&news).is_empty(), "6 is not at hand");
        news.add(7, Some(entry(7, 10)));
        assert_eq!(versions(&news), [7]);
        news.add(8, Some(entry(9, 10)));
        assert_eq!((news.latest(), versions(&news)), (8, vec![]), "mislabelled");
    }

    #[test]
    fn older_news_changes_nothing() {
        let mut news = InboxNews::default();
        news.add(4, Some(entry(4, 10)));
        news.add(5, Some(entry(5, 10)));
        news.add(3, Some(entry(3, 10)));
        news.add(5, None);
        assert_eq!((news.latest(), versions(&news)), (5, vec![4, 5]));
    }

    #[test]
    fn the_run_keeps_only_the_newest_within_its_bounds() {
        let mut news = InboxNews::default();
        for v in 1..=(NEWS_ENTRIES as u64 + 5) {
            news.add(v, Some(entry(v, 10)));
        }
        let kept = versions(&news);
        assert_eq!(kept.len(), NEWS_ENTRIES);
        assert_eq!(kept.last(), Some(&(NEWS_ENTRIES as u64 + 5)));

        let mut news = InboxNews::default();
        let third = NEWS_BYTES / 3;
        for v in 1..=4 {
            news.add(v, Some(entry(v, third)));
        }
        assert_eq!(versions(&news), [3, 4], "bytes bound the run too");
        news.add(5, Some(entry(5, NEWS_BYTES + 1)));
        assert_eq!((news.latest(), versions(&news)), (5, vec![]), "too big");
    }

    #[test]
    fn merging_keeps_the_union_in_order() {
        let mut a = InboxNews::default();
        a.add(1, Some(entry(1, 10)));
        let mut b = InboxNews::default();
        b.add(2, Some(entry(2, 10)));
        b.add(3, Some(entry(3, 10)));
        a.merge(b);
        assert_eq!((a.latest(), versions(&a)), (3, vec![1, 2, 3]));
        let mut c = InboxNews::default();
        c.add(9, None);
        a.merge(c);
        assert_eq!((a.latest(), versions(&a)), (9, vec![]));
    }
}
