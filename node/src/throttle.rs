//! Failed logins, throttled per username on this node.
//!
//! The fifth wrong password in a row for one username closes the name to
//! logins on this node for a second; each one after that closes it for
//! twice as long as the one before (2 s after the sixth, 4 s after the
//! seventh), up to a minute. While a name is closed every Login for it,
//! right password or wrong, is refused with `TOO_MANY_REQUESTS` and the
//! time left as `retry_after_ms`, before the account is read or a password
//! hashed. A successful login forgets the name's failures; so do fifteen
//! minutes without one.
//!
//! Guesses sent at the same moment do not slip through: a password check is
//! an [`Attempt`] taken under the same lock as the count, and a name may
//! have only as many checks under way as it may still fail before it
//! closes (at least one). Names are counted whether or not an account has
//! them, so the refusals say nothing about which names exist. The count is
//! this node's own and lives in memory: a guesser spread over the three
//! nodes gets three times the tries, and a restart forgets. Counting in
//! Raft would make every wrong guess a replicated write. docs/decisions.md,
//! "Failed logins are throttled per username", says why.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The wrong password in a row that first closes a name (for a second).
pub const FAILURES_TO_CLOSE: u32 = 5;
/// The longest a name stays closed after one failure.
pub const LONGEST_CLOSE: Duration = Duration::from_secs(60);
/// A name with no failure for this long starts again from nothing.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most names counted at once; past it, the tenth of them with the oldest
/// failures is forgotten to make room.
pub const MOST_NAMES: usize = 100_000;
/// What a login is advised to wait when its name has as many password
/// checks under way as it may have (one check takes tens of milliseconds).
pub const BUSY_WAIT: Duration = Duration::from_millis(100);

/// One name's failures in a row, and its password checks under way.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    checking: u32,
    last: Instant,
    closed_until: Instant,
}

impl Failures {
    /// How much longer the name is closed at `now`, if it is.
    fn closed_for(&self, now: Instant) -> Option<Duration> {
        (self.closed_until > now).then(|| self.closed_until - now)
    }
}

/// The failed logins this node has seen, by username (case-insensitive, as
/// usernames are).
#[derive(Debug, Default)]
pub struct LoginThrottle {
    names: Mutex<HashMap<String, Failures>>,
}

/// One password check under way for a name. Report how it went with
/// [`Attempt::failed`] or [`Attempt::succeeded`]; dropped without either
/// (the login failed for another reason), it counts nothing.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    key: String,
    open: bool,
}

