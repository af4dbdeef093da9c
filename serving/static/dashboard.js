// The dashboard: reads the serving API of the same origin and draws it; refreshes itself
// every `refresh_s` seconds (the server's --refresh_s, or ?refresh=N in the page URL).
"use strict";

const STATE_STYLE = {
  open: { stroke: "#3b82f6", fill: "#ffffff", dash: [4, 3] },
  late: { stroke: "#b45309", fill: "#f59e0b" },
  final: { stroke: "#15803d", fill: "#15803d" },
};
const charts = {};
const fmt = new Intl.NumberFormat("en-US");

async function api(path, params) {
  const query = new URLSearchParams(params || {});
  const response = await fetch(`/api/${path}?${query}`);
  const body = await response.json();
  if (!response.ok) {
    throw new Error(`${path}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`);
  }
  return body;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function seconds(iso) { return Date.parse(iso) / 1000; }

function addDays(day, n) {
  const d = new Date(`${day}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + n);
  return d.toISOString().slice(0, 10);
}

// One series per state, so open values, late revisions and final values are drawn
// differently; a thin line joins them all.
function drawSeries(section, points, dayFormat) {
  const xs = points.map((p) => seconds(p.window_start));
  const byState = (state) => points.map((p) => (p.state === state ? p.value : null));
  const data = [xs, points.map((p) => p.value), byState("open"), byState("late"),
    byState("final")];
  const pointSeries = (state) => ({
    label: state, stroke: STATE_STYLE[state].stroke, width: 0,
    paths: () => null,
    points: { show: true, size: 9, stroke: STATE_STYLE[state].stroke,
      fill: STATE_STYLE[state].fill, width: 2 },
  });
  const container = section.querySelector(".chart");
  const width = Math.max(300, container.clientWidth || 900);
  const options = {
    width, height: 220, legend: { show: false },
    scales: { x: { time: true } },
    series: [{}, { label: "value", stroke: "#9ca3af", width: 1, points: { show: false } },
      pointSeries("open"), pointSeries("late"), pointSeries("final")],
  };
  if (charts[section.id]) charts[section.id].destroy();
  container.textContent = "";
  charts[section.id] = new uPlot(options, data, container);
  const table = section.querySelector("table.points");
  table.textContent = "";
  const head = el("tr");
  for (const h of ["window", "value", "revision", "timing", "state"]) head.append(el("th", {}, h));
  table.append(head);
  for (const p of points) {
    const row = el("tr", { "data-window": p.window_start, "data-value": p.value,
      "data-state": p.state, "data-revision": p.revision });
    row.append(el("td", {}, dayFormat ? p.window_start.slice(0, 10) : p.window_start),
      el("td", { class: "num" }, fmt.format(p.value)), el("td", { class: "num" }, p.revision),
      el("td", {}, p.timing), el("td", {}, p.state));
    table.append(row);
  }
}

function drawBars(section, rows) {
  const table = section.querySelector("table.bars");
  table.textContent = "";
  const max = Math.max(1, ...rows.map((r) => r.value));
  for (const r of rows) {
    const tr = el("tr", { "data-key": r.key, "data-value": r.value });
    const bar = el("td", { class: "bar" });
    const span = el("span");
    span.style.width = `${(100 * r.value) / max}%`;
    bar.append(span);
    tr.append(el("td", {}, r.label), bar, el("td", { class: "num" }, fmt.format(r.value)),
      el("td", { class: "num" }, r.extra || ""));
    table.append(tr);
  }
  if (!rows.length) table.append(el("tr", {}, "none"));
}

function percent(x) { return x === null || x === undefined ? "" : `${(100 * x).toFixed(1)}%`; }

function setField(name, text) {
  for (const node of document.querySelectorAll(`[data-field="${name}"]`)) node.textContent = text;
}

async function refresh() {
  const health = await api("health");
  document.getElementById("source").textContent =
    `store: ${health.store} · uniques: ${health.distinct_mode}`;
  setField("newest_hour", health.newest_hour || "none");
  setField("newest_day", health.newest_day || "none");
  setField("last_pane_age", health.last_pane_age_s === null ? "none"
    : `${fmt.format(Math.round(health.last_pane_age_s))} s ago`);
  setField("watermark_lag", health.watermark_lag_s === "unknown" ? "unknown"
    : `${health.watermark_lag_s} s`);
  setField("backlog", health.backlog === "unknown" ? "unknown" : fmt.format(health.backlog));
  setField("metrics_error", health.metrics_error || "");
  const day = health.newest_day;
  if (!day) return health;
  const tasks = [];
  for (const tile of document.querySelectorAll("#uniques [data-window]")) {
    tasks.push(api("uniques", { end: day, days: tile.dataset.window }).then((u) => {
      tile.querySelector("dd").textContent = fmt.format(u.value);
      tile.dataset.value = u.value;
      tile.dataset.mode = u.mode;
      tile.querySelector("small").textContent = u.mode === "exact" ? "exact"
        : `hll ±${percent(u.relative_standard_error)} (1σ)${u.complete ? "" : " · incomplete"}`;
    }));
  }
  tasks.push(api("series", { metric: "active_users", granularity: "day",
    start: addDays(day, -29), end: addDays(day, 1) })
    .then((s) => drawSeries(document.getElementById("dau"), s.points, true)));
  const hourEnd = new Date(Date.parse(health.newest_hour) + 3600e3);
  tasks.push(api("series", { metric: "active_users", granularity: "hour",
    start: new Date(hourEnd - 48 * 3600e3).toISOString(), end: hourEnd.toISOString() })
    .then((s) => drawSeries(document.getElementById("hau"), s.points, false)));
  tasks.push(api("funnel", { end: day }).then((f) => {
    document.querySelector("#funnel .range").textContent = f.end;
    drawBars(document.getElementById("funnel"), f.steps.map((s) => ({
      key: s.name, label: `${s.step}. ${s.name}`, value: s.users,
      extra: s.conversion_from_previous === null ? "" : `→ ${percent(s.conversion_from_previous)}`,
    })));
  }));
  tasks.push(api("adoption", { end: day }).then((a) => {
    document.querySelector("#adoption .range").textContent = `${a.end} · ${a.mode}`;
    drawBars(document.getElementById("adoption"), a.features.map((f) => ({
      key: f.feature, label: f.feature, value: f.feature_users, extra: percent(f.adoption),
    })));
  }));
  tasks.push(api("dead_letters").then((d) => drawBars(document.getElementById("dead_letters"),
    d.reasons.map((r) => ({ key: r.reason, label: r.reason, value: r.count })))));
  await Promise.all(tasks);
  return health;
}

async function loop() {
  const status = document.getElementById("refreshed");
  const error = document.getElementById("error");
  let period = Number(new URLSearchParams(location.search).get("refresh")) || 0;
  try {
    const health = await refresh();
    period = period || health.refresh_s || 30;
    error.textContent = "";
    status.dataset.count = Number(status.dataset.count) + 1;
    status.textContent = `updated ${new Date().toISOString().slice(11, 19)} UTC · every ${period} s`;
  } catch (exc) {
    error.textContent = String(exc.message || exc);
    period = period || 30;
  }
  setTimeout(loop, period * 1000);
}

loop();
