"""The published Gorse Python SDK (pygorse 0.5.1, imported as `gorse`), unchanged, against
tandem's /api routes: every method of `Gorse` and `AsyncGorse`, asserting what a Gorse user
sees. Run by tests/gorse/run.sh with GORSE_ENDPOINT and GORSE_API_KEY set; exits non-zero on
the first failure.
"""

import asyncio
import os
import sys
import time

from gorse import AsyncGorse, Gorse, GorseException

ENDPOINT = os.environ["GORSE_ENDPOINT"]
KEY = os.environ["GORSE_API_KEY"]
STARTED = time.monotonic()
CHECKS = 0


def log(msg):
    print(f"[pygorse {time.monotonic() - STARTED:5.1f} s] {msg}", flush=True)


def check(cond, what):
    global CHECKS
    CHECKS += 1
    if not cond:
        print(f"pygorse: FAILED: {what}", file=sys.stderr, flush=True)
        sys.exit(1)


def status_of(call):
    """The status of a call expected to fail (GorseException), or 200."""
    try:
        call()
    except GorseException as e:
        return e.status_code
    return 200


client = Gorse(ENDPOINT, KEY)
CAT = "py-cat"

# ---- items -----------------------------------------------------------------------------
log("items: insert_item, get_item, update_item, get_items, search_items")
for i in range(1, 9):
    r = client.insert_item({
        "ItemId": f"py:{i}", "IsHidden": False, "Categories": [CAT],
        "Labels": ["python", f"n{i}"], "Comment": f"Python item {i}", "Timestamp": f"2026-11-0{i}",
    })
    check(r == {"RowAffected": 1}, f"insert_item answers RowAffected 1, got {r}")
item = client.get_item("py:1")
check(item["ItemId"] == "py:1" and item["Comment"] == "Python item 1", f"get_item: {item}")
check(item["Categories"] == [CAT] and item["Labels"] == ["python", "n1"], f"get_item fields: {item}")
check(item["IsHidden"] is False and item["Timestamp"].startswith("2026-11-01"), f"get_item: {item}")
# update_item sends null for what it does not change: those fields are kept.
client.update_item("py:1", comment="Renamed")
item = client.get_item("py:1")
check(item["Comment"] == "Renamed" and item["Categories"] == [CAT], f"update_item kept the rest: {item}")

ids, cursor = [], ""
while True:
    page, cursor = client.get_items(7, cursor)
    ids += [i["ItemId"] for i in page]
    if not cursor:
        break
everything, last = client.get_items(10000)
check(last == "", "a page holding everything has an empty cursor")
check(len(ids) == len(set(ids)), "paging returned an item twice")
check(sorted(ids) == sorted(i["ItemId"] for i in everything), "paging returned every item")
check(all(f"py:{i}" in ids for i in range(1, 9)), "paging holds the new items")
found = client.search_items("python item", n=50)
check({"py:2", "py:3"} <= {i["ItemId"] for i in found}, f"search_items: {found}")

# ---- users -----------------------------------------------------------------------------
log("users: insert_user, insert_users, get_user, get_users, delete_user")
check(client.insert_user({"UserId": "py-alice", "Labels": ["a"], "Comment": "first"}) == {"RowAffected": 1},
      "insert_user")
check(client.insert_users([{"UserId": f"py-user-{i}", "Labels": [], "Comment": ""} for i in range(12)])
      == {"RowAffected": 12}, "insert_users")
user = client.get_user("py-alice")
check(user["UserId"] == "py-alice" and user["Labels"] == ["a"] and user["Comment"] == "first", f"get_user: {user}")
users, cursor = [], ""
while True:
    page, cursor = client.get_users(5, cursor)
    users += [u["UserId"] for u in page]
    if not cursor:
        break
