#!/usr/bin/env bash
# Model switch under load (run by `make bench-lifecycle`, under the benchmark lock).
# Usage: load-tests/lifecycle-bench.sh DATA_DIR ITEMS RATE PHASE_SECS
# 1. generates a catalog of ITEMS items and trains a checkpoint on it (once; BENCH_MODEL=DIR
#    uses that checkpoint instead), and a second
#    checkpoint with the same weights under another version id (activation re-embeds and
#    re-indexes the whole catalog whatever the weights are);
# 2. starts `tandem serve` (embedded index, memory sessions) on a fresh store;
# 3. registers the second checkpoint and runs examples/lifecycle_bench: steady-rate traffic
#    while it is activated and then rolled back.
set -euo pipefail
DIR=${1:-data/bench-lifecycle}
ITEMS=${2:-100000}
RATE=${3:-200}
SECS=${4:-15}
BIN=${BIN:-./target/release}
PORT=${BENCH_PORT:-18081}
KEY=bench-$(date +%s)
mkdir -p "$DIR"

if [ ! -f "$DIR/raw/items.csv" ]; then
  echo "== generating $ITEMS items"
  $BIN/tandem generate --out "$DIR/raw" --items "$ITEMS" --users $((ITEMS / 5)) \
    --interactions $((ITEMS * 5)) --seed 5
fi
if [ ! -f "$DIR/ckpt-a/manifest.json" ]; then
  if [ -n "${BENCH_MODEL:-}" ]; then
    # A given checkpoint (e.g. models/demo): training one epoch on a 1M-item catalog takes
    # longer than the rest of the benchmark, and the weights do not matter here.
    echo "== using the checkpoint $BENCH_MODEL"
    cp -r "$BENCH_MODEL" "$DIR/ckpt-a"
  else
    echo "== training a checkpoint"
    $BIN/tandem train --data "$DIR/raw" --out "$DIR/ckpt-a" --epochs 1 --no-validate
  fi
  rm -rf "$DIR/ckpt-b" && cp -r "$DIR/ckpt-a" "$DIR/ckpt-b"
  sed -i -E 's/"model_version": "([^"]+)"/"model_version": "\1-b"/' "$DIR/ckpt-b/manifest.json"
fi
VERSION_B=$(sed -n -E 's/.*"model_version": "([^"]+)".*/\1/p' "$DIR/ckpt-b/manifest.json")

rm -rf "$DIR/store"
echo "== serving $ITEMS items"
TANDEM_ADMIN_KEY=$KEY TANDEM_DATA_DIR="$DIR/store" TANDEM_INDEX__BACKEND=embedded \
  TANDEM_SESSION__BACKEND=memory \
  $BIN/tandem serve --catalog "$DIR/raw" --model "$DIR/ckpt-a" --bind "127.0.0.1:$PORT" \
  >"$DIR/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 900); do
  curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "server exited:"; tail -20 "$DIR/serve.log"; exit 1; }
  sleep 1
done
TANDEM_ADMIN_KEY=$KEY $BIN/tandem models --url "http://127.0.0.1:$PORT" register "$(realpath "$DIR/ckpt-b")" >/dev/null
$BIN/examples/lifecycle_bench --url "http://127.0.0.1:$PORT" --api-key "$KEY" \
  --version "$VERSION_B" --rate "$RATE" --phase-secs "$SECS"
echo "server RSS: $(grep -E 'VmRSS|VmHWM' /proc/$pid/status | tr -s ' ' | tr '\n' ' ')"
grep -E "model activated|rolled back|catalog reconciled|collection version is live" "$DIR/serve.log" || true
