//! The session table: which of this node's connections are bound to which
//! user's session, and the pushes waiting for each.
//!
//! Pushes are news of the inbox (`Notify`) or the end of a session
//! (`Kick`). Notifies coalesce: a connection holds at most one
//! [`InboxNews`] not yet written (the newest version and a bounded run of
//! the newest entries), so a slow reader costs bounded memory and misses
//! only what a Sync gives it. A Kick is never dropped.
//!
//! A Login or Resume reads the inbox's latest version for the session's first
//! Notify, then binds its connection. News of the user that arrives between
//! the two finds no binding; so the login first says it [`expects`] the user,
//! and the table keeps the newest version it hears of for a while
//! ([`EXPECTED_FOR`]), which the binding then gets.
//!
//! [`expects`]: Sessions::expect

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fishchat_proto::client::kick::Reason;
use fishchat_shard::UserId;

use crate::news::{InboxNews, SharedEntry};
use crate::revocations::Confirmations;

/// What a connection's push writer is told to send.
#[derive(Clone, Debug, PartialEq)]
pub enum PushEvent {
    /// The user's inbox reached a version (with entries, when at hand).
    Notify(InboxNews),
    /// The session is over; write a Kick and close the connection.
    Kick(Reason),
}

/// One connection's pushes waiting for its writer: the inbox news not yet
/// written and the reason its session ended, if it did. A few dozen bytes
/// when idle, where a queue per connection cost kilobytes.
#[derive(Default)]
pub struct Pushes {
    pending: Mutex<Pending>,
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct Pending {
    news: InboxNews,
    kick: Option<Reason>,
}

impl Pushes {
    /// The inbox reached `version` (`entry` is its entry there, when at
    /// hand): joins the unwritten news.
    pub fn notify(&self, version: u64, entry: Option<SharedEntry>) {
        self.lock().news.add(version, entry);
        self.ready.notify_one();
    }

    /// The session ended for `reason` (the first reason given wins).
    pub fn kick(&self, reason: Reason) {
        self.lock().kick.get_or_insert(reason);
        self.ready.notify_one();
    }

