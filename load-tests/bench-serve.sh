#!/usr/bin/env bash
# The serving load test at 1M items (run by `make bench-serve`, under the benchmark lock).
# Usage: load-tests/bench-serve.sh DATA_DIR SECONDS CONNECTIONS
# 1. generates a 1M-item catalog into DATA_DIR/raw (once),
# 2. the first `tandem serve` embeds it with models/demo and builds the embedded index under
#    DATA_DIR/store (once; later starts reopen it),
# 3. for each session backend (memory, redis): starts `tandem serve`, runs tandem-load,
#    prints the server's peak RSS, and stops the server it started.
set -euo pipefail
DIR=${1:-data/bench-1m}
SECS=${2:-30}
CONN=${3:-8}
BIN=${BENCH_BIN:-./target/release}
PORT=${BENCH_PORT:-18080}
mkdir -p "$DIR"

if [ ! -f "$DIR/raw/items.csv" ]; then
  echo "== generating 1M items"
  $BIN/tandem generate --out "$DIR/raw" --items 1000000 --users 100000 --interactions 5000000 --seed 11
fi

export TANDEM_DATA_DIR="$DIR/store"
export TANDEM_INDEX__BACKEND=embedded
MODEL=${BENCH_MODEL:-models/demo}

run_one() {
  local backend=$1
  echo "== serving with the $backend session store"
  TANDEM_SESSION__BACKEND=$backend TANDEM_SESSION__KEY_PREFIX="bench-$(date +%s)" \
    $BIN/tandem serve --catalog "$DIR/raw" --model "$MODEL" --bind "127.0.0.1:$PORT" \
    >"$DIR/serve-$backend.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 1800); do
    curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || { echo "server exited:"; tail -20 "$DIR/serve-$backend.log"; exit 1; }
    sleep 1
  done
  grep -E "collection version is live|catalog loaded|serving" "$DIR/serve-$backend.log" || true
  $BIN/tandem-load --url "http://127.0.0.1:$PORT" --catalog "$DIR/raw" \
    --duration "$SECS" --concurrency "$CONN" --label "$backend"
  echo "server RSS: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' ' | tr '\n' ' ')"
  kill $pid
  wait $pid 2>/dev/null || true
  trap - EXIT
}

run_one memory
run_one redis
