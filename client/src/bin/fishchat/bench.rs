//! `fishchat bench`: measures a running cluster over QUIC, as its users
//! would load it. Every mode prints a progress line while it runs, then its
//! figures, and writes them as JSON with `--report FILE`.
//!
//! - `send`: C concurrent senders, each its own session and connection,
//!   each sending one message at a time (it waits for the acknowledgement,
//!   as an ordered chat client must) to a random recipient among U users.
//!   Reports acknowledged messages per second and the send→ack latency
//!   (HDR histogram: p50, p90, p99, p99.9, max), and errors by kind.
//!
//! - `e2e`: P sender→recipient pairs, every recipient watching its inbox
//!   (`Client::incoming`: Notify, then Sync), the senders together offering
//!   R messages per second on a fixed schedule. Reports the send→received
//!   latency (from the send's start until the recipient's client holds the
//!   entry; each body carries its send time) and send→ack, and the rate
//!   achieved.
//!
//! - `ping`: C concurrent clients, each sending one Ping at a time: the
//!   floor of a request's cost (QUIC, TLS, framing, the node's dispatch)
//!   with no Raft round and no storage. Reports pings per second and their
//!   latency.
//!
//! - `connect`: N connections sharing a few client sockets, each resuming
//!   a session; how many the nodes hold and their memory per session.
//!
//! - `failover`: steady sends to one shard while its leader is killed,
//!   repeatedly: the longest time without an acknowledgement.
//!
//! `send`, `ping` and `e2e` also report the work the nodes did while they
//! ran, from each node's `/metrics` (on the admin port beside its client
//! port) before and after: the cores they kept busy, the milliseconds of
//! node CPU per 1,000 answered requests, and per request the Raft entries
//! applied (every replica counted), the append exchanges between nodes and the
//! WAL syncs. On a machine the nodes share with the load generator and a
//! disk whose speed wanders, these are steadier than requests per second.
//! Without admin access they are left out.
//!
//! The users are `<prefix>0`, `<prefix>1`, …: registered when missing, so
//! runs one after another reuse them (registration hashes a password, which
//! is slow on purpose and not what is measured).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fishchat_client::proto::ErrorCode;
use fishchat_client::{Client, ClientConfig, ClientError, TEXT_PLAIN};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::settings::Settings;
use crate::status;

mod connect;
mod failover;

/// What to measure.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Concurrent senders, each waiting for every acknowledgement.
    Send(SendArgs),
    /// Senders at a fixed offered rate, recipients watching: send→received.
    E2e(E2eArgs),
    /// Open and hold many sessions: how many the nodes hold, memory per session.
    Connect(connect::ConnectArgs),
    /// Kill a shard's leader under steady sends: the longest acknowledgement gap.
    Failover(failover::FailoverArgs),
    /// Concurrent clients sending pings: a request's cost without Raft or storage.
    Ping(PingArgs),
}

/// Options of `bench ping`.
#[derive(Debug, Args)]
pub struct PingArgs {
    /// Concurrent clients, each its own connection.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long to ping, e.g. `10s`, `2m`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// Options of `bench e2e`.
#[derive(Debug, Args)]
pub struct E2eArgs {
    /// Sender→recipient pairs, each two sessions of their own.
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Messages per second offered by all senders together.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// How long to send, e.g. `10s`, `2m`.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Message body size in bytes (at least 24: the send time).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Prefix of the bench users' names.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// Options of `bench send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Concurrent senders, each its own session and connection.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long to send, e.g. `10s`, `2m` (ignored with --count).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Send exactly this many messages in all, then stop.
    #[arg(long)]
    pub count: Option<u64>,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Users messages go to, at random (default: twice the senders, at least 2).
    #[arg(long)]
    pub users: Option<usize>,
    /// Prefix of the bench users' names.
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

/// Parses `500ms`, `10s`, `2m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 10s or 2m"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s or m)")),
    };
    if duration.is_zero() {
        return Err("a duration must be above zero".into());
    }
    Ok(duration)
}

/// Latency figures of one histogram, in milliseconds.
#[derive(Debug, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Latency {
    /// The figures of `histogram` (recorded in microseconds).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// What `bench send` measured.
