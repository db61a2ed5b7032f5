//! Node settings: embedded defaults, overridden by a TOML file, overridden by
//! flags and `FISHCHAT_*` environment variables.
//!
//! Ports follow one rule so that several clusters can share a machine: with
//! base port `B` (default 7100), node `N` listens for clients on `B+N` (QUIC),
//! for peers on `B+10+N` and for operators on `B+20+N`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fishchat_raft::RaftTiming;
use serde::{Deserialize, Serialize};

/// Default base port.
pub const DEFAULT_BASE_PORT: u16 = 7100;
/// Default number of shards of a new cluster.
pub const DEFAULT_SHARDS: u32 = 16;
/// The largest Raft command a node accepts (`HostConfig::max_command_bytes`).
pub const MAX_COMMAND_BYTES: u64 = 1024 * 1024;
/// Default number of nodes of a new cluster.
pub const DEFAULT_NODES: u64 = 3;

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for these settings.
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid setting: {0}")]
    Invalid(String),
}

/// `fishchat-node`: one node of a FishChat cluster.
///
/// Every flag can also be set in the TOML file given by `--config` (same
/// name, with `_` for `-`) or by the environment variable shown.
///
/// The TOML file holds the same settings (all optional) as the flags.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(name = "fishchat-node", version, about, long_about = None)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    /// TOML file with any of the settings below.
    #[arg(long, env = "FISHCHAT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id, 1 and up; stable for the life of its data directory.
    #[arg(long, env = "FISHCHAT_NODE_ID")]
    pub node_id: Option<u64>,
    /// Where the node keeps its data [default: ./data/node<ID>].
    #[arg(long, env = "FISHCHAT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Base of the port rule (clients B+N, peers B+10+N, admin B+20+N) [default: 7100].
    #[arg(long, env = "FISHCHAT_BASE_PORT")]
    pub base_port: Option<u16>,
    /// Host (IP) every listener binds to [default: 127.0.0.1].
    #[arg(long, env = "FISHCHAT_HOST")]
    pub host: Option<String>,
    /// The cluster's nodes as `ID=HOST:PEER_PORT,...` [default: nodes 1..3 on the port rule].
    #[arg(long, env = "FISHCHAT_PEERS")]
    pub peers: Option<String>,
    /// Where this node dials some peers instead of their `--peers` address,
    /// as `ID=HOST:PORT,...` (a tunnel or proxy on the way) [default: none].
    #[arg(long, env = "FISHCHAT_PEER_ROUTES")]
    pub peer_routes: Option<String>,
    /// Number of shards of a new cluster; must match on every node [default: 16].
    #[arg(long, env = "FISHCHAT_SHARDS")]
    pub shards: Option<u32>,
    /// Leader heartbeat period in milliseconds [default: 100].
    #[arg(long, env = "FISHCHAT_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Shortest election timeout in milliseconds [default: 300].
    #[arg(long, env = "FISHCHAT_ELECTION_MIN_MS")]
    pub election_min_ms: Option<u64>,
    /// Longest election timeout in milliseconds [default: 500].
    #[arg(long, env = "FISHCHAT_ELECTION_MAX_MS")]
    pub election_max_ms: Option<u64>,
    /// How often a node that leads two or more shards more than another
    /// hands one over, in seconds; 0 never moves leaders [default: 10].
    #[arg(long, env = "FISHCHAT_BALANCE_LEADERS_SECS")]
    pub balance_leaders_secs: Option<u64>,
    /// How long a write may wait for its commit, in milliseconds [default: 10000].
    #[arg(long, env = "FISHCHAT_WRITE_TIMEOUT_MS")]
    pub write_timeout_ms: Option<u64>,
    /// Directory with the cluster's keys made by `fishchat-node init`
    /// [default: the data directory's parent].
    #[arg(long, env = "FISHCHAT_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// How long a session token is valid, in seconds [default: 86400].
    #[arg(long, env = "FISHCHAT_TOKEN_LIFETIME_SECS")]
    pub token_lifetime_secs: Option<u64>,
    /// Largest message body, in bytes [default: 65536].
    #[arg(long, env = "FISHCHAT_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u32>,
    /// Largest frame payload a client may send, in bytes [default: 1048576].
    #[arg(long, env = "FISHCHAT_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<u32>,
    /// Requests in flight per client connection [default: 16].
    #[arg(long, env = "FISHCHAT_MAX_REQUESTS_IN_FLIGHT")]
    pub max_requests_in_flight: Option<u32>,
    /// Most members of a group, the owner included, 2 to 10000 [default: 1000].
    #[arg(long, env = "FISHCHAT_MAX_GROUP_MEMBERS")]
    pub max_group_members: Option<u32>,
}

