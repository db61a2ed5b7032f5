#!/usr/bin/env bash
# Runs every FishChat test. This is the README's test command and what CI runs.
#
# Builds share one target directory outside the clone (RocksDB's C++ takes a
# quarter of an hour to build cold on two cores); set CARGO_TARGET_DIR to move it.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fishchat/target}"
mkdir -p "$CARGO_TARGET_DIR"
scripts/setup.sh

cargo test --workspace --locked
