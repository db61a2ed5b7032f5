//! Standing for election when a less up-to-date candidate asks for a vote.
//!
//! When a group's leader dies, the follower whose election timer fires
//! first stands. If its log is shorter than another follower's, that
//! follower refuses it, and openraft then waits: the refused candidate
//! holds itself back two more election timeouts, while the follower with
//! the longer log waits for its own timer, which a flag left from an
//! earlier election may lengthen by two timeouts as well, and whose first
//! campaign then collides with the refused candidate's vote for itself in
//! the same term. Measured: one kill in four or five under steady writes
//! took 1.8–3.2 s to a new leader instead of 0.8–1.1 s (on openraft 0.9;
//! 0.10 elects by the same rules while pre-vote is off).
//!
//! Raft's safety never depends on who stands or when, so a follower that
//! refuses a candidate for its shorter log, and has itself heard no leader
//! for a whole lease, stands at once instead. Its first campaign only moves
//! it past the refused candidate's term, so it campaigns once more than the
//! gap between the terms: its second (or later) vote request carries a term
//! the refused candidate has not voted in, and a log it cannot refuse.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::raft::{AppendEntriesResponse, VoteRequest, VoteResponse};

use crate::types::{GroupId, Raft, TypeConfig};

/// The most campaigns one refusal starts: a candidate far ahead in term
/// (a node back from a long partition) is left to openraft's own timers.
const MAX_CAMPAIGNS: u64 = 3;

/// When this node last heard each group's leader, and the highest term it
/// stood in because of a refusal.
pub(crate) struct Stand {
    /// A leader's lease (openraft: election_max): a follower that heard its
    /// leader within it refuses every candidate anyway.
    lease: Duration,
    groups: Mutex<HashMap<GroupId, Heard>>,
}

#[derive(Clone, Copy, Default)]
struct Heard {
    /// The last append-entries from a leader this node accepted as current.
    leader_at: Option<Instant>,
    /// The candidate term this node last stood against.
    stood_against: u64,
}

