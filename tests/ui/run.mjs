// Real-browser tests of the storefront, onboarding and admin pages.
//
// Starts the demo the way `make run` does (scripts/run-demo.sh: `tandem serve`, the demo's
// history replayed through POST /v1/events, an admin key printed) on a free port with the
// demo data (a generated catalog, the shipped models/demo checkpoint or a quickly trained
// one), drives the system Chromium through playwright-core, and saves screenshots to
// target/ui-screenshots/. Exits non-zero on any failure, and when Chromium or
// playwright-core is missing (it never skips silently).
//
//   node tests/ui/run.mjs            (after `cargo build --bin tandem`; `make test-ui` does both)
//   CHROMIUM=/path/to/chrome TANDEM_BIN=target/release/tandem node tests/ui/run.mjs
//   (the default binary is $CARGO_TARGET_DIR/debug/tandem, else target/debug/tandem)
import { spawn, spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "..", "..");
const BIN = path.resolve(ROOT, process.env.TANDEM_BIN || path.join(process.env.CARGO_TARGET_DIR || "target", "debug", "tandem"));
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = path.join(ROOT, "target", "ui-screenshots");
// Set from what the demo script prints when it is ready, as a `make run` user would read it.
let ADMIN_KEY = null;
const BUDGET_MS = 120_000;
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--no-first-run",
];

function die(msg) {
  console.error(`ui tests: ${msg}`);
  process.exit(2);
}

// ---- preconditions: fail loudly, never skip ---------------------------------------------
if (!existsSync(CHROMIUM)) {
  die(`Chromium not found at ${CHROMIUM}. Install it (Debian: apt-get install -y chromium) or set CHROMIUM=/path/to/chromium.`);
}
let chromium;
try {
  ({ chromium } = createRequire(import.meta.url)("playwright-core"));
} catch {
  die(`playwright-core is not installed. Run: (cd tests/ui && npm ci)`);
}
if (!existsSync(BIN)) die(`${BIN} not found. Run: cargo build --bin tandem`);

const started = Date.now();
const elapsed = () => `${((Date.now() - started) / 1000).toFixed(1)} s`;
const log = (m) => console.log(`[${elapsed()}] ${m}`);

