//! [`Client`]: a session with a cluster that survives the loss of a node.
//!
//! A `Client` holds one [`Connection`] at a time and the session opened by
//! [`Client::login`] (token, user id, and the credentials needed to log in
//! again). Every operation goes through one retry loop ([`Client::call`])
//! that applies the policy of [`crate::retry`]: when the connection is lost
//! it connects to the next address (the configured list, then the addresses
//! learned at login; `failover.rs`), logs in again with the stored username
//! and password, and repeats the request unchanged; a `Send` keeps its
//! `client_msg_id`, so a repeat is never stored twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fishchat_proto::client::{
    request, response, InboxEntry, Kick, LoginRequest, LoginResponse, LogoutRequest, LookupRequest,
    LookupResponse, PingRequest, PingResponse, RegisterRequest, Request, Response, SendRequest,
    SendResponse, SyncRequest, SyncResponse,
};
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::connection::Connection;
use crate::error::ClientError;
use crate::retry::{self, Backoff, Verdict};
use crate::tls::quic_client_config;

/// A cheaply cloneable handle on a connection and session with a cluster.
///
/// Clones share the connection, the session and the request-id counter.
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) config: ClientConfig,
    pub(crate) quic: quinn::ClientConfig,
    /// Request ids, unique per client: 1, 2, 3, ...
    pub(crate) next_request_id: AtomicU64,
    /// Never held across an `.await`.
    pub(crate) state: Mutex<State>,
    /// Serialises failovers, so concurrent failed requests reconnect once.
    pub(crate) failover_lock: tokio::sync::Mutex<()>,
    /// Set by [`Client::close`]: no failover may reconnect afterwards.
    pub(crate) closed: AtomicBool,
}

pub(crate) struct State {
    pub(crate) connection: Arc<Connection>,
    /// Incremented at each reconnect; lets a caller tell whether the
    /// connection it failed on is still the current one.
    pub(crate) generation: u64,
    pub(crate) session: Option<Session>,
    /// `LoginResponse.client_addrs` of the last login.
    pub(crate) learned_servers: Vec<String>,
    /// The kick that ended the last session, if one did.
    pub(crate) kick: Option<Kick>,
}

/// The logged-in session.
pub(crate) struct Session {
    pub(crate) user_id: u64,
    pub(crate) token: String,
    /// `None` once the session may not be reopened automatically (it was
    /// replaced by another device or revoked).
    pub(crate) credentials: Option<Credentials>,
}

#[derive(Clone)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) password: String,
    pub(crate) device: String,
}

