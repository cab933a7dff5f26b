#!/usr/bin/env bash
# Soak: a Redis and two gatecast nodes on loopback, connect/push/disconnect
# churn (gatecast-bench churn) for N minutes, and every 10 s each node's
# RSS (/proc/PID/status VmRSS) and open descriptors (/proc/PID/fd) into a
# CSV. Prints first/last/max of each at the end. Not a CI test: run it by
# hand on a quiet machine (docs/reliability.md has the figures).
#
# usage: bench/soak.sh [MINUTES=10]
# env:   CLIENTS=500 (clients at a time), PORT_BASE=8380 (node A public
#        PORT_BASE, API PORT_BASE+1; node B PORT_BASE+100, +101; Redis
#        PORT_BASE+200), OUT=target/soak (CSV and logs), NET=7 (third
#        octet of the clients' source addresses), HEARTBEAT=2s
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=${1:-10}
CLIENTS=${CLIENTS:-500}
BASE=${PORT_BASE:-8380}
OUT=${OUT:-target/soak}
NET=${NET:-7}
HEARTBEAT=${HEARTBEAT:-2s}
A_PUB=$BASE A_API=$((BASE + 1)) B_PUB=$((BASE + 100)) B_API=$((BASE + 101))
RPORT=$((BASE + 200))
mkdir -p "$OUT"
CSV=$OUT/soak.csv

cargo build --release -q -p gatecast -p gatecast-bench
BIN=target/release/gatecast

for port in $A_PUB $A_API $B_PUB $B_API $RPORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is in use: set PORT_BASE" >&2
        exit 1
    fi
done

pids=()
cleanup() {
    # Only what this script started, by pid.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no >"$OUT/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

common=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off
    --redis-url "redis://127.0.0.1:$RPORT" --node-heartbeat "$HEARTBEAT" --log-level warn)
$BIN --listen "127.0.0.1:$A_PUB" --api-listen "127.0.0.1:$A_API" "${common[@]}" >"$OUT/a.log" 2>&1 &
a=$!
pids+=($a)
$BIN --listen "127.0.0.1:$B_PUB" --api-listen "127.0.0.1:$B_API" "${common[@]}" >"$OUT/b.log" 2>&1 &
b=$!
pids+=($b)
for _ in $(seq 100); do
    curl -sf "127.0.0.1:$A_API/readyz" >/dev/null && curl -sf "127.0.0.1:$B_API/readyz" >/dev/null && break
    sleep 0.1
done

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
conns() { curl -sf "127.0.0.1:$1/metrics" | awk '$1 == "gatecast_connections" {print $2}'; }
sample() {
    echo "$1,$(rss $a),$(fds $a),$(conns $A_API),$(rss $b),$(fds $b),$(conns $B_API),$(redis-cli -p "$RPORT" dbsize),$(redis-cli -p "$RPORT" info memory | awk -F: '/^used_memory:/ {printf "%d", $2 / 1024}')"
}

echo "t_s,a_rss_kib,a_fds,a_conns,b_rss_kib,b_fds,b_conns,redis_keys,redis_used_kib" >"$CSV"
sample 0 >>"$CSV"
start=$(date +%s)
./target/release/gatecast-bench --source-net "$NET" churn \
    --addrs "127.0.0.1:$A_PUB,127.0.0.1:$B_PUB" --apis "127.0.0.1:$A_API,127.0.0.1:$B_API" \
    --clients "$CLIENTS" --seconds $((MINUTES * 60)) | tee "$OUT/churn.txt" &
bench=$!
pids+=($bench)
while kill -0 "$bench" 2>/dev/null; do
    sleep 10
    sample $(($(date +%s) - start)) >>"$CSV"
done
wait "$bench"
# Once the churn stopped and every client left.
sample $(($(date +%s) - start)) >>"$CSV"

echo "samples: $CSV"
# Idle before, one minute in (warmed up), the last sample under load, idle
# after everyone left, and the highest.
awk -F, -v end=$((MINUTES * 60)) 'NR == 1 {for (i = 2; i <= NF; i++) name[i] = $i; next}
    {n++; for (i = 1; i <= NF; i++) row[n, i] = $i
     for (i = 2; i <= NF; i++) if ($i + 0 > max[i] + 0) max[i] = $i
     if (!warm && $1 >= 60) warm = n
     if ($1 <= end) load = n
     cols = NF}
    END {if (!warm) warm = 1
         printf "%-16s %10s %10s %10s %10s %10s\n", "", "idle", "t=" row[warm, 1] "s", "t=" row[load, 1] "s", "after", "max"
         for (i = 2; i <= cols; i++)
             printf "%-16s %10s %10s %10s %10s %10s\n", name[i], row[1, i], row[warm, i], row[load, i], row[n, i], max[i]}' "$CSV"
grep -i panicked "$OUT/a.log" "$OUT/b.log" && echo "a node panicked" && exit 1
kill -0 $a && kill -0 $b && echo "both nodes alive"
