//! A chaos run, from a seed: a real cluster, clients sending one-to-one and
//! group messages, faults injected from outside on a schedule the seed
//! draws, and at the end the [checker](crate::checker) judging the recorded
//! [history](crate::history) against every inbox read through every node.
//!
//! The nemesis injects one fault at a time, holds it (kills 1–5 s, freezes
//! 1–8 s, partitions from 2 s up to a twelfth of the run, but between 5 and
//! 20 s), repairs it, and lets the cluster run two to five seconds before
//! the next. No fault outlasts the sending.
//! It draws the faults in rounds: each round is every [`FaultKind`] once, in
//! an order the seed shuffles, so even a short run sees each kind and a long
//! one sees them all about equally often.
//!
//! Each client is one user with its own QUIC connection, trying the nodes in
//! its own order. It sends to a user or to the run's group, picked by the
//! seed, with a body and client message id of its own; a send whose outcome
//! is unknown is tried again with the same id (twice at most), each try
//! recorded as an op. The last two users are not in the group, so their
//! group sends must be refused (PERMISSION_DENIED) and stored nowhere.
//!
//! The same seed gives the same schedule and the same choices of target;
//! timing on a loaded machine decides the rest, so a seed reproduces the
//! kind of run, not every byte of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fishchat_client::{Client, ClientConfig, ClientError};
use serde::Serialize;

use crate::checker::{check, Counts, Verdict, Violation};
use crate::history::{
    History, InboxEntry, InboxRead, Observed, Outcome, OwnRead, ShardReplica, Target, UserId,
};
use crate::{Cluster, ClusterSpec};

/// The password of every user of a run.
const PASSWORD: &str = "chaos horse";
/// Longest wait, after the run, for the watching clients to be given what
/// their inboxes hold.
const CATCH_UP: Duration = Duration::from_secs(60);

/// What a run does.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// Draws the schedule and the workload's choices.
    pub seed: u64,
    /// How long clients send while faults are injected.
    pub duration: Duration,
    /// Nodes in the cluster (3 or 5).
    pub nodes: u64,
    /// Concurrent clients, one user each (at least 4).
    pub clients: u64,
    /// Shards of the cluster.
    pub shards: u32,
    /// Where the report, the history and the final state are written.
    pub out_dir: PathBuf,
    /// Print a progress line on standard error while the run sends.
    pub progress: bool,
}

/// A kind of fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL one node, restart it on its data.
    KillOne,
    /// SIGKILL a majority of the nodes at once, restart them.
    KillMajority,
    /// SIGKILL every node, restart them all.
    KillAll,
    /// SIGSTOP one node, SIGCONT it.
    Freeze,
    /// Cut one node's peer links, both ways, then heal.
    IsolateOne,
    /// Cut the node leading most shards, with a minority of the others,
    /// from the majority, then heal.
    IsolateLeader,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::KillOne,
        FaultKind::KillMajority,
        FaultKind::KillAll,
        FaultKind::Freeze,
        FaultKind::IsolateOne,
        FaultKind::IsolateLeader,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillOne => "kill_one",
            FaultKind::KillMajority => "kill_majority",
            FaultKind::KillAll => "kill_all",
            FaultKind::Freeze => "freeze",
            FaultKind::IsolateOne => "isolate_one",
            FaultKind::IsolateLeader => "isolate_leader",
        }
    }
}

/// One fault the nemesis injected.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    /// Seconds from the start of sending to the injection.
    pub at_secs: f64,
    /// Its kind.
    pub kind: FaultKind,
    /// The nodes it struck (killed, frozen, or cut off from the rest).
    pub nodes: Vec<u64>,
    /// How long it was held before the repair, in milliseconds.
    pub held_ms: u64,
}

