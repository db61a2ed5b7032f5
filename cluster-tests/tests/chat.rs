//! Chat over QUIC on a real three-node cluster, driven as a user drives it:
//! with the `fishchat` command-line client and the client SDK.
//!
//! Each test starts its own cluster; they run one at a time (two clusters
//! at once overload a two-core machine into elections).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use fishchat_client::{Client, Connection, PushStream};
use fishchat_cluster_tests::{cli_binary, Cluster};
use fishchat_proto::client::{
    kick::Reason, push, request, response, ErrorCode, InboxEntry, LoginRequest, PingRequest,
    Request, SendRequest, SyncRequest,
};
use serde_json::Value;

mod common;

use common::{
    cli, config, field, gap_free_inbox, json_lines, one_cluster_at_a_time, register, runtime,
    send_many, started, To, PASSWORD, READY, SHARDS,
};

/// Registers the first of `names` whose shard differs from `other`'s, so the
/// sender's copy crosses shards (the outbox path).
fn register_in_another_shard(
    cluster: &Cluster,
    other: u64,
    names: &[&str],
) -> anyhow::Result<(String, u64)> {
    for name in names {
        let shard = fishchat_shard_of(cluster, name)?;
        if shard != other % u64::from(SHARDS) {
            return Ok((name.to_string(), register(cluster, 3, name)?));
        }
    }
    bail!("every candidate name shares a shard with user {other}")
}

/// The shard a name would be registered in: FNV-1a of the lowercased name,
/// as docs/decisions.md ("User ids encode their shard") describes.
fn fishchat_shard_of(_cluster: &Cluster, name: &str) -> anyhow::Result<u64> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.to_lowercase().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(hash % u64::from(SHARDS))
}

#[test]
fn five_hundred_messages_arrive_in_order_and_the_sender_sees_its_copies() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&[])?;
    let alice = register(&cluster, 1, "alice")?;
    let (bob_name, bob) = register_in_another_shard(&cluster, alice, &["bob", "bobby", "robert"])?;

    let bodies: Vec<String> = (1..=500)
        .map(|i| format!("message {i:03} to {bob_name}"))
        .collect();
    let sent = cli(
        &cluster,
        1,
        "alice",
        &["--json", "send", &bob_name],
        Some(&(bodies.join("\n") + "\n")),
    )?;
    ensure!(json_lines(&sent)?.len() == 500, "500 sends acknowledged");

    let synced = json_lines(&cli(
        &cluster,
        3,
        &bob_name,
        &["--json", "sync", "--since", "0"],
        None,
    )?)?;
    ensure!(
        synced.len() == 500,
        "bob holds {} entries, not 500",
        synced.len()
    );
    for (i, entry) in synced.iter().enumerate() {
        ensure!(
            field(entry, "version")? == i as u64 + 1,
            "versions 1..500 in order: {entry}"
        );
        ensure!(entry["body"] == bodies[i].as_str(), "body as sent: {entry}");
        ensure!(field(entry, "from")? == alice, "from alice: {entry}");
    }

    let own = json_lines(&cli(&cluster, 1, "alice", &["--json", "sync"], None)?)?;
    let copies: Vec<&Value> = own.iter().filter(|e| e["from"] == alice).collect();
    ensure!(
        copies.len() == 500,
        "alice sees {} of her 500 sent messages",
        copies.len()
    );
    for (i, entry) in copies.iter().enumerate() {
        ensure!(
            entry["body"] == bodies[i].as_str(),
            "alice's copies in order: {entry}"
        );
        ensure!(field(entry, "to")? == bob, "sent to bob: {entry}");
    }
    let bob_ids: Vec<u64> = synced
        .iter()
        .map(|e| field(e, "message_id"))
        .collect::<Result<_, _>>()?;
    let copy_ids: Vec<u64> = copies
        .iter()
        .map(|e| field(e, "message_id"))
        .collect::<Result<_, _>>()?;
    ensure!(
        bob_ids == copy_ids,
        "both copies of each message carry one message id"
    );
    Ok(())
}

