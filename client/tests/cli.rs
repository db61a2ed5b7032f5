//! The `fishchat` binary against fake nodes (tests/support): what it prints
//! and how it exits.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use fishchat_client::{Client, TEXT_PLAIN};
use support::{FakeCluster, FakeNode, CA_PEM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `fishchat` against `node` as `user` with `args`, feeding `stdin`.
async fn fishchat(node: &FakeNode, ca: &Path, user: &str, args: &[&str], stdin: &str) -> Output {
    let mut command = command(node, ca, user);
    command.args(args);
    let stdin = stdin.to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fishchat");
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("fishchat output")
    })
    .await
    .expect("join")
}

/// The lines a child writes to `stdout`, as they come.
fn lines_of(stdout: std::process::ChildStdout) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn command(node: &FakeNode, ca: &Path, user: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fishchat"));
    for var in [
        "FISHCHAT_SERVER",
        "FISHCHAT_CA",
        "FISHCHAT_USER",
        "FISHCHAT_PASSWORD",
    ] {
        command.env_remove(var);
    }
    command
        .env("FISHCHAT_SERVER", node.address())
        .env("FISHCHAT_PASSWORD", "password1")
        .arg("--ca")
        .arg(ca);
    if !user.is_empty() {
        command.args(["--user", user]);
    }
    command
}

