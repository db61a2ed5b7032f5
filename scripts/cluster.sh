#!/usr/bin/env bash
# Runs a three-node FishChat cluster on this machine, on 127.0.0.1.
#
#   scripts/cluster.sh start          build if needed, start nodes 1-3, wait for every shard's leader
#   scripts/cluster.sh stop           SIGTERM every node (SIGKILL after 15 s)
#   scripts/cluster.sh status         each node's view of every shard
#   scripts/cluster.sh kill N         SIGKILL node N
#   scripts/cluster.sh start-node N   start node N on its data directory
#   scripts/cluster.sh restart N      stop node N, start it again
#   scripts/cluster.sh logs N         the last lines of node N's log
#   scripts/cluster.sh clean          stop every node and delete the data
#
# FISHCHAT_DATA (default data/ in the repository) holds each node's data, log and pid
# file, and the cluster's keys: ca.pem (the CA clients trust), node.pem/node.key and
# token.key, made once by `fishchat-node init` on the first start.
# FISHCHAT_BASE_PORT (default 7100) moves every port: node N listens for
# clients on BASE+N (QUIC), for peers on BASE+10+N, for operators on BASE+20+N.
# FISHCHAT_PROFILE (default release) is the cargo profile to build and run.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
data=${FISHCHAT_DATA:-$root/data}
base=${FISHCHAT_BASE_PORT:-7100}
profile=${FISHCHAT_PROFILE:-release}
nodes=(1 2 3)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fishchat/target}"

case "$profile" in
  dev | debug) bindir="$CARGO_TARGET_DIR/debug" ;;
  *) bindir="$CARGO_TARGET_DIR/$profile" ;;
esac
bin="$bindir/fishchat-node"

die() { echo "cluster.sh: $*" >&2; exit 1; }

check_node() {
  [[ "${1:-}" =~ ^[123]$ ]] || die "node must be 1, 2 or 3 (got '${1:-}')"
}

build() {
  "$root/scripts/setup.sh"
  echo "building fishchat-node ($profile profile; the first build takes a while)..." >&2
  case "$profile" in
    # The same unit graph as scripts/test.sh, so both share one RocksDB build.
    dev | debug) (cd "$root" && cargo build --locked --workspace --all-targets >&2) ;;
    *) (cd "$root" && cargo build --locked --workspace --bins --profile "$profile" >&2) ;;
  esac
}

pid_of() {
  local file="$data/node$1.pid"
  [ -f "$file" ] || return 1
  local pid
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null || return 1
  # A stale pid file may name a process that reused the pid: check it is ours.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "fishchat-node --node-id $1 " || return 1
  echo "$pid"
}

# GET http://127.0.0.1:PORT/PATH with bash alone (no curl needed); prints the body.
http_get() {
  local port=$1 path=$2
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3
    sed "1,/^\r$/d" <&3' _ "$port" "$path"
}

start_node() {
  local n=$1
  if pid=$(pid_of "$n"); then
    echo "node $n is already running (pid $pid)"
    return 0
  fi
  [ -x "$bin" ] || die "$bin is missing: run 'scripts/cluster.sh start' to build it"
  mkdir -p "$data"
  "$bin" init --dir "$data" >/dev/null
  FISHCHAT_LOG=${FISHCHAT_LOG:-info,openraft=warn} \
    nohup "$bin" --node-id "$n" --data-dir "$data/node$n" --base-port "$base" \
    >>"$data/node$n.log" 2>&1 </dev/null &
  echo $! >"$data/node$n.pid"
  echo "node $n started (pid $!, admin http://127.0.0.1:$((base + 20 + n)))"
}

stop_node() {
  local n=$1 pid
  if ! pid=$(pid_of "$n"); then
    echo "node $n is not running"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do
    kill -0 "$pid" 2>/dev/null || { echo "node $n stopped"; rm -f "$data/node$n.pid"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$data/node$n.pid"
  echo "node $n did not stop in 15 s: killed"
}

# Waits until every running node reports a leader for every shard.
wait_ready() {
  local deadline=$((SECONDS + 90)) n body
  for n in "${nodes[@]}"; do
    while :; do
      # The pid file's process, even before it has exec'd the node binary.
      kill -0 "$(cat "$data/node$n.pid" 2>/dev/null || echo none)" 2>/dev/null || {
        tail -n 20 "$data/node$n.log" >&2
        die "node $n is not running (its log ends above)"
      }
      body=$(http_get $((base + 20 + n)) /status 2>/dev/null || true)
      if grep -q "\"node\":$n," <<<"$body" && ! grep -q '"leader":null' <<<"$body" \
        && grep -q '"shards":\[{' <<<"$body"; then
        break
      fi
      [ $SECONDS -lt $deadline ] || die "node $n: not every shard has a leader after 90 s (see scripts/cluster.sh logs $n)"
      sleep 0.5
    done
  done
}

status() {
  local n body
  for n in "${nodes[@]}"; do
    local port=$((base + 20 + n))
    if ! pid=$(pid_of "$n"); then
      echo "node $n: down"
      continue
    fi
    body=$(http_get "$port" /status 2>/dev/null || true)
    if [ -z "$body" ]; then
      echo "node $n: running (pid $pid), admin port $port not answering"
      continue
    fi
    if command -v python3 >/dev/null; then
      python3 - "$body" <<'PY' || echo "node $n: unexpected /status answer"
import json, sys
d = json.loads(sys.argv[1])
lead = sum(1 for s in d['shards'] if s['role'] == 'leader')
print(f"node {d['node']}: up, leads {lead} of {len(d['shards'])} shards, {d['wal_syncs']} WAL syncs")
print("  shard role       leader term  applied digest")
for s in d['shards']:
    print(f"  {s['shard']:>5} {s['role']:<10} {str(s['leader']):>6} {s['term']:>4} {s['applied']:>8} {s['digest']}")
PY
    else
      echo "node $n: up"
      echo "$body"
    fi
  done
}

cmd=${1:-}
case "$cmd" in
  start)
    build
    for n in "${nodes[@]}"; do start_node "$n"; done
    wait_ready
    echo
    echo "cluster is up: every shard has a leader. For clients:"
    echo "  export FISHCHAT_SERVER=127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
    echo "  export FISHCHAT_CA=$data/ca.pem"
    echo "  export PATH=\"$bindir:\$PATH\"   # the fishchat client"
    ;;
  stop) for n in "${nodes[@]}"; do stop_node "$n"; done ;;
  status) status ;;
  kill)
    check_node "${2:-}"
    if pid=$(pid_of "$2"); then kill -KILL "$pid"; rm -f "$data/node$2.pid"; echo "node $2 killed"; else echo "node $2 is not running"; fi
    ;;
  start-node) check_node "${2:-}"; start_node "$2" ;;
  restart) check_node "${2:-}"; stop_node "$2"; start_node "$2" ;;
  logs) check_node "${2:-}"; tail -n "${LINES:-100}" "$data/node$2.log" ;;
  clean)
    for n in "${nodes[@]}"; do stop_node "$n"; done
    rm -rf "$data"
    echo "removed $data"
    ;;
  *)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [ -z "$cmd" ] || exit 2
    ;;
esac
