#!/usr/bin/env python3
"""The served `similar` (issue 31): same-category share of GET /v1/items/{id}/similar.

Usage: load-tests/similar.py URL DATA_DIR [--k 10] [--bestsellers 20] [--random 100] [--seed 7]

DATA_DIR holds the catalog the server serves (items.csv, interactions.csv). Anchors: the
`--bestsellers` items with the most distinct users in interactions.csv (as `tandem eval
--similar` picks them), and `--random` items drawn uniformly (Python's random with --seed, so
not the same draw as `tandem eval --similar`), both among items with a category. For each
anchor it asks the server for `k` similar items (the default filters: available items only)
and counts the share of the answer that shares at least one category with the anchor. Prints
the mean share per group, and one JSON line.
"""

import argparse
import csv
import json
import random
import sys
import urllib.parse
import urllib.request
from collections import defaultdict


def categories(row):
    raw = row.get("categories") or row.get("genres") or ""
    cats = {c.strip().lower() for c in raw.split("|")}
    return {c for c in cats if c and c != "(no genres listed)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("data")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--bestsellers", type=int, default=20)
    ap.add_argument("--random", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    cats = {}
    order = []
    with open(f"{args.data}/items.csv", newline="") as f:
        for row in csv.DictReader(f):
            cats[row["item_id"]] = categories(row)
            order.append(row["item_id"])
    users = defaultdict(set)
    with open(f"{args.data}/interactions.csv", newline="") as f:
        for row in csv.DictReader(f):
            users[row["item_id"]].add(row["user_id"])
    with_cats = [i for i in order if cats[i]]
    pos = {i: k for k, i in enumerate(order)}
    by_count = sorted((i for i in with_cats if users[i]), key=lambda i: (-len(users[i]), pos[i]))
    groups = {
        "bestsellers": by_count[: args.bestsellers],
        "random": random.Random(args.seed).sample(with_cats, min(args.random, len(with_cats))),
    }

    out = {}
    for name, anchors in groups.items():
        shares = []
        for a in anchors:
            q = urllib.parse.quote(a, safe="")
            with urllib.request.urlopen(f"{args.url}/v1/items/{q}/similar?k={args.k}") as r:
                body = json.load(r)
            got = [it["item_id"] for it in body["items"]]
            if not got:
                continue
            same = sum(1 for i in got if cats.get(i, set()) & cats[a])
            shares.append(same / len(got))
        mean = sum(shares) / len(shares) if shares else float("nan")
        out[f"served_similar_same_category@{args.k}_{name}"] = round(mean, 4)
        print(f"{name}: {len(shares)} anchors, same-category share {mean:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
