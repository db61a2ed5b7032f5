//! `bench failover`: how long a shard stops acknowledging when its leader
//! dies.
//!
//! C senders send steadily, one message at a time, to users of one shard.
//! Each trial finds the shard's leader in the nodes' `/status` (the one a
//! majority names at the highest term, waiting out a hand-over), kills that
//! node with `--kill-cmd`, waits until every sender has been acknowledged
//! again, then starts the node again with `--start-cmd` and waits until its
//! replica of the shard has caught up. A trial's figure is the longest time
//! in which no sender got an acknowledgement (the shard's outage as its
//! users see it), from just before the kill until the end of the trial; the
//! longest gap of any single sender is reported beside it (a sender
//! connected to the killed node must also notice and reconnect).
//!
//! The commands are templates: `{node}` becomes the leader's node id, e.g.
//! `--kill-cmd "scripts/cluster.sh kill {node}"
//!  --start-cmd "scripts/cluster.sh start-node {node}"`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use fishchat_client::TEXT_PLAIN;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{ensure_users, new_histogram, parse_duration, Latency};
use crate::settings::Settings;
use crate::status::{self, NodeStatus, ShardStatus};

/// Options of `bench failover`.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// The shard whose leader is killed; every message goes to its users.
    #[arg(long, default_value_t = 0)]
    pub shard: u32,
    /// How many times to kill the shard's leader.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Concurrent senders, each its own session.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Command that kills node `{node}` (run with `sh -c`).
    #[arg(long)]
    pub kill_cmd: String,
    /// Command that starts node `{node}` again (run with `sh -c`).
    #[arg(long)]
    pub start_cmd: String,
    /// Steady sending before each kill, and after the restart.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub settle: Duration,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Prefix of the bench users' names.
    #[arg(long, default_value = "fail")]
    pub prefix: String,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
}

/// One kill.
#[derive(Debug, Serialize)]
pub struct Trial {
    /// The node killed (the shard's leader).
    pub node: u64,
    /// Longest time without any acknowledgement, ms.
    pub gap_ms: f64,
    /// Longest time one sender went without an acknowledgement, ms.
    pub worst_sender_gap_ms: f64,
}

/// What `bench failover` measured.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    /// Always "failover".
    pub mode: &'static str,
    /// The shard whose leader was killed.
    pub shard: u32,
    /// Senders.
    pub clients: usize,
    /// Every trial.
    pub trials: Vec<Trial>,
    /// The trials' gaps (p50, p99, max over trials).
    pub gap: Latency,
    /// Messages acknowledged during the run.
    pub acked: u64,
    /// Sends that failed (after the client's own retries).
    pub failed: u64,
}

/// Acknowledgement times of every sender.
#[derive(Default)]
struct Acks {
    times: Mutex<Vec<Vec<Instant>>>,
    failed: std::sync::atomic::AtomicU64,
}

impl Acks {
    fn record(&self, sender: usize, at: Instant) {
        let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = times.get_mut(sender) {
            list.push(at);
        }
    }

    /// The longest gap overall and the longest of one sender in `[from, to]`.
    fn gaps(&self, from: Instant, to: Instant) -> (Duration, Duration) {
        let times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Instant> = times.iter().flatten().copied().collect();
        all.sort_unstable();
        let overall = longest_gap(&all, from, to);
        let worst = times
            .iter()
            .map(|list| longest_gap(list, from, to))
            .max()
            .unwrap_or_default();
        (overall, worst)
    }

    fn acked(&self) -> u64 {
        let times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        times.iter().map(|l| l.len() as u64).sum()
    }
}

/// The longest stretch of `[from, to]` holding none of `sorted` times.
fn longest_gap(sorted: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in sorted.iter().filter(|&&t| t >= from && t <= to) {
        longest = longest.max(t.duration_since(last));
        last = t;
    }
    longest.max(to.saturating_duration_since(last))
}

