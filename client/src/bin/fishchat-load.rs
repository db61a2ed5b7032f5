//! `fishchat-load`: the project's load generator.
//!
//! One-to-one mode (the default):
//! Registers `--senders` pairs of fresh users, logs each in on its own
//! connection (spread over the given servers), and has every sender send
//! `--messages` messages to its partner, one at a time (each waits for its
//! answer, as an ordered chat client must). Every recipient listens with
//! `Client::incoming` meanwhile. It reports:
//!
//! - acknowledged sends per second over the whole run;
//! - send latency (request to acknowledgement): p50, p90, p99, max;
//! - delivery latency (send to the recipient's client holding the entry,
//!   through Notify and Sync): p50, p90, p99, max;
//! - a check that every recipient got exactly its partner's messages in order
//!   (the run fails otherwise).
//!
//! Group mode (`--group-members N`): registers N users, logs each in on its
//! own connection, has the first create a group of all N, and has the first
//! `--senders` members send `--messages` each to the group, one at a time.
//! Every member listens with `Client::incoming`. It reports acknowledged
//! group messages per second, send latency, and for every message the time
//! until the LAST member's client held it (fan-out latency), and checks that
//! every member holds every message once, all in the same group order.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use fishchat_client::{new_client_msg_id, parse_server_list, Client, ClientConfig};
use tokio::sync::Mutex;

/// Load generator for a FishChat cluster.
#[derive(Parser)]
#[command(name = "fishchat-load", version)]
struct Args {
    /// Servers, comma-separated; sender i connects to server i mod n.
    #[arg(
        long,
        env = "FISHCHAT_SERVER",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    server: String,
    /// The cluster CA certificate.
    #[arg(long, env = "FISHCHAT_CA", default_value = "data/ca.pem")]
    ca: std::path::PathBuf,
    /// Concurrent senders (each with its own recipient and connection).
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Messages per sender.
    #[arg(long, default_value_t = 100)]
    messages: usize,
    /// Body size in bytes (at least the timestamp header).
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Group mode: the group's size (0: one-to-one mode). `--senders` of
    /// the members send.
    #[arg(long, default_value_t = 0)]
    group_members: usize,
}

/// A message body that starts with its send time: `t=<ms>;<tag>;xxx…`.
fn stamped_body(tag: &str, size: usize) -> String {
    let mut body = format!("t={};{tag};", now_ms());
    while body.len() < size {
        body.push('x');
    }
    body
}

