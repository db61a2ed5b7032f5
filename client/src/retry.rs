//! The retry policy, in one place: which failures are worth another try,
//! whether that try should go to another node, and how long to wait first.
//!
//! - A retryable server error (`Error.retryable`) is retried on the same
//!   connection after the back-off (or `retry_after_ms` if longer). A node
//!   that answers `UNAVAILABLE` or `TIMEOUT` twice in a row is left for the
//!   next one, since it may be cut off from the rest of the cluster.
//! - A lost connection, a reset stream, a request with no answer within the
//!   request timeout, or a slow answer during which the node stops answering
//!   pings (`Client::exchange_watched`: a killed node sends no close) fails
//!   over at once: the next attempt goes to the next node of the list, after
//!   the session is reopened there (resumed with its token, or a fresh login
//!   with the stored credentials when the token is refused).
//! - `TOKEN_EXPIRED` and `UNAUTHENTICATED` log in again with the stored
//!   credentials once, then repeat the request.
//! - Everything else is returned at once.
//!
//! The back-off starts at 100 ms and doubles up to 2 s. Retries stop at the
//! configured deadline (30 s by default); the last error is returned.

use std::time::Duration;

use fishchat_proto::client::ErrorCode;

use crate::error::ClientError;

/// The first back-off delay.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest back-off delay (a server's `retry_after_ms` may ask for more).
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Consecutive `UNAVAILABLE`/`TIMEOUT` answers from one node after which the
/// next attempt goes to another node.
pub const FAILOVER_AFTER_UNAVAILABLE: u32 = 2;

/// Exponential back-off: 100 ms, 200 ms, 400 ms, ... up to 2 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A back-off at its first step.
    pub fn new() -> Self {
        Self {
            next: BACKOFF_START,
        }
    }

    /// The wait before the next attempt: the current step, or the server's
    /// `retry_after` if that is longer. Advances the step.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        retry_after.map_or(step, |advice| advice.max(step))
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Return the error to the caller.
    GiveUp,
    /// Wait, then send the same request again; on another node if `failover`.
    Retry {
        /// Whether to connect to the next node (and log in) first.
        failover: bool,
    },
    /// Log in again with the stored credentials, then repeat the request.
    Relogin,
}

/// Decides what follows `error`. `unavailable_in_a_row` counts the
/// `UNAVAILABLE`/`TIMEOUT` answers the current node gave in a row, this one
/// included; `relogged` says whether this call logged in again already.
pub fn verdict(error: &ClientError, unavailable_in_a_row: u32, relogged: bool) -> Verdict {
    match error {
        ClientError::Server {
            retryable: true,
            code,
            ..
        } => Verdict::Retry {
            failover: matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout)
                && unavailable_in_a_row >= FAILOVER_AFTER_UNAVAILABLE,
        },
        ClientError::Server {
            code: ErrorCode::TokenExpired | ErrorCode::Unauthenticated,
            ..
        } if !relogged => Verdict::Relogin,
        ClientError::Server { .. } => Verdict::GiveUp,
        ClientError::Connect(_) | ClientError::Transport(_) | ClientError::Timeout => {
            Verdict::Retry { failover: true }
        }
        ClientError::Protocol(_)
        | ClientError::Tls(_)
        | ClientError::Config(_)
        | ClientError::Closed => Verdict::GiveUp,
    }
}

/// Whether `error` is an answer that counts toward leaving a node.
pub fn is_unavailable(error: &ClientError) -> bool {
    matches!(
        error.code(),
        Some(ErrorCode::Unavailable | ErrorCode::Timeout)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: ErrorCode, retryable: bool) -> ClientError {
        ClientError::Server {
            code,
            message: String::new(),
            retryable,
            retry_after_ms: 0,
        }
    }

    #[test]
    fn the_backoff_doubles_from_100_ms_up_to_2_s() {
        let mut backoff = Backoff::new();
        let delays: Vec<u128> = (0..7)
            .map(|_| backoff.next_delay(None).as_millis())
            .collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn a_longer_retry_after_is_honoured_and_a_shorter_one_is_not_a_shortcut() {
        let mut backoff = Backoff::new();
        assert_eq!(
            backoff.next_delay(Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            backoff.next_delay(Some(Duration::from_millis(50))),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn retryable_server_errors_retry_on_the_same_node_at_first() {
        let error = server(ErrorCode::Unavailable, true);
        assert_eq!(
            verdict(&error, 1, false),
            Verdict::Retry { failover: false }
        );
        assert_eq!(verdict(&error, 2, false), Verdict::Retry { failover: true });
        let busy = server(ErrorCode::TooManyRequests, true);
        assert_eq!(verdict(&busy, 5, false), Verdict::Retry { failover: false });
    }

    #[test]
    fn the_flag_counts_not_the_code() {
        assert_eq!(
            verdict(&server(ErrorCode::Unspecified, true), 1, false),
            Verdict::Retry { failover: false }
        );
        assert_eq!(
            verdict(&server(ErrorCode::Unavailable, false), 1, false),
            Verdict::GiveUp
        );
    }

    #[test]
    fn lost_connections_and_timeouts_fail_over() {
        assert_eq!(
            verdict(&ClientError::Transport("reset".into()), 0, false),
            Verdict::Retry { failover: true }
        );
        assert_eq!(
            verdict(&ClientError::Timeout, 0, false),
            Verdict::Retry { failover: true }
        );
    }

    #[test]
    fn an_expired_token_logs_in_again_once() {
        let expired = server(ErrorCode::TokenExpired, false);
        assert_eq!(verdict(&expired, 0, false), Verdict::Relogin);
        assert_eq!(verdict(&expired, 0, true), Verdict::GiveUp);
        assert_eq!(
            verdict(&server(ErrorCode::TokenRevoked, false), 0, false),
            Verdict::GiveUp
        );
    }

    #[test]
    fn non_retryable_errors_are_returned_at_once() {
        for code in [
            ErrorCode::UnknownUser,
            ErrorCode::WrongPassword,
            ErrorCode::BadRequest,
            ErrorCode::Internal,
            ErrorCode::UnknownGroup,
            ErrorCode::GroupDissolved,
            ErrorCode::GroupFull,
        ] {
            assert_eq!(verdict(&server(code, false), 0, false), Verdict::GiveUp);
        }
        assert_eq!(
            verdict(&ClientError::Protocol("x".into()), 0, false),
            Verdict::GiveUp
        );
    }
}
