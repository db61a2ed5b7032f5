//! The SDK against fake nodes (tests/support): real QUIC, TLS and framing,
//! in-memory chat logic, faults on demand.

mod support;

use std::time::Duration;

use fishchat_client::proto::{kick, request, ErrorCode, InboxEntry, LookupRequest, Request};
use fishchat_client::{Client, ClientError, Connection, TEXT_PLAIN};
use support::{logged_in, unavailable, FakeCluster, Fault, OTHER_CA_PEM};
use tokio::sync::mpsc;

#[tokio::test]
async fn a_sent_message_reaches_the_recipients_inbox_and_a_repeat_is_a_duplicate() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;

    let bob_id = alice.lookup("BOB").await.expect("lookup").user_id;
    assert_eq!(Some(bob_id), bob.user_id());
    let first = alice
        .send(bob_id, "m-1", b"hello".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");
    assert!(!first.duplicate);
    let again = alice
        .send(bob_id, "m-1", b"hello".to_vec(), TEXT_PLAIN)
        .await
        .expect("send again");
    assert!(again.duplicate);
    assert_eq!(again.message_id, first.message_id);

    let inbox = bob.sync_all(0).await.expect("sync");
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].body, b"hello");
    assert_eq!(inbox[0].sender_id, alice.user_id().expect("alice id"));
    assert_eq!(bob.latest_version().await.expect("latest"), 1);
    assert_eq!(alice.ping(42).await.expect("ping").nonce, 42);
}

#[tokio::test]
async fn sync_all_follows_more_across_pages() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let me = alice.user_id().expect("id");
    for i in 0..8 {
        alice
            .send(me, &format!("self-{i}"), vec![i], TEXT_PLAIN)
            .await
            .expect("send");
    }
    let page = alice.sync(0, 0).await.expect("page");
    assert!(page.more, "the fake server pages by 3");
    let all = alice.sync_all(2).await.expect("sync all");
    let versions: Vec<u64> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, (3..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_server_signed_by_another_ca_is_refused() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let mut config = cluster.config(&[&node]);
    config.ca_pem = OTHER_CA_PEM.to_vec();
    let refused = Client::connect(config).await;
    assert!(
        matches!(refused, Err(ClientError::Connect(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn request_once_sends_the_token_as_given_and_reports_the_code() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let client = logged_in(cluster.config(&[&node]), "alice").await;
    let refused = client
        .request_once(Request {
            request_id: 0,
            token: "not-a-token".into(),
            body: Some(request::Body::Lookup(LookupRequest {
                username: "alice".into(),
            })),
        })
        .await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::Unauthenticated)
    );
    let seen = cluster.seen();
    let (_, last) = seen.last().expect("a request");
    assert_eq!(last.token, "not-a-token");
    assert_ne!(last.request_id, 0, "a request id of 0 is replaced");
}

#[tokio::test]
async fn raw_bytes_get_the_servers_typed_answers() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let connection = Connection::connect(&cluster.config(&[&node]), &node.address())
        .await
        .expect("connect");

    let garbage = connection
        .raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("answer");
    assert_eq!(garbage.request_id, 0);
    let code = ClientError::from_wire(match garbage.body {
        Some(fishchat_client::proto::response::Body::Error(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    })
    .code();
    assert_eq!(code, Some(ErrorCode::MalformedFrame));

    let mut huge = (2u32 << 20).to_be_bytes().to_vec();
    huge.extend(vec![0u8; 2 << 20]);
    let too_large = connection.raw(&huge).await.expect("answer");
    match too_large.body {
        Some(fishchat_client::proto::response::Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::FrameTooLarge as i32)
        }
        other => panic!("expected FRAME_TOO_LARGE, got {other:?}"),
    }
}

#[tokio::test]
async fn a_retryable_error_repeats_the_same_send() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let me = alice.user_id().expect("id");
    cluster.inject([unavailable()]);
    let sent = alice
        .send(me, "retry-me", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("send after a retry");
    assert!(!sent.duplicate);
    assert_eq!(cluster.sends_seen(), vec!["retry-me", "retry-me"]);
}

#[tokio::test]
async fn a_non_retryable_error_is_returned_at_once() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let refused = alice.send(999, "to-nobody", vec![], TEXT_PLAIN).await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::UnknownUser)
    );
    assert_eq!(cluster.sends_seen().len(), 1);
}

