// The admin dashboard: models (activate, prepare, roll back, indexing progress), experiments
// (CTR and conversion per variant with confidence intervals) and live serving figures.
// The admin key lives in sessionStorage only: never in a URL, never in localStorage.
"use strict";
(() => {
  const { api, el } = tandem;
  const $ = (id) => document.getElementById(id);
  const KEY = "tandem.adminKey";
  let pollModels = null;
  // The version a Prepare click is building, until the table shows it ready.
  let preparing = null;

  const key = () => sessionStorage.getItem(KEY) || "";
  const admin = (method, path, opts = {}) => api(method, path, { ...opts, headers: { "X-API-Key": key() } });

  function say(id, text, cls) {
    $(id).replaceChildren(cls ? el("span", { class: cls }, text) : document.createTextNode(text));
  }

  // What an admin error means for the page. 404: the server has no such admin route (an older
  // build, or the feature is not there), which is "not available", not a failure.
  const upper = (s) => s.charAt(0).toUpperCase() + s.slice(1);
  function explain(e, what) {
    if (e.status === 401) return [`Wrong or missing admin key: ${e.message}`, "error"];
    // The server's 403 message already says the admin API is disabled and how to enable it.
    if (e.status === 403) return [upper((e.body && e.body.message) || "The admin API is disabled on this server."), "error"];
    if (e.status === 404) return [`${what}: not available on this server.`, "notice"];
    return [`${what} failed: ${e.message}`, "error"];
  }

  // ---- models ----------------------------------------------------------------------------
  const versionOf = (m) => m.version;
  // An activation's progress: {phase, done, total}, counted in items.
  function progressOf(m) {
    const p = m.progress;
    if (!p || !p.total) return null;
    return { fraction: Math.min(1, (p.done || 0) / p.total), phase: p.phase || "", done: p.done || 0, total: p.total };
  }
  // Metrics are {val: {name: value}, test: {name: value}} as the checkpoint manifest holds them.
  // The headline ones are shown; the rest fold away so the table stays readable on a phone.
  const HEADLINE = ["recall@20", "ndcg@10"];
  function metricsCell(metrics) {
    const td = el("td", {});
    if (!metrics || typeof metrics !== "object") return td;
    const fmt = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(4));
    const all = [];
    for (const [split, values] of Object.entries(metrics)) {
      if (values && typeof values === "object") {
        for (const [k, v] of Object.entries(values)) if (typeof v === "number") all.push([split, k, v]);
      }
    }
    const head = all.filter(([, k]) => HEADLINE.includes(k));
    td.append(head.map(([s, k, v]) => `${s} ${k} ${fmt(v)}`).join(" · ") || (all.length ? "" : "–"));
    if (all.length > head.length) {
      td.append(el("details", {}, el("summary", {}, "all metrics"),
        el("ul", { class: "metrics" }, ...all.map(([s, k, v]) => el("li", {}, `${s} ${k} ${fmt(v)}`)))));
    }
    return td;
  }

  async function loadModels() {
    let data;
    try {
      ({ data } = await admin("GET", "/admin/models"));
    } catch (e) {
      const [msg, cls] = explain(e, "The model registry");
      if (e.status === 401 || e.status === 403) {
        // A wrong key shows nothing that needs the key.
        say("auth", msg, "error");
        $("models").replaceChildren();
        $("experiments").replaceChildren();
        say("models-status", "");
      } else if (e.status === 404) {
        await activeFromReadyz(msg, cls);
      } else {
        say("models-status", msg, cls);
      }
      return e.status;
    }
    say("auth", "Unlocked.", "");
    const models = Array.isArray(data) ? data : data.models || [];
    const active = data.active || versionOf(models.find((m) => m.status === "active") || {});
    const rows = models.map((m) => {
      const v = versionOf(m);
      const status = m.status || (v === active ? "active" : "");
      const p = progressOf(m);
      const statusCell = el("td", {}, el("span", { class: `badge ${status}` }, status));
      if (status === "indexing") {
        const bar = el("progress", { max: "1", value: p ? String(p.fraction) : "", "aria-label": `Indexing ${v}` });
        statusCell.append(" ", bar, p ? ` ${p.phase} ${p.done}/${p.total}` : "");
      }
      if (m.last_error) statusCell.append(el("div", { class: "error" }, m.last_error));
      const act = el("td", {});
      if (status !== "active" && status !== "indexing") {
        const b = el("button", { type: "button", "aria-label": `Activate model ${v}` }, "Activate");
        b.addEventListener("click", () => activate(v, b));
        act.append(b);
        // Without a collection, a version can be prepared: its collection is built without
        // switching, so an experiment variant can serve it beside the active model.
        if (!m.collection) {
          const p = el("button", { type: "button", class: "secondary", "aria-label": `Prepare model ${v} for an experiment` }, "Prepare");
          p.addEventListener("click", () => prepare(v, p));
          act.append(" ", p);
        }
      }
      return el("tr", { "data-version": v, "data-status": status, "data-source": "registry" },
        el("th", { scope: "row" }, v), statusCell,
        metricsCell(m.metrics), el("td", {}, (m.created_at || "").replace("T", " ").slice(0, 19)), act);
    });
    $("models").replaceChildren(el("table", {},
      el("caption", { class: "visually-hidden" }, "Registered models"),
      el("thead", {}, el("tr", {}, ...["Version", "Status", "Metrics", "Created", "Action"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows)));
    $("rollback").hidden = models.length < 2;
    say("models-status", `${models.length} registered · active ${active || "none"}`);
    const prepared = preparing && models.find((m) => versionOf(m) === preparing);
    if (prepared && prepared.status === "ready") {
      say("models-action", `${preparing} is ready: an experiment variant with "model_version": "${preparing}" serves it beside the active model.`);
      preparing = null;
    } else if (prepared && prepared.status !== "indexing" && prepared.last_error) {
      say("models-action", `Preparing ${preparing} failed: ${prepared.last_error}`, "error");
      preparing = null;
    }
    // Keep polling while something is indexing, so the progress bar moves.
    const busy = preparing !== null || models.some((m) => m.status === "indexing");
    clearTimeout(pollModels);
    if (busy) pollModels = setTimeout(loadModels, 1000);
    return 200;
  }

  // Without the registry, the serving model is still worth showing: /readyz reports it.
  async function activeFromReadyz(note, cls) {
    try {
      const { data } = await api("GET", "/readyz");
      $("models").replaceChildren(el("table", {},
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Version"), el("th", { scope: "col" }, "Status"))),
        el("tbody", {}, el("tr", { "data-version": data.model_version, "data-status": "active", "data-source": "readyz" },
          el("th", { scope: "row" }, data.model_version), el("td", {}, el("span", { class: "badge active" }, "active"))))));
    } catch { /* the note below says enough */ }
    say("models-status", note, cls);
  }

  async function activate(version, button) {
    button.disabled = true;
    say("models-action", `Activating ${version}: embedding the catalog into a new collection…`);
    const started = Date.now();
    const poll = setInterval(loadModels, 1000);
    try {
      const { data } = await admin("POST", `/admin/models/${encodeURIComponent(version)}/activate`);
      if (data && data.outcome === "started") {
        // 202: the catalog is embedded in the background; the table polls while it indexes.
        say("models-action", `Activating ${version}: embedding the catalog into a new collection (progress above); it switches when done.`);
      } else {
        say("models-action", `Activated ${version} in ${((Date.now() - started) / 1000).toFixed(1)} s.`);
      }
    } catch (e) {
      const [msg, cls] = explain(e, `Activating ${version}`);
      say("models-action", msg, cls);
    } finally {
      clearInterval(poll);
      button.disabled = false;
      loadModels();
    }
  }

  async function prepare(version, button) {
    button.disabled = true;
    try {
      await admin("POST", `/admin/models/${encodeURIComponent(version)}/prepare`);
      say("models-action", `Preparing ${version}: embedding the catalog into its own collection (progress above).`);
      preparing = version;
    } catch (e) {
      const [msg, cls] = explain(e, `Preparing ${version}`);
      say("models-action", msg, cls);
      button.disabled = false;
      return;
    }
    loadModels();
  }

  $("rollback").addEventListener("click", async () => {
    try {
      const { data } = await admin("POST", "/admin/models/rollback");
      const to = data && data.active ? versionOf(data.active) : "";
      say("models-action", `Rolled back${to ? " to " + to : ""}.`);
    } catch (e) {
      const [msg, cls] = explain(e, "Rollback");
      say("models-action", msg, cls);
    }
    loadModels();
  });

  // ---- experiments -----------------------------------------------------------------------
  const pct = (x) => (x === undefined || x === null ? "–" : `${(100 * x).toFixed(2)}%`);
  // A rate is {value, ci_low, ci_high} (a Wilson 95% interval); value is null with no traffic.
  function rateCell(rate) {
    if (!rate || rate.value === null || rate.value === undefined) return el("td", {}, "–");
    return el("td", {}, pct(rate.value), el("span", { class: "muted" }, ` (95% CI ${pct(rate.ci_low)}–${pct(rate.ci_high)})`));
  }
  async function loadExperiments() {
    let list;
    try {
      ({ data: list } = await admin("GET", "/admin/experiments"));
    } catch (e) {
      const [msg, cls] = explain(e, "Experiments");
      say("exp-status", msg, cls);
      $("experiments").replaceChildren();
      return;
    }
    const exps = Array.isArray(list) ? list : list.experiments || [];
    if (!exps.length) {
      say("exp-status", "No experiments configured.");
      $("experiments").replaceChildren();
      return;
    }
    say("exp-status", `${exps.length} experiment(s)`);
    const blocks = [];
    for (const exp of exps) {
      const name = typeof exp === "string" ? exp : exp.name;
      let rep;
      try {
        ({ data: rep } = await admin("GET", `/admin/experiments/${encodeURIComponent(name)}`));
      } catch (e) {
        blocks.push(el("p", { class: "error" }, `${name}: ${e.message}`));
        continue;
      }
      const variants = rep.variants || [];
      blocks.push(el("div", { class: "table-wrap" }, el("table", { "data-experiment": name },
        el("caption", {}, `Experiment ${name}`),
        el("thead", {}, el("tr", {}, ...["Variant", "Share", "Model", "Impressions", "Clicks", "Purchases", "CTR", "Conversion", "p99"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, ...variants.map((v) => el("tr", {},
          el("th", { scope: "row" }, v.name), el("td", {}, v.share === undefined ? "" : pct(v.share)),
          el("td", {}, v.model_version || "(serving model)"), el("td", {}, v.impressions ?? 0), el("td", {}, v.clicks ?? 0), el("td", {}, v.purchases ?? 0),
          rateCell(v.ctr), rateCell(v.conversion),
          el("td", {}, v.p99_ms === undefined || v.p99_ms === null ? "–" : `${Number(v.p99_ms).toFixed(2)} ms`)))))));
    }
    $("experiments").replaceChildren(...blocks);
  }

  // ---- live figures (public, no key needed) ----------------------------------------------
  async function loadLive() {
    try {
      const { data } = await api("GET", "/v1/stats");
      const w = data.window || {};
      const c = data.cache || {};
      const figures = [
        ["Requests/s", w.rps === undefined ? "–" : w.rps.toFixed(1)],
        ["p50 latency", w.p50_ms === undefined ? "–" : `${w.p50_ms.toFixed(2)} ms`],
        ["p99 latency", w.p99_ms === undefined ? "–" : `${w.p99_ms.toFixed(2)} ms`],
        ["Errors (window)", w.errors ?? "–"],
        ["Cache hit rate", c.hit_rate === null || c.hit_rate === undefined ? "–" : pct(c.hit_rate)],
        ["Requests total", data.requests_total ?? "–"],
      ];
      $("live").replaceChildren(...figures.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
      say("live-status", `Last ${Math.round(data.window_s || 60)} s · updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      const [msg, cls] = explain(e, "Live serving figures");
      say("live-status", msg, cls);
    }
  }

  async function unlock() {
    if (!key()) {
      say("auth", "Enter the admin key to see models and experiments.");
      return;
    }
    const status = await loadModels();
    if (status === 401 || status === 403) return;
    loadExperiments();
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    unlock();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("models").replaceChildren();
    $("experiments").replaceChildren();
    say("auth", "Key forgotten.");
  });

  unlock();
  loadLive();
  setInterval(loadLive, 2000);
})();
