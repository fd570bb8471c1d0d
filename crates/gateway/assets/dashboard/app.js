// The Sluice dashboard: reads /admin (the session cookie authenticates GETs) and draws.
// Plain script, no build step. Every value from the request log goes into the page as
// text (textContent), never as HTML: users and features are whatever clients sent.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const OUTCOMES = ["ok", "api_error", "bad_output", "rejected_input", "rate_limited", "budget_exceeded", "client_cancelled"];
  const COLORS = {
    ok: "#12b76a", api_error: "#f04438", bad_output: "#f79009", rejected_input: "#7a5af8",
    rate_limited: "#2e90fa", budget_exceeded: "#dd2590", client_cancelled: "#98a2b3",
  };
  const charts = {};
  let cursor = null;

  // ---- formatting ----
  const dash = "–";
  const num = (v, d = 0) => (v == null || Number.isNaN(v) ? dash : Number(v).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d }));
  const pct = (v) => (v == null ? dash : (v * 100).toFixed(1) + " %");
  const usd = (v) => (v == null ? dash : "$" + (v >= 1 ? v.toFixed(2) : v.toFixed(6)));
  const ms = (v) => (v == null ? dash : num(v, 1) + " ms");
  const when = (t) => (t == null ? dash : new Date(t).toLocaleString());
  // Date and time, compact: a range can span days, and a time alone would not say which.
  const stamp = (t) => new Date(t).toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  }

  // A table from column specs [{h, f(row), n (numeric)}]; `empty` when there are no rows.
  function fillTable(table, cols, rows, empty, onClick) {
    table.replaceChildren();
    if (!rows.length) {
      table.append(el("tbody", {}, el("tr", {}, el("td", { class: "empty", text: empty }))));
      return;
    }
    table.append(el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { class: c.n ? "n" : "", text: c.h })))));
    const body = el("tbody");
    for (const r of rows) {
      const tr = el("tr", {}, ...cols.map((c) => {
        const v = c.f(r);
        return v instanceof Node ? el("td", { class: c.n ? "n" : "" }, v) : el("td", { class: c.n ? "n" : "", text: String(v) });
      }));
      if (onClick) {
        tr.tabIndex = 0;
        tr.addEventListener("click", () => onClick(r));
        tr.addEventListener("keydown", (e) => { if (e.key === "Enter") onClick(r); });
      }
      body.append(tr);
    }
    table.append(body);
  }

  function tiles(container, items) {
    container.replaceChildren(...items.map(([k, v]) => el("div", { class: "tile" }, el("div", { class: "v", text: v }), el("div", { class: "k", text: k }))));
  }

  // ---- data ----
  async function getJSON(url, { allow404 = false } = {}) {
    const r = await fetch(url, { headers: { accept: "application/json" }, credentials: "same-origin" });
    if (r.status === 401) {
      location.href = "/dashboard";
      throw new Error("signed out");
    }
    if (allow404 && r.status === 404) return null;
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
      throw new Error(url.split("?")[0] + ": " + message);
    }
    return r.json();
  }

  const range = () => $("range").value;

  // ---- charts ----
  // What a chart plots is also on its box as `data-plot` ({labels, data}: uPlot's
  // columns, x first), so a test or a person can read the figures behind the lines.
  function chart(id, opts, data) {
    if (charts[id]) charts[id].destroy();
    const box = $(id);
    box.replaceChildren();
    box.dataset.plot = JSON.stringify({ labels: opts.series.map((s) => s.label || "x"), data });
    const width = Math.max(280, box.clientWidth || 480);
    charts[id] = new uPlot({ width, height: 200, ...opts }, data, box);
  }

  function drawSeries(o) {
    const xs = o.series.map((p) => p.start_ms / 1000);
    const present = OUTCOMES.filter((k) => o.series.some((p) => (p.outcomes[k] || 0) > 0));
    const shown = present.length ? present : ["ok"];
    chart("chart-requests", {
      series: [{}, ...shown.map((k) => ({ label: k, stroke: COLORS[k], width: 2 }))],
      axes: [{}, { label: "requests" }],
    }, [xs, ...shown.map((k) => o.series.map((p) => p.outcomes[k] || 0))]);

    const lat = (f) => o.series.map((p) => (p.latency_ms ? p.latency_ms[f] : null));
    chart("chart-latency", {
      series: [{},
        { label: "p50", stroke: "#2e90fa", width: 2 },
        { label: "p95", stroke: "#f79009", width: 2 },
        { label: "p99", stroke: "#f04438", width: 2 },
        { label: "TTFT p50", stroke: "#7a5af8", width: 2, dash: [4, 4] }],
      axes: [{}, { label: "ms" }],
    }, [xs, lat("p50"), lat("p95"), lat("p99"), o.series.map((p) => (p.ttft_ms ? p.ttft_ms.p50 : null))]);

    chart("chart-cache", {
      series: [{}, { label: "hit rate %", stroke: "#12b76a", width: 2 }],
      axes: [{}, { label: "%" }],
      scales: { y: { range: [0, 100] } },
    }, [xs, o.series.map((p) => (p.cache_hit_rate == null ? null : p.cache_hit_rate * 100))]);

    const hours = [...Array(24).keys()];
    const byHour = Object.fromEntries(o.by_hour.map((g) => [parseInt(g.group, 10), g]));
    chart("chart-hours", {
      scales: { x: { time: false }, usd: {} },
      series: [{ label: "hour" },
        { label: "tokens", stroke: "#2e90fa", fill: "#2e90fa22", width: 2 },
        { label: "cost $", stroke: "#dd2590", width: 2, scale: "usd" }],
      axes: [{ label: "hour (UTC)" }, { label: "tokens" }, { scale: "usd", side: 1, label: "$", grid: { show: false } }],
    }, [hours, hours.map((h) => (byHour[h] ? byHour[h].prompt_tokens + byHour[h].completion_tokens : 0)), hours.map((h) => (byHour[h] ? byHour[h].cost_usd : 0))]);
  }

  // ---- panels ----
  const usageCols = (label) => [
    { h: label, f: (g) => g.group },
    { h: "requests", f: (g) => num(g.requests), n: 1 },
    { h: "tokens in", f: (g) => num(g.prompt_tokens), n: 1 },
    { h: "tokens out", f: (g) => num(g.completion_tokens), n: 1 },
    { h: "cost", f: (g) => usd(g.cost_usd), n: 1 },
    { h: "p95", f: (g) => ms(g.latency_ms && g.latency_ms.p95), n: 1 },
    { h: "API errors", f: (g) => pct(g.api_error_rate), n: 1 },
  ];

  function drawOverview(o) {
    const t = o.total;
    tiles($("tiles"), [
      ["requests", num(t.requests)],
      ["API error rate", pct(t.api_error_rate)],
      ["bad outputs", pct(t.bad_output_rate)],
      ["latency p95", ms(t.latency_ms && t.latency_ms.p95)],
      ["TTFT p50", ms(t.ttft_ms && t.ttft_ms.p50)],
      ["tokens in / out", num(t.prompt_tokens) + " / " + num(t.completion_tokens)],
      ["cost", usd(t.cost_usd)],
      ["feedback mean", t.feedback_mean == null ? dash : num(t.feedback_mean, 2) + " (" + t.feedback_count + ")"],
      ["regenerations", pct(t.regeneration_rate)],
    ]);
    tiles($("cache-tiles"), [
      ["hit rate", pct(t.cache_hit_rate)],
      ["saved", usd(t.cost_saved_usd)],
    ]);
    fillTable($("table-models"), usageCols("model"), o.by_model, "no requests in this range");
    fillTable($("table-features"), usageCols("feature"), o.by_feature, "no requests in this range");
    fillTable($("table-users"), [
      { h: "user", f: (g) => g.group },
      { h: "requests", f: (g) => num(g.requests), n: 1 },
      { h: "tokens", f: (g) => num(g.prompt_tokens + g.completion_tokens), n: 1 },
      { h: "cost", f: (g) => usd(g.cost_usd), n: 1 },
    ], o.top_users, "no requests with a user in this range");
    drawSeries(o);
    fillOptions($("filter-model"), o.by_model.map((g) => g.group));
    fillOptions($("filter-feature"), o.by_feature.map((g) => g.group));
  }

  function fillOptions(select, values) {
    const keep = select.value;
    const names = values.filter((v) => v !== "(none)");
    if (keep && !names.includes(keep)) names.push(keep);
    select.replaceChildren(el("option", { value: "", text: "any" }), ...names.map((v) => el("option", { value: v, text: v })));
    select.value = keep;
  }

  function drawBudgets(b) {
    const box = $("budgets");
    box.replaceChildren();
    if (!b.data.length) {
      box.append(el("p", { class: "empty", text: "no budgets configured" }));
      return;
    }
    for (const rule of b.data) {
      box.append(el("h3", { text: rule.name + " — " + rule.scope + ", per " + rule.period + ", " + usd(rule.limit_usd) + " (" + rule.on_exceeded + ")" }));
      const table = el("table");
      fillTable(table, [
        { h: rule.scope, f: (c) => c.scope_value || "all" },
        { h: "spent", f: (c) => usd(c.spent_usd), n: 1 },
        { h: "limit", f: (c) => usd(c.limit_usd), n: 1 },
        { h: "", f: (c) => {
          const cls = c.exhausted ? "bar over" : (rule.alert_at || []).some((a) => c.percent >= a * 100) ? "bar alert" : "bar";
          const bar = el("span", { class: cls }, el("span"));
          bar.firstChild.style.width = Math.min(100, c.percent) + "%";
          return bar;
        } },
        { h: "%", f: (c) => num(c.percent, 1), n: 1 },
        { h: "forecast to run out", f: (c) => (c.exhausted ? "exhausted" : c.forecast_exhaustion ? when(c.forecast_exhaustion) : "lasts the period") },
      ], rule.counters, "nothing spent this period");
      box.append(table);
    }
  }

  // Reports as GET /admin/experiments returns them: {experiments: [REPORT, ...]}.
  function drawExperiments(e) {
    const box = $("experiments");
    box.replaceChildren();
    const list = (e && e.experiments) || [];
    if (!list.length) {
      box.append(el("p", { class: "empty", text: "no experiments configured" }));
      return;
    }
    for (const x of list) {
      const part = el("div", { class: "experiment", "data-experiment": x.name });
      part.append(el("h3", { text: x.name + (x.active ? "" : " (inactive)") + " — " + x.target + " by " + x.assignment + ", control " + x.control }));
      part.append(el("p", { class: "verdict", text: x.verdict }));
      if (x.srm && x.srm.warning) {
        part.append(el("p", { class: "warning", text: "Sample ratio mismatch: assignment is off its weights (p = " + num(x.srm.p_value, 4) + "); do not trust the comparison." }));
      }
      const table = el("table");
      fillTable(table, [
        { h: "variant", f: (v) => v.name },
        { h: "weight", f: (v) => num(v.weight), n: 1 },
        { h: "requests", f: (v) => num(v.requests), n: 1 },
        { h: "users", f: (v) => num(v.users), n: 1 },
        { h: "p50", f: (v) => ms(v.latency_p50_ms), n: 1 },
        { h: "p95", f: (v) => ms(v.latency_p95_ms), n: 1 },
        { h: "cost / req", f: (v) => usd(v.cost_per_request_usd), n: 1 },
        { h: "pass rate", f: (v) => pct(v.pass_rate), n: 1 },
        { h: "errors", f: (v) => pct(v.error_rate), n: 1 },
        { h: "feedback", f: (v) => num(v.feedback_mean, 2), n: 1 },
        { h: "regen", f: (v) => pct(v.regeneration_rate), n: 1 },
      ], x.variants || [], "no traffic yet");
      part.append(table);
      box.append(part);
    }
  }

  function recordsQuery(before) {
    const q = new URLSearchParams({ since: range(), limit: "50" });
    for (const [k, v] of new FormData($("filters"))) if (v) q.set(k, v);
    if (before) q.set("before", before);
    return "/admin/records?" + q;
  }

  const recordCols = [
    { h: "time", f: (r) => stamp(r.started_at_ms) },
    { h: "model", f: (r) => r.model || r.model_requested || dash },
    { h: "feature", f: (r) => r.feature || dash },
    { h: "user", f: (r) => r.user_id || dash },
    { h: "outcome", f: (r) => el("span", { class: r.outcome === "ok" ? "outcome-ok" : "outcome-bad", text: r.outcome + (r.status ? " " + r.status : "") }) },
    { h: "cache", f: (r) => r.cache_status || dash },
    { h: "tokens", f: (r) => num(r.prompt_tokens + r.completion_tokens), n: 1 },
    { h: "cost", f: (r) => (r.cost_nanos == null ? dash : usd(r.cost_nanos / 1e9)), n: 1 },
    { h: "latency", f: (r) => ms(r.latency_ms), n: 1 },
    { h: "request id", f: (r) => r.request_id },
  ];
  let shownRecords = [];

  async function loadRecords(more) {
    const page = await getJSON(recordsQuery(more ? cursor : null));
    shownRecords = more ? shownRecords.concat(page.data) : page.data;
    cursor = page.next_before;
    fillTable($("table-records"), recordCols, shownRecords, "no requests match", showRecord);
    $("more").hidden = !cursor;
  }

  async function showRecord(r) {
    const box = $("record-detail");
    const d = await getJSON("/admin/records/" + encodeURIComponent(r.request_id));
    const dl = el("dl");
    for (const [k, v] of Object.entries(d)) {
      if (v == null || k === "object" || k === "feedback" || k === "request_body" || k === "response_body") continue;
      dl.append(el("dt", { text: k }), el("dd", { text: k === "started_at_ms" ? when(v) + " (" + v + ")" : String(v) }));
    }
    const fb = d.feedback || [];
    dl.append(el("dt", { text: "feedback" }), el("dd", { text: fb.length ? fb.map((f) => f.score + (f.comment ? " “" + f.comment + "”" : "")).join("; ") : "none" }));
    const parts = [el("h3", { text: "Request " + d.request_id }), dl];
    for (const k of ["request_body", "response_body"]) if (d[k]) parts.push(el("h3", { text: k }), el("pre", { text: d[k] }));
    parts.push(el("button", { type: "button", id: "close-detail", text: "Close" }));
    box.replaceChildren(...parts);
    box.hidden = false;
    $("close-detail").addEventListener("click", () => { box.hidden = true; });
    box.scrollIntoView({ block: "nearest" });
  }

  // ---- refresh ----
  // One load at a time; a refresh asked for during one (a range changed mid-load) runs
  // once it ends, so the panels end up showing what the picker says.
  let loading = false;
  let again = false;
  async function refresh() {
    if (loading) {
      again = true;
      return;
    }
    loading = true;
    const started = performance.now();
    $("status").textContent = "loading…";
    const shown = range();
    const since = encodeURIComponent(shown);
    try {
      const [o, b, e] = await Promise.all([
        getJSON("/admin/overview?since=" + since),
        getJSON("/admin/budgets?limit=10"),
        getJSON("/admin/experiments?since=" + since, { allow404: true }),
        loadRecords(false),
      ]);
      drawOverview(o);
      drawBudgets(b);
      drawExperiments(e);
      const took = Math.round(performance.now() - started);
      $("status").textContent = "updated " + new Date().toLocaleTimeString() + " (" + took + " ms)";
      document.body.dataset.range = shown;
      document.body.dataset.loaded = String((Number(document.body.dataset.loaded) || 0) + 1);
      // The first load, drawn: a User Timing mark (ms from navigation start, in the
      // next frame, i.e. once painted) for monitoring, and for the browser test's log.
      if (!performance.getEntriesByName("dashboard-loaded").length) {
        requestAnimationFrame(() => performance.mark("dashboard-loaded"));
      }
    } catch (err) {
      $("status").textContent = "could not load: " + err.message;
    } finally {
      loading = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  }

  function start() {
    const outcome = $("filter-outcome");
    for (const o of OUTCOMES) outcome.append(el("option", { value: o, text: o }));
    $("range").addEventListener("change", refresh);
    $("refresh").addEventListener("click", refresh);
    $("filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      loadRecords(false).catch((err) => { $("status").textContent = "could not load: " + err.message; });
    });
    $("more").addEventListener("click", () => loadRecords(true));
    let timer = null;
    $("auto").addEventListener("change", (ev) => {
      clearInterval(timer);
      timer = ev.target.checked ? setInterval(refresh, 30000) : null;
    });
    let resize = null;
    window.addEventListener("resize", () => {
      clearTimeout(resize);
      resize = setTimeout(() => {
        for (const [id, c] of Object.entries(charts)) c.setSize({ width: Math.max(280, $(id).clientWidth), height: 200 });
      }, 150);
    });
    refresh();
  }

  start();
})();
