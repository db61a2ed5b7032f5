//! The client protocol's operations: one [`Request`] in, one [`Response`] out.
//!
//! Every operation goes to the shard that owns its subject through
//! [`GroupHost::propose`] / [`GroupHost::scan`], which reach that shard's
//! leader from any node. The handlers check everything a client sent before
//! proposing anything, so bad input changes nothing (G8).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use fishchat_proto::client::{
    self as wire, kick::Reason, request, response, ErrorCode, Request, Response,
};
use fishchat_raft::{GroupHost, ReadError, WriteError};
use fishchat_shard::{
    account_key, decode_account, decode_entry, decode_u64, inbox_range, latest_version_key,
    revoked_key, Account, Command, CommandError, Reply, ShardMap, UserId,
};
use ring::rand::{SecureRandom, SystemRandom};
use tracing::Instrument;

use crate::config::Limits;
use crate::courier::Courier;
use crate::events::Events;
use crate::node::group_of;
use crate::revocations::TRUST;
use crate::throttle::LoginThrottle;
use crate::token::{Claims, TokenKey};

/// Longest accepted client message id, in bytes (fixed rule).
const MAX_CLIENT_MSG_ID: usize = 128;
/// Longest accepted content type, in bytes (fixed rule).
const MAX_CONTENT_TYPE: usize = 128;
/// Longest accepted device name, in bytes (fixed rule).
const MAX_DEVICE: usize = 64;
/// Inbox entries read per scan while filling a sync page.
const SYNC_CHUNK: usize = 64;
/// Protobuf overhead allowed per inbox entry when filling a sync page.
const ENTRY_OVERHEAD: usize = 128;

/// A refusal, as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The error code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// How long the client should wait before trying again, when the
    /// refusal knows (`TOO_MANY_REQUESTS` otherwise advises 100 ms).
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// This refusal, advising the client to wait `wait` before a retry.
    pub fn retry_after(self, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..self
        }
    }

    /// The wire form, with the retryable flag each code usually carries.
    pub fn into_error(self) -> wire::Error {
        let retryable = matches!(
            self.code,
            ErrorCode::TooManyRequests | ErrorCode::Unavailable | ErrorCode::Timeout
        );
        wire::Error {
            code: self.code as i32,
            message: self.message,
            retryable,
            retry_after_ms: match self.retry_after {
                Some(wait) => duration_ms(wait).max(1),
                None if self.code == ErrorCode::TooManyRequests => 100,
                None => 0,
            },
        }
    }
}

