// hfl dashboard: poll /api/state, redraw. Text goes in through textContent; the charts are
// SVG made by the server (fleet/ops/charts.py), every text in them escaped there.
"use strict";

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fixed(v, digits) {
  return v === null || v === undefined ? "-" : Number(v).toFixed(digits);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "no telemetry";
  return seconds < 60 ? `${Math.round(seconds)} s ago` : `${Math.round(seconds / 60)} min ago`;
}

function renderJobs(jobs) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  if (!jobs.length) {
    cell(body.insertRow(), "no jobs yet", "muted").colSpan = 10;
    return;
  }
  for (const j of jobs) {
    const row = body.insertRow();
    row.dataset.job = j.job;
    cell(row, j.job);
    cell(row, j.model);
    cell(row, j.app);
    cell(row, j.state, `state-${j.state}`);
    cell(row, j.version, "num");
    cell(row, j.evaluation);
    cell(row, fixed(j.epsilon, 2), "num");
    cell(row, j.reason);
    cell(row, new Date(j.updated * 1000).toLocaleTimeString());
    const missing = Object.entries(j.missing || {}).map(([site, why]) => `${site}: ${why}`);
    cell(row, missing.join("; "), missing.length ? "state-lost" : "");
  }
}

function renderModels(models) {
  const box = document.getElementById("models");
  if (!models.length) return;
  const seen = new Set();
  for (const m of models) {
    seen.add(m.model);
    let card = box.querySelector(`.model[data-model="${CSS.escape(m.model)}"]`);
    if (!card) {
      card = document.createElement("div");
      card.className = "model";
      card.dataset.model = m.model;
      const h = document.createElement("h3");
      h.textContent = m.model;
      const charts = document.createElement("div");
      charts.className = "charts";
      card.append(h, charts);
      box.append(card);
    }
    const charts = card.querySelector(".charts");
    const svg = m.charts.join("") + (m.epsilon_svg || "");
    if (charts.dataset.svg !== svg) {  // redraw only what changed
      charts.innerHTML = svg;
      charts.dataset.svg = svg;
    }
  }
  for (const p of box.querySelectorAll("p")) p.remove();
  for (const card of box.querySelectorAll(".model")) {
    if (!seen.has(card.dataset.model)) card.remove();
  }
}

function renderFleet(fleet) {
  const body = document.querySelector("#fleet tbody");
  body.replaceChildren();
  for (const n of [...fleet.coordinators, ...fleet.aggregators]) {
    const row = body.insertRow();
    row.dataset.node = n.id;
    const a = n.activity || {};
    const c = n.counts || {};
    const r = n.round_s || {};
    cell(row, n.id);
    // Online by its status, but its telemetry is too old to believe it: stale.
    if (n.stale) cell(row, `stale (${ago(n.seen_s).replace(" ago", "")})`, "state-lost");
    else cell(row, n.state, `state-${n.state}`);
    if (n.agents) {
      const lost = n.agents.lost ? `, ${n.agents.lost} lost` : "";
      const off = n.agents.offline ? `, ${n.agents.offline} offline` : "";
      cell(row, `${n.agents.online}/${n.agents.enrolled}${lost}${off}`,
           n.agents.lost ? "state-lost" : "");
    } else {
      cell(row, "");
    }
    cell(row, a.job || "");
    cell(row, a.block, "num");
    cell(row, a.round, "num");
    cell(row, a.stage || "");
    cell(row, c.rounds, "num");
    cell(row, n.role === "aggregator" ? c.updates : "", "num");
    cell(row, r.count ? `${fixed(r.last_s, 1)} / ${fixed(r.total_s / r.count, 1)}` : "-",
         "num");
    const rejected = Object.values(n.rejections).reduce((s, v) => s + v, 0);
    cell(row, rejected, rejected ? "num state-lost" : "num");
    cell(row, ago(n.seen_s));
    // What is wrong (fleet.ops.view.problems), then whether it restarted (counters from 0).
    const health = cell(row, [...(n.problems || []), n.restarted].filter(Boolean).join("; "),
                        n.problems && n.problems.length ? "state-lost" : "state-offline");
    health.dataset.problems = String((n.problems || []).length);
  }
  const agents = fleet.agents;
  const online = agents.filter((a) => a.state === "online").length;
  const lost = agents.filter((a) => a.state === "lost").length;
  const aggs = fleet.aggregators.filter((a) => a.state === "online" && !a.stale).length;
  const stale = fleet.aggregators.filter((a) => a.stale).length;
  document.getElementById("summary").textContent =
    `aggregators ${aggs}/${fleet.aggregators.length} online${stale ? ` (${stale} stale)` : ""}` +
    ` · agents ${online}/${agents.length}` +
    ` online${lost ? ` (${lost} lost)` : ""} · roster serial ${fleet.roster_serial}`;
  const reasons = Object.entries(fleet.rejections).map(
    ([reason, by]) => `${reason}: ${Object.entries(by).map(([k, v]) => `${k} ${v}`).join(", ")}`);
  document.getElementById("rejections").textContent =
    reasons.length ? `rejected messages — ${reasons.join("; ")}` : "no rejected messages";
}

async function poll() {
  let wait = 2;
  const updated = document.getElementById("updated");
  try {
    const res = await fetch("/api/state", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const state = await res.json();
    wait = state.refresh_s;
    renderJobs(state.jobs);
    renderModels(state.models);
    renderFleet(state.fleet);
    updated.textContent = `updated ${new Date(state.updated * 1000).toLocaleTimeString()}`;
    updated.classList.remove("stale");
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (e) {
    updated.textContent = `no answer from the dashboard server (${e.message}): retrying`;
    updated.classList.add("stale");
  }
  setTimeout(poll, wait * 1000);
}

poll();
