//! What a client needs to know to reach a cluster: its addresses, its CA, and
//! the client's timeouts.

use std::path::Path;
use std::time::Duration;

use fishchat_proto::frame::DEFAULT_MAX_FRAME_BYTES;

use crate::error::ClientError;

/// The server name every node certificate carries, whichever address is
/// dialled.
pub const DEFAULT_SERVER_NAME: &str = "fishchat";

/// How to reach a FishChat cluster and how patient to be with it.
///
/// Every field has a working default except `servers` and `ca_pem`, which
/// [`ClientConfig::new`] takes.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Node client addresses as `host:port` (`[v6addr]:port` for IPv6
    /// literals), tried in order. Failover also uses the addresses learned
    /// from `LoginResponse.client_addrs`.
    pub servers: Vec<String>,
    /// PEM of the cluster CA (`ca.pem`): the only certificate trusted.
    pub ca_pem: Vec<u8>,
    /// The name verified in the server's certificate (default `fishchat`).
    pub server_name: String,
    /// Longest wait for one answer on one stream (default 10 s); then the
    /// request counts as lost ([`ClientError::Timeout`]).
    pub request_timeout: Duration,
    /// Longest wait for one QUIC handshake (default 2 s: a node that does
    /// not answer within that on a LAN is down, and the next one is tried).
    pub connect_timeout: Duration,
    /// How long the retrying calls keep trying one request, across
    /// reconnects (default 30 s).
    pub retry_deadline: Duration,
    /// Largest frame payload accepted from the server (default 1 MiB).
    pub max_frame_bytes: u32,
    /// How often [`crate::Client::incoming`] syncs when no notify arrives
    /// (default 5 s).
    pub sync_interval: Duration,
    /// QUIC keep-alive interval (default 5 s), so an idle connection stays
    /// open and reachable for pushes.
    pub keep_alive_interval: Duration,
    /// QUIC idle timeout (default 30 s): a connection with no traffic from
    /// the server for this long is lost.
    pub idle_timeout: Duration,
    /// A UDP socket for connections to share (default none: each
    /// connection binds its own). A process holding thousands of
    /// connections, such as a load generator, shares a few.
    pub endpoint: Option<SharedEndpoint>,
}

/// One client UDP socket that many connections share; cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedEndpoint {
    endpoint: quinn::Endpoint,
}

impl SharedEndpoint {
    /// Binds an IPv4 UDP socket on an ephemeral port (IPv6 servers still
    /// get a socket of their own).
    pub fn bind_v4() -> Result<Self, ClientError> {
        let endpoint = quinn::Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into())
            .map_err(|e| ClientError::Connect(format!("cannot bind a UDP socket: {e}")))?;
        Ok(Self { endpoint })
    }

    /// The socket, if it can reach `addr` (same address family).
    pub(crate) fn for_addr(&self, addr: std::net::SocketAddr) -> Option<&quinn::Endpoint> {
        let local = self.endpoint.local_addr().ok()?;
        (local.is_ipv4() == addr.is_ipv4()).then_some(&self.endpoint)
    }
}

impl ClientConfig {
    /// A configuration for the cluster at `servers` whose CA is `ca_pem`,
    /// with default timeouts.
    pub fn new(servers: Vec<String>, ca_pem: Vec<u8>) -> Self {
        Self {
            servers,
            ca_pem,
            server_name: DEFAULT_SERVER_NAME.to_string(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            retry_deadline: Duration::from_secs(30),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            sync_interval: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            endpoint: None,
        }
    }

    /// Like [`ClientConfig::new`], reading the CA's PEM from `ca_path`.
    pub fn from_ca_file(
        servers: Vec<String>,
        ca_path: impl AsRef<Path>,
    ) -> Result<Self, ClientError> {
        let path = ca_path.as_ref();
        let ca_pem = std::fs::read(path).map_err(|e| {
            ClientError::Config(format!("cannot read the CA file {}: {e}", path.display()))
        })?;
        Ok(Self::new(servers, ca_pem))
    }
}

/// Splits a comma-separated address list (`FISHCHAT_SERVER`, `--server`)
/// into addresses, dropping blanks and surrounding spaces.
pub fn parse_server_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = ClientConfig::new(vec!["127.0.0.1:7101".into()], b"pem".to_vec());
        assert_eq!(config.server_name, "fishchat");
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        assert_eq!(config.retry_deadline, Duration::from_secs(30));
        assert_eq!(config.max_frame_bytes, 1 << 20);
        assert_eq!(config.keep_alive_interval, Duration::from_secs(5));
        assert_eq!(config.idle_timeout, Duration::from_secs(30));
    }

    #[test]
    fn a_server_list_is_split_on_commas_and_trimmed() {
        assert_eq!(
            parse_server_list(" a:1, b:2,,[::1]:3 "),
            vec!["a:1", "b:2", "[::1]:3"]
        );
        assert!(parse_server_list(" , ").is_empty());
    }

    #[test]
    fn the_ca_is_read_from_a_file_and_a_missing_file_is_a_config_error() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"-----BEGIN CERTIFICATE-----\n")
            .expect("write");
        let config = ClientConfig::from_ca_file(vec!["h:1".into()], file.path()).expect("read");
        assert_eq!(config.ca_pem, b"-----BEGIN CERTIFICATE-----\n");

        let missing = ClientConfig::from_ca_file(vec![], "/nonexistent/ca.pem");
        assert!(matches!(missing, Err(ClientError::Config(_))));
    }
}