function run(args, what) {
  log(`${what}: tandem ${args.join(" ")}`);
  const r = spawnSync(BIN, args, { cwd: ROOT, stdio: ["ignore", "inherit", "inherit"], env: { ...process.env, RUST_LOG: "warn" } });
  if (r.status !== 0) die(`${what} failed (exit ${r.status})`);
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---- the server with demo data ----------------------------------------------------------
const work = mkdtempSync(path.join(os.tmpdir(), "tandem-ui-"));
const raw = path.join(work, "raw");
run(["generate", "--out", raw, "--items", "1500", "--users", "300", "--interactions", "15000", "--seed", "7"], "demo catalog");
// The history as live traffic: the generator gives each user a timeline of their own over a
// year and more (its last days hold one or two users), and the retrain test holds out the
// newest days. So each user's events are spread, in their order, over the 90 days before now.
{
  const file = path.join(raw, "interactions.csv");
  const [header, ...lines] = readFileSync(file, "utf8").trim().split("\n");
  const cols = header.split(",");
  const ts = cols.indexOf("timestamp");
  const rows = lines.map((l) => l.split(","));
  const byUser = new Map();
  rows.forEach((r, i) => { if (!byUser.has(r[0])) byUser.set(r[0], []); byUser.get(r[0]).push(i); });
  const span = 90 * 86_400;
  const end = Math.floor(Date.now() / 1000) - 3_600;
  for (const idx of byUser.values()) {
    idx.sort((a, b) => Number(rows[a][ts]) - Number(rows[b][ts]));
    idx.forEach((i, k) => { rows[i][ts] = String(end - span + Math.floor((k * span) / idx.length)); });
  }
  writeFileSync(file, [header, ...rows.map((r) => r.join(","))].join("\n") + "\n");
}
let model = path.join(ROOT, "models", "demo");
if (!existsSync(path.join(model, "manifest.json"))) {
  model = path.join(work, "model");
  run(["train", "--data", raw, "--out", model, "--epochs", "2"], "no models/demo checkpoint; training a quick one");
}

const port = await freePort();
const base = `http://127.0.0.1:${port}`;
const serverLog = [];
const env = { ...process.env };
delete env.TANDEM_ADMIN_KEY; // the script makes one and prints it, as `make run` does
delete env.TANDEM_BIND;
// In its own process group (detached), so that the script and its server stop together.
const server = spawn(path.join(ROOT, "scripts", "run-demo.sh"), [raw, `127.0.0.1:${port}`], {
  cwd: ROOT,
  detached: true,
  env: {
    ...env,
    TANDEM_BIN: BIN,
    MODEL: model,
    RUST_LOG: process.env.RUST_LOG || "warn",
    TANDEM_DATA_DIR: path.join(work, "data"),
    TANDEM_INDEX__BACKEND: "embedded",
    TANDEM_SESSION__BACKEND: "memory",
    // The retrain test holds out the newest 10 days of the 90-day history (the default 1 d
    // holds few of the 300 demo users), and one epoch keeps it short.
    TANDEM_RETRAIN__HOLDOUT: "10d",
    TANDEM_RETRAIN__EPOCHS: "1",
  },
  stdio: ["ignore", "pipe", "pipe"],
});
for (const s of [server.stdout, server.stderr]) s.on("data", (d) => serverLog.push(String(d)));
let serverExited = null;
server.on("exit", (code) => { serverExited = code; });
const signalServer = (sig) => { try { process.kill(-server.pid, sig); } catch { /* gone */ } };

// On any exit the server goes too; `finish` also waits for it before removing its files.
process.on("exit", () => {
  if (serverExited === null) signalServer("SIGKILL");
});
async function finish(code) {
  if (serverExited === null) {
    const gone = new Promise((r) => server.once("exit", r));
    signalServer("SIGTERM");
    await Promise.race([gone, new Promise((r) => setTimeout(r, 10_000))]);
  }
  try {
    rmSync(work, { recursive: true, force: true, maxRetries: 3 });
  } catch (e) {
    log(`could not remove ${work}: ${e.message}`);
  }
  process.exit(code);
}
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(130));

