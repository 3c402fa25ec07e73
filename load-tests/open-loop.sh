#!/usr/bin/env bash
# Latency at a fixed request rate, with the CPU each process used.
# Usage: load-tests/open-loop.sh BACKEND RATE SECONDS [DATA_DIR]   (BACKEND: memory or redis)
# Starts `tandem serve` on DATA_DIR's store (built by bench-serve.sh first), runs
# `tandem-load --rate RATE` against it, and prints the cores used by the server, the load
# generator and redis-server over 10 s of the run (from /proc/<pid>/stat).
# WARMUP (default 5) seconds of the same load run first and are not counted: a server's first
# seconds after a start are not its steady state. SEED (default 42) picks the requests;
# TIMELINE=1 adds each second's p99 and max, to tell a stall from a steady tail. MIX (passed
# to --mix, e.g. MIX=event=0,upsert=0) changes the scenario weights.
set -euo pipefail
BACKEND=$1
RATE=$2
SECS=$3
DIR=${4:-data/bench-1m}
BIN=${BENCH_BIN:-./target/release}
PORT=${BENCH_PORT:-18080}
[ -f "$DIR/raw/items.csv" ] || { echo "no catalog in $DIR/raw: run make bench-serve first"; exit 1; }
(( SECS >= 15 )) || { echo "SECONDS must be at least 15 (CPU is measured over 10 s of the run)"; exit 1; }

TANDEM_DATA_DIR="$DIR/store" TANDEM_INDEX__BACKEND=embedded TANDEM_SESSION__BACKEND=$BACKEND \
  TANDEM_SESSION__KEY_PREFIX="open-loop-$(date +%s)" \
  $BIN/tandem serve --catalog "$DIR/raw" --model "${BENCH_MODEL:-models/demo}" \
  --bind "127.0.0.1:$PORT" >"$DIR/open-loop-serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  kill -0 $server 2>/dev/null || { echo "server exited:"; tail -20 "$DIR/open-loop-serve.log"; exit 1; }
  sleep 0.5
done

WARMUP=${WARMUP:-5}
$BIN/tandem-load --url "http://127.0.0.1:$PORT" --catalog "$DIR/raw" --rate "$RATE" \
  --duration "$SECS" --warmup "$WARMUP" --seed "${SEED:-42}" --label "$BACKEND" \
  ${TIMELINE:+--timeline} ${MIX:+--mix "$MIX"} &
load=$!
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
redis=$(pgrep -x redis-server | head -1 || true)
sleep $((WARMUP + 3))
s0=$(ticks $server); l0=$(ticks $load); r0=$( [ -n "$redis" ] && ticks "$redis" || echo 0)
sleep 10
s1=$(ticks $server); l1=$(ticks $load); r1=$( [ -n "$redis" ] && ticks "$redis" || echo 0)
hz=$(getconf CLK_TCK)
wait $load
awk -v s=$((s1 - s0)) -v l=$((l1 - l0)) -v r=$((r1 - r0)) -v hz="$hz" 'BEGIN {
  printf "cores used over 10 s of the run: server %.2f, load generator %.2f, redis-server %.2f\n",
    s / hz / 10, l / hz / 10, r / hz / 10 }'