#[tokio::test]
async fn an_unanswered_send_is_repeated_with_the_same_id_after_the_timeout() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let me = alice.user_id().expect("id");
    cluster.inject([Fault::Silence]);
    let sent = alice
        .send(me, "slow", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("send after a timeout");
    assert!(!sent.duplicate, "the first attempt stored nothing");
    assert_eq!(cluster.sends_seen(), vec!["slow", "slow"]);
}

#[tokio::test]
async fn a_node_that_answers_nothing_is_left_when_its_pings_go_unanswered() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    let mut config = cluster.config(&[&first, &second]);
    // Far longer than the probes take: leaving must not wait for it.
    config.request_timeout = Duration::from_secs(20);
    let alice = logged_in(config, "alice").await;
    let me = alice.user_id().expect("id");

    cluster.freeze(&first);
    let started = std::time::Instant::now();
    let sent = alice
        .send(me, "to-a-frozen-node", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("send after failover");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "failed over after unanswered pings, not the 20 s request timeout (took {took:?})"
    );
    assert_eq!(alice.connected_to(), second.address());
    assert_eq!(sent.version, 1);
    let pinged = cluster
        .seen()
        .iter()
        .any(|(node, r)| *node == first.addr() && matches!(r.body, Some(request::Body::Ping(_))));
    assert!(
        pinged,
        "the client pinged the silent node before leaving it"
    );
}

#[tokio::test]
async fn a_slow_node_that_answers_pings_is_waited_for() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    let mut config = cluster.config(&[&first, &second]);
    config.request_timeout = Duration::from_secs(2);
    let alice = logged_in(config, "alice").await;
    let me = alice.user_id().expect("id");

    // The send is never answered, but the node answers its pings.
    cluster.inject([Fault::Silence]);
    let started = std::time::Instant::now();
    alice
        .send(me, "slow-answer", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("send after the timeout");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "a node that answers pings keeps the request until its timeout"
    );
    let pings = cluster
        .seen()
        .iter()
        .filter(|(node, r)| *node == first.addr() && matches!(r.body, Some(request::Body::Ping(_))))
        .count();
    assert!(
        pings >= 2,
        "the slow answer was watched with pings ({pings})"
    );
}

#[tokio::test]
async fn losing_the_node_fails_over_to_the_next_and_resumes_the_session_there() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&first, &second]), "alice").await;
    assert_eq!(alice.connected_to(), first.address());
    let me = alice.user_id().expect("id");
    let token = alice.token();

    first.kill();
    let sent = alice
        .send(me, "after-crash", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("send after failover");
    assert_eq!(sent.version, 1);
    assert_eq!(alice.connected_to(), second.address());
    let on_second = |pick: fn(&request::Body) -> bool| {
        cluster
            .seen()
            .iter()
            .any(|(node, r)| *node == second.addr() && r.body.as_ref().is_some_and(pick))
    };
    assert!(
        on_second(|b| matches!(b, request::Body::Resume(_))),
        "the client resumes its session on the new node"
    );
    assert!(
        !on_second(|b| matches!(b, request::Body::Login(_))),
        "no password login while the token is good"
    );
    assert_eq!(alice.token(), token, "the same session goes on");
}

#[tokio::test]
async fn a_failover_whose_session_is_over_logs_in_again_with_the_password() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    let alice = logged_in(cluster.config(&[&first, &second]), "alice").await;
    let me = alice.user_id().expect("id");
    let token = alice.token().expect("a token");

    cluster.revoke(&token);
    first.kill();
    alice
        .send(me, "after-revoke", b"x".to_vec(), TEXT_PLAIN)
        .await
        .expect("send after failover and login");
    let logged_in_again = cluster
        .seen()
        .iter()
        .any(|(node, r)| *node == second.addr() && matches!(r.body, Some(request::Body::Login(_))));
    assert!(logged_in_again, "a refused resume falls back to a login");
    assert_ne!(alice.token(), Some(token), "a new session");
}

