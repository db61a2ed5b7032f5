//! The outbox pump: on every shard this node leads, delivers the outbox items
//! their proposer did not (it crashed, or the target shard was unavailable),
//! and forgets delivered items.
//!
//! A send's proposer delivers the sender's copy itself right after the commit
//! (read-your-writes); the pump leaves items alone for [`GRACE`] so the two
//! rarely race, and a race is harmless: the target shard applies an item once
//! (its `r` marker) and answers a repeat with the first version. After a
//! leader change the new leader's pump finds the same items in the
//! replicated outbox, so every item is delivered exactly once whatever fails.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fishchat_raft::{GroupHost, Role};
use fishchat_shard::{
    decode_delivery, outbox_range, received_item, received_range, Command, Delivery, Reply,
    ShardId, ShardMap,
};
use tokio::sync::watch;

use crate::chat::now_ms;
use crate::events::Events;
use crate::node::group_of;

/// How often each led shard's outbox is looked at.
const PERIOD: Duration = Duration::from_millis(500);
/// How old an item must be before the pump takes over its delivery.
const GRACE: Duration = Duration::from_secs(2);
/// Most items handled per shard per round.
const BATCH: usize = 512;

/// Runs the pump until `stop` turns true.
pub async fn run(
    host: Arc<GroupHost>,
    map: ShardMap,
    events: Arc<Events>,
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
            if let Err(e) = pump(&host, map, &events, shard).await {
                tracing::debug!(shard, error = %e, "outbox round incomplete");
            }
        }
    }
}

/// One round for `shard`: deliver what is due, forget what was delivered.
async fn pump(
    host: &GroupHost,
    map: ShardMap,
    events: &Events,
    shard: ShardId,
) -> Result<(), String> {
    let (from, to) = outbox_range();
    let rows = host
        .scan(group_of(shard), &from, &to, BATCH)
        .await
        .map_err(|e| e.to_string())?;
    let cutoff = now_ms().saturating_sub(GRACE.as_millis() as u64);
    let mut by_target: BTreeMap<ShardId, Vec<Delivery>> = BTreeMap::new();
    for (_, value) in rows {
        let delivery = decode_delivery(&value).map_err(|e| e.to_string())?;
        if delivery.entry.timestamp_ms <= cutoff {
            by_target
                .entry(map.shard_of_user(delivery.owner))
                .or_default()
                .push(delivery);
        }
    }
    let mut done = Vec::new();
    let mut failed = None;
    for (target, deliveries) in by_target {
        // One unavailable target does not hold up the others, nor the
        // forgetting of what was delivered.
        if let Err(e) = deliver_to(host, events, shard, target, deliveries, &mut done).await {
            failed = Some(e);
        }
    }
    if !done.is_empty() {
        host.propose(
            group_of(shard),
            Command::OutboxDone { items: done }.encode(),
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    failed.map_or(Ok(()), Err)
}

/// Delivers `deliveries` of `shard`'s outbox to `target` unless already
/// there; adds every item now known delivered to `done`.
async fn deliver_to(
    host: &GroupHost,
    events: &Events,
    shard: ShardId,
    target: ShardId,
    deliveries: Vec<Delivery>,
    done: &mut Vec<u64>,
) -> Result<(), String> {
    let first = deliveries.iter().map(|d| d.item).min().unwrap_or(0);
    let last = deliveries.iter().map(|d| d.item).max().unwrap_or(0);
    let (from, to) = received_range(shard, first, last);
    let span = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
    // A truncated answer only makes some items look undelivered; their
    // repeat delivery is recognised by the target.
    let received: HashSet<u64> = host
        .scan(group_of(target), &from, &to, span.min(10 * BATCH))
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .filter_map(|(key, _)| received_item(key))
        .collect();
    for delivery in deliveries {
        let item = delivery.item;
        if !received.contains(&item) {
            let owner = delivery.owner;
            let reply = host
                .propose(group_of(target), Command::Deliver(delivery).encode())
                .await
                .map_err(|e| e.to_string())?;
            match Reply::decode(&reply) {
                Ok(Reply::Delivered { version }) => events.inbox_advanced(owner, version),
                other => return Err(format!("delivery of item {item} refused: {other:?}")),
            }
            tracing::info!(shard, target, item, "outbox item delivered by the pump");
        }
        done.push(item);
    }
    Ok(())
}
