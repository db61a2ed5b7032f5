//! What the cluster tests of chat and groups share: one cluster at a time,
//! client settings, the CLI runner, and checks of `/status`.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use fishchat_client::proto::InboxEntry;
use fishchat_client::{Client, ClientConfig};
use fishchat_cluster_tests::{cli_binary, Cluster};
use serde_json::Value;

static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Held for a whole test: its cluster is the only one running.
pub fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

pub const SHARDS: u32 = 8;
pub const READY: Duration = Duration::from_secs(60);
pub const PASSWORD: &str = "correct horse";

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn started(extra: &[&str]) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start_with(3, SHARDS, extra)?;
    for id in 1..=3 {
        cluster.wait_ready(id, READY)?;
    }
    Ok(cluster)
}

/// Client settings for `servers` (node ids, in the order to try).
pub fn config(cluster: &Cluster, servers: &[u64]) -> anyhow::Result<ClientConfig> {
    let addrs = servers.iter().map(|id| cluster.client_addr(*id)).collect();
    Ok(ClientConfig::from_ca_file(addrs, cluster.ca_path())?)
}

/// Runs the CLI against `server` as `user`; returns its standard output.
pub fn cli(
    cluster: &Cluster,
    server: u64,
    user: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut child = Command::new(cli_binary()?)
        .arg("--server")
        .arg(cluster.client_addr(server))
        .arg("--ca")
        .arg(cluster.ca_path())
        .arg("--user")
        .arg(user)
        .arg("--password")
        .arg(PASSWORD)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "fishchat {args:?} as {user} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

pub fn json_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

pub fn field(entry: &Value, name: &str) -> anyhow::Result<u64> {
    entry[name]
        .as_u64()
        .ok_or_else(|| anyhow!("entry without {name}: {entry}"))
}

/// Registers `name` through the CLI and returns its user id.
pub fn register(cluster: &Cluster, server: u64, name: &str) -> anyhow::Result<u64> {
    let out = cli(cluster, server, name, &["--json", "register"], None)?;
    let lines = json_lines(&out)?;
    let first = lines
        .first()
        .ok_or_else(|| anyhow!("register printed nothing"))?;
    field(first, "user_id")
}

/// Where [`send_many`] sends.
#[derive(Clone, Copy, Debug)]
pub enum To {
    /// A user's inbox.
    User(u64),
    /// A group.
    Group(u64),
}

/// Sends `count` messages from `client`, one after another, with bodies
/// `prefix N` and client message ids `prefix-N`; returns the bodies
/// acknowledged.
pub async fn send_many(
    client: &Client,
    to: To,
    prefix: impl std::fmt::Display,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut acked = Vec::with_capacity(count);
    for i in 0..count {
        let body = format!("{prefix} {i}");
        let id = format!("{prefix}-{i}");
        let bytes = body.clone().into_bytes();
        match to {
            To::User(user) => client
                .send(user, &id, bytes, "text/plain")
                .await
                .map(|_| ()),
            To::Group(group) => client
                .send_group(group, &id, bytes, "text/plain")
                .await
                .map(|_| ()),
        }
        .with_context(|| format!("sending {body}"))?;
        acked.push(body);
    }
    Ok(acked)
}

/// `client`'s whole inbox, after checking its versions are 1, 2, 3, …
pub async fn gap_free_inbox(client: &Client) -> anyhow::Result<Vec<InboxEntry>> {
    let entries = client.sync_all(0).await?;
    for (i, entry) in entries.iter().enumerate() {
        ensure!(
            entry.version == i as u64 + 1,
            "gap-free versions: {entry:?}"
        );
    }
    Ok(entries)
}
