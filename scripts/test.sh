#!/usr/bin/env bash
# Runs every FishChat test. This is the README's test command and what CI runs.
#
# Builds share one target directory outside the clone (RocksDB's C++ takes a
# quarter of an hour to build cold on two cores); set CARGO_TARGET_DIR to move it.
# Ends with one line totalling every test binary: "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fishchat/target}"
mkdir -p "$CARGO_TARGET_DIR"
scripts/setup.sh

log=$(mktemp)
trap 'rm -f "$log"' EXIT

status=0
# Build every target first: cluster-tests run the fishchat-node binary itself.
cargo build --workspace --all-targets --locked 2>&1 | tee "$log" || status=$?
if [ "$status" -eq 0 ]; then
  cargo test --workspace --locked --no-fail-fast 2>&1 | tee -a "$log" || status=$?
fi

passed=$(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(sed -n 's/^test result: [a-zA-Z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\2/p' "$log" | awk '{s+=$1} END {print s+0}')
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  # The build or a test binary failed before reporting.
  failed=1
fi
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
