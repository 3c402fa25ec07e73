// The published Gorse JavaScript SDK (gorsejs 0.4.8), unchanged, against tandem's /api
// routes: every client method whose route tandem serves, asserting what a Gorse user sees.
// Run by tests/gorse/run.sh with GORSE_ENDPOINT and GORSE_API_KEY set; exits non-zero on the
// first failure.
//
// Not served (no route in tandem, see the README's "Coming from Gorse"): getFeedbacks(type),
// getItemFeedback, getItemFeedbackByType, insertItemCategory, deleteItemCategory,
// getUserNeighbors.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { Gorse } = require("gorsejs");

const endpoint = process.env.GORSE_ENDPOINT;
const secret = process.env.GORSE_API_KEY;
const started = Date.now();
let checks = 0;
const log = (m) => console.log(`[gorsejs ${((Date.now() - started) / 1000).toFixed(1).padStart(5)} s] ${m}`);
function check(cond, what) {
  checks += 1;
  if (!cond) {
    console.error(`gorsejs: FAILED: ${what}`);
    process.exit(1);
  }
}
async function statusOf(promise) {
  try {
    await promise;
    return 200;
  } catch (e) {
    return e.code;
  }
}

const client = new Gorse({ endpoint, secret });
const CAT = "js-cat";
const same = (a, b) => JSON.stringify([...a].sort()) === JSON.stringify([...b].sort());