check(len(users) == len(set(users)), "user paging returned a user twice")
check({"py-alice", "py-user-0", "py-user-11"} <= set(users), "user paging returned every user")
check(client.delete_user("py-user-3") == {"RowAffected": 1}, "delete_user")
check(status_of(lambda: client.get_user("py-user-3")) == 404, "a deleted user answers 404")
check(status_of(lambda: client.get_user("py-nobody")) == 404, "an unknown user answers 404")

# ---- feedback --------------------------------------------------------------------------
log("feedback: insert_feedback, insert_feedbacks, list_feedbacks, get_feedbacks, delete_feedback")
check(client.insert_feedback("star", "py-alice", "py:1", "2026-12-01") == {"RowAffected": 1}, "insert_feedback")
r = client.insert_feedbacks([
    {"FeedbackType": "like", "UserId": "py-alice", "ItemId": "py:2", "Timestamp": "2026-12-02"},
    {"FeedbackType": "star", "UserId": "py-bob", "ItemId": "py:2", "Timestamp": "2026-12-02"},
])
check(r == {"RowAffected": 2}, f"insert_feedbacks: {r}")
stars = client.list_feedbacks("star", "py-alice")
check([f["ItemId"] for f in stars] == ["py:1"], f"list_feedbacks: {stars}")
check(stars[0]["FeedbackType"] == "star" and stars[0]["UserId"] == "py-alice", f"list_feedbacks: {stars}")
check(client.get_user("py-bob")["UserId"] == "py-bob", "feedback inserted its user")
seen, cursor = [], ""
while True:
    page, cursor = client.get_feedbacks(2, cursor)
    seen += [(f["FeedbackType"], f["UserId"], f["ItemId"]) for f in page]
    if not cursor:
        break
check(len(seen) == len(set(seen)), "feedback paging returned one twice")
check({("star", "py-alice", "py:1"), ("like", "py-alice", "py:2"), ("star", "py-bob", "py:2")} <= set(seen),
      f"feedback paging: {seen}")

# ---- recommendations -------------------------------------------------------------------
log("recommendations: get_recommend (category, hidden, write-back), session_recommend, get_neighbors")
recs = client.get_recommend("py-alice", category=CAT, n=4)
check(len(recs) > 0 and all(hasattr(r, "score") for r in recs), f"get_recommend with scores: {recs}")
for r in recs:
    check(client.get_item(r.id)["Categories"] == [CAT], f"{r.id} is not in {CAT}")
    check(r.id not in ("py:1", "py:2"), f"{r.id} was given feedback and came back")
hidden = recs[0].id
client.update_item(hidden, is_hidden=True)
check(client.get_item(hidden)["IsHidden"] is True, "update_item(is_hidden=True)")
for r in client.get_recommend("py-alice", category=CAT, n=10) + client.get_recommend("py-alice", n=50):
    check(r.id != hidden, f"the hidden item {hidden} was recommended")
check(all(n != hidden for n in (x["Id"] for x in client.get_neighbors("py:1", n=20))),
      "the hidden item came back as a neighbor")
neighbors = client.get_neighbors("py:1", n=5, offset=0)
check(len(neighbors) == 5 and all("Id" in n and "Score" in n for n in neighbors), f"get_neighbors: {neighbors}")
check(all(n["Id"] != "py:1" for n in neighbors), "an item is not its own neighbor")
check(status_of(lambda: client.get_neighbors("py:nope")) == 404, "neighbors of an unknown item answer 404")
written = client.get_recommend("py-alice", n=3, write_back_type="read", write_back_delay="10m")
read = {f["ItemId"] for f in client.list_feedbacks("read", "py-alice")}
check(read == {r.id for r in written}, f"write-back-type recorded {read}, returned {[r.id for r in written]}")
after = {r.id for r in client.get_recommend("py-alice", n=30)}
check(not (after & read), "written-back items were recommended again")
session = client.session_recommend(
    [{"FeedbackType": "star", "UserId": "", "ItemId": "py:4", "Timestamp": "2026-12-03"}], n=5)
check(len(session) == 5 and all("Id" in s for s in session), f"session_recommend: {session}")
check(all(s["Id"] not in ("py:4", hidden) for s in session), "session_recommend returned its own or a hidden item")

