//! Network partitions between nodes, made by TCP proxies the harness owns.
//!
//! Every directed peer link (node A dialing node B's peer port) goes through
//! a proxy of its own on loopback: node A is started with
//! `--peer-routes B=<proxy address>`, so its Raft traffic and its session
//! events for B cross that proxy. A connection is made by one node and
//! carries both directions, so cutting a pair cuts the links both ways.
//!
//! A cut link holds its bytes, like a network dropping every packet: what is
//! in flight stops where it is, new connections are accepted but not carried
//! on, and nothing is closed. The nodes see what a real partition shows them:
//! RPCs that never answer until their timeouts and keep-alives give up. When
//! the link heals, what was held goes on (TCP would deliver it after
//! retransmission too) and waiting connections are carried to their peer.
//!
//! Why proxies and not network namespaces: every node of a test listens on
//! loopback, and the test's own clients must keep reaching every node during
//! a partition (a client on the minority side is part of the scenario).
//! Proxies need no privileges, nothing installed, no host-wide routing
//! change, and they stop with the test. See docs/chaos.md.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A node's id (1-based).
type NodeId = u64;

/// One directed link: where its proxy listens and whether it carries bytes.
struct Link {
    listen: SocketAddr,
    up: watch::Sender<bool>,
}

/// The proxies on every directed link between a cluster's nodes.
pub struct PeerLinks {
    links: BTreeMap<(NodeId, NodeId), Link>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl PeerLinks {
    /// Proxies for every ordered pair of `nodes`; `peer_addr` gives the
    /// address a node listens on for peers.
    pub fn start(nodes: &[NodeId], peer_addr: impl Fn(NodeId) -> String) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("peer-proxy")
            .enable_all()
            .build()?;
        let mut links = BTreeMap::new();
        for &from in nodes {
            for &to in nodes.iter().filter(|&&to| to != from) {
                let target = peer_addr(to);
                let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
                let listen = listener.local_addr()?;
                let (up, is_up) = watch::channel(true);
                runtime.spawn(carry(listener, target, is_up));
                links.insert((from, to), Link { listen, up });
            }
        }
        Ok(Self {
            links,
            runtime: Some(runtime),
        })
    }

    /// The `--peer-routes` value for node `from`: every peer through its proxy.
    pub fn routes_of(&self, from: NodeId) -> String {
        self.links
            .iter()
            .filter(|((a, _), _)| *a == from)
            .map(|((_, to), link)| format!("{to}={}", link.listen))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Cuts every link between nodes on different `sides`; links within a
    /// side, and of nodes on no side, are left as they are.
    pub fn partition(&self, sides: &[BTreeSet<NodeId>]) {
        let side_of = |node: NodeId| sides.iter().position(|side| side.contains(&node));
        for ((from, to), link) in &self.links {
            if let (Some(a), Some(b)) = (side_of(*from), side_of(*to)) {
                if a != b {
                    link.up.send_replace(false);
                }
            }
        }
    }

    /// Lets every link carry bytes again.
    pub fn heal(&self) {
        for link in self.links.values() {
            link.up.send_replace(true);
        }
    }

    /// The links cut now, as (from, to).
    pub fn cut(&self) -> Vec<(NodeId, NodeId)> {
        self.links
            .iter()
            .filter(|(_, link)| !*link.up.borrow())
            .map(|(pair, _)| *pair)
            .collect()
    }
}

impl Drop for PeerLinks {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Accepts connections on `listener` and carries each to `target` while the
/// link is up.
async fn carry(listener: TcpListener, target: String, is_up: watch::Receiver<bool>) {
    loop {
        let inbound = match listener.accept().await {
            Ok((inbound, _)) => inbound,
            Err(e) => {
                // Out of descriptors, say: the link must not die for good.
                eprintln!("peer proxy to {target}: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = target.clone();
        let is_up = is_up.clone();
        tokio::spawn(async move {
            // A connection made while the link is cut waits, as a SYN would
            // be retried, and reaches the peer once it heals.
            if wait_up(is_up.clone()).await.is_err() {
                return;
            }
            let Ok(outbound) = TcpStream::connect(&target).await else {
                return; // the peer is down: the caller sees its connection close
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            tokio::join!(
                pipe(in_read, out_write, is_up.clone()),
                pipe(out_read, in_write, is_up)
            );
        });
    }
}

/// Copies `from` to `to`, holding each chunk while the link is cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    is_up: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if wait_up(is_up.clone()).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // The end of a connection crosses a cut link no sooner than its bytes:
    // the other side learns of it when the link heals. Both sockets stay
    // open until both directions are done.
    let _ = wait_up(is_up).await;
    let _ = to.shutdown().await;
}

/// Returns once the link is up; errs when the proxies are gone.
async fn wait_up(mut is_up: watch::Receiver<bool>) -> anyhow::Result<()> {
    is_up
        .wait_for(|up| *up)
        .await
        .map(|_| ())
        .context("the proxies stopped")
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// Reads what arrives within `wait`: the bytes, or `None` at end of stream.
    fn read_within(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = [0u8; 64];
        match stream.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Some(Vec::new())
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }

    #[test]
    fn a_cut_link_holds_bytes_and_the_close_until_it_heals() {
        let peer = TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer_addr = peer.local_addr().expect("addr").to_string();
        let links = PeerLinks::start(&[1, 2], |_| peer_addr.clone()).expect("proxies");
        let routes = links.routes_of(1);
        let via = routes.strip_prefix("2=").expect("node 1's route to node 2");
        let mut from_one = TcpStream::connect(via).expect("connect");
        let (mut at_two, _) = peer.accept().expect("the proxy reaches the peer");
        let short = Duration::from_millis(300);

        from_one.write_all(b"hello").expect("write");
        assert_eq!(
            read_within(&mut at_two, Duration::from_secs(5)),
            Some(b"hello".to_vec())
        );

        links.partition(&[BTreeSet::from([1]), BTreeSet::from([2])]);
        assert_eq!(links.cut(), vec![(1, 2), (2, 1)]);
        from_one.write_all(b"world").expect("write");
        assert_eq!(
            read_within(&mut at_two, short),
            Some(Vec::new()),
            "held while cut"
        );
        links.heal();
        assert_eq!(
            read_within(&mut at_two, Duration::from_secs(5)),
            Some(b"world".to_vec())
        );

        links.partition(&[BTreeSet::from([1]), BTreeSet::from([2])]);
        drop(from_one);
        assert_eq!(
            read_within(&mut at_two, short),
            Some(Vec::new()),
            "the close is held too"
        );
        links.heal();
        assert_eq!(
            read_within(&mut at_two, Duration::from_secs(5)),
            None,
            "and then arrives"
        );
        assert!(links.cut().is_empty());
    }

    #[test]
    fn a_partition_cuts_only_links_between_sides() {
        let links =
            PeerLinks::start(&[1, 2, 3], |id| format!("127.0.0.1:{}", 9 + id)).expect("proxies");
        links.partition(&[BTreeSet::from([1]), BTreeSet::from([2, 3])]);
        assert_eq!(links.cut(), vec![(1, 2), (1, 3), (2, 1), (3, 1)]);
        links.heal();
        assert!(links.cut().is_empty());
    }
}
