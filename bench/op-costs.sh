#!/usr/bin/env bash
# Redis work per operation as the cluster grows (issue 33): for each node
# count in NODES (default "1 3 10 30"), starts its own redis-server on RPORT
# (default 6397) and that many small nodes on it, records every command
# Redis runs with MONITOR, and runs each operation REPS times (default 30)
# through the nodes' APIs in turn (as a Service spreads calls): connects
# (CLIENTS per node, default 10, at least REPS in all, opened by gatecast-bench idle), binds,
# joins, pushes to a uid, a group, a client and all, every query, session
# writes, leaves, unbinds, disconnects. Prints per node count and
# operation: Redis commands per operation (everything Redis ran, the
# commands scripts and functions run included, as total_commands_processed
# and INFO commandstats count them), round trips per operation (commands
# clients sent: EVALSHA/FCALL plus plain commands) and the commands.
#
# Idle work (docs/benchmarks.md "Idle Redis work as nodes grow") is kept
# out: PINGs are not counted, nodes run with a long heartbeat (HEARTBEAT,
# default 60s) and --rebalance off, and the rate of each command in a quiet
# window before the operations (IDLE seconds, default 3) is subtracted from
# each operation's window. Figures are counted, not timed: the machine's
# load does not change them. EXTRA adds node options.
# Run from the repository root after
# `cargo build --release -p gatecast -p gatecast-bench` (any build works).
# usage: [NODES="1 3 10 30"] [REPS=30] [CLIENTS=10] bench/op-costs.sh BIN [BENCH]
set -u
BIN=$1; BENCH=${2:-./target/release/gatecast-bench}
NODES=${NODES:-1 3 10 30}; REPS=${REPS:-30}; CLIENTS=${CLIENTS:-10}; RPORT=${RPORT:-6397}
EXTRA=${EXTRA:-}; IDLE=${IDLE:-3}; PORT0=${PORT0:-23000}; HEARTBEAT=${HEARTBEAT:-60s}
GROUPS_N=5
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mark() { redis-cli -p $RPORT echo "mark:$1:$2" >/dev/null; }
# call NODE_INDEX METHOD JSON: one API call on the node's API.
call() { curl -sf -m 10 "127.0.0.1:$((PORT0 + 4 * ($1 % n) + 1))/api/$2" -d "$3" >/dev/null || echo "call $2 failed" >&2; }
for n in $NODES; do
  if redis-cli -p $RPORT ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
  redis-server --port $RPORT --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & r=$!
  for i in $(seq 50); do redis-cli -p $RPORT ping >/dev/null 2>&1 && break; sleep 0.1; done
  pids=(); holders=()
  for i in $(seq 0 $((n - 1))); do
    p=$((PORT0 + 4 * i))
    $BIN --listen 127.0.0.1:$p --api-listen 127.0.0.1:$((p + 1)) --inner-listen 127.0.0.1:$((p + 2)) \
      --advertise-ip 127.0.0.1 --redis-url redis://127.0.0.1:$RPORT --node-heartbeat $HEARTBEAT \
      --rebalance off --handshake-rate 0 --log-level error $EXTRA & pids+=($!)
  done
  for i in $(seq 0 $((n - 1))); do
    for t in $(seq 300); do curl -sf 127.0.0.1:$((PORT0 + 4 * i + 1))/readyz >/dev/null && break; sleep 0.1; done
  done
  sleep 2
  mon=$tmp/monitor-$n; redis-cli -p $RPORT monitor > $mon 2>/dev/null & mon_pid=$!
  sleep 0.5
  mark idle 1; sleep $IDLE; mark end 0
  # Connects: CLIENTS per node, all at once per node.
  # Enough clients for REPS distinct ones.
  per=$(( CLIENTS > (REPS + n - 1) / n ? CLIENTS : (REPS + n - 1) / n ))
  mark connect $((per * n))
  for i in $(seq 0 $((n - 1))); do
    p=$((PORT0 + 4 * i))
    $BENCH idle --pid ${pids[$i]} --addr 127.0.0.1:$p --count $per --groups 0 --push none \
      --settle 0 --hold 3600 > $tmp/held-$i 2>/dev/null & holders+=($!)
  done
  for i in $(seq 0 $((n - 1))); do
    for t in $(seq 600); do [ -s $tmp/held-$i ] && break; sleep 0.1; done
  done
  sleep 1; mark end 0
  ids=($(curl -sf 127.0.0.1:$((PORT0 + 1))/api/get_all_client_id_list -d '{}' |
    python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["result"]))'))
  [ ${#ids[@]} -ge $REPS ] || { echo "only ${#ids[@]} clients (want REPS=$REPS): raise CLIENTS" >&2; }
  # Client i is bound to uid u<i> and in group g<i % GROUPS_N>.
  # run NAME METHOD TEMPLATE: REPS calls, $i/$id/$u/$g substituted; node i % n.
  run() {
    mark "$1" $REPS
    for i in $(seq 0 $((REPS - 1))); do
      id=${ids[$((i % ${#ids[@]}))]}; u="u$i"; g="g$((i % GROUPS_N))"
      call $i "$2" "$(eval echo "\"$3\"")"
    done
    sleep 0.5; mark end 0
  }
  q='\"'
  run bind_uid bind_uid "{${q}client_id${q}:${q}\$id${q},${q}uid${q}:${q}\$u${q}}"
  run join_group join_group "{${q}client_id${q}:${q}\$id${q},${q}group${q}:${q}\$g${q}}"
  run send_to_uid send_to_uid "{${q}uid${q}:${q}\$u${q},${q}data${q}:${q}hello${q}}"
  run send_to_group send_to_group "{${q}group${q}:${q}\$g${q},${q}data${q}:${q}hello${q}}"
  run send_to_client send_to_client "{${q}client_id${q}:${q}\$id${q},${q}data${q}:${q}hello${q}}"
  run send_to_all send_to_all "{${q}data${q}:${q}hello${q}}"
  for m in is_online get_uid_by_client_id get_session; do
    run $m $m "{${q}client_id${q}:${q}\$id${q}}"
  done
  for m in is_uid_online get_client_id_by_uid; do
    run $m $m "{${q}uid${q}:${q}\$u${q}}"
  done
  for m in get_client_count_by_group get_client_id_list_by_group get_client_sessions_by_group \
    get_uid_list_by_group get_uid_count_by_group; do
    run $m $m "{${q}group${q}:${q}\$g${q}}"
  done
  for m in get_all_client_count get_all_client_id_list get_all_client_sessions get_all_uid_list \
    get_all_uid_count get_all_group_id_list; do
    run $m $m "{}"
  done
  run set_session set_session "{${q}client_id${q}:${q}\$id${q},${q}session${q}:{${q}a${q}:1}}"
  run update_session update_session "{${q}client_id${q}:${q}\$id${q},${q}session${q}:{${q}b${q}:2}}"
  run leave_group leave_group "{${q}client_id${q}:${q}\$id${q},${q}group${q}:${q}\$g${q}}"
  run unbind_uid unbind_uid "{${q}client_id${q}:${q}\$id${q},${q}uid${q}:${q}\$u${q}}"
  mark disconnect $((per * n))
  kill "${holders[@]}" 2>/dev/null; wait "${holders[@]}" 2>/dev/null
  sleep 3; mark end 0
  kill $mon_pid; wait $mon_pid 2>/dev/null
  python3 "$here/op-costs.py" parse $n < $mon | tee -a $tmp/rows
  kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null
  kill $r; wait $r 2>/dev/null
done
echo
python3 "$here/op-costs.py" table $tmp/rows
