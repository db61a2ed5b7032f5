//! `fishchat`: the command-line client.
//!
//! Every command but `register` and `status` logs in first. Output is
//! human text, or one JSON object per line with `--json`. Errors go to
//! stderr with their code; the exit status is 1 for a failure and 2 for a
//! usage error. The `group` commands live in `groups.rs`.

mod bench;
mod groups;
mod output;
mod session;
mod settings;
mod status;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fishchat_client::proto::kick;
use fishchat_client::{new_client_msg_id, Client, ClientConfig, ClientError, TEXT_PLAIN};
use tokio::sync::mpsc;

use groups::GroupCommand;
use session::Session;
use settings::{GlobalArgs, Settings};

/// mimalloc, as in the node: `fishchat bench` shares the machine with the
/// nodes it measures, so its own allocations should cost little.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The FishChat command-line client.
#[derive(Debug, Parser)]
#[command(name = "fishchat", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the account --user with --password, print its user id.
    Register,
    /// Send TEXT to user TO (a username, or a user id); without TEXT, send
    /// each line of stdin as a message of its own.
    Send {
        /// The recipient's username (or numeric user id).
        to: String,
        /// The message; several words are joined with spaces.
        text: Vec<String>,
    },
    /// Print the inbox entries after a version.
    Sync {
        /// Print entries with a version above this.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Print at most one page of this many entries (default: all).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Print messages as they arrive, until Ctrl-C.
    Watch {
        /// Also print entries after this version (default: only new ones).
        #[arg(long)]
        since: Option<u64>,
    },
    /// Talk with PEER: stdin lines are sent, PEER's messages printed.
    Chat {
        /// The other user's username (or numeric user id).
        peer: String,
    },
    /// Create, change, list and send to groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Measure the cluster: throughput and latency as users load it.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Print a node's shards (its admin API's GET /status) as a table.
    Status {
        /// The admin address (default: the first server's port + 20).
        #[arg(long, value_name = "HOST:PORT")]
        admin: Option<String>,
    },
}

/// A mistake in how the program was called (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let settings = Settings::resolve(&cli.global, |name| std::env::var(name).ok());
    match run(cli.command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

/// Prints `error` to stderr with its code; the exit status for it.
fn report(error: &anyhow::Error) -> ExitCode {
    if let Some(usage) = error.downcast_ref::<UsageError>() {
        eprintln!("fishchat: {usage}");
        eprintln!("Try 'fishchat --help'.");
        return ExitCode::from(2);
    }
    eprintln!("{}", error_line(error));
    ExitCode::from(1)
}

/// `error: CODE: what was being done: detail` for a client error (the code
/// is the server's, or the client's kind of failure); `error: ...` for
/// anything else.
fn error_line(error: &anyhow::Error) -> String {
    match error.downcast_ref::<ClientError>() {
        Some(client_error) => {
            let mut parts: Vec<String> = error
                .chain()
                .take_while(|cause| cause.downcast_ref::<ClientError>().is_none())
                .map(|cause| cause.to_string())
                .collect();
            parts.push(client_error.detail());
            format!("error: {}: {}", client_error.code_name(), parts.join(": "))
        }
        None => format!("error: {error:#}"),
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Status { admin } => show_status(&settings, admin).await,
        Command::Register => register(&settings).await,
        Command::Bench { command } => bench::run(&settings, command).await,
        Command::Send { to, text } => {
            let mut session = Session::open(&settings).await?;
            let recipient = session.resolve(&to).await?;
            let text = (!text.is_empty()).then(|| text.join(" "));
            send(&session, Target::User(recipient), text).await
        }
        Command::Sync { since, limit } => {
            let mut session = Session::open(&settings).await?;
            sync(&mut session, since, limit).await
        }
        Command::Watch { since } => {
            let mut session = Session::open(&settings).await?;
            watch(&mut session, since).await
        }
        Command::Chat { peer } => {
            let session = Session::open(&settings).await?;
            chat(session, &peer).await
        }
        Command::Group { command } => {
            let session = Session::open(&settings).await?;
            groups::run(session, command).await
        }
    }
}

async fn connect(settings: &Settings) -> anyhow::Result<Client> {
    if settings.servers.is_empty() {
        return Err(UsageError("no server address given".into()).into());
    }
    let mut config = ClientConfig::from_ca_file(settings.servers.clone(), &settings.ca)?;
    if let Some(interval) = settings.sync_interval {
        config.sync_interval = interval;
    }
    Ok(Client::connect(config).await?)
}

async fn register(settings: &Settings) -> anyhow::Result<()> {
    let (user, password) = settings.credentials().map_err(UsageError)?;
    let client = connect(settings).await?;
    let user_id = client.register(user, password).await.context("register")?;
    if settings.json {
        println!("{}", output::registered_json(user_id));
    } else {
        println!("registered {user} as user #{user_id}");
    }
    client.close();
    Ok(())
}

/// Where `send` and `group send` send.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// One user, by id.
    User(u64),
    /// A group, by id.
    Group(u64),
}