impl LoginThrottle {
    /// `Err(wait)` while `username` is closed to logins at `now`.
    pub fn check(&self, username: &str, now: Instant) -> Result<(), Duration> {
        match self
            .lock()
            .get(&key(username))
            .and_then(|f| f.closed_for(now))
        {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Starts a password check for `username` at `now`; `Err(wait)` while
    /// the name is closed, or while it has as many checks under way as it
    /// may still fail before it closes.
    pub fn attempt(&self, username: &str, now: Instant) -> Result<Attempt<'_>, Duration> {
        let key = key(username);
        let mut names = self.lock();
        let failures = entry(&mut names, &key, now);
        if let Some(wait) = failures.closed_for(now) {
            return Err(wait);
        }
        let allowed = FAILURES_TO_CLOSE.saturating_sub(failures.count).max(1);
        if failures.checking >= allowed {
            return Err(BUSY_WAIT);
        }
        failures.checking += 1;
        Ok(Attempt {
            throttle: self,
            key,
            open: true,
        })
    }

    /// Counts a failure for `username` at `now` that needed no password
    /// check (no account has the name). Returns how long the name is now
    /// closed (zero: still open).
    pub fn failed(&self, username: &str, now: Instant) -> Duration {
        let key = key(username);
        let mut names = self.lock();
        count_failure(entry(&mut names, &key, now), now)
    }

    fn finish(&self, key: &str, outcome: impl FnOnce(&mut Failures)) {
        let mut names = self.lock();
        let Some(failures) = names.get_mut(key) else {
            return;
        };
        failures.checking = failures.checking.saturating_sub(1);
        outcome(failures);
        if failures.count == 0 && failures.checking == 0 {
            names.remove(key);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Failures>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Attempt<'_> {
    /// The password was wrong. Returns how long the name is now closed
    /// (zero: still open).
    pub fn failed(mut self, now: Instant) -> Duration {
        self.open = false;
        let mut closed = Duration::ZERO;
        self.throttle
            .finish(&self.key, |f| closed = count_failure(f, now));
        closed
    }

    /// The password was right: the name's failures are forgotten.
    pub fn succeeded(mut self) {
        self.open = false;
        self.throttle.finish(&self.key, |f| f.count = 0);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.open {
            self.throttle.finish(&self.key, |_| {});
        }
    }
}

/// The name's entry, made (room first) if it has none; a run of failures
/// older than [`FORGET_AFTER`] is forgotten.
fn entry<'m>(
    names: &'m mut HashMap<String, Failures>,
    key: &str,
    now: Instant,
) -> &'m mut Failures {
    if !names.contains_key(key) && names.len() >= MOST_NAMES {
        make_room(names);
    }
    let failures = names.entry(key.to_string()).or_insert(Failures {
        count: 0,
        checking: 0,
        last: now,
        closed_until: now,
    });
    if now.saturating_duration_since(failures.last) >= FORGET_AFTER {
        failures.count = 0;
    }
    failures
}

/// Forgets the tenth of the names with the oldest last failure (none with a
/// check under way), so the next tenth of new names need no scan.
fn make_room(names: &mut HashMap<String, Failures>) {
    let mut lasts: Vec<Instant> = names
        .values()
        .filter(|f| f.checking == 0)
        .map(|f| f.last)
        .collect();
    let evict = (lasts.len() / 10).max(1);
    if lasts.len() < evict {
        return;
    }
    let (_, &mut cutoff, _) = lasts.select_nth_unstable(evict - 1);
    let mut left = evict;
    names.retain(|_, f| {
        let goes = left > 0 && f.checking == 0 && f.last <= cutoff;
        if goes {
            left -= 1;
        }
        !goes
    });
}

fn count_failure(failures: &mut Failures, now: Instant) -> Duration {
    failures.count = failures.count.saturating_add(1);
    failures.last = now;
    let close = close_after(failures.count);
    failures.closed_until = now + close;
    close
}

/// How long a name stays closed after its `count`-th failure in a row.
fn close_after(count: u32) -> Duration {
    match count.checked_sub(FAILURES_TO_CLOSE) {
        None => Duration::ZERO,
        Some(past) => Duration::from_secs(1u64 << past.min(16)).min(LONGEST_CLOSE),
    }
}

fn key(username: &str) -> String {
    username.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guess_wrong(throttle: &LoginThrottle, name: &str, times: u32, now: Instant) -> Duration {
        let mut closed = Duration::ZERO;
        for _ in 0..times {
            closed = throttle.attempt(name, now).expect("open").failed(now);
        }
        closed
    }

    #[test]
    fn the_fifth_failure_closes_for_a_second_and_each_after_doubles_it_up_to_a_minute() {
        let closes: Vec<u64> = (1..=13).map(|n| close_after(n).as_secs()).collect();
        assert_eq!(closes, [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(close_after(u32::MAX), LONGEST_CLOSE);
    }

    #[test]
    fn a_name_closes_after_its_fifth_failure_and_opens_when_the_time_is_up() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        assert_eq!(guess_wrong(&throttle, "alice", 4, t0), Duration::ZERO);
        assert_eq!(throttle.check("alice", t0), Ok(()));
        assert_eq!(
            guess_wrong(&throttle, "alice", 1, t0),
            Duration::from_secs(1)
        );
        assert_eq!(throttle.check("alice", t0), Err(Duration::from_secs(1)));
        assert_eq!(
            throttle
                .attempt("ALICE", t0 + Duration::from_millis(400))
                .map(|_| ()),
            Err(Duration::from_millis(600)),
            "names are counted without regard to case"
        );
        assert_eq!(throttle.check("bob", t0), Ok(()), "other names stay open");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            guess_wrong(&throttle, "alice", 1, t1),
            Duration::from_secs(2)
        );
        assert_eq!(
            throttle.failed("alice", t1 + Duration::from_secs(2)),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn guesses_at_the_same_moment_get_only_the_checks_left_before_the_close() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        guess_wrong(&throttle, "alice", 3, t0);
        // Two failures are left before the name closes: two checks at once.
        let first = throttle.attempt("alice", t0).expect("first");
        let second = throttle.attempt("alice", t0).expect("second");
        assert_eq!(throttle.attempt("alice", t0).map(|_| ()), Err(BUSY_WAIT));
        first.failed(t0);
        assert_eq!(second.failed(t0), Duration::from_secs(1));
        assert!(throttle.attempt("alice", t0).is_err(), "closed now");
        // A closed name reopens for one check at a time.
        let t1 = t0 + Duration::from_secs(1);
        let one = throttle.attempt("alice", t1).expect("reopened");
        assert_eq!(throttle.attempt("alice", t1).map(|_| ()), Err(BUSY_WAIT));
        drop(one);
        assert!(
            throttle.attempt("alice", t1).is_ok(),
            "an abandoned check counts nothing"
        );
    }

    #[test]
    fn a_success_or_a_quiet_quarter_hour_forgets_the_failures() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        guess_wrong(&throttle, "alice", 4, t0);
        throttle.attempt("Alice", t0).expect("open").succeeded();
        assert!(
            throttle.lock().is_empty(),
            "nothing is kept for a name without failures"
        );
        assert_eq!(
            guess_wrong(&throttle, "alice", 4, t0),
            Duration::ZERO,
            "counting starts over"
        );

        guess_wrong(&throttle, "bob", 5, t0);
        let later = t0 + FORGET_AFTER;
        assert_eq!(
            throttle.failed("bob", later),
            Duration::ZERO,
            "an old run is forgotten"
        );
    }

    #[test]
    fn a_full_table_forgets_its_oldest_tenth_and_still_counts_new_names() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        for i in 0..MOST_NAMES {
            let at = t0 + Duration::from_millis(i as u64);
            guess_wrong(&throttle, &format!("user{i}"), FAILURES_TO_CLOSE, at);
        }
        assert_eq!(throttle.lock().len(), MOST_NAMES);
        let now = t0 + Duration::from_millis(MOST_NAMES as u64);
        assert_eq!(
            guess_wrong(&throttle, "target", FAILURES_TO_CLOSE, now),
            Duration::from_secs(1),
            "a new name is counted even when every other name is closed"
        );
        let names = throttle.lock();
        assert_eq!(names.len(), MOST_NAMES - MOST_NAMES / 10 + 1);
        assert!(!names.contains_key("user0") && names.contains_key("user99999"));
    }
}