/// The largest accepted max group size.
const MAX_GROUP_MEMBERS: u32 = 10_000;

/// Limits of the client protocol (reported to clients at login).
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// Largest frame payload read from a client.
    pub max_frame_bytes: u32,
    /// Largest message body.
    pub max_body_bytes: u32,
    /// Requests in flight per connection (QUIC's max bidirectional streams).
    pub max_requests_in_flight: u32,
    /// Largest sync page.
    pub max_sync_limit: u32,
    /// Sync page when the client asks for 0.
    pub default_sync_limit: u32,
    /// How long a session token is valid.
    pub token_lifetime: Duration,
    /// Shortest password, in characters.
    pub min_password_chars: usize,
    /// Longest password, in bytes.
    pub max_password_bytes: usize,
    /// How long a request may take before it is answered TIMEOUT (also the
    /// longest wait for a request frame).
    pub request_deadline: Duration,
    /// Most members of a group, the owner included.
    pub max_group_members: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_body_bytes: 64 * 1024,
            max_requests_in_flight: 16,
            max_sync_limit: 1000,
            default_sync_limit: 100,
            token_lifetime: Duration::from_secs(24 * 3600),
            min_password_chars: 8,
            max_password_bytes: 1024,
            request_deadline: Duration::from_secs(10),
            max_group_members: 1000,
        }
    }
}

/// Everything a node needs to start, resolved and checked.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// This node's id.
    pub node_id: u64,
    /// The node's data directory.
    pub data_dir: PathBuf,
    /// Where clients connect (QUIC).
    pub client_listen: SocketAddr,
    /// Where peers connect (gRPC).
    pub peer_listen: SocketAddr,
    /// Where operators connect (HTTP: `/status`, `/metrics`).
    pub admin_listen: SocketAddr,
    /// Every node of the cluster (this one included): id → peer address.
    pub peers: BTreeMap<u64, String>,
    /// Peers this node dials somewhere else than their `peers` address.
    pub peer_routes: BTreeMap<u64, String>,
    /// Number of shards.
    pub shards: u32,
    /// Raft heartbeat and election timing.
    #[serde(skip)]
    pub timing: RaftTiming,
    /// How long a write may wait for its commit.
    pub write_timeout: Duration,
    /// Where the cluster's keys are.
    pub tls_dir: PathBuf,
    /// Limits of the client protocol.
    pub limits: Limits,
}

