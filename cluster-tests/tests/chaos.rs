//! The short chaos run of every test pass: clients send one-to-one and group
//! messages while the nemesis kills one node, a majority or every node,
//! freezes one, cuts one off the network and cuts the busiest leader from
//! the majority, on a schedule drawn from a seed; the recorded history is
//! then judged against every inbox read through every node (G1, G2, G3, G5,
//! G6 and replica agreement). `scripts/chaos.sh` runs long ones.
//!
//! `FISHCHAT_CHAOS_SEED` picks the schedule (default 1);
//! `FISHCHAT_CHAOS_SECS` the length of the sending phase (default 60).

use std::time::Duration;

use anyhow::ensure;
use fishchat_cluster_tests::chaos::{run, ChaosConfig, FaultKind};

mod common;

use common::{one_cluster_at_a_time, SHARDS};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn acknowledged_messages_survive_kills_freezes_and_partitions_on_a_seeded_schedule(
) -> anyhow::Result<()> {
    let _one = one_cluster_at_a_time();
    let out = tempfile::tempdir()?;
    let config = ChaosConfig {
        seed: env_u64("FISHCHAT_CHAOS_SEED", 1),
        duration: Duration::from_secs(env_u64("FISHCHAT_CHAOS_SECS", 60)),
        nodes: 3,
        clients: 6,
        shards: SHARDS,
        out_dir: out.path().to_path_buf(),
        progress: false,
    };
    let result = run(&config);
    if !matches!(&result, Ok(report) if report.passed) {
        // Keep the history, the final state and the logs for a post-mortem.
        let kept = out.keep();
        println!("chaos: files kept in {}", kept.display());
    }
    let report = result?;
    println!("{}", report.summary());
    ensure!(report.passed, "the chaos run found violations (above)");
    ensure!(
        report.faults_by_kind.len() == FaultKind::ALL.len(),
        "every kind of fault was injected: {:?}",
        report.faults_by_kind
    );
    ensure!(
        report.counts.ok > 100,
        "the workload made progress: {:?}",
        report.counts
    );
    Ok(())
}
