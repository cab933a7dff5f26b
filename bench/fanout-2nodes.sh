#!/usr/bin/env bash
# Run from the repository root after `cargo build --release -p gatecast -p gatecast-bench`,
# with a redis-server on 127.0.0.1:6390 (`redis-server --port 6390 --save "" --appendonly no`).
# usage: bench/fanout-2nodes.sh BIN NET — 2 nodes on Redis 6390, clients on A, pushes via B
set -u
BIN=$1; NET=$2
redis-cli -p 6390 FLUSHALL >/dev/null
common=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off --redis-url redis://127.0.0.1:6390 --log-level warn)
$BIN --listen 127.0.0.1:8180 --api-listen 127.0.0.1:8181 "${common[@]}" & a=$!
$BIN --listen 127.0.0.1:8280 --api-listen 127.0.0.1:8281 "${common[@]}" & b=$!
for i in $(seq 100); do curl -sf 127.0.0.1:8181/readyz >/dev/null && curl -sf 127.0.0.1:8281/readyz >/dev/null && break; sleep 0.1; done
./target/release/gatecast-bench --source-net $NET fanout --pid $a --addr 127.0.0.1:8180 --api 127.0.0.1:8281 --group-size 1000 --groups 2 --pushes 1000 --size 100 --mode batch
kill -TERM $a $b; wait $a $b
