#!/usr/bin/env bash
# Redis for the tests, so that `make test` needs nothing started by hand.
#
#   scripts/redis-server.sh run CMD...   run CMD with REDIS_URL set: the Redis at $REDIS_URL
#                                        (default redis://127.0.0.1:6379) when it answers, else
#                                        a throw-away redis-server on a free port (no
#                                        persistence), started for CMD and stopped after it
set -euo pipefail

url=${REDIS_URL:-redis://127.0.0.1:6379}

answers() {
  local hostport=${1#redis://}
  hostport=${hostport%%/*}
  redis-cli -h "${hostport%:*}" -p "${hostport##*:}" ping >/dev/null 2>&1
}

case "${1:-}" in
  run)
    shift
    if command -v redis-cli >/dev/null && answers "$url"; then
      REDIS_URL=$url exec "$@"
    fi
    if ! command -v redis-server >/dev/null; then
      echo "make test needs redis-server on PATH (the tests also start their own for cluster and outage cases): sudo apt-get install -y redis-server" >&2
      exit 1
    fi
    dir=$(mktemp -d "${TMPDIR:-/tmp}/tandem-redis.XXXXXX")
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    trap 'kill "$(cat "$dir/redis.pid" 2>/dev/null)" 2>/dev/null || true; rm -rf "$dir"' EXIT
    for _ in $(seq 1 50); do answers "redis://127.0.0.1:$port" && break; sleep 0.1; done
    echo "redis: none answered at $url; started one on 127.0.0.1:$port for this run" >&2
    status=0
    REDIS_URL="redis://127.0.0.1:$port" "$@" || status=$?
    exit $status
    ;;
  *)
    sed -n '2,8p' "$0" >&2
    exit 2
    ;;
esac
