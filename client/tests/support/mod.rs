//! A fake FishChat cluster for the SDK's tests: real QUIC and TLS (test
//! keys in `tests/data`), the real framing, and an in-memory stand-in for the
//! chat logic shared by any number of fake nodes, with faults on demand.
//!
//! It speaks just enough of docs/protocol.md to exercise the client:
//! register, login (with push stream and first Notify), logout, lookup,
//! ping, send (with client_msg_id dedup), sync (paged), and the group
//! operations (`groups.rs`).

#![allow(dead_code)]

mod groups;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fishchat_client::proto::{
    kick, push, request, response, Error, ErrorCode, InboxEntry, Kick, LoginResponse,
    LogoutResponse, LookupResponse, Notify, PingResponse, Push, RegisterResponse, Request,
    Response, SendResponse, ServerLimits, SyncResponse,
};
use fishchat_client::{Client, ClientConfig, ClientError, ALPN};
use fishchat_proto::frame::{self, FrameError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

pub const CA_PEM: &[u8] = include_bytes!("../data/ca.pem");
pub const OTHER_CA_PEM: &[u8] = include_bytes!("../data/other_ca.pem");
const NODE_PEM: &[u8] = include_bytes!("../data/node.pem");
const NODE_KEY: &[u8] = include_bytes!("../data/node.key");
const MAX_FRAME: u32 = 1 << 20;
const PAGE: usize = 3;

/// What the next request (whatever it is, but a Ping: the client's liveness
/// probes must not take faults meant for the request they watch) meets
/// instead of a normal answer.
pub enum Fault {
    /// Answered with this error.
    Answer(Error),
    /// Never answered; the stream is left open until the client gives up.
    Silence,
    /// Carried out as usual, but the answer is lost: never sent, as if the
    /// node crashed after committing.
    AnswerLost,
}

/// A retryable error as the server would send it.
pub fn unavailable() -> Fault {
    Fault::Answer(Error {
        code: ErrorCode::Unavailable as i32,
        message: "no leader".into(),
        retryable: true,
        retry_after_ms: 0,
    })
}

#[derive(Default)]
struct World {
    users: Vec<(String, String)>,
    tokens: HashMap<String, u64>,
    revoked: HashSet<String>,
    inboxes: HashMap<u64, Vec<InboxEntry>>,
    sent: HashMap<(u64, String), SendResponse>,
    groups: groups::Groups,
    next_message_id: u64,
    pushes: HashMap<u64, Vec<mpsc::Sender<Push>>>,
    faults: VecDeque<Fault>,
    seen: Vec<(SocketAddr, Request)>,
    client_addrs: Vec<String>,
    clock: u64,
    /// Nodes that answer nothing at all and close nothing (frozen or cut off).
    frozen: HashSet<SocketAddr>,
    /// Notifies carry the new entry, as the real server's do.
    push_entries: bool,
    /// Appends whose notify is lost.
    notifies_to_lose: usize,
}

/// The shared state of a fake cluster.
#[derive(Clone, Default)]
pub struct FakeCluster {
    world: Arc<Mutex<World>>,
}

impl FakeCluster {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next requests meet `faults`, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.world().faults.extend(faults);
    }

    /// Every request received so far, with the node that received it.
    pub fn seen(&self) -> Vec<(SocketAddr, Request)> {
        self.world().seen.clone()
    }

    /// The `client_msg_id`s of every Send received, retries included.
    pub fn sends_seen(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|(_, r)| match r.body {
                Some(request::Body::Send(s)) => Some(s.client_msg_id),
                _ => None,
            })
            .collect()
    }

    /// The requests of one kind received so far, retries included, in
    /// order: `pick` chooses the kind.
    pub fn requests<T>(&self, pick: impl Fn(request::Body) -> Option<T>) -> Vec<T> {
        self.seen()
            .into_iter()
            .filter_map(|(_, r)| r.body.and_then(&pick))
            .collect()
    }

    /// Makes every later Notify carry the entry that caused it.
    pub fn push_entries(&self) {
        self.world().push_entries = true;
    }

    /// Loses the notifies of the next `count` appends to any inbox.
    pub fn lose_notifies(&self, count: usize) {
        self.world().notifies_to_lose = count;
    }

    /// Lowers the largest group size (owner included; default 1000).
    pub fn set_max_group_size(&self, members: usize) {
        self.world().groups.max_members = members;
    }

    /// Revokes `token`, as a logout elsewhere would.
    pub fn revoke(&self, token: &str) {
        self.world().revoked.insert(token.to_string());
    }

    /// Makes `node` answer nothing from now on, without closing anything:
    /// to the client it looks like a killed process or a cut cable.
    pub fn freeze(&self, node: &FakeNode) {
        self.world().frozen.insert(node.addr());
    }

    /// The addresses Login answers with.
    pub fn set_client_addrs(&self, addrs: Vec<String>) {
        self.world().client_addrs = addrs;
    }

    /// Starts one fake node on 127.0.0.1.
    pub async fn start_node(&self) -> FakeNode {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(NODE_PEM)
            .collect::<Result<_, _>>()
            .expect("test cert");
        let key = PrivateKeyDer::from_pem_slice(NODE_KEY).expect("test key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("cert and key");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint =
            quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = endpoint.local_addr().expect("local addr");
        let accepting = endpoint.clone();
        let cluster = self.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let cluster = cluster.clone();
                tokio::spawn(async move {
                    if let Ok(connection) = incoming.await {
                        cluster.serve(connection, addr).await;
                    }
                });
            }
        });
        FakeNode { endpoint, addr }
    }

    /// A client configuration for `nodes`, with short timeouts.
    pub fn config(&self, nodes: &[&FakeNode]) -> ClientConfig {
        let mut config =
            ClientConfig::new(nodes.iter().map(|n| n.address()).collect(), CA_PEM.to_vec());
        config.request_timeout = Duration::from_millis(500);
        config.connect_timeout = Duration::from_secs(2);
        config.retry_deadline = Duration::from_secs(8);
        config.sync_interval = Duration::from_millis(300);
        config
    }

    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().expect("world lock")
    }

    async fn serve(&self, connection: quinn::Connection, node: SocketAddr) {
        let bound: Arc<Mutex<Option<u64>>> = Arc::default();
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            let cluster = self.clone();
            let connection = connection.clone();
            let bound = bound.clone();
            tokio::spawn(async move {
                let response = match frame::read_payload(&mut recv, MAX_FRAME).await {
                    Err(FrameError::TooLarge { .. }) => {
                        let _ = recv.stop(0u32.into());
                        error(0, ErrorCode::FrameTooLarge, false)
                    }
                    Err(_) | Ok(None) => return,
                    Ok(Some(payload)) => match <Request as prost::Message>::decode(&payload[..]) {
                        Err(_) => error(0, ErrorCode::MalformedFrame, false),
                        Ok(request) => match cluster.answer(request, node, &connection, &bound) {
                            Some(response) => response,
                            None => {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                return;
                            }
                        },
                    },
                };
                let _ = frame::write(&mut send, &response).await;
                let _ = send.finish();
                let _ = send.stopped().await;
            });
        }
    }

    /// The answer to `request`, or `None` for silence.
    fn answer(
        &self,
        request: Request,
        node: SocketAddr,
        connection: &quinn::Connection,
        bound: &Mutex<Option<u64>>,
    ) -> Option<Response> {
        let id = request.request_id;
        let mut world = self.world();
        world.seen.push((node, request.clone()));
        if world.frozen.contains(&node) {
            return None;
        }
        let mut answer_lost = false;
        let probe = matches!(request.body, Some(request::Body::Ping(_)));
        match if probe {
            None
        } else {
            world.faults.pop_front()
        } {
            Some(Fault::Silence) => return None,
            Some(Fault::AnswerLost) => answer_lost = true,
            Some(Fault::Answer(e)) => {
                return Some(Response {
                    request_id: id,
                    body: Some(response::Body::Error(e)),
                })
            }
            None => {}
        }
        let user = world.tokens.get(&request.token).copied();
        let token_ok = user.is_some() && !world.revoked.contains(&request.token);
        let body = match request.body {
            None => return Some(error(id, ErrorCode::BadRequest, false)),
            Some(request::Body::Ping(p)) => response::Body::Ping(PingResponse {
                nonce: p.nonce,
                server_time_ms: 1_700_000_000_000,
            }),
            Some(request::Body::Register(r)) => {
                if world
                    .users
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case(&r.username))
                {
                    return Some(error(id, ErrorCode::UsernameTaken, false));
                }
                world.users.push((r.username, r.password));
                response::Body::Register(RegisterResponse {
                    user_id: world.users.len() as u64,
                })
            }
            Some(request::Body::Login(l)) => {
                let found = world
                    .users
                    .iter()
                    .position(|(n, p)| n.eq_ignore_ascii_case(&l.username) && *p == l.password);
                let Some(index) = found else {
                    return Some(error(id, ErrorCode::WrongPassword, false));
                };
                let user_id = index as u64 + 1;
                let token = format!("token-{user_id}-{}", world.tokens.len());
                world.tokens.insert(token.clone(), user_id);
                response::Body::Login(bind(&mut world, bound, connection, user_id, token))
            }
            Some(_) if !token_ok => {
                let code = if world.revoked.contains(&request.token) {
                    ErrorCode::TokenRevoked
                } else {
                    ErrorCode::Unauthenticated
                };
                return Some(error(id, code, false));
            }
            Some(request::Body::Resume(_)) => {
                let user_id = user.unwrap_or(0);
                let token = request.token.clone();
                response::Body::Resume(bind(&mut world, bound, connection, user_id, token))
            }
            Some(request::Body::Logout(_)) => {
                world.revoked.insert(request.token.clone());
                response::Body::Logout(LogoutResponse {})
            }
            Some(request::Body::Lookup(l)) => {
                let found = world
                    .users
                    .iter()
                    .position(|(n, _)| n.eq_ignore_ascii_case(&l.username));
                match found {
                    Some(i) => response::Body::Lookup(LookupResponse {
                        user_id: i as u64 + 1,
                        username: world.users[i].0.clone(),
                    }),
                    None => return Some(error(id, ErrorCode::UnknownUser, false)),
                }
            }
            Some(request::Body::Send(s)) => {
                let sender = user.unwrap_or(0);
                if s.recipient_id == 0 || s.recipient_id > world.users.len() as u64 {
                    return Some(error(id, ErrorCode::UnknownUser, false));
                }
                let key = (sender, s.client_msg_id.clone());
                if let Some(first) = world.sent.get(&key) {
                    let mut again = *first;
                    again.duplicate = true;
                    response::Body::Send(again)
                } else {
                    let (message_id, timestamp_ms) = world.next_message();
                    let entry = InboxEntry {
                        version: 0,
                        message_id,
                        sender_id: sender,
                        recipient_id: s.recipient_id,
                        body: s.body.clone(),
                        content_type: s.content_type.clone(),
                        timestamp_ms,
                        group_id: 0,
                        group_seq: 0,
                        group_event: None,
                    };
                    let version = world.append(s.recipient_id, entry.clone());
                    if sender != s.recipient_id {
                        world.append(sender, entry);
                    }
                    let answer = SendResponse {
                        message_id,
                        version,
                        timestamp_ms,
                        duplicate: false,
                    };
                    world.sent.insert(key, answer);
                    response::Body::Send(answer)
                }
            }
            Some(request::Body::Sync(s)) => {
                let inbox = world.inboxes.get(&user.unwrap_or(0));
                let all = inbox.map_or(&[][..], |i| &i[..]);
                let latest = all.len() as u64;
                let start = (s.since.min(latest)) as usize;
                let page = match s.limit {
                    0 => PAGE,
                    limit => (limit as usize).min(PAGE),
                };
                let entries: Vec<InboxEntry> = all[start..].iter().take(page).cloned().collect();
                let last = entries.last().map_or(s.since, |e| e.version);
                response::Body::Sync(SyncResponse {
                    entries,
                    latest_version: latest,
                    more: last < latest,
                })
            }
            Some(group_request) => {
                match groups::answer(&mut world, user.unwrap_or(0), group_request) {
                    Ok(body) => body,
                    Err(code) => return Some(error(id, code, false)),
                }
            }
        };
        if answer_lost {
            return None;
        }
        Some(Response {
            request_id: id,
            body: Some(body),
        })
    }

    /// Ends every session of `user_id` with `reason`, as the server does.
    pub fn kick(&self, user_id: u64, reason: kick::Reason) {
        let senders = self.world().pushes.remove(&user_id).unwrap_or_default();
        for tx in senders {
            let _ = tx.try_send(Push {
                body: Some(push::Body::Kick(Kick {
                    reason: reason as i32,
                    message: "kicked by the test".into(),
                })),
            });
        }
    }
}

