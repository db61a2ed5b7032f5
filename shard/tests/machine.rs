//! The chat state machine on its own: every command applied to an in-memory
//! key-value state, with no Raft, RocksDB or network.

use fishchat_shard::{
    revoked_key, Command, CommandError, DeliveryBatch, OutboxRef, Outgoing, Reply, UserId,
};

mod common;

use common::{map, name_in_shard, register, Shard, ShardView};

fn send(sender: UserId, client_msg_id: &str, recipient: UserId, body: &str) -> Command {
    Command::Send {
        sender,
        client_msg_id: client_msg_id.into(),
        recipient,
        body: body.as_bytes().to_vec(),
        content_type: "text/plain".into(),
        now_ms: 2_000,
    }
}

#[test]
fn registering_assigns_an_id_the_shard_owns_and_refuses_a_taken_name_in_any_case() {
    let mut shard = Shard::new(2);
    let name = name_in_shard(2, "alice");
    let Reply::Registered { user_id } = shard.apply(&register(&name)) else {
        panic!("first registration succeeds");
    };
    assert_eq!(map().shard_of_user(user_id), 2);

    let before = shard.state.clone();
    assert_eq!(
        shard.apply(&register(&name)),
        Reply::Registered { user_id },
        "a retried registration (same salted hash) gets the first answer"
    );
    let mut other_password = register(&name.to_uppercase());
    if let Command::Register { password_hash, .. } = &mut other_password {
        *password_hash = "$argon2id$v=19$m=19456,t=2,p=1$b3RoZXI$b3RoZXI".into();
    }
    assert_eq!(
        shard.apply(&other_password),
        Reply::Refused(CommandError::UsernameTaken)
    );
    assert_eq!(
        shard.state, before,
        "a refused registration changes nothing"
    );

    let second = shard.register("bob");
    assert_ne!(second, user_id, "ids are never reused");
}

#[test]
fn sends_get_gap_free_versions_in_commit_order() {
    let mut shard = Shard::new(1);
    let alice = shard.register("alice");
    let bob = shard.register("bob");
    for i in 0..500 {
        match shard.apply(&send(alice, &format!("m{i}"), bob, &format!("hello {i}"))) {
            Reply::Sent {
                version, duplicate, ..
            } => {
                assert_eq!(version, i + 1);
                assert!(!duplicate);
            }
            other => panic!("send {i}: {other:?}"),
        }
    }
    let inbox = shard.state.inbox(bob, 0);
    assert_eq!(inbox.len(), 500);
    for (i, entry) in inbox.iter().enumerate() {
        assert_eq!(entry.version, i as u64 + 1);
        assert_eq!(entry.body, format!("hello {i}").into_bytes());
        assert_eq!((entry.from, entry.to), (alice, bob));
    }
    assert_eq!(shard.state.latest(bob), 500);
    assert_eq!(
        shard.state.inbox(bob, 498).len(),
        2,
        "sync since 498 returns 499 and 500"
    );
    // Alice lives in the same shard: her copies are in her inbox, in order.
    let sent = shard.state.inbox(alice, 0);
    assert_eq!(sent.len(), 500);
    assert!(sent
        .iter()
        .zip(&inbox)
        .all(|(copy, original)| copy.message_id == original.message_id));
}

#[test]
fn a_retried_send_returns_the_first_result_and_stores_nothing_new() {
    let mut shard = Shard::new(0);
    let alice = shard.register("alice");
    let bob = shard.register("bob");
    let first = shard.apply(&send(alice, "same-id", bob, "once"));
    let state_after_first = shard.state.clone();
    let retry = shard.apply(&send(alice, "same-id", bob, "once"));
    match (first, retry) {
        (
            Reply::Sent {
                message_id,
                version,
                timestamp_ms,
                duplicate: false,
                ..
            },
            Reply::Sent {
                message_id: m2,
                version: v2,
                timestamp_ms: t2,
                duplicate: true,
                ..
            },
        ) => assert_eq!((message_id, version, timestamp_ms), (m2, v2, t2)),
        other => panic!("expected a send and its duplicate, got {other:?}"),
    }
    assert_eq!(shard.state, state_after_first, "the retry wrote nothing");
    assert_eq!(shard.state.inbox(bob, 0).len(), 1);
}

