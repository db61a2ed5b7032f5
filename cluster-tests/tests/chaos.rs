//! A short chaos run: clients send one-to-one and group messages while
//! nodes are SIGKILLed (one, a majority, or all) and restarted, or frozen
//! with SIGSTOP and thawed, on a schedule drawn from a seed; the
//! recorded history is then judged by the checker against every inbox read
//! back through every node (G1, G2, G3, G5 and replica agreement).
//!
//! `FISHCHAT_CHAOS_SEED` picks the schedule (default 1);
//! `FISHCHAT_CHAOS_SECS` the length of the sending phase (default 40).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fishchat_client::{Client, ClientError};
use fishchat_cluster_tests::checker::check;
use fishchat_cluster_tests::history::{
    History, InboxEntry, InboxRead, Observed, Outcome, ShardReplica, Target,
};
use fishchat_cluster_tests::Cluster;

mod common;

use common::{config, one_cluster_at_a_time, runtime, same_digests_everywhere, started, PASSWORD};

/// A small deterministic generator (xorshift64*): the schedule and the
/// workload's choices follow from the seed alone.
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How a send's error is recorded: a definite refusal, or unknown.
fn outcome_of(error: &ClientError) -> Outcome {
    match error {
        ClientError::Server {
            code,
            retryable: false,
            ..
        } if !matches!(code.as_str_name(), "INTERNAL") => Outcome::Failed {
            code: code.as_str_name().to_string(),
        },
        other => Outcome::Unknown {
            why: other.to_string(),
        },
    }
}

/// One worker: sends as `user` until `until`, to users and the group.
#[allow(clippy::too_many_arguments)]
async fn work(
    worker: u64,
    client: &Client,
    user: u64,
    users: &[u64],
    group: u64,
    seed: u64,
    until: Instant,
    history: &History,
) {
    let mut dice = Dice::new(seed ^ ((worker + 1) * 7919));
    let mut n = 0u64;
    while Instant::now() < until {
        let pick = dice.below(users.len() as u64 + 1) as usize;
        let target = match users.get(pick) {
            Some(&to) => Target::User(to),
            None => Target::Group(group),
        };
        let body = format!("s{seed}-w{worker}-{n}");
        n += 1;
        let op = history.invoke(worker, user, target, &body, &body);
        let bytes = body.clone().into_bytes();
        let outcome = match target {
            Target::User(to) => client
                .send(to, &body, bytes, "text/plain")
                .await
                .map(|a| (a.message_id, a.version)),
            Target::Group(g) => client
                .send_group(g, &body, bytes, "text/plain")
                .await
                .map(|a| (a.message_id, a.group_seq)),
        };
        history.complete(
            op,
            match outcome {
                Ok((message_id, version)) => Outcome::Ok {
                    message_id,
                    version,
                },
                Err(e) => outcome_of(&e),
            },
        );
    }
}

/// Every user's inbox, read through every node.
async fn read_back(
    cluster: &Cluster,
    names: &[(String, u64)],
) -> anyhow::Result<BTreeMap<u64, Vec<InboxRead>>> {
    let mut inboxes = BTreeMap::new();
    for (name, user) in names {
        let mut reads = Vec::new();
        for node in 1..=3 {
            let client = Client::connect(config(cluster, &[node])?).await?;
            client.login(name, PASSWORD, None).await?;
            let entries = client
                .sync_all(0)
                .await?
                .into_iter()
                .map(|e| InboxEntry {
                    version: e.version,
                    message_id: e.message_id,
                    sender_id: e.sender_id,
                    recipient_id: e.recipient_id,
                    body: String::from_utf8_lossy(&e.body).into_owned(),
                    group_id: e.group_id,
                    group_seq: e.group_seq,
                    is_event: e.group_event.is_some(),
                })
                .collect();
            client.close();
            reads.push(InboxRead { node, entries });
        }
        inboxes.insert(*user, reads);
    }
    Ok(inboxes)
}

/// Each node's (shard, digest index, digest) from `/status`.
fn replicas(cluster: &Cluster) -> anyhow::Result<BTreeMap<u64, Vec<ShardReplica>>> {
    let mut all = BTreeMap::new();
    for node in 1..=3 {
        let status = cluster.status(node)?;
        let shards = status["shards"].as_array().context("no shards")?;
        let mut replicas = Vec::new();
        for s in shards {
            replicas.push(ShardReplica {
                shard: s["shard"].as_u64().context("shard")? as u32,
                applied: s["digest_index"].as_u64().context("digest_index")?,
                digest: s["digest"].as_str().context("digest")?.to_string(),
            });
        }
        all.insert(node, replicas);
    }
    Ok(all)
}

