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
    channel_watermark_key, decode_u64, outbox_channel_range, outbox_range, outbox_ref, Command,
    OutboxRef, Outgoing, ShardId, ShardMap,
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
                match pump(&host, &courier, shard, &mut first_seen).await {
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
    first_seen: &mut FirstSeen,
) -> Result<bool, String> {
    let group = group_of(shard);
    let (mut from, end) = outbox_range();
    let mut done = Vec::new();
    let mut partial = false;
    let mut failed = None;
    // Each channel is read on its own, so one that is backed up (its target
    // without a leader) hides no other.
    loop {
        let first = host
            .scan_local(group, &from, &end, 1)
            .map_err(|e| e.to_string())?;
        let Some(target) = first.first().and_then(|(key, _)| outbox_ref(key)) else {
            break;
        };
        let target = target.target;
        from = outbox_channel_range(target, u64::MAX).0;
        let (channel_from, channel_to) = outbox_channel_range(target, 0);
        let rows = host
            .scan_local(group, &channel_from, &channel_to, BATCH)
            .map_err(|e| e.to_string())?;
        partial |= rows.len() == BATCH;
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
        host.propose(group, Command::OutboxDone { items: done }.encode())
            .await
            .map_err(|e| e.to_string())?;
    }
    failed.map_or(Ok(partial && forgot), Err)
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
    match value {
        Ok(None) => Ok(0),
        Ok(Some(value)) => decode_u64(&value).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}
