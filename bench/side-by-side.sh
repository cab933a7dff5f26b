#!/usr/bin/env bash
# The side-by-side benchmark of issue 18: the same scenarios, same load
# generator and the same HTTP push API shape against
#   limit      the bare-Rust limit server (bench/peers/limit: 1 node, no Redis)
#   node1      the Node.js ws + Redis peer (bench/peers/node), 1 node
#   node2      the same, 2 nodes (clients and API calls spread over both)
#   gc-memory  gatecast, in-process engine
#   gc-redis1  gatecast, Redis engine, 1 node
#   gc-redis2  gatecast, 2 nodes over Redis (clients and API calls spread)
#   gw1        GatewayWorker (PHP, bench/peers/gatewayworker), 1 gateway
#   gw2        the same, 2 gateways (clients and API calls spread)
# with fresh processes (and a flushed Redis) for every scenario. Prints one
# JSON line per run, then a markdown table (medians over REPEATS) with
# ratio columns (RATIOS).
#
# The 2-node set-ups are run as users run a cluster behind a Service: the
# clients connect round robin to both nodes, and every API call (joins,
# binds, pushes) goes to the next node in turn, so each node both takes
# calls and delivers. (Until 2026-12-06 every client was on node A and
# every call went to node B, so A only delivered: friendlier.) Only idle
# keeps clients on A and calls to B: it measures A's memory per connection
# bound through another node; storm connects to node A.
# GC_THREADS: tokio worker threads of each gatecast node in gc-redis2
# (TOKIO_WORKER_THREADS; default: the cores divided by the 2 nodes, at
# least 1, as two pods each limited to its share of the box get). A node
# sizes its runtime to every core it sees, so two nodes on one box
# otherwise run twice as many workers as cores, and on 2 cores that costs
# 2-4x the CPU per broadcast delivery (docs/benchmarks.md, "Clusters as
# users run them"). GC_THREADS=0 leaves the runtime's default.
# CALLERS (default "4 16") is the number of HTTP calls the load generator
# keeps in flight at once, in total over every node's API (not per node);
# every scenario runs once per value, and the table has a row per value.
#
# Scenarios (SCENARIOS, in this order by default):
#   idle        5,000 clients bound to uids, one push each: RSS per connection
#   fanout      2 groups of 1,000, 1,000 pushes per group, 100 B, open loop
#   broadcast   5,000 clients, 400 send_to_all, 100 B, open loop
#   unicast     1,000 uids, 2,000 send_to_uid/s for 5 s: latency
#   small       1,000 groups of 2, 20 pushes per group, --window 4: pushes/s
#   fanout4k    2 groups of 1,000, 200 pushes per group, 4 KiB, --window BIG_WINDOW
#   fanout64k   2 groups of 1,000, 50 pushes per group, 64 KiB, --window BIG_WINDOW
#   storm       5,000 clients, each with its own uid (JWT sub), STORM_CONC
#               at a time (gatecast only: the peers have no JWT)
#   fanout-redis  the fanout scenario with every push PUBLISHed straight to
#               Redis as gatecast's envelope (gc-redis1, gc-redis2 only)
# A scenario a set-up cannot run is skipped; the table shows "—".
#
# Needs: cargo build --release -p gatecast -p gatecast-bench;
#        (cd bench/peers/limit && cargo build --release);
#        (cd bench/peers/node && npm ci); redis-server on PATH.
#        for gw1/gw2: php (pcntl, posix, sockets), bench/peers/gatewayworker/setup.sh.
#        scripts/bench-peers does all that and then runs this script.
# usage: [SETUPS="limit gc-redis1"] [SCENARIOS="idle fanout"] [REPEATS=1] \
#        [PORT_BASE=9380] [PORT_B=PORT_BASE+100] [RPORT=6396] [NET=20] \
#        bench/side-by-side.sh
# Ports: node A listens on PORT_BASE (WebSocket) and PORT_BASE+1 (API),
# node B on PORT_B and PORT_B+1; Redis on RPORT. Give two runs at once
# different PORT_BASE, PORT_B, RPORT and NET.
set -u
cd "$(dirname "$0")/.."
GC=${GC:-./target/release/gatecast}
LIMIT=${LIMIT:-bench/peers/limit/target/release/limit-server}
NODE=${NODE:-bench/peers/node/server.js}
BENCH=${BENCH:-./target/release/gatecast-bench}
RPORT=${RPORT:-6396}
PORT_BASE=${PORT_BASE:-9380}
PORT_B=${PORT_B:-$((PORT_BASE + 100))}
SETUPS=${SETUPS:-"limit node1 node2 gc-memory gc-redis1 gc-redis2"}
SCENARIOS=${SCENARIOS:-"idle fanout broadcast unicast small fanout4k fanout64k storm fanout-redis"}
REPEATS=${REPEATS:-1}
CALLERS=${CALLERS:-"4 16"}
GC_THREADS=${GC_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}
BIG_WINDOW=${BIG_WINDOW:-4}
STORM_CONC=${STORM_CONC:-100}
RATIOS=${RATIOS:-"gc-redis2/node2 gc-redis1/limit gc-redis1/gc-memory"}
JWT_SECRET=bench-secret-0123456789
net=${NET:-20}
results=$(mktemp)
A_WS=$PORT_BASE; A_API=$((PORT_BASE + 1)); B_WS=$PORT_B; B_API=$((PORT_B + 1))

