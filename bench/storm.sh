#!/usr/bin/env bash
# Run from the repository root after `cargo build --release -p gatecast -p gatecast-bench`,
# with a redis-server on 127.0.0.1:6390 (`redis-server --port 6390 --save "" --appendonly no`).
# usage: [CONC=500] [RPORT=6390] bench/storm.sh BIN ENGINE(memory|redis) COUNT [NET]
set -u
BIN=$1; ENGINE=$2; COUNT=$3; NET=${4:-0}
S=bench-secret-0123456789
args=(--listen 127.0.0.1:8180 --api-listen 127.0.0.1:8181 --inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off --client-jwt-secret $S --log-level warn)
[ "$ENGINE" = redis ] && args+=(--redis-url redis://127.0.0.1:${RPORT:-6390})
redis-cli -p 6390 FLUSHALL >/dev/null
$BIN "${args[@]}" & pid=$!
for i in $(seq 100); do curl -sf 127.0.0.1:8181/readyz >/dev/null && break; sleep 0.1; done
./target/release/gatecast-bench --source-net $NET storm --addr 127.0.0.1:8180 --count $COUNT --concurrency ${CONC:-500} --jwt-secret $S
kill -TERM $pid; wait $pid