#[derive(Debug, Serialize)]
pub struct SendReport {
    /// Always "send".
    pub mode: &'static str,
    /// Concurrent senders.
    pub clients: usize,
    /// Users messages went to.
    pub users: usize,
    /// Body size in bytes.
    pub size: usize,
    /// Seconds from the first send to the last answer.
    pub elapsed_secs: f64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Acknowledged messages per second.
    pub acked_per_sec: f64,
    /// Send→ack latency of the acknowledged messages.
    pub latency: Latency,
    /// Failed sends by error kind (a server code, or the client's kind).
    pub errors: BTreeMap<String, u64>,
    /// The work the nodes did meanwhile (absent without admin access).
    pub nodes: Option<NodeWork>,
}

/// What `bench ping` measured.
#[derive(Debug, Serialize)]
pub struct PingReport {
    /// Always "ping".
    pub mode: &'static str,
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds from the first ping to the last answer.
    pub elapsed_secs: f64,
    /// Pings answered.
    pub answered: u64,
    /// Answered pings per second.
    pub answered_per_sec: f64,
    /// Ping→answer latency.
    pub latency: Latency,
    /// Failed pings by error kind.
    pub errors: BTreeMap<String, u64>,
    /// The work the nodes did meanwhile (absent without admin access).
    pub nodes: Option<NodeWork>,
}

/// The work the nodes did while a mode ran, from their `/metrics`.
#[derive(Debug, Serialize, PartialEq)]
pub struct NodeWork {
    /// CPU seconds of all nodes together.
    pub cpu_seconds: f64,
    /// Cores they kept busy on average.
    pub cores_busy: f64,
    /// Milliseconds of node CPU per 1,000 answered requests.
    pub cpu_ms_per_1000_requests: f64,
    /// Raft entries applied per answered request, every replica counted.
    pub applies_per_request: f64,
    /// Append exchanges between nodes per answered request: `Append`
    /// requests and append-stream messages, heartbeats included.
    pub append_exchanges_per_request: f64,
    /// WAL syncs per answered request, all nodes together.
    pub wal_syncs_per_request: f64,
}

impl NodeWork {
    /// The figures for the totals `before` and `after` a run of `elapsed`
    /// seconds that answered `requests`. None when nothing was answered or
    /// a total went down (a node restarted meanwhile).
    fn between(before: NodeTotals, after: NodeTotals, elapsed: f64, requests: u64) -> Option<Self> {
        let grew = |a: f64, b: f64| (b >= a).then_some(b - a);
        let cpu = grew(before.cpu_seconds, after.cpu_seconds)?;
        let applied = grew(before.applied, after.applied)?;
        let exchanges = grew(before.append_exchanges, after.append_exchanges)?;
        let syncs = grew(before.wal_syncs, after.wal_syncs)?;
        if requests == 0 || elapsed <= 0.0 {
            return None;
        }
        let per = |total: f64| total / requests as f64;
        Some(Self {
            cpu_seconds: cpu,
            cores_busy: cpu / elapsed,
            cpu_ms_per_1000_requests: per(cpu) * 1_000_000.0,
            applies_per_request: per(applied),
            append_exchanges_per_request: per(exchanges),
            wal_syncs_per_request: per(syncs),
        })
    }
}

impl std::fmt::Display for NodeWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CPU {:.1} s, {:.2} cores busy, {:.0} ms per 1,000 requests; per request: \
             {:.2} entries applied, {:.2} append exchanges, {:.2} WAL syncs",
            self.cpu_seconds,
            self.cores_busy,
            self.cpu_ms_per_1000_requests,
            self.applies_per_request,
            self.append_exchanges_per_request,
            self.wal_syncs_per_request
        )
    }
}

/// Counters of every node added up.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct NodeTotals {
    cpu_seconds: f64,
    applied: f64,
    append_exchanges: f64,
    wal_syncs: f64,
}

impl NodeTotals {
    /// Adds one node's `/metrics` text; an error names what it lacks.
    fn add(&mut self, text: &str) -> Result<(), &'static str> {
        self.cpu_seconds += metric::<f64>(text, "fishchat_process_cpu_seconds_total")
            .ok_or("no fishchat_process_cpu_seconds_total")?;
        self.append_exchanges += metric::<f64>(text, "fishchat_peer_append_rpcs_total")
            .ok_or("no fishchat_peer_append_rpcs_total")?;
        self.wal_syncs +=
            metric::<f64>(text, "fishchat_wal_syncs_total").ok_or("no fishchat_wal_syncs_total")?;
        self.applied += labelled_sum(text, "fishchat_shard_applied_index");
        Ok(())
    }
}