if redis-cli -p "$RPORT" ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
for p in $A_WS $A_API $B_WS $B_API; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "port $p is taken: set PORT_BASE" >&2; exit 1; fi
done
redis-server --port "$RPORT" --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & rpid=$!
PIDS=()
# Waits for Redis to exit: a run started right after this one finds its
# port free (the check above refused it while this Redis still shut down).
trap 'kill "${PIDS[@]}" $rpid 2>/dev/null; wait $rpid 2>/dev/null; rm -f "$results"' EXIT
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
RURL=redis://127.0.0.1:$RPORT
. bench/peers/gatewayworker/gw.sh

# Can set-up $1 run scenario $2?
supported() {
  case $2 in
    storm) [[ $1 == gc-* ]] ;;
    fanout-redis) [[ $1 == gc-redis* ]] ;;
    *) true ;;
  esac
}

start() { # setup scenario
  local gc=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off --log-level error)
  [ "$2" = storm ] && gc+=(--client-jwt-secret $JWT_SECRET)
  ADDR=127.0.0.1:$A_WS; API=127.0.0.1:$A_API; PIDS=(); MEM_PIDS=
  # 2 nodes: clients and calls spread over both (ADDR, API); idle binds
  # A's clients through B (ONE_ADDR, OTHER_API).
  local both_ws=127.0.0.1:$A_WS,127.0.0.1:$B_WS both_api=127.0.0.1:$A_API,127.0.0.1:$B_API
  ONE_ADDR=$ADDR; OTHER_API=$API
  case $1 in
    limit) $LIMIT "$ADDR" "$API" & PIDS=($!) ;;
    node1|node2)
      node "$NODE" "$A_WS" "$A_API" a "$RURL" & PIDS=($!)
      if [ "$1" = node2 ]; then
        node "$NODE" "$B_WS" "$B_API" b "$RURL" & PIDS+=($!)
        ADDR=$both_ws; API=$both_api; OTHER_API=127.0.0.1:$B_API
      fi ;;
    gc-memory) $GC --listen "$ADDR" --api-listen "$API" "${gc[@]}" & PIDS=($!) ;;
    gc-redis1)
      $GC --listen "$ADDR" --api-listen "$API" "${gc[@]}" --redis-url "$RURL" & PIDS=($!) ;;
    gc-redis2)
      # env execs gatecast: $! is the node's pid.
      local threads=(); [ "$GC_THREADS" != 0 ] && threads=(TOKIO_WORKER_THREADS="$GC_THREADS")
      env "${threads[@]}" $GC --listen "$ADDR" --api-listen "$API" "${gc[@]}" --redis-url "$RURL" & PIDS=($!)
      if [ "$1" = gc-redis2 ]; then
        env "${threads[@]}" $GC --listen 127.0.0.1:$B_WS --api-listen 127.0.0.1:$B_API "${gc[@]}" --redis-url "$RURL" & PIDS+=($!)
        ADDR=$both_ws; API=$both_api; OTHER_API=127.0.0.1:$B_API
      fi ;;
    gw1|gw2)
      gw_start "$1" "$A_WS" "$A_API" "$B_WS" "$B_API"
      if [ "$1" = gw2 ]; then ADDR=$both_ws; API=$both_api; OTHER_API=127.0.0.1:$B_API; fi ;;
  esac
  local up a
  for _ in $(seq 100); do
    up=1
    for a in ${API//,/ }; do curl -sf "http://$a/readyz" >/dev/null || up=0; done
    [ $up = 1 ] && return
    sleep 0.1
  done
  echo "$1 did not become ready" >&2
}