impl World {
    /// Appends `entry` to `owner`'s inbox under the next version, notifies
    /// `owner`'s sessions, and returns the version.
    fn append(&mut self, owner: u64, mut entry: InboxEntry) -> u64 {
        let inbox = self.inboxes.entry(owner).or_default();
        let version = inbox.len() as u64 + 1;
        entry.version = version;
        inbox.push(entry.clone());
        if self.notifies_to_lose > 0 {
            self.notifies_to_lose -= 1;
            return version;
        }
        let mut push = notify(version);
        if let Some(push::Body::Notify(notify)) = &mut push.body {
            if self.push_entries {
                notify.entries.push(entry);
            }
        }
        for tx in self.pushes.get(&owner).into_iter().flatten() {
            let _ = tx.try_send(push.clone());
        }
        version
    }

    /// The username of `user_id`, if it exists.
    fn username(&self, user_id: u64) -> Option<&str> {
        let index = usize::try_from(user_id.checked_sub(1)?).ok()?;
        self.users.get(index).map(|(name, _)| name.as_str())
    }

    /// A fresh message id and timestamp.
    fn next_message(&mut self) -> (u64, u64) {
        self.next_message_id += 1;
        self.clock += 1;
        (self.next_message_id, 1_700_000_000_000 + self.clock)
    }
}

