//! The session directory (DESIGN.md §5, Notify): which users each node holds
//! sessions of, so that an inbox event goes only to the nodes that may push
//! it, not to every peer.
//!
//! Each node tells every peer the users it holds sessions of: the whole set
//! when the peer asks for it (either side restarted, or a call failed), then
//! the changes, in order, one call at a time (`SessionPeer.Directory`).
//!
//! - A Login or Resume *announces* its user and waits (at most
//!   [`ANNOUNCE_WAIT`]) until every reachable peer has taken the change,
//!   before it reads the inbox's latest version for the session's first
//!   Notify. A commit a peer then reports to everyone but this node was
//!   reported before the announcement reached it, so it is older than that
//!   read and the client syncs for it.
//! - A user with no session here for [`FORGET_AFTER`] is withdrawn; until
//!   then peers send events this node ignores, which costs only the bytes.
//! - A peer whose whole set this node does not hold gets every event, as
//!   before the directory: after either side starts, after an update from
//!   an incarnation it has no set of, and when the peer has not heard from
//!   this node for [`VIEW_TTL`] (its calls may be failing one way only).
//!   It asks for the set in its next answer; an idle sender calls every
//!   [`KEEPALIVE`] to hear that.
//! - Updates are numbered; within an incarnation one numbered below the last
//!   taken arrived late (its call had failed and was replaced by a whole
//!   set) and is ignored.
//!
//! Events stay hints (G7): a peer cut off when a user was announced learns
//! of it with the whole set once it answers again, and the client syncs on
//! its timer meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fishchat_proto::peer::{DirectoryAck, DirectoryUpdate};
use fishchat_shard::UserId;
use tokio::sync::{watch, Notify};

/// Longest a Login or Resume waits for the peers to take its user.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(1);
/// A user with no session here this long is withdrawn from the peers.
pub const FORGET_AFTER: Duration = Duration::from_secs(120);
/// An idle link calls its peer this often, to learn whether it wants the
/// whole set; it is also how often withdrawn users are looked for.
pub const KEEPALIVE: Duration = Duration::from_secs(10);
/// A peer's set not refreshed this long is no longer trusted: three
/// keepalives missed.
pub const VIEW_TTL: Duration = Duration::from_secs(30);

/// This node's side of the directory: what it announced to its peers, and
/// what each peer announced to it.
pub struct Directory {
    node_id: u64,
    incarnation: u64,
    local: Mutex<Local>,
    links: Vec<Link>,
    views: HashMap<u64, Mutex<View>>,
    stats: DirectoryStats,
}

/// Counts for `/metrics`.
#[derive(Default)]
pub struct DirectoryStats {
    /// Inbox events sent to peers.
    pub events_sent: AtomicU64,
    /// Inbox events not sent: the peer holds no session of the user.
    pub events_skipped: AtomicU64,
    /// Inbox events received from peers.
    pub events_received: AtomicU64,
}

/// The users this node announced, and the changes each peer has yet to take.
struct Local {
    users: HashMap<UserId, Held>,
    /// Number of the latest change; every change goes to every peer.
    seq: u64,
    pending: Vec<Pending>,
}

struct Held {
    /// The change that announced the user.
    seq: u64,
    /// When a session of the user was last known here.
    touched: Instant,
}

/// What one peer has yet to take. `added` and `removed` never share a user:
/// a later change replaces an earlier one.
struct Pending {
    /// No link serves this peer (its address is unusable): nothing is kept.
    forsaken: bool,
    full: bool,
    added: HashSet<UserId>,
    removed: HashSet<UserId>,
}

/// The sending side of one peer.
struct Link {
    node_id: u64,
    wake: Notify,
    /// The latest change the peer has taken.
    taken: watch::Sender<u64>,
    /// Whether the last call reached the peer; announcements do not wait
    /// for a peer that did not answer.
    reachable: AtomicBool,
}

/// A batch of changes for one peer, taken from [`Local`].
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    update: DirectoryUpdate,
    /// The latest change the batch carries.
    upto: u64,
}

/// What this node knows of one peer's sessions.
#[derive(Debug, Default)]
struct View {
    incarnation: u64,
    /// The number of the last update taken.
    seq: u64,
    /// When the last update was taken.
    heard: Option<Instant>,
    /// `None`: not known; the peer gets every event.
    users: Option<HashSet<UserId>>,
}

impl View {
    /// The peer's set, if this node holds one it still trusts at `now`.
    fn known(&self, now: Instant) -> Option<&HashSet<UserId>> {
        let fresh = self
            .heard
            .is_some_and(|heard| now.saturating_duration_since(heard) < VIEW_TTL);
        self.users.as_ref().filter(|_| fresh)
    }

