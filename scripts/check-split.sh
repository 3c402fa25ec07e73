#!/usr/bin/env bash
# Checks that `tandem import movielens` + `tandem split` reproduce the shared evaluation split of
# ml-latest-small: the same rows in every file (row order and number formatting aside), and the
# same counts in stats.json. Needs the shared data, so it runs locally, not in CI.
#
#   scripts/check-split.sh [SHARED_DIR]      # default: the first of ../shared, ../../shared
#   TANDEM_BIN=target/release/tandem scripts/check-split.sh
set -euo pipefail
cd "$(dirname "$0")/.."

shared="${1:-}"
if [ -z "$shared" ]; then
  for d in ../shared ../../shared /work/shared; do
    if [ -d "$d/eval/ml-latest-small" ]; then shared="$d"; break; fi
  done
fi
raw="$shared/datasets/ml-latest-small"
want="$shared/eval/ml-latest-small"
if [ ! -d "$raw" ] || [ ! -d "$want" ]; then
  echo "check-split: no shared data found (pass the directory holding datasets/ and eval/)" >&2
  exit 2
fi

bin="${TANDEM_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --quiet --bin tandem
  bin=target/debug/tandem
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$bin" import movielens --src "$raw" --out "$tmp/import"
"$bin" split --data "$tmp/import" --out "$tmp/split"

python3 - "$tmp/split" "$want" <<'PY'
import csv, json, os, sys

got_dir, want_dir = sys.argv[1], sys.argv[2]
failed = False

def rows(path, columns, norm):
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return sorted(tuple(norm(c, row[c]) for c in columns) for row in r)

def interaction(col, v):
    return float(v) if col == "rating" else int(v) if col == "timestamp" else v

for rel in ["train.csv", "test.csv", "onboard.csv", "onboard_test.csv", "val/train.csv", "val/test.csv", "items.csv"]:
    if rel == "items.csv":
        cols, norm = ["item_id", "title", "genres"], lambda c, v: v
    else:
        cols, norm = ["user_id", "item_id", "rating", "timestamp"], interaction
    a = rows(os.path.join(got_dir, rel), cols, norm)
    b = rows(os.path.join(want_dir, rel), cols, norm)
    if a == b:
        print(f"same rows   {rel:18} {len(a):>7} rows")
    else:
        failed = True
        sa, sb = set(a), set(b)
        print(f"DIFFERENT   {rel:18} tandem {len(a)} rows, shared {len(b)} rows; "
              f"only in tandem: {sorted(sa - sb)[:3]}, only in shared: {sorted(sb - sa)[:3]}")

got = json.load(open(os.path.join(got_dir, "stats.json")))
want = json.load(open(os.path.join(want_dir, "stats.json")))
common = sorted(k for k in want if k in got and k not in ("sha256", "dataset"))
diff = [k for k in common if got[k] != want[k]]
if diff:
    failed = True
    for k in diff:
        print(f"DIFFERENT   stats.json {k}: tandem {got[k]}, shared {want[k]}")
else:
    print(f"same counts stats.json ({len(common)} keys: {', '.join(common)})")
identical = [k for k, v in want["sha256"].items() if got["sha256"].get(k) == v]
print(f"byte-identical files (sha256): {', '.join(identical) or 'none'}")
print("check-split: FAILED" if failed else "check-split: OK, the split matches the shared one")
sys.exit(1 if failed else 0)
PY
