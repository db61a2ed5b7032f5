//! `fishchat-chaos`: one long chaos session against a cluster of real nodes
//! it starts itself; `scripts/chaos.sh` builds and runs it. Prints progress
//! while it runs, then the summary; writes `report.json`, `summary.txt`,
//! `history.jsonl` and `observed.json` into `--out`. Exits 1 when a check
//! failed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use fishchat_cluster_tests::chaos::{run, ChaosConfig};
use fishchat_cluster_tests::kill_every_node;

/// Runs a chaos session and judges it.
#[derive(Parser, Debug)]
#[command(name = "fishchat-chaos")]
struct Args {
    /// How long clients send under faults: `90s`, `10m`, `1h` or seconds.
    #[arg(long, default_value = "10m")]
    duration: String,
    /// Seed of the fault schedule and the workload [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes in the cluster: 3 or 5.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Concurrent clients, one user each (at least 4).
    #[arg(long, default_value_t = 12)]
    clients: u64,
    /// Shards of the cluster.
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// Where to write the report [default: ./chaos-<seed>].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Parses `90s`, `10m`, `1h` or a plain number of seconds.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .with_context(|| format!("duration {text:?}: expected e.g. 90s, 10m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => bail!("duration {text:?}: unknown unit {other:?} (s, m or h)"),
    };
    if secs < 20 {
        bail!("duration {text:?}: a run sends for at least 20 s");
    }
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = match args.seed {
        Some(seed) => seed,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    };
    let config = ChaosConfig {
        seed,
        duration: parse_duration(&args.duration)?,
        nodes: args.nodes,
        clients: args.clients,
        shards: args.shards,
        out_dir: args
            .out
            .unwrap_or_else(|| PathBuf::from(format!("chaos-{seed}"))),
        progress: true,
    };
    eprintln!(
        "chaos: seed {seed}, {} nodes, {} clients, {} s of faults; files in {}",
        config.nodes,
        config.clients,
        config.duration.as_secs(),
        config.out_dir.display()
    );
    stop_nodes_on_signal()?;
    let report = run(&config)?;
    println!("{}", report.summary());
    println!("report: {}", config.out_dir.join("report.json").display());
    if !report.passed {
        std::process::exit(1);
    }
    Ok(())
}

/// On Ctrl-C or SIGTERM, kills the run's nodes and exits (130): a run
/// stopped half-way leaves nothing running.
fn stop_nodes_on_signal() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("\nchaos: stopped by a signal; killing the nodes");
            kill_every_node();
            std::process::exit(130);
        });
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_refuse_nonsense() {
        assert_eq!(parse_duration("90s").ok(), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m").ok(), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h").ok(), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("45").ok(), Some(Duration::from_secs(45)));
        for bad in ["", "m", "10x", "5s", "-3m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
