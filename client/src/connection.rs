//! One QUIC connection to one node, speaking the request/response protocol:
//! one bidirectional stream per request, one frame each way.
//!
//! This level does no retrying and no interpretation: [`Connection::request`]
//! returns the server's `Response` as it came, an `Error` body included. The
//! retrying, session-keeping layer is [`crate::Client`].

use std::net::SocketAddr;
use std::time::Duration;

use fishchat_proto::client::{Push, Request, Response};
use fishchat_proto::frame::{self, FrameError};

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::tls::quic_client_config;

/// A QUIC connection to one FishChat node.
///
/// Requests on it are independent streams: a `Connection` may be shared
/// (behind an `Arc`) by tasks sending requests at the same time.
pub struct Connection {
    /// Kept so the UDP socket lives as long as the connection.
    _endpoint: quinn::Endpoint,
    quic: quinn::Connection,
    server: String,
    request_timeout: Duration,
    max_frame_bytes: u32,
}

impl Connection {
    /// Connects to `server` (`host:port`) with the TLS settings of `config`.
    pub async fn connect(config: &ClientConfig, server: &str) -> Result<Self, ClientError> {
        let quic = quic_client_config(config)?;
        Self::connect_with(&quic, config, server).await
    }

    /// Connects to `server` with a prepared quinn configuration, trying each
    /// address the name resolves to in turn.
    pub(crate) async fn connect_with(
        quic: &quinn::ClientConfig,
        config: &ClientConfig,
        server: &str,
    ) -> Result<Self, ClientError> {
        let addrs = resolve(server, config.connect_timeout).await?;
        let mut last = ClientError::Connect(format!("{server} resolves to no address"));
        for addr in addrs {
            match Self::connect_addr(quic, config, server, addr).await {
                Ok(connection) => return Ok(connection),
                Err(e) => {
                    tracing::debug!(%server, %addr, error = %e, "connect failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn connect_addr(
        quic: &quinn::ClientConfig,
        config: &ClientConfig,
        server: &str,
        addr: SocketAddr,
    ) -> Result<Self, ClientError> {
        let shared = config.endpoint.as_ref().and_then(|e| e.for_addr(addr));
        let endpoint = match shared {
            Some(endpoint) => endpoint.clone(),
            None => {
                let bind: SocketAddr = if addr.is_ipv6() {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                };
                quinn::Endpoint::client(bind)
                    .map_err(|e| ClientError::Connect(format!("cannot bind a UDP socket: {e}")))?
            }
        };
        let connecting = endpoint
            .connect_with(quic.clone(), addr, &config.server_name)
            .map_err(|e| ClientError::Config(format!("cannot dial {server} ({addr}): {e}")))?;
        let quic_connection = match tokio::time::timeout(config.connect_timeout, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                return Err(ClientError::Connect(format!("{server} ({addr}): {e}")));
            }
            Err(_) => {
                return Err(ClientError::Connect(format!(
                    "{server} ({addr}): no handshake within {:?}",
                    config.connect_timeout
                )));
            }
        };
        tracing::debug!(%server, %addr, "connected");
        Ok(Self {
            _endpoint: endpoint,
            quic: quic_connection,
            server: server.to_string(),
            request_timeout: config.request_timeout,
            max_frame_bytes: config.max_frame_bytes,
        })
    }

    /// The address this connection was dialled as (`host:port`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The socket address of the node.
    pub fn remote_address(&self) -> SocketAddr {
        self.quic.remote_address()
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.quic.close_reason()
    }

    /// Whether the connection has ended (closed by either side or lost).
    pub fn is_closed(&self) -> bool {
        self.quic.close_reason().is_some()
    }

    /// Waits until the connection ends and says why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.quic.closed().await
    }

    /// Closes the connection (application code 0: no session-ending reason).
    pub fn close(&self) {
        self.quic
            .close(quinn::VarInt::from_u32(0), b"client closed");
    }

    /// Sends `request` on a new stream and reads the answer, as the server
    /// sent it (an `Error` body is not turned into `Err`). Fails with
    /// [`ClientError::Timeout`] after the request timeout, and with
    /// [`ClientError::Transport`] when the stream or connection is lost.
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        self.raw(&frame::encode(request)).await
    }

    /// Writes `bytes` as they are on a new stream (a malformed or oversized
    /// frame, for tests), finishes the stream, and reads one `Response`.
    ///
    /// Writing and reading run together: a server that refuses a frame
    /// answers and stops the stream before reading it all, and that answer is
    /// what is returned.
    pub async fn raw(&self, bytes: &[u8]) -> Result<Response, ClientError> {
        match tokio::time::timeout(self.request_timeout, self.exchange(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    async fn exchange(&self, bytes: &[u8]) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self
            .quic
            .open_bi()
            .await
            .map_err(|e| ClientError::Transport(format!("{}: {e}", self.server)))?;
        let write = async {
            send.write_all(bytes).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())
        };
        let read = frame::read::<Response, _>(&mut recv, self.max_frame_bytes);
        tokio::pin!(write, read);
        // Once the answer is in, an unfinished write no longer matters.
        let mut written: Option<Result<(), String>> = None;
        let answer = loop {
            tokio::select! {
                result = &mut write, if written.is_none() => written = Some(result),
                answer = &mut read => break answer,
            }
        };
        match answer {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(match written {
                Some(Err(e)) => ClientError::Transport(format!("{}: writing: {e}", self.server)),
                _ => ClientError::Transport(format!(
                    "{}: the stream ended without an answer",
                    self.server
                )),
            }),
            Err(e) => Err(frame_error(&self.server, e)),
        }
    }

    /// Waits for the server's push stream (opened after the first successful
    /// login on this connection).
    pub async fn accept_push_stream(&self) -> Result<PushStream, ClientError> {
        let recv = self
            .quic
            .accept_uni()
            .await
            .map_err(|e| ClientError::Transport(format!("{}: {e}", self.server)))?;
        Ok(PushStream {
            recv,
            server: self.server.clone(),
            max_frame_bytes: self.max_frame_bytes,
        })
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .field("remote", &self.quic.remote_address())
            .finish()
    }
}

/// The server's unidirectional stream of `Push` frames for one session.
pub struct PushStream {
    recv: quinn::RecvStream,
    server: String,
    max_frame_bytes: u32,
}

impl PushStream {
    /// The next push, or `None` when the server finished the stream (after a
    /// `Kick`). Not cancel-safe: a future dropped mid-frame loses the frame's
    /// start, so read it from a task of its own.
    pub async fn next(&mut self) -> Result<Option<Push>, ClientError> {
        frame::read::<Push, _>(&mut self.recv, self.max_frame_bytes)
            .await
            .map_err(|e| frame_error(&self.server, e))
    }
}

fn frame_error(server: &str, error: FrameError) -> ClientError {
    match error {
        FrameError::Io(e) => ClientError::Transport(format!("{server}: {e}")),
        FrameError::TooLarge { len, max } => ClientError::Protocol(format!(
            "{server} sent a frame of {len} bytes (limit {max})"
        )),
        FrameError::Malformed(e) => {
            ClientError::Protocol(format!("{server} sent an undecodable frame: {e}"))
        }
    }
}

/// Resolves `host:port` to socket addresses, within `limit`.
async fn resolve(server: &str, limit: Duration) -> Result<Vec<SocketAddr>, ClientError> {
    let lookup = tokio::net::lookup_host(server);
    match tokio::time::timeout(limit, lookup).await {
        Ok(Ok(addrs)) => Ok(addrs.collect()),
        Ok(Err(e)) => Err(ClientError::Connect(format!(
            "cannot resolve {server}: {e}"
        ))),
        Err(_) => Err(ClientError::Connect(format!(
            "resolving {server} timed out"
        ))),
    }
}
