//! Session events across the cluster: "user U's inbox reached version V"
//! (with the entry at V when the teller has it, so a Notify can carry it)
//! and "session S ended", told to this node's sessions and to every peer's.
//!
//! The node that learns of a commit (it proposed the send, or delivered the
//! sender's copy) tells its own sessions and the peers that the session
//! [`Directory`] says may hold one of the user's (every peer whose set it
//! does not know), in one batched RPC per peer per burst. Session ends go to
//! every peer. Events are hints: a peer that is down or slow loses them, and
//! clients sync on reconnect and on a timer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fishchat_proto::client::kick::Reason;
use fishchat_proto::peer::session_peer_client::SessionPeerClient;
use fishchat_proto::peer::session_peer_server::{SessionPeer, SessionPeerServer};
use fishchat_proto::peer::{
    DirectoryAck, DirectoryUpdate, InboxAdvanced, SessionEnded, SessionEvents, SessionEventsAck,
};
use fishchat_raft::ClusterTag;
use fishchat_shard::UserId;
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::directory::{CallOutcome, Directory, KEEPALIVE};
use crate::news::{InboxNews, SharedEntry};
use crate::sessions::Sessions;

/// Events waiting for one peer; beyond this, new ones are dropped.
const PEER_QUEUE: usize = 16_384;
/// Most events in one RPC.
const BATCH: usize = 1024;
/// Tries to deliver a batch that ends sessions (200 ms, 400 ms, … apart).
const ENDED_ATTEMPTS: u32 = 5;
/// Largest session-service message a node takes from a peer.
const MAX_PEER_MESSAGE: usize = 64 << 20;
/// How long one RPC may take before its batch is dropped.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Most entry bytes one RPC carries; later news in the batch goes without
/// its entries (the receiver's clients sync for them).
const BATCH_ENTRY_BYTES: usize = 1 << 20;

enum Event {
    Advanced(UserId, u64, Option<SharedEntry>),
    Ended(UserId, u64, Reason),
}

/// The queues of one peer: inbox events may be dropped when the peer falls
/// behind; session ends (kicks) are never dropped and are retried.
struct PeerQueues {
    node_id: u64,
    advanced: mpsc::Sender<Event>,
    ended: mpsc::UnboundedSender<Event>,
    client: PeerClient,
}

/// The client of a peer's session service; requests carry the cluster tag.
type PeerClient = SessionPeerClient<InterceptedService<Channel, ClusterTag>>;

/// Tells this node's and every peer's sessions about commits and revocations.
pub struct Events {
    sessions: Arc<Sessions>,
    directory: Arc<Directory>,
    peers: Vec<PeerQueues>,
}