impl Settings {
    /// Resolves flags over the file they name over the defaults.
    pub fn resolve(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            None => Flags::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
        };
        let node_id = flags.node_id.or(file.node_id).unwrap_or(1);
        if node_id == 0 {
            return Err(ConfigError::Invalid("node ids start at 1".into()));
        }
        let base = flags
            .base_port
            .or(file.base_port)
            .unwrap_or(DEFAULT_BASE_PORT);
        let host = flags
            .host
            .or(file.host)
            .unwrap_or_else(|| "127.0.0.1".into());
        let port = |offset: u64, node: u64| -> Result<u16, ConfigError> {
            u16::try_from(u64::from(base) + offset + node).map_err(|_| {
                ConfigError::Invalid(format!("base port {base} leaves no room for node {node}"))
            })
        };
        let addr = |offset: u64| -> Result<SocketAddr, ConfigError> {
            let text = format!("{host}:{}", port(offset, node_id)?);
            text.parse()
                .map_err(|e| ConfigError::Invalid(format!("address {text}: {e}")))
        };
        let peers = match flags.peers.or(file.peers) {
            Some(list) => parse_peers(&list)?,
            None => (1..=DEFAULT_NODES)
                .map(|id| Ok((id, format!("{host}:{}", port(10, id)?))))
                .collect::<Result<_, ConfigError>>()?,
        };
        let peer_listen = addr(10)?;
        match peers.get(&node_id) {
            None => {
                return Err(ConfigError::Invalid(format!(
                    "node {node_id} is not in the peer list {peers:?}"
                )))
            }
            // Peers dial what the list says: it must be where this node listens.
            Some(listed) if *listed != peer_listen.to_string() => {
                return Err(ConfigError::Invalid(format!(
                    "the peer list gives node {node_id} the address {listed}, but it listens on {peer_listen} (host and base port)"
                )))
            }
            Some(_) => {}
        }
        let peer_routes = match flags.peer_routes.or(file.peer_routes) {
            Some(list) if !list.trim().is_empty() => parse_peers(&list)?,
            _ => BTreeMap::new(),
        };
        if let Some(id) = peer_routes
            .keys()
            .find(|id| **id == node_id || !peers.contains_key(id))
        {
            return Err(ConfigError::Invalid(format!(
                "a peer route names node {id}, which is this node or not in the peer list"
            )));
        }
        let shards = flags.shards.or(file.shards).unwrap_or(DEFAULT_SHARDS);
        if shards == 0 {
            return Err(ConfigError::Invalid(
                "a cluster needs at least one shard".into(),
            ));
        }
        let defaults = RaftTiming::default();
        let millis = |flag: Option<u64>, file: Option<u64>, default: Duration| {
            flag.or(file).map(Duration::from_millis).unwrap_or(default)
        };
        let timing = RaftTiming {
            heartbeat: millis(flags.heartbeat_ms, file.heartbeat_ms, defaults.heartbeat),
            election_min: millis(
                flags.election_min_ms,
                file.election_min_ms,
                defaults.election_min,
            ),
            election_max: millis(
                flags.election_max_ms,
                file.election_max_ms,
                defaults.election_max,
            ),
            balance_every: match flags.balance_leaders_secs.or(file.balance_leaders_secs) {
                None => defaults.balance_every,
                Some(0) => None,
                Some(secs) => Some(Duration::from_secs(secs)),
            },
            ..defaults
        };
        if timing.heartbeat >= timing.election_min || timing.election_min >= timing.election_max {
            return Err(ConfigError::Invalid(
                "timing must satisfy heartbeat < election-min < election-max".into(),
            ));
        }
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(format!("data/node{node_id}")));
        let tls_dir = flags
            .tls_dir
            .or(file.tls_dir)
            .unwrap_or_else(|| match data_dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
                _ => PathBuf::from("."),
            });
        let write_timeout = millis(
            flags.write_timeout_ms,
            file.write_timeout_ms,
            Duration::from_secs(10),
        );
        let defaults = Limits::default();
        let limits = Limits {
            request_deadline: write_timeout,
            max_frame_bytes: flags
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(defaults.max_frame_bytes),
            max_body_bytes: flags
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(defaults.max_body_bytes),
            max_requests_in_flight: flags
                .max_requests_in_flight
                .or(file.max_requests_in_flight)
                .unwrap_or(defaults.max_requests_in_flight),
            token_lifetime: flags
                .token_lifetime_secs
                .or(file.token_lifetime_secs)
                .map(Duration::from_secs)
                .unwrap_or(defaults.token_lifetime),
            max_group_members: flags
                .max_group_members
                .or(file.max_group_members)
                .unwrap_or(defaults.max_group_members),
            ..defaults
        };
        // A group's record and its creation command grow with its members
        // (about 60 bytes each) and must stay well inside one Raft command.
        if !(2..=MAX_GROUP_MEMBERS).contains(&limits.max_group_members) {
            return Err(ConfigError::Invalid(format!(
                "max group members ({}) must be 2 to {MAX_GROUP_MEMBERS}",
                limits.max_group_members
            )));
        }
        // A body must fit in a frame with room for the rest of a request, and
        // one entry of any size must fit in a sync page.
        if u64::from(limits.max_body_bytes) + 4096 > u64::from(limits.max_frame_bytes) {
            return Err(ConfigError::Invalid(format!(
                "max body ({}) must be at least 4096 bytes below max frame ({})",
                limits.max_body_bytes, limits.max_frame_bytes
            )));
        }
        // A send's command carries the body plus its envelope and must fit
        // the host's command limit (1 MiB).
        if u64::from(limits.max_body_bytes) + 4096 > MAX_COMMAND_BYTES {
            return Err(ConfigError::Invalid(format!(
                "max body ({}) must be at least 4096 bytes below {MAX_COMMAND_BYTES}, the largest Raft command",
                limits.max_body_bytes
            )));
        }
        if limits.max_requests_in_flight == 0 || limits.token_lifetime.is_zero() {
            return Err(ConfigError::Invalid(
                "requests in flight and token lifetime must be above 0".into(),
            ));
        }
        Ok(Self {
            node_id,
            data_dir,
            tls_dir,
            limits,
            client_listen: addr(0)?,
            peer_listen,
            admin_listen: addr(20)?,
            peers,
            peer_routes,
            shards,
            timing,
            write_timeout,
        })
    }
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...`.
fn parse_peers(list: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('=')
            .ok_or_else(|| ConfigError::Invalid(format!("peer {item:?} is not ID=HOST:PORT")))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| ConfigError::Invalid(format!("peer id {id:?} is not a number")))?;
        if id == 0 {
            return Err(ConfigError::Invalid("node ids start at 1".into()));
        }
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(ConfigError::Invalid(format!("peer {id} is listed twice")));
        }
    }
    if peers.is_empty() {
        return Err(ConfigError::Invalid("the peer list is empty".into()));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_port_rule() {
        let settings = Settings::resolve(Flags {
            node_id: Some(2),
            ..Flags::default()
        })
        .expect("defaults are valid");
        assert_eq!(settings.client_listen.port(), 7102);
        assert_eq!(settings.peer_listen.port(), 7112);
        assert_eq!(settings.admin_listen.port(), 7122);
        assert_eq!(settings.peers.len(), 3);
        assert_eq!(settings.peers[&3], "127.0.0.1:7113");
        assert_eq!(settings.shards, 16);
        assert_eq!(settings.data_dir, PathBuf::from("data/node2"));
        assert_eq!(
            settings.tls_dir,
            PathBuf::from("data"),
            "keys sit beside the nodes' data"
        );
        assert_eq!(settings.limits.max_body_bytes, 65536);
        assert_eq!(settings.timing.balance_every, Some(Duration::from_secs(10)));
    }

    #[test]
    fn leader_balancing_has_a_period_and_zero_turns_it_off() {
        let with = |secs| {
            Settings::resolve(Flags {
                node_id: Some(1),
                balance_leaders_secs: Some(secs),
                ..Flags::default()
            })
            .expect("valid")
            .timing
            .balance_every
        };
        assert_eq!(with(3), Some(Duration::from_secs(3)));
        assert_eq!(with(0), None);
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "node_id = 3\nbase_port = 9000\nshards = 4\n").expect("write");
        let settings = Settings::resolve(Flags {
            config: Some(path),
            shards: Some(8),
            ..Flags::default()
        })
        .expect("valid");
        assert_eq!(settings.node_id, 3);
        assert_eq!(settings.peer_listen.port(), 9013);
        assert_eq!(settings.shards, 8);
    }

    #[test]
    fn peer_routes_name_other_listed_peers() {
        let settings = Settings::resolve(Flags {
            peer_routes: Some("2=127.0.0.1:40002, 3=127.0.0.1:40003".into()),
            ..Flags::default()
        })
        .expect("valid");
        assert_eq!(settings.peer_routes[&2], "127.0.0.1:40002");
        assert_eq!(settings.peer_routes.len(), 2);
        // Itself, a node not in the peer list, and a malformed entry.
        for routes in ["1=127.0.0.1:40001", "4=127.0.0.1:40004", "2"] {
            let refused = Settings::resolve(Flags {
                peer_routes: Some(routes.into()),
                ..Flags::default()
            });
            assert!(
                matches!(refused, Err(ConfigError::Invalid(_))),
                "{routes:?}"
            );
        }
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "nod_id = 3\n").expect("write");
        let typo = Settings::resolve(Flags {
            config: Some(path),
            ..Flags::default()
        });
        assert!(matches!(typo, Err(ConfigError::Parse { .. })), "{typo:?}");
        // The last case lists node 1 on a port it does not listen on.
        for peers in ["", "1=a,1=b", "x=a", "0=a", "1", "1=127.0.0.1:9999"] {
            let refused = Settings::resolve(Flags {
                peers: Some(peers.into()),
                ..Flags::default()
            });
            assert!(matches!(refused, Err(ConfigError::Invalid(_))), "{peers:?}");
        }
        let absent = Settings::resolve(Flags {
            node_id: Some(4),
            ..Flags::default()
        });
        assert!(matches!(absent, Err(ConfigError::Invalid(_))));
    }
}
