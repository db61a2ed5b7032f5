//! The client endpoint: QUIC with TLS 1.3, one request per bidirectional
//! stream, and a server-opened push stream per bound connection
//! (`proto/client.proto`, "TRANSPORT", "FRAMES", "PUSHES").

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fishchat_proto::client::{
    kick::Reason, push, request, response, ErrorCode, Kick, Notify, Push, Request, Response,
};
use fishchat_proto::frame::{self, FrameError};
use prost::Message as _;
use quinn::crypto::rustls::QuicServerConfig;
use tokio::task::JoinHandle;

use crate::chat::{now_ms, Binding, Chat, Refusal};
use crate::sessions::{kick_message, PushEvent, Pushes, Sessions};

/// A connection with no traffic for this long is closed (protocol default;
/// clients keep alive at a third of it).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kicked connection stays open at most so its last answers and
/// the Kick frame reach the client.
const KICK_GRACE: Duration = Duration::from_secs(2);
/// How long a kicked connection stays open at least, for answers still
/// being written (the Logout that caused the kick, say).
const KICK_FLOOR: Duration = Duration::from_millis(250);
/// Longest wait to write one push frame before the connection is closed.
const PUSH_WRITE: Duration = Duration::from_secs(10);

/// The running client endpoint.
pub struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    task: JoinHandle<()>,
}

impl ClientEndpoint {
    /// Listens on `addr` and serves clients with `chat`.
    pub fn start(
        addr: SocketAddr,
        crypto: Arc<rustls::ServerConfig>,
        chat: Arc<Chat>,
        sessions: Arc<Sessions>,
    ) -> anyhow::Result<Self> {
        let crypto =
            QuicServerConfig::try_from(crypto).context("TLS settings unusable for QUIC")?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(chat.limits().max_requests_in_flight.into());
        // Clients never open unidirectional streams.
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .context("idle timeout out of range")?,
        ));
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(config, addr)
            .with_context(|| format!("binding the client port {addr} (UDP)"))?;
        let task = tokio::spawn(accept(endpoint.clone(), chat, sessions));
        Ok(Self { endpoint, task })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Stops accepting, closes every connection and waits briefly for them.
    pub async fn shutdown(self) {
        self.endpoint.close(
            (Reason::ShuttingDown as u32).into(),
            b"the node is shutting down",
        );
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

async fn accept(endpoint: quinn::Endpoint, chat: Arc<Chat>, sessions: Arc<Sessions>) {
    let ids = AtomicU64::new(1);
    while let Some(incoming) = endpoint.accept().await {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let chat = chat.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => {
                    let max_push_bytes = chat.limits().max_frame_bytes as usize;
                    serve(Conn::new(id, connection, sessions, max_push_bytes), chat).await
                }
                Err(e) => tracing::debug!(error = %e, "client handshake failed"),
            }
        });
    }
}

/// One client connection.
struct Conn {
    id: u64,
    connection: quinn::Connection,
    sessions: Arc<Sessions>,
    state: Mutex<ConnState>,
    /// The bound session's expiry, read by the push writer.
    expires_ms: AtomicU64,
    /// Logins on one connection run one at a time, so two logins as
    /// different users cannot both succeed and race to bind.
    logins: tokio::sync::Mutex<()>,
    /// Largest push frame: a Notify whose entries would make it larger goes
    /// without them (the client syncs).
    max_push_bytes: usize,
}

#[derive(Default)]
struct ConnState {
    bound: Option<Binding>,
    /// Set once the push writer runs (at the first binding).
    pushes: Option<Arc<Pushes>>,
    /// The connection ended: nothing may bind it any more.
    closed: bool,
}

impl Conn {
    fn new(
        id: u64,
        connection: quinn::Connection,
        sessions: Arc<Sessions>,
        max_push_bytes: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            connection,
            sessions,
            state: Mutex::new(ConnState::default()),
            expires_ms: AtomicU64::new(u64::MAX),
            logins: tokio::sync::Mutex::new(()),
            max_push_bytes,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bound(&self) -> Option<Binding> {
        self.lock().bound
    }

    /// Binds the connection to a session after a Login; the first binding
    /// opens the push stream, whose first frame announces `latest`.
    fn bind(self: &Arc<Self>, binding: Binding, latest: u64) {
        let mut state = self.lock();
        if state.closed || state.bound.is_some_and(|b| b.user != binding.user) {
            return;
        }
        state.bound = Some(binding);
        self.expires_ms.store(binding.expires_ms, Ordering::Relaxed);
        let pushes = match &state.pushes {
            Some(pushes) => pushes.clone(),
            None => {
                let pushes = Arc::new(Pushes::default());
                tokio::spawn(write_pushes(self.clone(), pushes.clone(), latest));
                state.pushes = Some(pushes.clone());
                pushes
            }
        };
        self.sessions
            .bind(binding.user, self.id, binding.session, pushes, latest);
    }
}

async fn serve(conn: Arc<Conn>, chat: Arc<Chat>) {
    tracing::debug!(conn = conn.id, remote = %conn.connection.remote_address(), "client connected");
    loop {
        match conn.connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(answer(conn.clone(), chat.clone(), send, recv));
            }
            Err(e) => {
                tracing::debug!(conn = conn.id, reason = %e, "client connection ended");
                break;
            }
        }
    }
    let bound = {
        let mut state = conn.lock();
        // The push writer ends with the connection.
        state.closed = true;
        state.bound
    };
    if let Some(bound) = bound {
        conn.sessions.unbind(bound.user, conn.id);
    }
}

