// lan2gpu dashboard: polls the JSON API and redraws. No dependencies, no CDN.
// Everything from the API is inserted as text (never as HTML): worker names,
// sessions and errors come from the network.
"use strict";

const REFRESH_MS = 2000;
const SPAN_S = 300; // seconds of GPU history drawn
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child ?? ""));
  }
  return node;
}

// Binary units, as the magic and nvidia-smi show them (worker_kernel/protocol/units.py).
function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(Math.abs(n) < 10 && i > 0 ? 1 : 0)} ${units[i]}`;
}

function seconds(s) {
  if (s === undefined || s === null) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(1)} s`;
  if (s < 5400) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

function slug(text) {
  return String(text).toLowerCase().replace(/[^a-z0-9]+/g, "-");
}

function fill(tableId, rows, none) {
  const body = document.querySelector(`#${tableId} tbody`);
  if (!rows.length && none) {
    const span = document.querySelectorAll(`#${tableId} thead th`).length;
    rows = [el("tr", { class: "none" }, el("td", { colspan: span, class: "muted" }, none))];
  }
  body.replaceChildren(...rows);
}

function workerRow(w) {
  const state = el("td", { class: `state state-${slug(w.state)}` }, w.state);
  const row = el("tr", { "data-kind": "worker", "data-address": w.address, "data-state": w.state });
  if (w.state !== "up") {
    row.append(
      el("td", {}, w.name || "?"), el("td", {}, w.address), state,
      el("td", { class: "problem", colspan: 7 }, w.problem), el("td", {}, w.origin),
    );
    return row;
  }
  const cpu = `${w.cpu_count} cores, load ${Number(w.load_average ?? 0).toFixed(2)}`;
  const ram = `${bytes(w.memory_available)} / ${bytes(w.memory_total)}`;
  const gpus = w.simulator ? `${w.gpus} (simulator)` : String(w.gpus);
  row.append(
    el("td", {}, w.name), el("td", {}, w.address), state, el("td", {}, gpus),
    el("td", {}, cpu), el("td", {}, ram), el("td", {}, seconds(w.latency)),
    el("td", {}, `${w.running} / ${w.waiting}`), el("td", {}, w.kernels),
    el("td", {}, (w.versions && w.versions.lan2gpu) || "?"), el("td", {}, w.origin),
  );
  return row;
}

