#!/usr/bin/env bash
# `make run`: the demo on the embedded default. Starts `tandem serve` on the demo catalog with
# the shipped checkpoint (the first start embeds and indexes the catalog), seeds the demo's
# interaction history once through POST /v1/events (`tandem replay-events`, the path a shop's
# event pipeline takes), so that the storefront's demo users get personal recommendations at
# once, then prints the address to open and the admin key. Ctrl-C stops the server.
#
# Usage: scripts/run-demo.sh CATALOG_DIR HOST:PORT
# Env: TANDEM_BIN (default $CARGO_TARGET_DIR/debug/tandem, else target/debug/tandem),
#      MODEL (models/demo), TANDEM_DATA_DIR (data; the "seeded" marker lives there),
#      TANDEM_ADMIN_KEY (default: a random key for this run, printed), SEED_HISTORY=0 skips
#      the seeding. Every other TANDEM_* variable reaches the server as usual.
set -euo pipefail
CATALOG=${1:?usage: scripts/run-demo.sh CATALOG_DIR HOST:PORT}
ADDR=${2:?usage: scripts/run-demo.sh CATALOG_DIR HOST:PORT}
BIN=${TANDEM_BIN:-${CARGO_TARGET_DIR:-target}/debug/tandem}
MODEL=${MODEL:-models/demo}
DATA=${TANDEM_DATA_DIR:-data}
HOST=${ADDR%:*}
PORT=${ADDR##*:}
# Where this script reaches the server, and what a browser on this machine opens.
case $HOST in
  0.0.0.0 | "") CLIENT=127.0.0.1 SHOW=localhost ;;
  "[::]") CLIENT="[::1]" SHOW=localhost ;;
  127.0.0.1 | localhost) CLIENT=$HOST SHOW=localhost ;;
  *) CLIENT=$HOST SHOW=$HOST ;;
esac

[ -x "$BIN" ] || { echo "no $BIN: run 'make demo-data' (it builds it)" >&2; exit 1; }
[ -f "$CATALOG/items.csv" ] || { echo "no $CATALOG/items.csv: run 'make demo-data'" >&2; exit 1; }

if [ -z "${TANDEM_ADMIN_KEY:-}" ]; then
  TANDEM_ADMIN_KEY=demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  export TANDEM_ADMIN_KEY
  KEY_NOTE="a random key for this run; set TANDEM_ADMIN_KEY to choose one"
else
  KEY_NOTE="from TANDEM_ADMIN_KEY"
fi

"$BIN" serve --catalog "$CATALOG" --model "$MODEL" --bind "$ADDR" &
PID=$!
stop() {
  trap - INT TERM
  kill -TERM "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  exit 130
}
trap stop INT TERM

BASE="http://$CLIENT:$PORT"
until curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null; do
  if ! kill -0 "$PID" 2>/dev/null; then
    wait "$PID" || exit $?
    exit 1
  fi
  sleep 0.5
done

MARKER="$DATA/demo-history.seeded"
if [ "${SEED_HISTORY:-1}" != 0 ] && [ -f "$CATALOG/interactions.csv" ] && [ ! -f "$MARKER" ]; then
  echo "== seeding the demo's interaction history through POST /v1/events (once; the marker is $MARKER)"
  "$BIN" replay-events --data "$CATALOG" --url "$BASE"
  mkdir -p "$DATA"
  echo "$CATALOG" >"$MARKER"
fi

echo
echo "open http://$SHOW:$PORT/   (onboarding: /onboarding, admin: /admin)"
echo "admin key: $TANDEM_ADMIN_KEY   ($KEY_NOTE)"
echo
wait "$PID"
