//! Group commit: one WAL sync makes the waiting writes of every group durable.

use std::io;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use openraft::storage::IOFlushed;
use tokio::sync::{mpsc, oneshot};

use super::Engine;
use crate::types::TypeConfig;

/// How many writes may wait for a sync before writers are pushed back.
const SYNC_QUEUE_BOUND: usize = 8192;

/// A write that was issued unsynced and is waiting to be made durable.
enum Waiter {
    /// A Raft log append; openraft learns it is durable through the callback.
    Append(IOFlushed<TypeConfig>),
    /// Any other write (a vote) whose caller awaits durability.
    Write(oneshot::Sender<Result<(), io::Error>>),
}

/// Hands writes to the syncer thread. Cloned by every group of the node; the
/// thread ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct WalSyncer {
    queue: mpsc::Sender<Waiter>,
}

impl WalSyncer {
    /// Starts the syncer thread for `engine`.
    pub(crate) fn start(engine: Engine) -> io::Result<(Self, JoinHandle<()>)> {
        let (queue, waiting) = mpsc::channel(SYNC_QUEUE_BOUND);
        let thread = std::thread::Builder::new()
            .name("fishchat-wal-sync".into())
            .spawn(move || run(engine, waiting))?;
        Ok((Self { queue }, thread))
    }

    /// Reports `callback` once every write issued before this call is durable.
    pub(crate) async fn after_sync(&self, callback: IOFlushed<TypeConfig>) -> io::Result<()> {
        self.queue
            .send(Waiter::Append(callback))
            .await
            .map_err(|_| io::Error::other("WAL syncer has stopped"))
    }

    /// Returns once every write issued before this call is durable.
    pub(crate) async fn sync(&self) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Waiter::Write(done))
            .await
            .map_err(|_| io::Error::other("WAL syncer has stopped"))?;
        wait.await
            .map_err(|_| io::Error::other("WAL syncer has stopped"))?
    }
}

/// The syncer loop: take everything waiting, sync once, answer everyone.
fn run(engine: Engine, mut waiting: mpsc::Receiver<Waiter>) {
    let mut batch = Vec::new();
    while let Some(first) = waiting.blocking_recv() {
        batch.push(first);
        while let Ok(next) = waiting.try_recv() {
            batch.push(next);
        }
        let result = engine.sync_wal().map_err(|e| e.to_string());
        let stats = engine.stats();
        stats.wal_syncs.fetch_add(1, Ordering::Relaxed);
        stats
            .synced_writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "WAL sync failed");
        }
        for waiter in batch.drain(..) {
            let outcome = result.clone().map_err(io::Error::other);
            match waiter {
                Waiter::Append(callback) => callback.io_completed(outcome),
                Waiter::Write(done) => {
                    // The caller may have given up waiting; nothing to tell then.
                    let _ = done.send(outcome);
                }
            }
        }
    }
}