#[test]
fn a_sender_in_another_shard_gets_its_copy_through_the_outbox_exactly_once() {
    let mut bobs = Shard::new(1);
    let mut alices = Shard::new(3);
    let bob = bobs.register("bob");
    let alice = alices.register("alice");

    let Reply::Sent {
        message_id, copy, ..
    } = bobs.apply(&send(alice, "c1", bob, "hi bob"))
    else {
        panic!("send succeeds");
    };
    assert!(
        bobs.state.inbox(alice, 0).is_empty(),
        "alice's inbox is not in bob's shard"
    );
    let outbox = bobs.state.outbox();
    assert_eq!(outbox.len(), 1);
    let delivery = outbox[0].clone();
    assert_eq!(delivery.owners, vec![alice]);
    let item = OutboxRef {
        target: 3,
        item: delivery.item,
    };
    assert_eq!(
        copy,
        Some(Outgoing {
            to: item,
            delivery: Some(delivery.clone())
        }),
        "the reply carries the copy for the proposer to deliver"
    );
    let Reply::Sent {
        copy: retried_copy,
        duplicate: true,
        ..
    } = bobs.apply(&send(alice, "c1", bob, "hi bob"))
    else {
        panic!("a retry is answered as a duplicate");
    };
    assert_eq!(
        retried_copy,
        Some(Outgoing {
            to: item,
            delivery: None
        }),
        "a retry names the copy too"
    );

    // Delivered twice (a retry after a lost acknowledgement): one copy.
    let batch = DeliveryBatch {
        source: 1,
        items: vec![delivery.clone()],
    };
    assert_eq!(
        alices.apply(&Command::Deliver(batch.clone())),
        Reply::Delivered {
            through: 1,
            appended: vec![(alice, 1)]
        }
    );
    assert_eq!(
        alices.apply(&Command::Deliver(batch)),
        Reply::Delivered {
            through: 1,
            appended: vec![]
        },
        "a repeat appends nothing"
    );
    let copies = alices.state.inbox(alice, 0);
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].message_id, message_id);
    assert_eq!(copies[0].version, 1);
    assert_eq!((copies[0].from, copies[0].to), (alice, bob));

    assert_eq!(
        bobs.apply(&Command::OutboxDone { items: vec![item] }),
        Reply::Forgotten
    );
    assert!(
        bobs.state.outbox().is_empty(),
        "a delivered item leaves the outbox"
    );
}