    /// Waits for the next push to write: a pending Notify before the Kick,
    /// so the client learns the newest version before its session ends.
    pub async fn next(&self) -> PushEvent {
        loop {
            {
                let mut pending = self.lock();
                if !pending.news.is_empty() {
                    return PushEvent::Notify(std::mem::take(&mut pending.news));
                }
                if let Some(reason) = pending.kick.take() {
                    return PushEvent::Kick(reason);
                }
            }
            // A push made after the check above left a permit: no lost wakeup.
            self.ready.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a Kick frame says for `reason`.
pub fn kick_message(reason: Reason) -> &'static str {
    match reason {
        Reason::TokenRevoked => "the session was logged out",
        Reason::SessionReplaced => "a newer login of the same device replaced this session",
        Reason::ShuttingDown => "the node is shutting down",
        Reason::TokenExpired => "the session's token expired",
        Reason::Unspecified => "the session ended",
    }
}

/// A connection bound to a session.
struct Binding {
    conn: u64,
    session: u64,
    pushes: Arc<Pushes>,
}

/// How long news of a user is kept for a login that said it expects the
/// user: far longer than a login takes.
pub const EXPECTED_FOR: Duration = Duration::from_secs(60);

/// Every bound connection of this node, by user, and the sessions recently
/// confirmed not revoked.
#[derive(Default)]
pub struct Sessions {
    table: Mutex<Table>,
    confirmations: Confirmations,
}

#[derive(Default)]
struct Table {
    by_user: HashMap<UserId, Vec<Binding>>,
    /// Users a login is under way for: since when, and the newest version
    /// heard of since.
    expected: HashMap<UserId, (Instant, u64)>,
}

impl Sessions {
    /// A login for `user` is under way: news of the user from now on is
    /// kept for its binding.
    pub fn expect(&self, user: UserId) {
        let mut table = self.lock();
        let now = Instant::now();
        table
            .expected
            .entry(user)
            .and_modify(|(since, _)| *since = now)
            .or_insert((now, 0));
    }

    /// Forgets expected users whose login began [`EXPECTED_FOR`] before `now`.
    pub fn forget_expected(&self, now: Instant) {
        self.lock()
            .expected
            .retain(|_, (since, _)| now.saturating_duration_since(*since) < EXPECTED_FOR);
    }

    /// Binds connection `conn` to `session` of `user` (replacing an earlier
    /// binding of the same connection), whose login read `latest` as the
    /// inbox's latest version. When news of a newer version came since the
    /// login said it expects the user, the connection is notified of it.
    pub fn bind(&self, user: UserId, conn: u64, session: u64, pushes: Arc<Pushes>, latest: u64) {
        let mut table = self.lock();
        let seen = table.expected.get(&user).map_or(0, |(_, version)| *version);
        if seen > latest {
            pushes.notify(seen, None);
        }
        let bindings = table.by_user.entry(user).or_default();
        bindings.retain(|b| b.conn != conn);
        bindings.push(Binding {
            conn,
            session,
            pushes,
        });
    }

    /// Forgets connection `conn` of `user` (it closed).
    pub fn unbind(&self, user: UserId, conn: u64) {
        let mut table = self.lock();
        if let Some(bindings) = table.by_user.get_mut(&user) {
            bindings.retain(|b| b.conn != conn);
            if bindings.is_empty() {
                table.by_user.remove(&user);
            }
        }
    }

    /// Whether a connection of `user` is bound here.
    pub fn holds(&self, user: UserId) -> bool {
        self.lock().by_user.contains_key(&user)
    }

    /// Tells every connection of `user` that the inbox reached `version`,
    /// with its `entry` there when the caller has it.
    pub fn inbox_advanced(&self, user: UserId, version: u64, entry: Option<SharedEntry>) {
        let mut table = self.lock();
        if let Some((_, seen)) = table.expected.get_mut(&user) {
            *seen = (*seen).max(version);
        }
        for binding in table.by_user.get(&user).into_iter().flatten() {
            binding.pushes.notify(version, entry.clone());
        }
    }

    /// Sessions confirmed not revoked (see [`Confirmations`]).
    pub fn confirmations(&self) -> &Confirmations {
        &self.confirmations
    }

    /// Ends `session` of `user` on this node: its confirmation is forgotten
    /// and its connections are kicked.
    pub fn session_ended(&self, user: UserId, session: u64, reason: Reason) {
        self.confirmations.ended(user, session);
        let mut table = self.lock();
        let by_user = &mut table.by_user;
        if let Some(bindings) = by_user.get_mut(&user) {
            bindings.retain(|b| {
                if b.session != session {
                    return true;
                }
                b.pushes.kick(reason);
                false
            });
            if bindings.is_empty() {
                by_user.remove(&user);
            }
        }
    }

    /// Kicks every bound connection (the node is stopping).
    pub fn end_all(&self, reason: Reason) {
        let mut table = self.lock();
        for binding in table.by_user.values().flatten() {
            binding.pushes.kick(reason);
        }
        table.by_user.clear();
    }

    /// How many connections are bound.
    pub fn bound(&self) -> usize {
        self.lock().by_user.values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: u64) -> SharedEntry {
        Arc::new(fishchat_proto::client::InboxEntry {
            version,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn notifies_reach_every_connection_of_the_user_and_kicks_only_the_session() {
        let sessions = Sessions::default();
        let (p1, p2, p3) = (
            Arc::new(Pushes::default()),
            Arc::new(Pushes::default()),
            Arc::new(Pushes::default()),
        );
        sessions.bind(7, 1, 100, p1.clone(), 0);
        sessions.bind(7, 2, 200, p2.clone(), 0);
        sessions.bind(8, 3, 300, p3.clone(), 0);
        sessions.inbox_advanced(7, 5, Some(entry(5)));
        let news = |event| match event {
            PushEvent::Notify(news) => (news.latest(), news.entries().len()),
            PushEvent::Kick(_) => (0, 0),
        };
        assert_eq!(news(p1.next().await), (5, 1));
        assert_eq!(news(p2.next().await), (5, 1));
        assert!(p3.lock().news.is_empty(), "another user hears nothing");

        sessions.session_ended(7, 100, Reason::TokenRevoked);
        assert_eq!(p1.next().await, PushEvent::Kick(Reason::TokenRevoked));
        assert!(p2.lock().kick.is_none(), "the other session stays");
        assert_eq!(sessions.bound(), 2);

        sessions.unbind(7, 2);
        sessions.unbind(8, 3);
        assert_eq!(sessions.bound(), 0);
    }

    #[test]
    fn news_between_a_logins_read_and_its_binding_reaches_the_binding() {
        let sessions = Sessions::default();
        let pending = |pushes: &Pushes| pushes.lock().news.latest();
        sessions.inbox_advanced(7, 3, None);
        sessions.expect(7);
        // The login read version 3; version 4 commits before it binds.
        sessions.inbox_advanced(7, 4, None);
        sessions.inbox_advanced(8, 9, None);
        let first = Arc::new(Pushes::default());
        sessions.bind(7, 1, 100, first.clone(), 3);
        assert_eq!(pending(&first), 4, "told of the version it missed");
        let other = Arc::new(Pushes::default());
        sessions.bind(8, 2, 200, other.clone(), 0);
        assert!(other.lock().news.is_empty(), "8 was not expected");
        let current = Arc::new(Pushes::default());
        sessions.bind(7, 3, 300, current.clone(), 4);
        assert!(current.lock().news.is_empty(), "its read was current");

        sessions.forget_expected(Instant::now() + EXPECTED_FOR / 2);
        sessions.inbox_advanced(7, 5, None);
        let again = Arc::new(Pushes::default());
        sessions.bind(7, 4, 400, again.clone(), 4);
        assert_eq!(pending(&again), 5);
        sessions.forget_expected(Instant::now() + EXPECTED_FOR);
        assert!(
            sessions.lock().expected.is_empty(),
            "forgotten after a while"
        );
        sessions.inbox_advanced(7, 6, None);
        let late = Arc::new(Pushes::default());
        sessions.bind(7, 5, 500, late.clone(), 4);
        assert!(late.lock().news.is_empty(), "nothing kept once forgotten");
        assert_eq!(pending(&first), 6, "bound connections hear news as ever");
    }

    #[tokio::test]
    async fn notifies_coalesce_to_the_newest_and_the_kick_comes_last() {
        let pushes = Pushes::default();
        pushes.notify(3, None);
        pushes.notify(8, Some(entry(8)));
        pushes.notify(9, Some(entry(9)));
        pushes.notify(4, None); // late and older: never moves the version back
        pushes.kick(Reason::TokenExpired);
        pushes.kick(Reason::ShuttingDown); // the first reason stands
        let mut expected = InboxNews::default();
        expected.add(8, Some(entry(8)));
        expected.add(9, Some(entry(9)));
        assert_eq!(pushes.next().await, PushEvent::Notify(expected));
        assert_eq!(pushes.next().await, PushEvent::Kick(Reason::TokenExpired));
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), pushes.next());
        assert!(waiting.await.is_err(), "nothing more is pending");
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_push() {
        let pushes = Arc::new(Pushes::default());
        let writer = tokio::spawn({
            let pushes = pushes.clone();
            async move { pushes.next().await }
        });
        tokio::task::yield_now().await;
        pushes.notify(1, None);
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), writer).await;
        assert!(
            matches!(&event, Ok(Ok(PushEvent::Notify(news))) if news.latest() == 1),
            "{event:?}"
        );
    }
}
