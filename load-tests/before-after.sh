#!/usr/bin/env bash
# Serving, two builds compared (issue 33 before/after): the same catalog, model and load against
# two builds, runs interleaved; prints the load generator's summary and the server's CPU time.
# Usage: load-tests/before-after.sh DIR BEFORE_BIN_DIR AFTER_BIN_DIR [ROUNDS] [SECONDS]
# (each BIN_DIR holds tandem and tandem-load; each build gets its own store under DIR)
#
# Environment, all optional:
#   RAW=DIR        the catalog to serve (default DIR/raw, generated with 50k items if absent)
#   STORE=DIR      one store for both builds (a 1M index is built once, by the first start)
#   MODEL=DIR      the checkpoint both sides serve (default models/demo); BEFORE_MODEL /
#                  AFTER_MODEL override it per side, to compare two models on one build
#   MIX=...        tandem-load's --mix; ATTR_FILTERS=... its --attr-filters
#   CONCURRENCY=N  connections (default 4); PORT (default 18333)
#   FILTERABLE='["brand"]'  [catalog] filterable of the servers
# The server's CPU per request comes from tandem-load --server-pid (timed run only).
set -euo pipefail
DIR=$1; BEFORE=$2; AFTER=$3; ROUNDS=${4:-2}; SECS=${5:-30}
PORT=${PORT:-18333}
RAW=${RAW:-$DIR/raw}
MODEL=${MODEL:-models/demo}
BEFORE_MODEL=${BEFORE_MODEL:-$MODEL}; AFTER_MODEL=${AFTER_MODEL:-$MODEL}
CONCURRENCY=${CONCURRENCY:-4}
export TANDEM_ADMIN_KEY=bench33-key
mkdir -p "$DIR"
[ -f "$RAW/items.csv" ] || "$AFTER/tandem" generate --out "$RAW" --items 50000 --users 10000 --interactions 200000 --seed 11
if [ -n "${FILTERABLE:-}" ]; then export TANDEM_CATALOG__FILTERABLE=$FILTERABLE; fi
load_args=()
[ -n "${MIX:-}" ] && load_args+=(--mix "$MIX")
[ -n "${ATTR_FILTERS:-}" ] && load_args+=(--attr-filters "$ATTR_FILTERS")
run() {
  local label=$1 bin=$2 model=$3
  export TANDEM_DATA_DIR="${STORE:-$DIR/store-$label}" TANDEM_INDEX__BACKEND=embedded TANDEM_SESSION__BACKEND=memory
  "$bin/tandem" serve --catalog "$RAW" --model "$model" --bind "127.0.0.1:$PORT" >"$DIR/serve-$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 1800); do curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 1; done
  local t0; t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  echo "== $label ($bin), $(date -u +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  # The newest tandem-load (AFTER's) drives both, so that only the server differs.
  "$AFTER/tandem-load" --url "http://127.0.0.1:$PORT" --catalog "$RAW" --duration "$SECS" --warmup 5 \
     --concurrency "$CONCURRENCY" --label "$label" --server-pid "$pid" "${load_args[@]}" > "$DIR/load-$label.out" 2>&1
  local t1; t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  local hz; hz=$(getconf CLK_TCK)
  echo "== $label: server CPU $(( (t1 - t0) * 1000 / hz )) ms over the run (incl. warm-up), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  sed -n '/requests ok/,$p' "$DIR/load-$label.out"
  kill $pid; wait $pid 2>/dev/null || true
}
for r in $(seq 1 "$ROUNDS"); do run before "$BEFORE" "$BEFORE_MODEL"; run after "$AFTER" "$AFTER_MODEL"; done
