//! The SDK's group operations against fake nodes (tests/support): each
//! sends its own request through the retry loop, repeats it unchanged
//! (request key, client message id) on a retry, and returns its answer;
//! group entries arrive in the inbox like any other.

mod support;

use std::time::Duration;

use fishchat_client::proto::{group_event, request, ErrorCode, GroupRole};
use fishchat_client::{Client, ClientError, TEXT_PLAIN};
use support::{logged_in, unavailable, FakeCluster, Fault};

fn id(client: &Client) -> u64 {
    client.user_id().expect("logged in")
}

#[tokio::test]
async fn create_group_retried_after_a_retryable_error_repeats_the_same_request_key() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;

    cluster.inject([unavailable(), unavailable()]);
    let created = alice
        .create_group("team", &[id(&bob)])
        .await
        .expect("created after two retries");
    assert!(!created.duplicate, "the refused attempts made nothing");

    let creations = cluster.requests(|body| match body {
        request::Body::CreateGroup(c) => Some(c),
        _ => None,
    });
    assert_eq!(creations.len(), 3);
    assert!(!creations[0].request_key.is_empty());
    assert!(creations[0].request_key.len() <= 128);
    assert!(
        creations.iter().all(|c| c == &creations[0]),
        "every attempt is the same request: {creations:?}"
    );
    assert_eq!(creations[0].name, "team");
    assert_eq!(creations[0].member_ids, vec![id(&bob)]);

    let another = alice.create_group("team", &[]).await.expect("second group");
    assert_ne!(another.group_id, created.group_id);
    let keys = cluster.requests(|body| match body {
        request::Body::CreateGroup(c) => Some(c.request_key),
        _ => None,
    });
    assert_ne!(keys[3], keys[0], "each call draws a key of its own");
}

#[tokio::test]
async fn a_create_group_whose_answer_was_lost_makes_one_group() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;

    cluster.inject([Fault::AnswerLost]);
    let created = alice
        .create_group("team", &[])
        .await
        .expect("created after the timeout");
    assert!(created.duplicate, "the retry met the first creation");
    let listed = alice.list_groups().await.expect("list");
    assert_eq!(listed.groups.len(), 1);
    assert_eq!(listed.groups[0].group_id, created.group_id);
    assert_eq!(listed.groups[0].name, "team");
}

#[tokio::test]
async fn list_groups_reads_every_page() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let mut created = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        created.push(
            alice
                .create_group(name, &[])
                .await
                .expect("created")
                .group_id,
        );
    }
    // The fake answers pages of two: the first says more follow.
    let first = alice.list_groups_page(0, 0).await.expect("a page");
    assert_eq!(first.groups.len(), 2);
    assert!(first.more);
    let listed: Vec<u64> = alice
        .list_groups()
        .await
        .expect("list")
        .groups
        .iter()
        .map(|g| g.group_id)
        .collect();
    assert_eq!(listed, created, "all five, in id order, from three pages");
}

#[tokio::test]
async fn send_group_sends_the_expected_request_and_returns_the_response() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;
    let group = alice
        .create_group("team", &[id(&bob)])
        .await
        .expect("create")
        .group_id;

    let sent = alice
        .send_group(group, "g-1", b"hello team".to_vec(), TEXT_PLAIN)
        .await
        .expect("send to the group");
    assert!(!sent.duplicate);
    assert_eq!(sent.group_seq, 2, "after the creation event");
    assert_ne!(sent.message_id, 0);

    let sends = cluster.requests(|body| match body {
        request::Body::GroupSend(s) => Some(s),
        _ => None,
    });
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0].group_id, group);
    assert_eq!(sends[0].client_msg_id, "g-1");
    assert_eq!(sends[0].body, b"hello team");
    assert_eq!(sends[0].content_type, TEXT_PLAIN);

    let again = alice
        .send_group(group, "g-1", b"hello team".to_vec(), TEXT_PLAIN)
        .await
        .expect("send again");
    assert!(again.duplicate);
    assert_eq!(again.message_id, sent.message_id);
    assert_eq!(again.group_seq, sent.group_seq);

    let inbox = bob.sync_all(0).await.expect("sync");
    assert_eq!(inbox.len(), 2, "the creation and one message: {inbox:?}");
    let created = inbox[0].group_event.as_ref().expect("an event first");
    assert_eq!(created.kind, group_event::Kind::Created as i32);
    assert_eq!(created.group_name, "team");
    assert_eq!(inbox[1].group_id, group);
    assert_eq!(inbox[1].group_seq, sent.group_seq);
    assert_eq!(inbox[1].message_id, sent.message_id);
    assert_eq!(inbox[1].sender_id, id(&alice));
    assert_eq!(inbox[1].body, b"hello team");
    assert!(inbox[1].group_event.is_none());
}

