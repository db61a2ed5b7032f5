//! Batching a group's writes into Raft entries.
//!
//! openraft gives every `client_write` an entry of its own: one log record,
//! one entry to encode and replicate, one apply and one commit record per
//! command. (openraft 0.9, which FishChat first ran on, also waited for each
//! append's fsync before taking the next, which capped a group at one
//! command per disk sync.)
//!
//! A [`Proposer`] sits in front of each group. Writers queue their command
//! and wait for its answer; the proposer's task takes everything waiting,
//! proposes it as one [`Batch`] entry, and hands each writer its own
//! response. At most [`MAX_BATCHES_IN_FLIGHT`] entries of a group are
//! between proposal and answer at once, so commands that arrive meanwhile
//! wait in the queue and leave together in the next entry. Idle, a command
//! leaves at once, alone: batching adds no latency to a lone writer.
//!
//! The queue is bounded; a full queue pushes back on writers. Batches are
//! handed to openraft in queue order, so commands keep the order they were
//! queued in.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::WriteError;
use crate::local::hint;
use crate::types::{Batch, Command, GroupId, Raft};

/// Most entries of one group proposed and not yet answered. Two lets the
/// next batch's append overlap the previous one's replication and apply.
pub(crate) const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Most commands waiting for one group before writers are pushed back.
const QUEUE_BOUND: usize = 4096;
/// Most commands in one entry.
const MAX_BATCH_COMMANDS: usize = 1024;

/// A queued command and where its answer goes.
struct Pending {
    command: Vec<u8>,
    answer: oneshot::Sender<Result<Vec<u8>, WriteError>>,
}

/// The write queue of one group; see the module documentation. The task
/// behind it ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Proposer {
    group: GroupId,
    queue: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the proposer of `group`. Batches hold at most `max_batch_bytes`
    /// of commands (a single larger command goes alone); an entry's answer
    /// is awaited at most `timeout`.
    pub(crate) fn start(
        group: GroupId,
        raft: Raft,
        max_batch_bytes: usize,
        timeout: Duration,
    ) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE_BOUND);
        let run = Run {
            group,
            raft,
            max_batch_bytes,
            timeout,
            in_flight: Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT)),
        };
        tokio::spawn(run.serve(waiting));
        Self { group, queue }
    }

    /// Queues `command` and waits for its state machine's answer. The
    /// caller bounds the wait; a command whose caller gave up may still be
    /// committed.
    pub(crate) async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, WriteError> {
        let stopped = || WriteError::Stopped {
            group: self.group,
            detail: "the group's proposer has stopped".into(),
        };
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Pending { command, answer })
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// The proposer task's state.
struct Run {
    group: GroupId,
    raft: Raft,
    max_batch_bytes: usize,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl Run {
    async fn serve(self, mut waiting: mpsc::Receiver<Pending>) {
        let mut next: Option<Pending> = None;
        loop {
            // A slot first: while every slot is taken, commands gather in
            // the queue and leave together.
            let Ok(slot) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            let first = match next.take() {
                Some(pending) => pending,
                None => match waiting.recv().await {
                    Some(pending) => pending,
                    None => return,
                },
            };
            let mut bytes = first.command.len();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_COMMANDS {
                match waiting.try_recv() {
                    Ok(pending) if bytes + pending.command.len() > self.max_batch_bytes => {
                        next = Some(pending);
                        break;
                    }
                    Ok(pending) => {
                        bytes += pending.command.len();
                        batch.push(pending);
                    }
                    Err(_) => break,
                }
            }
            let (commands, answers): (Vec<Command>, Vec<_>) = batch
                .into_iter()
                .map(|p| (Command(p.command), p.answer))
                .unzip();
            // Handed to openraft here, in queue order; answered elsewhere.
            let (responder, _committed, written) = ProgressResponder::new();
            let proposed = self
                .raft
                .client_write_ff(Batch(commands), Some(responder))
                .await
                .map(|()| written);
            let group = self.group;
            let timeout = self.timeout;
            tokio::spawn(async move {
                let outcome = match proposed {
                    Err(fatal) => Err(WriteError::Stopped {
                        group,
                        detail: fatal.to_string(),
                    }),
                    Ok(receiver) => match tokio::time::timeout(timeout, receiver).await {
                        Err(_) => Err(WriteError::Timeout { group, timeout }),
                        Ok(Err(_)) => Err(WriteError::Stopped {
                            group,
                            detail: "the group stopped before answering".into(),
                        }),
                        Ok(Ok(written)) => written.map_err(|e| refusal(group, e)),
                    },
                };
                drop(slot);
                answer_all(group, answers, outcome.map(|written| written.data.0));
            });
        }
    }
}

/// The write error an openraft refusal of a batch means.
fn refusal(group: GroupId, error: ClientWriteError<crate::types::TypeConfig>) -> WriteError {
    match error {
        ClientWriteError::ForwardToLeader(forward) => {
            let (leader, leader_addr) = hint(forward);
            WriteError::NotLeader {
                group,
                leader,
                leader_addr,
            }
        }
        other => WriteError::Stopped {
            group,
            detail: other.to_string(),
        },
    }
}

/// Gives each writer its command's response, or every writer the batch's error.
fn answer_all(
    group: GroupId,
    answers: Vec<oneshot::Sender<Result<Vec<u8>, WriteError>>>,
    outcome: Result<Vec<crate::types::Response>, WriteError>,
) {
    let outcome = outcome.and_then(|responses| {
        if responses.len() == answers.len() {
            Ok(responses)
        } else {
            Err(WriteError::Stopped {
                group,
                detail: format!(
                    "{} responses for a batch of {} commands",
                    responses.len(),
                    answers.len()
                ),
            })
        }
    });
    match outcome {
        Ok(responses) => {
            for (answer, response) in answers.into_iter().zip(responses) {
                // A writer that gave up waiting needs no answer.
                let _ = answer.send(Ok(response.0));
            }
        }
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Err(error.clone()));
            }
        }
    }
}