/// Reads the nodes' counters before a run and again after it.
struct WorkMeter {
    before: Option<NodeTotals>,
}

impl WorkMeter {
    /// Takes the first reading; without one, the run reports no node work.
    async fn start(settings: &Settings) -> Self {
        let before = match node_totals(settings).await {
            Ok(totals) => Some(totals),
            Err(e) => {
                eprintln!("bench: node work not measured: {e:#}");
                None
            }
        };
        Self { before }
    }

    /// Takes the second reading: the work of a run of `elapsed` seconds
    /// that answered `requests`.
    async fn finish(self, settings: &Settings, elapsed: f64, requests: u64) -> Option<NodeWork> {
        let before = self.before?;
        match node_totals(settings).await {
            Ok(after) => NodeWork::between(before, after, elapsed, requests),
            Err(e) => {
                eprintln!("bench: node work not measured: {e:#}");
                None
            }
        }
    }
}

/// The counters of every node in `settings`, added up.
async fn node_totals(settings: &Settings) -> anyhow::Result<NodeTotals> {
    let mut totals = NodeTotals::default();
    for node in node_metrics(settings).await? {
        totals
            .add(&node.text)
            .map_err(|lack| anyhow::anyhow!("{}/metrics has {lack}", node.admin))?;
    }
    Ok(totals)
}

/// One node's `/metrics` text.
struct NodeMetrics {
    /// The node's client address, as given in the settings.
    server: String,
    /// Its admin address, where the text came from.
    admin: String,
    text: String,
}

/// Every node's `/metrics`, in the order of `settings.servers`.
async fn node_metrics(settings: &Settings) -> anyhow::Result<Vec<NodeMetrics>> {
    let mut nodes = Vec::with_capacity(settings.servers.len());
    for server in &settings.servers {
        let admin = status::admin_address(server)?;
        let text = status::fetch_path(&admin, "/metrics").await?;
        nodes.push(NodeMetrics {
            server: server.clone(),
            admin,
            text,
        });
    }
    Ok(nodes)
}

/// The sum of a labelled metric's values (`name{...} value` lines).
fn labelled_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (_, value) = rest.split_once("} ")?;
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// The value of an unlabelled metric in an OpenMetrics text.
fn metric<T: std::str::FromStr>(text: &str, name: &str) -> Option<T> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// What `bench e2e` measured.
#[derive(Debug, Serialize)]
pub struct E2eReport {
    /// Always "e2e".
    pub mode: &'static str,
    /// Sender→recipient pairs.
    pub pairs: usize,
    /// Messages per second offered.
    pub offered_per_sec: u64,
    /// Messages per second acknowledged.
    pub acked_per_sec: f64,
    /// Body size in bytes.
    pub size: usize,
    /// Messages acknowledged.
    pub acked: u64,
    /// Acknowledged messages whose recipient got them before the end.
    pub received: u64,
    /// Send→received latency.
    pub received_latency: Latency,
    /// Send→ack latency.
    pub ack_latency: Latency,
    /// Failed sends by error kind.
    pub errors: BTreeMap<String, u64>,
    /// The work the nodes did meanwhile (absent without admin access).
    pub nodes: Option<NodeWork>,
}

/// Runs a bench mode against `settings`' servers.
pub async fn run(settings: &Settings, command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Send(args) => {
            let report = send(settings, &args).await?;
            println!(
                "send: {} senders, {} users, {} B bodies: {} acked in {:.1} s = {:.0} msgs/s",
                report.clients,
                report.users,
                report.size,
                report.acked,
                report.elapsed_secs,
                report.acked_per_sec
            );
            println!("send→ack: {}", report.latency);
            print_tail(&report.errors, report.nodes.as_ref());
            write_report(args.report.as_ref(), &report)
        }
        BenchCommand::Ping(args) => {
            let report = ping(settings, &args).await?;
            println!(
                "ping: {} clients: {} answered in {:.1} s = {:.0} pings/s",
                report.clients, report.answered, report.elapsed_secs, report.answered_per_sec
            );
            println!("ping→answer: {}", report.latency);
            print_tail(&report.errors, report.nodes.as_ref());
            write_report(args.report.as_ref(), &report)
        }
        BenchCommand::E2e(args) => {
            let report = e2e(settings, &args).await?;
            println!(
                "e2e: {} pairs, {} msgs/s offered, {:.0} acked/s; {} acked, {} received",
                report.pairs,
                report.offered_per_sec,
                report.acked_per_sec,
                report.acked,
                report.received
            );
            println!("send→received: {}", report.received_latency);
            println!("send→ack: {}", report.ack_latency);
            print_tail(&report.errors, report.nodes.as_ref());
            write_report(args.report.as_ref(), &report)
        }
        BenchCommand::Connect(args) => {
            let report = connect::run(settings, &args).await?;
            connect::print(&report);
            write_report(args.report.as_ref(), &report)
        }
        BenchCommand::Failover(args) => {
            let report = failover::run(settings, &args).await?;
            failover::print(&report);
            write_report(args.report.as_ref(), &report)
        }
    }
}

