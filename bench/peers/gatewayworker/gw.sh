# shellcheck shell=bash
# Sourced by bench/side-by-side.sh: starts the GatewayWorker cluster of its
# gw1 / gw2 set-ups (bench/peers/gatewayworker/start.php; run setup.sh once
# first).
#
# gw_start gw1|gw2 A_PORT A_API B_PORT B_API
#   Node a: Register on A_PORT+9, gateway "gateway-a" on A_PORT (inner ports
#   A_PORT+10...), BusinessWorkers, HTTP API on A_API. gw2 adds node b
#   (gateway-b on B_PORT, inner ports B_PORT+10..., its BusinessWorkers and
#   API on B_API), registered with node a's Register: two servers of one
#   cluster. The masters run in the foreground as children of the calling
#   shell (so `kill` + `wait` stop them). Returns once every process is up
#   and every BusinessWorker is connected to every gateway process, with
#   PIDS: the masters, then every child (all of them count for CPU);
#   MEM_PIDS: gateway-a's processes, comma-separated (they hold the clients:
#   their summed RSS is the idle figure).
#   GW_GATEWAYS (6), GW_WORKERS (2), GW_API_PROCS (4): processes per node.
gw_start() {
  local dir=bench/peers/gatewayworker nodes=1
  local g=${GW_GATEWAYS:-6} w=${GW_WORKERS:-2} a=${GW_API_PROCS:-4}
  [ "$1" = gw2 ] && nodes=2
  local run=${TMPDIR:-/tmp}/side-by-side-gw-$2
  rm -rf "$run" && mkdir -p "$run"
  local env=(GW_RUN="$run" GW_REGISTER=127.0.0.1:$(($2 + 9)) GW_GATEWAYS="$g" GW_WORKERS="$w"
    GW_API_PROCS="$a" GW_CLUSTER_GATEWAYS=$((g * nodes)) GW_CLUSTER_WORKERS=$((w * nodes)))
  env "${env[@]}" GW_NODE=a GW_PORT="$2" GW_API_PORT="$3" GW_RUN_REGISTER=1 \
    php $dir/start.php start >"$run/out.a" 2>&1 &
  PIDS=($!)
  local apis=("$3")
  if [ "$nodes" = 2 ]; then
    env "${env[@]}" GW_NODE=b GW_PORT="$4" GW_API_PORT="$5" GW_RUN_REGISTER=0 \
      php $dir/start.php start >"$run/out.b" 2>&1 &
    PIDS+=($!)
    apis+=("$5")
  fi
  local expect=$((nodes * (g + w + a) + 1)) ready files p
  for _ in $(seq 200); do
    ready=1
    for p in "${apis[@]}"; do curl -sf "http://127.0.0.1:$p/readyz" >/dev/null || ready=0; done
    files=("$run"/pid.*)
    [ $ready = 1 ] && [ ${#files[@]} -ge $expect ] && break
    sleep 0.05
  done
  local f
  for f in "$run"/pid.*; do PIDS+=("$(cat "$f")"); done
  MEM_PIDS=$(cat "$run"/pid.gateway-a.* | paste -sd,)
}
