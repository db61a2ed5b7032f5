//! Group chat on a real three-node cluster (guarantee G5): every member who
//! was in the group when a message committed holds it exactly once, all
//! members hold the group's entries in the same order, also when the node
//! leading the group's shard is killed in the middle of a fan-out; and the
//! membership rules hold (G6).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use fishchat_client::{Client, ClientError};
use fishchat_cluster_tests::Cluster;
use fishchat_proto::client::{group_event::Kind, ErrorCode, GroupRole, InboxEntry};

mod common;

use common::{
    cli, config, gap_free_inbox, json_lines, one_cluster_at_a_time, runtime, send_many, started,
    To, PASSWORD, SHARDS,
};

/// Registers `name` and returns a client logged in as it, connected first
/// to node `first` and able to fail over to the others.
async fn member(cluster: &Cluster, first: u64, name: &str) -> anyhow::Result<(Client, u64)> {
    let order: Vec<u64> = (0..3).map(|i| (first - 1 + i) % 3 + 1).collect();
    let client = Client::connect(config(cluster, &order)?).await?;
    let id = client.register(name, PASSWORD).await?;
    client.login(name, PASSWORD, None).await?;
    Ok((client, id))
}

/// `count` logged-in members named `prefix0…`, spread over the nodes.
async fn members(
    cluster: &Cluster,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<(Client, u64)>> {
    let mut all = Vec::with_capacity(count);
    for i in 0..count {
        all.push(member(cluster, i as u64 % 3 + 1, &format!("{prefix}{i}")).await?);
    }
    Ok(all)
}

/// The entries of `group` in `client`'s inbox, in inbox order.
async fn group_entries(client: &Client, group: u64) -> anyhow::Result<Vec<InboxEntry>> {
    Ok(gap_free_inbox(client)
        .await?
        .into_iter()
        .filter(|e| e.group_id == group)
        .collect())
}

/// The messages (not membership events) among `entries`, as bodies.
fn messages(entries: &[InboxEntry]) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.group_event.is_none())
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect()
}

