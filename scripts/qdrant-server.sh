#!/usr/bin/env bash
# A throw-away Qdrant server for tests, `make cluster` and benchmarks (../shared/qdrant/README.md).
#
#   scripts/qdrant-server.sh start DIR   start a server on free ports with its storage under DIR
#                                        (created if missing); prints `export QDRANT_URL=...`
#                                        lines for `eval`, and writes them to DIR/env
#   scripts/qdrant-server.sh stop DIR    stop the server started in DIR (SIGTERM to its pid)
#   scripts/qdrant-server.sh bin         print the server binary that `start` would run
#   scripts/qdrant-server.sh run CMD...  run CMD with QDRANT_URL set: as it is when already set,
#                                        else with a server started for CMD and stopped after it
#                                        (CMD runs without one when no binary is found)
#
# Exported by start: QDRANT_URL (gRPC, what tandem's index.qdrant_url takes), QDRANT_HTTP_URL
# (REST), QDRANT_PID. The binary: $QDRANT_BIN, else the first that exists of
# <repo>/../shared/bin/qdrant and /work/shared/bin/qdrant. It is never copied into the repo.
# The server runs with DIR as its working directory, so no ./config/config.yaml of the caller
# is read; the QDRANT__* variables below set everything it needs.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

find_bin() {
  if [ -n "${QDRANT_BIN:-}" ]; then
    [ -x "$QDRANT_BIN" ] || { echo "QDRANT_BIN=$QDRANT_BIN is not an executable" >&2; return 1; }
    echo "$QDRANT_BIN"
    return 0
  fi
  for b in "$REPO/../shared/bin/qdrant" /work/shared/bin/qdrant; do
    if [ -x "$b" ]; then
      echo "$(cd "$(dirname "$b")" && pwd)/$(basename "$b")"
      return 0
    fi
  done
  echo "no Qdrant server binary: set QDRANT_BIN, or put it at $REPO/../shared/bin/qdrant" >&2
  return 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  local dir=$1 bin http grpc pid
  bin=$(find_bin)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  for attempt in 1 2 3; do
    http=$(free_port)
    grpc=$(free_port)
    [ "$http" != "$grpc" ] || continue
    (
      cd "$dir"
      QDRANT__SERVICE__HOST=127.0.0.1 QDRANT__SERVICE__HTTP_PORT=$http \
      QDRANT__SERVICE__GRPC_PORT=$grpc QDRANT__STORAGE__STORAGE_PATH="$dir/storage" \
      QDRANT__STORAGE__SNAPSHOTS_PATH="$dir/snapshots" QDRANT__TELEMETRY_DISABLED=true \
      QDRANT__LOG_LEVEL="${QDRANT_LOG_LEVEL:-WARN}" \
        exec "$bin" >>"$dir/qdrant.log" 2>&1
    ) &
    pid=$!
    for _ in $(seq 1 150); do
      if curl -fs "http://127.0.0.1:$http/readyz" >/dev/null 2>&1; then
        {
          echo "export QDRANT_URL=http://127.0.0.1:$grpc"
          echo "export QDRANT_HTTP_URL=http://127.0.0.1:$http"
          echo "export QDRANT_PID=$pid"
        } >"$dir/env"
        echo "$pid" >"$dir/pid"
        cat "$dir/env"
        echo "qdrant: pid $pid, gRPC :$grpc, REST :$http, storage $dir/storage, log $dir/qdrant.log" >&2
        return 0
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "qdrant did not start (attempt $attempt); log tail:" >&2
    tail -5 "$dir/qdrant.log" >&2 || true
  done
  return 1
}

stop() {
  local dir=$1 pid
  [ -f "$dir/pid" ] || return 0
  pid=$(cat "$dir/pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
}

case "${1:-}" in
  start) start "${2:?usage: $0 start DIR}" ;;
  stop) stop "${2:?usage: $0 stop DIR}" ;;
  bin) find_bin ;;
  run)
    shift
    if [ -n "${QDRANT_URL:-}" ]; then
      exec "$@"
    fi
    if ! find_bin >/dev/null 2>&1; then
      echo "qdrant: no server binary found; the qdrant cases of the tests skip (fail under CI=true)" >&2
      exec "$@"
    fi
    dir=$(mktemp -d "${TMPDIR:-/tmp}/tandem-qdrant.XXXXXX")
    trap 'stop "$dir"; rm -rf "$dir"' EXIT
    trap 'exit 130' INT TERM
    qdrant_env=$(start "$dir")
    eval "$qdrant_env"
    status=0
    "$@" || status=$?
    exit $status
    ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