impl From<WriteError> for Refusal {
    fn from(e: WriteError) -> Self {
        let code = match &e {
            WriteError::Timeout { .. } | WriteError::Unreachable { .. } => ErrorCode::Timeout,
            WriteError::NotLeader { .. } | WriteError::Stopped { .. } => ErrorCode::Unavailable,
            WriteError::TooLarge { .. } => ErrorCode::BodyTooLarge,
            WriteError::UnknownGroup(_) => ErrorCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

impl From<ReadError> for Refusal {
    fn from(e: ReadError) -> Self {
        let code = match &e {
            ReadError::NotLeader { .. } | ReadError::Unavailable { .. } => ErrorCode::Unavailable,
            ReadError::UnknownGroup(_) | ReadError::Storage(_) => ErrorCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

/// What a connection is bound to after a Login on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The user.
    pub user: UserId,
    /// The session (from the token).
    pub session: u64,
    /// When the session's token expires, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// What a handler tells the connection besides the response.
#[derive(Debug, Default)]
pub struct Effects {
    /// The connection is now bound to this session; `latest_version` is the
    /// inbox's latest version for the first Notify.
    pub bind: Option<(Binding, u64)>,
}

/// How many requests of each operation ended how: for `/metrics`.
#[derive(Default)]
pub struct RequestStats {
    counts: std::sync::Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
}

impl RequestStats {
    /// Counts one request of `operation` that ended with `outcome` ("OK" or
    /// an error code's name).
    pub fn record(&self, operation: &'static str, outcome: &'static str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry((operation, outcome)).or_default() += 1;
    }

    /// Every (operation, outcome) counted so far.
    pub fn snapshot(&self) -> Vec<((&'static str, &'static str), u64)> {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// The operation a request asks for, as a metric label.
fn operation_name(request: &Request) -> &'static str {
    match &request.body {
        None => "none",
        Some(request::Body::Register(_)) => "register",
        Some(request::Body::Login(_)) => "login",
        Some(request::Body::Logout(_)) => "logout",
        Some(request::Body::Send(_)) => "send",
        Some(request::Body::Sync(_)) => "sync",
        Some(request::Body::Ping(_)) => "ping",
        Some(request::Body::Lookup(_)) => "lookup",
        Some(request::Body::CreateGroup(_)) => "create_group",
        Some(request::Body::AddGroupMember(_)) => "add_group_member",
        Some(request::Body::RemoveGroupMember(_)) => "remove_group_member",
        Some(request::Body::LeaveGroup(_)) => "leave_group",
        Some(request::Body::DissolveGroup(_)) => "dissolve_group",
        Some(request::Body::GroupMembers(_)) => "group_members",
        Some(request::Body::ListGroups(_)) => "list_groups",
        Some(request::Body::GroupSend(_)) => "group_send",
        Some(request::Body::Resume(_)) => "resume",
    }
}

/// The protocol's operations on one node.
pub struct Chat {
    pub(crate) host: Arc<GroupHost>,
    pub(crate) map: ShardMap,
    tokens: TokenKey,
    pub(crate) limits: Limits,
    pub(crate) events: Arc<Events>,
    pub(crate) courier: Arc<Courier>,
    client_addrs: Vec<String>,
    random: SystemRandom,
    stats: RequestStats,
    /// Password hashing in progress: each takes ~19 MiB and a core for tens
    /// of milliseconds, so their number is bounded.
    hashing: tokio::sync::Semaphore,
    /// Wrong passwords by username: a name with too many is closed a while.
    logins: LoginThrottle,
}

impl Chat {
    /// The operations of a node hosting `host`.
    pub fn new(
        host: Arc<GroupHost>,
        map: ShardMap,
        tokens: TokenKey,
        limits: Limits,
        events: Arc<Events>,
        courier: Arc<Courier>,
        client_addrs: Vec<String>,
    ) -> Self {
        Self {
            host,
            map,
            tokens,
            limits,
            events,
            courier,
            client_addrs,
            random: SystemRandom::new(),
            stats: RequestStats::default(),
            hashing: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
            ),
            logins: LoginThrottle::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Requests answered so far, by operation and outcome.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// Answers one request from a connection bound to `bound` (if any).
    pub async fn handle(&self, request: Request, bound: Option<Binding>) -> (Response, Effects) {
        let request_id = request.request_id;
        let operation = operation_name(&request);
        let span = tracing::info_span!("request", request_id, user = tracing::field::Empty);
        let mut effects = Effects::default();
        let deadline = self.limits.request_deadline;
        let outcome = tokio::time::timeout(
            deadline,
            self.dispatch(request, bound, &mut effects).instrument(span),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                ErrorCode::Timeout,
                format!("no outcome within the request deadline of {deadline:?}"),
            ))
        });
        let body = match outcome {
            Ok(body) => {
                self.stats.record(operation, "OK");
                body
            }
            Err(refusal) => {
                self.stats.record(operation, refusal.code.as_str_name());
                if matches!(refusal.code, ErrorCode::Internal) {
                    tracing::error!(request_id, error = %refusal.message, "request failed");
                }
                response::Body::Error(refusal.into_error())
            }
        };
        let response = Response {
            request_id,
            body: Some(body),
        };
        (response, effects)
    }

    async fn dispatch(
        &self,
        request: Request,
        bound: Option<Binding>,
        effects: &mut Effects,
    ) -> Result<response::Body, Refusal> {
        let Some(body) = request.body else {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "the request has no operation (or one this server does not know)",
            ));
        };
        match body {
            request::Body::Ping(ping) => Ok(response::Body::Ping(wire::PingResponse {
                nonce: ping.nonce,
                server_time_ms: now_ms(),
            })),
            request::Body::Register(register) => self.register(register).await,
            request::Body::Login(login) => self.login(login, bound, effects).await,
            request::Body::Resume(_) => self.resume(&request.token, bound, effects).await,
            request::Body::Logout(_) => {
                // Logging out a revoked token succeeds again: no revocation check.
                let claims = self.verify(&request.token, bound)?;
                self.logout(claims).await
            }
            request::Body::Send(send) => {
                let claims = self.authenticate(&request.token, bound).await?;
                self.send(claims.user, send).await
            }
            request::Body::Sync(sync) => {
                let claims = self.authenticate(&request.token, bound).await?;
                self.sync(claims.user, sync).await
            }
            request::Body::Lookup(lookup) => {
                self.authenticate(&request.token, bound).await?;
                let unknown = || Refusal::new(ErrorCode::UnknownUser, "no user has this name");
                if !fishchat_shard::valid_username(&lookup.username) {
                    return Err(unknown());
                }
                let account = self.account(&lookup.username).await?.ok_or_else(unknown)?;
                Ok(response::Body::Lookup(wire::LookupResponse {
                    user_id: account.user_id,
                    username: account.username,
                }))
            }
            group => {
                let claims = self.authenticate(&request.token, bound).await?;
                self.group_request(claims.user, group).await
            }
        }
    }

    async fn register(&self, register: wire::RegisterRequest) -> Result<response::Body, Refusal> {
        if !fishchat_shard::valid_username(&register.username) {
            return Err(refusal_of(CommandError::InvalidUsername));
        }
        self.check_password_rules(&register.password)?;
        let password = register.password;
        let salt = self.salt()?;
        let _permit = self.hashing_permit().await?;
        let hash = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await
        .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("hashing: {e}")))?;
        let command = Command::Register {
            username: register.username.clone(),
            password_hash: hash,
            now_ms: now_ms(),
        };
        let shard = self.map.shard_of_username(&register.username);
        match self.propose(shard, &command).await? {
            Reply::Registered { user_id } => {
                tracing::info!(user_id, username = %register.username, "registered");
                Ok(response::Body::Register(wire::RegisterResponse { user_id }))
            }
            other => Err(unexpected(other)),
        }
    }

    fn check_password_rules(&self, password: &str) -> Result<(), Refusal> {
        let chars = password.chars().count();
        if chars < self.limits.min_password_chars || password.len() > self.limits.max_password_bytes
        {
            return Err(Refusal::new(
                ErrorCode::InvalidPassword,
                format!(
                    "a password has at least {} characters and at most {} bytes",
                    self.limits.min_password_chars, self.limits.max_password_bytes
                ),
            ));
        }
        Ok(())
    }

    fn salt(&self) -> Result<SaltString, Refusal> {
        let mut bytes = [0u8; 16];
        self.random
            .fill(&mut bytes)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "the random source failed"))?;
        SaltString::encode_b64(&bytes).map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))
    }

    /// Refuses a login for `username` while too many wrong passwords have
    /// closed it on this node (see [`crate::throttle`]).
    fn open_to_login(&self, username: &str) -> Result<(), Refusal> {
        self.logins
            .check(username, Instant::now())
            .map_err(|wait| name_closed(username, wait))
    }

    /// The refusal of a wrong password (or of a name no account has), which
    /// says nothing of which it was, once the failure left the name closed
    /// for `closed`.
    fn login_failed(&self, username: &str, closed: Duration) -> Refusal {
        if !closed.is_zero() {
            tracing::warn!(
                username,
                close_ms = duration_ms(closed),
                "too many wrong passwords: logins for this name closed on this node"
            );
        }
        wrong_password()
    }

    /// Waits (briefly) for a turn to hash a password.
    async fn hashing_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Refusal> {
        let busy = || {
            Refusal::new(
                ErrorCode::TooManyRequests,
                "too many logins and registrations at once on this node",
            )
        };
        tokio::time::timeout(Duration::from_secs(2), self.hashing.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())
    }

    fn random_u64(&self) -> Result<u64, Refusal> {
        let mut bytes = [0u8; 8];
        self.random
            .fill(&mut bytes)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "the random source failed"))?;
        Ok(u64::from_be_bytes(bytes).max(1))
    }

    async fn login(
        &self,
        login: wire::LoginRequest,
        bound: Option<Binding>,
        effects: &mut Effects,
    ) -> Result<response::Body, Refusal> {
        if login.device.len() > MAX_DEVICE {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("a device name has at most {MAX_DEVICE} bytes"),
            ));
        }
        if !fishchat_shard::valid_username(&login.username) {
            return Err(wrong_password());
        }
        self.open_to_login(&login.username)?;
        let Some(account) = self.account(&login.username).await? else {
            let closed = self.logins.failed(&login.username, Instant::now());
            return Err(self.login_failed(&login.username, closed));
        };
        if let Some(bound) = bound {
            if bound.user != account.user_id {
                return Err(Refusal::new(
                    ErrorCode::PermissionDenied,
                    "this connection belongs to another user; open a new connection",
                ));
            }
        }
        let password = login.password;
        let stored = account.password_hash.clone();
        let permit = self.hashing_permit().await?;
        // Under the count's lock: a failure may have closed the name while
        // this one waited, and guesses at once get only the checks left.
        let attempt = self
            .logins
            .attempt(&login.username, Instant::now())
            .map_err(|wait| name_closed(&login.username, wait))?;
        let verified = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&stored)
                .map(|hash| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &hash)
                        .is_ok()
                })
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("stored hash: {e}")))?;
        drop(permit);
        if !verified {
            let closed = attempt.failed(Instant::now());
            return Err(self.login_failed(&login.username, closed));
        }
        attempt.succeeded();
        let user = account.user_id;
        // Peers report this user's commits to this node from here on; any
        // they reported elsewhere is older than the read below, and any
        // reported before the binding reaches it.
        self.events.expect(user).await;
        // Read before anything changes: a failure here must leave no trace
        // (an announcement is withdrawn by itself when no session follows).
        let latest = self.latest_version(user).await?;
        let session = self.random_u64()?;
        let expires_ms = now_ms().saturating_add(duration_ms(self.limits.token_lifetime));
        if !login.device.is_empty() {
            let command = Command::OpenSession {
                user,
                session,
                device: login.device.clone(),
                expires_ms,
                refreshes: bound.map_or(0, |b| b.session),
            };
            match self.propose(self.map.shard_of_user(user), &command).await? {
                Reply::SessionOpened { replaced } => {
                    if let Some(replaced) = replaced {
                        self.end_session(user, replaced, Reason::SessionReplaced)
                            .await;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        let claims = Claims {
            user,
            session,
            expires_ms,
        };
        effects.bind = Some((
            Binding {
                user,
                session,
                expires_ms,
            },
            latest,
        ));
        tracing::info!(user, session, device = %login.device, "logged in");
        Ok(response::Body::Login(
            self.session_opened(self.tokens.sign(claims), claims),
        ))
    }

    /// Binds the connection to the session of `token`, as its Login bound
    /// the connection it came on: no password, no new session.
    async fn resume(
        &self,
        token: &str,
        bound: Option<Binding>,
        effects: &mut Effects,
    ) -> Result<response::Body, Refusal> {
        let claims = self.authenticate(token, bound).await?;
        self.events.expect(claims.user).await;
        let latest = self.latest_version(claims.user).await?;
        effects.bind = Some((
            Binding {
                user: claims.user,
                session: claims.session,
                expires_ms: claims.expires_ms,
            },
            latest,
        ));
        tracing::debug!(user = claims.user, session = claims.session, "resumed");
        Ok(response::Body::Resume(
            self.session_opened(token.to_string(), claims),
        ))
    }

    /// The answer to a Login or a Resume that bound the connection.
    fn session_opened(&self, token: String, claims: Claims) -> wire::LoginResponse {
        wire::LoginResponse {
            token,
            user_id: claims.user,
            expires_at_ms: claims.expires_ms,
            client_addrs: self.client_addrs.clone(),
            limits: Some(wire::ServerLimits {
                max_frame_bytes: self.limits.max_frame_bytes,
                max_body_bytes: self.limits.max_body_bytes,
                max_requests_in_flight: self.limits.max_requests_in_flight,
                max_sync_limit: self.limits.max_sync_limit,
            }),
        }
    }

    async fn logout(&self, claims: Claims) -> Result<response::Body, Refusal> {
        let command = Command::Revoke {
            user: claims.user,
            session: claims.session,
            expires_ms: claims.expires_ms,
        };
        match self
            .propose(self.map.shard_of_user(claims.user), &command)
            .await?
        {
            Reply::Revoked => {
                self.end_session(claims.user, claims.session, Reason::TokenRevoked)
                    .await;
                tracing::info!(user = claims.user, session = claims.session, "logged out");
                Ok(response::Body::Logout(wire::LogoutResponse {}))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Checks a request's token: signed here, not expired, usable on this
    /// connection, not revoked (read at the user's shard).
    async fn authenticate(&self, token: &str, bound: Option<Binding>) -> Result<Claims, Refusal> {
        let claims = self.verify(token, bound)?;
        let confirmations = self.events.sessions().confirmations();
        if confirmations.is_confirmed(claims.user, claims.session) {
            return Ok(claims);
        }
        let read_started = std::time::Instant::now();
        let shard = self.map.shard_of_user(claims.user);
        if self
            .read(shard, &revoked_key(claims.user, claims.session))
            .await?
            .is_some()
        {
            return Err(Refusal::new(
                ErrorCode::TokenRevoked,
                "the session was logged out; log in again",
            ));
        }
        confirmations.confirm(claims.user, claims.session, read_started);
        Ok(claims)
    }

    /// Ends a session that was just revoked, and returns once no node can
    /// accept its token any more (see `revocations.rs`).
    async fn end_session(&self, user: UserId, session: u64, reason: Reason) {
        let committed = std::time::Instant::now();
        if !self
            .events
            .session_ended(user, session, reason, TRUST)
            .await
        {
            tokio::time::sleep(TRUST.saturating_sub(committed.elapsed())).await;
        }
    }

    /// Checks a token's signature, expiry and fit to the connection (no
    /// revocation check).
    fn verify(&self, token: &str, bound: Option<Binding>) -> Result<Claims, Refusal> {
        if token.is_empty() {
            return Err(Refusal::new(
                ErrorCode::Unauthenticated,
                "this operation needs a token; log in first",
            ));
        }
        let claims = self
            .tokens
            .verify(token)
            .map_err(|e| Refusal::new(ErrorCode::Unauthenticated, e.to_string()))?;
        if claims.expires_ms <= now_ms() {
            return Err(Refusal::new(
                ErrorCode::TokenExpired,
                "the token has expired; log in again",
            ));
        }
        if let Some(bound) = bound {
            if bound.user != claims.user {
                return Err(Refusal::new(
                    ErrorCode::PermissionDenied,
                    "the token is another user's than this connection's",
                ));
            }
        }
        tracing::Span::current().record("user", claims.user);
        Ok(claims)
    }

    /// Checks what a message to a user and to a group share.
    pub(crate) fn check_message(
        &self,
        body: &[u8],
        client_msg_id: &str,
        content_type: &str,
    ) -> Result<(), Refusal> {
        if body.len() > self.limits.max_body_bytes as usize {
            return Err(Refusal::new(
                ErrorCode::BodyTooLarge,
                format!(
                    "the body has {} bytes; the limit is {}",
                    body.len(),
                    self.limits.max_body_bytes
                ),
            ));
        }
        if client_msg_id.is_empty() || client_msg_id.len() > MAX_CLIENT_MSG_ID {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} bytes"),
            ));
        }
        if content_type.len() > MAX_CONTENT_TYPE {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("content_type has at most {MAX_CONTENT_TYPE} bytes"),
            ));
        }
        Ok(())
    }

    async fn send(
        &self,
        sender: UserId,
        send: wire::SendRequest,
    ) -> Result<response::Body, Refusal> {
        self.check_message(&send.body, &send.client_msg_id, &send.content_type)?;
        let recipient = send.recipient_id;
        if recipient == 0 {
            return Err(refusal_of(CommandError::UnknownUser(0)));
        }
        let command = Command::Send {
            sender,
            client_msg_id: send.client_msg_id,
            recipient,
            body: send.body.clone(),
            content_type: send.content_type.clone(),
            now_ms: now_ms(),
        };
        let shard = self.map.shard_of_user(recipient);
        match self.propose(shard, &command).await? {
            Reply::Sent {
                message_id,
                version,
                timestamp_ms,
                duplicate,
                copy,
            } => {
                if !duplicate {
                    // The recipient's sessions get the entry itself: an
                    // online client needs no Sync to show it.
                    let entry = fishchat_shard::InboxEntry::direct(
                        message_id,
                        sender,
                        recipient,
                        send.body,
                        send.content_type,
                        timestamp_ms,
                    );
                    let entry = placed_entry(entry, recipient, version);
                    self.events.inbox_advanced(recipient, version, Some(entry));
                }
                if let Some(copy) = copy {
                    // Read-your-writes: the sender's copy is in place before
                    // the answer. If that takes too long the request times
                    // out, the courier goes on, and a retry confirms.
                    self.courier.deliver(shard, copy).await.map_err(stopping)?;
                }
                Ok(response::Body::Send(wire::SendResponse {
                    message_id,
                    version,
                    timestamp_ms,
                    duplicate,
                }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn sync(&self, user: UserId, sync: wire::SyncRequest) -> Result<response::Body, Refusal> {
        let limit = match sync.limit {
            0 => self.limits.default_sync_limit,
            n => n.min(self.limits.max_sync_limit),
        } as usize;
        let group = group_of(self.map.shard_of_user(user));
        let budget = (self.limits.max_frame_bytes as usize).saturating_sub(64);
        let mut used = 0usize;
        let mut entries: Vec<wire::InboxEntry> = Vec::with_capacity(limit.min(SYNC_CHUNK));
        // Read in chunks, so memory (and a forwarded answer) stays small
        // whatever the page size; entries never change once written, so
        // chunks read one after another still form one gap-free page.
        let mut since = sync.since;
        let mut at_end = false;
        'page: while entries.len() < limit {
            let (from, to) = inbox_range(user, since);
            let want = (limit - entries.len()).min(SYNC_CHUNK);
            // One more than wanted tells whether the inbox goes on.
            let rows = self.host.scan(group, &from, &to, want + 1).await?;
            if rows.len() <= want {
                at_end = true;
            }
            for (_, value) in rows.iter().take(want) {
                let entry = decode_entry(value)
                    .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))?;
                let cost = entry.body.len() + entry.content_type.len() + ENTRY_OVERHEAD;
                if !entries.is_empty() && used + cost > budget {
                    at_end = false;
                    break 'page;
                }
                used += cost;
                since = entry.version;
                entries.push(to_wire(entry));
            }
            if at_end {
                break;
            }
        }
        let last = entries.last().map(|e| e.version);
        let latest_version = match last {
            // The page reached the end of the inbox: its last entry is the latest.
            Some(last) if at_end => last,
            _ => self.latest_version(user).await?,
        };
        let more = last.unwrap_or(sync.since) < latest_version;
        Ok(response::Body::Sync(wire::SyncResponse {
            entries,
            latest_version,
            more,
        }))
    }

    /// The latest version of `user`'s inbox, read at its shard's leader.
    pub async fn latest_version(&self, user: UserId) -> Result<u64, Refusal> {
        let shard = self.map.shard_of_user(user);
        self.read_u64(shard, &latest_version_key(user)).await
    }

    /// A number stored at `key` in `shard` (0 when absent), read
    /// linearizably at its leader.
    pub(crate) async fn read_u64(&self, shard: u32, key: &[u8]) -> Result<u64, Refusal> {
        match self.read(shard, key).await? {
            None => Ok(0),
            Some(bytes) => {
                decode_u64(&bytes).map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string()))
            }
        }
    }

    async fn account(&self, username: &str) -> Result<Option<Account>, Refusal> {
        let shard = self.map.shard_of_username(username);
        match self.read(shard, &account_key(username)).await? {
            None => Ok(None),
            Some(bytes) => decode_account(&bytes)
                .map(Some)
                .map_err(|e| Refusal::new(ErrorCode::Internal, e.to_string())),
        }
    }

    /// One key of a shard's state, read linearizably at its leader.
    pub(crate) async fn read(&self, shard: u32, key: &[u8]) -> Result<Option<Vec<u8>>, Refusal> {
        Ok(read_key(&self.host, shard, key).await?)
    }

    pub(crate) async fn propose(&self, shard: u32, command: &Command) -> Result<Reply, Refusal> {
        let bytes = self.host.propose(group_of(shard), command.encode()).await?;
        match Reply::decode(&bytes) {
            Ok(Reply::Refused(refusal)) => Err(refusal_of(refusal)),
            Ok(reply) => Ok(reply),
            Err(e) => Err(Refusal::new(ErrorCode::Internal, e.to_string())),
        }
    }
}

