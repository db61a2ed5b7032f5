//! Session events across the cluster: "user U's inbox reached version V" and
//! "session S ended", told to this node's sessions and to every peer's.
//!
//! The node that learns of a commit (it proposed the send, or delivered the
//! sender's copy) tells everyone; a node holding none of the user's sessions
//! ignores it. With a handful of nodes this costs one small batched RPC per
//! peer per burst and needs no session directory. Events are hints: a peer
//! that is down or slow loses them, and clients sync on reconnect and on a
//! timer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fishchat_proto::client::kick::Reason;
use fishchat_proto::peer::session_peer_client::SessionPeerClient;
use fishchat_proto::peer::session_peer_server::{SessionPeer, SessionPeerServer};
use fishchat_proto::peer::{InboxAdvanced, SessionEnded, SessionEvents, SessionEventsAck};
use fishchat_shard::UserId;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::sessions::Sessions;

/// Events waiting for one peer; beyond this, new ones are dropped.
const PEER_QUEUE: usize = 16_384;
/// Most events in one RPC.
const BATCH: usize = 1024;
/// How long one RPC may take before its batch is dropped.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

enum Event {
    Advanced(UserId, u64),
    Ended(UserId, u64, Reason),
}

/// Tells this node's and every peer's sessions about commits and revocations.
pub struct Events {
    sessions: Arc<Sessions>,
    peers: Vec<mpsc::Sender<Event>>,
}

impl Events {
    /// Events for `sessions` here and for the nodes at `peer_addrs` (gRPC
    /// `host:port`, this node excluded).
    pub fn new(sessions: Arc<Sessions>, peer_addrs: &[String]) -> Self {
        let peers = peer_addrs
            .iter()
            .filter_map(|addr| {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| tracing::error!(%addr, error = %e, "bad peer address"))
                    .ok()?
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true);
                let (tx, rx) = mpsc::channel(PEER_QUEUE);
                tokio::spawn(forward(SessionPeerClient::new(endpoint.connect_lazy()), rx));
                Some(tx)
            })
            .collect();
        Self { sessions, peers }
    }

    /// `user`'s inbox reached `version` (committed).
    pub fn inbox_advanced(&self, user: UserId, version: u64) {
        self.sessions.inbox_advanced(user, version);
        for peer in &self.peers {
            let _ = peer.try_send(Event::Advanced(user, version));
        }
    }

    /// `session` of `user` was revoked (durably).
    pub fn session_ended(&self, user: UserId, session: u64, reason: Reason) {
        self.sessions.session_ended(user, session, reason);
        for peer in &self.peers {
            let _ = peer.try_send(Event::Ended(user, session, reason));
        }
    }

    /// The gRPC service that receives peers' events.
    pub fn service(sessions: Arc<Sessions>) -> SessionPeerServer<Receiver> {
        SessionPeerServer::new(Receiver { sessions })
    }
}

/// Sends the events queued for one peer, in batches, until the node stops.
async fn forward(mut client: SessionPeerClient<Channel>, mut queue: mpsc::Receiver<Event>) {
    while let Some(first) = queue.recv().await {
        let mut advanced: BTreeMap<UserId, u64> = BTreeMap::new();
        let mut ended = Vec::new();
        let mut add = |event: Event| match event {
            Event::Advanced(user, version) => {
                let latest = advanced.entry(user).or_default();
                *latest = (*latest).max(version);
            }
            Event::Ended(user, session, reason) => ended.push(SessionEnded {
                user_id: user,
                session_id: session,
                reason: reason as i32,
            }),
        };
        add(first);
        let mut taken = 1;
        while taken < BATCH {
            match queue.try_recv() {
                Ok(event) => add(event),
                Err(_) => break,
            }
            taken += 1;
        }
        let batch = SessionEvents {
            advanced: advanced
                .into_iter()
                .map(|(user_id, latest_version)| InboxAdvanced {
                    user_id,
                    latest_version,
                })
                .collect(),
            ended,
        };
        let mut request = tonic::Request::new(batch);
        request.set_timeout(RPC_TIMEOUT);
        if let Err(status) = client.events(request).await {
            tracing::debug!(error = %status, "peer missed session events");
        }
    }
}

/// The receiving side of [`Events`].
pub struct Receiver {
    sessions: Arc<Sessions>,
}

#[tonic::async_trait]
impl SessionPeer for Receiver {
    async fn events(
        &self,
        request: tonic::Request<SessionEvents>,
    ) -> Result<tonic::Response<SessionEventsAck>, tonic::Status> {
        let events = request.into_inner();
        for advanced in events.advanced {
            self.sessions
                .inbox_advanced(advanced.user_id, advanced.latest_version);
        }
        for ended in events.ended {
            // An unknown reason from a newer peer still ends the session.
            let reason = Reason::try_from(ended.reason).unwrap_or(Reason::Unspecified);
            self.sessions
                .session_ended(ended.user_id, ended.session_id, reason);
        }
        Ok(tonic::Response::new(SessionEventsAck {}))
    }
}
