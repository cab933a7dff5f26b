#!/usr/bin/env bash
# Redis Cluster scaling (issue 33): the same push load on one Redis and on
# Redis Clusters of 3 and 6 masters (MASTERS, default "1 3 6"; 1 = a plain
# redis-server, more = a cluster of that many masters without replicas,
# where gatecast uses sharded pub/sub). For each: NODES gatecast nodes
# (default 3, TOKIO_WORKER_THREADS=THREADS, default 1), CLIENTS clients
# (default 12000) held by HOLDERS `gatecast-bench hold` processes
# (default 2), spread over every node, each bound to a uid of its own and
# in PER_CLIENT (default 3) of GROUP_COUNT (default 300) groups. Then:
#   - slot balance: keys per master (DBSIZE) and channels per master
#     (PUBSUB SHARDCHANNELS on Cluster, PUBSUB CHANNELS on one Redis), and
#     which master carries the `all` channel;
#   - three loads, each through every node's API in turn with CALLERS
#     (default 16) calls in flight, as fast as they go: UIDS pushes to
#     uids (default 20000), GROUPN pushes to groups (default 3000), ALLN
#     send_to_all (default 100, 4 callers). For each: pushes/s, frames
#     received, deliveries/s, every master's CPU (INFO cpu) and commands
#     (total_commands_processed) during the load, less its idle rate
#     (measured over IDLE seconds, default 5, before the loads), and the
#     nodes' CPU.
# Every step is logged with the UTC time and /proc/loadavg. Throughput on
# a shared 2-core box is bounded by the nodes and the load generator, not
# by Redis: the per-master CPU is the figure that tells how the work
# spreads.
# Needs: cargo build --release -p gatecast -p gatecast-bench; redis-server,
# redis-cli (--cluster create).
# usage: [MASTERS="1 3 6"] [NODES=3] [CLIENTS=12000] [RPORT=7100]
#        [PORT0=26000] [NET0=60] [OUT=dir] bench/cluster-scale.sh
set -u
cd "$(dirname "$0")/.."
GC=${GC:-./target/release/gatecast}
BENCH=${BENCH:-./target/release/gatecast-bench}
MASTERS=${MASTERS:-1 3 6}; NODES=${NODES:-3}; CLIENTS=${CLIENTS:-12000}; HOLDERS=${HOLDERS:-2}
GROUPS_N=${GROUP_COUNT:-300}; PER_CLIENT=${PER_CLIENT:-3}; THREADS=${THREADS:-1}
CALLERS=${CALLERS:-16}; UIDS=${UIDS:-20000}; GROUPN=${GROUPN:-3000}; ALLN=${ALLN:-100}
RPORT=${RPORT:-7100}; PORT0=${PORT0:-26000}; NET0=${NET0:-60}
OUT=${OUT:-$(mktemp -d /tmp/cluster-scale.XXXX)}; mkdir -p "$OUT"
here=bench
log() { echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/log"; }
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }   # ticks (1/100 s)
api() { echo "127.0.0.1:$((PORT0 + 10 * ($1 % NODES) + 1))"; }
apis=$(for i in $(seq 0 $((NODES - 1))); do printf '%s,' "$(api $i)"; done); apis=${apis%,}
addrs=$(for i in $(seq 0 $((NODES - 1))); do printf '127.0.0.1:%s,' $((PORT0 + 10 * i)); done); addrs=${addrs%,}
pids=(); holders=(); rpids=()
stop() {
  [ "$BASHPID" = "$$" ] || return 0   # not in a pipeline's subshell
  # Clients first, then the nodes (each removes its partition), then Redis.
  [ ${#holders[@]} -gt 0 ] && { kill "${holders[@]}"; wait "${holders[@]}"; } 2>/dev/null
  [ ${#pids[@]} -gt 0 ] && { kill "${pids[@]}"; wait "${pids[@]}"; } 2>/dev/null
  [ ${#rpids[@]} -gt 0 ] && kill "${rpids[@]}" 2>/dev/null
  wait 2>/dev/null; holders=(); pids=(); rpids=()
}
trap stop EXIT
# per-master readings: "cpu_seconds commands" per master, one line each
readings() {
  for port in $ports; do
    redis-cli -p $port info all | tr -d '\r' | awk -F: '
      /^used_cpu_(sys|user):/ {c += $2} /^total_commands_processed:/ {n = $2}
      END {printf "%.4f %d\n", c, n}'
  done
}
nodes_cpu() { local s=0; for p in "${pids[@]}"; do s=$((s + $(cpu $p))); done; echo $s; }
# load NAME TAG PUSH-ARGS...: one load with every master's CPU around it
load() {
  local name=$1 tag=$2; shift 2
  local before n0 out after n1 t0 t1
  before=$(readings); n0=$(nodes_cpu); t0=$(date +%s.%N)
  out=$($BENCH push --api "$apis" --tag $tag "$@")
  sleep 2
  after=$(readings); n1=$(nodes_cpu); t1=$(date +%s.%N)
  for h in "${holders[@]}"; do kill -USR1 $h; done
  for h in $(seq 0 $((HOLDERS - 1))); do
    for t in $(seq 100); do [ "$(grep -c '"event":"report"' "$OUT/hold-$m-$h")" -gt $report ] && break; sleep 0.1; done
  done
  local got; got=$(python3 $here/hold-report.py $report "$OUT"/hold-$m-? | grep "\"tag\": \"$tag\"")
  report=$((report + 1))
  python3 - "$m" "$name" "$out" "$got" "$before" "$after" $((n1 - n0)) "$(echo "$t1 - $t0" | bc)" "$idle" <<'EOF' | tee -a "$OUT/rows"
import json, sys
m, name, out, got, before, after, nodes_ticks, window, idle = sys.argv[1:]
out = json.loads(out); got = json.loads(got) if got else {"frames": 0, "first_sent_to_last_frame_s": 0}
b = [list(map(float, l.split())) for l in before.splitlines()]
a = [list(map(float, l.split())) for l in after.splitlines()]
# idle: per master "cpu_seconds_per_s commands_per_s", subtracted over the window
i = [list(map(float, l.split())) for l in idle.splitlines()]
w = float(window)
cpu_ms = [max(0, round((y[0] - x[0] - z[0] * w) * 1000)) for x, y, z in zip(b, a, i)]
cmds = [max(0, int(y[1] - x[1] - z[1] * w)) for x, y, z in zip(b, a, i)]
span = got["first_sent_to_last_frame_s"] or out["seconds"]
print(json.dumps({"masters": int(m), "load": name, "pushes": out["sent"], "errors": out["errors"],
  "pushes_per_s": round(out["sent"] / span), "frames": got["frames"],
  "deliveries_per_s": round(got["frames"] / span) if span else 0,
  "p50_ms": got.get("p50_ms"), "p99_ms": got.get("p99_ms"),
  "redis_cpu_ms_per_master": cpu_ms, "redis_commands_per_master": cmds,
  "redis_us_per_push": round(sum(cpu_ms) * 1000 / max(out["sent"], 1), 2),
  "busiest_master_us_per_push": round(max(cpu_ms) * 1000 / max(out["sent"], 1), 2),
  "nodes_cpu_ms": int(nodes_ticks) * 10}))
EOF
}

for m in $MASTERS; do
  ports=$(seq $RPORT $((RPORT + m - 1)) | tr '\n' ' ')
  dir=$OUT/redis-$m; mkdir -p "$dir"
  for port in $ports; do
    if redis-cli -p $port ping >/dev/null 2>&1; then echo "port $port is taken: set RPORT" >&2; exit 1; fi
    if [ "$m" -gt 1 ]; then
      (cd "$dir" && exec redis-server --port $port --save '' --appendonly no --bind 127.0.0.1 \
        --loglevel warning --cluster-enabled yes --cluster-config-file nodes-$port.conf \
        --cluster-node-timeout 5000 >"redis-$port.log" 2>&1) & rpids+=($!)
    else
      redis-server --port $port --save '' --appendonly no --bind 127.0.0.1 --loglevel warning \
        >"$dir/redis-$port.log" 2>&1 & rpids+=($!)
    fi
  done
  for port in $ports; do for i in $(seq 50); do redis-cli -p $port ping >/dev/null 2>&1 && break; sleep 0.1; done; done
  if [ "$m" -gt 1 ]; then
    redis-cli --cluster create $(for port in $ports; do printf '127.0.0.1:%s ' $port; done) \
      --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 || { log "cluster create failed"; cat "$dir/create.log"; exit 1; }
    for port in $ports; do
      for i in $(seq 100); do redis-cli -p $port cluster info | grep -q cluster_state:ok && break; sleep 0.1; done
    done
    url="redis-cluster://127.0.0.1:$RPORT?$(for port in $ports; do [ $port = $RPORT ] || printf 'node=127.0.0.1:%s&' $port; done)"
    url=${url%&}
  else
    url=redis://127.0.0.1:$RPORT
  fi
  for i in $(seq 0 $((NODES - 1))); do
    p=$((PORT0 + 10 * i))
    TOKIO_WORKER_THREADS=$THREADS $GC --listen 127.0.0.1:$p --api-listen 127.0.0.1:$((p + 1)) --inner-listen 127.0.0.1:$((p + 2)) \
      --advertise-ip 127.0.0.1 --redis-url "$url" --handshake-rate 0 --rebalance off \
      --log-level warn >"$OUT/node-$m-$i.log" 2>&1 & pids+=($!)
  done
  for i in $(seq 0 $((NODES - 1))); do
    for t in $(seq 300); do curl -sf "$(api $i)/readyz" >/dev/null && break; sleep 0.1; done
  done
  log "$m master(s): $url; nodes ${pids[*]}"
  per=$((CLIENTS / HOLDERS))
  for h in $(seq 0 $((HOLDERS - 1))); do
    $BENCH --source-net $((NET0 + h)) hold --addr "$addrs" --api "$apis" --count $per \
      --first $((h * per)) --groups $GROUPS_N --groups-per-client $PER_CLIENT \
      >"$OUT/hold-$m-$h" 2>"$OUT/hold-$m-$h.err" & holders+=($!)
  done
  for h in $(seq 0 $((HOLDERS - 1))); do
    for t in $(seq 900); do
      grep -q '"event":"ready"' "$OUT/hold-$m-$h" 2>/dev/null && break
      kill -0 ${holders[$h]} 2>/dev/null || { log "holder $h died"; break; }
      sleep 1
    done
  done
  log "holders: $(python3 $here/hold-report.py ready "$OUT"/hold-$m-?)"
  sleep 3
  # Slot balance.
  all_chan=gatecast:all
  for port in $ports; do
    keys=$(redis-cli -p $port dbsize)
    if [ "$m" -gt 1 ]; then
      chans=$(redis-cli -p $port pubsub shardchannels | grep -c .)
      allsubs=$(redis-cli -p $port pubsub shardnumsub $all_chan | tail -1)
      slots=$(redis-cli -p $port cluster nodes | awk '/myself/ {s = 0; for (i = 9; i <= NF; i++) {split($i, r, "-"); s += (r[2] ? r[2] - r[1] + 1 : 1)} print s}')
    else
      chans=$(redis-cli -p $port pubsub channels | grep -c .)
      allsubs=$(redis-cli -p $port pubsub numsub $all_chan | tail -1)
      slots=16384
    fi
    echo "{\"masters\": $m, \"port\": $port, \"slots\": $slots, \"keys\": $keys, \"channels\": $chans, \"all_subscribers\": $allsubs}" | tee -a "$OUT/balance"
  done
  # Each master's idle CPU and commands per second (heartbeats, cron),
  # subtracted from every load's window.
  i0=$(readings); sleep ${IDLE:-5}; i1=$(readings)
  idle=$(paste -d' ' <(echo "$i0") <(echo "$i1") | awk -v w=${IDLE:-5} '{printf "%.6f %.1f\n", ($3 - $1) / w, ($4 - $2) / w}')
  log "idle per master (CPU s/s, commands/s): $(echo $idle)"
  report=0
  for h in "${holders[@]}"; do kill -USR1 $h; done   # clears what arrived so far
  for h in $(seq 0 $((HOLDERS - 1))); do
    for t in $(seq 100); do [ "$(grep -c '"event":"report"' "$OUT/hold-$m-$h")" -gt 0 ] && break; sleep 0.1; done
  done
  report=1
  load uid U --to uid --count $UIDS --callers $CALLERS --targets $CLIENTS
  load group G --to group --count $GROUPN --callers $CALLERS --targets $GROUPS_N
  load all A --to all --count $ALLN --callers 4
  log "$m master(s) done"
  stop
done
echo
echo "rows: $OUT/rows, balance: $OUT/balance"