/// Sends `text` to `target`; without text, each non-empty line of stdin as
/// a message of its own, each after the previous one was answered.
async fn send(session: &Session, target: Target, text: Option<String>) -> anyhow::Result<()> {
    match text {
        Some(text) => send_one(session, target, text).await?,
        None => {
            let mut lines = stdin_lines();
            while let Some(line) = lines.recv().await {
                let line = line.context("reading stdin")?;
                if !line.trim().is_empty() {
                    send_one(session, target, line).await?;
                }
            }
        }
    }
    session.client.close();
    Ok(())
}

/// Sends `text` to `target` under a fresh client message id; prints the
/// answer.
async fn send_one(session: &Session, target: Target, text: String) -> anyhow::Result<()> {
    let id = new_client_msg_id()?;
    let body = text.into_bytes();
    let line = match target {
        Target::User(recipient) => {
            let sent = session
                .client
                .send(recipient, &id, body, TEXT_PLAIN)
                .await
                .context("send")?;
            if session.json {
                output::sent_json(&sent, recipient)
            } else {
                output::sent_text(&sent, recipient, &session.names)
            }
        }
        Target::Group(group_id) => {
            let sent = session
                .client
                .send_group(group_id, &id, body, TEXT_PLAIN)
                .await
                .context("send to group")?;
            if session.json {
                output::group_sent_json(&sent, group_id)
            } else {
                output::group_sent_text(&sent, group_id)
            }
        }
    };
    println!("{line}");
    Ok(())
}

async fn sync(session: &mut Session, since: u64, limit: Option<u32>) -> anyhow::Result<()> {
    let entries = match limit {
        Some(limit) => {
            session
                .client
                .sync(since, limit)
                .await
                .context("sync")?
                .entries
        }
        None => session.client.sync_all(since).await.context("sync")?,
    };
    for entry in &entries {
        session.print_entry(entry).await;
    }
    session.client.close();
    Ok(())
}

async fn watch(session: &mut Session, since: Option<u64>) -> anyhow::Result<()> {
    let start = match since {
        Some(since) => since,
        None => session.client.latest_version().await.context("sync")?,
    };
    let mut incoming = session.client.incoming(start);
    // On standard error, so standard output stays one entry per line.
    eprintln!("watching from version {start}; Ctrl-C stops");
    loop {
        tokio::select! {
            entry = incoming.recv() => match entry {
                Some(entry) => session.print_entry(&entry).await,
                None => return session_ended(&session.client),
            },
            _ = tokio::signal::ctrl_c() => {
                session.client.close();
                return Ok(());
            }
        }
    }
}

async fn chat(mut session: Session, peer: &str) -> anyhow::Result<()> {
    let peer_id = session.resolve(peer).await?;
    let start = session.client.latest_version().await.context("sync")?;
    let mut incoming = session.client.incoming(start);
    let client = session.client.clone();
    let json = session.json;
    let me = session.user_id;
    let printer = tokio::spawn(async move {
        while let Some(entry) = incoming.recv().await {
            if entry.sender_id == peer_id && (entry.recipient_id == me || entry.group_id != 0) {
                session.print_entry(&entry).await;
            }
        }
    });
    let mut lines = stdin_lines();
    let outcome = loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let line = match line {
            None => break Ok(()),
            Some(Err(e)) => break Err(anyhow::Error::new(e).context("reading stdin")),
            Some(Ok(line)) => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        if printer.is_finished() {
            break session_ended(&client);
        }
        let id = new_client_msg_id()?;
        match client
            .send(peer_id, &id, line.into_bytes(), TEXT_PLAIN)
            .await
        {
            Ok(sent) if json => println!("{}", output::sent_json(&sent, peer_id)),
            Ok(_) => {}
            Err(e) => break Err(anyhow::Error::new(e).context("send")),
        }
    };
    printer.abort();
    client.close();
    outcome
}

/// The error for an incoming stream that ended: the session is over.
fn session_ended(client: &Client) -> anyhow::Result<()> {
    let reason = client
        .kick()
        .map(|k| {
            let reason = kick::Reason::try_from(k.reason).unwrap_or(kick::Reason::Unspecified);
            format!("{}: {}", reason.as_str_name(), k.message)
        })
        .unwrap_or_else(|| "the session ended".to_string());
    anyhow::bail!("session over: {reason}")
}

