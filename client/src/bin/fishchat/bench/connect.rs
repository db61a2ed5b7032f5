//! `bench connect`: how many sessions the cluster holds, and what each
//! idle one costs a node in memory.
//!
//! U users log in once each; then N connections, spread over the nodes and
//! sharing a few client UDP sockets, each resume one of those sessions with
//! its token (`ResumeRequest`: bound to the session, push stream open, no
//! password hashed per connection). After holding them idle, every node's
//! `/metrics` tells how many sessions it has bound and its resident memory;
//! the growth over the count taken before the connections opened is each
//! node's memory per session.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use fishchat_client::proto::{request, response, Request, ResumeRequest};
use fishchat_client::{ClientConfig, ClientError, Connection, SharedEndpoint};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{config_for, ensure_users, metric, node_metrics, parse_duration, sessions};
use crate::settings::Settings;

/// Options of `bench connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Connections to open and hold, each bound to a session.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Users whose sessions the connections resume (each logs in once).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Client UDP sockets the connections share.
    #[arg(long, default_value_t = 16)]
    pub sockets: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to hold the connections idle before measuring.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub hold: Duration,
    /// Prefix of the bench users' names.
    #[arg(long, default_value = "conn")]
    pub prefix: String,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<std::path::PathBuf>,
}

/// What `bench connect` measured.
#[derive(Debug, Serialize)]
pub struct ConnectReport {
    /// Always "connect".
    pub mode: &'static str,
    /// Connections asked for.
    pub asked: usize,
    /// Connections that completed the handshake and the resume.
    pub opened: u64,
    /// Connections still open at the end of the hold.
    pub held: usize,
    /// Seconds the opening took.
    pub open_secs: f64,
    /// Failed connections by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Each node's figures.
    pub nodes: Vec<NodeMemory>,
    /// Sessions bound on all nodes together, from their metrics.
    pub sessions_bound: i64,
    /// Resident memory growth over all nodes per session bound, bytes.
    pub bytes_per_session: f64,
}

/// One node's sessions and memory, before and after.
#[derive(Debug, Serialize)]
pub struct NodeMemory {
    /// The node's client address.
    pub server: String,
    /// Sessions bound before the connections opened.
    pub sessions_before: i64,
    /// Sessions bound after the hold.
    pub sessions_after: i64,
    /// Resident bytes before.
    pub resident_before: i64,
    /// Resident bytes after.
    pub resident_after: i64,
    /// Resident growth per added session, bytes.
    pub bytes_per_session: f64,
}