# ---- deletes and keys ------------------------------------------------------------------
log("deletes and keys: delete_feedback, delete_item, a wrong key")
r = client.delete_feedback("py-alice", "py:1")
check(r == {"RowAffected": 1}, f"delete_feedback: {r}")
check(client.list_feedbacks("star", "py-alice") == [], "the deleted feedback is gone")
check(client.delete_item("py:8") == {"RowAffected": 1}, "delete_item")
check(status_of(lambda: client.get_item("py:8")) == 404, "a deleted item answers 404")
check(status_of(lambda: Gorse(ENDPOINT, "wrong-key").get_items(1)) == 401, "a wrong key is refused with 401")


# ---- the async client ------------------------------------------------------------------
async def async_checks():
    log("AsyncGorse: every method")
    a = AsyncGorse(ENDPOINT, KEY)
    check(await a.insert_item({"ItemId": "py:a1", "IsHidden": False, "Categories": [CAT], "Labels": [],
                               "Comment": "async", "Timestamp": "2026-11-20"}) == {"RowAffected": 1}, "async insert_item")
    check((await a.get_item("py:a1"))["Comment"] == "async", "async get_item")
    await a.update_item("py:a1", labels=["async-label"])
    check((await a.get_item("py:a1"))["Labels"] == ["async-label"], "async update_item")
    items, cursor = await a.get_items(3)
    check(len(items) == 3 and cursor != "", "async get_items")
    check(any(i["ItemId"] == "py:a1" for i in await a.search_items("async", n=10)), "async search_items")
    check(await a.insert_user({"UserId": "py-async", "Labels": [], "Comment": ""}) == {"RowAffected": 1},
          "async insert_user")
    check(await a.insert_users([{"UserId": "py-async-2"}]) == {"RowAffected": 1}, "async insert_users")
    check((await a.get_user("py-async"))["UserId"] == "py-async", "async get_user")
    users, _ = await a.get_users(100)
    check(any(u["UserId"] == "py-async-2" for u in users), "async get_users")
    check(await a.insert_feedback("star", "py-async", "py:5", "2026-12-04") == {"RowAffected": 1},
          "async insert_feedback")
    check(await a.insert_feedbacks([{"FeedbackType": "like", "UserId": "py-async", "ItemId": "py:6",
                                     "Timestamp": "2026-12-04"}]) == {"RowAffected": 1}, "async insert_feedbacks")
    check([f["ItemId"] for f in await a.list_feedbacks("like", "py-async")] == ["py:6"], "async list_feedbacks")
    fb, _ = await a.get_feedbacks(1000)
    check(any(f["UserId"] == "py-async" for f in fb), "async get_feedbacks")
    recs = await a.get_recommend("py-async", category=CAT, n=3)
    check(len(recs) > 0, "async get_recommend answers")
    for r in recs:
        check((await a.get_item(r.id))["Categories"] == [CAT], f"async get_recommend: {r.id} is not in {CAT}")
    check(all(r.id != hidden for r in recs), "async get_recommend returned the hidden item")
    check(len(await a.session_recommend([{"FeedbackType": "star", "UserId": "", "ItemId": "py:5",
                                          "Timestamp": ""}], n=3)) == 3, "async session_recommend")
    check(len(await a.get_neighbors("py:5", n=3)) == 3, "async get_neighbors")
    check(await a.delete_feedback("py-async", "py:6") == {"RowAffected": 1}, "async delete_feedback")
    check(await a.delete_item("py:a1") == {"RowAffected": 1}, "async delete_item")
    try:
        await a.get_item("py:a1")
        check(False, "async: a deleted item answers 404")
    except GorseException as e:
        check(e.status_code == 404, "async: a deleted item answers 404")
    check(await a.delete_user("py-async-2") == {"RowAffected": 1}, "async delete_user")


asyncio.run(async_checks())
log(f"all {CHECKS} checks passed")
