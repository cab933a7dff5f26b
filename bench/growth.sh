#!/usr/bin/env bash
# How gatecast's cost grows (issue 18): deliveries/s, push-to-last-delivery
# latency, server CPU per delivery and the nodes' RSS as one dimension
# moves, the others fixed (fresh nodes and a flushed Redis for every run;
# every push one HTTP call, 16 callers in total):
#   nodes    1, 2, 3 nodes over Redis, clients and API calls spread over all
#            of them (round robin, as a Service spreads them);
#            2 groups of 1,000, 1,000 pushes per group, 100 B, open loop
#   groups   2 nodes; 1 group of 10,000 (100 pushes) against 10,000
#            groups of 1 (2 pushes each), 100 B, --window 4 (clients on
#            node A, 10,000 in both; calls through the last node's API)
#   size     2 nodes; 2 groups of 1,000, 100 B / 4 KiB / 64 KiB (1,000 /
#            200 / 50 pushes per group), --window 4
# Prints one JSON line per run, then a table.
#
# Needs: cargo build --release -p gatecast -p gatecast-bench; redis-server.
# usage: [DIMENSIONS="nodes groups size"] [PORT_BASE=9380] [RPORT=6397] \
#        [NET=60] [SCALE=1] bench/growth.sh
# Node k (0, 1, 2) listens on PORT_BASE+10k (WebSocket) and PORT_BASE+10k+1
# (API). SCALE divides every push count (SCALE=10 for a quick look).
set -u
cd "$(dirname "$0")/.."
GC=${GC:-./target/release/gatecast}
BENCH=${BENCH:-./target/release/gatecast-bench}
RPORT=${RPORT:-6397}
PORT_BASE=${PORT_BASE:-9380}
DIMENSIONS=${DIMENSIONS:-"nodes groups size"}
SCALE=${SCALE:-1}
net=${NET:-60}
results=$(mktemp)

if redis-cli -p "$RPORT" ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
redis-server --port "$RPORT" --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & rpid=$!
PIDS=()
trap 'kill "${PIDS[@]}" $rpid 2>/dev/null; rm -f "$results"' EXIT
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
RURL=redis://127.0.0.1:$RPORT

start() { # nodes
  local gc=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off --log-level error --redis-url "$RURL")
  PIDS=(); ADDRS=(); APIS=(); API=""
  for k in $(seq 0 $(($1 - 1))); do
    local ws=$((PORT_BASE + 10 * k)) api=$((PORT_BASE + 10 * k + 1))
    $GC --listen 127.0.0.1:$ws --api-listen 127.0.0.1:$api "${gc[@]}" & PIDS+=($!)
    ADDRS+=(127.0.0.1:$ws); APIS+=(127.0.0.1:$api); API=127.0.0.1:$api
  done
  for k in $(seq 0 $(($1 - 1))); do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$((PORT_BASE + 10 * k + 1))/readyz" >/dev/null && break; sleep 0.1; done
  done
}

stop() {
  kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
  PIDS=()
  redis-cli -p "$RPORT" FLUSHALL >/dev/null
}

run() { # label nodes clients-on-all(yes/no) fanout-args...
  local label=$1 nodes=$2 spread=$3; shift 3
  start "$nodes"
  local pids addrs api=$API; pids=$(IFS=,; echo "${PIDS[*]}")
  if [ "$spread" = yes ]; then
    addrs=$(IFS=,; echo "${ADDRS[*]}"); api=$(IFS=,; echo "${APIS[*]}")
  else addrs=${ADDRS[0]}; fi
  net=$(( net % 200 + 1 ))
  local line
  line=$("$BENCH" --source-net $net fanout --pid "$pids" --addr "$addrs" --api "$api" --callers 16 "$@" | tail -1)
  stop
  local out="{\"run\":\"$label\",\"nodes\":$nodes,\"at\":\"$(date -u +%FT%TZ)\",\"load1\":$(cut -d' ' -f1 /proc/loadavg),\"result\":${line:-null}}"
  echo "$out"; echo "$out" >> "$results"
}

n() { echo $(( $1 / SCALE > 0 ? $1 / SCALE : 1 )); }

for d in $DIMENSIONS; do
  case $d in
    nodes)
      for nodes in 1 2 3; do
        run "nodes=$nodes" $nodes yes --groups 2 --group-size 1000 --pushes "$(n 1000)" --size 100
      done ;;
    groups)
      run "groups=1" 2 no --groups 1 --group-size 10000 --pushes "$(n 100)" --size 100 --window 4
      run "groups=10000" 2 no --groups 10000 --group-size 1 --pushes "$(n 2)" --size 100 --window 4 ;;
    size)
      run "size=100" 2 no --groups 2 --group-size 1000 --pushes "$(n 1000)" --size 100 --window 4
      run "size=4096" 2 no --groups 2 --group-size 1000 --pushes "$(n 200)" --size 4096 --window 4
      run "size=65536" 2 no --groups 2 --group-size 1000 --pushes "$(n 50)" --size 65536 --window 4 ;;
  esac
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print("| run | nodes | pushes/s | deliveries/s | push to last delivery p50 / p99 ms | server CPU per delivery µs | nodes' RSS MiB | lost |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    x = r["result"]
    if not x:
        print(f"| {r['run']} | {r['nodes']} | — | — | — | — | — | — |")
        continue
    print(f"| {r['run']} | {r['nodes']} | {x['pushes_per_s']:,.0f} | {x['deliveries_per_s']:,.0f} | "
          f"{x['latency_p50_ms']:.2f} / {x['latency_p99_ms']:.2f} | {x['server_cpu_us_per_delivery']:.2f} | "
          f"{x['server_rss_kib'] / 1024:.0f} | {x['lost']} |")
PY