/// Reads one request from a stream and writes its answer.
async fn answer(
    conn: Arc<Conn>,
    chat: Arc<Chat>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let max = chat.limits().max_frame_bytes;
    let deadline = chat.limits().request_deadline;
    let read = tokio::time::timeout(deadline, frame::read::<Request, _>(&mut recv, max)).await;
    let (response, failure) = match read {
        Ok(Ok(Some(request))) => {
            // One request per stream: anything after the frame is discarded.
            let _ = recv.stop(0u32.into());
            let login = matches!(
                request.body,
                Some(request::Body::Login(_) | request::Body::Resume(_))
            );
            let _one_login = if login {
                Some(conn.logins.lock().await)
            } else {
                None
            };
            let (response, effects) = chat.handle(request, conn.bound()).await;
            if let Some((binding, latest)) = effects.bind {
                conn.bind(binding, latest);
            }
            (response, None)
        }
        Ok(Ok(None)) => failure(
            ErrorCode::MalformedFrame,
            "the stream ended before a request frame".to_string(),
        ),
        Ok(Err(FrameError::TooLarge { len, max })) => {
            // Not read: the client may stop sending.
            let _ = recv.stop(0u32.into());
            failure(
                ErrorCode::FrameTooLarge,
                format!("a frame of {len} bytes exceeds the limit of {max} bytes"),
            )
        }
        Ok(Err(FrameError::Malformed(e))) => failure(
            ErrorCode::MalformedFrame,
            format!("the frame is not a Request: {e}"),
        ),
        Ok(Err(FrameError::Io(e))) => failure(
            ErrorCode::MalformedFrame,
            format!("the stream ended inside a frame: {e}"),
        ),
        Err(_) => {
            let _ = recv.stop(0u32.into());
            failure(
                ErrorCode::MalformedFrame,
                format!("no complete request frame within {deadline:?}"),
            )
        }
    };
    if let Some(code) = failure {
        chat.stats().record("frame", code.as_str_name());
    }
    if let Err(e) = frame::write(&mut send, &response).await {
        tracing::debug!(conn = conn.id, error = %e, "answer not delivered");
        return;
    }
    let _ = send.finish();
}

/// The answer to a stream whose request frame could not be read, and its
/// code for the metrics.
fn failure(code: ErrorCode, message: String) -> (Response, Option<ErrorCode>) {
    let response = Response {
        request_id: 0,
        body: Some(response::Body::Error(
            Refusal::new(code, message).into_error(),
        )),
    };
    (response, Some(code))
}

/// Writes the connection's pushes until its session ends or it closes.
async fn write_pushes(conn: Arc<Conn>, pushes: Arc<Pushes>, latest: u64) {
    let Ok(mut stream) = conn.connection.open_uni().await else {
        return;
    };
    let notify = |notify| Push {
        body: Some(push::Body::Notify(notify)),
    };
    let first = Notify {
        latest_version: latest,
        entries: Vec::new(),
    };
    if frame::write(&mut stream, &notify(first)).await.is_err() {
        return;
    }
    loop {
        let expires = conn.expires_ms.load(Ordering::Relaxed);
        let wait = Duration::from_millis(expires.saturating_sub(now_ms()));
        let event = tokio::select! {
            event = pushes.next() => event,
            _ = conn.connection.closed() => return,
            _ = tokio::time::sleep(wait) => {
                if conn.expires_ms.load(Ordering::Relaxed) > now_ms() {
                    continue; // a new Login extended the session
                }
                if let Some(bound) = conn.bound() {
                    conn.sessions.unbind(bound.user, conn.id);
                }
                PushEvent::Kick(Reason::TokenExpired)
            }
        };
        match event {
            PushEvent::Notify(news) => {
                let mut frame_out = notify(news.to_notify());
                if frame_out.encoded_len() > conn.max_push_bytes {
                    frame_out = notify(Notify {
                        latest_version: news.latest(),
                        entries: Vec::new(),
                    });
                }
                // A client that does not read its pushes is cut off, so a
                // Kick behind the Notify is never stuck.
                let write = tokio::time::timeout(PUSH_WRITE, frame::write(&mut stream, &frame_out));
                if !matches!(write.await, Ok(Ok(()))) {
                    conn.connection
                        .close(0u32.into(), b"the push stream is not read");
                    return;
                }
            }
            PushEvent::Kick(reason) => {
                let message = kick_message(reason);
                let kick = Push {
                    body: Some(push::Body::Kick(Kick {
                        reason: reason as i32,
                        message: message.to_string(),
                    })),
                };
                let _ = tokio::time::timeout(PUSH_WRITE, frame::write(&mut stream, &kick)).await;
                let _ = stream.finish();
                // Until the client has the Kick and the answers in flight
                // (at least a moment, at most KICK_GRACE).
                let floor = tokio::time::sleep(KICK_FLOOR);
                let _ = tokio::time::timeout(KICK_GRACE, stream.stopped()).await;
                floor.await;
                conn.connection
                    .close((reason as u32).into(), message.as_bytes());
                return;
            }
        }
    }
}