// Ready when the script says where to open the demo (after the history is seeded).
async function waitReady() {
  const deadline = Date.now() + 180_000;
  while (Date.now() < deadline) {
    const out = serverLog.join("");
    if (serverExited !== null) die(`scripts/run-demo.sh exited with ${serverExited}:\n${out.slice(-3000)}`);
    const open = out.match(/^open (http:\/\/\S+)/m);
    const key = out.match(/^admin key: (\S+)/m);
    if (open && key) {
      if (open[1] !== `http://localhost:${port}/`) die(`the demo script says to open ${open[1]}, not http://localhost:${port}/`);
      ADMIN_KEY = key[1];
      return (await fetch(`${base}/readyz`)).json();
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  die(`the demo was not ready within 180 s:\n${serverLog.join("").slice(-3000)}`);
}
log(`starting the demo (scripts/run-demo.sh) on ${base}`);
const ready = await waitReady();
log(`ready: model ${ready.model_version}; ${(serverLog.join("").match(/^replayed .*/m) || ["no history replayed"])[0]}`);

// ---- the browser ------------------------------------------------------------------------
mkdirSync(SHOTS, { recursive: true });
const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
const DESKTOP = { width: 1280, height: 900 };
const PHONE = { width: 360, height: 780 };
const results = [];

async function test(name, fn) {
  const context = await browser.newContext({ viewport: DESKTOP });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.setDefaultTimeout(15_000);
  const t0 = Date.now();
  try {
    await fn(page);
    if (consoleErrors.length) throw new Error(`page script errors: ${consoleErrors.join("; ")}`);
    results.push([name, true]);
    log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push([name, false]);
    log(`FAIL ${name}: ${e.message.split("\n")[0]}`);
    await page.screenshot({ path: path.join(SHOTS, `FAILED-${name.replace(/\W+/g, "-")}.png`), fullPage: true }).catch(() => {});
  } finally {
    await context.close();
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg);
}

// Screenshots at desktop and phone width, and a check that the phone layout does not scroll
// sideways (the page must be usable from 360 px).
async function shoot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}-desktop.png`), fullPage: true });
  await page.setViewportSize(PHONE);
  await page.waitForTimeout(100);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await page.screenshot({ path: path.join(SHOTS, `${name}-360.png`) });
  await page.screenshot({ path: path.join(SHOTS, `${name}-360-full.png`), fullPage: true });
  await page.setViewportSize(DESKTOP);
  assert(overflow <= 0, `${name}: the page is ${overflow} px wider than a 360 px screen`);
}

const cards = (page) => page.locator("#rail > li.card");
const railIds = (page) => cards(page).evaluateAll((ls) => ls.map((l) => l.dataset.itemId));
const railCats = (page) => cards(page).evaluateAll((ls) => ls.map((l) => l.dataset.categories.split("|")));

// Polls `fn(arg)` in the page until it is truthy. (Playwright's waitForFunction polls by
// evaluating strings, which the pages' Content-Security-Policy rightly forbids.)
async function until(page, fn, arg, what, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await page.evaluate(fn, arg)) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await page.waitForTimeout(50);
  }
}

// Waits for the rail to be re-rendered after an action whose status line contains `what`.
async function waitStatus(page, what) {
  await until(page, (w) => document.getElementById("status").textContent.includes(w), what, `status "${what}"`);
}

async function asAnonymous(page) {
  await page.goto(`${base}/`);
  await page.getByLabel("Anonymous session").check();
  await waitStatus(page, "anonymous session");
}

await test("storefront shows 20 recommended cards with explain bars", async (page) => {
  await page.goto(`${base}/`);
  await until(page, () => document.querySelectorAll("#rail > li.card").length > 0, null, "the rail");
  assert((await cards(page).count()) === 20, `expected 20 cards, got ${await cards(page).count()}`);
  assert((await page.locator("#rail .why").count()) === 20, "every card shows why it is there");
  assert((await page.locator("#chips .chip").count()) > 0, "category chips are shown");
  await shoot(page, "storefront");
});

await test("the demo user gets personal recommendations, unlike an anonymous session", async (page) => {
  await page.goto(`${base}/`);
  await until(page, () => document.querySelectorAll("#rail > li.card").length > 0, null, "the rail");
  const status = await page.locator("#status").innerText();
  assert(/· personal ·|· cached ·/.test(status), `the demo user's rail should be personal: ${status}`);
  const mine = await railIds(page);
  await page.getByLabel("Anonymous session").check();
  await waitStatus(page, "anonymous session");
  const anon = await railIds(page);
  const shared = mine.filter((id) => anon.includes(id)).length;
  assert(shared < 15, `the demo user's rail is almost the anonymous one (${shared} of 20 shared)`);
});

await test("an anonymous shopper's trending cards say trending, not model match", async (page) => {
  await asAnonymous(page);
  const status = await page.locator("#status").innerText();
  assert(/· trending ·/.test(status), `an anonymous session with no history gets trending: ${status}`);
  const why = await page.locator("#rail .why-text").allInnerTexts();
  assert(why.length === 20 && why.every((t) => t === "Mostly: trending"), `trending cards are labelled: ${JSON.stringify([...new Set(why)])}`);
});

