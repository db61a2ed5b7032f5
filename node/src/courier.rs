//! The courier: carries outbox items from the shard that committed them to
//! the shard whose inboxes they are for.
//!
//! Each (source, target) pair of shards is one channel: the source numbers
//! its items for the target 1, 2, 3, … and the target applies them exactly
//! once and in that order (`fishchat_shard::DeliveryBatch`). On this node
//! one worker task per channel does the carrying, so however many requests
//! wait for items of one channel, each round is one scan of the source's
//! outbox and one Raft command at the target carrying every item due: a
//! burst of sends costs one delivery, not one per message.
//!
//! Anyone may ask for an item: the proposer of a send (and waits, for
//! read-your-writes), the proposer of a group entry (and does not wait for
//! other members), the outbox pump (for what a crashed proposer left).
//! Workers on different nodes may carry the same items at once; the target
//! applies each once, so that race costs a command, never a duplicate.
//!
//! A proposer hands over the item itself, which its command's reply
//! carried, so the usual round costs only the command at the target. When
//! the worker lacks an item (another node proposed it, or the target says
//! it expects an earlier one), it reads the channel from the source's
//! outbox instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fishchat_raft::GroupHost;
use fishchat_shard::{
    decode_delivery, outbox_channel_range, Command, CommandError, Delivery, DeliveryBatch,
    InboxEntry, Outgoing, Reply, ShardId, UserId, Version,
};
use tokio::sync::watch;

use crate::chat::placed_entry;
use crate::events::Events;
use crate::node::group_of;

/// Most items read from the source per round.
const SCAN_ITEMS: usize = 256;
/// Most bytes of items in one delivery command (well inside the 1 MiB
/// command limit; one item may exceed it alone, up to the max body).
const BATCH_BYTES: usize = 256 * 1024;
/// Longest wait between retries of a failing channel.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Most items handed over and kept per channel; beyond, new ones are read
/// back from the source's outbox when their turn comes.
const MAX_HANDED: usize = 1024;

/// One channel's progress on this node.
struct Channel {
    /// The highest item someone asked for.
    wanted: watch::Sender<u64>,
    /// The highest item known applied at the target.
    delivered: watch::Sender<u64>,
    /// Items handed over by their proposers, not yet known applied.
    handed: Mutex<BTreeMap<u64, Delivery>>,
}

impl Channel {
    /// The handed-over items that follow `after` without a hole, at most
    /// [`BATCH_BYTES`] of them (at least one item); forgets older ones.
    fn handed_after(&self, after: u64) -> Vec<Delivery> {
        let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
        *handed = handed.split_off(&(after + 1));
        let mut run: Vec<Delivery> = Vec::new();
        let mut bytes = 0;
        for (item, delivery) in handed.iter() {
            let next = run.last().map_or(*item, |d| d.item + 1);
            let size = encoded_size(delivery);
            if *item != next || (!run.is_empty() && bytes + size > BATCH_BYTES) {
                break;
            }
            bytes += size;
            run.push(delivery.clone());
        }
        run
    }

