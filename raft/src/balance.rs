//! Spreading group leaders evenly over the nodes.
//!
//! The node that initialises a group becomes its first leader, so a new
//! cluster starts balanced; but when a node stops, the groups it led elect
//! leaders elsewhere and stay there after it returns, and one node ends up
//! doing most of the work. Every `RaftTiming::balance_every`, each node
//! looks at the leaders of the groups it hosts. If it leads at least two
//! more groups than some voter node leads, it hands one of its groups to the
//! node leading the fewest, with openraft's leader transfer: the target
//! campaigns at once with the leader's blessing, so the group is without a
//! leader for one election round trip, not an election timeout.
//!
//! A hand-over goes only to a replica that is caught up and answered the
//! leader recently, one per node per period; it narrows the gap between two
//! nodes by two, so leadership never bounces back and forth. While any group
//! has no known leader (an election, a node down), nobody moves anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{Instant, ServerState};

use crate::local::LocalGroups;
use crate::types::{GroupId, NodeId};

/// Entries a replica may trail the leader by and still take over at once.
const CAUGHT_UP_ENTRIES: u64 = 64;

/// What this node knows of one group's leadership.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GroupView {
    pub(crate) group: GroupId,
    /// The leader this replica knows of.
    pub(crate) leader: Option<NodeId>,
    /// The group's voters.
    pub(crate) voters: BTreeSet<NodeId>,
    /// For a group this node leads: the voters ready to take over (caught
    /// up, and heard from within the last period).
    pub(crate) ready: BTreeSet<NodeId>,
}

/// The hand-over `me` should start, if any: one of its groups and the
/// voter that should lead it.
pub(crate) fn choose(me: NodeId, views: &[GroupView]) -> Option<(GroupId, NodeId)> {
    if views.iter().any(|v| v.leader.is_none()) {
        return None;
    }
    let mut led: BTreeMap<NodeId, usize> = views
        .iter()
        .flat_map(|v| v.voters.iter().map(|n| (*n, 0)))
        .collect();
    for leader in views.iter().filter_map(|v| v.leader) {
        *led.entry(leader).or_default() += 1;
    }
    let mine = led.get(&me).copied().unwrap_or(0);
    views
        .iter()
        .filter(|v| v.leader == Some(me))
        .flat_map(|v| {
            let led = &led;
            v.ready
                .iter()
                .filter(|to| **to != me && v.voters.contains(to))
                .map(move |to| (led.get(to).copied().unwrap_or(0), v.group, *to))
        })
        .filter(|(theirs, _, _)| theirs + 2 <= mine)
        .min()
        .map(|(_, group, to)| (group, to))
}

/// What this replica of `group` knows of its leadership now, for a period
/// of `period`.
fn view(group: GroupId, raft: &crate::types::Raft, period: Duration) -> GroupView {
    let metrics = raft.metrics().borrow_watched().clone();
    let mut ready = BTreeSet::new();
    if metrics.state == ServerState::Leader {
        let last = metrics.last_log_index.unwrap_or(0);
        let matched = metrics.replication.as_ref();
        let heard = metrics.heartbeat.as_ref();
        for (node, at) in heard.into_iter().flatten() {
            let recent = at.as_ref().is_some_and(|at| at.elapsed() < period);
            let index = matched
                .and_then(|m| m.get(node).cloned().flatten())
                .map_or(0, |id| id.index);
            if recent && index + CAUGHT_UP_ENTRIES >= last {
                ready.insert(*node);
            }
        }
    }
    GroupView {
        group,
        leader: metrics.current_leader,
        voters: metrics.membership_config.membership().voter_ids().collect(),
        ready,
    }
}

/// Every `period`, hands one group over if this node leads too many.
pub(crate) async fn run(me: NodeId, local: Arc<LocalGroups>, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let groups: Vec<_> = local
            .groups
            .ids()
            .into_iter()
            .filter_map(|g| local.groups.get(g).map(|raft| (g, raft)))
            .collect();
        let views: Vec<GroupView> = groups
            .iter()
            .map(|(g, raft)| view(*g, raft, period))
            .collect();
        let Some((group, to)) = choose(me, &views) else {
            continue;
        };
        let Some((_, raft)) = groups.iter().find(|(g, _)| *g == group) else {
            continue;
        };
        tracing::info!(
            group,
            to,
            "handing leadership over to spread leaders evenly"
        );
        if let Err(e) = raft.trigger().transfer_leader(to).await {
            tracing::warn!(group, to, error = %e, "leadership hand-over failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(group: GroupId, leader: NodeId, ready: &[NodeId]) -> GroupView {
        GroupView {
            group,
            leader: Some(leader),
            voters: [1, 2, 3].into(),
            ready: ready.iter().copied().collect(),
        }
    }

    #[test]
    fn a_node_leading_two_more_than_another_hands_one_to_the_least_loaded() {
        // Node 1 came back: 2 and 3 lead everything.
        let views = [
            group(1, 2, &[1, 3]),
            group(2, 2, &[1, 3]),
            group(3, 2, &[1, 3]),
            group(4, 3, &[1, 2]),
            group(5, 3, &[1, 2]),
            group(6, 3, &[1, 2]),
        ];
        assert_eq!(choose(2, &views), Some((1, 1)));
        assert_eq!(choose(3, &views), Some((4, 1)));
        assert_eq!(
            choose(1, &views),
            None,
            "a node leading nothing gives nothing"
        );
    }

    #[test]
    fn a_spread_within_one_stays_and_an_unknown_leader_stops_everything() {
        let even = [
            group(1, 1, &[2, 3]),
            group(2, 1, &[2, 3]),
            group(3, 2, &[1, 3]),
            group(4, 3, &[1, 2]),
        ];
        for me in 1..=3 {
            assert_eq!(choose(me, &even), None, "node {me}");
        }
        let mut electing = [
            group(1, 1, &[2, 3]),
            group(2, 1, &[2, 3]),
            group(3, 1, &[2, 3]),
            group(4, 2, &[1, 3]),
        ];
        assert_eq!(choose(1, &electing), Some((1, 3)));
        electing[3].leader = None;
        assert_eq!(choose(1, &electing), None);
    }

    #[test]
    fn only_a_ready_voter_takes_over() {
        // Node 3 lags in every group node 1 leads: nothing moves to it, and
        // node 2 is only one behind.
        let views = [group(1, 1, &[2]), group(2, 1, &[2]), group(3, 2, &[1])];
        assert_eq!(choose(1, &views), None);
        let ready = [group(1, 1, &[2, 3]), group(2, 1, &[2]), group(3, 2, &[1])];
        assert_eq!(choose(1, &ready), Some((1, 3)));
    }
}
