#!/usr/bin/env bash
# FishChat beside etcd on this machine, in one run: starts a fresh
# three-node FishChat cluster and a three-member etcd cluster (both on
# 127.0.0.1, both stopped at the end), then for each concurrency level
# measures FishChat's acknowledged durable messages/s (`fishchat bench send`)
# and etcd's durable puts/s (the shared baseline's put bench, leader only),
# back to back, and prints one table with the FishChat/etcd ratios.
#
#   scripts/bench.sh [--levels "1 16 64 256"] [--seconds 15] [--size 256]
#                    [--sessions 50000] [--failover-trials 5] [--shards 16]
#
# --shards sets the new FishChat cluster's shard count (default: the node's
# default, 16; docs/performance.md shows what fewer shards do).
# Then, on the same FishChat cluster, `fishchat bench connect` (sessions held
# and memory per session; --sessions 0 skips it) and `fishchat bench
# failover` (the longest acknowledgement gap when a shard's leader is
# killed; --failover-trials 0 skips it).
#
# Installs etcd (Debian etcd-server, etcd-client) when missing. The etcd
# scripts come from FISHCHAT_BASELINES (default ../shared/baselines beside
# the repository). Reports go to bench-runs/<time>/. See docs/performance.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fishchat/target}"

levels="1 16 64 256"
seconds=15
size=256
sessions=50000
failover_trials=5
while [ $# -gt 0 ]; do
  case "$1" in
    --levels) levels=${2:?}; shift 2 ;;
    --seconds) seconds=${2:?}; shift 2 ;;
    --size) size=${2:?}; shift 2 ;;
    --sessions) sessions=${2:?}; shift 2 ;;
    --failover-trials) failover_trials=${2:?}; shift 2 ;;
    --shards) export FISHCHAT_SHARDS=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

baselines=${FISHCHAT_BASELINES:-$root/../shared/baselines}
[ -x "$baselines/etcd_cluster.sh" ] || { echo "bench.sh: no etcd baseline scripts in $baselines (set FISHCHAT_BASELINES)" >&2; exit 1; }
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  echo "bench.sh: installing etcd (etcd-server, etcd-client)" >&2
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq etcd-server etcd-client >/dev/null \
    || { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq etcd-server etcd-client >/dev/null; }
fi

out="bench-runs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
work=$(mktemp -d)
export FISHCHAT_DATA="$work/fishchat" FISHCHAT_BASE_PORT=7300
fishchat_servers="127.0.0.1:7301,127.0.0.1:7302,127.0.0.1:7303"
etcd_endpoints="http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793"
cleanup() {
  scripts/cluster.sh stop >/dev/null 2>&1 || true
  "$baselines/etcd_cluster.sh" stop "$work/etcd" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

scripts/cluster.sh start
"$baselines/etcd_cluster.sh" start "$work/etcd" >/dev/null
fishchat="$CARGO_TARGET_DIR/release/fishchat"
# Register every bench user once, before anything is measured.
max_level=$(tr ' ' '\n' <<<"$levels" | sort -n | tail -1)
"$fishchat" --server "$fishchat_servers" --ca "$FISHCHAT_DATA/ca.pem" \
  bench send --clients 1 --count 1 --users $((max_level * 2)) --size "$size" >/dev/null

for c in $levels; do
  echo "== $c concurrent: FishChat" >&2
  "$fishchat" --server "$fishchat_servers" --ca "$FISHCHAT_DATA/ca.pem" \
    bench send --clients "$c" --duration "${seconds}s" --size "$size" --users $((max_level * 2)) \
    --report "$out/fishchat-$c.json" >&2
  echo "== $c concurrent: etcd" >&2
  python3 "$baselines/etcd_put_bench.py" --endpoints "$etcd_endpoints" --target-leader \
    --clients "$c" --total 100000000 --seconds "$seconds" --val-size "$size" | tee "$out/etcd-$c.txt" >&2
done

python3 - "$out" $levels <<'PY' | tee "$out/table.md"
import json, re, sys
out, levels = sys.argv[1], sys.argv[2:]
print("| senders | FishChat msgs/s | etcd puts/s | ratio | FishChat p50 ms | etcd p50 ms | ratio | FishChat p99 ms | etcd p99 ms | ratio | FishChat node CPU ms per 1,000 msgs | FishChat entries applied per msg | FishChat append exchanges per msg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
rows = []
for c in levels:
    f = json.load(open(f"{out}/fishchat-{c}.json"))
    e = open(f"{out}/etcd-{c}.txt").read()
    num = lambda name: float(re.search(name + r"=([0-9.]+)", e).group(1))
    ef, ep50, ep99 = num("ops/s"), num("p50"), num("p99")
    ff, fp50, fp99 = f["acked_per_sec"], f["latency"]["p50_ms"], f["latency"]["p99_ms"]
    r = lambda a, b: f"{a / b:.2f}" if b else "-"
    w = f.get("nodes")
    fw = lambda key, fmt: format(w[key], fmt) if w else "-"
    print(f"| {c} | {ff:.0f} | {ef:.0f} | {r(ff, ef)} | {fp50:.2f} | {ep50:.2f} | {r(fp50, ep50)} | {fp99:.2f} | {ep99:.2f} | {r(fp99, ep99)} "
          f"| {fw('cpu_ms_per_1000_requests', '.0f')} | {fw('applies_per_request', '.2f')} | {fw('append_exchanges_per_request', '.2f')} |")
PY

if [ "$sessions" -gt 0 ]; then
  echo "== connect: $sessions sessions" >&2
  "$fishchat" --server "$fishchat_servers" --ca "$FISHCHAT_DATA/ca.pem" \
    bench connect --sessions "$sessions" --users 100 --hold 10s --report "$out/connect.json" \
    | tee "$out/connect.txt"
fi
if [ "$failover_trials" -gt 0 ]; then
  echo "== failover: $failover_trials trials" >&2
  "$fishchat" --server "$fishchat_servers" --ca "$FISHCHAT_DATA/ca.pem" \
    bench failover --trials "$failover_trials" \
    --kill-cmd "scripts/cluster.sh kill {node}" --start-cmd "scripts/cluster.sh start-node {node}" \
    --report "$out/failover.json" | tee "$out/failover.txt"
fi
echo "reports in $out" >&2
