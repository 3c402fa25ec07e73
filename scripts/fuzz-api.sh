#!/usr/bin/env bash
# make fuzz-api: schemathesis (from PyPI, in a venv under ~/.cache) against /openapi.json of a
# `tandem serve` started here on a free loopback port with a small generated catalog
# (scripts/test-server.sh). tandem's own routes get every check (`--checks all`): no server
# errors, responses that keep to the schema, requests the schema allows accepted and requests
# it forbids refused; the Gorse routes (/api) the response checks. Passes only with 0 failures.
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
# A key for the /api run (the /v1 run goes without it; see below).
FUZZ_KEY="fuzz-$(date +%s)-$$"
. scripts/test-server.sh
start_test_server 3 "$FUZZ_KEY"

# The served document states the latest event time the server accepts, which moves at each
# full hour (UTC): a run that spans one could see an edge value accepted. Start after it.
while [ "$(date -u +%M)" -ge 57 ]; do echo "waiting for the hour to turn"; sleep 20; done
echo "fuzzing $BASE/openapi.json: $EXAMPLES examples per operation, seed $SEED"
status=0
# One worker: with two, hypothesis describes strategies by parsing their source with `ast` on
# both threads at once, which Python 3.11.7 can fail with "SystemError: AST constructor
# recursion depth mismatch" (a runtime error of the tool, not of the API; seen 2026-12-07).
fuzz() {
  "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
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
