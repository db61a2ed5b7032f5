//! A cluster of three real `fishchat-node` processes, driven from outside.

use std::collections::BTreeSet;
use std::time::Duration;

use fishchat_client::{Client, ClientConfig};
use fishchat_cluster_tests::{Cluster, ClusterSpec};
use fishchat_proto::peer::raft_peer_client::RaftPeerClient;
use fishchat_proto::peer::{peer_error, raft_reply, RaftMessage, RaftReply};
use serde_json::Value;

const SHARDS: u32 = 8;
const PATIENCE: Duration = Duration::from_secs(60);

/// The leader each shard has in a node's `/status`, if every shard has one.
fn leaders(status: &Value) -> Option<Vec<u64>> {
    let shards = status["shards"].as_array()?;
    if shards.len() != SHARDS as usize {
        return None;
    }
    shards.iter().map(|s| s["leader"].as_u64()).collect()
}

/// Each shard's leader when all three nodes name the same one for every shard.
fn agreed_leaders(cluster: &Cluster) -> anyhow::Result<Option<Vec<u64>>> {
    let views: Vec<Option<Vec<u64>>> = (1..=3)
        .map(|id| cluster.status(id).map(|s| leaders(&s)))
        .collect::<Result<_, _>>()?;
    Ok(match views.as_slice() {
        [Some(a), Some(b), Some(c)] if a == b && b == c => Some(a.clone()),
        _ => None,
    })
}

/// (applied index, digest) per shard in a node's `/status`.
fn digests(status: &Value) -> Vec<(u64, String)> {
    status["shards"]
        .as_array()
        .map(|shards| {
            shards
                .iter()
                .map(|s| {
                    (
                        s["digest_index"].as_u64().unwrap_or(0),
                        s["digest"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn three_nodes_form_every_shard_fail_over_a_killed_node_and_take_it_back() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, SHARDS)?;

    // Formed: every node agrees on a leader for every shard, and the first
    // leaders are spread over all three nodes.
    let agreed = cluster.eventually(
        "every shard has one agreed leader",
        PATIENCE,
        agreed_leaders,
    )?;
    let leading: BTreeSet<u64> = agreed.iter().copied().collect();
    assert_eq!(
        leading,
        BTreeSet::from([1, 2, 3]),
        "leaders spread over the nodes: {agreed:?}"
    );

    // The meta group settled one cluster id, the same on every node.
    let ids = cluster.eventually("every node knows the cluster id", PATIENCE, |c| {
        let ids: Vec<Value> = (1..=3)
            .map(|id| c.status(id).map(|s| s["cluster_id"].clone()))
            .collect::<Result<_, _>>()?;
        Ok(ids.iter().all(|id| id.is_string()).then_some(ids))
    })?;
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one cluster id: {ids:?}"
    );

    // SIGKILL node 1: the other two elect leaders among themselves.
    cluster.kill(1)?;
    cluster.eventually("survivors lead every shard", PATIENCE, |c| {
        let two = leaders(&c.status(2)?);
        let three = leaders(&c.status(3)?);
        Ok(
            (two.is_some() && two == three && two.as_ref().is_some_and(|l| !l.contains(&1)))
                .then_some(()),
        )
    })?;

    // Restarted on its data, node 1 rejoins and all replicas match.
    cluster.start_node(1)?;
    cluster.eventually("replicas converge after the restart", PATIENCE, |c| {
        let views: Vec<Value> = (1..=3).map(|id| c.status(id)).collect::<Result<_, _>>()?;
        let all_led = views.iter().all(|v| leaders(v).is_some());
        let first = digests(&views[0]);
        let same =
            views.iter().all(|v| digests(v) == first) && first.iter().all(|(index, _)| *index > 0);
        Ok((all_led && same).then_some(()))
    })?;
    let metrics = cluster.metrics(1)?;
    assert!(
        metrics.contains("fishchat_shard_is_leader"),
        "metrics are served:\n{metrics}"
    );

    // SIGTERM stops every node cleanly.
    for id in 1..=3 {
        let status = cluster.terminate(id, Duration::from_secs(20))?;
        assert!(
            status.success(),
            "node {id} exits 0 on SIGTERM ({status}); log:\n{}",
            cluster.log(id)
        );
    }
    Ok(())
}

#[test]
fn a_node_refuses_another_nodes_data_directory() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, SHARDS)?;
    cluster.eventually("node 1 wrote its identity", PATIENCE, |c| {
        Ok(c.data_dir(1).join("identity.json").exists().then_some(()))
    })?;
    cluster.kill(1)?;
    let status = cluster.run_to_exit(2, 1, Duration::from_secs(30))?;
    assert!(!status.success(), "node 2 must not open node 1's data");
    assert!(
        cluster.log(2).contains("belongs to node 1"),
        "the refusal says why:\n{}",
        cluster.log(2)
    );
    Ok(())
}

/// What node `id`'s peer port answers a vote request for a group no node
/// hosts, sent with `tag` in the cluster header.
async fn vote_tagged(
    cluster: &Cluster,
    id: u64,
    tag: &str,
) -> anyhow::Result<Result<RaftReply, tonic::Status>> {
    let tag: tonic::metadata::MetadataValue<_> = tag.parse()?;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.peer_addr(id)))?
            .connect()
            .await?;
    let mut client =
        RaftPeerClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("fishchat-cluster", tag.clone());
            Ok(request)
        });
    let vote = RaftMessage {
        group_id: 4242,
        payload: Vec::new(),
    };
    Ok(client.vote(vote).await.map(tonic::Response::into_inner))
}