/// What a run found: the input of the human summary and the JSON file.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    /// The seed that reproduces the run.
    pub seed: u64,
    /// Nodes in the cluster.
    pub nodes: u64,
    /// Concurrent clients.
    pub clients: u64,
    /// Shards of the cluster.
    pub shards: u32,
    /// Seconds of sending asked for.
    pub duration_secs: u64,
    /// Seconds of sending under faults, as it happened.
    pub sending_secs: f64,
    /// Seconds the whole run took, reading back and checking included.
    pub total_secs: f64,
    /// How the ops ended.
    pub counts: Counts,
    /// Definite refusals by code.
    pub refusals: BTreeMap<String, u64>,
    /// Faults injected, by kind.
    pub faults_by_kind: BTreeMap<FaultKind, u64>,
    /// Every fault, in order.
    pub faults: Vec<Fault>,
    /// Each check's verdict.
    pub checks: Vec<Verdict>,
    /// Every violation found.
    pub violations: Vec<Violation>,
    /// True when every check passed.
    pub passed: bool,
}

impl ChaosReport {
    /// The summary people read: counts, faults, verdicts, the seed.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.counts;
        let _ = writeln!(
            s,
            "FishChat chaos run: seed {}, {} nodes, {} clients, {} shards, {:.0} s of sending ({:.0} s in all)",
            self.seed, self.nodes, self.clients, self.shards, self.sending_secs, self.total_secs
        );
        let refusals: Vec<String> = self
            .refusals
            .iter()
            .map(|(code, n)| format!("{n} {code}"))
            .collect();
        let _ = writeln!(
            s,
            "ops: {} invoked, {} ok, {} failed ({}), {} unknown",
            c.invoked,
            c.ok,
            c.failed,
            if refusals.is_empty() {
                "none".to_string()
            } else {
                refusals.join(", ")
            },
            c.unknown
        );
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(kind, n)| format!("{} {n}", kind.name()))
            .collect();
        let _ = writeln!(
            s,
            "faults: {} injected ({})",
            self.faults.len(),
            kinds.join(", ")
        );
        for f in &self.faults {
            let _ = writeln!(
                s,
                "  {:>8.1} s  {:<15} nodes {:?} for {:.1} s",
                f.at_secs,
                f.kind.name(),
                f.nodes,
                f.held_ms as f64 / 1000.0
            );
        }
        let _ = writeln!(s, "checks:");
        for v in &self.checks {
            let _ = writeln!(
                s,
                "  {}  {} ({} violations)",
                if v.passed { "pass" } else { "FAIL" },
                v.check,
                v.violations
            );
        }
        for v in &self.violations {
            let _ = writeln!(s, "  {v}");
        }
        let _ = writeln!(
            s,
            "verdict: {}; reproduce with: scripts/chaos.sh --seed {} --duration {}s --nodes {} --clients {} --shards {}",
            if self.passed { "PASSED" } else { "FAILED" },
            self.seed,
            self.duration_secs,
            self.nodes,
            self.clients,
            self.shards
        );
        s
    }
}

/// A small deterministic generator (xorshift64*): the schedule and the
/// workload's choices follow from the seed alone.
pub struct Dice(u64);

impl Dice {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }
}

