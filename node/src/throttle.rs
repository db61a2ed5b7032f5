//! Failed logins, throttled per username on this node.
//!
//! The fifth wrong password in a row for one username closes the name to
//! logins on this node for a second; each one after that closes it for
//! twice as long as the one before (2 s after the sixth, 4 s after the
//! seventh), up to a minute. While
//! a name is closed every Login for it, right password or wrong, is refused
//! with `TOO_MANY_REQUESTS` and the time left as `retry_after_ms`, before
//! the account is read or a password hashed. A successful login forgets the
//! name's failures; so do fifteen minutes without one.
//!
//! Names are counted whether or not an account has them, so the refusals
//! say nothing about which names exist. The count is this node's own and
//! lives in memory: a guesser spread over the three nodes gets three times
//! the tries, and a restart forgets. Counting in Raft would make every
//! wrong guess a replicated write. docs/decisions.md, "Failed logins are
//! throttled per username", says why.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The wrong password in a row that first closes a name (for a second).
pub const FAILURES_TO_CLOSE: u32 = 5;
/// The longest a name stays closed after one failure.
pub const LONGEST_CLOSE: Duration = Duration::from_secs(60);
/// A name with no failure for this long starts again from nothing.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most names counted at once; past it, names that are not closed are
/// forgotten first (a guesser trying many names gains no memory here).
pub const MOST_NAMES: usize = 100_000;

/// One name's failures in a row.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    closed_until: Instant,
}

/// The failed logins this node has seen, by username (case-insensitive, as
/// usernames are).
#[derive(Debug, Default)]
pub struct LoginThrottle {
    names: Mutex<HashMap<String, Failures>>,
}

impl LoginThrottle {
    /// `Err(wait)` while `username` is closed to logins at `now`.
    pub fn check(&self, username: &str, now: Instant) -> Result<(), Duration> {
        let names = self.lock();
        match names.get(&key(username)) {
            Some(f) if f.closed_until > now => Err(f.closed_until - now),
            _ => Ok(()),
        }
    }

    /// Counts a wrong password (or an unknown name) for `username` at `now`;
    /// closes the name from the [`FAILURES_TO_CLOSE`]th on. Returns how long the
    /// name is now closed (zero: still open).
    pub fn failed(&self, username: &str, now: Instant) -> Duration {
        let mut names = self.lock();
        let key = key(username);
        if !names.contains_key(&key) && names.len() >= MOST_NAMES {
            names.retain(|_, f| f.closed_until > now || now - f.last < FORGET_AFTER);
            if names.len() >= MOST_NAMES {
                names.retain(|_, f| f.closed_until > now);
            }
            if names.len() >= MOST_NAMES {
                return Duration::ZERO;
            }
        }
        let failures = names.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            closed_until: now,
        });
        if now - failures.last >= FORGET_AFTER {
            failures.count = 0;
        }
        failures.count = failures.count.saturating_add(1);
        failures.last = now;
        let close = close_after(failures.count);
        failures.closed_until = now + close;
        close
    }

    /// Forgets `username`'s failures: its password was right.
    pub fn succeeded(&self, username: &str) {
        self.lock().remove(&key(username));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
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

    fn failed_times(throttle: &LoginThrottle, name: &str, times: u32, now: Instant) {
        for _ in 0..times {
            let _closed = throttle.failed(name, now);
        }
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
        failed_times(&throttle, "alice", 4, t0);
        assert_eq!(throttle.check("alice", t0), Ok(()));
        assert_eq!(throttle.failed("alice", t0), Duration::from_secs(1));
        assert_eq!(throttle.check("alice", t0), Err(Duration::from_secs(1)));
        assert_eq!(
            throttle.check("ALICE", t0 + Duration::from_millis(400)),
            Err(Duration::from_millis(600)),
            "names are counted without regard to case"
        );
        assert_eq!(throttle.check("bob", t0), Ok(()), "other names stay open");
        assert_eq!(throttle.check("alice", t0 + Duration::from_secs(1)), Ok(()));
        let _closed = throttle.failed("alice", t0 + Duration::from_secs(1));
        assert_eq!(
            throttle.check("alice", t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_success_or_a_quiet_quarter_hour_forgets_the_failures() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        failed_times(&throttle, "alice", 5, t0);
        throttle.succeeded("Alice");
        assert_eq!(throttle.check("alice", t0), Ok(()));
        assert_eq!(
            throttle.failed("alice", t0),
            Duration::ZERO,
            "counting starts over"
        );

        failed_times(&throttle, "bob", 5, t0);
        let later = t0 + FORGET_AFTER;
        assert_eq!(
            throttle.failed("bob", later),
            Duration::ZERO,
            "an old run is forgotten"
        );
    }

    #[test]
    fn at_capacity_open_names_are_forgotten_and_closed_ones_kept() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        failed_times(&throttle, "closed", FAILURES_TO_CLOSE, t0);
        for i in 1..MOST_NAMES {
            let _open = throttle.failed(&format!("user{i}"), t0);
        }
        assert_eq!(throttle.lock().len(), MOST_NAMES);
        let t1 = t0 + Duration::from_millis(500);
        let _open = throttle.failed("newcomer", t1);
        let names = throttle.lock();
        assert_eq!(names.len(), 2, "only the closed name and the newcomer stay");
        assert!(names.contains_key("closed") && names.contains_key("newcomer"));
    }
}
