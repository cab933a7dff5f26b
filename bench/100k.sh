#!/usr/bin/env bash
# 100,000 connections on one box (issue 33): NODES gatecast nodes (default
# 6, release, Redis engine, one redis-server) and CLIENTS clients (default
# 100000) held by HOLDERS `gatecast-bench hold` processes (default 6: a
# process here may hold at most 20,000 descriptors), each holder's clients
# spread round robin over every node, from source addresses of its own
# (127.0.<NET0 + h>.x, 10,000 per address). Every client is bound to a uid
# of its own and joins PER_CLIENT groups (default 3) of GROUP_COUNT (default
# 1000), in /api/batch calls spread over every node's API (as a Service
# spreads them). Then it measures:
#   - each node's RSS per connection (VmRSS before the clients and once
#     they are bound, divided by the node's established connections), and
#     Redis used_memory per connection (INFO memory before and after);
#   - send_to_all to everyone: BCAST single pushes (default 3), each timed
#     from its send to the last frame, and a burst of BURST (default 10)
#     back to back: deliveries/s from the first sent to the last frame;
#   - RATE pushes/s to uids (default 1000) for PUSH_SECONDS (default 10),
#     through every node's API in turn: push-to-frame p50/p99 (the send
#     time travels in the payload; every process reads the same clock);
#   - every query kind, QREPS times each (default 20) over the nodes'
#     APIs in turn: curl's time_total, median and max, and the answer size;
#   - then the nodes' CPU each second for IDLE_SECONDS (default 30), idle.
# Every step is logged with the UTC time and /proc/loadavg. Node threads:
# TOKIO_WORKER_THREADS=THREADS (default 1: six nodes share the box's
# cores; docs/benchmarks.md "Clusters as users run them").
# Needs: cargo build --release -p gatecast -p gatecast-bench; redis-server.
# usage: [NODES=6] [CLIENTS=100000] [HOLDERS=6] [GROUP_COUNT=1000] [PER_CLIENT=3]
#        [RATE=1000] [PUSH_SECONDS=10] [BCAST=3] [BURST=10] [QREPS=20] [RPORT=6391] [PORT0=25000]
#        [NET0=40] [OUT=dir] bench/100k.sh
set -u
cd "$(dirname "$0")/.."
GC=${GC:-./target/release/gatecast}
BENCH=${BENCH:-./target/release/gatecast-bench}
NODES=${NODES:-6}; CLIENTS=${CLIENTS:-100000}; HOLDERS=${HOLDERS:-6}
GROUPS_N=${GROUP_COUNT:-1000}; PER_CLIENT=${PER_CLIENT:-3}; THREADS=${THREADS:-1}
RATE=${RATE:-1000}; PUSH_SECONDS=${PUSH_SECONDS:-10}; BCAST=${BCAST:-3}; BURST=${BURST:-10}
QREPS=${QREPS:-20}; RPORT=${RPORT:-6391}; PORT0=${PORT0:-25000}; NET0=${NET0:-40}
OUT=${OUT:-$(mktemp -d /tmp/100k.XXXX)}; mkdir -p "$OUT"
here=bench
log() { echo "[$(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/log"; }
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }   # ticks (1/100 s)
sys() { awk '{print $15}' /proc/$1/stat; }         # of which in the kernel
rcli() { redis-cli -p $RPORT "$@"; }
rinfo() { rcli info "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k {print $2}'; }
rcpu() { rcli info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'; }
api() { echo "127.0.0.1:$((PORT0 + 10 * ($1 % NODES) + 1))"; }
apis=$(for i in $(seq 0 $((NODES - 1))); do printf '%s,' "$(api $i)"; done); apis=${apis%,}
addrs=$(for i in $(seq 0 $((NODES - 1))); do printf '127.0.0.1:%s,' $((PORT0 + 10 * i)); done); addrs=${addrs%,}
pids=(); holders=(); r=
cleanup() {
  [ "$BASHPID" = "$$" ] || return 0   # not in a pipeline's subshell
  # Clients first, then the nodes (each removes its partition), then Redis.
  [ ${#holders[@]} -gt 0 ] && { kill "${holders[@]}"; wait "${holders[@]}"; } 2>/dev/null
  [ ${#pids[@]} -gt 0 ] && { kill "${pids[@]}"; wait "${pids[@]}"; } 2>/dev/null
  [ -n "$r" ] && kill $r 2>/dev/null
  wait 2>/dev/null
}
trap cleanup EXIT

log "out: $OUT; $NODES nodes, $CLIENTS clients in $HOLDERS holders, $PER_CLIENT of $GROUPS_N groups each"
if rcli ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
redis-server --port $RPORT --save '' --appendonly no --bind 127.0.0.1 --loglevel warning \
  --maxclients 10000 >"$OUT/redis.log" 2>&1 & r=$!
for i in $(seq 50); do rcli ping >/dev/null 2>&1 && break; sleep 0.1; done
mem0=$(rinfo memory used_memory)
for i in $(seq 0 $((NODES - 1))); do
  p=$((PORT0 + 10 * i))
  TOKIO_WORKER_THREADS=$THREADS $GC --listen 127.0.0.1:$p --api-listen 127.0.0.1:$((p + 1)) --inner-listen 127.0.0.1:$((p + 2)) \
    --advertise-ip 127.0.0.1 --redis-url redis://127.0.0.1:$RPORT --handshake-rate 0 \
    --rebalance off --log-level warn >"$OUT/node-$i.log" 2>&1 & pids+=($!)
done
for i in $(seq 0 $((NODES - 1))); do
  for t in $(seq 300); do curl -sf "$(api $i)/readyz" >/dev/null && break; sleep 0.1; done
done
sleep 2
mem1=$(rinfo memory used_memory)
rss0=(); for p in "${pids[@]}"; do rss0+=($(rss $p)); done
log "nodes ready: pids ${pids[*]}; RSS KiB ${rss0[*]}; redis used_memory $mem0 -> $mem1"

per=$(( (CLIENTS + HOLDERS - 1) / HOLDERS ))
started=$(date +%s.%N)
for h in $(seq 0 $((HOLDERS - 1))); do
  count=$(( h < HOLDERS - 1 ? per : CLIENTS - per * (HOLDERS - 1) ))
  $BENCH --source-net $((NET0 + h)) hold --addr "$addrs" --api "$apis" --count $count \
    --first $((h * per)) --groups $GROUPS_N --groups-per-client $PER_CLIENT \
    >"$OUT/hold-$h" 2>"$OUT/hold-$h.err" & holders+=($!)
done
for h in $(seq 0 $((HOLDERS - 1))); do
  for t in $(seq 1800); do
    grep -q '"event":"ready"' "$OUT/hold-$h" 2>/dev/null && break
    kill -0 ${holders[$h]} 2>/dev/null || { log "holder $h died: $(tail -3 "$OUT/hold-$h.err")"; break; }
    sleep 1
  done
done
ready=$(python3 $here/hold-report.py ready "$OUT"/hold-? 2>/dev/null)
log "holders ready after $(echo "$(date +%s.%N) - $started" | bc) s: $ready"
sleep 5
mem2=$(rinfo memory used_memory); keys=$(rcli dbsize)
log "bound: redis used_memory $mem2, dbsize $keys"
echo "| node | connections | RSS before KiB | RSS bound KiB | bytes per connection |" | tee "$OUT/rss.md"
echo "| --- | --- | --- | --- | --- |" | tee -a "$OUT/rss.md"
total=0
for i in $(seq 0 $((NODES - 1))); do
  n=$(ss -Htn state established "( sport = :$((PORT0 + 10 * i)) )" | wc -l); total=$((total + n))
  b=$(rss ${pids[$i]})
  echo "| $i | $n | ${rss0[$i]} | $b | $(( n > 0 ? (b - ${rss0[$i]}) * 1024 / n : 0 )) |" | tee -a "$OUT/rss.md"
done
log "connections established on the nodes: $total; redis bytes per connection: $(( total > 0 ? (mem2 - mem1) / total : 0 ))"
count=$(curl -sf "$(api 0)/api/get_all_client_count" -d '{}')
log "get_all_client_count: $count"

report=0
collect() {  # signal every holder, wait for its next report, merge them
  for h in "${holders[@]}"; do kill -USR1 $h; done
  for h in $(seq 0 $((HOLDERS - 1))); do
    for t in $(seq 100); do
      [ "$(grep -c '"event":"report"' "$OUT/hold-$h")" -gt $report ] && break; sleep 0.1
    done
  done
  python3 $here/hold-report.py $report "$OUT"/hold-? | tee -a "$OUT/log"
  report=$((report + 1))
}
collect >/dev/null   # clears what arrived so far
# send_to_all: single pushes, then a burst.
for b in $(seq $BCAST); do
  c0=0; s0=0; for p in "${pids[@]}"; do c0=$((c0 + $(cpu $p))); s0=$((s0 + $(sys $p))); done; rc0=$(rcpu)
  log "send_to_all $b: $($BENCH push --api "$apis" --to all --count 1 --tag A)"
  sleep 5
  c1=0; s1=0; for p in "${pids[@]}"; do c1=$((c1 + $(cpu $p))); s1=$((s1 + $(sys $p))); done; rc1=$(rcpu)
  log "nodes' CPU $(( (c1 - c0) * 10 )) ms (kernel $(( (s1 - s0) * 10 )) ms), redis $(echo "($rc1 - $rc0) * 1000" | bc) ms (5 s window)"
  collect
done
c0=0; s0=0; for p in "${pids[@]}"; do c0=$((c0 + $(cpu $p))); s0=$((s0 + $(sys $p))); done; rc0=$(rcpu)
log "send_to_all burst: $($BENCH push --api "$apis" --to all --count $BURST --callers 4 --tag B)"
sleep 8
c1=0; s1=0; for p in "${pids[@]}"; do c1=$((c1 + $(cpu $p))); s1=$((s1 + $(sys $p))); done; rc1=$(rcpu)
log "nodes' CPU $(( (c1 - c0) * 10 )) ms (kernel $(( (s1 - s0) * 10 )) ms), redis $(echo "($rc1 - $rc0) * 1000" | bc) ms (8 s window)"
collect
# pushes to uids at RATE.
c0=0; s0=0; for p in "${pids[@]}"; do c0=$((c0 + $(cpu $p))); s0=$((s0 + $(sys $p))); done; rc0=$(rcpu)
log "send_to_uid at $RATE/s: $($BENCH push --api "$apis" --to uid --rate $RATE --count $((RATE * PUSH_SECONDS)) --callers 64 --targets $CLIENTS --tag U)"
sleep 3
c1=0; s1=0; for p in "${pids[@]}"; do c1=$((c1 + $(cpu $p))); s1=$((s1 + $(sys $p))); done; rc1=$(rcpu)
log "nodes' CPU $(( (c1 - c0) * 10 )) ms (kernel $(( (s1 - s0) * 10 )) ms), redis $(echo "($rc1 - $rc0) * 1000" | bc) ms"
collect
echo "| node | RSS after the pushes KiB | bytes per connection |" | tee "$OUT/rss-pushed.md"
echo "| --- | --- | --- |" | tee -a "$OUT/rss-pushed.md"
for i in $(seq 0 $((NODES - 1))); do
  n=$(ss -Htn state established "( sport = :$((PORT0 + 10 * i)) )" | wc -l); b=$(rss ${pids[$i]})
  echo "| $i | $b | $(( n > 0 ? (b - ${rss0[$i]}) * 1024 / n : 0 )) |" | tee -a "$OUT/rss-pushed.md"
done
log "redis used_memory after the pushes $(rinfo memory used_memory)"
# Queries.
cid=$(curl -sf "$(api 0)/api/get_client_id_list_by_group" -d '{"group":"h-g7"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["result"][-1])')
query() {  # NAME JSON
  local times=() size=0
  for i in $(seq 0 $((QREPS - 1))); do
    out=$(curl -s -o "$OUT/q.json" -w '%{http_code} %{time_total} %{size_download}' "$(api $i)/api/$1" -d "$2")
    set -- "$1" "$2" $out; times+=($4); size=$5
    [ "$3" = 200 ] || { log "$1: HTTP $3 $(head -c 200 "$OUT/q.json")"; }
  done
  printf '%s\n' "${times[@]}" | sort -n | awk -v n="$1" -v s=$size '{a[NR] = $1 * 1000}
    END {printf "| %s | %.1f | %.1f | %s |\n", n, a[int((NR + 1) / 2)], a[NR], s}' | tee -a "$OUT/queries.md"
}
echo "| query | median ms | max ms | answer bytes |" | tee "$OUT/queries.md"
echo "| --- | --- | --- | --- |" | tee -a "$OUT/queries.md"
query is_online "{\"client_id\":\"$cid\"}"
query get_uid_by_client_id "{\"client_id\":\"$cid\"}"
query get_session "{\"client_id\":\"$cid\"}"
query is_uid_online '{"uid":"h-u4321"}'
query get_client_id_by_uid '{"uid":"h-u4321"}'
query get_client_count_by_group '{"group":"h-g7"}'
query get_uid_count_by_group '{"group":"h-g7"}'
query get_client_id_list_by_group '{"group":"h-g7"}'
query get_uid_list_by_group '{"group":"h-g7"}'
query get_client_sessions_by_group '{"group":"h-g7"}'
query get_all_client_count '{}'
query get_all_uid_count '{}'
query get_all_group_id_list '{}'
query get_all_client_id_list '{}'
query get_all_uid_list '{}'
query get_all_client_sessions '{}'
log "queries done"
# Idle: the nodes' CPU each second for IDLE_SECONDS (default 30): a node
# pings all its connections at once every --ping-interval (25 s).
prev=0; for p in "${pids[@]}"; do prev=$((prev + $(cpu $p))); done
series=()
for t in $(seq ${IDLE_SECONDS:-30}); do
  sleep 1
  now=0; for p in "${pids[@]}"; do now=$((now + $(cpu $p))); done
  series+=($(( (now - prev) * 10 ))); prev=$now
done
log "idle: nodes' CPU per second, ms: ${series[*]}"
echo "| node | RSS at the end KiB |" > "$OUT/rss-end.md"
for i in $(seq 0 $((NODES - 1))); do echo "| $i | $(rss ${pids[$i]}) |" >> "$OUT/rss-end.md"; done
cat "$OUT/rss-end.md"
log "redis used_memory at the end $(rinfo memory used_memory); closed clients: $(python3 $here/hold-report.py $((report - 1)) "$OUT"/hold-? | head -1)"
