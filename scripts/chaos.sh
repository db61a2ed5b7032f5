#!/usr/bin/env bash
# Runs one long chaos session: a fresh cluster of real nodes (on loopback,
# stopped at the end), clients sending one-to-one and group messages, and a
# nemesis killing, freezing and partitioning nodes on a seeded schedule; then
# the checker judges every inbox against what clients were told.
#
#   scripts/chaos.sh [--duration 10m] [--seed S] [--nodes 3|5] [--clients N] [--out DIR]
#
# Prints progress while it runs and a summary at the end; writes report.json,
# summary.txt, history.jsonl, observed.json and the node logs into DIR
# (default chaos-runs/seed-S in the repository). Exits 1 when a guarantee was broken. Builds the release
# profile, the same build as `scripts/cluster.sh start`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
caller=$PWD
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fishchat/target}"

seed=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed=${2:?--seed needs a value}; shift 2 ;;
    --out)
      out=${2:?--out needs a value}
      case "$out" in /*) ;; *) out="$caller/$out" ;; esac
      args+=(--out "$out"); shift 2 ;;
    --duration | --nodes | --clients | --shards)
      args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "chaos.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
seed=${seed:-$(date +%s)}
case " ${args[*]-} " in
  *" --out "*) ;;
  *) args+=(--out "chaos-runs/seed-$seed") ;;
esac

scripts/setup.sh
echo "building (release profile; the first build takes a while)..." >&2
cargo build --locked --workspace --bins --release >&2
exec "$CARGO_TARGET_DIR/release/fishchat-chaos" --seed "$seed" "${args[@]}"