#[test]
fn watch_prints_a_message_sent_through_another_node_when_notified() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&[])?;
    register(&cluster, 1, "alice")?;
    let bob = register(&cluster, 1, "bob")?;

    // The watcher's periodic sync is far away, so only a Notify can make it
    // print within the test's wait.
    let mut watch = Command::new(cli_binary()?)
        .args(["--server", &cluster.client_addr(3), "--ca"])
        .arg(cluster.ca_path())
        .args(["--user", "bob", "--password", PASSWORD, "--json", "watch"])
        .env("FISHCHAT_SYNC_INTERVAL_SECS", "600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = watch.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let stderr = watch.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let lines = line_reader(stdout);
    let notes = line_reader(stderr);
    // The watcher says on standard error when it is logged in and listening.
    let ready = notes.recv_timeout(Duration::from_secs(30));
    if !matches!(&ready, Ok(line) if line.starts_with("watching")) {
        let _ = watch.kill();
        bail!("watch did not start: {ready:?}");
    }
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let alice = Client::connect(config(&cluster, &[1])?).await?;
        alice.login("alice", PASSWORD, None).await?;
        let sent_at = Instant::now();
        alice
            .send(bob, "watch-1", b"are you there?".to_vec(), "text/plain")
            .await?;
        anyhow::Ok(sent_at)
    });
    let sent_at = match outcome {
        Ok(at) => at,
        Err(e) => {
            let _ = watch.kill();
            return Err(e);
        }
    };
    let line = lines.recv_timeout(Duration::from_secs(30));
    let waited = sent_at.elapsed();
    let _ = watch.kill();
    let _ = watch.wait();
    let line = line.context("watch printed nothing after the send")?;
    let entry: Value = serde_json::from_str(&line)?;
    ensure!(entry["body"] == "are you there?", "watch printed {entry}");
    eprintln!("watch printed the message {waited:?} after the send");
    ensure!(
        waited < Duration::from_secs(30),
        "arrived by Notify, well before the periodic sync"
    );
    Ok(())
}

/// The lines of `pipe`, read on a thread.
fn line_reader(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn inbox_bodies(client: &Client) -> anyhow::Result<Vec<String>> {
    Ok(gap_free_inbox(client)
        .await?
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect())
}

#[test]
fn a_killed_node_does_not_stop_chat_and_catches_up_when_restarted() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let mut cluster = started(&[])?;
    let rt = runtime()?;
    let (alice, bob, bob_id) = rt.block_on(async {
        let alice = Client::connect(config(&cluster, &[1, 2, 3])?).await?;
        alice.register("alice", PASSWORD).await?;
        let bob_id = alice.register("bob", PASSWORD).await?;
        alice.login("alice", PASSWORD, None).await?;
        let bob = Client::connect(config(&cluster, &[1, 3, 2])?).await?;
        bob.login("bob", PASSWORD, None).await?;
        anyhow::Ok((alice, bob, bob_id))
    })?;
    let mut expected = rt.block_on(send_many(&alice, To::User(bob_id), "before", 50))?;

    cluster.kill(1)?;
    expected.extend(rt.block_on(send_many(&alice, To::User(bob_id), "during", 50))?);
    let during = rt.block_on(inbox_bodies(&bob))?;
    ensure!(
        during == expected,
        "bob syncs through the survivors: {during:?}"
    );
    ensure!(
        !alice.connected_to().ends_with(&cluster.client_addr(1)),
        "alice moved off node 1"
    );

    cluster.start_node(1)?;
    cluster.wait_ready(1, READY)?;
    expected.extend(rt.block_on(send_many(&alice, To::User(bob_id), "after", 20))?);
    cluster.eventually(
        "every shard has the same applied index and digest on all three nodes",
        Duration::from_secs(60),
        Cluster::replicas_agree,
    )?;
    let node1 = rt.block_on(async {
        let bob_on_1 = Client::connect(config(&cluster, &[1])?).await?;
        bob_on_1.login("bob", PASSWORD, None).await?;
        inbox_bodies(&bob_on_1).await
    })?;
    ensure!(node1 == expected, "the restarted node serves everything");
    Ok(())
}

#[test]
fn every_acknowledged_message_survives_killing_all_nodes() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let mut cluster = started(&[])?;
    let rt = runtime()?;
    let (bob_id, acked) = rt.block_on(async {
        let alice = Client::connect(config(&cluster, &[2])?).await?;
        alice.register("alice", PASSWORD).await?;
        let bob_id = alice.register("bob", PASSWORD).await?;
        alice.login("alice", PASSWORD, None).await?;
        let acked = send_many(&alice, To::User(bob_id), "durable", 100).await?;
        anyhow::Ok((bob_id, acked))
    })?;
    for id in 1..=3 {
        cluster.kill(id)?;
    }
    for id in 1..=3 {
        cluster.start_node(id)?;
    }
    for id in 1..=3 {
        cluster.wait_ready(id, READY)?;
    }
    let (bob_inbox, alice_inbox) = rt.block_on(async {
        let bob = Client::connect(config(&cluster, &[3, 1, 2])?).await?;
        let login = bob.login("bob", PASSWORD, None).await?;
        ensure!(login.user_id == bob_id);
        let alice = Client::connect(config(&cluster, &[1, 2, 3])?).await?;
        alice.login("alice", PASSWORD, None).await?;
        anyhow::Ok((inbox_bodies(&bob).await?, inbox_bodies(&alice).await?))
    })?;
    ensure!(
        bob_inbox == acked,
        "bob's inbox after the restart: {bob_inbox:?}"
    );
    ensure!(alice_inbox == acked, "alice's copies after the restart");
    Ok(())
}

