//! Appends to one peer, batched across groups.
//!
//! Every group replicates to a peer on its own, so with many groups a busy
//! node sends many small append RPCs to each peer, each with its own HTTP/2
//! stream, headers and wake-ups. Here one small-append RPC to a peer is
//! unanswered at a time ([`IN_FLIGHT`]); small appends that arrive meanwhile
//! wait and go together, as one `AppendBatch` RPC, when it is answered. An
//! append that finds the peer idle goes at once, alone, so a quiet cluster
//! waits for nothing. A large append (a follower catching up) goes on its
//! own RPC at once, so it never holds up other groups' appends and
//! heartbeats. The receiver hands each message to its group as if it had
//! come alone and answers them in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fishchat_proto::peer::raft_peer_client::RaftPeerClient;
use fishchat_proto::peer::{RaftMessage, RaftMessages, RaftReply};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::transport::Channel;
use tonic::Status;

/// Small-append RPCs to one peer that may be unanswered at once (1, 2 and
/// 4 measured: docs/decisions.md, "Appends to a peer share RPCs").
pub(crate) const IN_FLIGHT: usize = 1;
/// Most messages in one batch; a receiver refuses more.
pub(crate) const MAX_BATCH: usize = 64;
/// An append with a larger payload goes alone, at once.
const SMALL_APPEND_BYTES: usize = 64 * 1024;
/// Most payload bytes in one batch.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Appends waiting for one peer; a caller beyond this waits to queue.
const QUEUE: usize = 1024;

/// Counters an operator (or a test) reads to see appends batched.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Append RPCs sent to peers (`Append` and `AppendBatch`).
    pub append_rpcs: AtomicU64,
    /// Appends those RPCs carried.
    pub appends: AtomicU64,
}

impl PeerStats {
    /// Average number of appends one RPC carried.
    pub fn appends_per_rpc(&self) -> f64 {
        let rpcs = self.append_rpcs.load(Ordering::Relaxed);
        if rpcs == 0 {
            return 0.0;
        }
        self.appends.load(Ordering::Relaxed) as f64 / rpcs as f64
    }
}

/// An append waiting for its turn.
struct Queued {
    message: RaftMessage,
    ttl: Duration,
    answer: oneshot::Sender<Result<RaftReply, Status>>,
}

/// The queue of appends to one peer; the task that sends them ends when
/// every handle is dropped.
#[derive(Clone)]
pub(crate) struct AppendQueue {
    queue: mpsc::Sender<Queued>,
    client: RaftPeerClient<Channel>,
    stats: Arc<PeerStats>,
}

impl AppendQueue {
    /// Starts sending appends to the peer behind `client`, counting them
    /// in `stats`.
    pub(crate) fn start(client: RaftPeerClient<Channel>, stats: Arc<PeerStats>) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(pump(client.clone(), waiting, stats.clone()));
        Self {
            queue,
            client,
            stats,
        }
    }

    /// Sends `message` (an append for one group) and waits for its reply,
    /// at most `ttl` once it is on the wire.
    pub(crate) async fn append(
        &self,
        message: RaftMessage,
        ttl: Duration,
    ) -> Result<RaftReply, Status> {
        let (answer, reply) = oneshot::channel();
        let queued = Queued {
            message,
            ttl,
            answer,
        };
        if queued.message.payload.len() > SMALL_APPEND_BYTES {
            count(&self.stats, 1);
            send(self.client.clone(), vec![queued]).await;
            return reply
                .await
                .map_err(|_| Status::unavailable("the append was dropped unsent"))?;
        }
        self.queue
            .send(queued)
            .await
            .map_err(|_| Status::unavailable("the append queue to the peer stopped"))?;
        reply
            .await
            .map_err(|_| Status::unavailable("the append was dropped unsent"))?
    }
}

/// Takes the waiting appends whenever a slot is free and sends them.
async fn pump(
    client: RaftPeerClient<Channel>,
    mut waiting: mpsc::Receiver<Queued>,
    stats: Arc<PeerStats>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.message.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(next) = waiting.try_recv() else { break };
            bytes += next.message.payload.len();
            batch.push(next);
        }
        count(&stats, batch.len());
        let client = client.clone();
        tokio::spawn(async move {
            send(client, batch).await;
            drop(slot);
        });
    }
}

/// Counts one append RPC carrying `appends` appends.
fn count(stats: &PeerStats, appends: usize) {
    stats.append_rpcs.fetch_add(1, Ordering::Relaxed);
    stats.appends.fetch_add(appends as u64, Ordering::Relaxed);
}

/// Sends one batch (a lone append as a plain `Append`) and hands each
/// caller its reply, or the failure of the whole call.
async fn send(mut client: RaftPeerClient<Channel>, mut batch: Vec<Queued>) {
    let ttl = batch
        .iter()
        .map(|q| q.ttl)
        .min()
        .unwrap_or(Duration::from_secs(1));
    if batch.len() == 1 {
        if let Some(one) = batch.pop() {
            let mut request = tonic::Request::new(one.message);
            request.set_timeout(ttl);
            let reply = client.append(request).await.map(|r| r.into_inner());
            let _ = one.answer.send(reply);
        }
        return;
    }
    let (messages, answers): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.message, q.answer)).unzip();
    let mut request = tonic::Request::new(RaftMessages { messages });
    request.set_timeout(ttl);
    match client.append_batch(request).await {
        Ok(replies) => {
            let mut replies = replies.into_inner().replies.into_iter();
            for answer in answers {
                let reply = replies
                    .next()
                    .ok_or_else(|| Status::internal("the peer answered fewer appends than sent"));
                let _ = answer.send(reply);
            }
        }
        Err(status) => {
            for answer in answers {
                let _ = answer.send(Err(status.clone()));
            }
        }
    }
}