/// One fake node: a QUIC endpoint serving the shared cluster state.
pub struct FakeNode {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

impl FakeNode {
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the node as a crash would look from the client: every
    /// connection closes (code 0, no reason) and nothing answers any more.
    pub fn kill(&self) {
        self.endpoint.close(0u32.into(), b"killed");
    }
}

/// Binds the connection to `user_id` after a Login or Resume (the first
/// binding opens the push stream) and answers with `token`.
fn bind(
    world: &mut World,
    bound: &Mutex<Option<u64>>,
    connection: &quinn::Connection,
    user_id: u64,
    token: String,
) -> LoginResponse {
    let first_binding = bound.lock().expect("bound").replace(user_id).is_none();
    if first_binding {
        let (tx, rx) = mpsc::channel(64);
        let latest = world.inboxes.get(&user_id).map_or(0, |i| i.len() as u64);
        let _ = tx.try_send(notify(latest));
        world.pushes.entry(user_id).or_default().push(tx);
        tokio::spawn(write_pushes(connection.clone(), rx));
    }
    LoginResponse {
        token,
        user_id,
        expires_at_ms: u64::MAX,
        client_addrs: world.client_addrs.clone(),
        limits: Some(ServerLimits {
            max_frame_bytes: MAX_FRAME,
            max_body_bytes: 65536,
            max_requests_in_flight: 16,
            max_sync_limit: 1000,
        }),
    }
}

fn error(request_id: u64, code: ErrorCode, retryable: bool) -> Response {
    Response {
        request_id,
        body: Some(response::Body::Error(Error {
            code: code as i32,
            message: format!("{code:?}"),
            retryable,
            retry_after_ms: 0,
        })),
    }
}

fn notify(latest_version: u64) -> Push {
    Push {
        body: Some(push::Body::Notify(Notify {
            latest_version,
            entries: Vec::new(),
        })),
    }
}

async fn write_pushes(connection: quinn::Connection, mut rx: mpsc::Receiver<Push>) {
    let Ok(mut stream) = connection.open_uni().await else {
        return;
    };
    while let Some(push) = rx.recv().await {
        let kick_code = match &push.body {
            Some(push::Body::Kick(k)) => Some(k.reason),
            _ => None,
        };
        if frame::write(&mut stream, &push).await.is_err() {
            return;
        }
        if let Some(code) = kick_code {
            let _ = stream.finish();
            tokio::time::sleep(Duration::from_millis(100)).await;
            connection.close((code as u32).into(), b"kicked");
            return;
        }
    }
}

/// A client connected with `config` and logged in as `name` (registered
/// first unless the name exists already), password "password1".
pub async fn logged_in(config: ClientConfig, name: &str) -> Client {
    let client = Client::connect(config).await.expect("connect");
    match client.register(name, "password1").await {
        Ok(_)
        | Err(ClientError::Server {
            code: ErrorCode::UsernameTaken,
            ..
        }) => {}
        Err(e) => panic!("register {name}: {e}"),
    }
    client.login(name, "password1", None).await.expect("login");
    client
}