#[test]
fn a_retried_send_returns_the_first_result_and_stores_one_entry() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&[])?;
    let rt = runtime()?;
    rt.block_on(async {
        let alice = Client::connect(config(&cluster, &[1])?).await?;
        alice.register("alice", PASSWORD).await?;
        let bob_id = alice.register("bob", PASSWORD).await?;
        alice.login("alice", PASSWORD, None).await?;
        let first = alice
            .send(bob_id, "same-id", b"once".to_vec(), "text/plain")
            .await?;
        ensure!(!first.duplicate);
        // The retry arrives through another node.
        let other = Client::connect(config(&cluster, &[3])?).await?;
        other.login("alice", PASSWORD, None).await?;
        let retry = other
            .send(bob_id, "same-id", b"once".to_vec(), "text/plain")
            .await?;
        ensure!(retry.duplicate, "the retry is recognised");
        ensure!(
            (retry.message_id, retry.version, retry.timestamp_ms)
                == (first.message_id, first.version, first.timestamp_ms),
            "the retry returns the first result"
        );
        let bob = Client::connect(config(&cluster, &[2])?).await?;
        bob.login("bob", PASSWORD, None).await?;
        let inbox = bob.sync_all(0).await?;
        ensure!(inbox.len() == 1, "one entry, not {}", inbox.len());
        let own = alice.sync_all(0).await?;
        ensure!(own.len() == 1, "one sender copy, not {}", own.len());
        Ok(())
    })
}

/// Sends `body` on `conn` as one request with `token`; returns the answer.
async fn ask(
    conn: &Connection,
    token: &str,
    body: request::Body,
) -> anyhow::Result<response::Body> {
    let response = conn
        .request(&Request {
            request_id: 1,
            token: token.to_string(),
            body: Some(body),
        })
        .await?;
    response
        .body
        .ok_or_else(|| anyhow!("an answer without a body"))
}

/// The error code of an answer, or why it is not an error.
fn code_of(answer: &response::Body) -> anyhow::Result<ErrorCode> {
    match answer {
        response::Body::Error(e) => Ok(ErrorCode::try_from(e.code)?),
        other => bail!("expected an error, got {other:?}"),
    }
}

async fn expect_code(
    conn: &Connection,
    token: &str,
    body: request::Body,
    want: ErrorCode,
) -> anyhow::Result<()> {
    let answer = ask(conn, token, body).await?;
    let got = code_of(&answer)?;
    ensure!(got == want, "expected {want:?}, got {answer:?}");
    // The connection still serves.
    let ping = ask(conn, "", request::Body::Ping(PingRequest { nonce: 9 })).await?;
    ensure!(
        matches!(ping, response::Body::Ping(p) if p.nonce == 9),
        "ping after {want:?}"
    );
    Ok(())
}

fn send_body(to: u64, id: &str, body: Vec<u8>) -> request::Body {
    request::Body::Send(SendRequest {
        recipient_id: to,
        client_msg_id: id.into(),
        body,
        content_type: "text/plain".into(),
    })
}

/// Logs `user` in on `conn` without a device name; returns token and id.
async fn login_on(conn: &Connection, user: &str, password: &str) -> anyhow::Result<(String, u64)> {
    login_with(conn, user, password, "").await
}

async fn login_with(
    conn: &Connection,
    user: &str,
    password: &str,
    device: &str,
) -> anyhow::Result<(String, u64)> {
    let answer = ask(
        conn,
        "",
        request::Body::Login(LoginRequest {
            username: user.into(),
            password: password.into(),
            device: device.into(),
        }),
    )
    .await?;
    match answer {
        response::Body::Login(login) => Ok((login.token, login.user_id)),
        other => bail!("login as {user} failed: {other:?}"),
    }
}

