#!/usr/bin/env bash
# A local 3-master Redis Cluster and two deal-flow coordinators on loopback.
#   scripts/local-cluster.sh start [DIR]   builds, starts everything, prints the env to use
#   scripts/local-cluster.sh stop  [DIR]   kills exactly the pids recorded in DIR/pids
# DIR defaults to $LOCAL_CLUSTER_DIR or /tmp/saga-local-cluster. Ports: 7101-7103 (Redis),
# 8101-8102 (coordinators' HTTP); override with BASE_PORT / HTTP_BASE_PORT.
set -euo pipefail
cmd="${1:-start}"
dir="${2:-${LOCAL_CLUSTER_DIR:-/tmp/saga-local-cluster}}"
base="${BASE_PORT:-7101}"
http_base="${HTTP_BASE_PORT:-8101}"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${BIN_DIR:-$root/target/debug}"

stop() {
  [ -f "$dir/pids" ] || { echo "local-cluster: no $dir/pids; nothing to stop"; return 0; }
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" && echo "stopped $name (pid $pid)"; fi
  done < "$dir/pids"
  # Bounded wait for the coordinators' graceful shutdown, then SIGKILL what is left of ours.
  for _ in $(seq 1 150); do
    alive=0
    while read -r pid _; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$dir/pids"
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  while read -r pid _; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"; done < "$dir/pids"
  rm -f "$dir/pids"
}

start() {
  command -v redis-server >/dev/null || { echo "local-cluster: redis-server is not installed" >&2; exit 1; }
  mkdir -p "$dir"
  [ -f "$dir/pids" ] && { echo "local-cluster: already running ($dir/pids); run stop first" >&2; exit 1; }
  if [ -z "${BIN_DIR:-}" ]; then (cd "$root" && cargo build -q -p saga-examples --bins); fi
  : > "$dir/pids"
  urls=()
  for i in 0 1 2; do
    port=$((base + i))
    mkdir -p "$dir/redis-$port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/redis-$port/nodes.conf" --dir "$dir/redis-$port" \
      --appendonly yes --appendfsync always --maxmemory-policy noeviction --save '' \
      > "$dir/redis-$port/log" 2>&1 &
    echo "$! redis-$port" >> "$dir/pids"
    urls+=("redis://127.0.0.1:$port")
  done
  for i in 0 1 2; do
    for _ in $(seq 1 100); do redis-cli -p $((base + i)) ping >/dev/null 2>&1 && break; sleep 0.1; done
  done
  redis-cli --cluster create 127.0.0.1:$base 127.0.0.1:$((base+1)) 127.0.0.1:$((base+2)) \
    --cluster-replicas 0 --cluster-yes > "$dir/cluster-create.log"
  for i in 0 1 2; do
    for _ in $(seq 1 200); do
      redis-cli -p $((base + i)) cluster info | grep -q cluster_state:ok && break; sleep 0.1
    done
  done
  cluster=$(IFS=,; echo "${urls[*]}")
  for n in 1 2; do
    "$bin/deal-flow-coordinator" --cluster-urls "$cluster" --owner "local-$n" \
      --http-addr "127.0.0.1:$((http_base + n - 1))" --no-auth --log-format json \
      > "$dir/coordinator-$n.out" 2> "$dir/coordinator-$n.err" &
    echo "$! coordinator-$n" >> "$dir/pids"
  done
  for n in 1 2; do
    for _ in $(seq 1 300); do grep -q '"ready"' "$dir/coordinator-$n.out" 2>/dev/null && break; sleep 0.1; done
    grep -q '"ready"' "$dir/coordinator-$n.out" || { echo "coordinator-$n did not start:" >&2; cat "$dir/coordinator-$n.err" >&2; stop; exit 1; }
  done
  echo "REDIS_CLUSTER_URLS=$cluster"
  echo "coordinators: http://127.0.0.1:$http_base http://127.0.0.1:$((http_base + 1)) (pids in $dir/pids)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
