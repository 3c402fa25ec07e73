#!/usr/bin/env bash
# make test-gorse: the published Gorse SDKs, unchanged, against tandem's /api routes. Starts
# `tandem serve` on a free loopback port over a small generated catalog with a tiny model
# trained here and an API key, then runs tests/gorse/sdk_test.py (pygorse 0.5.1 from PyPI, in
# a venv) and tests/gorse/sdk_test.mjs (gorsejs 0.4.8 from npm, `npm ci`). Fails when either
# fails, or when python3's venv or npm is missing (it never skips).
#
#   TANDEM_BIN  the binary (default $CARGO_TARGET_DIR/debug/tandem, else target/debug/tandem)
#   GORSE_VENV  where the venv lives (default ~/.cache/tandem/gorse-venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

HERE=tests/gorse
BIN=${TANDEM_BIN:-${CARGO_TARGET_DIR:-./target}/debug/tandem}
VENV=${GORSE_VENV:-$HOME/.cache/tandem/gorse-venv}
log() { echo "[test-gorse] $*"; }

[ -x "$BIN" ] || { echo "test-gorse: $BIN not found; run cargo build --bin tandem" >&2; exit 2; }
command -v npm >/dev/null || { echo "test-gorse: npm is missing (Debian: apt-get install -y nodejs npm)" >&2; exit 2; }

# The pinned SDKs: reinstalled only when the pins change.
if ! cmp -s "$HERE/requirements.txt" "$VENV/.installed" 2>/dev/null; then
  log "installing pygorse (tests/gorse/requirements.txt) into $VENV"
  python3 -m venv "$VENV" || { echo "test-gorse: python3 -m venv failed (Debian: apt-get install -y python3-venv)" >&2; exit 2; }
  "$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
  cp "$HERE/requirements.txt" "$VENV/.installed"
fi
(cd "$HERE" && npm ci --no-audit --no-fund --silent)

. scripts/test-server.sh
log "generating a catalog, training a tiny model, starting the server"
export GORSE_API_KEY="gorse-sdk-test-key"
start_test_server 5 "$GORSE_API_KEY"
export GORSE_ENDPOINT="$BASE"
log "server ready at $GORSE_ENDPOINT"

status=0
"$VENV/bin/python" "$HERE/sdk_test.py" || status=1
node "$HERE/sdk_test.mjs" || status=1
if [ "$status" -ne 0 ]; then
  echo "--- server log (last 40 lines) ---"; tail -n 40 "$WORK/server.log"
  exit 1
fi
log "both SDKs passed"