async fn show_status(settings: &Settings, admin: Option<String>) -> anyhow::Result<()> {
    let admin = match admin {
        Some(admin) => admin,
        None => {
            let first = settings
                .servers
                .first()
                .ok_or_else(|| UsageError("no server address given".into()))?;
            status::admin_address(first).map_err(|e| UsageError(e.to_string()))?
        }
    };
    let body = status::fetch(&admin).await?;
    if settings.json {
        let value: serde_json::Value =
            serde_json::from_str(&body).context("the status is not JSON")?;
        println!("{value}");
    } else {
        let node: status::NodeStatus =
            serde_json::from_str(&body).context("the status JSON has an unexpected shape")?;
        print!("{}", status::table(&node));
    }
    Ok(())
}

/// The lines of stdin, read by a thread of their own (stdin reads block).
fn stdin_lines() -> mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let failed = line.is_err();
            if tx.blocking_send(line).is_err() || failed {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use fishchat_client::proto::ErrorCode;

    use super::*;

    #[test]
    fn commands_parse_with_their_options() {
        let cli = Cli::try_parse_from(["fishchat", "send", "bob", "hello", "there"]).expect("send");
        match cli.command {
            Command::Send { to, text } => {
                assert_eq!(to, "bob");
                assert_eq!(text, vec!["hello", "there"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from(["fishchat", "sync", "--since", "5"]).expect("sync");
        assert!(matches!(
            cli.command,
            Command::Sync {
                since: 5,
                limit: None
            }
        ));
        assert!(Cli::try_parse_from(["fishchat"]).is_err());
        assert!(Cli::try_parse_from(["fishchat", "chat"]).is_err());
    }

    #[test]
    fn group_commands_parse_with_their_options() {
        let parse = |argv: &[&str]| match Cli::try_parse_from(argv).map(|cli| cli.command) {
            Ok(Command::Group { command }) => command,
            other => panic!("{argv:?} parsed as {other:?}"),
        };
        match parse(&[
            "fishchat",
            "group",
            "create",
            "team",
            "--members",
            "bob,carol",
        ]) {
            GroupCommand::Create { name, members } => {
                assert_eq!(name, "team");
                assert_eq!(members, vec!["bob", "carol"]);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            parse(&["fishchat", "group", "create", "solo"]),
            GroupCommand::Create { members, .. } if members.is_empty()
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "add", "12", "bob", "--admin"]),
            GroupCommand::Add { group: 12, member, admin: true } if member == "bob"
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "remove", "12", "bob"]),
            GroupCommand::Remove { group: 12, .. }
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "leave", "12"]),
            GroupCommand::Leave { group: 12 }
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "dissolve", "12"]),
            GroupCommand::Dissolve { group: 12 }
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "members", "12", "--json"]),
            GroupCommand::Members { group: 12 }
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "list"]),
            GroupCommand::List
        ));
        assert!(matches!(
            parse(&["fishchat", "group", "send", "12", "hi", "all"]),
            GroupCommand::Send { group: 12, text } if text == ["hi", "all"]
        ));
        assert!(Cli::try_parse_from(["fishchat", "group", "add", "team", "bob"]).is_err());
        assert!(Cli::try_parse_from(["fishchat", "group"]).is_err());
    }

    #[test]
    fn a_group_members_username_does_not_replace_the_global_user() {
        for command in ["add", "remove"] {
            let cli =
                Cli::try_parse_from(["fishchat", "--user", "alice", "group", command, "1", "bob"])
                    .expect("parses");
            let settings = Settings::resolve(&cli.global, |_| None);
            assert_eq!(settings.user.as_deref(), Some("alice"), "group {command}");
            match cli.command {
                Command::Group {
                    command: GroupCommand::Add { member, .. } | GroupCommand::Remove { member, .. },
                } => assert_eq!(member, "bob"),
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn an_error_line_leads_with_the_code() {
        let refused = ClientError::Server {
            code: ErrorCode::UnknownUser,
            message: "no user has this name".into(),
            retryable: false,
            retry_after_ms: 0,
        };
        let error = anyhow::Error::new(refused).context("looking up \"bob\"");
        assert_eq!(
            error_line(&error),
            "error: UNKNOWN_USER: looking up \"bob\": no user has this name"
        );
        let error = anyhow::Error::new(ClientError::Timeout);
        assert_eq!(
            error_line(&error),
            "error: CLIENT_TIMEOUT: no answer within the request timeout"
        );
        let other = anyhow::anyhow!("reading stdin");
        assert_eq!(error_line(&other), "error: reading stdin");
    }

    #[test]
    fn usage_errors_exit_2_and_client_errors_exit_1() {
        let usage = anyhow::Error::new(UsageError("missing --user".into()));
        assert_eq!(report(&usage), ExitCode::from(2));
        let failed = anyhow::Error::new(ClientError::Timeout).context("send");
        assert_eq!(report(&failed), ExitCode::from(1));
    }
}
