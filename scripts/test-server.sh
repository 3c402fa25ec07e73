# Sourced by the scripts that drive a real `tandem serve` (scripts/fuzz-api.sh,
# tests/gorse/run.sh). `start_test_server SEED KEY` generates a 300-item catalog, trains a tiny
# model on it (so a run needs nothing but this repo), and starts `$BIN serve` on a free
# loopback port: memory sessions, the embedded index under a throw-away data dir, KEY as the
# admin key. It returns once /readyz answers, with WORK (the scratch dir), BASE (the server's
# URL) and SERVER_PID set; the server is stopped and WORK removed when the script exits.
WORK=$(mktemp -d)
SERVER_PID=
stop_test_server() {
  if [ -n "$SERVER_PID" ]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap stop_test_server EXIT

start_test_server() {
  local seed=$1 key=$2 port
  "$BIN" generate --out "$WORK/catalog" --items 300 --users 60 --interactions 3000 --seed "$seed" >/dev/null
  "$BIN" train --data "$WORK/catalog" --out "$WORK/model" --epochs 1 --dim 16 --hidden 32 >/dev/null 2>&1
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  BASE="http://127.0.0.1:$port"
  TANDEM_BIND="127.0.0.1:$port" \
  TANDEM_DATA_DIR="$WORK/data" \
  TANDEM_MODEL_PATH="$WORK/model" \
  TANDEM_SERVER__CATALOG_DIR="$WORK/catalog" \
  TANDEM_SESSION__BACKEND=memory \
  TANDEM_ADMIN_KEY="$key" \
  RUST_LOG=${RUST_LOG:-warn} \
    "$BIN" serve >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    if curl -fsS "$BASE/readyz" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "tandem serve exited before it was ready:"; cat "$WORK/server.log"; exit 1
    fi
    sleep 0.2
  done
  echo "tandem serve not ready after 120 s"; cat "$WORK/server.log"; exit 1
}