    /// Drops every handed-over item: their round failed, and reading them
    /// back from the source's outbox measures and orders them exactly.
    fn forget_handed(&self) {
        self.handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// An upper bound of a delivery's size inside a command: its body, content
/// type, event and recipients, plus the encoding's overhead.
fn encoded_size(delivery: &Delivery) -> usize {
    let entry = &delivery.entry;
    let event = entry
        .event
        .as_ref()
        .map_or(0, |e| e.username.len() + e.group_name.len() + 64);
    entry.body.len() + entry.content_type.len() + event + 10 * delivery.owners.len() + 256
}

/// Carries outbox items between shards; see the module documentation.
pub struct Courier {
    host: Arc<GroupHost>,
    events: Arc<Events>,
    stop: watch::Receiver<bool>,
    channels: Mutex<HashMap<(ShardId, ShardId), Arc<Channel>>>,
}

/// The courier stopped (the node is shutting down) before the item arrived.
#[derive(Debug, thiserror::Error)]
#[error("the node is shutting down")]
pub struct Stopped;

impl Courier {
    /// A courier for `host`'s shards; its workers end when `stop` turns true.
    pub fn new(host: Arc<GroupHost>, events: Arc<Events>, stop: watch::Receiver<bool>) -> Self {
        Self {
            host,
            events,
            stop,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Starts carrying `item` of `source` (and every earlier item of its
    /// channel) to its target, without waiting.
    pub fn kick(&self, source: ShardId, item: Outgoing) {
        let channel = self.channel(source, item.to.target);
        let number = item.to.item;
        if let Some(delivery) = item.delivery {
            let mut handed = channel.handed.lock().unwrap_or_else(|p| p.into_inner());
            if handed.len() < MAX_HANDED && number > *channel.delivered.borrow() {
                handed.insert(number, delivery);
            }
        }
        channel.wanted.send_if_modified(|wanted| {
            let raise = number > *wanted;
            *wanted = (*wanted).max(number);
            raise
        });
    }

    /// Carries `item` of `source` to its target and returns once it is
    /// applied there. Never gives up by itself: the caller bounds the wait.
    pub async fn deliver(&self, source: ShardId, item: Outgoing) -> Result<(), Stopped> {
        let (target, number) = (item.to.target, item.to.item);
        self.kick(source, item);
        let mut delivered = self.channel(source, target).delivered.subscribe();
        delivered
            .wait_for(|&through| through >= number)
            .await
            .map(|_| ())
            .map_err(|_| Stopped)
    }

    fn channel(&self, source: ShardId, target: ShardId) -> Arc<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .entry((source, target))
            .or_insert_with(|| {
                let channel = Arc::new(Channel {
                    wanted: watch::Sender::new(0),
                    delivered: watch::Sender::new(0),
                    handed: Mutex::new(BTreeMap::new()),
                });
                tokio::spawn(carry(
                    self.host.clone(),
                    self.events.clone(),
                    source,
                    target,
                    channel.clone(),
                    self.stop.clone(),
                ));
                channel
            })
            .clone()
    }
}

/// The worker of one channel: whenever an item beyond what is known
/// delivered is wanted, carries the channel's waiting items over.
async fn carry(
    host: Arc<GroupHost>,
    events: Arc<Events>,
    source: ShardId,
    target: ShardId,
    channel: Arc<Channel>,
    mut stop: watch::Receiver<bool>,
) {
    let mut wanted = channel.wanted.subscribe();
    let mut backoff = Duration::from_millis(50);
    loop {
        let want = *wanted.borrow_and_update();
        let have = *channel.delivered.borrow();
        if want <= have {
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
            continue;
        }
        match carry_once(&host, &events, source, target, &channel, have).await {
            Ok(through) => {
                // No item left after `have` means every item up to what was
                // wanted was applied and forgotten.
                let through = through.unwrap_or(want);
                channel.delivered.send_modify(|d| *d = (*d).max(through));
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::debug!(source, target, error = %e, "outbox delivery failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One round: the items of the channel after `after`, as one command to the
/// target. Returns the last item the target has applied, or `None` when
/// the source holds no item after `after`.
async fn carry_once(
    host: &GroupHost,
    events: &Events,
    source: ShardId,
    target: ShardId,
    channel: &Channel,
    after: u64,
) -> Result<Option<u64>, String> {
    let handed = channel.handed_after(after);
    // Handed-over items go first. This node's view of the channel lags when
    // other nodes carried items meanwhile (they propose sends too), so the
    // target judges: it applies them if it has everything before, or says
    // which item it expects.
    if !handed.is_empty() {
        match apply(host, events, source, target, handed).await {
            Ok(Applied::Through(through)) => return Ok(Some(through)),
            // The target lacks earlier items: read them from the source.
            Ok(Applied::Expects(next)) => {
                return carry_read(host, events, source, target, next - 1).await
            }
            // Whatever went wrong (the command too large, the target without
            // a leader), the next round reads the channel from the source,
            // which never builds a command over the limit.
            Err(e) => {
                channel.forget_handed();
                return Err(e);
            }
        }
    }
    carry_read(host, events, source, target, after).await
}

/// A round with items read from the source's outbox.
async fn carry_read(
    host: &GroupHost,
    events: &Events,
    source: ShardId,
    target: ShardId,
    after: u64,
) -> Result<Option<u64>, String> {
    let (from, to) = outbox_channel_range(target, after);
    let rows = host
        .scan(group_of(source), &from, &to, SCAN_ITEMS)
        .await
        .map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut items = Vec::with_capacity(rows.len());
    let mut bytes = 0;
    for (_, value) in &rows {
        if !items.is_empty() && bytes + value.len() > BATCH_BYTES {
            break;
        }
        bytes += value.len();
        items.push(decode_delivery(value).map_err(|e| e.to_string())?);
    }
    match apply(host, events, source, target, items).await? {
        Applied::Through(through) => Ok(Some(through)),
        Applied::Expects(next) => {
            // Items before the first one read are gone from the outbox, so
            // they were applied: a hole here is a bug. Say so loudly; the
            // worker retries, and the outbox keeps the items.
            tracing::error!(source, target, after, next, "outbox channel has a hole");
            Err(format!(
                "target expects item {next}, which the source lacks"
            ))
        }
    }
}

/// What the target made of a batch.
enum Applied {
    /// It has applied the channel up to this item.
    Through(u64),
    /// It refused the batch: it expects this item first.
    Expects(u64),
}

/// Proposes `items` to the target and notifies the inboxes they reached,
/// with the entries.
async fn apply(
    host: &GroupHost,
    events: &Events,
    source: ShardId,
    target: ShardId,
    items: Vec<Delivery>,
) -> Result<Applied, String> {
    let count = items.len();
    let command = Command::Deliver(DeliveryBatch {
        source,
        items: items.clone(),
    });
    let reply = host
        .propose(group_of(target), command.encode())
        .await
        .map_err(|e| e.to_string())?;
    match Reply::decode(&reply) {
        Ok(Reply::Delivered { through, appended }) => {
            for (owner, version, entry) in placed_entries(&items, &appended) {
                let entry = entry.map(|e| placed_entry(e.clone(), owner, version));
                events.inbox_advanced(owner, version, entry);
            }
            tracing::debug!(source, target, count, through, "outbox items delivered");
            Ok(Applied::Through(through))
        }
        Ok(Reply::Refused(CommandError::OutOfOrder { expected, .. })) => {
            Ok(Applied::Expects(expected))
        }
        other => {
            tracing::error!(source, target, reply = ?other, "outbox delivery refused");
            Err(format!("delivery refused: {other:?}"))
        }
    }
}

/// Lines up what a target appended, `(owner, version)` in order, with the
/// entries of the batch it applied: the target skips the batch's leading
/// repeats and appends every owner of each later item in order, so the
/// appends match the batch's last owners. Where they do not match (never,
/// unless the two disagree on the rule), the entry is left out and the
/// client syncs.
fn placed_entries<'a>(
    items: &'a [Delivery],
    appended: &'a [(UserId, Version)],
) -> impl Iterator<Item = (UserId, Version, Option<&'a InboxEntry>)> + 'a {
    let owners: Vec<(UserId, &InboxEntry)> = items
        .iter()
        .flat_map(|d| d.owners.iter().map(move |&owner| (owner, &d.entry)))
        .collect();
    let lined_up = owners.len() >= appended.len()
        && owners[owners.len() - appended.len()..]
            .iter()
            .zip(appended)
            .all(|((owner, _), (appended_owner, _))| owner == appended_owner);
    let skip = owners.len().saturating_sub(appended.len());
    appended
        .iter()
        .enumerate()
        .map(move |(i, &(owner, version))| {
            let entry = lined_up.then(|| owners[skip + i].1);
            (owner, version, entry)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(item: u64, owners: &[UserId], body: &str) -> Delivery {
        Delivery {
            item,
            owners: owners.to_vec(),
            entry: InboxEntry::direct(item, 1, 0, body.as_bytes().to_vec(), String::new(), 0),
        }
    }

    #[test]
    fn appends_line_up_with_the_items_after_the_repeats() {
        let items = [
            delivery(4, &[7, 8], "repeat"),
            delivery(5, &[7], "five"),
            delivery(6, &[8, 9], "six"),
        ];
        // Item 4 was applied before: the target appended for 5 and 6 only.
        let appended = [(7, 11), (8, 20), (9, 3)];
        let lined: Vec<_> = placed_entries(&items, &appended)
            .map(|(owner, version, entry)| (owner, version, entry.map(|e| e.body.clone())))
            .collect();
        assert_eq!(
            lined,
            [
                (7, 11, Some(b"five".to_vec())),
                (8, 20, Some(b"six".to_vec())),
                (9, 3, Some(b"six".to_vec())),
            ]
        );
    }

    #[test]
    fn appends_that_do_not_line_up_go_without_entries() {
        let items = [delivery(5, &[7], "five")];
        let appended = [(8, 2)];
        let lined: Vec<_> = placed_entries(&items, &appended).collect();
        assert_eq!(lined, [(8, 2, None)]);
        let too_many = [(7, 1), (7, 2)];
        assert!(placed_entries(&items, &too_many).all(|(_, _, e)| e.is_none()));
    }
}
