#!/usr/bin/env bash
# Idle Redis work as the cluster grows (issue 33): for each node count in
# NODES (default "3 10 30"), starts its own redis-server on RPORT (default
# 6396), that many idle nodes on it (each with --register-listen and
# CLIENTS clients, default 20, held open by gatecast-bench idle), waits
# WARM seconds (default 6), then reads INFO over DURATION seconds (default 10), and
# prints one line per node count: Redis commands per second
# (total_commands_processed, which counts the commands scripts run too, as
# INFO commandstats does; the script's own 4 INFO calls included), the same
# per node, and the five commands with the most calls per second.
# Nodes run with the defaults (rebalancing on, heartbeat HEARTBEAT, default
# 5s) plus EXTRA (e.g. EXTRA="--rebalance off"). Nodes listen on 127.0.0.1
# ports from PORT0 (default 21000) up, 4 each.
# Run from the repository root after
# `cargo build --release -p gatecast -p gatecast-bench` (any build works:
# commands are counted, not timed).
# usage: [NODES="3 10 30"] [CLIENTS=20] [HEARTBEAT=5s] [DURATION=10] bench/idle-redis.sh BIN [BENCH]
set -u
BIN=$1; BENCH=${2:-./target/release/gatecast-bench}
NODES=${NODES:-3 10 30}; CLIENTS=${CLIENTS:-20}; RPORT=${RPORT:-6396}
EXTRA=${EXTRA:-}; WARM=${WARM:-6}; SECS=${DURATION:-10}; PORT0=${PORT0:-21000}; HEARTBEAT=${HEARTBEAT:-5s}
info() { redis-cli -p $RPORT info "$1" | tr -d '\r'; }
total() { info stats | sed -n 's/^total_commands_processed://p'; }
# "cmd calls" lines from commandstats.
stats() { info commandstats | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p'; }
for n in $NODES; do
  if redis-cli -p $RPORT ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
  redis-server --port $RPORT --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & r=$!
  for i in $(seq 50); do redis-cli -p $RPORT ping >/dev/null 2>&1 && break; sleep 0.1; done
  pids=(); holders=()
  for i in $(seq 0 $((n - 1))); do
    p=$((PORT0 + 4 * i))
    $BIN --listen 127.0.0.1:$p --api-listen 127.0.0.1:$((p + 1)) --inner-listen 127.0.0.1:$((p + 2)) \
      --register-listen 127.0.0.1:$((p + 3)) --advertise-ip 127.0.0.1 --redis-url redis://127.0.0.1:$RPORT \
      --node-heartbeat $HEARTBEAT --handshake-rate 0 --log-level error $EXTRA & pids+=($!)
  done
  for i in $(seq 0 $((n - 1))); do
    p=$((PORT0 + 4 * i))
    for t in $(seq 300); do curl -sf 127.0.0.1:$((p + 1))/readyz >/dev/null && break; sleep 0.1; done
    if [ "$CLIENTS" -gt 0 ]; then
      $BENCH idle --pid ${pids[$i]} --addr 127.0.0.1:$p --count $CLIENTS --settle 0 \
        --hold $((WARM + SECS + 60)) >/dev/null 2>&1 & holders+=($!)
    fi
  done
  sleep $WARM
  t0=$(total); s0=$(stats)
  sleep $SECS
  t1=$(total); s1=$(stats)
  top=$(join -a2 -e0 -o 0,1.2,2.2 <(echo "$s0" | sort) <(echo "$s1" | sort) |
    awk -v s=$SECS '{d=$3-$2; if (d>0) printf "%s %.1f\n", $1, d/s}' | sort -k2 -rn)
  cmds=$(awk -v a=$t0 -v b=$t1 -v s=$SECS 'BEGIN {printf "%.1f", (b-a)/s}')
  per=$(awk -v c=$cmds -v n=$n 'BEGIN {printf "%.2f", c/n}')
  echo "nodes=$n clients/node=$CLIENTS commands/s=$cmds per-node=$per top: $(echo "$top" | head -5 | tr '\n' ' ')"
  kill "${holders[@]}" 2>/dev/null; wait "${holders[@]}" 2>/dev/null
  kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null
  kill $r; wait $r 2>/dev/null
done