    fn wants(&self, user: UserId, now: Instant) -> bool {
        self.known(now).is_none_or(|users| users.contains(&user))
    }

    /// Takes `update` at `now`; returns whether the sender must send its
    /// whole set.
    fn apply(&mut self, update: DirectoryUpdate, now: Instant) -> bool {
        if self.users.is_some() && update.incarnation == self.incarnation && update.seq < self.seq {
            return false; // late: a newer update was taken
        }
        if update.full {
            self.incarnation = update.incarnation;
            self.seq = update.seq;
            self.heard = Some(now);
            self.users = Some(update.added.into_iter().collect());
            return false;
        }
        let current = self.known(now).is_some() && self.incarnation == update.incarnation;
        match &mut self.users {
            Some(users) if current => {
                for user in update.removed {
                    users.remove(&user);
                }
                users.extend(update.added);
                self.seq = update.seq;
                self.heard = Some(now);
                false
            }
            _ => {
                self.users = None;
                true
            }
        }
    }
}

/// What a call to a peer came to.
pub enum CallOutcome {
    /// The peer took the batch.
    Taken(DirectoryAck),
    /// The call failed; the peer may have taken nothing.
    Failed,
}

impl Directory {
    /// The directory of node `node_id`, whose peers are `peers` (node ids,
    /// this node excluded). Every peer first gets the whole set.
    pub fn new(node_id: u64, peers: &[u64], incarnation: u64) -> Self {
        let links = peers
            .iter()
            .map(|&peer| {
                let link = Link {
                    node_id: peer,
                    wake: Notify::new(),
                    taken: watch::Sender::new(0),
                    reachable: AtomicBool::new(true),
                };
                link.wake.notify_one();
                link
            })
            .collect();
        let pending = peers
            .iter()
            .map(|_| Pending {
                forsaken: false,
                full: true,
                added: HashSet::new(),
                removed: HashSet::new(),
            })
            .collect();
        Self {
            node_id,
            incarnation,
            local: Mutex::new(Local {
                users: HashMap::new(),
                seq: 0,
                pending,
            }),
            links,
            views: peers
                .iter()
                .map(|&peer| (peer, Mutex::new(View::default())))
                .collect(),
            stats: DirectoryStats::default(),
        }
    }

