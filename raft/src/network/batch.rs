//! Appends to one peer, batched across groups, over one stream.
//!
//! Every group replicates to a peer on its own, so with many groups a busy
//! node sends many small appends to each peer. They all travel on one
//! long-lived `AppendStream` per peer: a stream message costs an HTTP/2
//! data frame, where a request of its own would cost a new HTTP/2 stream,
//! headers both ways, trailers and a task on the receiver. One message is
//! unanswered at a time; small appends that arrive meanwhile wait and go
//! together in the next message when it is answered. An append that finds
//! the stream idle goes at once, alone, so a quiet cluster waits for
//! nothing. A large append (a follower catching up) goes as an `Append`
//! request of its own at once, so it never holds up other groups' appends
//! and heartbeats. The receiver hands each append of a message to its
//! group as if it had come alone and answers them in order.
//!
//! A message not answered within the shortest deadline of its appends, or
//! a stream that breaks, fails every append it carried (openraft retries
//! them) and closes the stream; the next message opens a new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fishchat_proto::peer::{RaftMessage, RaftMessages, RaftReplies, RaftReply};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{ClusterTag, PeerClient};

/// Most appends in one stream message; a receiver refuses more.
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
    /// Append exchanges with peers: `Append` requests and `AppendStream`
    /// messages.
    pub append_rpcs: AtomicU64,
    /// Appends those exchanges carried.
    pub appends: AtomicU64,
}

impl PeerStats {
    /// Average number of appends one exchange carried.
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
    client: PeerClient,
    stats: Arc<PeerStats>,
}

impl AppendQueue {
    /// Starts sending appends to the peer behind `client`, counting them
    /// in `stats`. `tag` is the cluster tag `client` sends.
    pub(crate) fn start(client: PeerClient, stats: Arc<PeerStats>, tag: ClusterTag) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        tokio::spawn(pump(client.clone(), waiting, stats.clone(), tag));
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
            send_alone(self.client.clone(), queued).await;
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

/// Takes the waiting appends whenever the stream is free and sends them.
async fn pump(
    client: PeerClient,
    mut waiting: mpsc::Receiver<Queued>,
    stats: Arc<PeerStats>,
    tag: ClusterTag,
) {
    let mut stream: Option<AppendStream> = None;
    loop {
        let first = match stream.as_mut() {
            // Nothing is unanswered on an idle stream: anything arriving on
            // it means the peer ended it (it is stopping) or it broke. Drop
            // it then, so the peer's shutdown need not wait for this end.
            Some(open) => tokio::select! {
                next = waiting.recv() => next,
                _ = open.answers.message() => {
                    stream = None;
                    continue;
                }
            },
            None => waiting.recv().await,
        };
        let Some(first) = first else { return };
        let mut bytes = first.message.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Ok(next) = waiting.try_recv() else { break };
            bytes += next.message.payload.len();
            batch.push(next);
        }
        count(&stats, batch.len());
        let ttl = batch
            .iter()
            .map(|q| q.ttl)
            .min()
            .unwrap_or(Duration::from_secs(1));
        let (messages, answers): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (q.message, q.answer)).unzip();
        let sent = messages.len();
        // A stream opened before this node knew its cluster carries no tag
        // (it went with the opening headers): open a tagged one.
        let tagged = tag.is_set();
        if stream.as_ref().is_some_and(|open| open.tagged != tagged) {
            stream = None;
        }
        let exchange = exchange(&client, &mut stream, tagged, RaftMessages { messages });
        let outcome = match tokio::time::timeout(ttl, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Status::cancelled(
                "the peer did not answer the appends in time",
            )),
        };
        match outcome {
            Ok(replies) if replies.replies.len() == sent => {
                for (answer, reply) in answers.into_iter().zip(replies.replies) {
                    let _ = answer.send(Ok(reply));
                }
            }
            Ok(replies) => {
                stream = None;
                let status = Status::internal(format!(
                    "the peer answered {} appends of {sent}",
                    replies.replies.len()
                ));
                fail(answers, &status);
            }
            Err(status) => {
                // The stream may still carry a late answer: never reuse it.
                stream = None;
                fail(answers, &status);
            }
        }
    }
}

/// One open `AppendStream`: where its messages go and where answers come.
struct AppendStream {
    outgoing: mpsc::Sender<RaftMessages>,
    answers: Streaming<RaftReplies>,
    /// Whether it was opened with this node's cluster tag.
    tagged: bool,
}

/// Sends `messages` on the stream, opening one first if there is none
/// (`tagged`: the client's cluster tag is set), and waits for the answer.
/// On an error the caller drops the stream.
async fn exchange(
    client: &PeerClient,
    stream: &mut Option<AppendStream>,
    tagged: bool,
    messages: RaftMessages,
) -> Result<RaftReplies, Status> {
    let open = match stream {
        Some(open) => open,
        None => {
            let (outgoing, queued) = mpsc::channel(1);
            let answers = client
                .clone()
                .append_stream(ReceiverStream::new(queued))
                .await?
                .into_inner();
            stream.insert(AppendStream {
                outgoing,
                answers,
                tagged,
            })
        }
    };
    open.outgoing
        .send(messages)
        .await
        .map_err(|_| Status::unavailable("the append stream to the peer closed"))?;
    open.answers
        .message()
        .await?
        .ok_or_else(|| Status::unavailable("the peer ended the append stream"))
}

/// Hands every caller the failure of the exchange that carried its append.
fn fail(answers: Vec<oneshot::Sender<Result<RaftReply, Status>>>, status: &Status) {
    for answer in answers {
        let _ = answer.send(Err(status.clone()));
    }
}

/// Counts one append RPC carrying `appends` appends.
fn count(stats: &PeerStats, appends: usize) {
    stats.append_rpcs.fetch_add(1, Ordering::Relaxed);
    stats.appends.fetch_add(appends as u64, Ordering::Relaxed);
}

/// Sends one large append as an `Append` request of its own.
async fn send_alone(mut client: PeerClient, one: Queued) {
    let mut request = tonic::Request::new(one.message);
    request.set_timeout(one.ttl);
    let reply = client.append(request).await.map(|r| r.into_inner());
    let _ = one.answer.send(reply);
}