#[test]
fn a_node_refuses_peer_requests_of_another_cluster_also_after_a_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(3, SHARDS)?;
    let cluster_id = cluster.eventually("node 1 knows its cluster id", PATIENCE, |c| {
        Ok(c.status(1)?["cluster_id"].as_str().map(String::from))
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let check = |cluster: &Cluster, when: &str| -> anyhow::Result<()> {
        rt.block_on(async {
            let foreign = vote_tagged(cluster, 1, "another-cluster").await?;
            anyhow::ensure!(
                matches!(&foreign, Err(s) if s.code() == tonic::Code::FailedPrecondition),
                "{when}: another cluster's request is refused: {foreign:?}"
            );
            let own = vote_tagged(cluster, 1, &cluster_id).await?;
            anyhow::ensure!(
                matches!(&own, Ok(RaftReply { result: Some(raft_reply::Result::Error(e)) })
                    if e.code == peer_error::Code::UnknownGroup as i32),
                "{when}: the cluster's own request reaches the groups: {own:?}"
            );
            Ok(())
        })
    };
    check(&cluster, "running")?;
    // Restarted alone, so that its meta group cannot settle: it refuses
    // them still, from the id it recorded before any group opens.
    for id in 1..=3 {
        cluster.kill(id)?;
    }
    cluster.start_node(1)?;
    cluster.eventually("node 1's peer port answers", PATIENCE, |c| {
        Ok(rt.block_on(vote_tagged(c, 1, &cluster_id)).ok().map(drop))
    })?;
    check(&cluster, "restarted alone")?;
    Ok(())
}

#[test]
fn a_node_cut_off_from_its_peers_loses_its_shards_and_catches_up_when_healed() -> anyhow::Result<()>
{
    let cluster = Cluster::launch(ClusterSpec {
        nodes: 3,
        shards: SHARDS,
        args: Vec::new(),
        partitionable: true,
    })?;
    let agreed = cluster.eventually(
        "every shard has one agreed leader",
        PATIENCE,
        agreed_leaders,
    )?;
    // Cut the leader of shard 0 off from both peers, both ways.
    let cut = agreed[0];
    let rest: BTreeSet<u64> = (1..=3).filter(|n| *n != cut).collect();
    cluster.partition(&[BTreeSet::from([cut]), rest.clone()])?;
    cluster.eventually(
        "the majority leads every shard without the cut node",
        PATIENCE,
        |c| {
            let views: Vec<Option<Vec<u64>>> = rest
                .iter()
                .map(|id| c.status(*id).map(|s| leaders(&s)))
                .collect::<Result<_, _>>()?;
            Ok(match views.as_slice() {
                [Some(a), Some(b)] if a == b && !a.contains(&cut) => Some(()),
                _ => None,
            })
        },
    )?;
    // The majority keeps taking writes: a user registers through it.
    let majority_node = *rest
        .first()
        .ok_or_else(|| anyhow::anyhow!("two nodes remain"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = ClientConfig::from_ca_file(
            vec![cluster.client_addr(majority_node)],
            cluster.ca_path(),
        )?;
        let client = Client::connect(config).await?;
        client.register("partitioned", "correct horse").await?;
        client.close();
        anyhow::Ok(())
    })?;
    // Healed, the cut node takes the writes it missed: every replica agrees.
    cluster.heal();
    cluster.eventually(
        "replicas converge after the partition heals",
        PATIENCE,
        Cluster::replicas_agree,
    )?;
    Ok(())
}