#[test]
fn acknowledged_messages_survive_nodes_killed_and_frozen_on_a_seeded_schedule() -> anyhow::Result<()>
{
    let _one = one_cluster_at_a_time();
    let seed = env_u64("FISHCHAT_CHAOS_SEED", 1);
    let secs = env_u64("FISHCHAT_CHAOS_SECS", 40);
    println!("chaos: seed {seed}, {secs} s of sending");
    let mut cluster = started(&[])?;
    let rt = runtime()?;
    let names: Vec<(String, u64)> = rt.block_on(async {
        let mut names = Vec::new();
        for i in 0..6u64 {
            let name = format!("chaos{i}");
            let client = Client::connect(config(&cluster, &[i % 3 + 1])?).await?;
            names.push((name.clone(), client.register(&name, PASSWORD).await?));
            client.close();
        }
        anyhow::Ok(names)
    })?;
    let users: Vec<u64> = names.iter().map(|(_, id)| *id).collect();
    let history = History::new();
    let (group, faults) = rt.block_on(async {
        let mut clients = Vec::new();
        for (i, (name, _)) in names.iter().enumerate() {
            let order: Vec<u64> = (0..3).map(|k| (i as u64 + k) % 3 + 1).collect();
            let client = Client::connect(config(&cluster, &order)?).await?;
            client.login(name, PASSWORD, None).await?;
            clients.push(client);
        }
        let group = clients[0]
            .create_group("chaos", &users[1..4])
            .await?
            .group_id;
        let until = Instant::now() + Duration::from_secs(secs);
        let workers = clients
            .iter()
            .zip(&users)
            .enumerate()
            .map(|(w, (c, &u))| work(w as u64, c, u, &users, group, seed, until, &history));
        let nemesis = async {
            let mut dice = Dice::new(seed);
            let mut faults = Vec::new();
            let started = Instant::now();
            while Instant::now() + Duration::from_secs(8) < until {
                tokio::time::sleep(Duration::from_millis(2000 + dice.below(4000))).await;
                let at = started.elapsed().as_secs_f32();
                let first = dice.below(3) + 1;
                let down = Duration::from_millis(1000 + dice.below(3000));
                match dice.below(4) {
                    0 => {
                        cluster.kill(first)?;
                        faults.push(format!("{at:.1}s SIGKILL node {first} for {down:?}"));
                        tokio::time::sleep(down).await;
                        cluster.start_node(first)?;
                    }
                    1 => {
                        let second = first % 3 + 1;
                        cluster.kill(first)?;
                        cluster.kill(second)?;
                        faults.push(format!(
                            "{at:.1}s SIGKILL nodes {first} and {second} (a majority) for {down:?}"
                        ));
                        tokio::time::sleep(down).await;
                        cluster.start_node(first)?;
                        cluster.start_node(second)?;
                    }
                    2 => {
                        cluster.signal(first, "STOP")?;
                        faults.push(format!("{at:.1}s SIGSTOP node {first} for {down:?}"));
                        tokio::time::sleep(down).await;
                        cluster.signal(first, "CONT")?;
                    }
                    _ => {
                        for node in 1..=3 {
                            cluster.kill(node)?;
                        }
                        faults.push(format!("{at:.1}s SIGKILL every node for {down:?}"));
                        tokio::time::sleep(down).await;
                        for node in 1..=3 {
                            cluster.start_node(node)?;
                        }
                    }
                }
            }
            anyhow::Ok(faults)
        };
        let (_, faults) = tokio::join!(futures::future::join_all(workers), nemesis);
        for client in &clients {
            client.close();
        }
        anyhow::Ok((group, faults?))
    })?;
    println!("chaos: faults injected: {faults:?}");
    for node in 1..=3 {
        cluster.wait_ready(node, Duration::from_secs(60))?;
    }
    cluster.eventually(
        "every replica has the same state",
        Duration::from_secs(60),
        same_digests_everywhere,
    )?;
    // Fan-out the pump carries after a crash is due within seconds.
    std::thread::sleep(Duration::from_secs(4));
    let observed = Observed {
        inboxes: rt.block_on(read_back(&cluster, &names))?,
        replicas: replicas(&cluster)?,
    };
    let members: BTreeSet<u64> = users[..4].iter().copied().collect();
    let groups = BTreeMap::from([(group, members)]);
    let ops = history.ops();
    let report = check(&ops, &observed, &groups);
    println!("chaos: {}", report.summary());
    let mut refusals: BTreeMap<(u64, &str), u64> = BTreeMap::new();
    for op in &ops {
        if let Outcome::Failed { code } = &op.outcome {
            *refusals.entry((op.sender, code.as_str())).or_default() += 1;
        }
    }
    println!("chaos: refusals by (sender, code): {refusals:?}");
    // Users 4 and 5 are not in the group: their group sends are refused,
    // and the checker proved none of them was stored.
    let outsiders = [users[4], users[5]];
    ensure!(
        refusals
            .keys()
            .all(|(sender, code)| *code == "PERMISSION_DENIED" && outsiders.contains(sender)),
        "the only refusals are non-members' group sends: {refusals:?}"
    );
    if !report.passed() {
        let path = std::env::temp_dir().join(format!("fishchat-chaos-{seed}.jsonl"));
        history.write_jsonl(&path)?;
        println!("chaos: history written to {}", path.display());
    }
    ensure!(report.passed(), "{report}");
    ensure!(!faults.is_empty(), "the nemesis injected faults");
    ensure!(
        report.counts.ok > 100,
        "the workload made progress: {}",
        report.summary()
    );
    Ok(())
}