/// Prints the errors by kind, if any, and the nodes' work, if measured.
fn print_tail(errors: &BTreeMap<String, u64>, nodes: Option<&NodeWork>) {
    if !errors.is_empty() {
        println!("errors: {errors:?}");
    }
    if let Some(work) = nodes {
        println!("nodes: {work}");
    }
}

fn write_report(path: Option<&PathBuf>, report: &impl Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A client config for `settings` whose first server is the `i`-th, so
/// sessions spread over the nodes.
fn config_for(settings: &Settings, i: usize) -> anyhow::Result<ClientConfig> {
    if settings.servers.is_empty() {
        bail!("no server address given");
    }
    let n = settings.servers.len();
    let servers = (0..n)
        .map(|k| settings.servers[(i + k) % n].clone())
        .collect();
    Ok(ClientConfig::from_ca_file(servers, &settings.ca)?)
}

/// The bench users' password: fixed, so later runs can log in.
fn password(prefix: &str) -> String {
    format!("{prefix}-bench-password")
}

/// The ids of users `<prefix>0..count`, registering those missing (the
/// ids of those registered before are looked up, logged in as the first).
async fn ensure_users(settings: &Settings, prefix: &str, count: usize) -> anyhow::Result<Vec<u64>> {
    let client = Client::connect(config_for(settings, 0)?).await?;
    let password = password(prefix);
    let mut ids = Vec::with_capacity(count);
    let mut logged_in = false;
    for i in 0..count {
        let name = format!("{prefix}{i}");
        let id = match client.register(&name, &password).await {
            Ok(id) => id,
            Err(e) if e.code() == Some(ErrorCode::UsernameTaken) => {
                if !logged_in {
                    let first = format!("{prefix}0");
                    client
                        .login(&first, &password, Some("bench-setup"))
                        .await
                        .with_context(|| format!("logging in {first} to look users up"))?;
                    logged_in = true;
                }
                client.lookup(&name).await?.user_id
            }
            Err(e) => return Err(e).with_context(|| format!("registering {name}")),
        };
        ids.push(id);
    }
    client.close();
    Ok(ids)
}

/// Logs in users `<prefix>0..count`, each on its own connection, one
/// after another (a login hashes a password on the server: slow on purpose).
async fn sessions(settings: &Settings, prefix: &str, count: usize) -> anyhow::Result<Vec<Client>> {
    let password = password(prefix);
    let mut clients = Vec::with_capacity(count);
    for i in 0..count {
        let client = Client::connect(config_for(settings, i)?).await?;
        client
            .login(&format!("{prefix}{i}"), &password, Some("bench"))
            .await
            .with_context(|| format!("logging in {prefix}{i}"))?;
        clients.push(client);
    }
    Ok(clients)
}

/// Counts shared by the senders and the progress line.
#[derive(Default)]
struct Tally {
    acked: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    done: AtomicBool,
}

impl Tally {
    /// Counts a send that began at `sent` and ended with `answer`; an
    /// acknowledged one goes into `acks`.
    fn record<T>(&self, sent: Instant, answer: Result<T, ClientError>, acks: &mut Histogram<u64>) {
        match answer {
            Ok(_) => {
                acks.saturating_record((sent.elapsed().as_micros() as u64).max(1));
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                *self
                    .errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(e.code_name().to_string())
                    .or_default() += 1;
            }
        }
    }

    /// Waits for the senders' histograms and merges them; stops the
    /// progress line. Returns the merged histogram and the seconds since
    /// `started`.
    async fn finish(
        &self,
        tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>>,
        progress: tokio::task::JoinHandle<()>,
        started: Instant,
    ) -> anyhow::Result<(Histogram<u64>, f64)> {
        let mut merged = new_histogram()?;
        for task in tasks {
            merged.add(task.await??)?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        self.done.store(true, Ordering::Relaxed);
        let _ = progress.await;
        Ok((merged, elapsed))
    }

    fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// `bench send`.
async fn send(settings: &Settings, args: &SendArgs) -> anyhow::Result<SendReport> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let users = args.users.unwrap_or((args.clients * 2).max(2));
    if users < args.clients.max(2) {
        bail!("--users must be at least --clients and at least 2");
    }
    eprintln!(
        "bench: preparing {users} users and {} sessions",
        args.clients
    );
    let ids = Arc::new(ensure_users(settings, &args.prefix, users).await?);
    let clients = sessions(settings, &args.prefix, args.clients).await?;
    let load = Load::Send {
        ids,
        body: vec![b'x'; args.size],
    };
    let until = match args.count {
        Some(n) => Until::Count(Arc::new(AtomicU64::new(n))),
        None => Until::Deadline(Instant::now() + args.duration),
    };
    let run = drive(settings, clients, load, until).await?;
    Ok(SendReport {
        mode: "send",
        clients: args.clients,
        users,
        size: args.size,
        elapsed_secs: run.elapsed,
        acked: run.answered,
        acked_per_sec: run.per_sec(),
        latency: Latency::of(&run.latency),
        errors: run.errors,
        nodes: run.nodes,
    })
}

/// `bench ping`.
async fn ping(settings: &Settings, args: &PingArgs) -> anyhow::Result<PingReport> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    eprintln!("bench: opening {} connections", args.clients);
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        clients.push(Client::connect(config_for(settings, i)?).await?);
    }
    let until = Until::Deadline(Instant::now() + args.duration);
    let run = drive(settings, clients, Load::Ping, until).await?;
    Ok(PingReport {
        mode: "ping",
        clients: args.clients,
        elapsed_secs: run.elapsed,
        answered: run.answered,
        answered_per_sec: run.per_sec(),
        latency: Latency::of(&run.latency),
        errors: run.errors,
        nodes: run.nodes,
    })
}