stop() {
  kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
  PIDS=()
  redis-cli -p "$RPORT" FLUSHALL >/dev/null
}

run() { # setup scenario callers
  local pids; pids=$(IFS=,; echo "${PIDS[*]}")
  local t=(--pid "$pids" --addr "$ADDR" --api "$API" --callers "$3")
  local fanout=(fanout "${t[@]}" --group-size 1000 --groups 2)
  net=$(( net % 200 + 1 ))
  local b=("$BENCH" --source-net $net)
  case $2 in
    idle) "${b[@]}" idle --pid "${MEM_PIDS:-${PIDS[0]}}" --addr "$ONE_ADDR" --api "$OTHER_API" --count 5000 --groups 10 --push uid --callers "$3" ;;
    fanout) "${b[@]}" "${fanout[@]}" --pushes 1000 --size 100 ;;
    fanout-redis) "${b[@]}" "${fanout[@]}" --pushes 1000 --size 100 --via redis --redis-url "$RURL" ;;
    broadcast) "${b[@]}" broadcast "${t[@]}" --clients 5000 --pushes 400 --size 100 ;;
    unicast) "${b[@]}" unicast "${t[@]}" --clients 1000 --rate 2000 --seconds 5 --size 100 ;;
    small) "${b[@]}" fanout "${t[@]}" --group-size 2 --groups 1000 --pushes 20 --size 100 --window 4 ;;
    fanout4k) "${b[@]}" "${fanout[@]}" --pushes 200 --size 4096 --window "$BIG_WINDOW" ;;
    fanout64k) "${b[@]}" "${fanout[@]}" --pushes 50 --size 65536 --window "$BIG_WINDOW" ;;
    storm) "${b[@]}" storm --addr "$ONE_ADDR" --count 5000 --concurrency "$STORM_CONC" --jwt-secret $JWT_SECRET ;;
  esac
}

for r in $(seq "$REPEATS"); do
  for scenario in $SCENARIOS; do
    for callers in $CALLERS; do
      # idle and storm make no pushes: run once, with the first CALLERS.
      if [[ $scenario == idle || $scenario == storm ]] && [ "$callers" != "${CALLERS%% *}" ]; then continue; fi
      for setup in $SETUPS; do
        line=""
        if supported "$setup" "$scenario"; then
          start "$setup" "$scenario"
          line=$(run "$setup" "$scenario" "$callers" | tail -1)
          stop
        fi
        load=$(cut -d' ' -f1 /proc/loadavg)
        out="{\"setup\":\"$setup\",\"scenario\":\"$scenario\",\"callers\":$callers,\"repeat\":$r,\"at\":\"$(date -u +%FT%TZ)\",\"load1\":$load,\"result\":${line:-null}}"
        echo "$out"; echo "$out" >> "$results"
      done
    done
  done
done