impl Client {
    /// Connects to the first server of `config.servers` that completes a
    /// handshake, trying them in order. Does not log in.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::Config("no server address given".to_string()));
        }
        let quic = quic_client_config(&config)?;
        let mut failures = Vec::new();
        for server in &config.servers {
            match Connection::connect_with(&quic, &config, server).await {
                Ok(connection) => {
                    let state = State {
                        connection: Arc::new(connection),
                        generation: 0,
                        session: None,
                        learned_servers: Vec::new(),
                        kick: None,
                    };
                    return Ok(Client {
                        shared: Arc::new(Shared {
                            config,
                            quic,
                            next_request_id: AtomicU64::new(1),
                            state: Mutex::new(state),
                            failover_lock: tokio::sync::Mutex::new(()),
                            closed: AtomicBool::new(false),
                        }),
                    });
                }
                Err(e) => failures.push(e.detail()),
            }
        }
        Err(ClientError::Connect(failures.join("; ")))
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// The current connection (for requests outside the retry loop, such as
    /// [`Connection::raw`]).
    pub fn connection(&self) -> Arc<Connection> {
        self.state().connection.clone()
    }

    /// The address of the node currently connected to.
    pub fn connected_to(&self) -> String {
        self.state().connection.server().to_string()
    }

    /// The logged-in user's id, if logged in.
    pub fn user_id(&self) -> Option<u64> {
        self.state().session.as_ref().map(|s| s.user_id)
    }

    /// The session token, if logged in.
    pub fn token(&self) -> Option<String> {
        self.state().session.as_ref().map(|s| s.token.clone())
    }

    /// The kick that ended the session, if the server ended it (seen by
    /// [`Client::incoming`], which reads the push stream).
    pub fn kick(&self) -> Option<Kick> {
        self.state().kick.clone()
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.shared.next_request_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Closes the connection for good: requests and watchers still running
    /// end with [`ClientError::Closed`] instead of reconnecting. The
    /// session's token stays valid.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.state().connection.close();
    }

    /// Whether [`Client::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Creates an account; returns the new user id. Does not log in.
    pub async fn register(&self, username: &str, password: &str) -> Result<u64, ClientError> {
        let body = request::Body::Register(RegisterRequest {
            username: username.to_string(),
            password: password.to_string(),
        });
        match self.call(body, false).await? {
            response::Body::Register(answer) => Ok(answer.user_id),
            other => Err(unexpected("register", &other)),
        }
    }

    /// Logs in and keeps the session (token, user id, credentials for
    /// re-login after failover) and the cluster's addresses. `device` names
    /// the device; a later login with the same name ends this session.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device: Option<&str>,
    ) -> Result<LoginResponse, ClientError> {
        let credentials = Credentials {
            username: username.to_string(),
            password: password.to_string(),
            device: device.unwrap_or_default().to_string(),
        };
        match self.call(login_body(&credentials), false).await? {
            response::Body::Login(answer) => {
                let mut state = self.state();
                state.kick = None;
                state.learned_servers = answer.client_addrs.clone();
                state.session = Some(Session {
                    user_id: answer.user_id,
                    token: answer.token.clone(),
                    credentials: Some(credentials),
                });
                Ok(answer)
            }
            other => Err(unexpected("login", &other)),
        }
    }

    /// Ends the session: the server revokes the token. The credentials are
    /// forgotten, so nothing logs in again automatically.
    pub async fn logout(&self) -> Result<(), ClientError> {
        let body = request::Body::Logout(LogoutRequest {});
        match self.call(body, true).await? {
            response::Body::Logout(_) => {
                self.state().session = None;
                Ok(())
            }
            other => Err(unexpected("logout", &other)),
        }
    }

    /// Finds a user by name (any letter case).
    pub async fn lookup(&self, username: &str) -> Result<LookupResponse, ClientError> {
        let body = request::Body::Lookup(LookupRequest {
            username: username.to_string(),
        });
        match self.call(body, true).await? {
            response::Body::Lookup(answer) => Ok(answer),
            other => Err(unexpected("lookup", &other)),
        }
    }

    /// Checks that the server answers; it echoes `nonce`.
    pub async fn ping(&self, nonce: u64) -> Result<PingResponse, ClientError> {
        match self
            .call(request::Body::Ping(PingRequest { nonce }), false)
            .await?
        {
            response::Body::Ping(answer) => Ok(answer),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Sends `body` to `recipient_id`, exactly once: retries repeat the same
    /// `client_msg_id` (1 to 128 bytes, unique among all of this user's
    /// messages), so `duplicate = true` in the answer also means success.
    pub async fn send(
        &self,
        recipient_id: u64,
        client_msg_id: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<SendResponse, ClientError> {
        let request = request::Body::Send(SendRequest {
            recipient_id,
            client_msg_id: client_msg_id.to_string(),
            body,
            content_type: content_type.to_string(),
        });
        match self.call(request, true).await? {
            response::Body::Send(answer) => Ok(answer),
            other => Err(unexpected("send", &other)),
        }
    }

    /// Reads one page of the inbox: entries after `since`, at most `limit`
    /// (0: the server's default).
    pub async fn sync(&self, since: u64, limit: u32) -> Result<SyncResponse, ClientError> {
        let body = request::Body::Sync(SyncRequest { since, limit });
        match self.call(body, true).await? {
            response::Body::Sync(answer) => Ok(answer),
            other => Err(unexpected("sync", &other)),
        }
    }

    /// Reads every inbox entry after `since`, page after page while the
    /// server says there are `more`.
    pub async fn sync_all(&self, since: u64) -> Result<Vec<InboxEntry>, ClientError> {
        let mut entries = Vec::new();
        let mut held = since;
        loop {
            let page = self.sync(held, 0).await?;
            let Some(last) = page.entries.last().map(|e| e.version) else {
                if page.more {
                    return Err(ClientError::Protocol(
                        "an empty sync page said there were more".to_string(),
                    ));
                }
                return Ok(entries);
            };
            if last <= held {
                return Err(ClientError::Protocol(format!(
                    "a sync after {held} returned versions up to {last}"
                )));
            }
            held = last;
            entries.extend(page.entries);
            if !page.more {
                return Ok(entries);
            }
        }
    }

    /// The inbox's highest version now (0 for an empty inbox).
    pub async fn latest_version(&self) -> Result<u64, ClientError> {
        Ok(self.sync(0, 1).await?.latest_version)
    }

    /// Sends `request` once on the current connection, exactly as given
    /// (token included) except a `request_id` of 0, which gets a fresh id.
    /// No retry, no re-login. An `Error` answer is returned as
    /// [`ClientError::Server`].
    pub async fn request_once(&self, mut request: Request) -> Result<Response, ClientError> {
        if request.request_id == 0 {
            request.request_id = self.next_request_id();
        }
        let connection = self.connection();
        let response = connection.request(&request).await?;
        match response.body {
            Some(response::Body::Error(error)) => Err(ClientError::from_wire(error)),
            None => Err(ClientError::Protocol("an answer with no body".to_string())),
            Some(_) => Ok(response),
        }
    }

    /// Sends one operation with the retry policy of [`crate::retry`]:
    /// retries the same operation (with the current token when `needs_token`)
    /// until it succeeds, fails for good, or the retry deadline passes.
    pub async fn call(
        &self,
        body: request::Body,
        needs_token: bool,
    ) -> Result<response::Body, ClientError> {
        let deadline = Instant::now() + self.shared.config.retry_deadline;
        let mut backoff = Backoff::new();
        let mut relogged = false;
        let mut unavailable_in_a_row = 0;
        // Set while the last failover found no node: what to report if the
        // deadline passes before one is found.
        let mut unreachable: Option<ClientError> = None;
        loop {
            let (connection, generation, token) = {
                let state = self.state();
                let token = state.session.as_ref().map(|s| s.token.clone());
                (state.connection.clone(), state.generation, token)
            };
            let token = match (needs_token, token) {
                (false, _) => String::new(),
                (true, Some(token)) => token,
                (true, None) => {
                    return Err(ClientError::Config(
                        "this operation needs a login first".to_string(),
                    ))
                }
            };
            let request = Request {
                request_id: self.next_request_id(),
                token,
                body: Some(body.clone()),
            };
            let error = match self.exchange_watched(&connection, &request).await {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            if retry::is_unavailable(&error) {
                unavailable_in_a_row += 1;
            } else {
                unavailable_in_a_row = 0;
            }
            match retry::verdict(&error, unavailable_in_a_row, relogged) {
                Verdict::GiveUp => return Err(error),
                Verdict::Relogin => {
                    relogged = true;
                    if let Err(e) = self.relogin().await {
                        tracing::debug!(error = %e, "re-login failed");
                        return Err(error);
                    }
                }
                Verdict::Retry { failover } => {
                    let wait = backoff.next_delay(error.retry_after());
                    if Instant::now() + wait >= deadline {
                        return Err(unreachable.unwrap_or(error));
                    }
                    tracing::debug!(
                        request_id = request.request_id,
                        server = connection.server(),
                        error = %error,
                        ?wait,
                        failover,
                        "retrying"
                    );
                    tokio::time::sleep(wait).await;
                    if failover {
                        unavailable_in_a_row = 0;
                        match self.failover(generation).await {
                            Ok(()) => unreachable = None,
                            Err(e) if e.is_retryable() => {
                                tracing::debug!(error = %e, "failover failed");
                                unreachable = Some(e);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
    }

    /// The current connection and its generation.
    pub(crate) fn current(&self) -> (Arc<Connection>, u64) {
        let state = self.state();
        (state.connection.clone(), state.generation)
    }

    /// Records the kick that ended the session. After `TOKEN_REVOKED` or
    /// `SESSION_REPLACED` the credentials are dropped: logging in again
    /// automatically would evict the other device, or undo a logout.
    pub(crate) fn record_kick(&self, kick: Kick, reopen_allowed: bool) {
        let mut state = self.state();
        if !reopen_allowed {
            if let Some(session) = state.session.as_mut() {
                session.credentials = None;
            }
        }
        state.kick = Some(kick);
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected_to", &self.connected_to())
            .field("user_id", &self.user_id())
            .finish()
    }
}

impl Client {
    /// Runs one attempt of `request` on `connection`, and while its answer
    /// is slow, checks that the node is still there: after [`PROBE_AFTER`]
    /// and then continually, it pings the node on another stream. A node
    /// that answers no ping within [`PROBE_TIMEOUT`] is taken as gone (a
    /// killed or cut-off node sends no close, so the connection would
    /// otherwise be given up only at the request timeout), and the attempt
    /// fails as a lost connection, which fails over. A node that is merely
    /// slow (its shard electing a leader) answers pings and is waited for.
    async fn exchange_watched(
        &self,
        connection: &Connection,
        request: &Request,
    ) -> Result<response::Body, ClientError> {
        let answer = exchange(connection, request);
        tokio::pin!(answer);
        let probe = async {
            tokio::time::sleep(PROBE_AFTER).await;
            loop {
                let ping = Request {
                    request_id: self.next_request_id(),
                    token: String::new(),
                    body: Some(request::Body::Ping(PingRequest { nonce: 0 })),
                };
                let sent = Instant::now();
                match tokio::time::timeout(PROBE_TIMEOUT, connection.request(&ping)).await {
                    Ok(Ok(_)) => tokio::time::sleep_until(sent + PROBE_AFTER).await,
                    Ok(Err(e)) => return e,
                    Err(_) => {
                        return ClientError::Transport(format!(
                            "{}: no answer to a ping within {PROBE_TIMEOUT:?}",
                            connection.server()
                        ))
                    }
                }
            }
        };
        tokio::select! {
            answered = &mut answer => answered,
            gone = probe => Err(gone),
        }
    }
}

/// How long an answer may take before the node is pinged, and then the
/// time between pings.
pub const PROBE_AFTER: Duration = Duration::from_millis(300);
/// How long a ping may take before the node counts as gone.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

pub(crate) fn login_body(credentials: &Credentials) -> request::Body {
    request::Body::Login(LoginRequest {
        username: credentials.username.clone(),
        password: credentials.password.clone(),
        device: credentials.device.clone(),
    })
}

/// One attempt: the answer's body, or the error it carries.
pub(crate) async fn exchange(
    connection: &Connection,
    request: &Request,
) -> Result<response::Body, ClientError> {
    match connection.request(request).await?.body {
        Some(response::Body::Error(error)) => Err(ClientError::from_wire(error)),
        Some(body) => Ok(body),
        None => Err(ClientError::Protocol("an answer with no body".to_string())),
    }
}

pub(crate) fn unexpected(operation: &str, answer: &response::Body) -> ClientError {
    let kind = match answer {
        response::Body::Error(_) => "error",
        response::Body::Register(_) => "register",
        response::Body::Login(_) => "login",
        response::Body::Logout(_) => "logout",
        response::Body::Send(_) => "send",
        response::Body::Sync(_) => "sync",
        response::Body::Ping(_) => "ping",
        response::Body::Lookup(_) => "lookup",
        response::Body::CreateGroup(_) => "create_group",
        response::Body::AddGroupMember(_) => "add_group_member",
        response::Body::RemoveGroupMember(_) => "remove_group_member",
        response::Body::LeaveGroup(_) => "leave_group",
        response::Body::DissolveGroup(_) => "dissolve_group",
        response::Body::GroupMembers(_) => "group_members",
        response::Body::ListGroups(_) => "list_groups",
        response::Body::GroupSend(_) => "group_send",
        response::Body::Resume(_) => "resume",
    };
    ClientError::Protocol(format!("a {operation} request was answered with {kind}"))
}