#[tokio::test]
async fn a_group_send_retried_after_a_timeout_keeps_its_client_msg_id() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let group = alice
        .create_group("solo", &[])
        .await
        .expect("create")
        .group_id;
    cluster.inject([Fault::AnswerLost]);
    let sent = alice
        .send_group(group, "slow", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("sent after the timeout");
    assert!(sent.duplicate, "the first attempt was stored, once");
    let ids = cluster.requests(|body| match body {
        request::Body::GroupSend(s) => Some(s.client_msg_id),
        _ => None,
    });
    assert_eq!(ids, vec!["slow", "slow"]);
    let messages = alice.sync_all(0).await.expect("sync");
    assert_eq!(messages.iter().filter(|e| e.body == b"x").count(), 1);
}

#[tokio::test]
async fn membership_changes_and_listings_return_their_own_answers() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;
    let carol = logged_in(cluster.config(&[&node]), "carol").await;
    let group = alice
        .create_group("team", &[id(&bob)])
        .await
        .expect("create")
        .group_id;

    let added = alice
        .add_group_member(group, id(&carol), GroupRole::Admin)
        .await
        .expect("add");
    assert!(added.changed);
    assert_eq!(added.group_seq, 2);
    let again = alice
        .add_group_member(group, id(&carol), GroupRole::Admin)
        .await
        .expect("add again");
    assert!(!again.changed);

    let members = bob.group_members(group).await.expect("members");
    assert_eq!(members.name, "team");
    assert_eq!(members.owner_id, id(&alice));
    assert_eq!(members.latest_seq, 2);
    let roles: Vec<(String, i32)> = members
        .members
        .iter()
        .map(|m| (m.username.clone(), m.role))
        .collect();
    assert_eq!(
        roles,
        vec![
            ("alice".to_string(), GroupRole::Owner as i32),
            ("bob".to_string(), GroupRole::Member as i32),
            ("carol".to_string(), GroupRole::Admin as i32),
        ]
    );

    let removed = carol
        .remove_group_member(group, id(&bob))
        .await
        .expect("an admin removes a member");
    assert_eq!((removed.changed, removed.group_seq), (true, 3));
    let left = carol.leave_group(group).await.expect("leave");
    assert_eq!((left.changed, left.group_seq), (true, 4));
    assert!(carol.list_groups().await.expect("list").groups.is_empty());
    assert_eq!(alice.list_groups().await.expect("list").groups.len(), 1);
    let dissolved = alice.dissolve_group(group).await.expect("dissolve");
    assert_eq!((dissolved.changed, dissolved.group_seq), (true, 5));
    assert!(!alice.dissolve_group(group).await.expect("again").changed);

    let kinds: Vec<i32> = bob
        .sync_all(0)
        .await
        .expect("sync")
        .iter()
        .filter_map(|e| e.group_event.as_ref().map(|g| g.kind))
        .collect();
    use group_event::Kind;
    assert_eq!(
        kinds,
        vec![
            Kind::Created as i32,
            Kind::MemberAdded as i32,
            Kind::MemberRemoved as i32
        ],
        "bob holds the group's entries up to his removal"
    );
}

#[tokio::test]
async fn the_group_error_codes_are_returned_at_once() {
    fn code<T>(outcome: Result<T, ClientError>) -> Option<ErrorCode> {
        outcome.err().and_then(|e| e.code())
    }
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;
    let carol = logged_in(cluster.config(&[&node]), "carol").await;

    assert_eq!(
        code(alice.send_group(77, "to-nowhere", vec![], TEXT_PLAIN).await),
        Some(ErrorCode::UnknownGroup)
    );

    cluster.set_max_group_size(2);
    assert_eq!(
        code(alice.create_group("crowd", &[id(&bob), id(&carol)]).await),
        Some(ErrorCode::GroupFull)
    );
    let pair = alice
        .create_group("pair", &[id(&bob)])
        .await
        .expect("create")
        .group_id;
    assert_eq!(
        code(
            alice
                .add_group_member(pair, id(&carol), GroupRole::Member)
                .await
        ),
        Some(ErrorCode::GroupFull)
    );

    alice.dissolve_group(pair).await.expect("dissolve");
    assert_eq!(
        code(bob.send_group(pair, "late", vec![], TEXT_PLAIN).await),
        Some(ErrorCode::GroupDissolved)
    );

    let attempts = cluster
        .requests(|body| match body {
            request::Body::GroupSend(_)
            | request::Body::CreateGroup(_)
            | request::Body::AddGroupMember(_) => Some(()),
            _ => None,
        })
        .len();
    assert_eq!(attempts, 5, "each refused request was sent once");
}

#[tokio::test]
async fn incoming_delivers_group_entries_like_any_other() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;
    let mut incoming = bob.incoming(0);
    let group = alice
        .create_group("team", &[id(&bob)])
        .await
        .expect("create")
        .group_id;
    alice
        .send_group(group, "g", b"hi".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let entry = tokio::time::timeout(Duration::from_secs(10), incoming.recv())
            .await
            .expect("an entry in time")
            .expect("the task runs");
        assert_eq!(entry.group_id, group);
        seqs.push(entry.group_seq);
    }
    assert_eq!(seqs, vec![1, 2]);
}
