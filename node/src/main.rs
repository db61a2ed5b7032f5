//! `fishchat-node`: runs one node until SIGTERM or Ctrl-C.
//!
//! `fishchat-node init --dir DIR` instead creates the cluster's keys (CA,
//! node certificate, token key) in DIR once, before the first start.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Parser;
use fishchat_node::config::Flags;
use fishchat_node::{tls, Node, Settings};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// mimalloc, not the system allocator: see docs/dependencies.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `fishchat-node init`: creates a cluster's keys.
#[derive(Parser)]
#[command(name = "fishchat-node init")]
struct Init {
    /// Where to put ca.pem, ca.key, node.pem, node.key and token.key.
    #[arg(long, env = "FISHCHAT_DATA", default_value = "data")]
    dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("FISHCHAT_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn")),
        )
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().nth(1).as_deref() == Some("init") {
        let init = Init::parse_from(std::env::args().skip(1));
        if tls::init(&init.dir)? {
            println!("created the cluster's keys in {}", init.dir.display());
        } else {
            println!("the cluster's keys exist in {}", init.dir.display());
        }
        return Ok(());
    }
    let settings = Settings::resolve(Flags::parse())?;
    // Registered before starting, so a SIGTERM during start-up is a clean stop too.
    let mut terminate = signal(SignalKind::terminate())?;
    let node = Node::start(settings).await?;
    tokio::select! {
        _ = terminate.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    tracing::info!("stop signal received");
    node.shutdown().await;
    Ok(())
}
