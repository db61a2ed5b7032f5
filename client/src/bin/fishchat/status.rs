//! `fishchat status`: a node's `GET /status` (the admin API of
//! `node/src/admin.rs`) as a table of shards.
//!
//! A plain HTTP/1.1 GET over a TCP stream is all it takes; the admin port
//! follows the cluster's port rule (client port + 20) unless given.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the whole status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest status answer read.
const MAX_ANSWER_BYTES: u64 = 16 << 20;
/// The admin port is the client port plus this (docs: the port rule).
const ADMIN_PORT_OFFSET: u16 = 20;

/// `GET /status`, as much of it as the table shows.
#[derive(Debug, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    #[serde(default)]
    pub node: u64,
    /// The node's client address.
    #[serde(default)]
    pub client_addr: String,
    /// One entry per shard.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
}

/// One shard as the node sees it.
#[derive(Debug, Deserialize)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u32,
    /// This replica's role.
    #[serde(default)]
    pub role: String,
    /// The leader this replica knows, if any.
    #[serde(default)]
    pub leader: Option<u64>,
    /// Current term.
    #[serde(default)]
    pub term: u64,
    /// Last log index.
    #[serde(default)]
    pub last_log_index: u64,
    /// Highest index known committed.
    #[serde(default)]
    pub committed: u64,
    /// Highest index applied.
    #[serde(default)]
    pub applied: u64,
    /// State digest (hex).
    #[serde(default)]
    pub digest: String,
    /// The applied index the digest was taken at.
    #[serde(default)]
    pub digest_index: u64,
}

/// The admin address of the node whose client address is `server`.
pub fn admin_address(server: &str) -> anyhow::Result<String> {
    let (host, port) = server
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{server} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{server} has no valid port"))?;
    let admin = port
        .checked_add(ADMIN_PORT_OFFSET)
        .ok_or_else(|| anyhow!("{server}: port {port} + {ADMIN_PORT_OFFSET} is out of range"))?;
    Ok(format!("{host}:{admin}"))
}

/// Fetches `GET /status` from `admin` (`host:port`) and returns the body.
pub async fn fetch(admin: &str) -> anyhow::Result<String> {
    fetch_path(admin, "/status").await
}

/// Fetches `GET path` from `admin` (`host:port`) and returns the body.
pub async fn fetch_path(admin: &str, path: &str) -> anyhow::Result<String> {
    tokio::time::timeout(STATUS_TIMEOUT, get(admin, path))
        .await
        .map_err(|_| anyhow!("{admin} did not answer within {STATUS_TIMEOUT:?}"))?
}

async fn get(admin: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(admin)
        .await
        .with_context(|| format!("cannot connect to {admin}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    (&mut stream)
        .take(MAX_ANSWER_BYTES)
        .read_to_end(&mut answer)
        .await
        .with_context(|| format!("reading the answer of {admin}"))?;
    http_body(&answer).with_context(|| format!("the answer of {admin}{path}"))
}

/// The body of an HTTP/1.1 answer with status 200 (plain or chunked).
pub fn http_body(answer: &[u8]) -> anyhow::Result<String> {
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        bail!(
            "HTTP status {status_line:?}: {}",
            String::from_utf8_lossy(body).trim()
        );
    }
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    String::from_utf8(body).context("the body is not UTF-8")
}

fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk header"))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if body.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&body[..size]);
        body = body.get(size + 2..).unwrap_or_default();
    }
}

/// The status as a table of shards.
pub fn table(status: &NodeStatus) -> String {
    let mut out = format!("node {} ({})\n", status.node, status.client_addr);
    out.push_str(&format!(
        "{:>5}  {:<9}  {:>6}  {:>6}  {:>10}  {:>10}  {:>10}  {:<16}  {:>10}\n",
        "SHARD",
        "ROLE",
        "LEADER",
        "TERM",
        "LAST INDEX",
        "COMMITTED",
        "APPLIED",
        "DIGEST",
        "AT INDEX"
    ));
    for shard in &status.shards {
        let leader = shard
            .leader
            .map_or_else(|| "-".to_string(), |l| l.to_string());
        out.push_str(&format!(
            "{:>5}  {:<9}  {:>6}  {:>6}  {:>10}  {:>10}  {:>10}  {:<16}  {:>10}\n",
            shard.shard,
            shard.role,
            leader,
            shard.term,
            shard.last_log_index,
            shard.committed,
            shard.applied,
            shard.digest,
            shard.digest_index
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = r#"{"node":2,"peers":{"1":"127.0.0.1:7111"},"client_addr":"127.0.0.1:7102",
        "shards":[{"shard":0,"group":1,"role":"leader","leader":2,"term":3,"last_log_index":10,
        "committed":10,"applied":9,"digest":"00000000deadbeef","digest_index":9},
        {"shard":1,"group":2,"role":"candidate","leader":null,"term":4,"last_log_index":5,
        "committed":5,"applied":5,"digest":"0000000000000000","digest_index":0}],
        "wal_syncs":7,"writes_per_sync":1.5}"#;

    #[test]
    fn the_admin_port_is_the_client_port_plus_20() {
        assert_eq!(
            admin_address("127.0.0.1:7101").expect("v4"),
            "127.0.0.1:7121"
        );
        assert_eq!(admin_address("[::1]:7103").expect("v6"), "[::1]:7123");
        assert!(admin_address("nohost").is_err());
        assert!(admin_address("h:65530").is_err());
    }

    #[test]
    fn the_node_status_json_becomes_a_table() {
        let status: NodeStatus = serde_json::from_str(STATUS).expect("status json");
        let table = table(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "node 2 (127.0.0.1:7102)");
        assert!(lines[1].contains("LAST INDEX"));
        assert!(lines[2].contains("leader") && lines[2].contains("00000000deadbeef"));
        assert!(lines[3].contains("candidate") && lines[3].contains(" - "));
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn plain_and_chunked_http_bodies_are_read_and_errors_reported() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(http_body(plain).expect("plain"), "{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(http_body(chunked).expect("chunked"), "{\"a\":1}");
        let failed = b"HTTP/1.1 500 Internal Server Error\r\n\r\nboom";
        assert!(http_body(failed).is_err());
        assert!(http_body(b"garbage").is_err());
    }
}