try {
  // ---- items ---------------------------------------------------------------------------
  log("items: upsertItem, upsertItems, getItem, updateItem, getItems");
  check((await client.upsertItem({ ItemId: "js:1", IsHidden: false, Categories: [CAT], Labels: ["js"],
    Comment: "JS item 1", Timestamp: new Date("2026-11-01T00:00:00Z") })) === 1, "upsertItem answers RowAffected 1");
  const batch = [2, 3, 4, 5, 6, 7].map((i) => ({ ItemId: `js:${i}`, IsHidden: false, Categories: [CAT],
    Labels: [], Comment: `JS item ${i}`, Timestamp: `2026-11-0${i}` }));
  check((await client.upsertItems(batch)) === 6, "upsertItems answers RowAffected 6");
  const item = await client.getItem("js:1");
  check(item.ItemId === "js:1" && item.Comment === "JS item 1" && item.Timestamp.startsWith("2026-11-01"),
    `getItem: ${JSON.stringify(item)}`);
  check((await client.updateItem("js:1", { ItemId: "js:1", IsHidden: false, Timestamp: "2026-11-01",
    Comment: "Renamed", Categories: [CAT], Labels: ["js"] })) === 1, "updateItem");
  check((await client.getItem("js:1")).Comment === "Renamed", "updateItem changed the comment");
  // gorsejs pages with `Cursor` (capitalised) in the query.
  const ids = [];
  let cursor = "";
  do {
    const page = await client.getItems({ n: 9, Cursor: cursor });
    ids.push(...page.Items.map((i) => i.ItemId));
    cursor = page.Cursor;
  } while (cursor);
  const all = await client.getItems({ n: 10000 });
  check(new Set(ids).size === ids.length, "paging returned an item twice");
  check(same(ids, all.Items.map((i) => i.ItemId)), "paging returned every item");

  // ---- users ---------------------------------------------------------------------------
  log("users: insertUser, insertUsers, getUser, updateUser, getUsers, deleteUser");
  check((await client.insertUser({ UserId: "js-alice", Labels: ["a"], Comment: "first" })) === 1, "insertUser");
  check((await client.insertUsers([{ UserId: "js-bob" }, { UserId: "js-carol" }])) === 2, "insertUsers");
  check((await client.updateUser("js-alice", { UserId: "js-alice", Comment: "second" })) === 1, "updateUser");
  const alice = await client.getUser("js-alice");
  check(alice.Comment === "second" && alice.Labels[0] === "a", `getUser after updateUser: ${JSON.stringify(alice)}`);
  const users = await client.getUsers({ n: 1000 });
  check(["js-alice", "js-bob", "js-carol"].every((u) => users.Users.some((x) => x.UserId === u)), "getUsers");
  check((await client.deleteUser("js-carol")) === 1, "deleteUser");
  check((await statusOf(client.getUser("js-carol"))) === 404, "a deleted user answers 404");

  // ---- feedback ------------------------------------------------------------------------
  log("feedback: insertFeedbacks, upsertFeedbacks, getFeedback, getFeedbacks, getUserFeedback(ByType), deleteFeedback");
  check((await client.insertFeedbacks([
    { FeedbackType: "star", UserId: "js-alice", ItemId: "js:1", Timestamp: "2026-12-01" },
    { FeedbackType: "like", UserId: "js-alice", ItemId: "js:2", Timestamp: "2026-12-01" },
  ])) === 2, "insertFeedbacks");
  // upsertFeedbacks (PUT) keeps what exists: one new of two.
  check((await client.upsertFeedbacks([
    { FeedbackType: "star", UserId: "js-alice", ItemId: "js:1", Timestamp: "2026-12-05" },
    { FeedbackType: "star", UserId: "js-bob", ItemId: "js:2", Timestamp: "2026-12-01" },
  ])) === 1, "upsertFeedbacks inserts only what is new");
  const one = await client.getFeedback({ type: "star", userId: "js-alice", itemId: "js:1" });
  check(one.ItemId === "js:1" && one.Timestamp.startsWith("2026-12-01"), `getFeedback: ${JSON.stringify(one)}`);
  const feedbackPage = await client.getFeedbacks(undefined, { n: 1000 });
  check(feedbackPage.Feedback.some((f) => f.UserId === "js-bob" && f.ItemId === "js:2"), "getFeedbacks");
  check((await client.getUserFeedback("js-alice")).length === 2, "getUserFeedback");
  const likes = await client.getUserFeedbackByType("js-alice", "like");
  check(likes.length === 1 && likes[0].ItemId === "js:2", "getUserFeedbackByType");

  // ---- recommendations -----------------------------------------------------------------
  log("recommendations: getRecommend, getSessionRecommend, getItemNeighbors, getPopular, getLatest");
  const recs = await client.getRecommend({ userId: "js-alice", category: CAT, cursorOptions: { n: 3 } });
  check(recs.length === 3 && recs.every((r) => typeof r === "string"), `getRecommend answers ids: ${recs}`);
  for (const id of recs) {
    check((await client.getItem(id)).Categories.includes(CAT), `${id} is not in ${CAT}`);
    check(!["js:1", "js:2"].includes(id), `${id} was given feedback and came back`);
  }
  const hidden = recs[0];
  check((await client.updateItem(hidden, { ItemId: hidden, IsHidden: true })) === 1, "hide an item");
  const lists = [
    await client.getRecommend({ userId: "js-alice", category: CAT, cursorOptions: { n: 10 } }),
    await client.getRecommend({ userId: "js-alice", cursorOptions: { n: 50 } }),
    (await client.getPopular({ cursorOptions: { n: 100 } })).map((s) => s.Id),
    (await client.getLatest({ cursorOptions: { n: 200 } })).map((s) => s.Id),
    (await client.getItemNeighbors({ itemId: "js:1", cursorOptions: { n: 50 } })).map((s) => s.Id),
  ];
  check(lists.every((l) => !l.includes(hidden)), `the hidden item ${hidden} was recommended`);
  for (const list of [
    await client.getPopular({ category: CAT, cursorOptions: { n: 10 } }),
    await client.getLatest({ category: CAT, cursorOptions: { n: 10 } }),
    await client.getItemNeighbors({ itemId: "js:1", category: CAT, cursorOptions: { n: 10 } }),
  ]) {
    check(list.length > 0, "a category list is empty");
    for (const s of list) check((await client.getItem(s.Id)).Categories.includes(CAT), `${s.Id} is not in ${CAT}`);
  }
  const latest = await client.getLatest({ category: CAT, cursorOptions: { n: 2 } });
  const newest = ["js:7", "js:6"].find((id) => id !== hidden);
  check(latest[0].Id === newest, `getLatest puts the newest first: ${JSON.stringify(latest)}`);
  const written = await client.getRecommend({ userId: "js-alice", writeBackType: "read", cursorOptions: { n: 2 } });
  const read = (await client.getUserFeedbackByType("js-alice", "read")).map((f) => f.ItemId);
  check(same(read, written), `writeBackType recorded ${read}, returned ${written}`);
  const session = await client.getSessionRecommend(
    [{ FeedbackType: "star", UserId: "", ItemId: "js:3", Timestamp: "2026-12-02" }], { cursorOptions: { n: 4 } });
  check(session.length === 4 && session.every((s) => s.Id !== "js:3" && s.Id !== hidden), "getSessionRecommend");
  const inCat = await client.getSessionRecommend(
    [{ FeedbackType: "star", UserId: "", ItemId: "js:3", Timestamp: "" }], { category: CAT, cursorOptions: { n: 2 } });
  for (const s of inCat) check((await client.getItem(s.Id)).Categories.includes(CAT), "getSessionRecommend by category");

  // ---- deletes and keys ----------------------------------------------------------------
  log("deletes and keys: deleteFeedback, deleteItem, a wrong key");
  await client.deleteFeedback({ type: "like", userId: "js-alice", itemId: "js:2" });
  check((await client.getUserFeedbackByType("js-alice", "like")).length === 0, "deleteFeedback");
  check((await client.deleteItem("js:7")) === 1, "deleteItem");
  check((await statusOf(client.getItem("js:7"))) === 404, "a deleted item answers 404");
  const wrong = new Gorse({ endpoint, secret: "wrong-key" });
  check((await statusOf(wrong.getItems({ n: 1 }))) === 401, "a wrong key is refused with 401");
} catch (e) {
  console.error(`gorsejs: FAILED with an exception: ${e.code ?? ""} ${JSON.stringify(e.message ?? e)}`);
  console.error(e.stack);
  process.exit(1);
}
log(`all ${checks} checks passed`);
