//! The outbox pump: on every shard this node leads, forgets the outbox
//! items their target has applied, and hands the courier what nobody
//! carried (its proposer crashed, or the target shard was unavailable).
//!
//! The proposer of a send or a group entry asks the courier for its items
//! at once; the pump leaves items alone for [`GRACE`] so that the two rarely
//! do the same work twice, and when they do the target applies each item
//! once. After a leader change the new leader's pump finds the same items in
//! the replicated outbox, so every item arrives exactly once whatever fails.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fishchat_raft::{GroupHost, Role};
use fishchat_shard::{
    channel_watermark_key, decode_delivery, outbox_range, outbox_ref, Command, OutboxRef, Outgoing,
    ShardId, ShardMap,
};
use tokio::sync::watch;

use crate::chat::now_ms;
use crate::courier::Courier;
use crate::node::group_of;

/// How often each led shard's outbox is looked at.
const PERIOD: Duration = Duration::from_millis(500);
/// How old an item must be before the pump asks for its delivery.
const GRACE: Duration = Duration::from_secs(2);
/// Most items read per shard per round.
const BATCH: usize = 512;

/// Runs the pump until `stop` turns true.
pub async fn run(
    host: Arc<GroupHost>,
    map: ShardMap,
    courier: Arc<Courier>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                continue;
            }
            // A full round that forgot items may have more behind it.
            loop {
                match pump(&host, &courier, shard).await {
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

/// One round for `shard`: forget what was delivered, ask for what is
/// overdue. True when the round was full and forgot something.
async fn pump(host: &GroupHost, courier: &Courier, shard: ShardId) -> Result<bool, String> {
    let (from, to) = outbox_range();
    let rows = host
        .scan(group_of(shard), &from, &to, BATCH)
        .await
        .map_err(|e| e.to_string())?;
    let full = rows.len() == BATCH;
    let cutoff = now_ms().saturating_sub(GRACE.as_millis() as u64);
    // Per target: its items here, with their commit times, in item order.
    let mut channels: BTreeMap<ShardId, Vec<(OutboxRef, u64)>> = BTreeMap::new();
    for (key, value) in rows {
        let item = outbox_ref(&key).ok_or("an outbox key does not parse")?;
        let delivery = decode_delivery(&value).map_err(|e| e.to_string())?;
        channels
            .entry(item.target)
            .or_default()
            .push((item, delivery.entry.timestamp_ms));
    }
    let mut done = Vec::new();
    let mut failed = None;
    for (target, items) in channels {
        // One unavailable target does not hold up the others.
        let applied = match applied_through(host, shard, target).await {
            Ok(applied) => applied,
            Err(e) => {
                failed = Some(e);
                continue;
            }
        };
        let mut overdue = None;
        for (item, committed_ms) in items {
            if item.item <= applied {
                done.push(item);
            } else if committed_ms <= cutoff {
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
        host.propose(
            group_of(shard),
            Command::OutboxDone { items: done }.encode(),
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    failed.map_or(Ok(full && forgot), Err)
}

/// The last item of `source`'s channel that `target` has applied.
async fn applied_through(
    host: &GroupHost,
    source: ShardId,
    target: ShardId,
) -> Result<u64, String> {
    let key = channel_watermark_key(source);
    let mut end = key.clone();
    end.push(0);
    let rows = host
        .scan(group_of(target), &key, &end, 1)
        .await
        .map_err(|e| e.to_string())?;
    match rows.into_iter().find(|(k, _)| *k == key) {
        None => Ok(0),
        Some((_, value)) => {
            let bytes: [u8; 8] = value
                .as_slice()
                .try_into()
                .map_err(|_| "a channel watermark is not 8 bytes")?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}
