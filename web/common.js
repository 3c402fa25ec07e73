// Shared by the tandem demo pages: API calls, the visitor's identity, and item cards.
// Plain JavaScript with no build step, so the pages stay small enough to embed in the binary.
"use strict";

const tandem = (() => {
  // A typed error carrying the server's JSON error body, so pages can show its message.
  class ApiError extends Error {
    constructor(status, body) {
      const msg = (body && (body.message || body.error || body.reason)) || `HTTP ${status}`;
      super(body && body.field ? `${body.field}: ${msg}` : msg);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, { query, body, headers } = {}) {
    let url = path;
    if (query) {
      const q = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) {
        if (v === undefined || v === null || v === "") continue;
        for (const one of Array.isArray(v) ? v : [v]) q.append(k, String(one));
      }
      const s = q.toString();
      if (s) url += (url.includes("?") ? "&" : "?") + s;
    }
    const init = { method, headers: { Accept: "application/json", ...(headers || {}) } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const started = performance.now();
    const res = await fetch(url, init);
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { message: text.slice(0, 200) }; }
    if (!res.ok) throw new ApiError(res.status, data);
    return { data, ms: performance.now() - started };
  }

  // The visitor: a known demo user, a brand-new user, or an anonymous session. Kept in
  // sessionStorage so that reloading the page, or going from onboarding to the storefront,
  // keeps the same person (and so their session history).
  const ID_KEY = "tandem.identity";
  function randomId(prefix) {
    const a = new Uint8Array(6);
    crypto.getRandomValues(a);
    return prefix + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  function identity() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(ID_KEY) || "null");
      if (saved && saved.kind) return saved;
    } catch { /* a corrupt value falls through to the default */ }
    return setIdentity("demo", "1");
  }
  function setIdentity(kind, userId) {
    let id;
    if (kind === "demo") id = { kind, user_id: userId || "1" };
    else if (kind === "new") id = { kind, user_id: userId || randomId("new-") };
    else id = { kind: "anonymous", session_id: randomId("s-") };
    sessionStorage.setItem(ID_KEY, JSON.stringify(id));
    return id;
  }
  // The user_id / session_id pair for a request or an event.
  function who(id) {
    return id.kind === "anonymous" ? { session_id: id.session_id } : { user_id: id.user_id };
  }

  function postEvent(id, itemId, type, variant) {
    const ev = { ...who(id), item_id: itemId, type, timestamp: Date.now() };
    if (variant) ev.variant = variant;
    return api("POST", "/v1/events", { body: ev });
  }

  // Categories offered as chips and onboarding choices: the catalog's (GET /v1/categories),
  // the largest first.
  async function categories() {
    const { data } = await api("GET", "/v1/categories");
    return (data.categories || []).slice().sort((a, b) => b.items - a.items || a.name.localeCompare(b.name)).map((c) => c.name);
  }

  // The explain components drawn as bars, in this order; `viewed` and `redundancy` are
  // penalties and are listed in the tooltip only.
  const PARTS = [
    ["ann", "ann", "model match"],
    ["session_max", "session", "like your recent items"],
    ["category_affinity", "affinity", "your categories"],
    ["trending", "trending", "trending"],
    ["freshness", "fresh", "new"],
  ];
  // `source` is the response's: with "trending" nothing personal was known, and the `ann`
  // part holds the trending list's own score (not a model match), so it is drawn as trending.
  function explainNodes(ex, source) {
    const frag = document.createDocumentFragment();
    if (!ex) return frag;
    if (source === "trending") ex = { ...ex, trending: Math.max(Number(ex.trending) || 0, Number(ex.ann) || 0), ann: 0 };
    const vals = PARTS.map(([k]) => Math.max(0, Number(ex[k]) || 0));
    const total = vals.reduce((a, b) => a + b, 0) || 1;
    const bar = el("div", { class: "why", role: "img" });
    const lines = [];
    PARTS.forEach(([k, cls, label], i) => {
      if (vals[i] > 0) bar.append(el("span", { class: cls, style: `width:${(100 * vals[i]) / total}%` }));
      lines.push(`${label} ${Number(ex[k] || 0).toFixed(2)}`);
    });
    if (ex.viewed) lines.push(`already viewed (penalty)`);
    if (ex.redundancy) lines.push(`similar to an item above ${Number(ex.redundancy).toFixed(2)}`);
    // Boost rules that applied (`[boosts]`, `boost=`): a promoted item says so.
    for (const [rule, part] of Object.entries(ex.boosts || {})) lines.push(`boost ${rule} ${part > 0 ? "+" : ""}${Number(part).toFixed(2)}`);
    const top = PARTS[vals.indexOf(Math.max(...vals))][2];
    bar.setAttribute("aria-label", `Why: mostly ${top}. ${lines.join(", ")}`);
    bar.title = lines.join("\n");
    frag.append(bar, el("p", { class: "why-text" }, `Mostly: ${top}`));
    return frag;
  }

  function legend() {
    const ul = el("ul", { class: "legend", "aria-label": "Colours of the why-this-item bars" });
    for (const [, cls, label] of PARTS) {
      ul.append(el("li", {}, el("i", { class: `why-dot ${cls}`, style: `background:var(--c-${cls === "affinity" ? "affinity" : cls})` }), label));
    }
    return ul;
  }

  // One item card. `actions` are [label, handler, {secondary}] triples; `onOpen` makes the
  // title a button that opens the item.
  function card(item, rank, { onOpen, actions = [], source } = {}) {
    const li = el("li", { class: "card", "data-item-id": item.item_id, "data-categories": (item.categories || []).join("|") });
    li.append(el("span", { class: "rank" }, `#${rank}`));
    const title = onOpen
      ? el("button", { type: "button", "aria-label": `Open ${item.title}` }, item.title)
      : document.createTextNode(item.title);
    if (onOpen) title.addEventListener("click", () => onOpen(item, li));
    li.append(el("h3", {}, title));
    const cats = el("div", { class: "cats" });
    for (const c of item.categories || []) cats.append(el("span", { class: "cat" }, c));
    // Where the item is sold; an item naming no region is sold everywhere.
    const region = (item.attributes || {}).region;
    if (region !== undefined) cats.append(el("span", { class: "cat region", title: "sold in" }, [].concat(region).join(" · ")));
    li.append(cats);
    const price = item.price === null || item.price === undefined ? "" : `$${Number(item.price).toFixed(2)}`;
    li.append(el("div", { class: "meta" }, el("span", {}, price), el("span", { title: "blended score" }, `score ${Number(item.score || 0).toFixed(3)}`)));
    li.append(explainNodes(item.explanation, source));
    if (actions.length) {
      const row = el("div", { class: "actions" });
      for (const [label, handler, opts] of actions) {
        const b = el("button", { type: "button", class: opts && opts.secondary ? "secondary" : "", "aria-label": `${label} ${item.title}` }, label);
        b.addEventListener("click", () => handler(item, li, b));
        row.append(b);
      }
      li.append(row);
    }
    return li;
  }

  function el(tag, attrs = {}, ...children) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === "" || v === undefined || v === null) continue;
      // Through the CSSOM, which the page's Content-Security-Policy allows (style attributes it does not).
      if (k === "style") n.style.cssText = v;
      else n.setAttribute(k, v);
    }
    for (const c of children) n.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return n;
  }

  return { api, ApiError, identity, setIdentity, who, postEvent, categories, card, legend, explainNodes, el };
})();