fn lines(output: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn ca_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(CA_PEM).expect("write CA");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_send_and_sync_print_json_lines() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();

    let alice = fishchat(&node, ca.path(), "alice", &["--json", "register"], "").await;
    assert!(alice.status.success(), "{alice:?}");
    assert_eq!(lines(&alice)[0], serde_json::json!({"user_id": 1}));
    let bob = fishchat(&node, ca.path(), "bob", &["register", "--json"], "").await;
    assert_eq!(lines(&bob)[0]["user_id"], 2);

    let one = fishchat(
        &node,
        ca.path(),
        "alice",
        &["--json", "send", "bob", "hello", "there"],
        "",
    )
    .await;
    assert!(one.status.success(), "{one:?}");
    let sent = lines(&one);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["to"], 2);
    assert_eq!(sent[0]["version"], 1);
    assert_eq!(sent[0]["duplicate"], false);

    let piped = fishchat(
        &node,
        ca.path(),
        "alice",
        &["--json", "send", "2"],
        "line one\n\nline two\n",
    )
    .await;
    assert!(piped.status.success(), "{piped:?}");
    let sent = lines(&piped);
    assert_eq!(sent.len(), 2, "one message per non-empty line");
    assert_ne!(sent[0]["message_id"], sent[1]["message_id"]);

    let synced = fishchat(&node, ca.path(), "bob", &["--json", "sync"], "").await;
    let entries = lines(&synced);
    let bodies: Vec<&str> = entries.iter().filter_map(|e| e["body"].as_str()).collect();
    assert_eq!(bodies, vec!["hello there", "line one", "line two"]);
    assert_eq!(entries[0]["from"], 1);
    assert_eq!(entries[0]["to"], 2);
    assert_eq!(entries[0]["content_type"], "text/plain; charset=utf-8");
    assert!(entries[0].get("group_id").is_none());

    let page = fishchat(
        &node,
        ca.path(),
        "bob",
        &["--json", "sync", "--since", "1", "--limit", "1"],
        "",
    )
    .await;
    let page = lines(&page);
    assert_eq!(page.len(), 1);
    assert_eq!(page[0]["version"], 2);

    let text = fishchat(&node, ca.path(), "bob", &["sync"], "").await;
    let text = String::from_utf8_lossy(&text.stdout);
    let first = text.lines().next().expect("a line");
    assert!(first.starts_with("[v1 "), "{first}");
    assert!(first.ends_with("] #1 -> bob: hello there"), "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_name_their_code_and_exit_1_and_usage_errors_exit_2() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();
    fishchat(&node, ca.path(), "alice", &["register"], "").await;

    let unknown = fishchat(&node, ca.path(), "alice", &["send", "nobody", "hi"], "").await;
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("UNKNOWN_USER"));

    let taken = fishchat(&node, ca.path(), "alice", &["register"], "").await;
    assert_eq!(taken.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&taken.stderr).contains("USERNAME_TAKEN"));

    let no_user = fishchat(&node, ca.path(), "", &["sync"], "").await;
    assert_eq!(no_user.status.code(), Some(2), "{no_user:?}");

    let bad_flag = fishchat(&node, ca.path(), "alice", &["sync", "--bogus"], "").await;
    assert_eq!(bad_flag.status.code(), Some(2));

    let missing_ca = fishchat(
        &node,
        Path::new("/nonexistent/ca.pem"),
        "alice",
        &["sync"],
        "",
    )
    .await;
    assert_eq!(missing_ca.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing_ca.stderr).contains("CONFIG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_only_messages_that_arrive_after_it_starts() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();
    let mut config = cluster.config(&[&node]);
    config.ca_pem = CA_PEM.to_vec();
    let alice = Client::connect(config).await.expect("connect");
    alice
        .register("alice", "password1")
        .await
        .expect("register");
    alice.register("bob", "password1").await.expect("register");
    alice
        .login("alice", "password1", None)
        .await
        .expect("login");
    alice
        .send(2, "old", b"old news".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");

    let mut child = command(&node, ca.path(), "bob")
        .args(["--json", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watch");
    let stdout = child.stdout.take().expect("stdout");
    let mut rx = lines_of(stdout);
    // Give watch time to log in and note the latest version.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice
        .send(2, "new", b"fresh".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");
    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a line in time")
        .expect("watch still runs");
    let _ = child.kill();
    let _ = child.wait();
    let entry: serde_json::Value = serde_json::from_str(&line).expect("json");
    assert_eq!(entry["body"], "fresh");
    assert_eq!(entry["version"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_shards_of_the_admin_api() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = vec![0u8; 1024];
            let _ = stream.read(&mut request).await;
            let body = r#"{"node":1,"peers":{},"client_addr":"127.0.0.1:7101","shards":[{"shard":0,"group":1,"role":"leader","leader":1,"term":2,"last_log_index":7,"committed":7,"applied":7,"digest":"00000000000000aa","digest_index":7}],"wal_syncs":1,"writes_per_sync":1.0}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let table = fishchat(&node, ca.path(), "", &["status", "--admin", &admin], "").await;
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("node 1 (127.0.0.1:7101)"), "{text}");
    assert!(text.contains("00000000000000aa"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sends_typed_lines_and_prints_the_peers_messages() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();
    let alice = Client::connect(cluster.config(&[&node]))
        .await
        .expect("connect");
    alice
        .register("alice", "password1")
        .await
        .expect("register");
    alice.register("bob", "password1").await.expect("register");
    alice
        .login("alice", "password1", None)
        .await
        .expect("login");

    let mut child = command(&node, ca.path(), "bob")
        .args(["chat", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chat");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    let mut rx = lines_of(stdout);
    stdin.write_all(b"hi alice\n").expect("type");
    stdin.flush().expect("flush");

    let mut received = Vec::new();
    for _ in 0..50 {
        received = alice.sync_all(0).await.expect("sync");
        if !received.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received.len(), 1, "bob's line reached alice");
    assert_eq!(received[0].body, b"hi alice");
    assert_eq!(received[0].sender_id, 2);

    alice
        .send(2, "reply", b"hi bob".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");
    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a line in time")
        .expect("chat still runs");
    assert!(line.ends_with("] alice -> bob: hi bob"), "{line}");

    drop(stdin);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("chat exits");
    assert!(status.success(), "end of input ends the chat: {status:?}");
}

/// Registers `names` (password `password1`) through the SDK.
async fn register_all(cluster: &FakeCluster, node: &FakeNode, names: &[&str]) {
    let client = Client::connect(cluster.config(&[node]))
        .await
        .expect("connect");
    for name in names {
        client.register(name, "password1").await.expect("register");
    }
    client.close();
}

fn text_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commands_create_change_list_send_and_show_group_entries() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();
    register_all(&cluster, &node, &["alice", "bob", "carol"]).await;
    let run = |user: &'static str, args: &'static [&'static str], stdin: &'static str| {
        fishchat(&node, ca.path(), user, args, stdin)
    };

    let created = run(
        "alice",
        &["--json", "group", "create", "team", "--members", "bob"],
        "",
    )
    .await;
    assert!(created.status.success(), "{created:?}");
    assert_eq!(
        lines(&created),
        vec![serde_json::json!({"group_id":1,"name":"team","duplicate":false})]
    );

    let added = run("alice", &["group", "add", "1", "carol", "--admin"], "").await;
    assert_eq!(
        text_lines(&added),
        vec!["added carol to group 1 as admin (seq 2)"],
        "{added:?}"
    );

    let members = lines(&run("bob", &["--json", "group", "members", "1"], "").await);
    let roles: Vec<(&str, &str)> = members
        .iter()
        .filter_map(|m| Some((m["username"].as_str()?, m["role"].as_str()?)))
        .collect();
    assert_eq!(
        roles,
        vec![("alice", "owner"), ("bob", "member"), ("carol", "admin")]
    );
    let table = text_lines(&run("bob", &["group", "members", "1"], "").await);
    assert!(
        table[0].starts_with("group 1 #team, owner alice,"),
        "{table:?}"
    );
    assert_eq!(
        table[1].split_whitespace().collect::<Vec<_>>(),
        ["USER", "ID", "USERNAME", "ROLE", "JOINED", "SEQ"]
    );
    assert_eq!(
        table[4].split_whitespace().collect::<Vec<_>>(),
        ["3", "carol", "admin", "2"]
    );

    let listed = run("carol", &["--json", "group", "list"], "").await;
    assert_eq!(
        lines(&listed),
        vec![serde_json::json!({"group_id":1,"name":"team"})]
    );

    let sent = run(
        "alice",
        &["--json", "group", "send", "1", "hello", "team"],
        "",
    )
    .await;
    let sent = lines(&sent);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["group_id"], 1);
    assert_eq!(sent[0]["group_seq"], 3);
    assert_eq!(sent[0]["duplicate"], false);
    let piped = run("bob", &["--json", "group", "send", "1"], "one\n\ntwo\n").await;
    assert!(piped.status.success(), "{piped:?}");
    let seqs: Vec<u64> = lines(&piped)
        .iter()
        .filter_map(|l| l["group_seq"].as_u64())
        .collect();
    assert_eq!(seqs, vec![4, 5], "one message per non-empty line");

    // Carol never looked anyone up: names come from events and the group.
    let synced = text_lines(&run("carol", &["sync"], "").await);
    let tails: Vec<&str> = synced
        .iter()
        .filter_map(|line| line.split_once("] ").map(|(_, tail)| tail))
        .collect();
    assert_eq!(
        tails,
        vec![
            "[#team] carol joined (added by alice)",
            "[#team] alice: hello team",
            "[#team] bob: one",
            "[#team] bob: two",
        ]
    );
    let json = lines(&run("bob", &["--json", "sync"], "").await);
    assert_eq!(json[0]["group_id"], 1);
    assert_eq!(json[0]["group_seq"], 1);
    assert_eq!(json[0]["group_event"]["kind"], "created");
    assert_eq!(json[0]["group_event"]["group_name"], "team");
    assert_eq!(json[2]["body"], "hello team");
    assert_eq!(json[2]["group_event"], serde_json::Value::Null);

    let removed = run("carol", &["group", "remove", "1", "bob"], "").await;
    assert_eq!(
        text_lines(&removed),
        vec!["removed bob from group 1 (seq 6)"]
    );
    let left = run("carol", &["--json", "group", "leave", "1"], "").await;
    assert_eq!(
        lines(&left),
        vec![serde_json::json!({"group_id":1,"changed":true,"group_seq":7})]
    );
    let dissolved = run("alice", &["group", "dissolve", "1"], "").await;
    assert_eq!(text_lines(&dissolved), vec!["dissolved group 1 (seq 8)"]);

    let bob_sees = text_lines(&run("bob", &["sync"], "").await);
    assert!(
        bob_sees
            .last()
            .is_some_and(|l| l.ends_with("] [#team] bob was removed by carol")),
        "{bob_sees:?}"
    );
    let alice_sees = text_lines(&run("alice", &["sync", "--since", "6"], "").await);
    let tails: Vec<&str> = alice_sees
        .iter()
        .filter_map(|line| line.split_once("] ").map(|(_, tail)| tail))
        .collect();
    assert_eq!(
        tails,
        vec!["[#team] carol left", "[#team] group dissolved"],
        "{alice_sees:?}"
    );

    let late = run("alice", &["group", "send", "1", "anyone?"], "").await;
    assert_eq!(late.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("GROUP_DISSOLVED"),
        "{late:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_names_a_group_created_before_it_started() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let ca = ca_file();
    register_all(&cluster, &node, &["alice", "bob"]).await;
    let alice = Client::connect(cluster.config(&[&node]))
        .await
        .expect("connect");
    alice
        .login("alice", "password1", None)
        .await
        .expect("login");
    let group = alice
        .create_group("team", &[2])
        .await
        .expect("create")
        .group_id;

    let mut child = command(&node, ca.path(), "bob")
        .args(["watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watch");
    let stdout = child.stdout.take().expect("stdout");
    let mut rx = lines_of(stdout);
    // Give watch time to log in and note the latest version.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    alice
        .send_group(group, "g1", b"hello".to_vec(), TEXT_PLAIN)
        .await
        .expect("send");
    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a line in time")
        .expect("watch still runs");
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.ends_with("] [#team] alice: hello"), "{line}");
}

/// Runs `fishchat bench <args> --report FILE` against `node`, which must
/// succeed, and returns its output and the JSON report.
async fn bench(node: &FakeNode, args: &[&str]) -> (Output, serde_json::Value) {
    let ca = ca_file();
    let file = tempfile::NamedTempFile::new().expect("report file");
    let path = file.path().to_str().expect("utf-8 path");
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--report", path]);
    let run = fishchat(node, ca.path(), "", &all, "").await;
    assert!(run.status.success(), "{run:?}");
    let report = std::fs::read(file.path()).expect("read report");
    (run, serde_json::from_slice(&report).expect("a JSON report"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_send_with_a_count_sends_exactly_that_many_distinct_messages() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let (_, report) = bench(
        &node,
        &["send", "--clients", "2", "--count", "9", "--users", "3"],
    )
    .await;
    assert_eq!(report["mode"], "send");
    assert_eq!(report["acked"], 9);
    assert_eq!(report["latency"]["count"], 9);
    assert_eq!(report["errors"], serde_json::json!({}));
    // The fake node has no admin port: the nodes' figures are left out, not made up.
    assert_eq!(report["nodes"], serde_json::Value::Null);
    let mut sent = cluster.sends_seen();
    assert_eq!(sent.len(), 9, "{sent:?}");
    sent.sort();
    sent.dedup();
    assert_eq!(sent.len(), 9, "every message has its own client message id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ping_reports_the_pings_the_node_answered() {
    let cluster = FakeCluster::new();
    let node = cluster.start_node().await;
    let (run, report) = bench(&node, &["ping", "--clients", "2", "--duration", "300ms"]).await;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.starts_with("ping: 2 clients: "), "{stdout}");
    assert_eq!(report["mode"], "ping");
    let answered = report["answered"].as_u64().expect("a count");
    assert!(answered > 0, "{report}");
    assert_eq!(report["latency"]["count"], answered);
    assert_eq!(report["errors"], serde_json::json!({}));
    let pings = cluster.requests(|body| match body {
        fishchat_client::proto::request::Body::Ping(p) => Some(p.nonce),
        _ => None,
    });
    assert!(pings.len() as u64 >= answered, "{} pings seen", pings.len());
    // No request but pings: a ping needs no login.
    assert_eq!(cluster.seen().len(), pings.len());
}