#[test]
fn bad_input_gets_its_typed_error_changes_nothing_and_the_connection_goes_on() -> anyhow::Result<()>
{
    let _one = one_cluster_at_a_time();
    // Tokens live four seconds here, so one can be seen to expire.
    let cluster = started(&["--token-lifetime-secs", "4"])?;
    let rt = runtime()?;
    rt.block_on(async {
        let setup = Client::connect(config(&cluster, &[1])?).await?;
        let alice_id = setup.register("alice", PASSWORD).await?;
        let bob_id = setup.register("bob", PASSWORD).await?;

        let conn = Connection::connect(&config(&cluster, &[2])?, &cluster.client_addr(2)).await?;
        let login = |user: &str, password: &str| {
            request::Body::Login(LoginRequest {
                username: user.into(),
                password: password.into(),
                device: String::new(),
            })
        };
        expect_code(
            &conn,
            "",
            login("alice", "wrong password"),
            ErrorCode::WrongPassword,
        )
        .await?;
        expect_code(
            &conn,
            "",
            login("nobody", PASSWORD),
            ErrorCode::WrongPassword,
        )
        .await?;

        // Guessing: the fifth wrong password in a row closes the name on
        // that node for a second, to the right password too; other nodes
        // keep their own count, and once the second is up the right
        // password logs in.
        setup.register("carol", PASSWORD).await?;
        for _ in 0..5 {
            expect_code(
                &conn,
                "",
                login("carol", "a guess"),
                ErrorCode::WrongPassword,
            )
            .await?;
        }
        let closed = ask(&conn, "", login("carol", PASSWORD)).await?;
        let response::Body::Error(refusal) = &closed else {
            bail!("a closed name logged in: {closed:?}")
        };
        ensure!(
            refusal.code == ErrorCode::TooManyRequests as i32
                && refusal.retryable
                && (1..=1000).contains(&refusal.retry_after_ms),
            "a closed name is refused with the wait: {refusal:?}"
        );
        login_on(&other_connection(&cluster).await?, "carol", PASSWORD).await?;
        tokio::time::sleep(Duration::from_millis(refusal.retry_after_ms + 50)).await;
        let node2 = Connection::connect(&config(&cluster, &[2])?, &cluster.client_addr(2)).await?;
        login_on(&node2, "carol", PASSWORD).await?;
        expect_code(
            &conn,
            "fc1.garbage.token",
            send_body(bob_id, "m1", b"x".to_vec()),
            ErrorCode::Unauthenticated,
        )
        .await?;
        expect_code(
            &conn,
            "",
            send_body(bob_id, "m1", b"x".to_vec()),
            ErrorCode::Unauthenticated,
        )
        .await?;

        // Expired: a token of this cluster, used after its lifetime.
        let other = Connection::connect(&config(&cluster, &[3])?, &cluster.client_addr(3)).await?;
        let (old_token, _) = login_on(&other, "alice", PASSWORD).await?;
        tokio::time::sleep(Duration::from_millis(4500)).await;
        expect_code(
            &conn,
            &old_token,
            send_body(bob_id, "m2", b"x".to_vec()),
            ErrorCode::TokenExpired,
        )
        .await?;

        // Logged out: refused on every node once Logout is answered, also
        // on a node that accepted the token a moment before.
        let (token, _) = login_on(&other_connection(&cluster).await?, "alice", PASSWORD).await?;
        let elsewhere =
            Connection::connect(&config(&cluster, &[1])?, &cluster.client_addr(1)).await?;
        let before = ask(
            &elsewhere,
            &token,
            request::Body::Sync(SyncRequest { since: 0, limit: 0 }),
        )
        .await?;
        ensure!(
            matches!(before, response::Body::Sync(_)),
            "valid before logout: {before:?}"
        );
        let logout = ask(&conn, &token, request::Body::Logout(Default::default())).await?;
        ensure!(
            matches!(logout, response::Body::Logout(_)),
            "logout: {logout:?}"
        );
        let again = ask(&conn, &token, request::Body::Logout(Default::default())).await?;
        ensure!(
            matches!(again, response::Body::Logout(_)),
            "logging out a revoked token succeeds again: {again:?}"
        );
        expect_code(
            &elsewhere,
            &token,
            send_body(bob_id, "m3", b"x".to_vec()),
            ErrorCode::TokenRevoked,
        )
        .await?;
        expect_code(
            &conn,
            &token,
            request::Body::Sync(SyncRequest { since: 0, limit: 0 }),
            ErrorCode::TokenRevoked,
        )
        .await?;

        // A connection bound to alice refuses bob's token: no sending as,
        // nor syncing the inbox of, another user.
        let (alice_token, _) = login_on(&conn, "alice", PASSWORD).await?;
        let (bob_token, _) = login_on(&other_connection(&cluster).await?, "bob", PASSWORD).await?;
        expect_code(
            &conn,
            &bob_token,
            send_body(alice_id, "m4", b"x".to_vec()),
            ErrorCode::PermissionDenied,
        )
        .await?;
        expect_code(
            &conn,
            &bob_token,
            request::Body::Sync(SyncRequest { since: 0, limit: 0 }),
            ErrorCode::PermissionDenied,
        )
        .await?;
        expect_code(
            &conn,
            "",
            login("bob", PASSWORD),
            ErrorCode::PermissionDenied,
        )
        .await?;

        // Out-of-range input.
        expect_code(
            &conn,
            &alice_token,
            send_body(bob_id, "m5", vec![b'x'; 64 * 1024 + 1]),
            ErrorCode::BodyTooLarge,
        )
        .await?;
        expect_code(
            &conn,
            &alice_token,
            send_body(alice_id + u64::from(SHARDS) * 1000, "m6", b"x".to_vec()),
            ErrorCode::UnknownUser,
        )
        .await?;
        expect_code(
            &conn,
            &alice_token,
            send_body(bob_id, "", b"x".to_vec()),
            ErrorCode::BadRequest,
        )
        .await?;
        let no_operation = conn
            .request(&Request {
                request_id: 0,
                token: String::new(),
                body: None,
            })
            .await?;
        ensure!(
            code_of(
                no_operation
                    .body
                    .as_ref()
                    .ok_or_else(|| anyhow!("no body"))?
            )? == ErrorCode::BadRequest
        );

        // Frames that are not requests.
        let garbage = conn.raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await?;
        ensure!(
            code_of(garbage.body.as_ref().ok_or_else(|| anyhow!("no body"))?)?
                == ErrorCode::MalformedFrame,
            "{garbage:?}"
        );
        let huge = conn.raw(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3]).await?;
        ensure!(
            code_of(huge.body.as_ref().ok_or_else(|| anyhow!("no body"))?)?
                == ErrorCode::FrameTooLarge,
            "{huge:?}"
        );

        // After all of that, a valid request on the same connection works,
        // and no refused request left anything behind.
        let sent = ask(
            &conn,
            &alice_token,
            send_body(bob_id, "valid", b"hello".to_vec()),
        )
        .await?;
        let response::Body::Send(sent) = sent else {
            bail!("valid send failed: {sent:?}")
        };
        ensure!(sent.version == 1, "bob's first entry is the valid one");
        let synced = ask(
            &conn,
            &alice_token,
            request::Body::Sync(SyncRequest { since: 0, limit: 0 }),
        )
        .await?;
        let response::Body::Sync(page) = synced else {
            bail!("sync failed: {synced:?}")
        };
        let bodies: BTreeSet<Vec<u8>> = page.entries.into_iter().map(|e| e.body).collect();
        ensure!(
            bodies == BTreeSet::from([b"hello".to_vec()]),
            "alice's inbox holds only the valid send"
        );
        // Operators see the refusals by operation and code.
        let metrics = cluster.metrics(2)?;
        for line in [
            r#"fishchat_client_requests_total{operation="login",outcome="WRONG_PASSWORD"} 7"#,
            r#"fishchat_client_requests_total{operation="login",outcome="TOO_MANY_REQUESTS"} 1"#,
            r#"fishchat_client_requests_total{operation="frame",outcome="FRAME_TOO_LARGE"} 1"#,
        ] {
            ensure!(metrics.contains(line), "metrics lack {line}:\n{metrics}");
        }
        Ok(())
    })
}

