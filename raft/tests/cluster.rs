//! Acceptance tests of the group host: three hosts in one process, real
//! RocksDB in temporary directories, real gRPC over loopback.
//!
//! The tests take turns (each holds `SERIAL`): on a two-core machine three
//! clusters electing leaders at once would only measure the scheduler.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::Context;
use common::{assert_holds_writes, test_timing, write, write_many, written, Cluster, COUNT_KEY};
use fishchat_proto::peer::raft_peer_client::RaftPeerClient;
use fishchat_proto::peer::{peer_error, raft_reply, RaftMessage, RaftMessages};
use fishchat_raft::{RaftTiming, ReadError, Role, WriteError};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_groups_replicate_twenty_thousand_writes_identically_on_three_hosts(
) -> anyhow::Result<()> {
    let _turn = serial().await;
    let cluster = Cluster::start(3, 16, test_timing()).await?;
    let mut led = [0usize; 3];
    for group in &cluster.groups {
        let leader = cluster.leader_of(*group, LONG).await?;
        led[leader] += 1;
        for host in cluster.live() {
            assert_eq!(
                host.status(*group).and_then(|s| s.leader),
                Some(leader as u64 + 1),
                "every replica of group {group} agrees on its leader"
            );
        }
    }

    assert!(
        led.iter().all(|n| *n > 0),
        "initialising groups from different hosts spreads their leaders: {led:?}"
    );

    write_many(cluster.live(), &cluster.groups, 0, 20_000, 64).await?;

    let digests = cluster.wait_converged(LONG).await?;
    assert_eq!(digests.len(), 16);
    for host in cluster.live() {
        for group in &cluster.groups {
            let count = host.read_local(*group, COUNT_KEY)?;
            assert_eq!(
                count.as_deref(),
                Some(&b"1250"[..]),
                "group {group} applied 20000/16 writes"
            );
        }
        let sample: Vec<usize> = (0..20_000).step_by(997).collect();
        assert_holds_writes(&host, &cluster.groups, &sample)?;
    }
    let host = cluster.host(0)?;
    let entries: u64 = cluster
        .groups
        .iter()
        .filter_map(|group| host.status(*group).map(|s| s.applied))
        .sum();
    assert!(
        entries < 20_000,
        "concurrent writes to a group share Raft entries: 20000 writes took {entries} entries"
    );
    let stats = host.storage_stats();
    assert!(
        stats.writes_per_sync() > 1.0,
        "group commit makes one WAL sync cover several writes (got {:.2})",
        stats.writes_per_sync()
    );
    let leader = cluster.leader_of(cluster.groups[0], LONG).await?;
    let peers = cluster.host(leader)?.peer_stats();
    assert!(
        peers.appends_per_rpc() > 1.0,
        "appends of several groups to one peer share stream messages (got {:.2} per message)",
        peers.appends_per_rpc()
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_catches_up_from_its_data_directory() -> anyhow::Result<()> {
    let _turn = serial().await;
    let mut cluster = Cluster::start(3, 4, test_timing()).await?;
    write_many(cluster.live(), &cluster.groups, 0, 400, 8).await?;
    cluster.stop(2).await?;

    write_many(cluster.live(), &cluster.groups, 400, 800, 8).await?;
    cluster.restart(2).await?;

    let digests = cluster.wait_converged(LONG).await?;
    let restarted = cluster.host(2)?;
    for group in &cluster.groups {
        assert_eq!(restarted.digest(*group)?.1, digests[group]);
        assert_eq!(
            restarted.read_local(*group, COUNT_KEY)?.as_deref(),
            Some(&b"300"[..])
        );
    }
    assert_holds_writes(&restarted, &cluster.groups, &[0, 399, 400, 1199])?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_behind_the_purged_log_receives_a_snapshot_and_converges() -> anyhow::Result<()> {
    let _turn = serial().await;
    let timing = RaftTiming {
        snapshot_every_entries: 100,
        entries_kept_after_snapshot: 0,
        // Small chunks, so the snapshot crosses the wire in several messages.
        snapshot_chunk_bytes: 1024,
        ..test_timing()
    };
    let mut cluster = Cluster::start(3, 1, timing).await?;
    let group = cluster.groups[0];
    write_many(cluster.live(), &cluster.groups, 0, 50, 4).await?;
    cluster.wait_converged(LONG).await?;
    let behind_at = cluster
        .host(2)?
        .status(group)
        .map(|s| s.last_log_index)
        .unwrap_or(0);
    cluster.stop(2).await?;

    write_many(cluster.live(), &cluster.groups, 50, 1000, 8).await?;
    let leader = cluster.host(cluster.leader_of(group, LONG).await?)?;
    let deadline = std::time::Instant::now() + LONG;
    while leader.status(group).map(|s| s.purged).unwrap_or(0) <= behind_at {
        assert!(
            std::time::Instant::now() < deadline,
            "the leader purges its log after a snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    cluster.restart(2).await?;
    let digests = cluster.wait_converged(LONG).await?;
    let restarted = cluster.host(2)?;
    assert_eq!(restarted.digest(group)?.1, digests[&group]);
    let status = restarted.status(group).expect("group is open");
    assert!(
        status.snapshot > behind_at,
        "the lagging host installed a snapshot past its old log end ({} <= {behind_at})",
        status.snapshot
    );
    assert_eq!(
        restarted.read_local(group, COUNT_KEY)?.as_deref(),
        Some(&b"1050"[..])
    );
    assert_holds_writes(&restarted, &cluster.groups, &[0, 49, 50, 1049])?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_is_replaced_and_rejoins_as_a_follower() -> anyhow::Result<()> {
    let _turn = serial().await;
    let mut cluster = Cluster::start(3, 2, test_timing()).await?;
    let group = cluster.groups[0];
    write_many(cluster.live(), &cluster.groups, 0, 100, 4).await?;
    let old = cluster.leader_of(group, LONG).await?;
    cluster.stop(old).await?;

    // A surviving host reaches whichever host the group elects next.
    let survivor = cluster.host((old + 1) % 3)?;
    let answer = survivor.propose(group, b"during=election".to_vec()).await?;
    assert_eq!(answer, b"51", "the write after the first 50 of this group");

    let new = cluster.leader_of(group, LONG).await?;
    assert_ne!(new, old, "another host is elected");
    write_many(cluster.live(), &cluster.groups, 100, 200, 4).await?;

    cluster.restart(old).await?;
    cluster.wait_converged(LONG).await?;
    let rejoined = cluster.host(old)?.status(group).expect("group is open");
    assert_eq!(
        rejoined.role,
        Role::Follower,
        "the old leader comes back as a follower"
    );
    assert_eq!(rejoined.leader, Some(new as u64 + 1));
    assert_eq!(
        cluster.host(old)?.read_local(group, COUNT_KEY)?.as_deref(),
        Some(&b"151"[..]),
        "it holds the writes made while it was away"
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_return_to_a_restarted_host_until_each_leads_its_share() -> anyhow::Result<()> {
    let _turn = serial().await;
    let timing = RaftTiming {
        balance_every: Some(Duration::from_millis(500)),
        ..test_timing()
    };
    let mut cluster = Cluster::start(3, 6, timing).await?;
    write_many(cluster.live(), &cluster.groups, 0, 20, 4).await?;
    cluster.stop(0).await?;
    // The groups host 0 led elect leaders on the other two.
    for group in cluster.groups.clone() {
        let leader = cluster.leader_of(group, LONG).await?;
        assert_ne!(leader, 0, "group {group} is led by a live host");
    }
    write_many(cluster.live(), &cluster.groups, 20, 20, 4).await?;
    cluster.restart(0).await?;

    let deadline = std::time::Instant::now() + LONG;
    let led = loop {
        let mut led = [0usize; 3];
        for (index, count) in led.iter_mut().enumerate() {
            let host = cluster.host(index)?;
            *count = cluster
                .groups
                .iter()
                .filter(|g| host.status(**g).is_some_and(|s| s.role == Role::Leader))
                .count();
        }
        if led == [2, 2, 2] || std::time::Instant::now() > deadline {
            break led;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        led,
        [2, 2, 2],
        "each host leads two of the six groups again"
    );
    // Hand-overs lose nothing: every group still takes writes and holds all.
    write_many(cluster.live(), &cluster.groups, 40, 20, 4).await?;
    cluster.wait_converged(LONG).await?;
    let restarted = cluster.host(0)?;
    assert_holds_writes(&restarted, &cluster.groups, &[0, 19, 20, 59])?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_stopping_and_reopening_every_host() -> anyhow::Result<()> {
    let _turn = serial().await;
    let mut cluster = Cluster::start(3, 4, test_timing()).await?;
    write_many(cluster.live(), &cluster.groups, 0, 600, 16).await?;
    for index in 0..3 {
        cluster.stop(index).await?;
    }
    for index in 0..3 {
        cluster.restart(index).await?;
    }
    cluster.wait_for_leaders(LONG).await?;
    for i in 0..600 {
        let (group, key, value) = written(&cluster.groups, i);
        let leader = cluster.host(cluster.leader_of(group, LONG).await?)?;
        let read = loop {
            match leader.read(group, &key).await {
                Ok(read) => break read,
                // Leadership may still be settling right after the restart.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        assert_eq!(read, Some(value), "acknowledged write {i} is still there");
    }
    write_many(cluster.live(), &cluster.groups, 600, 40, 4).await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_writes_and_linearizable_reads_naming_the_leader() -> anyhow::Result<()>
{
    let _turn = serial().await;
    let cluster = Cluster::start(3, 1, test_timing()).await?;
    let group = cluster.groups[0];
    let leader = cluster.leader_of(group, LONG).await?;
    let follower = cluster.host((leader + 1) % 3)?;
    let refused = follower.write(group, b"k=v".to_vec()).await;
    match &refused {
        Err(WriteError::NotLeader {
            group: g,
            leader: named,
            leader_addr,
        }) => {
            assert_eq!(*g, group);
            assert_eq!(*named, Some(leader as u64 + 1));
            assert_eq!(
                leader_addr.as_deref(),
                Some(cluster.host(leader)?.peer_addr().to_string().as_str())
            );
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert!(refused.as_ref().err().is_some_and(WriteError::is_retryable));
    assert_eq!(
        follower.read_local(group, b"k")?,
        None,
        "the refused write changed nothing"
    );
    assert_eq!(
        follower.write(999, b"k=v".to_vec()).await,
        Err(WriteError::UnknownGroup(999))
    );
    assert_eq!(
        follower.linearize(group).await,
        Err(ReadError::NotLeader {
            group,
            leader: Some(leader as u64 + 1),
            leader_addr: Some(cluster.host(leader)?.peer_addr().to_string()),
        }),
        "a linearizable read on a follower is refused with the leader's name"
    );

    // On the leader, reads and scans see every acknowledged write.
    let leading = cluster.host(leader)?;
    for key in ["s3", "s1", "s2", "s5", "s4"] {
        leading
            .write(group, format!("{key}={key}!").into_bytes())
            .await?;
    }
    let oversized = vec![b'x'; 2 * 1024 * 1024];
    assert_eq!(
        leading.write(group, oversized).await,
        Err(WriteError::TooLarge {
            size: 2 * 1024 * 1024,
            limit: 1024 * 1024
        }),
        "a command over the limit is refused before it reaches the log"
    );
    leading.linearize(group).await?;
    let page = leading.scan_local(group, b"s", b"t", 3)?;
    let keys: Vec<&[u8]> = page.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(
        keys,
        [&b"s1"[..], b"s2", b"s3"],
        "a scan returns keys in order, up to its limit"
    );
    assert_eq!(page[0].1, b"s1!");

    // Through propose and scan, a follower reaches the leader for its caller.
    let answer = follower.propose(group, b"via=follower".to_vec()).await?;
    assert_eq!(
        answer, b"6",
        "the sixth write of the group, applied at the leader"
    );
    assert_eq!(
        leading.read(group, b"via").await?.as_deref(),
        Some(&b"follower"[..])
    );
    assert_eq!(
        follower.scan(group, b"s", b"t", 3).await?,
        page,
        "a scan forwarded to the leader sees what the leader sees"
    );
    assert_eq!(
        leading.read(group, b"s5").await?.as_deref(),
        Some(&b"s5!"[..])
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_the_same_time_share_rounds_and_each_sees_the_writes_before_it(
) -> anyhow::Result<()> {
    let _turn = serial().await;
    let cluster = Cluster::start(3, 1, test_timing()).await?;
    let group = cluster.groups[0];
    let leader = cluster.leader_of(group, LONG).await?;
    let leading = cluster.host(leader)?;
    let rounds_before = leading.status(group).map_or(0, |s| s.read_rounds);
    leading.linearize(group).await?;
    let rounds_alone = leading.status(group).map_or(0, |s| s.read_rounds);
    assert_eq!(
        rounds_alone,
        rounds_before + 1,
        "a lone read runs one round"
    );

    // 200 clients at once, each writing its own key and reading it back
    // linearizably as soon as the write is acknowledged.
    const CLIENTS: usize = 200;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let host = leading.clone();
        clients.push(tokio::spawn(async move {
            let key = format!("r{i}");
            host.write(group, format!("{key}=v{i}").into_bytes())
                .await?;
            let read = host.read(group, key.as_bytes()).await?;
            anyhow::ensure!(
                read.as_deref() == Some(format!("v{i}").as_bytes()),
                "client {i} read {read:?} after its acknowledged write"
            );
            anyhow::Ok(())
        }));
    }
    for client in clients {
        client.await??;
    }
    let rounds = leading.status(group).map_or(0, |s| s.read_rounds) - rounds_alone;
    assert!(
        (1..CLIENTS as u64).contains(&rounds),
        "{CLIENTS} concurrent reads ran {rounds} rounds: waiting reads share one"
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_peer_port_gets_an_error_and_groups_keep_serving() -> anyhow::Result<()> {
    let _turn = serial().await;
    let cluster = Cluster::start(3, 2, test_timing()).await?;
    let target = cluster.host(0)?;
    let addr = target.peer_addr();

    // Raw bytes that are not HTTP/2: the server drops the connection.
    let mut raw = std::net::TcpStream::connect(addr)?;
    raw.set_read_timeout(Some(Duration::from_secs(10)))?;
    raw.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096))?;
    let mut sink = Vec::new();
    let closed = raw.read_to_end(&mut sink);
    let timed_out = closed.as_ref().is_err_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    });
    assert!(
        !timed_out,
        "the server ends a connection that does not speak HTTP/2 ({closed:?})"
    );

    // Well-formed gRPC carrying garbage: typed refusals, never a crash.
    let mut client = RaftPeerClient::connect(format!("http://{addr}")).await?;
    let cases = [
        (
            cluster.groups[0],
            b"\xc1\xff not msgpack".to_vec(),
            peer_error::Code::BadPayload,
        ),
        (4242, Vec::new(), peer_error::Code::UnknownGroup),
    ];
    for (group_id, payload, expected) in cases.clone() {
        for reply in [
            client
                .append(RaftMessage {
                    group_id,
                    payload: payload.clone(),
                })
                .await?,
            client
                .vote(RaftMessage {
                    group_id,
                    payload: payload.clone(),
                })
                .await?,
            client
                .snapshot(RaftMessage {
                    group_id,
                    payload: payload.clone(),
                })
                .await?,
        ] {
            match reply.into_inner().result {
                Some(raft_reply::Result::Error(e)) => {
                    assert_eq!(e.code, expected as i32, "{}", e.message)
                }
                other => panic!("expected a {expected:?} refusal, got {other:?}"),
            }
        }
    }

    // The same cases as one message of an append stream: each refused
    // alike, in order, and the stream stays open for the next message.
    let batch: Vec<RaftMessage> = cases
        .iter()
        .map(|(group_id, payload, _)| RaftMessage {
            group_id: *group_id,
            payload: payload.clone(),
        })
        .collect();
    let (outgoing, queued) = tokio::sync::mpsc::channel(1);
    let mut answers = client
        .append_stream(tokio_stream::wrappers::ReceiverStream::new(queued))
        .await?
        .into_inner();
    for round in 0..2 {
        outgoing
            .send(RaftMessages {
                messages: batch.clone(),
            })
            .await?;
        let replies = answers
            .message()
            .await?
            .context("the stream answers every message")?
            .replies;
        assert_eq!(
            replies.len(),
            cases.len(),
            "one reply per append, round {round}"
        );
        for (reply, (_, _, expected)) in replies.into_iter().zip(&cases) {
            match reply.result {
                Some(raft_reply::Result::Error(e)) => assert_eq!(e.code, *expected as i32),
                other => panic!("expected a {expected:?} refusal in the batch, got {other:?}"),
            }
        }
    }
    // A message beyond the limit is refused, and ends the stream.
    let oversized = (0..65)
        .map(|_| RaftMessage {
            group_id: 4242,
            payload: Vec::new(),
        })
        .collect();
    outgoing
        .send(RaftMessages {
            messages: oversized,
        })
        .await?;
    let refused = answers.message().await;
    assert!(
        matches!(&refused, Err(status) if status.code() == tonic::Code::InvalidArgument),
        "{refused:?}"
    );
    assert!(
        matches!(answers.message().await, Ok(None) | Err(_)),
        "nothing follows a refused message"
    );

    let before: BTreeMap<_, _> = cluster
        .groups
        .iter()
        .map(|g| (*g, target.status(*g).map(|s| s.role)))
        .collect();
    assert!(
        before.values().all(|r| r.is_some()),
        "groups are still open"
    );
    for group in &cluster.groups {
        let answer = write(&cluster.live(), *group, b"after=garbage".to_vec(), LONG).await?;
        assert_eq!(answer, b"1");
    }
    cluster.wait_converged(LONG).await?;
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_of_another_cluster_is_refused_and_the_others_keep_serving() -> anyhow::Result<()> {
    let _turn = serial().await;
    let cluster = Cluster::start(3, 2, test_timing()).await?;
    write_many(cluster.live(), &cluster.groups, 0, 40, 4).await?;
    cluster.wait_converged(LONG).await?;

    // A stream a beta node opened while host 1 knew no cluster yet: host 1
    // checks its tag with every message, not only when it opened.
    let beta = fishchat_raft::ClusterTag::default();
    beta.set("beta")?;
    let early = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        cluster.host(0)?.peer_addr()
    ))?
    .connect()
    .await?;
    let (outgoing, queued) = tokio::sync::mpsc::channel(1);
    let mut answers = RaftPeerClient::with_interceptor(early, beta)
        .append_stream(tokio_stream::wrappers::ReceiverStream::new(queued))
        .await?
        .into_inner();
    let unknown_group = || RaftMessages {
        messages: vec![RaftMessage {
            group_id: 4242,
            payload: Vec::new(),
        }],
    };
    outgoing.send(unknown_group()).await?;
    answers
        .message()
        .await?
        .context("an untagged host answers a tagged stream")?;

    // Hosts 1 and 2 are cluster alpha; host 3 turns out to be of cluster
    // beta (formed apart, in life; here it is only told so).
    let ours: Vec<_> = cluster.live()[..2].to_vec();
    let stranger = cluster.host(2)?;
    for host in &ours {
        host.set_cluster_tag("alpha")?;
    }
    stranger.set_cluster_tag("beta")?;
    assert!(
        stranger.set_cluster_tag("alpha").is_err(),
        "a tag is set once"
    );
    let applied = |host: &fishchat_raft::GroupHost| -> Vec<u64> {
        cluster
            .groups
            .iter()
            .map(|g| host.status(*g).map_or(0, |s| s.applied))
            .collect()
    };
    let stranded = applied(&stranger);
    outgoing.send(unknown_group()).await?;
    let late = answers.message().await;
    assert!(
        matches!(&late, Err(s) if s.code() == tonic::Code::FailedPrecondition),
        "the open stream is refused once host 1 knows its cluster: {late:?}"
    );

    // The stranger's requests are refused before any group sees them; the
    // cluster's own (tagged alike) and untagged ones reach the groups.
    let addr = ours[0].peer_addr();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let garbage = RaftMessage {
        group_id: cluster.groups[0],
        payload: b"\xc1 not msgpack".to_vec(),
    };
    let mut as_stranger = RaftPeerClient::with_interceptor(channel.clone(), stranger.cluster_tag());
    let refused = as_stranger.vote(garbage.clone()).await;
    assert!(
        matches!(&refused, Err(s) if s.code() == tonic::Code::FailedPrecondition),
        "{refused:?}"
    );
    for reply in [
        RaftPeerClient::with_interceptor(channel.clone(), ours[1].cluster_tag())
            .vote(garbage.clone())
            .await?,
        RaftPeerClient::new(channel).vote(garbage).await?,
    ] {
        assert!(matches!(
            reply.into_inner().result,
            Some(raft_reply::Result::Error(e)) if e.code == peer_error::Code::BadPayload as i32
        ));
    }

    // Hosts 1 and 2 go on committing (electing leaders among themselves for
    // the groups host 3 led); none of it reaches host 3.
    write_many(ours.clone(), &cluster.groups, 40, 200, 4).await?;
    let deadline = std::time::Instant::now() + LONG;
    for host in &ours {
        for group in &cluster.groups {
            // The write's leader applied it; the other may still be applying.
            while host.read_local(*group, COUNT_KEY)?.as_deref() != Some(&b"120"[..]) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "group {group} holds every write on host {}",
                    host.node_id()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        applied(&stranger),
        stranded,
        "host 3 applied nothing from the other cluster"
    );
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_can_be_removed_and_added_back_as_learner_then_voter() -> anyhow::Result<()> {
    let _turn = serial().await;
    let cluster = Cluster::start(3, 1, test_timing()).await?;
    let group = cluster.groups[0];
    let leader_index = cluster.leader_of(group, LONG).await?;
    let leader = cluster.host(leader_index)?;
    let leaving = (leader_index + 1) % 3;
    let leaving_id = leaving as u64 + 1;
    let staying: std::collections::BTreeSet<u64> = (1..=3).filter(|id| *id != leaving_id).collect();

    // A new leader may change membership once its first entry is committed.
    leader.wait_applied(group, 1, LONG).await?;
    leader.change_voters(group, staying.clone()).await?;
    let voters = leader.status(group).map(|s| s.voters).unwrap_or_default();
    assert_eq!(
        voters,
        staying.iter().copied().collect::<Vec<_>>(),
        "the replica was removed"
    );
    write_many(cluster.live(), &cluster.groups, 0, 20, 2).await?;

    let addr = cluster.host(leaving)?.peer_addr().to_string();
    leader.add_learner(group, leaving_id, addr).await?;
    leader.change_voters(group, (1..=3).collect()).await?;
    let voters = leader.status(group).map(|s| s.voters).unwrap_or_default();
    assert_eq!(
        voters,
        vec![1, 2, 3],
        "the learner was promoted back to voter"
    );
    cluster.wait_converged(LONG).await?;
    let rejoined = cluster.host(leaving)?;
    assert_holds_writes(&rejoined, &cluster.groups, &[0, 19])?;
    cluster.shutdown().await;
    Ok(())
}