await test("clicking a card of category X moves more X items into the top 10", async (page) => {
  await asAnonymous(page);
  const before = await railCats(page);
  // X: a category present in the rail but rare in its top 10.
  const countIn = (cats, c) => cats.slice(0, 10).filter((cs) => cs.includes(c)).length;
  const all = [...new Set(before.flat())];
  const x = all.sort((a, b) => countIn(before, a) - countIn(before, b))[0];
  const x0 = countIn(before, x);
  // Open the first X card by keyboard (focus + Enter), as a keyboard user would.
  const idx = before.findIndex((cs) => cs.includes(x));
  const title = await cards(page).nth(idx).locator("h3").innerText();
  await cards(page).nth(idx).locator("h3 button").focus();
  await page.keyboard.press("Enter");
  await waitStatus(page, `click on “${title}”`);
  const after = await railCats(page);
  const x1 = countIn(after, x);
  const distinct = new Set(after.flat()).size;
  log(`     category ${x}: ${x0} of the top 10 before the click, ${x1} after; ${distinct} categories in the top 20 after (${new Set(before.flat()).size} before)`);
  assert(x1 > x0, `clicking a ${x} item should move more ${x} items into the top 10 (before ${x0}, after ${x1})`);
  // The click moves the rail without taking it over.
  assert(distinct >= 4, `one click left ${distinct} categories in the top 20: ${JSON.stringify(after)}`);
  assert(after.filter((cs) => cs.includes(x)).length < 20, `one click turned all 20 cards to ${x}`);
  await until(page, () => document.querySelectorAll("#similar li[data-item-id]").length > 0, null, "similar items");
  await shoot(page, "storefront-after-click");
});

await test("a category chip, pressed by keyboard, filters the rail to that category", async (page) => {
  await asAnonymous(page);
  const chip = page.locator("#chips .chip").nth(2);
  const cat = await chip.getAttribute("data-category");
  await chip.focus();
  await page.keyboard.press("Space");
  await waitStatus(page, `only ${cat}`);
  assert((await chip.getAttribute("aria-pressed")) === "true", "the chip shows it is pressed");
  const cats = await railCats(page);
  assert(cats.length > 0, "the filtered rail is not empty");
  assert(cats.every((cs) => cs.includes(cat)), `every card is in ${cat}: ${JSON.stringify(cats)}`);
});

await test("buying an item removes it from the rail", async (page) => {
  await asAnonymous(page);
  const ids = await railIds(page);
  const target = ids[2];
  const title = await cards(page).nth(2).locator("h3").innerText();
  await cards(page).nth(2).getByRole("button", { name: `Buy ${title}` }).click();
  await waitStatus(page, `bought “${title}”`);
  const after = await railIds(page);
  assert(!after.includes(target), `item ${target} is still in the rail after buying it`);
  assert(after.length === 20, `the rail refills to 20 after a purchase, got ${after.length}`);
});

await test("onboarding with chosen categories shows mostly those", async (page) => {
  await page.goto(`${base}/onboarding`);
  await until(page, () => document.querySelectorAll("#cat-choices input").length >= 3, null, "category choices");
  // Three categories that are not the most popular ones, so trending alone would not pass.
  const boxes = page.locator("#cat-choices input");
  const n = await boxes.count();
  const chosen = [];
  for (const i of [n - 1, n - 2, n - 3]) {
    await boxes.nth(i).check();
    chosen.push(await boxes.nth(i).getAttribute("value"));
  }
  await page.getByRole("button", { name: "Show my recommendations" }).click();
  await until(page, () => document.querySelectorAll("#rail > li.card").length > 0, null, "the rail");
  const cats = await railCats(page);
  const hits = cats.filter((cs) => cs.some((c) => chosen.includes(c))).length;
  log(`     chose ${chosen.join(", ")}: ${hits} of ${cats.length} recommendations are in them`);
  assert(hits / cats.length > 0.5, `expected mostly ${chosen.join("/")}, got ${hits} of ${cats.length}`);
  await shoot(page, "onboarding");
});

await test("onboarding asks for 3 picks before submitting", async (page) => {
  await page.goto(`${base}/onboarding`);
  await until(page, () => document.querySelectorAll("#cat-choices input").length >= 1, null, "category choices");
  await page.locator("#cat-choices input").first().check();
  await page.getByRole("button", { name: "Show my recommendations" }).click();
  await until(page, () => /at least 3/.test(document.getElementById("status").textContent), null, "the at-least-3 message");
  assert(await page.locator("#results").isHidden(), "no results are shown with one pick");
});

