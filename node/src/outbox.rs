//! The outbox pump: on every shard this node leads, forgets the outbox
//! items their target has applied, and hands the courier what nobody
//! carried (its proposer crashed, or the target shard was unavailable).
//!
//! The proposer of a send or a group entry asks the courier for its items
//! at once; the pump leaves items alone for [`GRACE`] so that the two rarely
//! do the same work twice, and when they do the target applies each item
//! once. After a leader change the new leader's pump finds the same items in
//! the replicated outbox, so every item arrives exactly once whatever fails.
//!
//! The pump reads this node's replicas, not linearizably: a linearizable
//! read costs a heartbeat round, and the pump made three per channel per
//! led shard every period. A replica's applied state is a prefix of what
//! its group committed, so a lagging read can only make the pump forget
//! fewer items (a target's watermark read low) or ask again for an item
//! already delivered (the target applies each item once); it never forgets
//! an item the target lacks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fishchat_raft::{GroupHost, ReadError, Role};
use fishchat_shard::{
    channel_watermark_key, decode_u64, outbox_channel_range, outbox_counter_key, outbox_ref,
    Command, OutboxRef, Outgoing, ShardId, ShardMap,
};
use tokio::sync::watch;

use crate::chat::read_key;
use crate::courier::Courier;
use crate::node::group_of;

/// How often each led shard's outbox is looked at.
const PERIOD: Duration = Duration::from_millis(500);
/// How long this node's pump must have seen an item unapplied before it
/// asks for its delivery.
const GRACE: Duration = Duration::from_secs(2);
/// Most items read per shard per round.
const BATCH: usize = 512;

/// When this node's pump first saw each outbox item not yet applied. The
/// grace period is timed by this node's clock, not by the commit time the
/// proposer's clock wrote, so a proposer with a fast clock cannot delay it.
type FirstSeen = HashMap<(ShardId, OutboxRef), Instant>;

/// For each channel (source, target), an item number at or below which
/// every item is known forgotten. A forgotten item leaves a tombstone in
/// RocksDB until compaction, so scans start past them: a scan from the
/// channel's start would step over every item ever forgotten.
type Forgotten = HashMap<(ShardId, ShardId), u64>;

/// Runs the pump until `stop` turns true.
pub async fn run(
    host: Arc<GroupHost>,
    map: ShardMap,
    courier: Arc<Courier>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first_seen = FirstSeen::new();
    let mut forgotten = Forgotten::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        for shard in 0..map.shard_count() {
            if *stop.borrow() {
                return;
            }
            let leads = host
                .status(group_of(shard))
                .is_some_and(|s| s.role == Role::Leader);
            if !leads {
                first_seen.retain(|(source, _), _| *source != shard);
                continue;
            }
            // A full round that forgot items may have more behind it.
            loop {
                match pump(
                    &host,
                    &courier,
                    shard,
                    map.shard_count(),
                    &mut first_seen,
                    &mut forgotten,
                )
                .await
                {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(shard, error = %e, "outbox round incomplete");
                        break;
                    }
                }
            }
        }
    }
}

/// One round for `shard`: channel by channel, forget what was applied and
/// ask for what is overdue. True when a channel was read in part and the
/// round forgot something (so another round may find more).
async fn pump(
    host: &GroupHost,
    courier: &Courier,
    shard: ShardId,
    shard_count: ShardId,
    first_seen: &mut FirstSeen,
    forgotten: &mut Forgotten,
) -> Result<bool, String> {
    let group = group_of(shard);
    let mut done = Vec::new();
    let mut partial = false;
    let mut failed = None;
    // Each channel is read on its own, so one that is backed up (its target
    // without a leader) hides no other.
    for target in (0..shard_count).filter(|&t| t != shard) {
        let cursor = forgotten.entry((shard, target)).or_default();
        let last = counter_value(host.read_local(group, &outbox_counter_key(target)))?;
        if last <= *cursor {
            continue;
        }
        let (channel_from, channel_to) = outbox_channel_range(target, *cursor);
        let rows = host
            .scan_local(group, &channel_from, &channel_to, BATCH)
            .map_err(|e| e.to_string())?;
        partial |= rows.len() == BATCH;
        let first_live = rows.first().and_then(|(key, _)| outbox_ref(key));
        *cursor = cursor_after_scan(*cursor, last, first_live.map(|r| r.item));
        let applied = match applied_through(host, shard, target).await {
            Ok(applied) => applied,
            Err(e) => {
                failed = Some(e);
                continue;
            }
        };
        let mut overdue = None;
        for (key, _) in rows {
            let Some(item) = outbox_ref(&key) else {
                continue;
            };
            if item.item <= applied {
                first_seen.remove(&(shard, item));
                done.push(item);
            } else if first_seen
                .entry((shard, item))
                .or_insert_with(Instant::now)
                .elapsed()
                >= GRACE
            {
                overdue = Some(item);
            }
        }
        if let Some(item) = overdue {
            tracing::info!(
                shard,
                target,
                item = item.item,
                "outbox pump delivers overdue items"
            );
            courier.kick(
                shard,
                Outgoing {
                    to: item,
                    delivery: None,
                },
            );
        }
    }
    let forgot = !done.is_empty();
    if forgot {
        let mut highest: HashMap<ShardId, u64> = HashMap::new();
        for item in &done {
            let top = highest.entry(item.target).or_default();
            *top = (*top).max(item.item);
        }
        host.propose(group, Command::OutboxDone { items: done }.encode())
            .await
            .map_err(|e| e.to_string())?;
        for (target, item) in highest {
            let cursor = forgotten.entry((shard, target)).or_default();
            *cursor = (*cursor).max(item);
        }
    }
    failed.map_or(Ok(partial && forgot), Err)
}

/// Where a channel's next scan starts, after one that started past
/// `cursor` found `first_live` as its first item. Every item up to `last`
/// (the channel's counter, read before the scan) had been made; one the
/// scan did not find was forgotten, and forgotten items never return.
fn cursor_after_scan(cursor: u64, last: u64, first_live: Option<u64>) -> u64 {
    match first_live {
        Some(first) => first.saturating_sub(1).max(cursor),
        None => last.max(cursor),
    }
}

/// The last item of `source`'s channel that `target` has applied, as far
/// as this node's replica of `target` knows (at most the truth), or from
/// the target's leader when this node holds no replica of it.
async fn applied_through(
    host: &GroupHost,
    source: ShardId,
    target: ShardId,
) -> Result<u64, String> {
    let key = channel_watermark_key(source);
    let value = match host.read_local(group_of(target), &key) {
        Err(ReadError::UnknownGroup(_)) => read_key(host, target, &key).await,
        local => local,
    };
    counter_value(value)
}

/// The number a counter key holds: 0 while the key is absent.
fn counter_value<E: std::fmt::Display>(read: Result<Option<Vec<u8>>, E>) -> Result<u64, String> {
    match read {
        Ok(None) => Ok(0),
        Ok(Some(value)) => decode_u64(&value).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_moves_the_cursor_to_just_before_the_first_live_item() {
        // Items 1-6 were made; 1-3 are forgotten, so the scan from 0 finds 4.
        assert_eq!(cursor_after_scan(0, 6, Some(4)), 3);
        // Nothing left: everything made before the scan is forgotten.
        assert_eq!(cursor_after_scan(3, 6, None), 6);
        // Nothing forgotten past the cursor: it stays.
        assert_eq!(cursor_after_scan(3, 6, Some(4)), 3);
        // An item made after the counter was read does not move it back.
        assert_eq!(cursor_after_scan(6, 6, Some(7)), 6);
    }
}
