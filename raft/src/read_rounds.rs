//! Shared leadership confirmations for linearizable reads.
//!
//! A linearizable read on a leader waits for openraft's
//! `ensure_linearizable`: a heartbeat round that a quorum answers, then the
//! apply of everything committed before the round. openraft runs one round
//! per call, so a thousand syncs a second were a thousand heartbeat rounds
//! a second. A read needs only *some* round that began after the read
//! arrived. So each group has at most one round out: a read that arrives
//! while one is out waits for the next, which starts as soon as the current
//! one ends, and every read waiting for it shares it. A burst of reads costs
//! two rounds, not one per read; a lone read costs one round, as before.
//!
//! A "round" is usually free: the leader confirms by its lease when a
//! quorum acknowledged one of its messages within the lease, and sends
//! heartbeats only when none did (see [`lease_or_round`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{LinearizableReadError, RaftError};
use openraft::LinearizerOption;
use tokio::sync::watch;

use crate::error::ReadError;
use crate::local::hint;
use crate::types::{GroupId, Raft};

/// How a read confirms leadership: by the leader's lease when a quorum
/// answered one of its messages within the lease (heartbeats go out every
/// `RaftTiming::heartbeat`, far inside it), else by a heartbeat round sent
/// at once.
fn lease_or_round() -> LinearizerOption {
    LinearizerOption::new(None, true)
}

/// One group's rounds.
pub(crate) struct ReadRounds {
    group: GroupId,
    raft: Raft,
    /// How long a read waits for its round, and a round for openraft.
    timeout: Duration,
    state: Mutex<Rounds>,
    /// The last round that ended, and how.
    ended: watch::Sender<Ended>,
    /// Rounds run so far (reported in the group's status).
    run: AtomicU64,
}

#[derive(Default)]
struct Rounds {
    /// The number of the latest round started (rounds count from 1).
    started: u64,
    /// Whether a round is out.
    running: bool,
    /// The highest round a waiting read needs.
    wanted: u64,
}

#[derive(Clone)]
struct Ended {
    round: u64,
    outcome: Result<(), ReadError>,
}

impl ReadRounds {
    pub(crate) fn new(group: GroupId, raft: Raft, timeout: Duration) -> Arc<Self> {
        let (ended, _) = watch::channel(Ended {
            round: 0,
            outcome: Ok(()),
        });
        Arc::new(Self {
            group,
            raft,
            timeout,
            state: Mutex::new(Rounds::default()),
            ended,
            run: AtomicU64::new(0),
        })
    }

    /// Returns once a round that began after this call confirmed that this
    /// replica leads the group and has applied everything committed before
    /// that round: local reads made afterwards are linearizable.
    pub(crate) async fn linearize(self: &Arc<Self>) -> Result<(), ReadError> {
        let mut ended = self.ended.subscribe();
        let needed = {
            let mut state = self.lock();
            // The next round to start: the current one, if any, began
            // before this read and cannot serve it.
            let needed = state.started + 1;
            state.wanted = state.wanted.max(needed);
            if !state.running {
                state.running = true;
                state.started = needed;
                tokio::spawn(self.clone().run_from(needed));
            }
            needed
        };
        let wait = async {
            ended
                .wait_for(|e| e.round >= needed)
                .await
                .map(|e| e.outcome.clone())
        };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(self.unavailable("the group stopped".into())),
            Err(_) => Err(self.not_confirmed()),
        }
    }

    /// Rounds run so far.
    pub(crate) fn run(&self) -> u64 {
        self.run.load(Ordering::Relaxed)
    }

    /// Runs round `round`, then the next while reads wait for one.
    async fn run_from(self: Arc<Self>, mut round: u64) {
        loop {
            let outcome = self.confirm().await;
            self.run.fetch_add(1, Ordering::Relaxed);
            self.ended.send_replace(Ended { round, outcome });
            let mut state = self.lock();
            if state.wanted <= round {
                state.running = false;
                return;
            }
            round += 1;
            state.started = round;
        }
    }

    /// One openraft leadership confirmation.
    async fn confirm(&self) -> Result<(), ReadError> {
        let confirmed = tokio::time::timeout(
            self.timeout,
            self.raft.ensure_linearizable(lease_or_round()),
        )
        .await;
        match confirmed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(forward)))) => {
                let (leader, leader_addr) = hint(forward);
                Err(ReadError::NotLeader {
                    group: self.group,
                    leader,
                    leader_addr,
                })
            }
            Ok(Err(e)) => Err(self.unavailable(e.to_string())),
            Err(_) => Err(self.not_confirmed()),
        }
    }

    fn not_confirmed(&self) -> ReadError {
        self.unavailable(format!(
            "leadership not confirmed within {:?}",
            self.timeout
        ))
    }

    fn unavailable(&self, detail: String) -> ReadError {
        ReadError::Unavailable {
            group: self.group,
            detail,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}