/// What every client of a closed-loop run asks, one request at a time.
#[derive(Clone)]
enum Load {
    /// A message of `body` to a random user of `ids`.
    Send { ids: Arc<Vec<u64>>, body: Vec<u8> },
    /// A ping.
    Ping,
}

/// When a closed-loop run stops.
#[derive(Clone)]
enum Until {
    /// At this time.
    Deadline(Instant),
    /// After this many more requests, all clients together.
    Count(Arc<AtomicU64>),
}

impl Until {
    /// Whether another request may start; takes one from a count.
    fn another(&self) -> bool {
        match self {
            Until::Deadline(deadline) => Instant::now() < *deadline,
            Until::Count(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| q.checked_sub(1))
                .is_ok(),
        }
    }
}

/// What a closed-loop run measured.
struct Run {
    elapsed: f64,
    answered: u64,
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    nodes: Option<NodeWork>,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.answered as f64 / self.elapsed.max(1e-9)
    }
}

/// Runs `load` on every client, each waiting for every answer before its
/// next request, until `until`; closes the clients.
async fn drive(
    settings: &Settings,
    clients: Vec<Client>,
    load: Load,
    until: Until,
) -> anyhow::Result<Run> {
    let tally = Arc::new(Tally::default());
    let meter = WorkMeter::start(settings).await;
    let started = Instant::now();
    let progress = tokio::spawn(progress(tally.clone(), started));
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (tally, load, until) = (tally.clone(), load.clone(), until.clone());
        tasks.push(tokio::spawn(async move {
            let mut histogram = new_histogram()?;
            let mut rng = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let tag = fishchat_client::new_client_msg_id()?;
            let mut n = 0u64;
            while until.another() {
                n += 1;
                let sent = Instant::now();
                match &load {
                    Load::Send { ids, body } => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let to = ids[(rng % ids.len() as u64) as usize];
                        let answer = client
                            .send(to, &format!("{tag}-{n}"), body.clone(), TEXT_PLAIN)
                            .await;
                        tally.record(sent, answer, &mut histogram);
                    }
                    Load::Ping => {
                        let answer = client.ping(n).await;
                        tally.record(sent, answer, &mut histogram);
                    }
                }
            }
            client.close();
            anyhow::Ok(histogram)
        }));
    }
    let (latency, elapsed) = tally.finish(tasks, progress, started).await?;
    let answered = tally.acked.load(Ordering::Relaxed);
    Ok(Run {
        elapsed,
        answered,
        latency,
        errors: tally.errors(),
        nodes: meter.finish(settings, elapsed, answered).await,
    })
}