#[tokio::test]
async fn failover_uses_the_addresses_learned_at_login() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    cluster.set_client_addrs(vec![first.address(), second.address()]);
    let alice = logged_in(cluster.config(&[&first]), "alice").await;
    first.kill();
    alice.ping(7).await.expect("ping after failover");
    assert_eq!(alice.connected_to(), second.address());
}

#[tokio::test]
async fn no_reachable_server_is_a_connect_error() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    node.kill();
    let mut config = cluster.config(&[&node]);
    config.connect_timeout = Duration::from_millis(300);
    let refused = Client::connect(config).await;
    assert!(
        matches!(refused, Err(ClientError::Connect(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn incoming_delivers_every_entry_once_in_order_across_a_failover() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    let config = cluster.config(&[&first, &second]);
    let bob = logged_in(config.clone(), "bob").await;
    let alice = logged_in(cluster.config(&[&second]), "alice").await;
    let bob_id = bob.user_id().expect("id");

    alice
        .send(bob_id, "before", b"0".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");
    let mut incoming = bob.incoming(0);
    for i in 1..=4u8 {
        alice
            .send(bob_id, &format!("m{i}"), vec![i], TEXT_PLAIN)
            .await
            .expect("send");
    }
    first.kill();
    for i in 5..=7u8 {
        alice
            .send(bob_id, &format!("m{i}"), vec![i], TEXT_PLAIN)
            .await
            .expect("send");
    }
    let mut versions = Vec::new();
    while versions.len() < 8 {
        let entry = tokio::time::timeout(Duration::from_secs(10), incoming.recv())
            .await
            .expect("an entry in time")
            .expect("the task runs");
        versions.push(entry.version);
    }
    assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    // Nothing more, however long we wait for a duplicate.
    let extra = tokio::time::timeout(Duration::from_millis(800), incoming.recv()).await;
    assert!(extra.is_err(), "no entry is delivered twice: {extra:?}");
    assert_eq!(bob.connected_to(), second.address());
}

/// The Syncs `cluster` has received so far.
fn syncs_seen(cluster: &FakeCluster) -> usize {
    cluster
        .requests(|body| matches!(body, request::Body::Sync(_)).then_some(()))
        .len()
}

/// Waits until `cluster` has received `count` Syncs.
async fn wait_for_syncs(cluster: &FakeCluster, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while syncs_seen(cluster) < count {
        assert!(tokio::time::Instant::now() < deadline, "no sync came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Receives `count` entries from `incoming` and returns their versions and
/// bodies.
async fn receive(incoming: &mut mpsc::Receiver<InboxEntry>, count: usize) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    while got.len() < count {
        let entry = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
            .await
            .expect("an entry in time")
            .expect("the task runs");
        got.push((entry.version, entry.body));
    }
    got
}

/// A fake cluster whose notifies carry entries, Alice logged in, and Bob
/// watching his inbox (its starting sync done; no timer sync for minutes).
async fn pushing_cluster_watched_by_bob() -> (FakeCluster, Client, u64, mpsc::Receiver<InboxEntry>)
{
    let cluster = FakeCluster::new();
    cluster.push_entries();
    let node = cluster.start_node().await;
    let mut config = cluster.config(&[&node]);
    config.sync_interval = Duration::from_secs(600);
    let bob = logged_in(config, "bob").await;
    let alice = logged_in(cluster.config(&[&node]), "alice").await;
    let bob_id = bob.user_id().expect("id");
    let incoming = bob.incoming(0);
    wait_for_syncs(&cluster, 1).await;
    (cluster, alice, bob_id, incoming)
}

#[tokio::test]
async fn incoming_takes_entries_a_notify_carries_without_syncing() {
    let (cluster, alice, bob_id, mut incoming) = pushing_cluster_watched_by_bob().await;
    for i in 1..=5u8 {
        alice
            .send(bob_id, &format!("m{i}"), vec![i], TEXT_PLAIN)
            .await
            .expect("send");
    }
    let got = receive(&mut incoming, 5).await;
    assert_eq!(
        got,
        (1..=5u8)
            .map(|i| (u64::from(i), vec![i]))
            .collect::<Vec<_>>()
    );
    assert_eq!(syncs_seen(&cluster), 1, "only the starting sync was needed");
}

#[tokio::test]
async fn a_notify_whose_entries_do_not_follow_what_is_held_is_only_a_hint() {
    let (cluster, alice, bob_id, mut incoming) = pushing_cluster_watched_by_bob().await;
    cluster.lose_notifies(1);
    for i in 1..=2u8 {
        alice
            .send(bob_id, &format!("m{i}"), vec![i], TEXT_PLAIN)
            .await
            .expect("send");
    }
    // Version 1's notify was lost; version 2's carries only version 2.
    let got = receive(&mut incoming, 2).await;
    assert_eq!(got, vec![(1, vec![1]), (2, vec![2])]);
    assert_eq!(syncs_seen(&cluster), 2, "the hole was filled by a sync");
    let extra = tokio::time::timeout(Duration::from_millis(300), incoming.recv()).await;
    assert!(extra.is_err(), "no entry is delivered twice: {extra:?}");
}

#[tokio::test]
async fn a_replaced_session_ends_incoming_and_is_not_reopened() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let bob = logged_in(cluster.config(&[&node]), "bob").await;
    let mut incoming = bob.incoming(0);
    // Let the task pick up the push stream first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kick(bob.user_id().expect("id"), kick::Reason::SessionReplaced);
    let end = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
        .await
        .expect("the task ends in time");
    assert!(end.is_none());
    let kick = bob.kick().expect("the kick is kept");
    assert_eq!(kick.reason, kick::Reason::SessionReplaced as i32);
}

#[tokio::test]
async fn a_closed_client_stays_closed_its_watcher_ends_and_nothing_reconnects() {
    let cluster = FakeCluster::new();
    let first = cluster.start_node().await;
    let second = cluster.start_node().await;
    let bob = logged_in(cluster.config(&[&first, &second]), "bob").await;
    let mut incoming = bob.incoming(0);
    // Let the task pick up the push stream first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen_before = cluster.seen().len();

    bob.close();
    assert!(bob.is_closed());
    let end = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
        .await
        .expect("the watcher ends in time");
    assert!(end.is_none(), "the watcher ends instead of failing over");
    let me = bob.user_id().expect("id");
    let refused = bob.send(me, "after-close", b"x".to_vec(), TEXT_PLAIN).await;
    assert!(
        matches!(refused, Err(ClientError::Closed)),
        "a request after close fails at once: {refused:?}"
    );
    assert!(!ClientError::Closed.is_retryable());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        cluster.seen().len(),
        seen_before,
        "no node heard anything after the close (no resume, no login, no sync)"
    );
}

#[tokio::test]
async fn operations_needing_a_token_say_so_before_login() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let client = Client::connect(cluster.config(&[&node]))
        .await
        .expect("connect");
    assert!(matches!(
        client.sync(0, 0).await,
        Err(ClientError::Config(_))
    ));
}

#[tokio::test]
async fn when_every_node_is_gone_a_call_ends_unreachable_at_the_deadline() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let mut config = cluster.config(&[&node]);
    config.connect_timeout = Duration::from_millis(200);
    config.retry_deadline = Duration::from_secs(2);
    let alice = logged_in(config, "alice").await;
    node.kill();
    let started = std::time::Instant::now();
    let outcome = alice.ping(1).await;
    assert!(
        matches!(outcome, Err(ClientError::Connect(_))),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}
