//! Write throughput and latency of a three-host loopback cluster with 16
//! groups, with 1 and with 256 concurrent writers.
//!
//! Run: `cargo bench -p fishchat-raft` (release build), or
//! `cargo bench -p fishchat-raft --profile dev` to reuse the test build.
//! `FISHCHAT_BENCH_WRITES` sets the writes per phase (default 20000; the
//! single-writer phase does a tenth of it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{test_timing, write_many, Cluster};
use hdrhistogram::Histogram;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let writes: usize = std::env::var("FISHCHAT_BENCH_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let cluster = Cluster::start(3, 16, test_timing()).await?;
    println!("three hosts, 16 groups, loopback gRPC, RocksDB with group commit");
    let mut first = 0;
    for (writers, count) in [(1usize, (writes / 10).max(100)), (256, writes)] {
        let stats = cluster.host(0)?.storage_stats();
        let syncs_before = stats.wal_syncs.load(Ordering::Relaxed);
        let synced_before = stats.synced_writes.load(Ordering::Relaxed);
        let started = Instant::now();
        let latencies = write_many(cluster.live(), &cluster.groups, first, count, writers).await?;
        let elapsed = started.elapsed();
        first += count;
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for latency in &latencies {
            histogram.record(latency.as_micros().clamp(1, 60_000_000) as u64)?;
        }
        let syncs = stats.wal_syncs.load(Ordering::Relaxed) - syncs_before;
        let synced = stats.synced_writes.load(Ordering::Relaxed) - synced_before;
        println!(
            "writers={writers:>3} writes={count:>6} elapsed={:>6.2}s throughput={:>8.0} writes/s \
             p50={:>7.2}ms p99={:>7.2}ms max={:>7.2}ms node1: wal_syncs={syncs} syncs_covered={synced} ({:.1} per sync)",
            elapsed.as_secs_f64(),
            count as f64 / elapsed.as_secs_f64(),
            ms(histogram.value_at_quantile(0.50)),
            ms(histogram.value_at_quantile(0.99)),
            ms(histogram.max()),
            if syncs == 0 { 0.0 } else { synced as f64 / syncs as f64 },
        );
    }
    for host in cluster.live() {
        host.shutdown().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}