/// Logs `user` in on `conn` as the named `device`; returns the token.
async fn login_device(conn: &Connection, user: &str, device: &str) -> anyhow::Result<String> {
    Ok(login_with(conn, user, PASSWORD, device).await?.0)
}

/// The next push frame, within ten seconds.
async fn next_push(stream: &mut PushStream) -> anyhow::Result<push::Body> {
    let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .context("no push within 10 s")??;
    frame
        .and_then(|p| p.body)
        .ok_or_else(|| anyhow!("the push stream ended"))
}

#[test]
fn a_device_login_replaces_its_earlier_session_on_any_node_resume_joins_it_and_logout_kicks(
) -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&[])?;
    let rt = runtime()?;
    rt.block_on(async {
        let setup = Client::connect(config(&cluster, &[1])?).await?;
        let alice = setup.register("alice", PASSWORD).await?;

        // The laptop logs in on node 1 and gets its push stream.
        let laptop = Connection::connect(&config(&cluster, &[1])?, &cluster.client_addr(1)).await?;
        let first = login_device(&laptop, "alice", "laptop").await?;
        let mut laptop_pushes = laptop.accept_push_stream().await?;
        ensure!(
            matches!(next_push(&mut laptop_pushes).await?, push::Body::Notify(n) if n.latest_version == 0),
            "the push stream opens with a Notify of the latest version"
        );

        // Refreshing the token on the same connection keeps the session.
        let refreshed = login_device(&laptop, "alice", "laptop").await?;
        for token in [&first, &refreshed] {
            let sent = ask(&laptop, token, send_body(alice, &format!("note-{token}"), b"x".to_vec())).await?;
            ensure!(matches!(sent, response::Body::Send(_)), "token still valid: {sent:?}");
        }
        // Each send to oneself is announced on the push stream.
        for _ in 0..2 {
            ensure!(matches!(next_push(&mut laptop_pushes).await?, push::Body::Notify(_)));
        }

        // Resume: a connection to node 2 joins the session with its token
        // alone (no password, no new session), gets the same token back and
        // its own push stream, opening with the latest version.
        let resumed = Connection::connect(&config(&cluster, &[2])?, &cluster.client_addr(2)).await?;
        expect_code(&resumed, "not-a-token", resume(), ErrorCode::Unauthenticated).await?;
        let answer = ask(&resumed, &refreshed, resume()).await?;
        ensure!(
            matches!(&answer, response::Body::Resume(r) if r.user_id == alice && r.token == refreshed),
            "resumed with the same token: {answer:?}"
        );
        let mut resumed_pushes = resumed.accept_push_stream().await?;
        ensure!(
            matches!(next_push(&mut resumed_pushes).await?, push::Body::Notify(n) if n.latest_version == 2),
            "the resumed connection's push stream opens with the latest version"
        );

        // The same device name logging in on node 3 ends the laptop's session.
        let other = Connection::connect(&config(&cluster, &[3])?, &cluster.client_addr(3)).await?;
        let newer = login_device(&other, "alice", "laptop").await?;
        let mut other_pushes = other.accept_push_stream().await?;
        match next_push(&mut laptop_pushes).await? {
            push::Body::Kick(kick) => ensure!(
                kick.reason == Reason::SessionReplaced as i32,
                "kicked as replaced: {kick:?}"
            ),
            other => bail!("expected a Kick, got {other:?}"),
        }
        match next_push(&mut resumed_pushes).await? {
            push::Body::Kick(kick) => ensure!(
                kick.reason == Reason::SessionReplaced as i32,
                "the resumed connection is kicked with its session: {kick:?}"
            ),
            other => bail!("expected a Kick on the resumed connection, got {other:?}"),
        }
        let other_check = Connection::connect(&config(&cluster, &[2])?, &cluster.client_addr(2)).await?;
        expect_code(&other_check, &refreshed, sync_from_start(), ErrorCode::TokenRevoked).await?;
        expect_code(&other_check, &refreshed, resume(), ErrorCode::TokenRevoked).await?;

        // Logout kicks the connection bound to the session.
        ensure!(matches!(next_push(&mut other_pushes).await?, push::Body::Notify(_)));
        let logout = ask(&other, &newer, request::Body::Logout(Default::default())).await?;
        ensure!(matches!(logout, response::Body::Logout(_)), "logout: {logout:?}");
        match next_push(&mut other_pushes).await? {
            push::Body::Kick(kick) => ensure!(
                kick.reason == Reason::TokenRevoked as i32,
                "kicked as logged out: {kick:?}"
            ),
            other => bail!("expected a Kick, got {other:?}"),
        }
        Ok(())
    })
}