/// How long ago a body made by [`stamped_body`] was stamped.
fn age_of(body: &str) -> Option<Duration> {
    let sent = body
        .strip_prefix("t=")?
        .split(';')
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_millis(now_ms().saturating_sub(sent)))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:.2?} p90={:.2?} p99={:.2?} max={:.2?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default()
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let servers = parse_server_list(&args.server);
    if servers.is_empty() || args.senders == 0 {
        bail!("need at least one server and one sender");
    }
    // Fresh user names for every run: a random tag.
    let run: String = new_client_msg_id()?.chars().take(8).collect();
    let password = format!("load-{run}-password");

    // Each client starts at another server, so load spreads over the nodes.
    let config_for = |i: usize| -> anyhow::Result<ClientConfig> {
        let mut ordered = servers.clone();
        ordered.rotate_left(i % servers.len());
        Ok(ClientConfig::from_ca_file(ordered, &args.ca)?)
    };
    if args.group_members > 0 {
        return group_run(&args, &run, &password, &config_for).await;
    }

    println!(
        "registering {} users (run {run}) on {}...",
        2 * args.senders,
        servers.join(",")
    );
    let mut pairs = Vec::new();
    for i in 0..args.senders {
        let sender = Client::connect(config_for(i)?).await?;
        let recipient = Client::connect(config_for(i + 1)?).await?;
        let from = format!("load{run}s{i}");
        let to = format!("load{run}r{i}");
        sender
            .register(&from, &password)
            .await
            .context("register")?;
        let to_id = sender.register(&to, &password).await.context("register")?;
        sender.login(&from, &password, None).await?;
        recipient.login(&to, &password, None).await?;
        pairs.push((sender, recipient, to_id));
    }

    // Round trips of the cheaper operations, for comparison with a send.
    if let Some((probe, _, _)) = pairs.first() {
        let mut pings = Vec::new();
        let mut syncs = Vec::new();
        for n in 0..50 {
            let at = Instant::now();
            probe.ping(n).await?;
            pings.push(at.elapsed());
            let at = Instant::now();
            probe.sync(0, 1).await?;
            syncs.push(at.elapsed());
        }
        report("ping (no token, no shard)", pings);
        report("sync (token check + inbox read)", syncs);
    }

    let delivery = Arc::new(Mutex::new(Vec::new()));
    let mut listeners = Vec::new();
    for (_, recipient, _) in &pairs {
        let mut incoming = recipient.incoming(0);
        let delivery = delivery.clone();
        let expected = args.messages;
        listeners.push(tokio::spawn(async move {
            let mut bodies = Vec::with_capacity(expected);
            while bodies.len() < expected {
                let Some(entry) = incoming.recv().await else {
                    break;
                };
                let body = String::from_utf8_lossy(&entry.body).into_owned();
                if let Some(lag) = age_of(&body) {
                    delivery.lock().await.push(lag);
                }
                bodies.push(body);
            }
            bodies
        }));
    }

    println!(
        "{} senders x {} messages of {} bytes...",
        args.senders, args.messages, args.body_bytes
    );
    let started = Instant::now();
    let mut senders = Vec::new();
    for (i, (sender, _, to_id)) in pairs.iter().enumerate() {
        let sender = sender.clone();
        let to_id = *to_id;
        let messages = args.messages;
        let body_bytes = args.body_bytes;
        let run = run.clone();
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            let mut sent = Vec::with_capacity(messages);
            for n in 0..messages {
                let body = stamped_body(&format!("s{i}m{n}"), body_bytes);
                let at = Instant::now();
                sender
                    .send(
                        to_id,
                        &format!("{run}-{i}-{n}"),
                        body.clone().into_bytes(),
                        "text/plain",
                    )
                    .await?;
                latencies.push(at.elapsed());
                sent.push(body);
            }
            anyhow::Ok((latencies, sent))
        }));
    }
    let mut send_latencies = Vec::new();
    let mut sent_bodies = Vec::new();
    for task in senders {
        let (latencies, sent) = task.await??;
        send_latencies.extend(latencies);
        sent_bodies.push(sent);
    }
    let elapsed = started.elapsed();
    let total = send_latencies.len();

    let mut received = Vec::new();
    for listener in listeners {
        match tokio::time::timeout(Duration::from_secs(60), listener).await {
            Ok(bodies) => received.push(bodies?),
            Err(_) => bail!("a recipient did not receive every message within 60 s"),
        }
    }
    for (i, (sent, got)) in sent_bodies.iter().zip(&received).enumerate() {
        if sent != got {
            bail!(
                "recipient {i} holds {} entries that differ from the {} sent",
                got.len(),
                sent.len()
            );
        }
    }

    println!(
        "sent {total} messages in {elapsed:.2?}: {:.0} acknowledged sends/s",
        total as f64 / elapsed.as_secs_f64()
    );
    report("send latency (request -> ack)", send_latencies);
    report(
        "delivery latency (send -> recipient holds it, ms clock)",
        std::mem::take(&mut *delivery.lock().await),
    );
    println!(
        "check: every recipient holds exactly its sender's {} messages, in order",
        args.messages
    );
    Ok(())
}

