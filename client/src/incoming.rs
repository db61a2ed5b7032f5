//! [`Client::incoming`]: every new inbox entry, exactly once and in version
//! order, across notifies, lost notifies and failovers.
//!
//! The background task delivers entries `held+1, held+2, ...` in order,
//! where `held` is the highest version it delivered, skipping what it
//! already delivered. A `Notify` above `held` often carries the entries
//! themselves (docs/protocol.md, "The push stream"): when they follow
//! `held` without a hole, the task delivers them as they are; otherwise
//! the Notify is only a hint. The task syncs from `held`
//!
//! - at start,
//! - on a `Notify` above `held` whose entries do not reach it,
//! - every `sync_interval` (5 s by default) in case a notify was lost,
//! - after every reconnect (the client's connection generation changed).
//!
//! The push stream of each connection is read by a small task of its own
//! (a frame read is not cancel-safe), which forwards what it reads.

use std::sync::Arc;

use fishchat_proto::client::{kick, push, InboxEntry, Kick, Push};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::connection::Connection;
use crate::error::ClientError;

/// Entries buffered for a slow receiver before the task waits for it.
const DELIVERY_BUFFER: usize = 256;
/// Push events buffered between a push reader and the task.
const EVENT_BUFFER: usize = 16;
/// Resyncs of one round that found a hole before the round gives up.
const HOLE_RETRIES: u32 = 3;

impl Client {
    /// Delivers every inbox entry with a version above `since`, exactly once
    /// and in version order, as it arrives. A background task listens to the
    /// push stream, syncs on notifies, on a timer (`sync_interval`) and after
    /// reconnects, and fails over when the connection is lost.
    ///
    /// The task ends when the receiver is dropped, or when the session ends
    /// for good (logged out, replaced by another device, token refused);
    /// [`Client::kick`] then tells why, if the server said.
    pub fn incoming(&self, since: u64) -> mpsc::Receiver<InboxEntry> {
        let (deliver, receiver) = mpsc::channel(DELIVERY_BUFFER);
        tokio::spawn(run(self.clone(), since, deliver));
        receiver
    }
}

/// What a push reader saw.
enum PushEvent {
    Notify {
        latest_version: u64,
        entries: Vec<InboxEntry>,
    },
    Kick(Kick),
    /// The push stream or its connection ended without a kick.
    Lost,
}

/// Why a delivery round stopped.
enum RoundEnd {
    /// The receiver was dropped: stop the task.
    ReceiverGone,
    /// Syncing failed; the error says whether it is worth trying again.
    Failed(ClientError),
}

async fn run(client: Client, since: u64, deliver: mpsc::Sender<InboxEntry>) {
    let mut held = since;
    let (event_tx, mut events) = mpsc::channel::<(u64, PushEvent)>(EVENT_BUFFER);
    let mut watched: Option<u64> = None;
    let mut reader: Option<JoinHandle<()>> = None;
    let mut need_sync = true;
    let interval = client.config().sync_interval;
    loop {
        if client.is_closed() {
            break;
        }
        let (connection, generation) = client.current();
        if watched != Some(generation) {
            if let Some(old) = reader.take() {
                old.abort();
            }
            reader = Some(tokio::spawn(read_pushes(
                connection,
                generation,
                event_tx.clone(),
            )));
            watched = Some(generation);
            need_sync = true;
        }
        if need_sync {
            match deliver_new(&client, &mut held, &deliver).await {
                Ok(()) => need_sync = false,
                Err(RoundEnd::ReceiverGone) => break,
                Err(RoundEnd::Failed(ClientError::Closed)) => break,
                Err(RoundEnd::Failed(e)) if session_is_over(&e) => {
                    tracing::warn!(error = %e, "incoming: the session is over");
                    break;
                }
                Err(RoundEnd::Failed(e)) => {
                    tracing::warn!(error = %e, "incoming: sync failed; trying again later");
                }
            }
            if client.current().1 != generation {
                // The sync failed over: watch the new connection's pushes.
                continue;
            }
        }
        tokio::select! {
            _ = deliver.closed() => break,
            _ = tokio::time::sleep(interval) => need_sync = true,
            event = events.recv() => {
                let Some((event_generation, event)) = event else { break };
                if Some(event_generation) != watched {
                    continue;
                }
                match event {
                    PushEvent::Notify { latest_version, entries } => {
                        if latest_version > held {
                            // A hole means the entries do not reach `held`:
                            // the Notify is then only a hint.
                            if deliver_following(&mut held, entries, &deliver).await.is_err() {
                                break;
                            }
                            need_sync |= latest_version > held;
                        }
                    }
                    PushEvent::Kick(kick) => {
                        if !on_kick(&client, kick, event_generation).await {
                            break;
                        }
                        need_sync = true;
                    }
                    PushEvent::Lost => {
                        if client.is_closed() {
                            break;
                        }
                        if let Err(e) = client.failover(event_generation).await {
                            tracing::warn!(error = %e, "incoming: failover failed");
                        }
                        need_sync = true;
                    }
                }
            }
        }
    }
    if let Some(reader) = reader {
        reader.abort();
    }
}

/// Acts on a kick; false when the session is over for good.
async fn on_kick(client: &Client, kick: Kick, generation: u64) -> bool {
    let reason = kick::Reason::try_from(kick.reason).unwrap_or(kick::Reason::Unspecified);
    tracing::info!(?reason, message = %kick.message, "kicked");
    match reason {
        kick::Reason::TokenRevoked | kick::Reason::SessionReplaced => {
            client.record_kick(kick, false);
            false
        }
        kick::Reason::TokenExpired => {
            client.record_kick(kick, true);
            // The connection closes after a kick; a new one logs in afresh.
            if let Err(e) = client.failover(generation).await {
                tracing::warn!(error = %e, "incoming: logging in again failed");
            }
            true
        }
        kick::Reason::ShuttingDown | kick::Reason::Unspecified => {
            client.record_kick(kick, true);
            if let Err(e) = client.failover(generation).await {
                tracing::warn!(error = %e, "incoming: failover failed");
            }
            true
        }
    }
}