    /// The node ids of the peers, in the order [`Directory::run_link`] takes
    /// them.
    pub fn peers(&self) -> impl Iterator<Item = u64> + '_ {
        self.links.iter().map(|link| link.node_id)
    }

    /// Counts for `/metrics`.
    pub fn stats(&self) -> &DirectoryStats {
        &self.stats
    }

    /// How many peers' sets this node holds.
    pub fn peers_known(&self) -> usize {
        let now = Instant::now();
        self.views
            .values()
            .filter(|view| lock(view).known(now).is_some())
            .count()
    }

    /// Whether the peer `node_id` may hold a session of `user` (an unknown
    /// peer may); counts the answer.
    pub fn peer_wants(&self, node_id: u64, user: UserId) -> bool {
        let wants = self
            .views
            .get(&node_id)
            .is_none_or(|view| lock(view).wants(user, Instant::now()));
        let counter = if wants {
            &self.stats.events_sent
        } else {
            &self.stats.events_skipped
        };
        counter.fetch_add(1, Ordering::Relaxed);
        wants
    }

    /// Takes a peer's update; returns the answer.
    pub fn receive(&self, update: DirectoryUpdate) -> DirectoryAck {
        let Some(view) = self.views.get(&update.node_id) else {
            tracing::warn!(
                node = update.node_id,
                "directory update from a node that is not a peer"
            );
            return DirectoryAck { wants_full: false };
        };
        DirectoryAck {
            wants_full: lock(view).apply(update, Instant::now()),
        }
    }

    /// Tells every peer that this node holds a session of `user`, and returns
    /// once every reachable peer has taken it, or after [`ANNOUNCE_WAIT`].
    pub async fn announce(&self, user: UserId) {
        let seq = self.announced(user, Instant::now());
        let waits = self.links.iter().map(|link| async move {
            let mut taken = link.taken.subscribe();
            loop {
                if *taken.borrow_and_update() >= seq || !link.reachable.load(Ordering::Relaxed) {
                    return;
                }
                if taken.changed().await.is_err() {
                    return;
                }
            }
        });
        let _ = tokio::time::timeout(ANNOUNCE_WAIT, futures::future::join_all(waits)).await;
    }

    /// Records `user` as held at `now`; returns the change that announced it.
    fn announced(&self, user: UserId, now: Instant) -> u64 {
        let mut local = lock(&self.local);
        if let Some(held) = local.users.get_mut(&user) {
            held.touched = now;
            return held.seq;
        }
        local.seq += 1;
        let seq = local.seq;
        local.users.insert(user, Held { seq, touched: now });
        for pending in local.pending.iter_mut().filter(|p| !p.forsaken) {
            pending.removed.remove(&user);
            pending.added.insert(user);
        }
        drop(local);
        self.wake_links();
        seq
    }

    /// Withdraws the users not touched for [`FORGET_AFTER`] of whom `holds`
    /// says this node has no session; touches the others.
    pub fn sweep(&self, now: Instant, holds: impl Fn(UserId) -> bool) {
        let mut local = lock(&self.local);
        let stale: Vec<UserId> = local
            .users
            .iter()
            .filter(|(_, held)| now.saturating_duration_since(held.touched) >= FORGET_AFTER)
            .map(|(user, _)| *user)
            .collect();
        let mut withdrawn = false;
        for user in stale {
            if holds(user) {
                if let Some(held) = local.users.get_mut(&user) {
                    held.touched = now;
                }
                continue;
            }
            local.users.remove(&user);
            local.seq += 1;
            for pending in local.pending.iter_mut().filter(|p| !p.forsaken) {
                pending.added.remove(&user);
                pending.removed.insert(user);
            }
            withdrawn = true;
        }
        drop(local);
        if withdrawn {
            self.wake_links();
        }
    }

    /// No link will serve the peer at `index` (its address is unusable):
    /// announcements stop waiting for it and nothing is kept for it.
    pub fn forsake(&self, index: usize) {
        if let Some(pending) = lock(&self.local).pending.get_mut(index) {
            pending.forsaken = true;
            pending.added.clear();
            pending.removed.clear();
        }
        if let Some(link) = self.links.get(index) {
            link.reachable.store(false, Ordering::Relaxed);
            link.taken.send_modify(|_| {});
        }
    }

    fn wake_links(&self) {
        for link in &self.links {
            link.wake.notify_one();
        }
    }

    /// The next batch for the peer at `index`: the whole set when it needs
    /// it, else the changes it has yet to take (none: a keepalive).
    pub fn take(&self, index: usize) -> Batch {
        let mut local = lock(&self.local);
        let upto = local.seq;
        let whole: Option<Vec<UserId>> = match local.pending.get(index) {
            Some(pending) if pending.full => Some(local.users.keys().copied().collect()),
            _ => None,
        };
        let Some(pending) = local.pending.get_mut(index) else {
            return self.batch(false, Vec::new(), Vec::new(), upto);
        };
        let added = std::mem::take(&mut pending.added);
        let removed = std::mem::take(&mut pending.removed);
        match whole {
            Some(users) => {
                pending.full = false;
                self.batch(true, users, Vec::new(), upto)
            }
            None => self.batch(
                false,
                added.into_iter().collect(),
                removed.into_iter().collect(),
                upto,
            ),
        }
    }

    fn batch(&self, full: bool, added: Vec<UserId>, removed: Vec<UserId>, upto: u64) -> Batch {
        Batch {
            update: DirectoryUpdate {
                node_id: self.node_id,
                incarnation: self.incarnation,
                full,
                added,
                removed,
                seq: upto,
            },
            upto,
        }
    }

    /// Records what came of sending `batch` to the peer at `index`; returns
    /// whether another call should follow at once (the peer wants the whole
    /// set).
    pub fn settle(&self, index: usize, batch: &Batch, outcome: CallOutcome) -> bool {
        let Some(link) = self.links.get(index) else {
            return false;
        };
        let resend = match outcome {
            CallOutcome::Taken(ack) => {
                link.reachable.store(true, Ordering::Relaxed);
                link.taken
                    .send_modify(|taken| *taken = (*taken).max(batch.upto));
                ack.wants_full
            }
            CallOutcome::Failed => {
                link.reachable.store(false, Ordering::Relaxed);
                // Waiting announcements stop waiting for this peer.
                link.taken.send_modify(|_| {});
                true
            }
        };
        if resend {
            if let Some(pending) = lock(&self.local).pending.get_mut(index) {
                pending.full = true;
            }
        }
        resend
    }

    /// Sends the peer at `index` its batches through `call`, until the node
    /// stops: at once after a change, every [`KEEPALIVE`] when idle, and
    /// with a growing pause while calls fail.
    pub async fn run_link<F, Fut>(&self, index: usize, mut call: F)
    where
        F: FnMut(DirectoryUpdate) -> Fut,
        Fut: std::future::Future<Output = CallOutcome>,
    {
        let Some(link) = self.links.get(index) else {
            return;
        };
        let mut pause = Duration::from_millis(100);
        loop {
            let _ = tokio::time::timeout(KEEPALIVE, link.wake.notified()).await;
            loop {
                let batch = self.take(index);
                let outcome = call(batch.update.clone()).await;
                let failed = matches!(outcome, CallOutcome::Failed);
                if !self.settle(index, &batch, outcome) {
                    pause = Duration::from_millis(100);
                    break;
                }
                if failed {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken() -> CallOutcome {
        CallOutcome::Taken(DirectoryAck { wants_full: false })
    }

    #[test]
    fn a_peer_gets_the_whole_set_first_then_only_the_changes() {
        let directory = Directory::new(1, &[2, 3], 77);
        let t0 = Instant::now();
        assert_eq!(directory.announced(10, t0), 1);
        assert_eq!(directory.announced(11, t0), 2);
        assert_eq!(
            directory.announced(10, t0),
            1,
            "a held user is not announced again"
        );

        let first = directory.take(0);
        assert!(first.update.full);
        let mut users = first.update.added.clone();
        users.sort_unstable();
        assert_eq!(users, vec![10, 11]);
        assert_eq!((first.upto, first.update.incarnation), (2, 77));
        assert_eq!(first.update.seq, 2);
        assert!(!directory.settle(0, &first, taken()));

        directory.announced(12, t0);
        let next = directory.take(0);
        assert!(!next.update.full);
        assert_eq!(next.update.added, vec![12]);
        assert_eq!(next.upto, 3);
        // The other peer has not been called yet: it still gets the whole set.
        let other = directory.take(1);
        assert!(other.update.full);
        assert_eq!(other.update.added.len(), 3);
        // Nothing left: a keepalive.
        let idle = directory.take(0);
        assert!(
            !idle.update.full && idle.update.added.is_empty() && idle.update.removed.is_empty()
        );
    }

    #[test]
    fn a_failed_call_or_a_peer_that_lost_the_set_gets_the_whole_set_again() {
        let directory = Directory::new(1, &[2], 5);
        let t0 = Instant::now();
        directory.announced(10, t0);
        let first = directory.take(0);
        assert!(directory.settle(0, &first, CallOutcome::Failed));
        directory.announced(11, t0);
        let retry = directory.take(0);
        assert!(retry.update.full, "after a failure the next call is whole");
        assert_eq!(retry.update.added.len(), 2);
        assert!(!directory.settle(0, &retry, taken()));

        directory.announced(12, t0);
        let change = directory.take(0);
        assert!(directory.settle(
            0,
            &change,
            CallOutcome::Taken(DirectoryAck { wants_full: true })
        ));
        assert!(directory.take(0).update.full);
    }

    #[test]
    fn users_without_a_session_are_withdrawn_after_a_while_and_a_return_cancels_it() {
        let directory = Directory::new(1, &[2], 5);
        let t0 = Instant::now();
        directory.announced(10, t0);
        directory.announced(11, t0);
        directory.announced(12, t0);
        let first = directory.take(0);
        directory.settle(0, &first, taken());

        // Too early: nothing is withdrawn.
        directory.sweep(t0 + FORGET_AFTER / 2, |_| false);
        assert!(directory.take(0).update.removed.is_empty());

        let later = t0 + FORGET_AFTER;
        directory.sweep(later, |user| user == 11);
        let mut withdrawn = directory.take(0).update.removed;
        withdrawn.sort_unstable();
        assert_eq!(withdrawn, vec![10, 12]);

        // 11 is withdrawn, and comes back before the withdrawal went out:
        // the peer gets the add only.
        directory.sweep(later + FORGET_AFTER, |_| false);
        directory.announced(11, later + FORGET_AFTER);
        let batch = directory.take(0);
        assert_eq!(batch.update.added, vec![11]);
        assert!(batch.update.removed.is_empty());
    }

    #[test]
    fn a_receiver_sends_everything_until_it_holds_a_whole_set_of_the_senders_incarnation() {
        let directory = Directory::new(2, &[1], 9);
        assert!(directory.peer_wants(1, 42), "unknown peer gets every event");
        assert_eq!(directory.peers_known(), 0);

        let change = |incarnation, added: Vec<u64>, removed: Vec<u64>| DirectoryUpdate {
            node_id: 1,
            incarnation,
            full: false,
            added,
            removed,
            seq: 0,
        };
        assert!(directory.receive(change(7, vec![5], vec![])).wants_full);
        assert!(directory.peer_wants(1, 42));

        let whole = DirectoryUpdate {
            node_id: 1,
            incarnation: 7,
            full: true,
            added: vec![5, 6],
            removed: vec![],
            seq: 0,
        };
        assert!(!directory.receive(whole).wants_full);
        assert_eq!(directory.peers_known(), 1);
        assert!(directory.peer_wants(1, 5));
        assert!(!directory.peer_wants(1, 42));

        assert!(!directory.receive(change(7, vec![42], vec![5])).wants_full);
        assert!(directory.peer_wants(1, 42));
        assert!(!directory.peer_wants(1, 5));

        // A change from a new incarnation (the peer restarted): unknown again.
        assert!(directory.receive(change(8, vec![], vec![])).wants_full);
        assert!(directory.peer_wants(1, 5));
        assert_eq!(directory.peers_known(), 0);

        let stats = directory.stats();
        assert_eq!(stats.events_skipped.load(Ordering::Relaxed), 2);
        assert_eq!(stats.events_sent.load(Ordering::Relaxed), 5);

        // An update from a node that is not a peer changes nothing.
        let stranger = DirectoryUpdate {
            node_id: 99,
            ..change(7, vec![1], vec![])
        };
        assert!(!directory.receive(stranger).wants_full);
    }

    #[test]
    fn a_late_update_is_ignored_and_a_silent_peers_set_expires() {
        let update = |full, seq, added: Vec<u64>, removed: Vec<u64>| DirectoryUpdate {
            node_id: 1,
            incarnation: 7,
            full,
            added,
            removed,
            seq,
        };
        let mut view = View::default();
        let t0 = Instant::now();
        // A call withdrawing 5 failed (seq 3); the whole set that replaced
        // it (seq 4) holds 5 again; then the failed call arrives after all.
        assert!(!view.apply(update(true, 4, vec![5], vec![]), t0));
        assert!(!view.apply(update(false, 3, vec![], vec![5]), t0));
        assert!(view.wants(5, t0), "the late withdrawal changed nothing");
        assert!(!view.wants(6, t0));
        assert!(!view.apply(update(false, 5, vec![6], vec![]), t0));
        assert!(view.wants(6, t0));

        // Nothing heard for VIEW_TTL: the set is no longer trusted, and
        // the next change asks for the whole set.
        let later = t0 + VIEW_TTL;
        assert!(view.wants(42, later));
        assert!(view.apply(update(false, 6, vec![], vec![]), later));
        assert!(!view.apply(update(true, 6, vec![5], vec![]), later));
        assert!(!view.wants(42, later));
    }

    #[test]
    fn a_forsaken_peer_keeps_nothing_and_is_not_waited_for() {
        let directory = Directory::new(1, &[2, 3], 5);
        directory.forsake(1);
        directory.announced(10, Instant::now());
        assert!(!directory.links[1].reachable.load(Ordering::Relaxed));
        let local = lock(&directory.local);
        assert!(local.pending[1].added.is_empty());
        assert_eq!(local.pending[0].added.len(), 1);
    }

    #[tokio::test]
    async fn an_announcement_waits_for_reachable_peers_only_and_at_most_a_while() {
        let directory = std::sync::Arc::new(Directory::new(1, &[2, 3], 5));
        // Peer 2 takes every batch at once; peer 3's calls hang for 3 s and
        // then fail.
        let link2 = tokio::spawn({
            let directory = directory.clone();
            async move { directory.run_link(0, |_| async { taken() }).await }
        });
        let link3 = tokio::spawn({
            let directory = directory.clone();
            async move {
                directory
                    .run_link(1, |_| async {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        CallOutcome::Failed
                    })
                    .await
            }
        });
        let start = Instant::now();
        directory.announce(10).await;
        assert!(
            start.elapsed() >= ANNOUNCE_WAIT,
            "waited for the peer that had not answered yet"
        );
        assert!(
            *directory.links[0].taken.borrow() >= 1,
            "peer 2 took user 10"
        );
        assert_eq!(*directory.links[1].taken.borrow(), 0, "peer 3 took nothing");

        // Once peer 3's call has failed, announcements wait for peer 2 only.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!directory.links[1].reachable.load(Ordering::Relaxed));
        let start = Instant::now();
        directory.announce(11).await;
        assert!(start.elapsed() < ANNOUNCE_WAIT, "did not wait for peer 3");
        assert!(
            *directory.links[0].taken.borrow() >= 2,
            "peer 2 took user 11"
        );
        link2.abort();
        link3.abort();
    }
}
