#!/usr/bin/env bash
# Start-up time and resident memory of `tandem serve` with the embedded index (issue 37).
# Usage: load-tests/startup-memory.sh BIN RAW_DIR STORE_DIR PORT LABEL [SETTLE_SECONDS]
# Starts BIN serve on RAW_DIR's catalog with the store STORE_DIR (a first start when the
# store is empty, a restart when a server used it before), polls /readyz every 0.2 s, and
# once ready waits SETTLE_SECONDS (default 10), then prints one JSON line: seconds to ready,
# the server's CPU seconds (user + system) until then,
# RssAnon and RssFile (kB, /proc/PID/status), and the resident kB per kind of mapping from
# /proc/PID/smaps (the engine's files by directory, the heap and anonymous mappings). The
# server is stopped with SIGTERM (a clean stop) at the end. Run it under the benchmark lock.
set -euo pipefail
BIN=$1
RAW=$2
STORE=$3
PORT=$4
LABEL=$5
SETTLE=${6:-10}
MODEL=${BENCH_MODEL:-models/demo}
LOG="$STORE.$LABEL.log"
mkdir -p "$(dirname "$STORE")"

start=$(date +%s.%N)
TANDEM_DATA_DIR="$STORE" TANDEM_INDEX__BACKEND=embedded TANDEM_SESSION__BACKEND=memory \
  "$BIN" serve --catalog "$RAW" --model "$MODEL" --bind "127.0.0.1:$PORT" >"$LOG" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
  kill -0 $pid 2>/dev/null || { echo "server exited:"; tail -20 "$LOG"; exit 1; }
  sleep 0.2
done
ready=$(date +%s.%N)
cpu_ticks=$(awk '{print $14 + $15}' /proc/$pid/stat)
sleep "$SETTLE"
status=$(cat /proc/$pid/status)
python3 - "$pid" "$LABEL" "$start" "$ready" "$cpu_ticks" <<'EOF'
import json, re, sys
pid, label, start, ready = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
cpu_secs = int(sys.argv[5]) / 100  # user + system clock ticks at /readyz (USER_HZ = 100)
status = open(f"/proc/{pid}/status").read()
field = lambda n: int(re.search(rf"^{n}:\s+(\d+)", status, re.M).group(1))
kinds = {}
path, rss = None, 0
def flush():
    if path is None:
        return
    p = path
    if "/index/" in p:
        # <root>/index/<version>/shard/...: name the part of the engine the file belongs to.
        parts = p.split("/shard/", 1)[-1].split("/")
        key = "engine: " + "/".join(x for x in parts if not re.fullmatch(r"[0-9a-f-]{36}", x))[:60]
        key = re.sub(r"\d+", "N", key)
    elif p == "":
        key = "anonymous"
    else:
        key = p if p.startswith("[") else "file: " + p.rsplit("/", 1)[-1]
    kinds[key] = kinds.get(key, 0) + rss
for line in open(f"/proc/{pid}/smaps"):
    head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
    if head:
        flush()
        path, rss = head.group(1).strip(), 0
    elif line.startswith("Rss:"):
        rss = int(line.split()[1])
flush()
top = dict(sorted(((k, v) for k, v in kinds.items() if v >= 1024), key=lambda kv: -kv[1]))
print(json.dumps({
    "label": label,
    "ready_secs": round(ready - start, 2),
    "cpu_secs_to_ready": cpu_secs,
    "rss_anon_kb": field("RssAnon"),
    "rss_file_kb": field("RssFile"),
    "vm_hwm_kb": field("VmHWM"),
    "by_mapping_kb": top,
}))
EOF
grep -E "start-up stage done|loaded payloads|catalog indexed|index optimized" "$LOG" \
  | sed -E 's/\x1b\[[0-9;]*m//g' | sed -E 's/^.*INFO //' || true
kill -TERM $pid
wait $pid 2>/dev/null || true
trap - EXIT
