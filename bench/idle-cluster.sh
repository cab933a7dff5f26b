#!/usr/bin/env bash
# Idle memory per connection in the cluster case (issue 18): COUNT clients on
# node A, each bound to a uid and a group THROUGH NODE B's API, one push to
# each through B (send_to_uid), then node A's VmRSS growth per connection.
# SETUP=memory (one node, in-process engine, bound through its own API),
# redis1 (one node on Redis, its own API) or redis2 (the default: 2 nodes).
# Starts its own redis-server on RPORT (default 6395) and stops it after.
# Run from the repository root after
# `cargo build --release -p gatecast -p gatecast-bench`.
# usage: [SETUP=redis2] [RPORT=6395] bench/idle-cluster.sh BIN COUNT [NET]
set -u
BIN=$1; COUNT=$2; NET=${3:-0}; SETUP=${SETUP:-redis2}; RPORT=${RPORT:-6395}
BENCH=./target/release/gatecast-bench
if redis-cli -p $RPORT ping >/dev/null 2>&1; then echo "port $RPORT is taken: set RPORT" >&2; exit 1; fi
redis-server --port $RPORT --save '' --appendonly no --bind 127.0.0.1 --loglevel warning >/dev/null & r=$!
for i in $(seq 50); do redis-cli -p $RPORT ping >/dev/null 2>&1 && break; sleep 0.1; done
common=(--inner-listen 127.0.0.1:0 --advertise-ip 127.0.0.1 --handshake-rate 0 --rebalance off --log-level warn)
[ "$SETUP" != memory ] && common+=(--redis-url redis://127.0.0.1:$RPORT)
$BIN --listen 127.0.0.1:9180 --api-listen 127.0.0.1:9181 "${common[@]}" & a=$!
pids=($a); api=127.0.0.1:9181
if [ "$SETUP" = redis2 ]; then
  $BIN --listen 127.0.0.1:9280 --api-listen 127.0.0.1:9281 "${common[@]}" & b=$!
  pids+=($b); api=127.0.0.1:9281
fi
for i in $(seq 100); do curl -sf 127.0.0.1:9181/readyz >/dev/null && curl -sf http://$api/readyz >/dev/null && break; sleep 0.1; done
other=(); [ "$SETUP" = redis2 ] && other=(--other-pid $b)
$BENCH --source-net $NET idle --pid $a "${other[@]}" --addr 127.0.0.1:9180 --api $api \
  --count $COUNT --groups 10 --push uid --callers 32
kill -TERM "${pids[@]}"; wait "${pids[@]}"
kill $r; wait $r 2>/dev/null
