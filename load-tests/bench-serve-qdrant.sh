#!/usr/bin/env bash
# The serving benchmark on the qdrant backend (`make bench-serve BACKEND=qdrant`, under the
# benchmark lock): tandem against a bare Qdrant search on the same collection, same box.
# Usage: load-tests/bench-serve-qdrant.sh DATA_DIR ITEMS SECONDS CONNECTIONS
# 1. generates an ITEMS-item catalog into DATA_DIR/raw (once);
# 2. starts a Qdrant server (scripts/qdrant-server.sh) with its storage in a fresh temporary
#    folder, and `tandem serve` (index.backend=qdrant, session.backend=redis) embeds the catalog
#    into it; prints the time until the collection is green (HNSW built) and tandem is ready;
# 3. with the candidate cache out of play (server.cache_ttl_ms=1, so every request searches):
#    a. tandem, closed loop, CONNECTIONS connections, recommendations only, a third of them
#       filtered by category (`--mix rec_known_user=1,rec_session=1,rec_filtered=1,...=0`);
#    b. the bare search on the same collection, the same mix and connections
#       (`tandem-load --qdrant-collection`: the one request tandem sends per recommendation);
#    c. tandem, open loop at 300 req/s, for the p99;
#    then the ratio a/b, and the RSS of the replica and of Qdrant.
set -euo pipefail
DIR=${1:-data/bench-qdrant-1m}
ITEMS=${2:-1000000}
SECS=${3:-30}
CONN=${4:-4}
BIN=${BENCH_BIN:-./target/release}
PORT=${BENCH_PORT:-18080}
RATE=${BENCH_RATE:-300}
MIX_ZERO="event=0,similar=0,upsert=0"
MIX="rec_known_user=1,rec_session=1,rec_filtered=1,$MIX_ZERO"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)

if [ ! -f "$DIR/raw/items.csv" ]; then
  echo "== generating $ITEMS items"
  $BIN/tandem generate --out "$DIR/raw" --items "$ITEMS" --users 100000 \
    --interactions $((ITEMS * 5)) --seed 11
fi

QDIR=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench-qdrant.XXXXXX")
SERVE_PID=
cleanup() {
  [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null && wait "$SERVE_PID" 2>/dev/null
  scripts/qdrant-server.sh stop "$QDIR" || true
  rm -rf "$QDIR" "$DIR/store"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
qdrant_env=$(scripts/qdrant-server.sh start "$QDIR")
eval "$qdrant_env"
COLLECTION=tandem_bench

export TANDEM_DATA_DIR="$DIR/store"
rm -rf "$TANDEM_DATA_DIR"
export TANDEM_INDEX__BACKEND=qdrant
export TANDEM_INDEX__QDRANT_URL=$QDRANT_URL
export TANDEM_INDEX__COLLECTION=$COLLECTION
export TANDEM_SESSION__BACKEND=redis
export TANDEM_SESSION__KEY_PREFIX="bench-q-$(date +%s)"
export TANDEM_SERVER__CACHE_TTL_MS=1
MODEL=${BENCH_MODEL:-models/demo}

echo "== tandem serve: embedding and indexing $ITEMS items into Qdrant"
started=$(date +%s.%N)
$BIN/tandem serve --catalog "$DIR/raw" --model "$MODEL" --bind "127.0.0.1:$PORT" \
  >"$DIR/serve-qdrant.log" 2>&1 &
SERVE_PID=$!
# The live alias appears once the collection is green (finalize_version waits for it).
green=
for _ in $(seq 1 7200); do
  # (curl's output captured first: `curl | grep -q` fails under pipefail when grep exits early)
  aliases=$(curl -fs "$QDRANT_HTTP_URL/aliases" 2>/dev/null || true)
  if [ -z "$green" ] && [[ $aliases == *"\"$COLLECTION\""* ]]; then
    green=$(date +%s.%N)
    echo "collection green and live after $(echo "$green - $started" | bc) s"
  fi
  curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 $SERVE_PID 2>/dev/null || { echo "server exited:"; tail -20 "$DIR/serve-qdrant.log"; exit 1; }
  sleep 0.5
done
ready=$(date +%s.%N)
echo "tandem ready after $(echo "$ready - $started" | bc) s"
grep -E "collection|catalog loaded|indexed|serving" "$DIR/serve-qdrant.log" | tail -8 || true
info=$(curl -fs "$QDRANT_HTTP_URL/collections/$COLLECTION")
echo "collection: $(echo "$info" | python3 -c 'import json,sys; r=json.load(sys.stdin)["result"]; print("status", r["status"], "points", r["points_count"], "indexed", r["indexed_vectors_count"], "segments", r["segments_count"])')"

# What a new replica's start-up scroll costs the server: every point with payload and vector,
# in pages of 2,000 (REST here, so JSON; tandem's scroll uses gRPC).
python3 - "$QDRANT_HTTP_URL" "$COLLECTION" <<'PY'
import json, sys, time, urllib.request
base, coll = sys.argv[1], sys.argv[2]
t, n, offset, pages = time.time(), 0, None, 0
while True:
    body = {"limit": 2000, "with_payload": True, "with_vector": True}
    if offset is not None:
        body["offset"] = offset
    req = urllib.request.Request(f"{base}/collections/{coll}/points/scroll", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    r = json.load(urllib.request.urlopen(req))["result"]
    n, pages, offset = n + len(r["points"]), pages + 1, r.get("next_page_offset")
    if offset is None:
        break
print(f"scroll of every point (payload + vector), pages of 2,000 over REST: {n} points, {pages} pages, {time.time() - t:.1f} s")
PY

rss() { grep -E 'VmRSS|VmHWM' "/proc/$1/status" | tr -s ' ' | tr '\n' ' '; }

echo "== a. tandem, closed loop, $CONN connections, cache out of play"
$BIN/tandem-load --url "http://127.0.0.1:$PORT" --catalog "$DIR/raw" --duration "$SECS" \
  --warmup 5 --concurrency "$CONN" --mix "$MIX" --label tandem-qdrant | tee "$DIR/tandem.out"
echo "== b. bare Qdrant search (REST), closed loop, $CONN connections"
$BIN/tandem-load --url "$QDRANT_HTTP_URL" --qdrant-collection "$COLLECTION" --catalog "$DIR/raw" \
  --duration "$SECS" --warmup 5 --concurrency "$CONN" --mix "$MIX" --label bare-qdrant \
  | tee "$DIR/bare.out"
echo "== c. tandem, open loop at $RATE req/s"
$BIN/tandem-load --url "http://127.0.0.1:$PORT" --catalog "$DIR/raw" --duration "$SECS" \
  --warmup 5 --rate "$RATE" --mix "$MIX" --label "tandem-qdrant-${RATE}rps" | tee "$DIR/open.out"

rps() { grep -o '"rps":[0-9.]*' "$1" | tail -1 | cut -d: -f2; }
t=$(rps "$DIR/tandem.out"); b=$(rps "$DIR/bare.out")
echo "== tandem $t req/s, bare $b req/s, ratio $(echo "scale=3; $t / $b" | bc)"
echo "replica RSS: $(rss $SERVE_PID)"
echo "qdrant RSS: $(rss "$QDRANT_PID")"