impl Stand {
    pub(crate) fn new(lease: Duration) -> Self {
        Self {
            lease,
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// Notes an append-entries answered for `group`: unless it came from a
    /// deposed leader, a current leader was heard now.
    pub(crate) fn appended(&self, group: GroupId, response: &AppendEntriesResponse<TypeConfig>) {
        if matches!(response, AppendEntriesResponse::HigherVote(_)) {
            return;
        }
        self.lock().entry(group).or_default().leader_at = Some(Instant::now());
    }

    /// After this node answered `request` with `response` for `group`:
    /// campaigns as many times as it should, at once (see the module doc).
    pub(crate) async fn after_vote(
        &self,
        group: GroupId,
        raft: &Raft,
        request: &VoteRequest<TypeConfig>,
        response: &VoteResponse<TypeConfig>,
    ) {
        let campaigns = {
            let mut groups = self.lock();
            let heard = groups.entry(group).or_default();
            let silent = heard.leader_at.map(|at| at.elapsed());
            let campaigns = campaigns(request, response, silent, self.lease);
            let term = request.vote.leader_id().term;
            if campaigns == 0 || term <= heard.stood_against {
                return;
            }
            heard.stood_against = term;
            campaigns
        };
        tracing::info!(
            group,
            candidate = %request.vote,
            candidate_log = ?request.last_log_id,
            my_log = ?response.last_log_id,
            campaigns,
            "refused a candidate with a shorter log; standing at once"
        );
        for _ in 0..campaigns {
            if let Err(e) = raft.trigger().elect(false).await {
                tracing::debug!(group, error = %e, "could not stand for election");
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, Heard>> {
        self.groups.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many campaigns to start after answering `request` with `response`,
/// having last heard a leader `silent` ago (never: `None`): none unless this
/// node refused the candidate for a log shorter than its own, has moved to
/// no term as high as the candidate's, and its leader's lease has run out.
/// Then one more than the terms between them, so the last campaign's term
/// is above the candidate's own vote, capped at [`MAX_CAMPAIGNS`].
fn campaigns(
    request: &VoteRequest<TypeConfig>,
    response: &VoteResponse<TypeConfig>,
    silent: Option<Duration>,
    lease: Duration,
) -> u64 {
    let candidate_term = request.vote.leader_id().term;
    let my_term = response.vote.leader_id().term;
    let shorter_log = response.last_log_id > request.last_log_id;
    let lease_over = silent.is_none_or(|silent| silent > lease);
    if response.vote_granted || !shorter_log || !lease_over || candidate_term <= my_term {
        return 0;
    }
    let needed = candidate_term - my_term + 1;
    if needed > MAX_CAMPAIGNS {
        0
    } else {
        needed
    }
}

#[cfg(test)]
mod tests {
    use openraft::impls::leader_id_adv::LeaderId;

    use super::*;
    use crate::types::{LogId, NodeId, Vote};

    const LEASE: Duration = Duration::from_millis(500);

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(LeaderId { term, node_id: 1 }, index))
    }

    fn request(term: u64, candidate: NodeId, last: Option<LogId>) -> VoteRequest<TypeConfig> {
        VoteRequest::new(Vote::new(term, candidate), last)
    }

    fn refusal(vote: Vote, last: Option<LogId>) -> VoteResponse<TypeConfig> {
        VoteResponse::new(vote, last, false)
    }

    fn leader_vote(term: u64, leader: NodeId) -> Vote {
        Vote::new_committed(term, leader)
    }

    #[test]
    fn a_refused_shorter_log_after_the_lease_makes_this_node_campaign_past_its_term() {
        // The case measured: leader 1 of term 23 died; node 3 stands in term
        // 24 with entry 50701; this node holds 50702.
        let asked = request(24, 3, log(23, 50701));
        let answer = refusal(leader_vote(23, 1), log(23, 50702));
        let silent = Some(Duration::from_millis(900));
        assert_eq!(campaigns(&asked, &answer, silent, LEASE), 2);
        // Never heard a leader (just restarted): the lease is over too.
        assert_eq!(campaigns(&asked, &answer, None, LEASE), 2);
    }

    #[test]
    fn nothing_happens_while_the_leader_is_heard_or_the_log_is_not_longer() {
        let asked = request(24, 3, log(23, 50701));
        let answer = refusal(leader_vote(23, 1), log(23, 50702));
        let heard = Some(Duration::from_millis(120));
        assert_eq!(campaigns(&asked, &answer, heard, LEASE), 0, "leader alive");

        let silent = Some(Duration::from_secs(1));
        let equal = refusal(leader_vote(23, 1), log(23, 50701));
        assert_eq!(campaigns(&asked, &equal, silent, LEASE), 0, "same log");
        let granted = VoteResponse::new(Vote::new(24, 3), log(23, 50701), true);
        assert_eq!(campaigns(&asked, &granted, silent, LEASE), 0, "granted");
    }

    #[test]
    fn nothing_happens_when_this_node_is_already_as_far_or_the_candidate_too_far() {
        let silent = Some(Duration::from_secs(1));
        let asked = request(24, 3, log(23, 50701));
        // This node already campaigned in term 24 itself.
        let mine = refusal(Vote::new(24, 2), log(23, 50702));
        assert_eq!(campaigns(&asked, &mine, silent, LEASE), 0);
        // A candidate five terms ahead: openraft's timers handle it.
        let far = request(28, 3, log(23, 50701));
        let answer = refusal(leader_vote(23, 1), log(23, 50702));
        assert_eq!(campaigns(&far, &answer, silent, LEASE), 0);
        // Three campaigns (terms 24, 25, 26) pass a candidate of term 25.
        let two_ahead = request(25, 3, log(23, 50701));
        assert_eq!(campaigns(&two_ahead, &answer, silent, LEASE), 3);
    }
}