/// Microseconds since the Unix epoch: bodies carry their send time in it,
/// so a recipient on the same machine can tell a message's age.
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A body of `size` bytes starting with the send time.
fn stamped(size: usize) -> Vec<u8> {
    let mut body = format!("{:020};", now_micros()).into_bytes();
    body.resize(size.max(body.len()), b'x');
    body
}

/// The send time a [`stamped`] body carries.
fn stamp_of(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(..20)?).ok()?.parse().ok()
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// `bench e2e`.
async fn e2e(settings: &Settings, args: &E2eArgs) -> anyhow::Result<E2eReport> {
    if args.pairs == 0 || args.rate == 0 {
        bail!("--pairs and --rate must be at least 1");
    }
    let pairs = args.pairs;
    eprintln!("bench: preparing {} users and sessions", pairs * 2);
    let ids = ensure_users(settings, &args.prefix, pairs * 2).await?;
    let mut clients = sessions(settings, &args.prefix, pairs * 2).await?;
    let recipients = clients.split_off(pairs);
    let received = Arc::new(Mutex::new(new_histogram()?));
    let mut listeners = Vec::new();
    for recipient in &recipients {
        let since = recipient.latest_version().await?;
        let mut incoming = recipient.incoming(since);
        let received = received.clone();
        listeners.push(tokio::spawn(async move {
            while let Some(entry) = incoming.recv().await {
                if let Some(sent) = stamp_of(&entry.body) {
                    let age = now_micros().saturating_sub(sent).max(1);
                    received
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .saturating_record(age);
                }
            }
        }));
    }
    let tally = Arc::new(Tally::default());
    // Each sender sends every `pairs / rate` seconds, staggered.
    let interval = Duration::from_secs_f64(pairs as f64 / args.rate as f64);
    let meter = WorkMeter::start(settings).await;
    let started = Instant::now();
    let progress = tokio::spawn(progress(tally.clone(), started));
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let to = ids[pairs + i];
        let tally = tally.clone();
        let (size, duration) = (args.size, args.duration);
        tasks.push(tokio::spawn(async move {
            let mut acks = new_histogram()?;
            let tag = fishchat_client::new_client_msg_id()?;
            let offset = interval.mul_f64(i as f64 / pairs as f64);
            let mut next = tokio::time::Instant::from_std(started) + offset;
            let mut n = 0u64;
            while next.into_std() < started + duration {
                tokio::time::sleep_until(next).await;
                next += interval;
                n += 1;
                let sent = Instant::now();
                let answer = client
                    .send(to, &format!("{tag}-{n}"), stamped(size), TEXT_PLAIN)
                    .await;
                tally.record(sent, answer, &mut acks);
            }
            anyhow::Ok(acks)
        }));
    }
    let (acks, elapsed) = tally.finish(tasks, progress, started).await?;
    let acked = tally.acked.load(Ordering::Relaxed);
    let nodes = meter.finish(settings, elapsed, acked).await;
    // Give the last notifications a moment to arrive.
    let settle = Instant::now() + Duration::from_secs(5);
    while received.lock().unwrap_or_else(|p| p.into_inner()).len() < acked
        && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for listener in &listeners {
        listener.abort();
    }
    for client in &recipients {
        client.close();
    }
    let received = received.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(E2eReport {
        mode: "e2e",
        pairs,
        offered_per_sec: args.rate,
        acked_per_sec: acked as f64 / elapsed.max(1e-9),
        size: args.size,
        acked,
        received: received.len(),
        received_latency: Latency::of(&received),
        ack_latency: Latency::of(&acks),
        errors: tally.errors(),
        nodes,
    })
}