/// `client`'s entries of `group` once `done` holds for them (fan-out to
/// other members finishes after the sender's answer), or an error after
/// `patience`.
async fn entries_when(
    client: &Client,
    group: u64,
    patience: Duration,
    done: impl Fn(&[InboxEntry]) -> bool,
) -> anyhow::Result<Vec<InboxEntry>> {
    let deadline = Instant::now() + patience;
    loop {
        let entries = group_entries(client, group).await?;
        if done(&entries) {
            return Ok(entries);
        }
        if Instant::now() > deadline {
            bail!("not within {patience:?}; holding {entries:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn seqs(entries: &[InboxEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.group_seq).collect()
}

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> anyhow::Result<ErrorCode> {
    match result {
        Err(ClientError::Server { code, .. }) => Ok(code),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn twenty_members_five_senders_everyone_holds_all_500_in_one_order() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&[])?;
    runtime()?.block_on(async {
        let everyone = members(&cluster, "m", 20).await?;
        let ids: Vec<u64> = everyone.iter().map(|(_, id)| *id).collect();
        let (owner, _) = &everyone[0];
        let group = owner.create_group("twenty", &ids[1..]).await?.group_id;

        let senders = everyone
            .iter()
            .take(5)
            .enumerate()
            .map(|(i, (client, _))| send_many(client, To::Group(group), format!("s{i}"), 100));
        let acked: Vec<Vec<String>> = futures::future::try_join_all(senders).await?;
        let all_sent: BTreeSet<&String> = acked.iter().flatten().collect();
        ensure!(all_sent.len() == 500);

        let mut first_order: Option<Vec<u64>> = None;
        for (client, id) in &everyone {
            // Fan-out to the other members may still be under way.
            let entries = entries_when(client, group, Duration::from_secs(30), |e| {
                messages(e).len() >= 500
            })
            .await
            .with_context(|| format!("member {id} gets 500 messages"))?;
            let bodies = messages(&entries);
            ensure!(
                bodies.len() == 500,
                "member {id} holds {} messages",
                bodies.len()
            );
            let distinct: BTreeSet<&String> = bodies.iter().collect();
            ensure!(distinct == all_sent, "member {id} holds each message once");
            // Each sender's messages in the order it sent them.
            for (i, sent) in acked.iter().enumerate() {
                let prefix = format!("s{i} ");
                let theirs: Vec<&String> =
                    bodies.iter().filter(|b| b.starts_with(&prefix)).collect();
                ensure!(
                    theirs.iter().copied().eq(sent.iter()),
                    "sender {i}'s order at {id}"
                );
            }
            let order = seqs(&entries);
            match &first_order {
                None => {
                    ensure!(
                        order == (1..=501).collect::<Vec<u64>>(),
                        "seqs 1..=501: {order:?}"
                    );
                    first_order = Some(order);
                }
                Some(first) => ensure!(*first == order, "member {id} holds another order"),
            }
        }
        anyhow::Ok(())
    })
}

/// The node that leads `shard`, per node `asked`'s `/status`.
fn leader_of(cluster: &Cluster, asked: u64, shard: u64) -> anyhow::Result<Option<u64>> {
    let status = cluster.status(asked)?;
    Ok(status["shards"]
        .as_array()
        .and_then(|shards| shards.iter().find(|s| s["shard"].as_u64() == Some(shard)))
        .and_then(|s| s["leader"].as_u64()))
}

#[test]
fn killing_the_group_shards_leader_mid_fan_out_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let mut cluster = started(&[])?;
    let rt = runtime()?;
    let (everyone, group) = rt.block_on(async {
        let everyone = members(&cluster, "k", 6).await?;
        let ids: Vec<u64> = everyone.iter().map(|(_, id)| *id).collect();
        let group = everyone[0]
            .0
            .create_group("crash", &ids[1..])
            .await?
            .group_id;
        anyhow::Ok((everyone, group))
    })?;
    let shard = group % u64::from(SHARDS);
    let victim = cluster.eventually(
        "the group's shard has a leader",
        Duration::from_secs(30),
        |c| leader_of(c, 1, shard),
    )?;

    // One sender sends 1000 messages; after 200 acknowledgements the leader
    // of the group's shard is killed, and restarted a little later.
    let acked_200 = Arc::new(AtomicBool::new(false));
    let sending = {
        let acked_200 = acked_200.clone();
        let sender = &everyone[1].0;
        async move {
            let mut acked = Vec::new();
            for i in 0..1000 {
                let body = format!("c {i}");
                sender
                    .send_group(
                        group,
                        &format!("c-{i}"),
                        body.clone().into_bytes(),
                        "text/plain",
                    )
                    .await
                    .with_context(|| format!("sending {body}"))?;
                acked.push(body);
                if i == 199 {
                    acked_200.store(true, Ordering::SeqCst);
                }
            }
            anyhow::Ok(acked)
        }
    };
    let acked = rt.block_on(async {
        let crash = async {
            while !acked_200.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cluster.kill(victim)?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.start_node(victim)?;
            anyhow::Ok(())
        };
        let (acked, crashed) = tokio::join!(sending, crash);
        crashed?;
        acked
    })?;
    ensure!(acked.len() == 1000);
    cluster.wait_ready(victim, Duration::from_secs(60))?;

    rt.block_on(async {
        let expected: Vec<&String> = acked.iter().collect();
        let mut first_order: Option<Vec<u64>> = None;
        for (client, id) in &everyone {
            let entries = entries_when(client, group, Duration::from_secs(60), |e| {
                messages(e).len() >= 1000
            })
            .await
            .with_context(|| format!("member {id} gets 1000 messages"))?;
            let bodies = messages(&entries);
            ensure!(
                bodies.iter().eq(expected.iter().copied()),
                "member {id} holds every acknowledged message once, in order ({} held)",
                bodies.len()
            );
            let ids: BTreeSet<u64> = entries.iter().map(|e| e.message_id).collect();
            ensure!(
                ids.len() == entries.len(),
                "member {id} holds no message twice"
            );
            let order = seqs(&entries);
            match &first_order {
                None => first_order = Some(order),
                Some(first) => ensure!(*first == order, "member {id} holds another order"),
            }
        }
        anyhow::Ok(())
    })?;
    cluster.eventually(
        "every replica has the same state",
        Duration::from_secs(60),
        Cluster::replicas_agree,
    )?;
    Ok(())
}

#[test]
fn membership_rules_hold_and_the_cli_drives_groups() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&["--max-group-members", "4"])?;
    let rt = runtime()?;
    let names = ["owner", "bob", "carol", "dave", "erin", "frank"];
    let users: BTreeMap<&str, (Client, u64)> = rt.block_on(async {
        let mut users = BTreeMap::new();
        for (i, name) in names.iter().enumerate() {
            users.insert(*name, member(&cluster, i as u64 % 3 + 1, name).await?);
        }
        anyhow::Ok(users)
    })?;
    let id = |name: &str| users[name].1;

    // The owner creates the group with the CLI, naming members by username.
    let out = cli(
        &cluster,
        1,
        "owner",
        &[
            "--json",
            "group",
            "create",
            "team",
            "--members",
            "bob,carol",
        ],
        None,
    )?;
    let created = json_lines(&out)?;
    let group = created
        .first()
        .and_then(|v| v["group_id"].as_u64())
        .ok_or_else(|| anyhow!("group create printed no group_id: {out}"))?;
    let out = cli(
        &cluster,
        2,
        "bob",
        &["--json", "group", "members", &group.to_string()],
        None,
    )?;
    let listed: BTreeSet<u64> = json_lines(&out)?
        .iter()
        .flat_map(|v| {
            v["members"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(|m| m["user_id"].as_u64())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_else(|| v["user_id"].as_u64().into_iter().collect())
        })
        .collect();
    ensure!(
        listed == BTreeSet::from([id("owner"), id("bob"), id("carol")]),
        "members as the CLI lists them: {out}"
    );
    cli(
        &cluster,
        3,
        "carol",
        &["group", "send", &group.to_string(), "first"],
        None,
    )?;

    rt.block_on(async {
        let (owner, _) = &users["owner"];
        let (dave, _) = &users["dave"];
        // A non-member neither sends nor lists.
        ensure!(
            code(
                dave.send_group(group, "d1", b"let me in".to_vec(), "text/plain")
                    .await
            )? == ErrorCode::PermissionDenied
        );
        ensure!(code(dave.group_members(group).await)? == ErrorCode::PermissionDenied);
        ensure!(
            code(
                dave.send_group(group + u64::from(SHARDS) * 1000, "d2", Vec::new(), "")
                    .await
            )? == ErrorCode::UnknownGroup
        );
        // Only the owner or an admin changes membership.
        ensure!(
            code(
                users["bob"]
                    .0
                    .add_group_member(group, id("dave"), GroupRole::Member)
                    .await
            )? == ErrorCode::PermissionDenied
        );
        // carol is removed; what follows does not reach her.
        let removed = owner.remove_group_member(group, id("carol")).await?;
        ensure!(removed.changed);
        owner
            .send_group(group, "o1", b"after carol left".to_vec(), "text/plain")
            .await?;
        ensure!(
            code(
                users["carol"]
                    .0
                    .send_group(group, "c2", b"still here?".to_vec(), "")
                    .await
            )? == ErrorCode::PermissionDenied
        );
        // dave joins; he gets nothing from before.
        ensure!(
            owner
                .add_group_member(group, id("dave"), GroupRole::Admin)
                .await?
                .changed
        );
        ensure!(
            !owner
                .add_group_member(group, id("dave"), GroupRole::Admin)
                .await?
                .changed
        );
        owner
            .send_group(group, "o2", b"welcome dave".to_vec(), "text/plain")
            .await?;
        // dave, an admin, adds erin: 4 members, the limit.
        users["dave"]
            .0
            .add_group_member(group, id("erin"), GroupRole::Member)
            .await?;
        ensure!(
            code(
                owner
                    .add_group_member(group, id("frank"), GroupRole::Member)
                    .await
            )? == ErrorCode::GroupFull
        );
        let patience = Duration::from_secs(20);
        let erin = &users["erin"].0;
        entries_when(erin, group, patience, |e| !e.is_empty()).await?;
        let listed = erin.list_groups().await?;
        ensure!(listed
            .groups
            .iter()
            .any(|g| g.group_id == group && g.name == "team"));

        let removed_kind = Kind::MemberRemoved as i32;
        let carol = entries_when(&users["carol"].0, group, patience, |e| {
            e.iter().any(|e| {
                e.group_event
                    .as_ref()
                    .is_some_and(|e| e.kind == removed_kind)
            })
        })
        .await?;
        let last = carol.last().and_then(|e| e.group_event.clone());
        ensure!(
            last.as_ref().map(|e| (e.kind, e.user_id))
                == Some((Kind::MemberRemoved as i32, id("carol"))),
            "carol's last entry of the group is her removal: {carol:?}"
        );
        ensure!(
            messages(&carol) == ["first"],
            "carol got nothing after removal"
        );
        ensure!(users["carol"].0.list_groups().await?.groups.is_empty());

        // Frank (in no group so far) creates five; ListGroups pages them
        // in group id order, and the SDK's list_groups reads every page.
        let frank = &users["frank"].0;
        let mut created = Vec::new();
        for i in 0..5 {
            created.push(frank.create_group(&format!("own-{i}"), &[]).await?.group_id);
        }
        created.sort_unstable();
        let mut paged = Vec::new();
        let mut after = 0;
        for (expected_len, expected_more) in [(2, true), (2, true), (1, false)] {
            let page = frank.list_groups_page(after, 2).await?;
            ensure!(
                page.groups.len() == expected_len && page.more == expected_more,
                "a page of {expected_len}, more = {expected_more}: {page:?}"
            );
            paged.extend(page.groups.iter().map(|g| g.group_id));
            after = page.groups.last().map_or(after, |g| g.group_id);
        }
        ensure!(
            paged == created,
            "pages in id order: {paged:?} vs {created:?}"
        );
        let all: Vec<u64> = frank
            .list_groups()
            .await?
            .groups
            .iter()
            .map(|g| g.group_id)
            .collect();
        ensure!(all == created, "every group listed: {all:?}");

        let dave_entries = entries_when(dave, group, patience, |e| !messages(e).is_empty()).await?;
        let first = dave_entries.first().and_then(|e| e.group_event.clone());
        ensure!(
            first.map(|e| (e.kind, e.user_id)) == Some((Kind::MemberAdded as i32, id("dave"))),
            "dave's first entry of the group is his joining: {dave_entries:?}"
        );
        ensure!(
            messages(&dave_entries) == ["welcome dave"],
            "dave got nothing from before"
        );

        // Dissolved: sends are refused, and every member is told.
        ensure!(code(dave.dissolve_group(group).await)? == ErrorCode::PermissionDenied);
        ensure!(owner.dissolve_group(group).await?.changed);
        ensure!(
            code(
                users["bob"]
                    .0
                    .send_group(group, "b9", b"anyone?".to_vec(), "")
                    .await
            )? == ErrorCode::GroupDissolved
        );
        entries_when(&users["bob"].0, group, patience, |bob| {
            bob.last()
                .and_then(|e| e.group_event.as_ref())
                .is_some_and(|e| e.kind == Kind::Dissolved as i32)
        })
        .await
        .context("bob is told of the dissolution")?;
        anyhow::Ok(())
    })?;

    // The CLI shows the group's entries with its name.
    let out = cli(&cluster, 1, "bob", &["sync", "--since", "0"], None)?;
    ensure!(
        out.contains("#team") && out.contains("welcome dave"),
        "bob's sync: {out}"
    );
    Ok(())
}