python3 - "$results" "$SETUPS" "$RATIOS" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
setups = sys.argv[2].split()
ratios = [r.split("/") for r in sys.argv[3].split() if r.count("/") == 1]
ratios = [(a, b) for a, b in ratios if a in setups and b in setups]
for r in rows:
    res = r["result"]
    if res and res.get("scenario") == "idle":
        res["kib_after"] = res["bytes_per_connection"]["after"] / 1024
def med(setup, scen, key, callers):
    v = [r["result"][key] for r in rows
         if r["setup"] == setup and r["scenario"] == scen and r.get("callers") == callers
         and r["result"] and key in r["result"]]
    return statistics.median(v) if v else None
def fmt(v, f):
    return "—" if v is None else f.format(v)
def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"
# (figure, scenario, keys, format): several keys print as "a / b / c".
lines = [
  ("idle, 5,000 clients bound to uids, one push: KiB RSS per connection (node A)", "idle", ["kib_after"], "{:.1f}"),
  ("fan-out to 2 groups of 1,000 (2,000 pushes): deliveries/s", "fanout", ["deliveries_per_s"], "{:,.0f}"),
  ("same: server CPU per delivery, µs", "fanout", ["server_cpu_us_per_delivery"], "{:.2f}"),
  ("same: lost", "fanout", ["lost"], "{:.0f}"),
  ("fan-out to 2 groups of 1,000, pushes PUBLISHed straight to Redis: deliveries/s", "fanout-redis", ["deliveries_per_s"], "{:,.0f}"),
  ("same: server CPU per delivery, µs", "fanout-redis", ["server_cpu_us_per_delivery"], "{:.2f}"),
  ("broadcast to 5,000 (400 pushes): deliveries/s", "broadcast", ["deliveries_per_s"], "{:,.0f}"),
  ("same: server CPU per delivery, µs", "broadcast", ["server_cpu_us_per_delivery"], "{:.2f}"),
  ("same: lost", "broadcast", ["lost"], "{:.0f}"),
  ("unicast at 2,000 pushes/s: p50 / p99 / p999 ms", "unicast", ["p50_ms", "p99_ms", "p999_ms"], "{:.2f}"),
  ("many small pushes, 1,000 groups of 2, window 4: pushes/s", "small", ["pushes_per_s"], "{:,.0f}"),
  ("same: push to last delivery p50 / p99 ms", "small", ["latency_p50_ms", "latency_p99_ms"], "{:.2f}"),
  ("same: server CPU per push, µs", "small", ["server_cpu_us_per_push"], "{:.1f}"),
  ("fan-out 4 KiB to 2 groups of 1,000: deliveries/s", "fanout4k", ["deliveries_per_s"], "{:,.0f}"),
  ("same: p50 / p99 ms; lost", "fanout4k", ["latency_p50_ms", "latency_p99_ms", "lost"], "{:.1f}"),
  ("fan-out 64 KiB to 2 groups of 1,000: deliveries/s", "fanout64k", ["deliveries_per_s"], "{:,.0f}"),
  ("same: p50 / p99 ms; lost", "fanout64k", ["latency_p50_ms", "latency_p99_ms", "lost"], "{:.1f}"),
  ("reconnect storm, 5,000 JWT clients with own uids: connects/s", "storm", ["connects_per_s"], "{:,.0f}"),
]
scens = {r["scenario"] for r in rows}
print()
print("| figure | " + " | ".join(setups + [f"{a} / {b}" for a, b in ratios]) + " |")
print("| --- |" + " --- |" * (len(setups) + len(ratios)))
for name, scen, keys, f in lines:
    if scen not in scens:
        continue
    cs = sorted({r.get("callers") for r in rows if r["scenario"] == scen})
    for c in cs:
        label = f"{name} [{c} callers]" if len(cs) > 1 else name
        cells = [" / ".join(fmt(med(s, scen, k, c), f) for k in keys) for s in setups]
        cells += [" / ".join(ratio(med(a, scen, k, c), med(b, scen, k, c)) for k in keys) for a, b in ratios]
        print(f"| {label} | " + " | ".join(cells) + " |")
PY