await test("admin with a wrong key shows an error", async (page) => {
  await page.goto(`${base}/admin`);
  await page.getByLabel("Admin key").fill("not-the-key");
  await page.getByRole("button", { name: "Unlock" }).click();
  // The page settles on an answer either way; a server without the admin API says "not available".
  await until(page, () => /Wrong or missing|disabled|not available|Unlocked/.test(document.getElementById("auth").textContent + document.getElementById("models-status").textContent), null, "an answer to the key");
  const said = `${await page.locator("#auth").innerText()} ${await page.locator("#models-status").innerText()}`;
  assert(/Wrong or missing admin key/.test(said), `a wrong key should be reported as such; the page says: ${said.trim()}`);
  assert((await page.locator("#models tr[data-version]").count()) === 0, "no model is listed with a wrong key");
  await shoot(page, "admin-wrong-key");
});

await test("admin with the right key lists the active model, key kept out of the URL", async (page) => {
  await page.goto(`${base}/admin`);
  await page.getByLabel("Admin key").fill(ADMIN_KEY);
  await page.getByRole("button", { name: "Unlock" }).click();
  await until(page, () => document.getElementById("models-status").textContent.length > 0, null, "the models list");
  // From the model registry (GET /admin/models), not the /readyz fallback.
  const row = page.locator(`#models tr[data-status="active"][data-source="registry"]`);
  assert((await row.count()) === 1, `one active model from the registry; the page says: ${await page.locator("#models-status").innerText()}`);
  const version = await row.first().getAttribute("data-version");
  assert(version === ready.model_version, `the active model shown is ${version}, the server runs ${ready.model_version}`);
  assert(!page.url().includes(ADMIN_KEY), "the admin key must not appear in the URL");
  const stored = await page.evaluate(() => sessionStorage.getItem("tandem.adminKey"));
  assert(stored === ADMIN_KEY, "the key is kept in sessionStorage");
  await shoot(page, "admin");
});

await test("admin shows an experiment's CTR and conversion per variant with confidence intervals", async (page) => {
  const adminHeaders = { "Content-Type": "application/json", "X-API-Key": ADMIN_KEY };
  const exp = { name: "rail-test", salt: "ui", variants: [{ name: "control", share: 0.5 }, { name: "treatment", share: 0.5 }] };
  const put = await fetch(`${base}/admin/experiments`, { method: "PUT", headers: adminHeaders, body: JSON.stringify({ experiments: [exp] }) });
  assert(put.ok, `PUT /admin/experiments: HTTP ${put.status} ${await put.text()}`);
  // Real traffic: 30 anonymous shoppers see a rail; every other one clicks, every fifth buys.
  for (let i = 0; i < 30; i++) {
    const session_id = `ui-exp-${i}`;
    const r = await (await fetch(`${base}/v1/recommendations?session_id=${session_id}&k=10`)).json();
    const events = [];
    if (i % 2 === 0) events.push({ session_id, item_id: r.items[0].item_id, type: "click", variant: r.variant, context: { request_id: r.request_id } });
    if (i % 5 === 0) events.push({ session_id, item_id: r.items[1].item_id, type: "purchase", variant: r.variant, context: { request_id: r.request_id } });
    if (events.length) {
      const e = await fetch(`${base}/v1/events`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(events) });
      assert(e.status === 202, `POST /v1/events: HTTP ${e.status} ${await e.text()}`);
    }
  }
  await page.goto(`${base}/admin`);
  await page.getByLabel("Admin key").fill(ADMIN_KEY);
  await page.getByRole("button", { name: "Unlock" }).click();
  const table = page.locator(`table[data-experiment="rail-test"]`);
  await table.waitFor();
  const rows = table.locator("tbody tr");
  assert((await rows.count()) === 2, `two variants listed, got ${await rows.count()}`);
  const text = await table.innerText();
  assert(/95% CI/.test(text), `CTR and conversion are shown with their intervals: ${text}`);
  const impressions = await rows.evaluateAll((trs) => trs.map((tr) => Number(tr.children[3].textContent)));
  assert(impressions.reduce((a, b) => a + b, 0) >= 30, `the 30 rails count as impressions: ${impressions}`);
  await shoot(page, "admin-experiment");
});

