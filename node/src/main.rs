//! `fishchat-node`: runs one node until SIGTERM or Ctrl-C.

use std::io::IsTerminal;

use clap::Parser;
use fishchat_node::config::Flags;
use fishchat_node::{Node, Settings};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

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
