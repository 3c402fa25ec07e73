// The admin dashboard: models (activate, prepare, roll back, indexing progress), retraining
// (run now with its stages, run history, a chart of the gate metrics), experiments (CTR and
// conversion per variant with confidence intervals) and live serving figures with 15-minute
// charts.
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


  // ---- retraining ------------------------------------------------------------------------
  const STAGES = ["gather", "split", "train", "gate", "promote", "record"];
  const GATE = [["recall@20", "Recall@20"], ["ndcg@10", "NDCG@10"], ["newuser_recall@20", "new-user R@20"], ["cold_recall@20", "cold-item R@20"]];
  let pollRetrain = null;
  // The run this page started, until its report arrives.
  let watching = null;
  const fmt4 = (v) => (typeof v === "number" ? v.toFixed(4) : "–");
  const secs = (v) => `${Number(v || 0).toFixed(1)} s`;

  function drawProgress(run) {
    const list = $("retrain-progress");
    if (!run) { list.hidden = true; return; }
    const done = new Map((run.done || []).map((s) => [s.stage, s.seconds]));
    list.replaceChildren(...STAGES.map((st) => {
      const state = done.has(st) ? "done" : st === run.stage ? "running" : "pending";
      const text = state === "done" ? `${st} ✓ ${secs(done.get(st))}` : state === "running" ? `${st}…` : st;
      return el("li", { "data-stage": st, "data-state": state }, text);
    }));
    list.hidden = false;
  }

  function drawRuns(runs) {
    if (!runs.length) {
      $("retrain-runs").replaceChildren(el("p", { class: "muted" }, "No runs yet."));
      $("retrain-chart").replaceChildren();
      return;
    }
    const rows = runs.slice().reverse().map((r) => {
      const metric = r.gate_metric || "recall@20";
      const c = (r.candidate_metrics || {})[metric];
      const a = (r.active_metrics || {})[metric];
      const counts = r.counts || {};
      const stages = (r.stages || []).map((s) => `${s.stage} ${secs(s.seconds)}`).join(" · ");
      return el("tr", { "data-run": r.id, "data-decision": r.decision },
        el("th", { scope: "row" }, r.id),
        el("td", {}, (r.started_at || "").replace("T", " ").slice(0, 19)),
        el("td", {}, r.trigger + (r.shuffled_items ? " (shuffled control)" : "")),
        el("td", {}, el("span", { class: `badge ${r.decision}` }, r.decision.replace("_", " ")), el("div", { class: "muted" }, r.reason || "")),
        el("td", {}, `${metric} ${fmt4(c)} vs ${fmt4(a)}`),
        el("td", {}, `${counts.train_rows ?? 0} / ${counts.holdout_rows ?? 0}`),
        el("td", {}, `${stages}${stages ? " · " : ""}total ${secs(r.seconds)}`));
    });
    $("retrain-runs").replaceChildren(el("table", { id: "retrain-table" },
      el("caption", { class: "visually-hidden" }, "Retrain runs, newest first"),
      el("thead", {}, el("tr", {}, ...["Run", "Started", "Trigger", "Decision", "Candidate vs active", "Rows train / held out", "Time per stage"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows)));
    // The chart: each scored run is one x position, labelled by its candidate version.
    const scored = runs.filter((r) => r.candidate_metrics && Object.keys(r.candidate_metrics).length);
    if (!scored.length) { $("retrain-chart").replaceChildren(el("p", { class: "muted" }, "No scored candidate yet.")); return; }
    const series = GATE.map(([k, name]) => ({ name: `candidate ${name}`, values: scored.map((r) => r.candidate_metrics[k] ?? null) }));
    series.push({ name: "active Recall@20", dashed: true, values: scored.map((r) => (r.active_metrics || {})["recall@20"] ?? null) });
    const chart = lineChart({ id: "gate", title: "Held-out metrics of each candidate (dashed: the model it was compared with)", count: scored.length,
      xLabel: `${scored.length} candidate${scored.length === 1 ? "" : "s"}, oldest left`, yFormat: (v) => v.toFixed(3), series,
      pointAttrs: (i) => ({ "data-run": scored[i].id, "data-decision": scored[i].decision }) });
    $("retrain-chart").replaceChildren(chart);
  }

  async function loadRetrain() {
    let data;
    try {
      ({ data } = await admin("GET", "/admin/retrain"));
    } catch (e) {
      const [msg, cls] = explain(e, "Retraining");
      say("retrain-status", msg, cls);
      return;
    }
    const every = data.every && data.every !== "off" ? `every ${data.every}` : "on demand only ([retrain] every is off)";
    say("retrain-settings", `Runs ${every}; a candidate is promoted (${data.promote}) when its ${data.metric} beats the active model's by ${(100 * data.margin).toFixed(1)}%.`);
    const runs = data.runs || [];
    drawRuns(runs);
    drawProgress(data.running);
    $("retrain-now").disabled = !!data.running;
    if (data.running) {
      say("retrain-status", `Run ${data.running.id} (${data.running.trigger}): ${data.running.stage}, ${secs(data.running.elapsed_s)} so far.`);
    } else if (watching) {
      const r = runs.find((x) => x.id === watching);
      if (r) {
        say("retrain-status", `Run ${r.id}: ${r.decision.replace("_", " ")}. ${r.reason}`, r.decision === "failed" ? "error" : "");
        watching = null;
        loadModels();
      }
    }
    clearTimeout(pollRetrain);
    pollRetrain = data.running || watching ? setTimeout(loadRetrain, 1000) : null;
  }

  $("retrain-now").addEventListener("click", async () => {
    const b = $("retrain-now");
    b.disabled = true;
    try {
      const { data } = await admin("POST", "/admin/retrain", { body: {} });
      watching = data.id;
      say("retrain-status", `Run ${data.id} started.`);
    } catch (e) {
      const [msg, cls] = explain(e, "Retrain");
      say("retrain-status", msg, cls);
      b.disabled = false;
    }
    loadRetrain();
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


  // ---- charts: inline SVG, drawn here (no external resources) ---------------------------
  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(name, attrs, ...kids) {
    const n = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, String(v));
    n.append(...kids);
    return n;
  }
  // A line chart of `series` ([{name, values, dashed?}], values may hold nulls: gaps) over
  // `count` x positions, with the y axis from 0 to the largest value. Returns a <figure>.
  function lineChart({ id, title, series, count, xLabel, yFormat, pointAttrs }) {
    const W = 320, H = 150, L = 40, R = 8, T = 8, B = 22;
    const all = series.flatMap((s) => s.values).filter((v) => typeof v === "number" && isFinite(v));
    const top = Math.max(...all, 0) || 1;
    const x = (i) => L + (count <= 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (count - 1));
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, "data-chart": id });
    root.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
      svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
      svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, yFormat(top)),
      svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, yFormat(0)),
      svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, xLabel));
    series.forEach((s, k) => {
      let d = "";
      let pen = false;
      s.values.forEach((v, i) => {
        if (typeof v !== "number" || !isFinite(v)) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      if (d) root.append(svg("path", { class: `line s${k}${s.dashed ? " dashed" : ""}`, d, "data-series": s.name }));
      if (pointAttrs) {
        s.values.forEach((v, i) => {
          if (typeof v !== "number" || !isFinite(v)) return;
          const c = svg("circle", { class: `s${k}`, cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 3, ...pointAttrs(i, s) });
          c.append(svg("title", {}, `${s.name}: ${yFormat(v)}`));
          root.append(c);
        });
      }
    });
    const legend = el("ul", { class: "legend" }, ...series.map((s, k) =>
      el("li", {}, el("span", { class: `swatch s${k}` }), s.name)));
    return el("figure", { class: "chart" }, el("figcaption", {}, title), root, legend);
  }

  // The last 15 minutes, one point per 10 s, so an activation or a retrain shows in the curve.
  function drawLiveCharts(series) {
    if (!series.length) return;
    const n = series.length;
    const span = `last ${Math.max(1, Math.round(series[0].ago_s / 60))} min`;
    const val = (k) => series.map((p) => (p[k] === undefined ? null : p[k]));
    $("live-charts").replaceChildren(
      lineChart({ id: "rps", title: "Requests/s", count: n, xLabel: span, yFormat: (v) => v.toFixed(1),
        series: [{ name: "requests/s", values: val("rps") }] }),
      lineChart({ id: "latency", title: "Latency (ms)", count: n, xLabel: span, yFormat: (v) => v.toFixed(1),
        series: [{ name: "p50", values: val("p50_ms") }, { name: "p99", values: val("p99_ms") }] }),
      lineChart({ id: "errors", title: "Errors (5xx) per 10 s", count: n, xLabel: span, yFormat: (v) => v.toFixed(0),
        series: [{ name: "errors", values: val("errors") }] }),
      lineChart({ id: "cache", title: "Cache hit rate (%)", count: n, xLabel: span, yFormat: (v) => v.toFixed(0),
        series: [{ name: "hit rate", values: series.map((p) => (p.cache_hit_rate === null || p.cache_hit_rate === undefined ? null : 100 * p.cache_hit_rate)) }] }));
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
      drawLiveCharts(data.series || []);
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
    loadRetrain();
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
    $("retrain-runs").replaceChildren();
    $("retrain-chart").replaceChildren();
    say("auth", "Key forgotten.");
  });

  unlock();
  loadLive();
  setInterval(loadLive, 2000);
  // A scheduled run (or one started elsewhere) shows up without a reload.
  setInterval(() => { if (key() && !pollRetrain) loadRetrain(); }, 10000);
})();
