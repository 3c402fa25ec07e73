// The storefront: a "Recommended for you" rail that re-ranks live on clicks and purchases.
"use strict";
(() => {
  const { api, identity, setIdentity, who, postEvent, categories, card, legend, el } = tandem;
  const $ = (id) => document.getElementById(id);
  const selected = new Set();
  let me = identity();
  let last = null; // the last recommendations response, for its variant
  let generation = 0; // drops responses that arrive after a newer request was sent

  function showIdentity() {
    for (const r of document.querySelectorAll('input[name="who"]')) r.checked = r.value === me.kind;
    if (me.kind === "demo") $("demo-user").value = me.user_id;
    $("demo-user").disabled = me.kind !== "demo";
    $("who-id").textContent = me.kind === "anonymous" ? `session ${me.session_id}` : `user ${me.user_id}`;
  }

  async function refresh(reason) {
    const mine = ++generation;
    const query = { ...who(me), k: 20, explain: true, available_only: $("available").checked, category: [...selected], region: $("region").value };
    try {
      const { data, ms } = await api("GET", "/v1/recommendations", { query });
      if (mine !== generation) return;
      last = data;
      render(data.items || [], data.source);
      const degraded = (data.degraded || []).length ? ` · degraded: ${data.degraded.join(", ")}` : "";
      $("status").textContent = `${reason ? reason + " · " : ""}${(data.items || []).length} items · ${data.source || "ranked"} · model ${data.model_version} · variant ${data.variant} · ${Math.round(ms)} ms${degraded}`;
    } catch (e) {
      if (mine !== generation) return;
      $("status").innerHTML = "";
      $("status").append(el("span", { class: "error" }, `Could not load recommendations: ${e.message}`));
    }
  }

  function render(items, source) {
    const rail = $("rail");
    rail.replaceChildren(...items.map((it, i) => card(it, i + 1, {
      source,
      onOpen: openItem,
      actions: [["Buy", buy]],
    })));
  }

  async function openItem(item, li) {
    for (const c of document.querySelectorAll(".card.opened")) c.classList.remove("opened");
    li.classList.add("opened");
    $("detail-title").textContent = `Similar to ${item.title}`;
    $("detail-hint").textContent = "";
    try {
      await postEvent(me, item.item_id, "click", last && last.variant);
    } catch (e) {
      $("status").textContent = `Click not recorded: ${e.message}`;
    }
    await Promise.all([refresh(`re-ranked after a click on “${item.title}”`), similar(item)]);
  }

  async function similar(item) {
    const list = $("similar");
    try {
      const { data } = await api("GET", `/v1/items/${encodeURIComponent(item.item_id)}/similar`, {
        query: { k: 8, available_only: $("available").checked, region: $("region").value },
      });
      list.replaceChildren(...(data.items || []).map((s) => el("li", { "data-item-id": s.item_id }, s.title, el("span", { class: "muted" }, ` · ${(s.categories || []).join(", ")}`))));
      if (!(data.items || []).length) list.replaceChildren(el("li", { class: "muted" }, "No similar items match the filters."));
    } catch (e) {
      list.replaceChildren(el("li", { class: "error" }, `Could not load similar items: ${e.message}`));
    }
  }

  async function buy(item, li, button) {
    button.disabled = true;
    try {
      await postEvent(me, item.item_id, "purchase", last && last.variant);
      // Gone at once; the refreshed rail (where the re-ranker excludes purchases) confirms it.
      li.remove();
      await refresh(`bought “${item.title}”`);
    } catch (e) {
      button.disabled = false;
      $("status").textContent = `Purchase not recorded: ${e.message}`;
    }
  }

  async function loadChips() {
    try {
      const cats = await categories();
      $("chips").replaceChildren(...cats.map((c) => {
        const b = el("button", { type: "button", class: "chip", "aria-pressed": "false", "data-category": c }, c);
        b.addEventListener("click", () => {
          const on = !selected.has(c);
          if (on) selected.add(c); else selected.delete(c);
          b.setAttribute("aria-pressed", String(on));
          refresh(on ? `only ${[...selected].join(", ")}` : "category filter changed");
        });
        return el("li", {}, b);
      }));
    } catch (e) {
      $("chips").replaceChildren(el("li", { class: "error" }, `Categories unavailable: ${e.message}`));
    }
  }

  for (const r of document.querySelectorAll('input[name="who"]')) {
    r.addEventListener("change", () => {
      me = setIdentity(r.value, r.value === "demo" ? $("demo-user").value.trim() : undefined);
      showIdentity();
      refresh(`now shopping as ${me.kind === "anonymous" ? "an anonymous session" : "user " + me.user_id}`);
    });
  }
  $("demo-user").addEventListener("change", () => {
    const v = $("demo-user").value.trim();
    if (!v) return;
    me = setIdentity("demo", v);
    showIdentity();
    refresh(`now shopping as user ${v}`);
  });
  $("region").addEventListener("change", () => refresh($("region").value ? `sold in ${$("region").selectedOptions[0].textContent}` : "every region"));
  $("available").addEventListener("change", () => refresh($("available").checked ? "available items only" : "including unavailable items"));

  $("legend").append(legend());
  showIdentity();
  loadChips();
  refresh("");
})();