/// Whether `error` means the session cannot go on without the user.
fn session_is_over(error: &ClientError) -> bool {
    use fishchat_proto::client::ErrorCode;
    matches!(error, ClientError::Config(_))
        || matches!(
            error.code(),
            Some(
                ErrorCode::Unauthenticated
                    | ErrorCode::TokenExpired
                    | ErrorCode::TokenRevoked
                    | ErrorCode::PermissionDenied
            )
        )
}

/// Delivers, in order, the `entries` (in increasing versions) that follow
/// `held` without a hole, advancing `held` past each; skips those already
/// delivered. Returns whether it stopped at a hole.
async fn deliver_following(
    held: &mut u64,
    entries: Vec<InboxEntry>,
    deliver: &mpsc::Sender<InboxEntry>,
) -> Result<bool, RoundEnd> {
    for entry in entries {
        if entry.version <= *held {
            continue;
        }
        if Some(entry.version) != held.checked_add(1) {
            return Ok(true);
        }
        let version = entry.version;
        deliver
            .send(entry)
            .await
            .map_err(|_| RoundEnd::ReceiverGone)?;
        *held = version;
    }
    Ok(false)
}

/// Syncs from `held` until nothing is left, delivering each entry once, in
/// order, and advancing `held` past each delivered entry.
async fn deliver_new(
    client: &Client,
    held: &mut u64,
    deliver: &mpsc::Sender<InboxEntry>,
) -> Result<(), RoundEnd> {
    let mut holes = 0;
    loop {
        let page = client.sync(*held, 0).await.map_err(RoundEnd::Failed)?;
        if page.latest_version < *held {
            tracing::warn!(
                held = *held,
                latest = page.latest_version,
                "incoming: the inbox is behind this client's version; waiting for it"
            );
            return Ok(());
        }
        let before = *held;
        if deliver_following(held, page.entries, deliver).await? {
            tracing::warn!(held = *held, "incoming: hole in a page");
            holes += 1;
            if holes >= HOLE_RETRIES {
                return Err(RoundEnd::Failed(ClientError::Protocol(format!(
                    "sync pages after {held} keep skipping versions"
                ))));
            }
            continue;
        }
        if !page.more {
            return Ok(());
        }
        if *held == before {
            return Err(RoundEnd::Failed(ClientError::Protocol(
                "a sync page with nothing new said there were more".to_string(),
            )));
        }
    }
}

/// Reads the push stream of `connection` and forwards what it reads, tagged
/// with the connection's generation.
async fn read_pushes(
    connection: Arc<Connection>,
    generation: u64,
    events: mpsc::Sender<(u64, PushEvent)>,
) {
    let event = match connection.accept_push_stream().await {
        Err(_) => lost_or_kicked(&connection),
        Ok(mut stream) => loop {
            match stream.next().await {
                Ok(Some(Push {
                    body: Some(push::Body::Notify(notify)),
                })) => {
                    let event = PushEvent::Notify {
                        latest_version: notify.latest_version,
                        entries: notify.entries,
                    };
                    if events.send((generation, event)).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Push {
                    body: Some(push::Body::Kick(kick)),
                })) => break PushEvent::Kick(kick),
                // A push kind from a newer server: nothing to do.
                Ok(Some(Push { body: None })) => {}
                Ok(None) | Err(_) => {
                    // Give the close (which carries a kick's reason) a moment.
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        connection.closed(),
                    )
                    .await;
                    break lost_or_kicked(&connection);
                }
            }
        },
    };
    let _ = events.send((generation, event)).await;
}

/// A kick recovered from the connection's close code (the kick frame may be
/// lost; the code still carries the reason), or `Lost`.
fn lost_or_kicked(connection: &Connection) -> PushEvent {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            match kick_reason_of_close_code(close.error_code.into_inner()) {
                Some(reason) => PushEvent::Kick(Kick {
                    reason: reason as i32,
                    message: String::from_utf8_lossy(&close.reason).into_owned(),
                }),
                None => PushEvent::Lost,
            }
        }
        _ => PushEvent::Lost,
    }
}

/// The kick reason a QUIC application close code stands for (0 and unknown
/// codes: none).
fn kick_reason_of_close_code(code: u64) -> Option<kick::Reason> {
    let code = i32::try_from(code).ok()?;
    match kick::Reason::try_from(code).ok()? {
        kick::Reason::Unspecified => None,
        reason => Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_carry_kick_reasons() {
        assert_eq!(kick_reason_of_close_code(0), None);
        assert_eq!(
            kick_reason_of_close_code(2),
            Some(kick::Reason::SessionReplaced)
        );
        assert_eq!(
            kick_reason_of_close_code(3),
            Some(kick::Reason::ShuttingDown)
        );
        assert_eq!(kick_reason_of_close_code(99), None);
        assert_eq!(kick_reason_of_close_code(u64::MAX), None);
    }

    #[test]
    fn token_errors_end_the_session_and_outages_do_not() {
        use fishchat_proto::client::ErrorCode;
        let error = |code| ClientError::Server {
            code,
            message: String::new(),
            retryable: false,
            retry_after_ms: 0,
        };
        assert!(session_is_over(&error(ErrorCode::TokenRevoked)));
        assert!(!session_is_over(&error(ErrorCode::Unavailable)));
        assert!(!session_is_over(&ClientError::Timeout));
    }
}
