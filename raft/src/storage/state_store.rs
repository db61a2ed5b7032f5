//! openraft's state-machine storage for one group: applies committed entries to
//! the application's [`StateMachine`] and keeps its snapshots.

use std::io;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::EntryPayload;
use rocksdb::WriteBatch;
use tokio::sync::watch;

use super::engine::{state_system_key, StateTag};
use super::snapshot::{self, CurrentSnapshot, GroupSnapshotBuilder, StoredSnapshot};
use super::{io_error, state_data_range, Engine, CF_STATE};
use crate::codec::{decode, encode};
use crate::state_machine::{ApplyTxn, StateMachine};
use crate::types::{
    GroupId, LogId, Response, Responses, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};

/// The applied state of one group and the application machine that owns it.
pub struct GroupStateStore {
    group: GroupId,
    engine: Engine,
    machine: Box<dyn StateMachine>,
    applied: Option<LogId>,
    membership: StoredMembership,
    current: CurrentSnapshot,
    /// Last applied index (0: none), watched by the group's status and by
    /// log purges, which must not run ahead of it.
    applied_index: watch::Sender<u64>,
}

impl GroupStateStore {
    /// Opens the applied state of `group` as it is on disk.
    pub(crate) fn open(
        group: GroupId,
        engine: Engine,
        machine: Box<dyn StateMachine>,
        applied_index: watch::Sender<u64>,
    ) -> io::Result<Self> {
        let doing = "reading the applied state";
        let read = |tag| -> io::Result<Option<Vec<u8>>> {
            engine
                .db()
                .get_cf(engine.cf(CF_STATE), state_system_key(group, tag))
                .map_err(|e| io_error(doing, e))
        };
        let undecodable = |e| io_error(doing, e);
        let applied: Option<LogId> = match read(StateTag::Applied)? {
            Some(bytes) => decode(&bytes).map_err(undecodable)?,
            None => None,
        };
        let membership: StoredMembership = match read(StateTag::Membership)? {
            Some(bytes) => decode(&bytes).map_err(undecodable)?,
            None => StoredMembership::default(),
        };
        applied_index.send_replace(applied.map(|id| id.index).unwrap_or(0));
        Ok(Self {
            group,
            engine,
            machine,
            applied,
            membership,
            current: Arc::new(Mutex::new(None)),
            applied_index,
        })
    }

    /// Adds the applied log id to `batch`, and the membership when it
    /// changed: most batches carry none, and the record is not small.
    fn record_applied(&self, batch: &mut WriteBatch, membership_changed: bool) -> io::Result<()> {
        let cf = self.engine.cf(CF_STATE);
        let failed = |e| io_error("recording the applied state", e);
        batch.put_cf(
            cf,
            state_system_key(self.group, StateTag::Applied),
            encode(&self.applied).map_err(failed)?,
        );
        if membership_changed {
            batch.put_cf(
                cf,
                state_system_key(self.group, StateTag::Membership),
                encode(&self.membership).map_err(failed)?,
            );
        }
        Ok(())
    }

    fn builder(&self) -> GroupSnapshotBuilder {
        GroupSnapshotBuilder {
            group: self.group,
            engine: self.engine.clone(),
            current: self.current.clone(),
        }
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateStore {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.applied, self.membership.clone()))
    }

    /// Applies every entry openraft hands over in one call inside one
    /// storage transaction, and answers the proposers once it is written.
    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut txn = ApplyTxn::new(self.group, &self.engine);
        let mut membership_changed = false;
        let mut answered = Vec::new();
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id;
            let responses = match entry.payload {
                EntryPayload::Blank => Responses::default(),
                EntryPayload::Normal(batch) => {
                    let mut answers = Vec::with_capacity(batch.0.len());
                    for command in &batch.0 {
                        let answer = self.machine.apply(&command.0, &mut txn).map_err(|e| {
                            io_error(&format!("applying log entry {}", log_id.index), e)
                        })?;
                        answers.push(Response(answer));
                    }
                    Responses(answers)
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(log_id), membership);
                    membership_changed = true;
                    Responses::default()
                }
            };
            self.applied = Some(log_id);
            if let Some(responder) = responder {
                answered.push((responder, responses));
            }
        }
        let writes = txn.into_writes();
        let mut batch = WriteBatch::default();
        for (key, value) in &writes {
            match value {
                Some(value) => super::put_state(&self.engine, &mut batch, self.group, key, value),
                None => super::delete_state(&self.engine, &mut batch, self.group, key),
            }
        }
        self.record_applied(&mut batch, membership_changed)?;
        self.engine
            .write(batch)
            .map_err(|e| io_error("writing applied entries", e))?;
        self.applied_index
            .send_replace(self.applied.map(|id| id.index).unwrap_or(0));
        for (responder, responses) in answered {
            responder.send(responses);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, data: Vec<u8>) -> io::Result<()> {
        let doing = "installing a snapshot";
        let mut batch = WriteBatch::default();
        {
            let records = snapshot::parse_records(&data).map_err(|e| io_error(doing, e))?;
            let (start, end) = state_data_range(self.group);
            batch.delete_range_cf(self.engine.cf(CF_STATE), start, end);
            for (key, value) in records {
                super::put_state(&self.engine, &mut batch, self.group, key, value);
            }
        }
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.record_applied(&mut batch, true)?;
        // The leader counts this replica as holding everything up to the
        // snapshot once we answer: it must survive a crash.
        self.engine
            .write_synced(batch)
            .map_err(|e| io_error(doing, e))?;
        self.applied_index
            .send_replace(self.applied.map(|id| id.index).unwrap_or(0));
        self.machine.restored();
        snapshot::keep_newest(
            &self.current,
            StoredSnapshot {
                meta: meta.clone(),
                data: Arc::new(data),
            },
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        // Nothing cached after a restart: openraft builds a snapshot itself
        // when its log has been purged, and needs none otherwise.
        let cached = self.current.lock().ok().and_then(|c| c.clone());
        Ok(cached.map(|stored| stored.to_snapshot()))
    }
}
