// Labeling page: keyboard shortcuts, visible-time measurement, and light client-side checks.
// Loaded as a file (the Content-Security-Policy forbids inline script). Never writes HTML:
// every text goes through textContent, so model output stays text.
"use strict";

(function () {
  // "next task" page: the server marks the form for auto-submit only when the navigation came from
  // this site or the address bar (a cross-site link gets the button, so it cannot assign a task)
  const next = document.getElementById("next-form");
  if (next && next.dataset.auto === "1") { next.submit(); return; }

  const form = document.getElementById("label-form");
  if (!form) return;
  const skipForm = document.getElementById("skip-form");
  const mode = form.dataset.mode;
  const k = parseInt(form.dataset.k, 10);
  const letters = "ABCDEFGHI".slice(0, k);

  // Time on task: count only while the tab is visible, so a label left open over lunch does
  // not look like a slow, careful one.
  let visibleMs = 0;
  let since = document.visibilityState === "visible" ? performance.now() : null;
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") {
      since = performance.now();
    } else if (since !== null) {
      visibleMs += performance.now() - since;
      since = null;
    }
  });
  function elapsedMs() {
    return Math.round(visibleMs + (since === null ? 0 : performance.now() - since));
  }

  function radio(name, value) {
    return form.querySelector('input[name="' + name + '"][value="' + value + '"]');
  }

  // ---- pairwise: choice + strength
  function syncStrength() {
    const choice = form.querySelector('input[name="choice"]:checked');
    const needs = choice !== null && (choice.value === "A" || choice.value === "B");
    form.querySelectorAll('input[name="strength"]').forEach(function (el) {
      el.disabled = !needs && choice !== null;
      el.required = needs;
      if (!needs && choice !== null) el.checked = false;
    });
    letters.split("").forEach(function (slot) {
      const card = document.getElementById("cand-" + slot);
      if (card) card.classList.toggle("picked", choice !== null && choice.value === slot);
    });
  }
  function pick(value) {
    const el = radio("choice", value);
    if (el) { el.checked = true; syncStrength(); }
  }
  function strength(value) {
    const el = radio("strength", value);
    if (el && !el.disabled) el.checked = true;
  }

  // ---- ranking: press candidates best first
  let order = [];
  function showRanking() {
    const out = document.getElementById("ranking-order");
    if (out) out.textContent = order.length ? order.join(" > ") : "none yet";
    letters.split("").forEach(function (slot) {
      const select = form.querySelector('select[name="rank_' + slot + '"]');
      const place = order.indexOf(slot);
      if (select) select.value = place >= 0 ? String(place + 1) : "";
    });
  }
  function rankNext(slot) {
    if (order.indexOf(slot) >= 0) return;
    order.push(slot);
    if (order.length === k - 1) {  // the last one is implied
      letters.split("").forEach(function (s) { if (order.indexOf(s) < 0) order.push(s); });
    }
    showRanking();
  }
  form.querySelectorAll("select[name^='rank_']").forEach(function (select) {
    select.addEventListener("change", function () {  // mouse edits: rebuild the order from the selects
      const pairs = [];
      letters.split("").forEach(function (slot) {
        const s = form.querySelector('select[name="rank_' + slot + '"]');
        if (s && s.value) pairs.push([parseInt(s.value, 10), slot]);
      });
      pairs.sort(function (a, b) { return a[0] - b[0]; });
      order = pairs.map(function (p) { return p[1]; });
      const out = document.getElementById("ranking-order");
      if (out) out.textContent = order.length ? order.join(" > ") : "none yet";
    });
  });

  form.addEventListener("change", function (ev) {
    if (ev.target && ev.target.name === "choice") syncStrength();
  });

  let sent = false;
  form.addEventListener("submit", function (ev) {
    if (sent) { ev.preventDefault(); return; }  // a double press sends once (a resend would be a no-op anyway)
    sent = true;
    form.querySelector('input[name="client_ms"]').value = String(elapsedMs());
    const button = document.getElementById("submit-label");
    if (button) button.disabled = true;
  });

  function submit() {
    if (typeof form.requestSubmit === "function") form.requestSubmit();  // runs the browser's checks
    else form.submit();
  }

  document.addEventListener("keydown", function (ev) {
    const tag = ev.target && ev.target.tagName;
    const typing = tag === "TEXTAREA" || (tag === "INPUT" && ev.target.type === "text") || tag === "SELECT";
    if (typing) {
      if (ev.key === "Escape") ev.target.blur();
      else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const key = ev.key;
    if (key === "Enter" && (tag === "BUTTON" || tag === "A")) return;  // a focused button or link acts itself
    if (key === "Enter") { ev.preventDefault(); submit(); return; }
    if (key === "s") { ev.preventDefault(); if (skipForm) skipForm.requestSubmit ? skipForm.requestSubmit() : skipForm.submit(); return; }
    if (mode === "pairwise") {
      const action = {"1": function () { pick("A"); }, "2": function () { pick("B"); },
                      "t": function () { pick("tie"); }, "b": function () { pick("both_bad"); },
                      "q": function () { strength("1"); }, "w": function () { strength("2"); },
                      "e": function () { strength("3"); }}[key];
      if (action) { ev.preventDefault(); action(); }
    } else {
      const n = parseInt(key, 10);
      if (n >= 1 && n <= k) { ev.preventDefault(); rankNext(letters[n - 1]); }
      else if (key === "Backspace") { ev.preventDefault(); order = []; showRanking(); }
    }
  });

  syncStrength();
  showRanking();
})();
