#!/usr/bin/env bash
# Serving, two builds compared (issue 33 before/after): the same catalog, model and load against
# two builds, runs interleaved; prints the load generator's summary and the server's CPU time.
# Usage: load-tests/before-after.sh DIR BEFORE_BIN_DIR AFTER_BIN_DIR [ROUNDS] [SECONDS]
# (each BIN_DIR holds tandem and tandem-load; each build gets its own store under DIR)
# Env: BEFORE_MODEL / AFTER_MODEL, the checkpoint each side serves (default models/demo, relative
# to the current directory), to compare two models on one build; PORT (default 18333).
set -euo pipefail
DIR=$1; BEFORE=$2; AFTER=$3; ROUNDS=${4:-2}; SECS=${5:-30}
PORT=${PORT:-18333}
BEFORE_MODEL=${BEFORE_MODEL:-models/demo}; AFTER_MODEL=${AFTER_MODEL:-models/demo}
export TANDEM_ADMIN_KEY=bench33-key
mkdir -p "$DIR"
[ -f "$DIR/raw/items.csv" ] || "$AFTER/tandem" generate --out "$DIR/raw" --items 50000 --users 10000 --interactions 200000 --seed 11
run() {
  local label=$1 bin=$2 model=$3
  export TANDEM_DATA_DIR="$DIR/store-$label" TANDEM_INDEX__BACKEND=embedded TANDEM_SESSION__BACKEND=memory
  "$bin/tandem" serve --catalog "$DIR/raw" --model "$model" --bind "127.0.0.1:$PORT" >"$DIR/serve-$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 1200); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 1; done
  local t0; t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  "$bin/tandem-load" --url "http://127.0.0.1:$PORT" --catalog "$DIR/raw" --duration "$SECS" --warmup 5 \
     --concurrency 4 --label "$label" > "$DIR/load-$label.out" 2>&1
  local t1; t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  local hz; hz=$(getconf CLK_TCK)
  echo "== $label: server CPU $(( (t1 - t0) * 1000 / hz )) ms over the run (incl. warm-up)"
  tail -25 "$DIR/load-$label.out"
  kill $pid; wait $pid 2>/dev/null || true
}
for r in $(seq 1 "$ROUNDS"); do run before "$BEFORE" "$BEFORE_MODEL"; run after "$AFTER" "$AFTER_MODEL"; done
