#!/usr/bin/env bash
# The side-by-side benchmark of issue 18: the same scenarios, same load
# generator and the same HTTP push API shape against
#   limit      the bare-Rust limit server (bench/peers/limit: 1 node, no Redis)
#   node1      the Node.js ws + Redis peer (bench/peers/node), 1 node
#   node2      the same, 2 nodes (clients on A, API calls to B)
#   gc-memory  gatecast, in-process engine
#   gc-redis1  gatecast, Redis engine, 1 node
#   gc-redis2  gatecast, 2 nodes over Redis (clients on A, API calls to B)
#   gw1        GatewayWorker (PHP, bench/peers/gatewayworker), 1 gateway
#   gw2        the same, 2 gateways (clients on A, API calls to B)
# with fresh processes (and a flushed Redis) for every scenario. Prints one
# JSON line per run, then a markdown table (medians over REPEATS).
#
# Needs: cargo build --release -p gatecast -p gatecast-bench;
#        (cd bench/peers/limit && cargo build --release);
#        (cd bench/peers/node && npm ci); redis-server on PATH;
#        for gw1/gw2: php (pcntl, posix, sockets), bench/peers/gatewayworker/setup.sh.
# usage: [SETUPS="limit gc-redis1"] [SCENARIOS="idle fanout"] [REPEATS=1] \
#        [RPORT=6396] [NET=20] bench/side-by-side.sh
set -u
cd "$(dirname "$0")/.."
GC=${GC:-./target/release/gatecast}
LIMIT=${LIMIT:-bench/peers/limit/target/release/limit-server}
BENCH=${BENCH:-./target/release/gatecast-bench}
RPORT=${RPORT:-6396}
SETUPS=${SETUPS:-"limit node1 node2 gc-memory gc-redis1 gc-redis2"}
SCENARIOS=${SCENARIOS:-"idle fanout broadcast unicast"}
REPEATS=${REPEATS:-1}
CALLERS=${CALLERS:-16}
net=${NET:-20}
results=$(mktemp)

if redis-cli -p $RPORT ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
redis-server --port $RPORT --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & rpid=$!
trap 'kill $rpid 2>/dev/null' EXIT
for _ in $(seq 50); do redis-cli -p $RPORT ping >/dev/null 2>&1 && break; sleep 0.1; done
RURL=redis://127.0.0.1:$RPORT
. bench/peers/gatewayworker/gw.sh

start() {
  local gc=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --log-level error)
  ADDR=127.0.0.1:9380; API=127.0.0.1:9381; PIDS=(); MEM_PIDS=
  case $1 in
    limit) $LIMIT $ADDR $API & PIDS=($!) ;;
    node1|node2)
      node bench/peers/node/server.js 9380 9381 a $RURL & PIDS=($!)
      if [ $1 = node2 ]; then
        node bench/peers/node/server.js 9480 9481 b $RURL & PIDS+=($!); API=127.0.0.1:9481
      fi ;;
    gc-memory) $GC --listen $ADDR --api-listen $API "${gc[@]}" & PIDS=($!) ;;
    gc-redis1|gc-redis2)
      $GC --listen $ADDR --api-listen $API "${gc[@]}" --redis-url $RURL & PIDS=($!)
      if [ $1 = gc-redis2 ]; then
        $GC --listen 127.0.0.1:9480 --api-listen 127.0.0.1:9481 "${gc[@]}" --redis-url $RURL & PIDS+=($!)
        API=127.0.0.1:9481
      fi ;;
    gw1|gw2)
      gw_start $1 9380 9381 9480 9481
      if [ $1 = gw2 ]; then API=127.0.0.1:9481; fi ;;
  esac
  for _ in $(seq 100); do
    curl -sf http://127.0.0.1:9381/readyz >/dev/null && curl -sf http://$API/readyz >/dev/null && return
    sleep 0.1
  done
  echo "$1 did not become ready" >&2
}

stop() {
  kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
  redis-cli -p $RPORT FLUSHALL >/dev/null
}

run() { # setup scenario
  local pids; pids=$(IFS=,; echo "${PIDS[*]}")
  local t=(--pid $pids --addr $ADDR --api $API --callers $CALLERS)
  net=$(( net % 200 + 1 ))
  case $2 in
    idle) $BENCH --source-net $net idle --pid ${MEM_PIDS:-${PIDS[0]}} --addr $ADDR --api $API --count 5000 --groups 10 --push uid --callers $CALLERS ;;
    fanout) $BENCH --source-net $net fanout "${t[@]}" --group-size 1000 --groups 2 --pushes 300 --size 100 ;;
    broadcast) $BENCH --source-net $net broadcast "${t[@]}" --clients 5000 --pushes 100 --size 100 ;;
    unicast) $BENCH --source-net $net unicast "${t[@]}" --clients 1000 --rate 2000 --seconds 5 --size 100 ;;
  esac
}

for r in $(seq $REPEATS); do
  for scenario in $SCENARIOS; do
    for setup in $SETUPS; do
      start $setup
      line=$(run $setup $scenario | tail -1)
      stop
      load=$(cut -d' ' -f1 /proc/loadavg)
      out="{\"setup\":\"$setup\",\"repeat\":$r,\"at\":\"$(date -u +%FT%TZ)\",\"load1\":$load,\"result\":${line:-null}}"
      echo "$out"; echo "$out" >> "$results"
    done
  done
done

python3 - "$results" "$SETUPS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
setups = sys.argv[2].split()
def med(setup, key, scen):
    v = [r["result"][key] for r in rows if r["setup"] == setup and r["result"] and r["result"]["scenario"] == scen and key in r["result"]]
    return statistics.median(v) if v else None
def fmt(v, f="{:.0f}"):
    return "—" if v is None else f.format(v)
lines = [
  ("idle, 5,000 clients bound to uids, one push: KiB RSS per connection (node A)", lambda s: fmt(med(s, "bytes_per_connection_after_kib", "idle"), "{:.1f}")),
  ("fan-out to 2 groups of 1,000: deliveries/s", lambda s: fmt(med(s, "deliveries_per_s", "fanout"))),
  ("same: server CPU per delivery, µs", lambda s: fmt(med(s, "server_cpu_us_per_delivery", "fanout"), "{:.2f}")),
  ("same: lost", lambda s: fmt(med(s, "lost", "fanout"))),
  ("broadcast to 5,000: deliveries/s", lambda s: fmt(med(s, "deliveries_per_s", "broadcast"))),
  ("same: server CPU per delivery, µs", lambda s: fmt(med(s, "server_cpu_us_per_delivery", "broadcast"), "{:.2f}")),
  ("unicast at 2,000 pushes/s: p50 / p99 / p999 ms", lambda s: " / ".join(fmt(med(s, k, "unicast"), "{:.2f}") for k in ("p50_ms", "p99_ms", "p999_ms"))),
]
for r in rows:
    res = r["result"]
    if res and res["scenario"] == "idle":
        res["bytes_per_connection_after_kib"] = res["bytes_per_connection"]["after"] / 1024
print()
print("| figure | " + " | ".join(setups) + " |")
print("| --- |" + " --- |" * len(setups))
for name, f in lines:
    print(f"| {name} | " + " | ".join(f(s) for s in setups) + " |")
PY
rm -f "$results"