#[test]
fn notifies_carry_new_entries_exactly_as_a_sync_shows_them() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let cluster = started(&[])?;
    let alice_id = register(&cluster, 1, "alice")?;
    let (bob_name, bob_id) =
        register_in_another_shard(&cluster, alice_id, &["bob", "bobby", "robert"])?;
    let rt = runtime()?;
    rt.block_on(async {
        // Bob watches on node 1, a second device of Alice on node 2; Alice
        // sends from node 3, so every Notify crosses nodes.
        let bob = Connection::connect(&config(&cluster, &[1])?, &cluster.client_addr(1)).await?;
        let (bob_token, _) = login_on(&bob, &bob_name, PASSWORD).await?;
        let mut bob_pushes = bob.accept_push_stream().await?;
        let phone = Connection::connect(&config(&cluster, &[2])?, &cluster.client_addr(2)).await?;
        let (phone_token, _) = login_on(&phone, "alice", PASSWORD).await?;
        let mut phone_pushes = phone.accept_push_stream().await?;
        let alice = Client::connect(config(&cluster, &[3])?).await?;
        alice.login("alice", PASSWORD, None).await?;

        let (mut to_bob, mut to_phone) = (BTreeMap::new(), BTreeMap::new());
        // Version 1 of each inbox: the message, and Alice's copy of it
        // (which crosses shards through the outbox).
        alice
            .send(bob_id, "direct-1", b"hello bob".to_vec(), "text/plain")
            .await?;
        pushed_until(&mut bob_pushes, 1, &mut to_bob).await?;
        pushed_until(&mut phone_pushes, 1, &mut to_phone).await?;
        // Versions 2 and 3: the group's creation, then a message to it.
        let group = alice.create_group("pushed", &[bob_id]).await?.group_id;
        alice
            .send_group(group, "group-1", b"hello group".to_vec(), "text/plain")
            .await?;
        pushed_until(&mut bob_pushes, 3, &mut to_bob).await?;
        pushed_until(&mut phone_pushes, 3, &mut to_phone).await?;

        for (who, conn, token, pushed) in [
            ("bob", &bob, &bob_token, &to_bob),
            ("alice", &phone, &phone_token, &to_phone),
        ] {
            let synced = match ask(conn, token, sync_from_start()).await? {
                response::Body::Sync(page) => page.entries,
                other => bail!("sync of {who}: {other:?}"),
            };
            ensure!(synced.len() == 3, "{who} has 3 entries: {synced:?}");
            for version in [1, 3] {
                ensure!(
                    pushed.contains_key(&version),
                    "{who}'s message at version {version} came inside a Notify: {pushed:?}"
                );
            }
            for (version, entry) in pushed {
                let index = usize::try_from(*version)? - 1;
                ensure!(
                    synced.get(index) == Some(entry),
                    "{who}'s pushed entry {entry:?} is the synced one: {synced:?}"
                );
            }
        }
        Ok(())
    })
}

