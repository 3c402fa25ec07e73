#!/usr/bin/env bash
# make fuzz-api: schemathesis (from PyPI, in a venv under ~/.cache) against /openapi.json of a
# `tandem serve` started here on a free loopback port with a small generated catalog, with
# every check (`--checks all`): no server errors, responses that keep to the schema, requests
# the schema allows accepted and requests it forbids refused. Passes only with 0 failures.
#
#   FUZZ_EXAMPLES  examples per operation (default 100; .ci/run uses a reduced run)
#   FUZZ_SEED      schemathesis seed (default 1, so that a failure reproduces)
#   FUZZ_VENV      where the venv lives (default ~/.cache/tandem/fuzz-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

EXAMPLES=${FUZZ_EXAMPLES:-100}
SEED=${FUZZ_SEED:-1}
VENV=${FUZZ_VENV:-$HOME/.cache/tandem/fuzz-venv}
SCHEMATHESIS_VERSION=4.32.5

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build -q --bin tandem
BIN=${TANDEM_BIN:-${CARGO_TARGET_DIR:-./target}/debug/tandem}
WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" generate --out "$WORK/catalog" --items 300 --users 60 --interactions 3000 --seed 3 >/dev/null
# A tiny model trained here, so the run needs nothing but this repo.
"$BIN" train --data "$WORK/catalog" --out "$WORK/model" --epochs 1 --dim 16 --hidden 32 >/dev/null 2>&1
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
# A key, sent with every request, so that catalog writes and the Gorse API (/api) are fuzzed
# too rather than refused.
FUZZ_KEY="fuzz-$(date +%s)-$$"

# Memory session backend and embedded index under a throw-away data dir; the concurrency limit
# is raised so that schemathesis' workers never see a 429 they would count as noise.
TANDEM_BIND="127.0.0.1:$PORT" \
TANDEM_DATA_DIR="$WORK/data" \
TANDEM_MODEL_PATH="$WORK/model" \
TANDEM_SERVER__CATALOG_DIR="$WORK/catalog" \
TANDEM_SESSION__BACKEND=memory \
TANDEM_ADMIN_KEY="$FUZZ_KEY" \
RUST_LOG=${RUST_LOG:-warn} \
  "$BIN" serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 600); do
  if curl -fsS "$BASE/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "tandem serve exited before it was ready:"; cat "$WORK/server.log"; exit 1
  fi
  sleep 0.2
done
curl -fsS "$BASE/readyz" >/dev/null || { echo "tandem serve not ready after 120 s"; cat "$WORK/server.log"; exit 1; }

# The served document states the latest event time the server accepts, which moves at each
# full hour (UTC): a run that spans one could see an edge value accepted. Start after it.
while [ "$(date -u +%M)" -ge 57 ]; do echo "waiting for the hour to turn"; sleep 20; done
echo "fuzzing $BASE/openapi.json: $EXAMPLES examples per operation, seed $SEED"
status=0
fuzz() {
  "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --workers 2 \
    --request-timeout 10 \
    --generation-database none \
    --suppress-health-check all \
    --no-color "$@" || status=$?
}
# tandem's own API with every check: the schema states the rules the server keeps. Without
# the key, so that catalog writes (401) cannot add categories after the document, which lists
# the known ones, was read.
fuzz --checks all --exclude-path-regex '^/api/'
# The Gorse edge (/api) answers as Gorse does, whose document does not state its input rules
# (page sizes, cursors, durations, label lengths): no 5xx, and answers that match the schema.
fuzz --checks not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance \
  --header "X-API-Key: $FUZZ_KEY" --include-path-regex '^/api/'

if grep -q '"level":"ERROR"\|ERROR' "$WORK/server.log"; then
  echo "server logged errors during the run:"; grep 'ERROR' "$WORK/server.log" | head -20
fi
exit $status