/// `bench failover`.
pub async fn run(settings: &Settings, args: &FailoverArgs) -> anyhow::Result<FailoverReport> {
    if args.clients == 0 || args.trials == 0 {
        bail!("--clients and --trials must be at least 1");
    }
    let shards = shard_count(settings).await?;
    if args.shard >= shards {
        bail!(
            "--shard {} does not exist (the cluster has {shards})",
            args.shard
        );
    }
    eprintln!("bench: finding users of shard {}", args.shard);
    let recipients = users_of_shard(settings, &args.prefix, args.shard, shards, 4).await?;
    let senders = super::sessions(settings, &args.prefix, args.clients).await?;
    let acks = Arc::new(Acks {
        times: Mutex::new(vec![Vec::new(); args.clients]),
        ..Acks::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, client) in senders.into_iter().enumerate() {
        let (acks, stop, recipients) = (acks.clone(), stop.clone(), recipients.clone());
        let body = vec![b'f'; args.size];
        tasks.push(tokio::spawn(async move {
            let tag = fishchat_client::new_client_msg_id()?;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let to = recipients[(n as usize + i) % recipients.len()];
                match client
                    .send(to, &format!("{tag}-{n}"), body.clone(), TEXT_PLAIN)
                    .await
                {
                    Ok(_) => acks.record(i, Instant::now()),
                    Err(_) => {
                        acks.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            client.close();
            anyhow::Ok(())
        }));
    }
    let mut trials = Vec::new();
    let outcome = run_trials(settings, args, &acks, &mut trials).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    outcome?;
    let mut histogram: Histogram<u64> = new_histogram()?;
    for trial in &trials {
        histogram.saturating_record(((trial.gap_ms * 1000.0) as u64).max(1));
    }
    Ok(FailoverReport {
        mode: "failover",
        shard: args.shard,
        clients: args.clients,
        gap: Latency::of(&histogram),
        trials,
        acked: acks.acked(),
        failed: acks.failed.load(Ordering::Relaxed),
    })
}

async fn run_trials(
    settings: &Settings,
    args: &FailoverArgs,
    acks: &Acks,
    trials: &mut Vec<Trial>,
) -> anyhow::Result<()> {
    for trial in 1..=args.trials {
        tokio::time::sleep(args.settle).await;
        let node = leader_of(settings, args.shard, Duration::from_secs(30)).await?;
        let from = Instant::now() - Duration::from_millis(200);
        eprintln!(
            "bench: trial {trial}: killing node {node}, leader of shard {}",
            args.shard
        );
        run_command(&args.kill_cmd, node)?;
        wait_for_flow(acks, args.settle, Duration::from_secs(60)).await?;
        let (gap, worst) = acks.gaps(from, Instant::now());
        eprintln!(
            "bench: trial {trial}: longest gap {:.0} ms (worst sender {:.0} ms)",
            gap.as_secs_f64() * 1000.0,
            worst.as_secs_f64() * 1000.0
        );
        trials.push(Trial {
            node,
            gap_ms: gap.as_secs_f64() * 1000.0,
            worst_sender_gap_ms: worst.as_secs_f64() * 1000.0,
        });
        run_command(&args.start_cmd, node)?;
        wait_caught_up(settings, args.shard, Duration::from_secs(60)).await?;
    }
    Ok(())
}

/// Runs a command template with `{node}` filled in; fails unless it succeeds.
fn run_command(template: &str, node: u64) -> anyhow::Result<()> {
    let command = template.replace("{node}", &node.to_string());
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Waits (from the kill) at least `settle`, until every sender has been
/// acknowledged again (a sender connected to the killed node must first
/// notice and reconnect), and until acknowledgements flow: one arrived in
/// the last 200 ms.
async fn wait_for_flow(acks: &Acks, settle: Duration, within: Duration) -> anyhow::Result<()> {
    let killed = Instant::now();
    loop {
        let (all_resumed, latest) = {
            let times = acks.times.lock().unwrap_or_else(|p| p.into_inner());
            let lasts: Vec<Option<Instant>> = times.iter().map(|l| l.last().copied()).collect();
            (
                lasts.iter().all(|last| last.is_some_and(|at| at > killed)),
                lasts.into_iter().flatten().max(),
            )
        };
        let flowing = latest.is_some_and(|at| at.elapsed() < Duration::from_millis(200));
        if killed.elapsed() >= settle && all_resumed && flowing {
            return Ok(());
        }
        if killed.elapsed() > within {
            bail!("not every sender was acknowledged again within {within:?} of the kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every node's `/status` that answers.
async fn statuses(settings: &Settings) -> Vec<NodeStatus> {
    let mut found = Vec::new();
    for server in &settings.servers {
        let Ok(admin) = status::admin_address(server) else {
            continue;
        };
        if let Ok(text) = status::fetch(&admin).await {
            if let Ok(node) = serde_json::from_str::<NodeStatus>(&text) {
                found.push(node);
            }
        }
    }
    found
}

async fn shard_count(settings: &Settings) -> anyhow::Result<u32> {
    statuses(settings)
        .await
        .iter()
        .map(|s| s.shards.len() as u32)
        .max()
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow!("no node answered /status"))
}

/// The node that leads `shard` (see [`agreed_leader`]), waiting up to
/// `within` for one: an election or a leader hand-over may be under way.
async fn leader_of(settings: &Settings, shard: u32, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        let nodes = statuses(settings).await;
        if let Some((leader, _)) = agreed_leader(&nodes, shard, settings.servers.len()) {
            return Ok(leader);
        }
        if Instant::now() > deadline {
            bail!("no node led shard {shard} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader of `shard` a majority of the `cluster_size` nodes agree on:
/// the replica that calls itself leader at the highest term, named as
/// leader at that term by enough of the others. A deposed leader that has
/// not yet heard of its successor still calls itself leader; killing it
/// would measure nothing.
fn agreed_leader(
    nodes: &[NodeStatus],
    shard: u32,
    cluster_size: usize,
) -> Option<(u64, &ShardStatus)> {
    let replicas: Vec<(u64, &ShardStatus)> = nodes
        .iter()
        .filter_map(|n| {
            n.shards
                .iter()
                .find(|s| s.shard == shard)
                .map(|s| (n.node, s))
        })
        .collect();
    let (leader, status) = replicas
        .iter()
        .filter(|(_, s)| s.role == "leader")
        .max_by_key(|(_, s)| s.term)
        .copied()?;
    let naming = replicas
        .iter()
        .filter(|(id, s)| s.term == status.term && (*id == leader || s.leader == Some(leader)))
        .count();
    (naming * 2 > cluster_size).then_some((leader, status))
}

/// Waits until every node answers /status, `shard` has a leader, and every
/// replica of it has applied what the leader had committed when the wait
/// began: the next kill then starts from a steady cluster, not from a
/// restarted node still catching up (which would slow the election).
async fn wait_caught_up(settings: &Settings, shard: u32, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut target: Option<u64> = None;
    loop {
        let nodes = statuses(settings).await;
        let replicas: Vec<&ShardStatus> = nodes
            .iter()
            .filter_map(|n| n.shards.iter().find(|s| s.shard == shard))
            .collect();
        if nodes.len() == settings.servers.len() {
            if let Some((_, leader)) = agreed_leader(&nodes, shard, nodes.len()) {
                let goal = *target.get_or_insert(leader.committed);
                if replicas.iter().all(|s| s.applied >= goal) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("shard {shard} did not settle within {within:?} after a restart");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The ids of `count` users in `shard` among `<prefix>0, <prefix>1, …`
/// (user ids encode their shard: id mod shards), registering as needed.
async fn users_of_shard(
    settings: &Settings,
    prefix: &str,
    shard: u32,
    shards: u32,
    count: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut total = count * shards as usize;
    loop {
        let ids = ensure_users(settings, prefix, total).await?;
        let found: Vec<u64> = ids
            .into_iter()
            .filter(|id| id % u64::from(shards) == u64::from(shard))
            .take(count)
            .collect();
        if found.len() == count {
            return Ok(found);
        }
        if total > 64 * shards as usize * count {
            bail!("no {count} users of shard {shard} among {total}");
        }
        total *= 2;
    }
}

/// Prints the report's lines.
pub fn print(report: &FailoverReport) {
    println!(
        "failover: shard {}, {} senders, {} trials; {} acked, {} failed",
        report.shard,
        report.clients,
        report.trials.len(),
        report.acked,
        report.failed
    );
    for (i, trial) in report.trials.iter().enumerate() {
        println!(
            "  trial {}: killed node {}: longest gap {:.0} ms, worst sender {:.0} ms",
            i + 1,
            trial.node,
            trial.gap_ms,
            trial.worst_sender_gap_ms
        );
    }
    println!("longest ack gap over trials: {}", report.gap);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_window_edges() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let times = [at(100), at(150), at(900), at(1000)];
        assert_eq!(
            longest_gap(&times, t0, at(1100)),
            Duration::from_millis(750)
        );
        assert_eq!(
            longest_gap(&times, at(950), at(2000)),
            Duration::from_millis(1000)
        );
        assert_eq!(longest_gap(&[], t0, at(300)), Duration::from_millis(300));
    }

    fn node(id: u64, role: &str, leader: Option<u64>, term: u64) -> NodeStatus {
        let shard: ShardStatus = serde_json::from_value(serde_json::json!({
            "shard": 0, "role": role, "leader": leader, "term": term,
        }))
        .expect("a shard status");
        NodeStatus {
            node: id,
            client_addr: String::new(),
            shards: vec![shard],
        }
    }

    #[test]
    fn the_leader_is_the_one_a_majority_names_at_the_highest_term() {
        let leader = |nodes: &[NodeStatus]| agreed_leader(nodes, 0, 3).map(|(id, _)| id);
        let settled = [
            node(1, "follower", Some(2), 7),
            node(2, "leader", Some(2), 7),
            node(3, "follower", Some(2), 7),
        ];
        assert_eq!(leader(&settled), Some(2));
        // Node 1 still thinks it leads at term 6; 3 already follows 2.
        let handing_over = [
            node(1, "leader", Some(1), 6),
            node(2, "leader", Some(2), 7),
            node(3, "follower", Some(2), 7),
        ];
        assert_eq!(leader(&handing_over), Some(2));
        // A new leader nobody else has heard of yet is not agreed on.
        let just_elected = [
            node(1, "follower", Some(1), 6),
            node(2, "leader", Some(2), 7),
            node(3, "follower", Some(1), 6),
        ];
        assert_eq!(leader(&just_elected), None);
        assert_eq!(
            leader(&just_elected[1..2]),
            None,
            "one of three nodes answered"
        );
        assert_eq!(leader(&[]), None);
    }
}