/// Reads `stream` until a Notify announces `version` or later, keeping the
/// entries the Notifies carried in `pushed`, by version.
async fn pushed_until(
    stream: &mut PushStream,
    version: u64,
    pushed: &mut BTreeMap<u64, InboxEntry>,
) -> anyhow::Result<()> {
    loop {
        match next_push(stream).await? {
            push::Body::Notify(notify) => {
                for entry in notify.entries {
                    pushed.insert(entry.version, entry);
                }
                if notify.latest_version >= version {
                    return Ok(());
                }
            }
            other => bail!("expected a Notify, got {other:?}"),
        }
    }
}

/// A Resume (the session is the request's token).
fn resume() -> request::Body {
    request::Body::Resume(Default::default())
}

/// A Sync of the whole inbox.
fn sync_from_start() -> request::Body {
    request::Body::Sync(SyncRequest { since: 0, limit: 0 })
}

async fn other_connection(cluster: &Cluster) -> anyhow::Result<Connection> {
    Ok(Connection::connect(&config(cluster, &[3])?, &cluster.client_addr(3)).await?)
}

/// A counter or gauge of node `id`'s `/metrics`.
fn metric(cluster: &Cluster, id: u64, name: &str) -> anyhow::Result<u64> {
    let text = cluster.metrics(id)?;
    let line = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .with_context(|| format!("node {id} reports no {name}"))?;
    let value = line.split_whitespace().nth(1).unwrap_or_default();
    Ok(value
        .parse::<f64>()
        .with_context(|| format!("a value in {line}"))? as u64)
}

