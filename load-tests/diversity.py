#!/usr/bin/env python3
"""Distinct categories in the top 20 before and after one click, over a running server.

For each of N anonymous sessions: the rail a stranger sees (k=20), then one click on an item
of the rail (position P, 0-based, default a different one per session), then the rail again.
Prints the distinct categories of each rail, and the min, mean and max after the click, plus
how many of the 20 are in the clicked item's categories.

    python3 load-tests/diversity.py http://127.0.0.1:8080 [--sessions 30] [--k 20]
"""
import argparse
import json
import statistics
import urllib.request


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=30) as r:
        return json.load(r)


def post(base, path, body):
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def distinct(items):
    return len({c for it in items for c in it["categories"]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--sessions", type=int, default=30)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--tag", default="div")
    a = ap.parse_args()
    before, after, share = [], [], []
    for i in range(a.sessions):
        sid = f"{a.tag}-{i}"
        rail = get(a.base, f"/v1/recommendations?session_id={sid}&k={a.k}")["items"]
        clicked = rail[i % len(rail)]
        post(a.base, "/v1/events", {"session_id": sid, "item_id": clicked["item_id"], "type": "click"})
        again = get(a.base, f"/v1/recommendations?session_id={sid}&k={a.k}")
        items = again["items"]
        cats = set(clicked["categories"])
        before.append(distinct(rail))
        after.append(distinct(items))
        share.append(sum(1 for it in items if cats & set(it["categories"])))
        print(
            f"session {i:2}: click #{i % len(rail) + 1} {clicked['item_id']} {sorted(cats)}: "
            f"{before[-1]} categories before, {after[-1]} after ({again['source']}), "
            f"{share[-1]} of {len(items)} in the clicked categories"
        )
    print(
        f"distinct categories in the top {a.k}: before min {min(before)} mean {statistics.mean(before):.1f}; "
        f"after one click min {min(after)} mean {statistics.mean(after):.1f} max {max(after)}; "
        f"in the clicked item's categories: mean {statistics.mean(share):.1f} of {a.k}"
    )


if __name__ == "__main__":
    main()