/// One key of `shard`'s state, read linearizably at its leader, wherever it is.
pub async fn read_key(
    host: &GroupHost,
    shard: u32,
    key: &[u8],
) -> Result<Option<Vec<u8>>, ReadError> {
    let mut end = key.to_vec();
    end.push(0);
    let rows = host.scan(group_of(shard), key, &end, 1).await?;
    Ok(rows.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
}

/// The client's view of a shard's refusal.
pub(crate) fn refusal_of(error: CommandError) -> Refusal {
    let code = match &error {
        CommandError::UsernameTaken => ErrorCode::UsernameTaken,
        CommandError::InvalidUsername => ErrorCode::InvalidUsername,
        CommandError::UnknownUser(_) => ErrorCode::UnknownUser,
        CommandError::InvalidClientMessageId
        | CommandError::ClientMessageIdReused
        | CommandError::InvalidRequestKey
        | CommandError::InvalidGroupName => ErrorCode::BadRequest,
        CommandError::UnknownGroup(_) => ErrorCode::UnknownGroup,
        CommandError::GroupDissolved(_) => ErrorCode::GroupDissolved,
        CommandError::GroupFull { .. } => ErrorCode::GroupFull,
        CommandError::NotAMember(_) | CommandError::NotAllowed(_) => ErrorCode::PermissionDenied,
        CommandError::WrongShard { .. }
        | CommandError::Malformed(_)
        | CommandError::OutOfOrder { .. } => ErrorCode::Internal,
    };
    Refusal::new(code, error.to_string())
}

/// The answer when the node stops while a committed request waits for its
/// delivery: the outcome is known to the cluster, not yet to the client.
pub(crate) fn stopping(e: crate::courier::Stopped) -> Refusal {
    Refusal::new(ErrorCode::Timeout, e.to_string())
}

pub(crate) fn unexpected(reply: Reply) -> Refusal {
    Refusal::new(
        ErrorCode::Internal,
        format!("the shard answered with an unexpected reply: {reply:?}"),
    )
}

/// `entry` as it stands in `owner`'s inbox at `version`, in the protocol's
/// form, shared by the sessions it is pushed to.
pub fn placed_entry(
    entry: fishchat_shard::InboxEntry,
    owner: UserId,
    version: u64,
) -> crate::news::SharedEntry {
    Arc::new(to_wire(entry.placed(owner, version)))
}

/// A stored inbox entry in the protocol's form.
pub fn to_wire(entry: fishchat_shard::InboxEntry) -> wire::InboxEntry {
    wire::InboxEntry {
        version: entry.version,
        message_id: entry.message_id,
        sender_id: entry.from,
        recipient_id: entry.to,
        body: entry.body,
        content_type: entry.content_type,
        timestamp_ms: entry.timestamp_ms,
        group_id: entry.group,
        group_seq: entry.group_seq,
        group_event: entry.event.map(crate::groups::event_to_wire),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or(0)
}

/// A login's refusal while its name is closed for `wait` (or has as many
/// password checks under way as it may).
fn name_closed(username: &str, wait: Duration) -> Refusal {
    tracing::debug!(
        username,
        wait_ms = duration_ms(wait),
        "login refused: name closed"
    );
    Refusal::new(
        ErrorCode::TooManyRequests,
        "too many wrong passwords for this username; wait and try again",
    )
    .retry_after(wait)
}

/// A login's refusal for a wrong password or a name no account has.
fn wrong_password() -> Refusal {
    Refusal::new(ErrorCode::WrongPassword, "wrong username or password")
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
