#!/usr/bin/env bash
# Issue 33, the speed work: gatecast builds or settings side by side, each
# paired with the bare-Rust limit server in the same moment (a shared box
# drifts; compare only within a pair), alternating variants every repeat:
#   max       bench/side-by-side.sh's broadcast (5,000 clients, 400
#             send_to_all, 100 B, open loop) for `limit` and `gc-redis1`,
#             CALLERS "4 16": deliveries/s, server CPU per delivery
#   rate      one Redis-engine node, 5,000 clients, send_to_all at a fixed
#             RATE a second (default 50: 250,000 deliveries/s) for 10 s,
#             16 callers: push to last delivery p50/p99, CPU per delivery
#   cross     two Redis-engine nodes, 1,000 clients on node A bound to
#             uids, send_to_uid through node B's API at a fixed
#             UNI_RATE a second (default 1,000) for 10 s, 16 callers:
#             push-to-frame p50/p99 (HTTP call to B to frame read on A)
# VARIANTS: space-separated name=binary:write-delay, e.g.
#   "base=/tmp/gatecast-base:0s new=./target/release/gatecast:0s \
#    delay1=./target/release/gatecast:1ms"
# (a build without --write-delay ignores GATECAST_WRITE_DELAY).
# Prints one JSON line per run, with "variant", "part" and the load average.
#
# Needs: cargo build --release -p gatecast -p gatecast-bench;
#        (cd bench/peers/limit && cargo build --release); redis-server.
# usage: VARIANTS=... [PARTS="max rate cross"] [REPEATS=2] [RATE=50]
#        [UNI_RATE=1000] [PORT_BASE=9740] [RPORT=6474] [NET=140]
#        bench/coalesce.sh
set -u
cd "$(dirname "$0")/.."
BENCH=${BENCH:-./target/release/gatecast-bench}
VARIANTS=${VARIANTS:?"VARIANTS=\"name=binary:delay ...\""}
PARTS=${PARTS:-"max rate cross"}
REPEATS=${REPEATS:-2}
RATE=${RATE:-50}
UNI_RATE=${UNI_RATE:-1000}
PORT_BASE=${PORT_BASE:-9740}
RPORT=${RPORT:-6474}
net=${NET:-140}
A_WS=$PORT_BASE; A_API=$((PORT_BASE + 1)); B_WS=$((PORT_BASE + 10)); B_API=$((PORT_BASE + 11))
RURL=redis://127.0.0.1:$RPORT
PIDS=(); rpid=
trap 'kill "${PIDS[@]}" $rpid 2>/dev/null' EXIT

start_redis() {
  redis-server --port "$RPORT" --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & rpid=$!
  for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
}

start_nodes() { # binary delay nodes
  local gc=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off --log-level error --redis-url "$RURL")
  PIDS=()
  GATECAST_WRITE_DELAY=$2 $1 --listen 127.0.0.1:$A_WS --api-listen 127.0.0.1:$A_API "${gc[@]}" & PIDS+=($!)
  [ "$3" = 2 ] && { GATECAST_WRITE_DELAY=$2 $1 --listen 127.0.0.1:$B_WS --api-listen 127.0.0.1:$B_API "${gc[@]}" & PIDS+=($!); }
  for api in $A_API $([ "$3" = 2 ] && echo $B_API); do
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$api/readyz" >/dev/null && break; sleep 0.1; done
  done
}

stop_nodes() {
  kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
  PIDS=()
  redis-cli -p "$RPORT" FLUSHALL >/dev/null
}

emit() { # variant part json
  local load; load=$(cut -d' ' -f1-3 /proc/loadavg)
  echo "{\"variant\":\"$1\",\"part\":\"$2\",\"at\":\"$(date -u +%FT%TZ)\",\"load\":\"$load\",\"result\":${3:-null}}"
}

for r in $(seq "$REPEATS"); do
  for v in $VARIANTS; do
    name=${v%%=*}; rest=${v#*=}; bin=${rest%:*}; delay=${rest##*:}
    for part in $PARTS; do
      case $part in
        max)
          # Its own Redis and ports: side-by-side.sh starts both, and
          # refuses to start while the last one's Redis is still stopping.
          for _ in $(seq 50); do redis-cli -p $((RPORT + 1)) ping >/dev/null 2>&1 || break; sleep 0.1; done
          GC=$bin GATECAST_WRITE_DELAY=$delay SETUPS="limit gc-redis1" SCENARIOS=broadcast REPEATS=1 \
            RATIOS="gc-redis1/limit" PORT_BASE=$((PORT_BASE + 20)) RPORT=$((RPORT + 1)) NET=$(( net % 200 + 1 )) \
            LIMIT=${LIMIT:-bench/peers/limit/target/release/limit-server} BENCH=$BENCH \
            bench/side-by-side.sh 2>/dev/null | grep '^{' | while read -r line; do emit "$name" max "$line"; done
          net=$(( (net + 4) % 200 + 1 )) ;;
        rate)
          start_redis; start_nodes "$bin" "$delay" 1
          net=$(( net % 200 + 1 ))
          out=$("$BENCH" --source-net $net broadcast --pid "${PIDS[0]}" --addr 127.0.0.1:$A_WS --api 127.0.0.1:$A_API \
            --callers 16 --clients 5000 --pushes $((RATE * 10)) --size 100 --rate "$RATE" | tail -1)
          stop_nodes; kill $rpid; wait $rpid 2>/dev/null
          emit "$name" rate "$out" ;;
        cross)
          start_redis; start_nodes "$bin" "$delay" 2
          net=$(( net % 200 + 1 ))
          out=$("$BENCH" --source-net $net unicast --pid "${PIDS[0]},${PIDS[1]}" --addr 127.0.0.1:$A_WS --api 127.0.0.1:$B_API \
            --callers 16 --clients 1000 --rate "$UNI_RATE" --seconds 10 --size 100 | tail -1)
          stop_nodes; kill $rpid; wait $rpid 2>/dev/null
          emit "$name" cross "$out" ;;
      esac
    done
  done
done
