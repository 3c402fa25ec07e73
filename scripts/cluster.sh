#!/usr/bin/env bash
# `make cluster`: the production shape on one machine. Redis (the one on :6379 when it
# answers, else one started here), a Qdrant server (scripts/qdrant-server.sh, QDRANT_BIN), and
# two replicas of `tandem serve` on :8081 and :8082 over the demo catalog, with
# index.backend=qdrant and session.backend=redis, each with its own data dir and one shared
# model store. Replica 1 starts first and indexes the catalog into the empty collection;
# replica 2 starts once replica 1 is ready. Ctrl-C stops everything started here.
#
# Usage: scripts/cluster.sh [DIR]   (default data/cluster; the Qdrant storage, the replicas'
#        data dirs, the model store and the logs live under it, and survive a restart)
# Env: TANDEM_BIN (default ./target/debug/tandem), CATALOG (data/demo/raw), MODEL (models/demo),
#      TANDEM_ADMIN_KEY (default cluster-demo-key, printed),
#      CLUSTER_HOST (127.0.0.1), QDRANT_BIN (see scripts/qdrant-server.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-data/cluster}
BIN=${TANDEM_BIN:-./target/debug/tandem}
CATALOG=${CATALOG:-data/demo/raw}
MODEL=${MODEL:-models/demo}
HOST=${CLUSTER_HOST:-127.0.0.1}
REDIS_PORT=6379
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

[ -x "$BIN" ] || { echo "no $BIN: run 'make demo-data' (it builds it)" >&2; exit 1; }
[ -f "$CATALOG/items.csv" ] || { echo "no $CATALOG/items.csv: run 'make demo-data'" >&2; exit 1; }

PIDS=()
REDIS_PID=
cleanup() {
  trap - EXIT INT TERM
  echo "== stopping the cluster"
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  scripts/qdrant-server.sh stop "$DIR/qdrant" || true
  if [ -n "$REDIS_PID" ]; then kill -TERM "$REDIS_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Redis: reuse the one on :6379 when it answers.
if redis-cli -h 127.0.0.1 -p $REDIS_PORT ping >/dev/null 2>&1; then
  echo "== Redis: reusing 127.0.0.1:$REDIS_PORT"
else
  command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
  echo "== Redis: starting on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port $REDIS_PORT --save "" --appendonly no \
    >"$DIR/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 50); do redis-cli -p $REDIS_PORT ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

echo "== Qdrant"
qdrant_env=$(scripts/qdrant-server.sh start "$DIR/qdrant")
eval "$qdrant_env"

export TANDEM_INDEX__BACKEND=qdrant
export TANDEM_INDEX__QDRANT_URL=$QDRANT_URL
export TANDEM_INDEX__COLLECTION=${TANDEM_INDEX__COLLECTION:-tandem_cluster}
export TANDEM_SESSION__BACKEND=redis
export TANDEM_SESSION__REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export TANDEM_SESSION__KEY_PREFIX=${TANDEM_SESSION__KEY_PREFIX:-tandem-cluster}
export TANDEM_REGISTRY__MODEL_STORE=$DIR/models
# The admin API (models, experiments) on either replica; one key for both.
export TANDEM_ADMIN_KEY=${TANDEM_ADMIN_KEY:-cluster-demo-key}
mkdir -p "$DIR/models"

start_replica() {
  local n=$1 port=$2
  mkdir -p "$DIR/replica-$n"
  echo "== replica $n on $HOST:$port (data dir $DIR/replica-$n, log $DIR/replica-$n.log)"
  TANDEM_DATA_DIR="$DIR/replica-$n" \
    "$BIN" serve --catalog "$CATALOG" --model "$MODEL" --bind "$HOST:$port" \
    >>"$DIR/replica-$n.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 1 600); do
    if curl -fs "http://$HOST:$port/readyz" >/dev/null 2>&1; then
      echo "   ready: http://$HOST:$port"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { echo "replica $n exited:" >&2; tail -20 "$DIR/replica-$n.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "replica $n was not ready within 5 minutes" >&2
  exit 1
}

start_replica 1 8081
start_replica 2 8082
echo "== cluster up: http://$HOST:8081 and http://$HOST:8082 (Qdrant REST $QDRANT_HTTP_URL); Ctrl-C stops it"
echo "   admin key (X-API-Key): $TANDEM_ADMIN_KEY"
# Stop everything when either replica exits.
wait -n "${PIDS[@]}"
echo "a replica stopped (see $DIR/replica-*.log); stopping the rest" >&2
exit 1