function chart(gpu) {
  const W = 300, H = 70;
  const svg = el("svg:svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  svg.append(el("svg:rect", { class: "frame", x: 0.5, y: 0.5, width: W - 1, height: H - 1 }));
  const samples = gpu.history || [];
  if (!samples.length) return svg;
  const end = samples[samples.length - 1][0];
  const x = (t) => ((t - (end - SPAN_S)) / SPAN_S) * W;
  const y = (pct) => H - 2 - (Math.max(0, Math.min(100, pct)) / 100) * (H - 4);
  const step = samples.length > 1 ? samples[1][0] - samples[0][0] : 2;
  for (const [t, , , running] of samples) {
    if (running > 0) {
      svg.append(el("svg:rect", { class: "busy", x: x(t - step), y: 0, width: (step / SPAN_S) * W, height: H }));
    }
  }
  const line = (cls, value) => {
    const points = samples.filter((s) => value(s) !== null).map((s) => `${x(s[0]).toFixed(1)},${y(value(s)).toFixed(1)}`);
    if (points.length) svg.append(el("svg:polyline", { class: cls, points: points.join(" ") }));
  };
  line("util", (s) => s[1]);
  line("mem", (s) => (gpu.memory_total ? (100 * s[2]) / gpu.memory_total : null));
  return svg;
}

function gpuCard(g) {
  const pct = g.memory_total ? (100 * g.memory_used) / g.memory_total : 0;
  const used = el("div", {});
  used.style.width = `${pct.toFixed(1)}%`; // CSSOM, which the page's CSP allows (style="" it does not)
  const util = g.utilization === null || g.utilization === undefined
    ? (g.simulated ? "utilization: n/a (simulator)" : "utilization: n/a (no NVML)")
    : `utilization ${Math.round(g.utilization)}%`;
  const title = `${g.worker} · gpu${g.index}: ${g.name}${g.simulated ? " (simulated)" : ""}`;
  return el(
    "div",
    {
      class: g.stale ? "card stale" : "card", "data-kind": "gpu", "data-worker": g.worker,
      "data-index": g.index, "data-stale": g.stale ? "true" : "false",
    },
    el("h3", {}, title),
    g.stale ? el("div", { class: "error" }, "worker not answering: last known numbers") : "",
    el("div", { class: "muted" }, `memory ${bytes(g.memory_used)} / ${bytes(g.memory_total)} · ${util}`),
    el("div", { class: "bar" }, used),
    el("div", { class: "muted" }, `${g.running} running · ${g.waiting} waiting · ${g.kernels} kernels`),
    chart(g),
  );
}

function who(job) {
  return job.user ? `${job.user} · ${job.session}` : job.session;
}

function on(job) {
  return (job.resources || job.gpus || []).join("+") || "–";
}

function jobRow(kind, job, cells) {
  return el("tr", { "data-kind": kind, "data-id": job.id, "data-status": job.status || kind }, ...cells);
}

function render(workers, gpus, jobs) {
  const known = workers.workers;
  document.getElementById("worker-count").textContent =
    `(${known.filter((w) => w.state === "up").length} up of ${known.length})`;
  document.getElementById("workers-empty").hidden = known.length > 0;
  fill("workers", known.map(workerRow));
  document.getElementById("gpus").replaceChildren(...gpus.gpus.map(gpuCard));
  fill("running", jobs.running.map((j) => jobRow("running", j, [
    el("td", {}, j.worker), el("td", {}, on(j)), el("td", {}, who(j)),
    el("td", {}, seconds(j.running)), el("td", {}, bytes(j.bytes)),
  ])), "no cell running");
  fill("waiting", jobs.waiting.map((j) => jobRow("waiting", j, [
    el("td", {}, j.worker), el("td", {}, on(j)), el("td", {}, who(j)),
    el("td", {}, seconds(j.waiting)), el("td", {}, bytes(j.bytes)),
  ])), "no cell waiting");
  const now = Date.now() / 1000;
  fill("kernels", jobs.kernels.map((k) => jobRow("kernel", k, [
    el("td", {}, k.worker), el("td", {}, k.id), el("td", {}, (k.gpus || []).map((i) => `gpu${i}`).join("+") || "cpu"),
    el("td", {}, seconds(now - k.started)), el("td", {}, seconds(k.idle)),
  ])), "no remote kernel");
  fill("recent", jobs.recent.map((j) => jobRow("recent", j, [
    el("td", {}, new Date(j.finished * 1000).toLocaleTimeString()), el("td", {}, j.worker),
    el("td", {}, on(j)), el("td", {}, who(j)),
    el("td", { class: `outcome outcome-${slug(j.status)}` }, j.status),
    el("td", {}, seconds(j.duration)), el("td", {}, seconds(j.waited)),
    el("td", {}, bytes(j.bytes_in)), el("td", {}, bytes(j.bytes_out)),
  ])), "no finished cell yet");
  const updated = new Date(workers.updated * 1000).toLocaleTimeString();
  document.getElementById("updated").textContent = `updated ${updated}`;
  const error = workers.error || "";
  document.getElementById("error").textContent = error;
  document.getElementById("error").hidden = !error;
}

async function getJson(part) {
  const response = await fetch(`api/${part}`, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 403) {
    throw new Error("not logged in to this Jupyter server: open the page from a URL with ?token=…");
  }
  if (!response.ok) throw new Error(`api/${part}: HTTP ${response.status}`);
  return response.json();
}

async function refresh() {
  try {
    const [workers, gpus, jobs] = await Promise.all(["workers", "gpus", "jobs"].map(getJson));
    render(workers, gpus, jobs);
  } catch (err) {
    const box = document.getElementById("error");
    box.textContent = String(err.message || err);
    box.hidden = false;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