/// `bench connect`.
pub async fn run(settings: &Settings, args: &ConnectArgs) -> anyhow::Result<ConnectReport> {
    if args.sessions == 0 || args.users == 0 || args.sockets == 0 || args.concurrency == 0 {
        bail!("--sessions, --users, --sockets and --concurrency must be at least 1");
    }
    eprintln!("bench: preparing {} users", args.users);
    ensure_users(settings, &args.prefix, args.users).await?;
    let tokens = Arc::new(tokens(settings, &args.prefix, args.users).await?);
    let before = metrics(settings).await?;
    let sockets = (0..args.sockets)
        .map(|_| SharedEndpoint::bind_v4())
        .collect::<Result<Vec<_>, _>>()?;
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(progress(opened.clone(), failed.clone(), started));
    // One configuration per first server, shared by its connections.
    let configs: Vec<ClientConfig> = (0..settings.servers.len())
        .map(|i| config_for(settings, i))
        .collect::<anyhow::Result<_>>()?;
    let turns = Arc::new(Semaphore::new(args.concurrency));
    let mut attempts = JoinSet::new();
    for i in 0..args.sessions {
        let turn = turns.clone().acquire_owned().await?;
        let mut config = configs[i % configs.len()].clone();
        config.endpoint = Some(sockets[i % sockets.len()].clone());
        let token = tokens[i % tokens.len()].clone();
        let (opened, failed) = (opened.clone(), failed.clone());
        attempts.spawn(async move {
            let outcome = open(config, &token).await;
            drop(turn);
            match &outcome {
                Ok(_) => opened.fetch_add(1, Ordering::Relaxed),
                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
            };
            outcome
        });
    }
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut connections = Vec::new();
    while let Some(attempt) = attempts.join_next().await {
        match attempt? {
            Ok(connection) => connections.push(connection),
            Err(e) => *errors.entry(e.code_name().to_string()).or_default() += 1,
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    progress.abort();
    eprintln!(
        "bench: {} connections open in {open_secs:.1} s; holding them {:?}",
        connections.len(),
        args.hold
    );
    tokio::time::sleep(args.hold).await;
    let held = connections
        .iter()
        .filter(|c| c.close_reason().is_none())
        .count();
    let after = metrics(settings).await?;
    let nodes: Vec<NodeMemory> = before
        .into_iter()
        .zip(after)
        .map(|((server, b), (_, a))| NodeMemory {
            bytes_per_session: per_session(a.resident - b.resident, a.sessions - b.sessions),
            server,
            sessions_before: b.sessions,
            sessions_after: a.sessions,
            resident_before: b.resident,
            resident_after: a.resident,
        })
        .collect();
    let grown: i64 = nodes
        .iter()
        .map(|n| n.resident_after - n.resident_before)
        .sum();
    let added: i64 = nodes
        .iter()
        .map(|n| n.sessions_after - n.sessions_before)
        .sum();
    for connection in &connections {
        connection.close();
    }
    Ok(ConnectReport {
        mode: "connect",
        asked: args.sessions,
        opened: opened.load(Ordering::Relaxed),
        held,
        open_secs,
        errors,
        sessions_bound: nodes.iter().map(|n| n.sessions_after).sum(),
        bytes_per_session: per_session(grown, added),
        nodes,
    })
}

/// Prints the report's lines.
pub fn print(report: &ConnectReport) {
    println!(
        "connect: {} asked, {} opened in {:.1} s, {} held; {} sessions bound on the nodes",
        report.asked, report.opened, report.open_secs, report.held, report.sessions_bound
    );
    for node in &report.nodes {
        println!(
            "  {}: {} -> {} sessions, {:.1} -> {:.1} MiB resident, {:.0} bytes per session",
            node.server,
            node.sessions_before,
            node.sessions_after,
            node.resident_before as f64 / 1048576.0,
            node.resident_after as f64 / 1048576.0,
            node.bytes_per_session
        );
    }
    println!(
        "memory per idle session: {:.0} bytes (all nodes)",
        report.bytes_per_session
    );
    if !report.errors.is_empty() {
        println!("errors: {:?}", report.errors);
    }
}

fn per_session(bytes: i64, sessions: i64) -> f64 {
    if sessions <= 0 {
        return 0.0;
    }
    bytes as f64 / sessions as f64
}

/// Logs users `<prefix>0..count` in once each; returns their tokens.
async fn tokens(settings: &Settings, prefix: &str, count: usize) -> anyhow::Result<Vec<String>> {
    let clients = sessions(settings, prefix, count).await?;
    let tokens = clients
        .iter()
        .map(|client| client.token().context("a logged-in client holds a token"))
        .collect();
    for client in &clients {
        client.close();
    }
    tokens
}

/// Opens a connection to `config`'s first server and resumes the session
/// of `token` on it.
async fn open(config: ClientConfig, token: &str) -> Result<Connection, ClientError> {
    let server = config.servers[0].clone();
    let connection = Connection::connect(&config, &server).await?;
    let request = Request {
        request_id: 1,
        token: token.to_string(),
        body: Some(request::Body::Resume(ResumeRequest {})),
    };
    match connection.request(&request).await?.body {
        Some(response::Body::Resume(_)) => Ok(connection),
        Some(response::Body::Error(error)) => Err(ClientError::from_wire(error)),
        other => Err(ClientError::Protocol(format!(
            "a resume was answered with {other:?}"
        ))),
    }
}

/// Sessions bound and resident bytes of one node, from its `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sample {
    sessions: i64,
    resident: i64,
}

/// Every node's sample, in the order of `settings.servers`.
async fn metrics(settings: &Settings) -> anyhow::Result<Vec<(String, Sample)>> {
    let mut samples = Vec::new();
    for node in node_metrics(settings).await? {
        let admin = &node.admin;
        let sample = Sample {
            sessions: metric(&node.text, "fishchat_client_sessions_bound")
                .with_context(|| format!("{admin}/metrics has no session count"))?,
            resident: metric(&node.text, "fishchat_process_resident_bytes")
                .with_context(|| format!("{admin}/metrics has no resident memory"))?,
        };
        samples.push((node.server, sample));
    }
    Ok(samples)
}

/// Prints how many connections are open every second until aborted.
async fn progress(opened: Arc<AtomicU64>, failed: Arc<AtomicU64>, started: Instant) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprintln!(
            "bench: {:>5.1} s  opened {}  failed {}",
            started.elapsed().as_secs_f64(),
            opened.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_per_session_is_growth_over_added_sessions() {
        assert_eq!(per_session(10_000, 10), 1000.0);
        assert_eq!(per_session(10_000, 0), 0.0);
        assert_eq!(per_session(-500, 5), -100.0);
    }
}
