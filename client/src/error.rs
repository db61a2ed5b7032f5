//! The one error type of the SDK, and how a wire `Error` becomes one.

use std::time::Duration;

use fishchat_proto::client::{Error as WireError, ErrorCode};

/// Why a call failed.
///
/// Only [`ClientError::Server`] comes from the server's answer; every other
/// variant is the client's own finding about the transport or its settings.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an `Error`. `retryable` is the server's flag:
    /// sending the same request again unchanged may succeed.
    #[error("{}: {message}", code.as_str_name())]
    Server {
        /// What went wrong. A code this client does not know (from a newer
        /// server) is [`ErrorCode::Unspecified`]; act on `retryable` then.
        code: ErrorCode,
        /// English detail from the server, for logs.
        message: String,
        /// Whether the same request may succeed if sent again.
        retryable: bool,
        /// With `retryable`: the least wait before a retry, in ms (0: none).
        retry_after_ms: u64,
    },
    /// No server of the list could be reached (handshake failed or timed out).
    #[error("no server reachable: {0}")]
    Connect(String),
    /// The connection or the request's stream was lost before the answer:
    /// the outcome is unknown.
    #[error("connection lost: {0}")]
    Transport(String),
    /// No answer within the request timeout: the outcome is unknown.
    #[error("no answer within the request timeout")]
    Timeout,
    /// The server answered something this protocol does not allow (an
    /// undecodable frame, an answer to another operation).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The TLS settings could not be built (bad CA certificate, provider).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The client configuration is unusable (no server, unreadable CA file,
    /// bad address, no session for an operation that needs one).
    #[error("bad client configuration: {0}")]
    Config(String),
    /// The application closed this client ([`crate::Client::close`]): it
    /// sends nothing more and does not reconnect.
    #[error("the client was closed")]
    Closed,
}

impl ClientError {
    /// The error a wire `Error` stands for.
    pub fn from_wire(error: WireError) -> Self {
        ClientError::Server {
            code: ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified),
            message: error.message,
            retryable: error.retryable,
            retry_after_ms: error.retry_after_ms,
        }
    }

    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the same request may succeed if sent again: the server's flag
    /// for a server error; true for a lost connection, a timeout or an
    /// unreachable cluster (the outcome is unknown or nothing happened);
    /// false for protocol and configuration errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server { retryable, .. } => *retryable,
            ClientError::Connect(_) | ClientError::Transport(_) | ClientError::Timeout => true,
            ClientError::Protocol(_)
            | ClientError::Tls(_)
            | ClientError::Config(_)
            | ClientError::Closed => false,
        }
    }

    /// The server's advice on how long to wait before retrying, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Server { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Some(Duration::from_millis(*retry_after_ms))
            }
            _ => None,
        }
    }

    /// The error without its kind: the server's message, or the client's
    /// description of what failed.
    pub fn detail(&self) -> String {
        match self {
            ClientError::Server { message, .. } => message.clone(),
            ClientError::Connect(s)
            | ClientError::Transport(s)
            | ClientError::Protocol(s)
            | ClientError::Tls(s)
            | ClientError::Config(s) => s.clone(),
            ClientError::Timeout => "no answer within the request timeout".to_string(),
            ClientError::Closed => "the client was closed".to_string(),
        }
    }

    /// A short name for the error, for scripts and logs: the server's code
    /// (`UNKNOWN_USER`) or the kind of client-side failure (`CONNECT`).
    pub fn code_name(&self) -> &'static str {
        match self {
            ClientError::Server { code, .. } => code.as_str_name(),
            ClientError::Connect(_) => "CONNECT",
            ClientError::Transport(_) => "TRANSPORT",
            ClientError::Timeout => "CLIENT_TIMEOUT",
            ClientError::Protocol(_) => "PROTOCOL",
            ClientError::Tls(_) => "TLS",
            ClientError::Config(_) => "CONFIG",
            ClientError::Closed => "CLOSED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wire_error_keeps_code_flag_and_advice() {
        let error = ClientError::from_wire(WireError {
            code: ErrorCode::TooManyRequests as i32,
            message: "slow down".into(),
            retryable: true,
            retry_after_ms: 250,
        });
        assert_eq!(error.code(), Some(ErrorCode::TooManyRequests));
        assert!(error.is_retryable());
        assert_eq!(error.retry_after(), Some(Duration::from_millis(250)));
        assert_eq!(error.code_name(), "TOO_MANY_REQUESTS");
    }

    #[test]
    fn an_unknown_code_is_unspecified_and_the_flag_still_counts() {
        let error = ClientError::from_wire(WireError {
            code: 999,
            message: "from the future".into(),
            retryable: true,
            retry_after_ms: 0,
        });
        assert_eq!(error.code(), Some(ErrorCode::Unspecified));
        assert!(error.is_retryable());
        assert_eq!(error.retry_after(), None);
    }

    #[test]
    fn the_group_codes_are_known_by_name_and_not_retryable() {
        for (wire, code, name) in [
            (18, ErrorCode::UnknownGroup, "UNKNOWN_GROUP"),
            (19, ErrorCode::GroupDissolved, "GROUP_DISSOLVED"),
            (20, ErrorCode::GroupFull, "GROUP_FULL"),
        ] {
            let error = ClientError::from_wire(WireError {
                code: wire,
                message: "group trouble".into(),
                retryable: false,
                retry_after_ms: 0,
            });
            assert_eq!(error.code(), Some(code));
            assert_eq!(error.code_name(), name);
            assert!(!error.is_retryable());
        }
    }

    #[test]
    fn transport_failures_are_retryable_and_protocol_ones_are_not() {
        assert!(ClientError::Timeout.is_retryable());
        assert!(ClientError::Transport("reset".into()).is_retryable());
        assert!(!ClientError::Protocol("nonsense".into()).is_retryable());
        assert!(!ClientError::Config("no server".into()).is_retryable());
    }
}