impl Events {
    /// Events for `sessions` here and for the peers in `peer_addrs` (node id,
    /// gRPC `host:port`; this node excluded), sent as `directory` says;
    /// requests to them carry `tag`. Also keeps the peers' view of this
    /// node's sessions up to date.
    pub fn new(
        sessions: Arc<Sessions>,
        directory: Arc<Directory>,
        peer_addrs: &[(u64, String)],
        tag: ClusterTag,
    ) -> Self {
        let peers: Vec<PeerQueues> = peer_addrs
            .iter()
            .filter_map(|(node_id, addr)| {
                let index = directory.peers().position(|peer| peer == *node_id);
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| {
                        tracing::error!(%addr, error = %e, "bad peer address");
                        if let Some(index) = index {
                            directory.forsake(index);
                        }
                    })
                    .ok()?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true);
                let (advanced, advanced_rx) = mpsc::channel(PEER_QUEUE);
                let (ended, ended_rx) = mpsc::unbounded_channel();
                let client =
                    SessionPeerClient::with_interceptor(endpoint.connect_lazy(), tag.clone());
                tokio::spawn(forward(client.clone(), advanced_rx, ended_rx));
                if let Some(index) = index {
                    tokio::spawn(tell_directory(directory.clone(), index, client.clone()));
                }
                Some(PeerQueues {
                    node_id: *node_id,
                    advanced,
                    ended,
                    client,
                })
            })
            .collect();
        tokio::spawn({
            let directory = Arc::downgrade(&directory);
            let sessions = Arc::downgrade(&sessions);
            async move {
                let mut tick = tokio::time::interval(KEEPALIVE);
                loop {
                    tick.tick().await;
                    let (Some(directory), Some(sessions)) =
                        (directory.upgrade(), sessions.upgrade())
                    else {
                        return;
                    };
                    let now = std::time::Instant::now();
                    directory.sweep(now, |user| sessions.holds(user));
                    sessions.forget_expected(now);
                }
            }
        });
        Self {
            sessions,
            directory,
            peers,
        }
    }

    /// A login for `user` is under way: this node's table keeps news of
    /// the user for the binding ([`Sessions::expect`]), and every peer is told
    /// that this node holds a session of `user`; returns once the reachable
    /// ones took it (see [`Directory::announce`]).
    pub async fn expect(&self, user: UserId) {
        self.sessions.expect(user);
        self.directory.announce(user).await;
    }

    /// The session directory.
    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// `user`'s inbox reached `version` (committed); `entry` is the entry
    /// at `version`, when the caller has it.
    pub fn inbox_advanced(&self, user: UserId, version: u64, entry: Option<SharedEntry>) {
        for peer in &self.peers {
            if !self.directory.peer_wants(peer.node_id, user) {
                continue;
            }
            let _ = peer
                .advanced
                .try_send(Event::Advanced(user, version, entry.clone()));
        }
        self.sessions.inbox_advanced(user, version, entry);
    }

    /// This node's sessions.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// `session` of `user` was revoked (durably): tells this node and every
    /// peer, and returns whether every peer acknowledged within `within`.
    /// A peer that did not gets the event again from its queue.
    pub async fn session_ended(
        &self,
        user: UserId,
        session: u64,
        reason: Reason,
        within: Duration,
    ) -> bool {
        self.sessions.session_ended(user, session, reason);
        let event = SessionEvents {
            advanced: Vec::new(),
            ended: vec![SessionEnded {
                user_id: user,
                session_id: session,
                reason: reason as i32,
            }],
        };
        let calls = self.peers.iter().map(|peer| {
            let mut client = peer.client.clone();
            let mut request = tonic::Request::new(event.clone());
            request.set_timeout(within);
            async move { client.events(request).await.is_ok() }
        });
        let acked = futures::future::join_all(calls).await;
        for (peer, acked) in self.peers.iter().zip(&acked) {
            if !acked {
                let _ = peer.ended.send(Event::Ended(user, session, reason));
            }
        }
        acked.iter().all(|a| *a)
    }

    /// The gRPC service that receives peers' events.
    pub fn service(
        sessions: Arc<Sessions>,
        directory: Arc<Directory>,
    ) -> SessionPeerServer<Receiver> {
        // A whole directory is about 9 bytes a user: room for millions.
        SessionPeerServer::new(Receiver {
            sessions,
            directory,
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
    }
}

/// Sends the events queued for one peer, in batches, until the node stops.
async fn forward(
    mut client: PeerClient,
    mut advanced_queue: mpsc::Receiver<Event>,
    mut ended_queue: mpsc::UnboundedReceiver<Event>,
) {
    loop {
        let first = tokio::select! {
            biased;
            event = ended_queue.recv() => event,
            event = advanced_queue.recv() => event,
        };
        let Some(first) = first else { return };
        let mut advanced: BTreeMap<UserId, InboxNews> = BTreeMap::new();
        let mut entry_bytes = 0usize;
        let mut ended = Vec::new();
        let mut add = |event: Event| match event {
            Event::Advanced(user, version, entry) => {
                let entry = entry.filter(|e| {
                    entry_bytes += prost::Message::encoded_len(&**e);
                    entry_bytes <= BATCH_ENTRY_BYTES
                });
                advanced.entry(user).or_default().add(version, entry);
            }
            Event::Ended(user, session, reason) => ended.push(SessionEnded {
                user_id: user,
                session_id: session,
                reason: reason as i32,
            }),
        };
        add(first);
        while let Ok(event) = ended_queue.try_recv() {
            add(event);
        }
        for _ in 1..BATCH {
            match advanced_queue.try_recv() {
                Ok(event) => add(event),
                Err(_) => break,
            }
        }
        let mut batch = SessionEvents {
            advanced: advanced
                .into_iter()
                .map(|(user_id, news)| InboxAdvanced {
                    user_id,
                    latest_version: news.latest(),
                    entries: news.entries().map(|e| (**e).clone()).collect(),
                })
                .collect(),
            ended,
        };
        // Inbox events are hints and go once; session ends are retried while
        // the peer is briefly unreachable (one that is down has no sessions).
        for attempt in 0..ENDED_ATTEMPTS {
            let mut request = tonic::Request::new(batch.clone());
            request.set_timeout(RPC_TIMEOUT);
            match client.events(request).await {
                Ok(_) => break,
                Err(status) => {
                    tracing::debug!(error = %status, attempt, "peer missed session events");
                    if batch.ended.is_empty() {
                        break;
                    }
                    batch.advanced.clear();
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }
}

/// Sends the peer at `index` of `directory` this node's session directory,
/// until the node stops.
async fn tell_directory(directory: Arc<Directory>, index: usize, client: PeerClient) {
    directory
        .run_link(index, |update| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(update);
                request.set_timeout(RPC_TIMEOUT);
                match client.directory(request).await {
                    Ok(ack) => CallOutcome::Taken(ack.into_inner()),
                    Err(status) => {
                        tracing::debug!(error = %status, "peer missed a directory update");
                        CallOutcome::Failed
                    }
                }
            }
        })
        .await;
}

/// The receiving side of [`Events`].
pub struct Receiver {
    sessions: Arc<Sessions>,
    directory: Arc<Directory>,
}

#[tonic::async_trait]
impl SessionPeer for Receiver {
    async fn events(
        &self,
        request: tonic::Request<SessionEvents>,
    ) -> Result<tonic::Response<SessionEventsAck>, tonic::Status> {
        let events = request.into_inner();
        let received = u64::try_from(events.advanced.len()).unwrap_or(u64::MAX);
        self.directory
            .stats()
            .events_received
            .fetch_add(received, std::sync::atomic::Ordering::Relaxed);
        for advanced in events.advanced {
            let user = advanced.user_id;
            for entry in advanced.entries {
                self.sessions
                    .inbox_advanced(user, entry.version, Some(Arc::new(entry)));
            }
            self.sessions
                .inbox_advanced(user, advanced.latest_version, None);
        }
        for ended in events.ended {
            // An unknown reason from a newer peer still ends the session.
            let reason = Reason::try_from(ended.reason).unwrap_or(Reason::Unspecified);
            self.sessions
                .session_ended(ended.user_id, ended.session_id, reason);
        }
        Ok(tonic::Response::new(SessionEventsAck {}))
    }

    async fn directory(
        &self,
        request: tonic::Request<DirectoryUpdate>,
    ) -> Result<tonic::Response<DirectoryAck>, tonic::Status> {
        Ok(tonic::Response::new(
            self.directory.receive(request.into_inner()),
        ))
    }
}
