// Onboarding: a new user picks categories or liked items and gets personal results at once.
"use strict";
(() => {
  const { api, setIdentity, categories, card, legend, el } = tandem;
  const $ = (id) => document.getElementById(id);
  const MIN_PICKS = 3;

  function picked() {
    const cats = [...document.querySelectorAll('#cat-choices input:checked')].map((i) => i.value);
    const items = [...document.querySelectorAll('#item-choices input:checked')].map((i) => i.value);
    return { cats, items };
  }

  function updateCount() {
    const { cats, items } = picked();
    const n = cats.length + items.length;
    $("count").textContent = n >= MIN_PICKS ? `${n} picked` : `${n} picked; pick ${MIN_PICKS - n} more`;
  }

  function choice(value, label, name) {
    const input = el("input", { type: "checkbox", name, value });
    input.addEventListener("change", updateCount);
    return el("li", {}, el("label", {}, input, el("span", {}, label)));
  }

  async function load() {
    try {
      const [cats, trending] = await Promise.all([categories(), api("GET", "/v1/trending", { query: { k: 12 } })]);
      $("cat-choices").replaceChildren(...cats.map((c) => choice(c, c, "category")));
      $("item-choices").replaceChildren(...(trending.data.items || []).map((it) => choice(it.item_id, `${it.title} (${(it.categories || []).join(", ")})`, "liked")));
      updateCount();
    } catch (e) {
      $("status").replaceChildren(el("span", { class: "error" }, `Could not load the choices: ${e.message}`));
    }
  }

  $("onboard").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const { cats, items } = picked();
    if (cats.length + items.length < MIN_PICKS) {
      $("status").replaceChildren(el("span", { class: "error" }, `Pick at least ${MIN_PICKS} categories or items (you picked ${cats.length + items.length}).`));
      return;
    }
    const me = setIdentity("new");
    $("go").disabled = true;
    $("status").textContent = "Building your recommendations…";
    try {
      const { data, ms } = await api("POST", `/v1/users/${encodeURIComponent(me.user_id)}/onboarding`, {
        body: { categories: cats, liked_items: items, k: 20 },
      });
      const recs = data.recommendations || data;
      $("rail").replaceChildren(...(recs.items || []).map((it, i) => card(it, i + 1)));
      $("results").hidden = false;
      $("status").textContent = `${(recs.items || []).length} recommendations for new user ${me.user_id} in ${Math.round(ms)} ms (model ${recs.model_version}).`;
      $("result-title").focus();
    } catch (e) {
      $("status").replaceChildren(el("span", { class: "error" }, `Onboarding failed: ${e.message}`));
    } finally {
      $("go").disabled = false;
    }
  });

  $("legend").append(legend());
  load();
})();