/// Runs a whole chaos session and writes its files into `config.out_dir`:
/// `report.json`, `summary.txt`, `history.jsonl`, `observed.json` and each
/// node's log.
pub fn run(config: &ChaosConfig) -> anyhow::Result<ChaosReport> {
    ensure!(
        config.nodes == 3 || config.nodes == 5,
        "a chaos run has 3 or 5 nodes"
    );
    ensure!(config.clients >= 4, "a chaos run has at least 4 clients");
    std::fs::create_dir_all(&config.out_dir)
        .with_context(|| format!("creating {}", config.out_dir.display()))?;
    let began = Instant::now();
    let mut cluster = Cluster::launch(ClusterSpec {
        nodes: config.nodes,
        shards: config.shards,
        args: Vec::new(),
        partitionable: true,
    })?;
    for id in cluster.node_ids() {
        cluster.wait_ready(id, Duration::from_secs(90))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let history = History::new();
    let faults = Mutex::new(Vec::new());
    let (users, group) = runtime.block_on(set_up(&cluster, config))?;
    let clients = runtime.block_on(async {
        let mut clients = Vec::new();
        for (i, (name, user)) in users.iter().enumerate() {
            let client = Client::connect(client_config(&cluster, i as u64)?).await?;
            client.login(name, PASSWORD, None).await?;
            clients.push((client, *user));
        }
        anyhow::Ok(clients)
    })?;
    // Every client also watches its inbox, as an app does, through the
    // faults: what it is given is checked against what is stored.
    let delivered = runtime.block_on(async { watch(&clients) });
    let sending = Instant::now();
    runtime.block_on(async {
        let until = sending + config.duration;
        let recipients: Vec<UserId> = users.iter().map(|(_, id)| *id).collect();
        let workers = clients.iter().enumerate().map(|(w, (client, user))| {
            work(
                w as u64,
                client,
                *user,
                &recipients,
                group,
                config.seed,
                until,
                &history,
            )
        });
        let progress = report_progress(config, sending, until, &history, &faults);
        let (_, nemesis, ()) = tokio::join!(
            futures::future::join_all(workers),
            nemesis(&mut cluster, config, sending, until, &faults),
            progress
        );
        nemesis
    })?;
    let sending_secs = sending.elapsed().as_secs_f64();
    if config.progress {
        eprintln!("\nchaos: sending done; waiting for the cluster to settle, then reading back");
    }
    // From here on a failure is what a post-mortem needs most: the history
    // and the node logs are written before anything can fail.
    history.write_jsonl(&config.out_dir.join("history.jsonl"))?;
    let mut observed = match observe(&cluster, &runtime, &users) {
        Ok(observed) => observed,
        Err(e) => {
            save_logs(&cluster, &config.out_dir)?;
            return Err(e.context(format!(
                "the cluster did not settle after the faults; history and node logs are in {}",
                config.out_dir.display()
            )));
        }
    };
    observed.delivered = runtime.block_on(caught_up(&delivered, &observed));
    observed.own_reads = history.own_reads();
    for (client, _) in &clients {
        client.close();
    }
    let members: BTreeSet<UserId> = users[..users.len() - 2].iter().map(|u| u.1).collect();
    let outsiders: BTreeSet<UserId> = users[users.len() - 2..].iter().map(|u| u.1).collect();
    let ops = history.ops();
    let checked = check(&ops, &observed, &BTreeMap::from([(group, members)]));
    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    let mut unexpected = 0;
    for op in &ops {
        if let Outcome::Failed { code } = &op.outcome {
            *refusals.entry(code.clone()).or_default() += 1;
            let expected = code == "PERMISSION_DENIED"
                && op.target == Target::Group(group)
                && outsiders.contains(&op.sender);
            if !expected {
                unexpected += 1;
            }
        }
    }
    let mut checks = checked.verdicts();
    checks.push(Verdict {
        check: "only non-members' group sends are refused".to_string(),
        passed: unexpected == 0,
        violations: unexpected,
    });
    let faults = faults.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut faults_by_kind = BTreeMap::new();
    for f in &faults {
        *faults_by_kind.entry(f.kind).or_default() += 1;
    }
    let report = ChaosReport {
        seed: config.seed,
        nodes: config.nodes,
        clients: config.clients,
        shards: config.shards,
        duration_secs: config.duration.as_secs(),
        sending_secs,
        total_secs: began.elapsed().as_secs_f64(),
        counts: checked.counts.clone(),
        refusals,
        faults_by_kind,
        faults,
        passed: checks.iter().all(|c| c.passed),
        checks,
        violations: checked.violations,
    };
    write_files(&config.out_dir, &report, &observed)?;
    save_logs(&cluster, &config.out_dir)?;
    Ok(report)
}

/// Every node's log, into `dir`.
fn save_logs(cluster: &Cluster, dir: &Path) -> anyhow::Result<()> {
    for id in cluster.node_ids() {
        let path = dir.join(format!("node{id}.log"));
        std::fs::write(&path, cluster.log(id))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Waits for the cluster to settle and reads what it holds: every inbox
/// through every node, every replica's digest. Replicas that do not come to
/// agree are left for the checker to report, with their indexes and digests.
fn observe(
    cluster: &Cluster,
    runtime: &tokio::runtime::Runtime,
    users: &[(String, UserId)],
) -> anyhow::Result<Observed> {
    settle(cluster)?;
    let inboxes = runtime.block_on(read_back(cluster, users))?;
    let replicas = settle(cluster)?;
    Ok(Observed {
        inboxes,
        replicas,
        delivered: BTreeMap::new(),
        own_reads: Vec::new(),
    })
}

/// Registers the run's users and makes its group (every user but the last two).
async fn set_up(
    cluster: &Cluster,
    config: &ChaosConfig,
) -> anyhow::Result<(Vec<(String, UserId)>, u64)> {
    let mut users = Vec::new();
    for i in 0..config.clients {
        let name = format!("chaos{i}");
        let client = Client::connect(client_config(cluster, i)?).await?;
        users.push((name.clone(), client.register(&name, PASSWORD).await?));
        client.close();
    }
    let owner = Client::connect(client_config(cluster, 0)?).await?;
    owner.login(&users[0].0, PASSWORD, None).await?;
    let others: Vec<UserId> = users[1..users.len() - 2].iter().map(|u| u.1).collect();
    let group = owner.create_group("chaos", &others).await?.group_id;
    owner.close();
    Ok((users, group))
}

/// Client settings for client `i`: every node, starting from its own.
fn client_config(cluster: &Cluster, i: u64) -> anyhow::Result<ClientConfig> {
    let ids = cluster.node_ids();
    let n = ids.len();
    let addrs = (0..n)
        .map(|k| cluster.client_addr(ids[(i as usize + k) % n]))
        .collect();
    let mut config = ClientConfig::from_ca_file(addrs, cluster.ca_path())?;
    // Give up sooner than a user's app would: an unknown outcome is then
    // retried by the workload with the same id, which is what we test.
    config.request_timeout = Duration::from_secs(5);
    config.retry_deadline = Duration::from_secs(10);
    Ok(config)
}

/// How a send's error is recorded: a definite refusal, or unknown.
fn outcome_of(error: &ClientError) -> Outcome {
    match error {
        ClientError::Server {
            code,
            retryable: false,
            ..
        } if code.as_str_name() != "INTERNAL" => Outcome::Failed {
            code: code.as_str_name().to_string(),
        },
        other => Outcome::Unknown {
            why: other.to_string(),
        },
    }
}

/// Tries of one send whose outcome stays unknown.
const TRIES: usize = 3;
/// One send in this many is followed by a sync of the sender's inbox that
/// must hold it (read your writes).
const OWN_READ_EVERY: u64 = 8;

/// Syncs `client`'s own inbox from `seen` to its end, advancing `seen`:
/// whether it holds `message_id`, or `None` when a sync failed.
async fn own_inbox_holds(client: &Client, seen: &mut u64, message_id: u64) -> Option<bool> {
    let mut found = false;
    loop {
        let page = client.sync(*seen, 1000).await.ok()?;
        found |= page.entries.iter().any(|e| e.message_id == message_id);
        let Some(last) = page.entries.last() else {
            return Some(found);
        };
        *seen = last.version;
        if !page.more {
            return Some(found);
        }
    }
}

/// One client: sends as `user` until `until`, to users and the group.
#[allow(clippy::too_many_arguments)]
async fn work(
    worker: u64,
    client: &Client,
    user: UserId,
    users: &[UserId],
    group: u64,
    seed: u64,
    until: Instant,
    history: &History,
) {
    let mut dice = Dice::new(seed ^ ((worker + 1) * 7919));
    let mut n = 0u64;
    // The highest version of the sender's own inbox read so far: every copy
    // of a later send is above it.
    let mut own_seen = 0u64;
    while Instant::now() < until {
        let pick = dice.below(users.len() as u64 + 1) as usize;
        let target = match users.get(pick) {
            Some(&to) => Target::User(to),
            None => Target::Group(group),
        };
        let body = format!("s{seed}-w{worker}-{n}");
        n += 1;
        let check_own_read = n.is_multiple_of(OWN_READ_EVERY);
        for _ in 0..TRIES {
            let op = history.invoke(worker, user, target, &body, &body);
            let bytes = body.clone().into_bytes();
            let answer = match target {
                Target::User(to) => client
                    .send(to, &body, bytes, "text/plain")
                    .await
                    .map(|a| (a.message_id, a.version)),
                Target::Group(g) => client
                    .send_group(g, &body, bytes, "text/plain")
                    .await
                    .map(|a| (a.message_id, a.group_seq)),
            };
            let outcome = match answer {
                Ok((message_id, version)) => Outcome::Ok {
                    message_id,
                    version,
                },
                Err(e) => outcome_of(&e),
            };
            let unknown = matches!(outcome, Outcome::Unknown { .. });
            let acked = match outcome {
                Outcome::Ok { message_id, .. } => Some(message_id),
                _ => None,
            };
            history.complete(op, outcome);
            if let Some(message_id) = acked.filter(|_| check_own_read) {
                // A sync that fails (a fault) proves nothing either way.
                if let Some(found) = own_inbox_holds(client, &mut own_seen, message_id).await {
                    history.own_read(OwnRead {
                        op,
                        user,
                        message_id,
                        found,
                    });
                }
            }
            if !unknown || Instant::now() >= until {
                break;
            }
        }
    }
}

/// Injects faults until `until` (less the time one needs), recording each in
/// `faults`; leaves every node running and every link healed, also when an
/// injection fails.
async fn nemesis(
    cluster: &mut Cluster,
    config: &ChaosConfig,
    sending: Instant,
    until: Instant,
    faults: &Mutex<Vec<Fault>>,
) -> anyhow::Result<()> {
    let injected = inject(cluster, config, sending, until, faults).await;
    let repaired = cluster.repair();
    injected.and(repaired)
}

async fn inject(
    cluster: &mut Cluster,
    config: &ChaosConfig,
    sending: Instant,
    until: Instant,
    faults: &Mutex<Vec<Fault>>,
) -> anyhow::Result<()> {
    let mut dice = Dice::new(config.seed);
    // Long runs also hold partitions past the peers' HTTP/2 keep-alive
    // (15 s), so broken connections and reconnection are exercised too.
    let longest_cut = (config.duration.as_millis() as u64 / 12).clamp(5000, 20_000);
    let ids = cluster.node_ids();
    let majority = ids.len() / 2 + 1;
    let mut round: Vec<FaultKind> = Vec::new();
    while Instant::now() + Duration::from_secs(8) < until {
        tokio::time::sleep(dice.millis(2000, 5000)).await;
        if round.is_empty() {
            round = FaultKind::ALL.to_vec();
            // Fisher–Yates, drawn from the seed.
            for i in (1..round.len()).rev() {
                round.swap(i, dice.below(i as u64 + 1) as usize);
            }
        }
        let kind = round.pop().context("a round has every kind")?;
        let held = match kind {
            FaultKind::KillOne | FaultKind::KillMajority | FaultKind::KillAll => {
                dice.millis(1000, 5000)
            }
            FaultKind::Freeze => dice.millis(1000, 8000),
            FaultKind::IsolateOne | FaultKind::IsolateLeader => dice.millis(2000, longest_cut),
        };
        // A fault ends when sending does.
        let held = held.min(until.saturating_duration_since(Instant::now()));
        let first = dice.below(ids.len() as u64) as usize;
        // `count` nodes from the `first`, wrapping.
        let pick = |count: usize| -> Vec<u64> {
            (0..count).map(|k| ids[(first + k) % ids.len()]).collect()
        };
        let struck = match kind {
            FaultKind::KillOne | FaultKind::Freeze | FaultKind::IsolateOne => pick(1),
            FaultKind::KillMajority => pick(majority),
            FaultKind::KillAll => ids.clone(),
            FaultKind::IsolateLeader => {
                let leader = busiest_leader(cluster).unwrap_or(ids[first]);
                // The leader and a minority of the others: the rest keep a majority.
                let mut side = vec![leader];
                let others: Vec<u64> = ids.iter().copied().filter(|&n| n != leader).collect();
                side.extend(others.iter().take(ids.len() - majority - 1));
                side
            }
        };
        lock(faults).push(Fault {
            at_secs: sending.elapsed().as_secs_f64(),
            kind,
            nodes: struck.clone(),
            held_ms: held.as_millis() as u64,
        });
        match kind {
            FaultKind::KillOne | FaultKind::KillMajority | FaultKind::KillAll => {
                for &n in &struck {
                    cluster.kill(n)?;
                }
                tokio::time::sleep(held).await;
                for &n in &struck {
                    cluster.start_node(n)?;
                }
            }
            FaultKind::Freeze => {
                cluster.signal(struck[0], "STOP")?;
                tokio::time::sleep(held).await;
                cluster.signal(struck[0], "CONT")?;
            }
            FaultKind::IsolateOne | FaultKind::IsolateLeader => {
                let side: BTreeSet<u64> = struck.iter().copied().collect();
                let rest: BTreeSet<u64> =
                    ids.iter().copied().filter(|n| !side.contains(n)).collect();
                cluster.partition(&[side, rest])?;
                tokio::time::sleep(held).await;
                cluster.heal();
            }
        }
    }
    Ok(())
}

/// The node that leads the most shards, as the first node that answers sees it.
fn busiest_leader(cluster: &Cluster) -> Option<u64> {
    let status = cluster
        .node_ids()
        .into_iter()
        .find_map(|id| cluster.status(id).ok())?;
    let mut led: BTreeMap<u64, usize> = BTreeMap::new();
    for shard in status["shards"].as_array()? {
        if let Some(leader) = shard["leader"].as_u64() {
            *led.entry(leader).or_default() += 1;
        }
    }
    led.into_iter().max_by_key(|(_, n)| *n).map(|(id, _)| id)
}

/// Prints how the run goes, every few seconds, until `until`.
async fn report_progress(
    config: &ChaosConfig,
    sending: Instant,
    until: Instant,
    history: &History,
    faults: &Mutex<Vec<Fault>>,
) {
    if !config.progress {
        return;
    }
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(15)
    };
    while Instant::now() < until {
        tokio::time::sleep(every).await;
        let counts = history.counts();
        let (injected, last) = {
            let faults = lock(faults);
            let last = faults
                .last()
                .map(|f| format!("{} {:?}", f.kind.name(), f.nodes))
                .unwrap_or_default();
            (faults.len(), last)
        };
        let line = format!(
            "chaos: {:>5.0}/{:.0} s  ops {} ok {} failed {} unknown {}  faults {} (last: {})",
            sending.elapsed().as_secs_f64(),
            config.duration.as_secs_f64(),
            counts.invoked,
            counts.ok,
            counts.failed,
            counts.unknown,
            injected,
            last
        );
        if terminal {
            eprint!("\r{line:<120}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Waits (90 s at most each) until every node sees every shard's leader
/// and every replica agrees, then gives fan-out the pump carries after a
/// crash (due within seconds) the time to land, and waits for agreement
/// again. Returns the replicas as they were when they last agreed, or, when
/// they never came to agree, as they are: the checker reports those.
///
/// The replicas are taken from the read that found them agreeing, not read
/// again afterwards: an entry committed between two reads (a leader's first
/// entry after an election, a pump's clean-up) would otherwise show a
/// settled shard one entry apart on one node.
fn settle(cluster: &Cluster) -> anyhow::Result<BTreeMap<u64, Vec<ShardReplica>>> {
    let patience = Duration::from_secs(90);
    for id in cluster.node_ids() {
        if let Err(e) = cluster.wait_ready(id, patience) {
            eprintln!("chaos: {e:#}");
        }
    }
    let agreed = || {
        cluster
            .eventually(
                "every replica has the same state",
                patience,
                Cluster::replicas_agree,
            )
            .map_err(|e| eprintln!("chaos: {e:#}"))
    };
    if agreed().is_ok() {
        std::thread::sleep(Duration::from_secs(4));
        if let Ok(replicas) = agreed() {
            return Ok(replicas);
        }
    }
    cluster.replicas()
}

/// What each client's `incoming` has given it so far, by user.
type Delivered = Arc<Mutex<BTreeMap<UserId, Vec<InboxEntry>>>>;

/// Starts `Client::incoming` from version 0 on every client and keeps what
/// each gives, in order, until the client closes.
fn watch(clients: &[(Client, UserId)]) -> Delivered {
    let delivered: Delivered = Arc::default();
    for (client, user) in clients {
        // A watcher given nothing is checked too.
        lock(&delivered).insert(*user, Vec::new());
        let mut incoming = client.incoming(0);
        let (delivered, user) = (delivered.clone(), *user);
        tokio::spawn(async move {
            while let Some(entry) = incoming.recv().await {
                lock(&delivered)
                    .entry(user)
                    .or_default()
                    .push(entry_of(entry));
            }
        });
    }
    delivered
}

/// What the watchers were given once each has as many entries as its inbox
/// holds, or after [`CATCH_UP`] (they sync at least every few seconds).
async fn caught_up(
    delivered: &Delivered,
    observed: &Observed,
) -> BTreeMap<UserId, Vec<InboxEntry>> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let given = lock(delivered).clone();
        let behind = observed.inboxes.iter().any(|(user, reads)| {
            let stored = reads.first().map_or(0, |r| r.entries.len());
            given.get(user).map_or(0, Vec::len) < stored
        });
        if !behind || Instant::now() >= deadline {
            return given;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An inbox entry as the checker reads it.
fn entry_of(e: fishchat_client::proto::InboxEntry) -> InboxEntry {
    InboxEntry {
        version: e.version,
        message_id: e.message_id,
        sender_id: e.sender_id,
        recipient_id: e.recipient_id,
        body: String::from_utf8_lossy(&e.body).into_owned(),
        group_id: e.group_id,
        group_seq: e.group_seq,
        is_event: e.group_event.is_some(),
    }
}

/// Every user's inbox, read through every node.
async fn read_back(
    cluster: &Cluster,
    users: &[(String, UserId)],
) -> anyhow::Result<BTreeMap<UserId, Vec<InboxRead>>> {
    let mut inboxes = BTreeMap::new();
    for (name, user) in users {
        let mut reads = Vec::new();
        for node in cluster.node_ids() {
            let config =
                ClientConfig::from_ca_file(vec![cluster.client_addr(node)], cluster.ca_path())?;
            let client = Client::connect(config).await?;
            client.login(name, PASSWORD, None).await?;
            let entries = client
                .sync_all(0)
                .await?
                .into_iter()
                .map(entry_of)
                .collect();
            client.close();
            reads.push(InboxRead { node, entries });
        }
        inboxes.insert(*user, reads);
    }
    Ok(inboxes)
}

fn write_files(dir: &Path, report: &ChaosReport, observed: &Observed) -> anyhow::Result<()> {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("report.json", serde_json::to_string_pretty(report)?)?;
    write("summary.txt", report.summary())?;
    write("observed.json", serde_json::to_string(observed)?)
}