/// Group mode; see the crate documentation.
async fn group_run(
    args: &Args,
    run: &str,
    password: &str,
    config_for: &dyn Fn(usize) -> anyhow::Result<ClientConfig>,
) -> anyhow::Result<()> {
    let size = args.group_members;
    let senders = args.senders.min(size);
    let expected = senders * args.messages;
    println!("registering and logging in {size} users (run {run})...");
    let mut members = Vec::with_capacity(size);
    let mut ids = Vec::with_capacity(size);
    for i in 0..size {
        let client = Client::connect(config_for(i)?).await?;
        let name = format!("load{run}g{i}");
        ids.push(client.register(&name, password).await.context("register")?);
        client.login(&name, password, None).await.context("login")?;
        members.push(client);
    }
    let owner = &members[0];
    let group = owner
        .create_group(&format!("load {run}"), &ids[1..])
        .await
        .context("create group")?
        .group_id;

    // Every member listens; per message, the latest arrival is its fan-out
    // latency (send until the last member holds it).
    let arrivals: Arc<Mutex<std::collections::HashMap<String, (usize, Duration)>>> = Arc::default();
    let mut listeners = Vec::with_capacity(size);
    for member in &members {
        let mut incoming = member.incoming(0);
        let arrivals = arrivals.clone();
        listeners.push(tokio::spawn(async move {
            let mut seqs = Vec::with_capacity(expected);
            let mut held = 0;
            while held < expected {
                let Some(entry) = incoming.recv().await else {
                    break;
                };
                if entry.group_id != group {
                    continue;
                }
                seqs.push(entry.group_seq);
                if entry.group_event.is_some() {
                    continue;
                }
                held += 1;
                let body = String::from_utf8_lossy(&entry.body).into_owned();
                if let Some(lag) = age_of(&body) {
                    let mut arrivals = arrivals.lock().await;
                    let seen = arrivals.entry(body).or_insert((0, Duration::ZERO));
                    seen.0 += 1;
                    seen.1 = seen.1.max(lag);
                }
            }
            (held, seqs)
        }));
    }

    println!(
        "group {group} of {size}: {senders} senders x {} messages of {} bytes...",
        args.messages, args.body_bytes
    );
    let started = Instant::now();
    let mut sending = Vec::new();
    for (i, sender) in members.iter().take(senders).enumerate() {
        let sender = sender.clone();
        let (messages, body_bytes, run) = (args.messages, args.body_bytes, run.to_string());
        sending.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(messages);
            for n in 0..messages {
                let body = stamped_body(&format!("s{i}m{n}"), body_bytes);
                let at = Instant::now();
                sender
                    .send_group(
                        group,
                        &format!("{run}-{i}-{n}"),
                        body.into_bytes(),
                        "text/plain",
                    )
                    .await?;
                latencies.push(at.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut send_latencies = Vec::new();
    for task in sending {
        send_latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let mut orders = Vec::with_capacity(size);
    for listener in listeners {
        match tokio::time::timeout(Duration::from_secs(120), listener).await {
            Ok(done) => orders.push(done?),
            Err(_) => bail!("a member did not receive every group message within 120 s"),
        }
    }
    let all_done = started.elapsed();
    let total = send_latencies.len();
    println!(
        "sent {total} group messages in {elapsed:.2?}: {:.0} acknowledged group messages/s, \
         {:.0} inbox entries/s written; last member held the last message after {all_done:.2?}",
        total as f64 / elapsed.as_secs_f64(),
        (total * size) as f64 / all_done.as_secs_f64()
    );
    report("send latency (request -> ack)", send_latencies);
    let arrivals = std::mem::take(&mut *arrivals.lock().await);
    let incomplete = arrivals.values().filter(|(n, _)| *n != size).count();
    report(
        "fan-out latency (send -> last member holds it, ms clock)",
        arrivals.into_values().map(|(_, lag)| lag).collect(),
    );
    let first = &orders[0].1;
    for (i, (held, seqs)) in orders.iter().enumerate() {
        if *held != expected || incomplete > 0 {
            bail!("member {i} holds {held} of {expected} messages ({incomplete} incomplete)");
        }
        if seqs != first {
            bail!("member {i} holds the group's entries in another order");
        }
    }
    println!("check: all {size} members hold all {expected} messages once, in one group order");
    Ok(())
}
