//! Sessions recently confirmed not revoked, so a request need not read its
//! user's shard every time.
//!
//! The rule that keeps this safe: a node trusts a confirmation (a
//! linearizable read that found no revocation) for [`TRUST`] at most, and
//! forgets it when it hears the session ended. A Logout (or a device login
//! that replaces a session) answers only after every peer acknowledged the
//! end, or after [`TRUST`] has passed since the revocation committed; either
//! way no node can still trust a read made before the revocation. So once
//! Logout is answered, every node refuses the token, as the protocol says.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fishchat_shard::UserId;

/// How long a confirmation is trusted.
pub const TRUST: Duration = Duration::from_secs(1);
/// Above this many entries, expired ones are swept.
const SWEEP_ABOVE: usize = 4096;

type Key = (UserId, u64);

/// Confirmations and recent ends, by (user, session).
#[derive(Default)]
pub struct Confirmations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// When a read found the session not revoked (the read's start).
    confirmed: HashMap<Key, Instant>,
    /// When the session was heard to end; kept for [`TRUST`] so a read that
    /// started before the end cannot confirm it afterwards.
    ended: HashMap<Key, Instant>,
}

impl Confirmations {
    /// True when a read confirmed the session within [`TRUST`].
    pub fn is_confirmed(&self, user: UserId, session: u64) -> bool {
        let inner = self.lock();
        inner
            .confirmed
            .get(&(user, session))
            .is_some_and(|at| at.elapsed() < TRUST)
    }

    /// Records that a read started at `read_started` found the session not
    /// revoked, unless its end was heard since the read started.
    pub fn confirm(&self, user: UserId, session: u64, read_started: Instant) {
        let mut inner = self.lock();
        if inner
            .ended
            .get(&(user, session))
            .is_some_and(|ended| *ended >= read_started)
        {
            return;
        }
        if inner.confirmed.len() > SWEEP_ABOVE {
            inner.confirmed.retain(|_, at| at.elapsed() < TRUST);
        }
        inner.confirmed.insert((user, session), read_started);
    }

    /// The session ended: forget its confirmation.
    pub fn ended(&self, user: UserId, session: u64) {
        let mut inner = self.lock();
        inner.confirmed.remove(&(user, session));
        if inner.ended.len() > SWEEP_ABOVE {
            inner.ended.retain(|_, at| at.elapsed() < TRUST);
        }
        inner.ended.insert((user, session), Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmation_is_forgotten_when_the_session_ends() {
        let confirmations = Confirmations::default();
        assert!(!confirmations.is_confirmed(1, 10));
        confirmations.confirm(1, 10, Instant::now());
        assert!(confirmations.is_confirmed(1, 10));
        assert!(!confirmations.is_confirmed(1, 11), "per session");
        confirmations.ended(1, 10);
        assert!(!confirmations.is_confirmed(1, 10));
    }

    #[test]
    fn a_read_that_started_before_the_end_cannot_confirm_after_it() {
        let confirmations = Confirmations::default();
        let read_started = Instant::now();
        confirmations.ended(1, 10);
        confirmations.confirm(1, 10, read_started);
        assert!(!confirmations.is_confirmed(1, 10));
    }

    #[test]
    fn a_confirmation_expires() {
        let confirmations = Confirmations::default();
        let long_ago = Instant::now()
            .checked_sub(TRUST + Duration::from_millis(1))
            .expect("the clock is past TRUST");
        confirmations.confirm(1, 10, long_ago);
        assert!(!confirmations.is_confirmed(1, 10));
    }
}