await test("admin prepares a registered model for an experiment, showing progress until ready", async (page) => {
  // A second checkpoint: the demo one under another version id.
  const second = path.join(work, "ui-second");
  mkdirSync(second, { recursive: true });
  copyFileSync(path.join(model, "model.safetensors"), path.join(second, "model.safetensors"));
  const manifest = JSON.parse(readFileSync(path.join(model, "manifest.json"), "utf8"));
  manifest.model_version = "ui-second";
  writeFileSync(path.join(second, "manifest.json"), JSON.stringify(manifest));
  const reg = await fetch(`${base}/admin/models`, {
    method: "POST", headers: { "Content-Type": "application/json", "X-API-Key": ADMIN_KEY }, body: JSON.stringify({ path: second }),
  });
  assert(reg.status === 201, `POST /admin/models: HTTP ${reg.status} ${await reg.text()}`);
  await page.goto(`${base}/admin`);
  await page.getByLabel("Admin key").fill(ADMIN_KEY);
  await page.getByRole("button", { name: "Unlock" }).click();
  await page.getByRole("button", { name: "Prepare model ui-second for an experiment" }).click();
  await until(page, () => /Preparing ui-second/.test(document.getElementById("models-action").textContent), null, "the preparing message");
  await until(page, () => document.querySelector('#models tr[data-version="ui-second"]')?.dataset.status === "ready", null, "ui-second ready", 60_000);
  await until(page, () => /ui-second is ready/.test(document.getElementById("models-action").textContent), null, "the ready message");
  const row = page.locator('#models tr[data-version="ui-second"]');
  assert((await row.getByRole("button", { name: /^Prepare/ }).count()) === 0, "a ready version offers no second Prepare");
  const active = await page.locator('#models tr[data-status="active"]').getAttribute("data-version");
  assert(active === ready.model_version, `preparing does not switch: the active model is ${active}`);
  await shoot(page, "admin-prepared");
});

await test("admin retrains on demand, showing its stages, then the run in the history and the gate chart", async (page) => {
  await page.goto(`${base}/admin`);
  await page.getByLabel("Admin key").fill(ADMIN_KEY);
  await page.getByRole("button", { name: "Unlock" }).click();
  await until(page, () => /when its recall@20 beats/.test(document.getElementById("retrain-settings").textContent), null, "the retrain settings");
  await page.getByRole("button", { name: "Retrain now" }).click();
  // The stages show while it runs (the list keeps the finished ones with their times).
  await until(page, () => document.querySelectorAll('#retrain-progress li[data-state="done"]').length > 0
    && document.querySelector('#retrain-progress li[data-state="running"]') !== null
    && document.getElementById("retrain-now").disabled, null, "a finished stage, the running one, and the button off meanwhile", 60_000);
  await until(page, () => document.querySelector("#retrain-table tr[data-run]") !== null, null, "the run in the history", 180_000);
  const row = page.locator("#retrain-table tbody tr").first();
  const decision = await row.getAttribute("data-decision");
  const text = await row.innerText();
  log(`     run: ${text.replace(/\s+/g, " ").slice(0, 240)}`);
  assert(decision === "promoted" || decision === "held_back", `the run was scored (not failed): ${text}`);
  assert(/gather .* split .* train .* gate/.test(text), `the row gives the time per stage: ${text}`);
  assert(/recall@20 \d\.\d{4} vs \d\.\d{4}/.test(text), `the row compares candidate and active: ${text}`);
  await until(page, () => /Run rt-.*: (promoted|held back)/.test(document.getElementById("retrain-status").textContent), null, "the run's outcome");
  // A control run (shuffled items) from the API: the gate must hold it back, and the page shows it.
  const r = await fetch(`${base}/admin/retrain`, { method: "POST", headers: { "Content-Type": "application/json", "X-API-Key": ADMIN_KEY }, body: JSON.stringify({ shuffle_items: true }) });
  const body = await r.text();
  assert(r.status === 202, `POST /admin/retrain: HTTP ${r.status} ${body}`);
  const control = JSON.parse(body).id;
  await page.waitForTimeout(11_000); // the page notices a run it did not start within 10 s
  await until(page, (id) => document.querySelector(`#retrain-table tr[data-run="${id}"]`) !== null, control, "the control run in the history", 180_000);
  const controlDecision = await page.locator(`#retrain-table tr[data-run="${control}"]`).getAttribute("data-decision");
  assert(controlDecision === "held_back", `the shuffled-items control run is held back, not ${controlDecision}`);
  // The chart: one point per scored candidate and metric, drawn in the page (inline SVG).
  const chart = page.locator('svg[data-chart="gate"]');
  assert((await chart.count()) === 1, "the gate chart is drawn");
  const points = await chart.locator("circle[data-run]").evaluateAll((cs) => cs.map((c) => c.dataset.run));
  assert(new Set(points).size === 2 && points.includes(control), `both candidates are on the chart: ${JSON.stringify(points)}`);
  assert((await chart.locator("path[data-series]").count()) >= 2, "the metrics are drawn as lines");
  const external = await page.evaluate(() => performance.getEntriesByType("resource").map((e) => e.name).filter((n) => !n.startsWith(location.origin)));
  assert(external.length === 0, `the page loaded external resources: ${external}`);
  await shoot(page, "admin-retrain");
});

