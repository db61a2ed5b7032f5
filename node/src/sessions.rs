//! The session table: which of this node's connections are bound to which
//! user's session, and the push channel of each.
//!
//! Pushes are hints (`Notify`) or the end of a session (`Kick`). A push
//! channel that is full drops a Notify (the client syncs on a timer anyway)
//! but never silently drops a Kick: the connection is closed instead.

use std::collections::HashMap;
use std::sync::Mutex;

use fishchat_proto::client::kick::Reason;
use fishchat_shard::UserId;
use tokio::sync::mpsc;

use crate::revocations::Confirmations;

/// What a connection's push writer is told to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushEvent {
    /// The user's inbox reached this version.
    Notify(u64),
    /// The session is over; write a Kick and close the connection.
    Kick(Reason, String),
}

/// A connection bound to a session.
struct Binding {
    conn: u64,
    session: u64,
    push: mpsc::Sender<PushEvent>,
}

/// Every bound connection of this node, by user, and the sessions recently
/// confirmed not revoked.
#[derive(Default)]
pub struct Sessions {
    by_user: Mutex<HashMap<UserId, Vec<Binding>>>,
    confirmations: Confirmations,
}

impl Sessions {
    /// Binds connection `conn` to `session` of `user` (replacing an earlier
    /// binding of the same connection).
    pub fn bind(&self, user: UserId, conn: u64, session: u64, push: mpsc::Sender<PushEvent>) {
        let mut by_user = self.lock();
        let bindings = by_user.entry(user).or_default();
        bindings.retain(|b| b.conn != conn);
        bindings.push(Binding {
            conn,
            session,
            push,
        });
    }

    /// Forgets connection `conn` of `user` (it closed).
    pub fn unbind(&self, user: UserId, conn: u64) {
        let mut by_user = self.lock();
        if let Some(bindings) = by_user.get_mut(&user) {
            bindings.retain(|b| b.conn != conn);
            if bindings.is_empty() {
                by_user.remove(&user);
            }
        }
    }

    /// Tells every connection of `user` that the inbox reached `version`.
    pub fn inbox_advanced(&self, user: UserId, version: u64) {
        let by_user = self.lock();
        for binding in by_user.get(&user).into_iter().flatten() {
            // Full: the client is slow and will sync anyway.
            let _ = binding.push.try_send(PushEvent::Notify(version));
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
        let mut by_user = self.lock();
        if let Some(bindings) = by_user.get_mut(&user) {
            bindings.retain(|b| {
                if b.session != session {
                    return true;
                }
                kick(b, reason);
                false
            });
            if bindings.is_empty() {
                by_user.remove(&user);
            }
        }
    }

    /// Kicks every bound connection (the node is stopping).
    pub fn end_all(&self, reason: Reason) {
        let mut by_user = self.lock();
        for binding in by_user.values().flatten() {
            kick(binding, reason);
        }
        by_user.clear();
    }

    /// How many connections are bound.
    pub fn bound(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<Binding>>> {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn kick(binding: &Binding, reason: Reason) {
    let message = match reason {
        Reason::TokenRevoked => "the session was logged out",
        Reason::SessionReplaced => "a newer login of the same device replaced this session",
        Reason::ShuttingDown => "the node is shutting down",
        Reason::TokenExpired => "the session's token expired",
        Reason::Unspecified => "the session ended",
    };
    let event = PushEvent::Kick(reason, message.into());
    if binding.push.try_send(event.clone()).is_err() {
        // The writer is behind: a blocking send from a task keeps the Kick.
        let push = binding.push.clone();
        tokio::spawn(async move {
            let _ = push.send(event).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notifies_reach_every_connection_of_the_user_and_kicks_only_the_session() {
        let sessions = Sessions::default();
        let (tx1, mut rx1) = mpsc::channel(8);
        let (tx2, mut rx2) = mpsc::channel(8);
        let (tx3, mut rx3) = mpsc::channel(8);
        sessions.bind(7, 1, 100, tx1);
        sessions.bind(7, 2, 200, tx2);
        sessions.bind(8, 3, 300, tx3);
        sessions.inbox_advanced(7, 5);
        assert_eq!(rx1.recv().await, Some(PushEvent::Notify(5)));
        assert_eq!(rx2.recv().await, Some(PushEvent::Notify(5)));
        assert!(rx3.try_recv().is_err(), "another user hears nothing");

        sessions.session_ended(7, 100, Reason::TokenRevoked);
        assert!(matches!(
            rx1.recv().await,
            Some(PushEvent::Kick(Reason::TokenRevoked, _))
        ));
        assert!(rx2.try_recv().is_err(), "the other session stays");
        assert_eq!(sessions.bound(), 2);

        sessions.unbind(7, 2);
        sessions.unbind(8, 3);
        assert_eq!(sessions.bound(), 0);
    }
}