/// Waits until every node knows which users each of its peers holds.
fn directories_known(cluster: &Cluster) -> anyhow::Result<()> {
    cluster.eventually(
        "every node knows both peers' session directories",
        Duration::from_secs(30),
        |cluster| {
            for id in 1..=3 {
                if metric(cluster, id, "fishchat_session_directory_peers_known")? != 2 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )
}

/// Long enough for a node's queued session events to reach every peer.
const EVENTS_SETTLE: Duration = Duration::from_millis(500);

/// Inbox events each node has received from its peers.
fn received(cluster: &Cluster) -> anyhow::Result<Vec<u64>> {
    (1..=3)
        .map(|id| metric(cluster, id, "fishchat_peer_inbox_events_received_total"))
        .collect()
}

/// Alice, logged in on node 3 only.
async fn alice_on_node_3(cluster: &Cluster) -> anyhow::Result<Client> {
    let alice = Client::connect(config(cluster, &[3])?).await?;
    alice.login("alice", PASSWORD, None).await?;
    Ok(alice)
}

/// Alice sends ten messages to Carol (offline), then one to Bob, whose
/// push stream then announces `bob_version`; returns the inbox events each
/// node had received from its peers before and after.
async fn to_carol_then_bob(
    cluster: &Cluster,
    alice: &Client,
    (carol, bob): (u64, u64),
    bob_pushes: &mut PushStream,
    bob_version: u64,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let before = received(cluster)?;
    send_many(
        alice,
        To::User(carol),
        format!("to-carol-{bob_version}"),
        10,
    )
    .await?;
    send_many(alice, To::User(bob), format!("to-bob-{bob_version}"), 1).await?;
    pushed_until(bob_pushes, bob_version, &mut BTreeMap::new()).await?;
    // Bob's push shows the sender's events went out; give its queue to
    // another node (had it one) time to flush as well.
    tokio::time::sleep(EVENTS_SETTLE).await;
    Ok((before, received(cluster)?))
}

#[test]
fn inbox_events_go_only_to_nodes_holding_the_user_also_after_restarts() -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let mut cluster = started(&[])?;
    let carol = register(&cluster, 1, "carol")?;
    let bob = register(&cluster, 1, "bob")?;
    register(&cluster, 1, "alice")?;
    let dave = register(&cluster, 1, "dave")?;
    let rt = runtime()?;
    directories_known(&cluster)?;

    // Bob watches on node 1; Alice sends from node 3; nobody is on node 2.
    let bob_conn = rt.block_on(Connection::connect(
        &config(&cluster, &[1])?,
        &cluster.client_addr(1),
    ))?;
    rt.block_on(login_on(&bob_conn, "bob", PASSWORD))?;
    let mut bob_pushes = rt.block_on(bob_conn.accept_push_stream())?;
    let alice = rt.block_on(alice_on_node_3(&cluster))?;
    let (before, after) = rt.block_on(to_carol_then_bob(
        &cluster,
        &alice,
        (carol, bob),
        &mut bob_pushes,
        1,
    ))?;
    ensure!(
        after[1] == before[1],
        "node 2 holds no session and was sent no inbox event: {before:?} -> {after:?}"
    );
    ensure!(
        after[0] > before[0],
        "node 1, holding bob, was sent his: {before:?} -> {after:?}"
    );

    // Node 3, the sender's node, restarts knowing nobody's sessions: it
    // tells every peer everything, and the notify still reaches node 1.
    cluster.kill(3)?;
    cluster.start_node(3)?;
    cluster.wait_ready(3, READY)?;
    let alice = rt.block_on(alice_on_node_3(&cluster))?;
    rt.block_on(send_many(&alice, To::User(bob), "to-bob-again", 1))?;
    rt.block_on(pushed_until(&mut bob_pushes, 2, &mut BTreeMap::new()))?;
    // Within a keepalive it has the peers' sets again and stops.
    directories_known(&cluster)?;
    let (before, after) = rt.block_on(to_carol_then_bob(
        &cluster,
        &alice,
        (carol, bob),
        &mut bob_pushes,
        3,
    ))?;
    ensure!(
        after[1] == before[1],
        "the restarted node sends node 2 nothing again: {before:?} -> {after:?}"
    );

    // Node 1 restarts: a user who logs in there right after is notified of
    // a message sent at once from node 3, whose view of node 1 was of the
    // node's previous run.
    drop(bob_pushes);
    drop(bob_conn);
    cluster.kill(1)?;
    cluster.start_node(1)?;
    cluster.wait_ready(1, READY)?;
    rt.block_on(async {
        let dave_conn =
            Connection::connect(&config(&cluster, &[1])?, &cluster.client_addr(1)).await?;
        login_on(&dave_conn, "dave", PASSWORD).await?;
        let mut dave_pushes = dave_conn.accept_push_stream().await?;
        let mut pushed = BTreeMap::new();
        pushed_until(&mut dave_pushes, 0, &mut pushed).await?;
        alice
            .send(dave, "to-dave", b"hello dave".to_vec(), "text/plain")
            .await?;
        pushed_until(&mut dave_pushes, 1, &mut pushed).await?;
        ensure!(
            pushed.get(&1).is_some_and(|e| e.body == b"hello dave"),
            "the message came inside the Notify: {pushed:?}"
        );
        anyhow::Ok(())
    })?;
    Ok(())
}