#[test]
fn a_channel_applies_items_once_in_order_and_refuses_a_hole() {
    let mut bobs = Shard::new(1);
    let mut alices = Shard::new(3);
    let bob = bobs.register("bob");
    let alice = alices.register("alice");
    for i in 0..3 {
        bobs.apply(&send(alice, &format!("c{i}"), bob, &format!("m{i}")));
    }
    let items = bobs.state.outbox();
    assert_eq!(
        items.iter().map(|d| d.item).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    let before = alices.state.clone();
    assert_eq!(
        alices.apply(&Command::Deliver(DeliveryBatch {
            source: 1,
            items: items[1..].to_vec(),
        })),
        Reply::Refused(CommandError::OutOfOrder {
            source_shard: 1,
            expected: 1,
            got: 2
        })
    );
    assert!(matches!(
        alices.apply(&Command::Deliver(DeliveryBatch {
            source: 1,
            items: vec![items[0].clone(), items[2].clone()],
        })),
        Reply::Refused(CommandError::Malformed(_))
    ));
    assert_eq!(alices.state, before, "a refused batch changes nothing");
    // Overlapping batches, as two deliverers racing would send them.
    alices.apply(&Command::Deliver(DeliveryBatch {
        source: 1,
        items: items[..2].to_vec(),
    }));
    assert_eq!(
        alices.apply(&Command::Deliver(DeliveryBatch {
            source: 1,
            items: items.clone(),
        })),
        Reply::Delivered {
            through: 3,
            appended: vec![(alice, 3)]
        }
    );
    let bodies: Vec<_> = alices
        .state
        .inbox(alice, 0)
        .into_iter()
        .map(|e| String::from_utf8(e.body).expect("utf-8"))
        .collect();
    assert_eq!(bodies, ["m0", "m1", "m2"], "once each, in commit order");
}

#[test]
fn a_named_device_logging_in_again_revokes_its_earlier_session() {
    let mut shard = Shard::new(0);
    let alice = shard.register("alice");
    let open = |session: u64, device: &str| Command::OpenSession {
        user: alice,
        session,
        device: device.into(),
        expires_ms: 5_000,
        refreshes: 0,
    };
    assert_eq!(
        shard.apply(&open(11, "laptop")),
        Reply::SessionOpened { replaced: None }
    );
    assert_eq!(
        shard.apply(&open(11, "laptop")),
        Reply::SessionOpened { replaced: None },
        "a retried login replaces nothing"
    );
    assert_eq!(
        shard.apply(&open(12, "phone")),
        Reply::SessionOpened { replaced: None },
        "another device is another session"
    );
    assert!(!shard.state.0.contains_key(&revoked_key(alice, 11)));
    assert_eq!(
        shard.apply(&open(13, "laptop")),
        Reply::SessionOpened { replaced: Some(11) }
    );
    assert!(shard.state.0.contains_key(&revoked_key(alice, 11)));
    assert!(!shard.state.0.contains_key(&revoked_key(alice, 12)));
    assert_eq!(
        shard.apply(&open(13, "laptop")),
        Reply::SessionOpened { replaced: Some(11) },
        "a retried login gets the first answer, so its kick is not lost"
    );

    // A token refresh on the connection bound to session 13 keeps it valid.
    let refresh = Command::OpenSession {
        user: alice,
        session: 14,
        device: "laptop".into(),
        expires_ms: 9_000,
        refreshes: 13,
    };
    assert_eq!(
        shard.apply(&refresh),
        Reply::SessionOpened { replaced: None }
    );
    assert!(!shard.state.0.contains_key(&revoked_key(alice, 13)));

    let revoke = Command::Revoke {
        user: alice,
        session: 12,
        expires_ms: 5_000,
    };
    assert_eq!(shard.apply(&revoke), Reply::Revoked);
    assert_eq!(shard.apply(&revoke), Reply::Revoked, "idempotent");
    assert!(shard.state.0.contains_key(&revoked_key(alice, 12)));
}

#[test]
fn invalid_commands_are_refused_with_their_reason_and_change_nothing() {
    let mut shard = Shard::new(0);
    let alice = shard.register("alice");
    let elsewhere = map().id_in_shard(1, 1);
    let nobody = map().id_in_shard(0, 999);
    let cases: Vec<(Vec<u8>, CommandError)> = vec![
        (
            send(alice, "x", nobody, "hi").encode(),
            CommandError::UnknownUser(nobody),
        ),
        (
            send(alice, "", alice, "hi").encode(),
            CommandError::InvalidClientMessageId,
        ),
        (
            send(alice, &"x".repeat(129), alice, "hi").encode(),
            CommandError::InvalidClientMessageId,
        ),
        (
            register("no spaces allowed").encode(),
            CommandError::InvalidUsername,
        ),
        (register("").encode(), CommandError::InvalidUsername),
        (
            register(&"a".repeat(33)).encode(),
            CommandError::InvalidUsername,
        ),
    ];
    let before = shard.state.clone();
    for (bytes, expected) in cases {
        assert_eq!(shard.apply_bytes(&bytes), Reply::Refused(expected));
    }
    assert!(matches!(
        shard.apply(&send(alice, "x", elsewhere, "hi")),
        Reply::Refused(CommandError::WrongShard { shard: 0, .. })
    ));
    assert!(matches!(
        shard.apply(&register(&name_in_shard(1, "carol"))),
        Reply::Refused(CommandError::WrongShard { .. })
    ));
    assert!(matches!(
        shard.apply_bytes(b"\xc1 not a command"),
        Reply::Refused(CommandError::Malformed(_))
    ));
    assert_eq!(shard.state, before, "no refused command changed the state");
}