await test("admin shows live latency and cache figures from GET /v1/stats", async (page) => {
  // Recent requests for the one-minute window (the retrain test above may take longer).
  for (let u = 1; u <= 5; u++) await fetch(`${base}/v1/recommendations?user_id=${u}&k=5`);
  await page.goto(`${base}/admin`);
  // The earlier tests made API requests, so the window holds a p99; the page polls every 2 s.
  await until(page, () => /ms$/.test(document.querySelector("#live div:nth-child(3) dd")?.textContent || ""), null, "a live p99 figure");
  const stats = await (await fetch(`${base}/v1/stats`)).json();
  assert(stats.window.requests > 0 && stats.window.p99_ms > 0, `GET /v1/stats has no recent requests: ${JSON.stringify(stats)}`);
  assert(stats.cache.hits + stats.cache.misses > 0, "personal recommendations were counted as cache hits or misses");
  // The 15-minute charts: requests/s, p50/p99, errors and cache hit rate, one point per 10 s.
  for (const id of ["rps", "latency", "errors", "cache"]) {
    await until(page, (c) => document.querySelector(`#live-charts svg[data-chart="${c}"]`) !== null, id, `the ${id} chart`);
  }
  const rps = await page.locator('#live-charts svg[data-chart="rps"] path[data-series]').getAttribute("d");
  const drawn = rps ? rps.split(/[ML]/).filter(Boolean).length : 0;
  assert(Math.abs(drawn - stats.series.length) <= 1, `one point per 10 s of the series: ${drawn} points for ${stats.series.length}`);
  assert(stats.series.some((p) => p.requests > 0 && p.p99_ms > 0), `the series holds the recent requests: ${JSON.stringify(stats.series.slice(-3))}`);
  assert((await page.locator('#live-charts svg[data-chart="latency"] path[data-series="p99"]').count()) === 1, "p99 is charted");
  await shoot(page, "admin-live");
});

await browser.close();
const failed = results.filter(([, ok]) => !ok);
log(`${results.length - failed.length} passed, ${failed.length} failed; screenshots in ${path.relative(ROOT, SHOTS)}/`);
if (Date.now() - started > BUDGET_MS) log(`warning: took longer than the ${BUDGET_MS / 1000} s budget`);
if (failed.length) console.error(`server log (tail):\n${serverLog.join("").slice(-2000)}`);
await finish(failed.length ? 1 : 0);