/// Prints the rate every second (in place on a terminal) until done.
async fn progress(tally: Arc<Tally>, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let mut last = (Instant::now(), 0u64);
    while !tally.done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acked = tally.acked.load(Ordering::Relaxed);
        let rate = (acked - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-9);
        last = (Instant::now(), acked);
        let line = format!(
            "bench: {:>5.1} s  acked {acked}  failed {}  {rate:.0} msgs/s now",
            started.elapsed().as_secs_f64(),
            tally.failed.load(Ordering::Relaxed)
        );
        if terminal {
            eprint!("\r{line:<80}");
        } else {
            eprintln!("{line}");
        }
    }
    if terminal {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_number_and_a_known_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "0s", "1h", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_stamped_body_carries_its_send_time_and_size() {
        let before = now_micros();
        let body = stamped(100);
        assert_eq!(body.len(), 100);
        let stamp = stamp_of(&body).expect("a stamp");
        assert!(stamp >= before && stamp <= now_micros());
        assert_eq!(stamped(5).len(), 21, "the stamp fits whatever the size");
        assert_eq!(stamp_of(b"not a stamp at all, no"), None);
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn unlabelled_metrics_are_read_by_exact_name() {
        let text = "# HELP fishchat_client_sessions_bound x\n\
                    fishchat_client_sessions_bound 42\n\
                    fishchat_client_sessions_bound_total 7\n\
                    fishchat_process_cpu_seconds_total 12.5\n";
        assert_eq!(metric(text, "fishchat_client_sessions_bound"), Some(42));
        assert_eq!(
            metric(text, "fishchat_process_cpu_seconds_total"),
            Some(12.5)
        );
        assert_eq!(metric::<i64>(text, "fishchat_missing"), None);
        assert_eq!(
            metric::<i64>(text, "fishchat_process_cpu_seconds_total"),
            None,
            "a fraction is not an integer"
        );
    }

    #[test]
    fn node_work_is_the_growth_over_the_run_per_answered_request() {
        let before = NodeTotals {
            cpu_seconds: 100.0,
            applied: 1_000.0,
            append_exchanges: 50.0,
            wal_syncs: 10.0,
        };
        let after = NodeTotals {
            cpu_seconds: 130.0,
            applied: 31_000.0,
            append_exchanges: 15_050.0,
            wal_syncs: 7_510.0,
        };
        let work = NodeWork::between(before, after, 20.0, 15_000).expect("figures");
        assert_eq!(work.cpu_seconds, 30.0);
        assert_eq!(work.cores_busy, 1.5);
        assert_eq!(work.cpu_ms_per_1000_requests, 2000.0);
        assert_eq!(work.applies_per_request, 2.0);
        assert_eq!(work.append_exchanges_per_request, 1.0);
        assert_eq!(work.wal_syncs_per_request, 0.5);
        assert_eq!(NodeWork::between(before, after, 20.0, 0), None);
        assert_eq!(
            NodeWork::between(after, before, 20.0, 10),
            None,
            "a node restarted: its totals went down"
        );
    }

    #[test]
    fn a_node_s_totals_come_from_its_metrics_and_a_missing_counter_is_named() {
        let text = "# TYPE fishchat_shard_applied_index gauge\n\
                    fishchat_shard_applied_index{shard=\"0\"} 40\n\
                    fishchat_shard_applied_index{shard=\"1\"} 2\n\
                    fishchat_shard_applied_index_other 1000\n\
                    fishchat_wal_syncs_total 7\n\
                    fishchat_peer_append_rpcs_total 9\n\
                    fishchat_process_cpu_seconds_total 1.5\n";
        let mut totals = NodeTotals::default();
        totals.add(text).expect("every counter");
        totals.add(text).expect("every counter");
        assert_eq!(
            totals,
            NodeTotals {
                cpu_seconds: 3.0,
                applied: 84.0,
                append_exchanges: 18.0,
                wal_syncs: 14.0,
            }
        );
        let without_cpu = text.replace("fishchat_process_cpu_seconds_total 1.5\n", "");
        assert_eq!(
            NodeTotals::default().add(&without_cpu),
            Err("no fishchat_process_cpu_seconds_total")
        );
    }

    #[test]
    fn a_count_lets_exactly_that_many_requests_start() {
        let until = Until::Count(Arc::new(AtomicU64::new(3)));
        let started = (0..10).filter(|_| until.another()).count();
        assert_eq!(started, 3);
        assert!(!Until::Deadline(Instant::now()).another());
    }

    #[test]
    fn latency_figures_come_from_the_histogram_in_milliseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for micros in 1..=1000u64 {
            h.record(micros * 10).expect("in bounds");
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 5.0).abs() < 0.01, "{l:?}");
        assert!((l.p99_ms - 9.9).abs() < 0.01, "{l:?}");
        assert!((l.max_ms - 10.0).abs() < 0.01, "{l:?}");
    }
}
