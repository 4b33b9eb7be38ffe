// The balloonist dashboard: reads the daemon's REST API (docs/operations.md) with the
// bearer token the user gives, charts the last minutes, and sends guest changes.
//
// Data flow: GET /v1/history once (the charts' past), then the /v1/events stream, one
// status per period (read with fetch, because EventSource cannot send a token). After
// a dropped stream, the history since the last version seen fills the gap.
"use strict";

const TOKEN_KEY = "balloonist-token";
// The daemon keeps ten minutes at a 1 s period (daemon/history.py); so does the page.
const MAX_POINTS = 600;
// Redrawing every chart on every status would keep a browser busy at high --speed.
const REDRAW_EVERY_MS = 250;
const RETRY_MS = 1000;
const MIB = 1024 * 1024;

// The per-guest series of /v1/history, how to read each from a status' guest, and how
// it is charted: memory in MiB on the left axis, processors on the right one.
const GUEST_SERIES = [
  { key: "allocated_bytes", label: "allocated", color: "#1f77b4", dash: "solid", width: 2 },
  { key: "allocation_target_bytes", label: "target", color: "#1f77b4", dash: "dash", width: 1 },
  { key: "balloon_bytes", label: "balloon", color: "#d62728", dash: "solid", width: 2 },
  { key: "balloon_target_bytes", label: "balloon target", color: "#d62728", dash: "dash", width: 1 },
  { key: "working_set_bytes", label: "working set", color: "#2ca02c", dash: "dot", width: 2 },
  {
    key: "online_vcpus",
    label: "vCPUs online",
    color: "#9467bd",
    dash: "solid",
    width: 2,
    cpu: true,
    pick: (g) => (g.cpu ? g.cpu.online_vcpus : null),
  },
  {
    key: "allocation_target_cpus",
    label: "CPU target",
    color: "#9467bd",
    dash: "dash",
    width: 1,
    cpu: true,
    pick: (g) => (g.cpu ? g.cpu.allocation_target_cpus : null),
  },
];
const HOST_SERIES = ["version", "time_s", "host_memory_bytes", "host_free_bytes", "host_state", "host_cpus"];

const PLOT_CONFIG = { displayModeBar: false, responsive: true };

const page = {
  token: null,
  history: emptyHistory(),
  status: null,
  cards: new Map(), // guest name -> { root, chart, visible }
  redrawTimer: null,
  observer: null,
};

// --- the API ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (page.token) headers.set("Authorization", `Bearer ${page.token}`);
  const response = await fetch(path, { ...init, headers, cache: "no-store" });
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, detail);
  }
  return response;
}

async function getJson(path) {
  return (await api(path)).json();
}

// --- the token ----------------------------------------------------------------------

function takeToken() {
  // A link may carry it as #token=...: a fragment never reaches a server or its logs.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const given = fragment.get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    history.replaceState(null, "", location.pathname + location.search);
  }
  page.token = sessionStorage.getItem(TOKEN_KEY);
}

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  setConnection("not connected");
}

function onLogin(event) {
  event.preventDefault();
  const input = document.getElementById("login-token");
  page.token = input.value.trim();
  sessionStorage.setItem(TOKEN_KEY, page.token);
  input.value = "";
  start();
}

// --- history: columns, as /v1/history gives them --------------------------------------

function emptyHistory() {
  return {
    version: [],
    time_s: [],
    host_memory_bytes: [],
    host_free_bytes: [],
    host_state: [],
    host_cpus: [],
    guests: {},
  };
}

function lastVersion() {
  const versions = page.history.version;
  return versions.length ? versions[versions.length - 1] : 0;
}

function appendColumns(more) {
  const h = page.history;
  const before = h.version.length;
  const added = more.version.length;
  for (const key of HOST_SERIES) h[key].push(...more[key]);
  const names = new Set([...Object.keys(h.guests), ...Object.keys(more.guests)]);
  for (const name of names) {
    if (!h.guests[name]) h.guests[name] = seriesOf(before);
    const incoming = more.guests[name];
    for (const { key } of GUEST_SERIES) {
      h.guests[name][key].push(...(incoming ? incoming[key] : new Array(added).fill(null)));
    }
  }
  trimHistory();
}

function seriesOf(length) {
  const series = {};
  for (const { key } of GUEST_SERIES) series[key] = new Array(length).fill(null);
  return series;
}

function appendStatus(status) {
  const guests = {};
  for (const guest of status.guests) {
    guests[guest.name] = {};
    for (const { key, pick } of GUEST_SERIES) {
      guests[guest.name][key] = [pick ? pick(guest) : guest[key]];
    }
  }
  appendColumns({
    version: [status.version],
    time_s: [status.time_s],
    host_memory_bytes: [status.host.memory_bytes],
    host_free_bytes: [status.host.free_bytes],
    host_state: [status.host.state],
    host_cpus: [status.host.cpus],
    guests,
  });
}

function trimHistory() {
  const h = page.history;
  const extra = h.version.length - MAX_POINTS;
  if (extra <= 0) return;
  for (const key of HOST_SERIES) h[key].splice(0, extra);
  for (const [name, series] of Object.entries(h.guests)) {
    for (const { key } of GUEST_SERIES) series[key].splice(0, extra);
    if (series.allocated_bytes.every((v) => v === null)) delete h.guests[name];
  }
}

// --- drawing ------------------------------------------------------------------------

function mib(values) {
  return values.map((v) => (v === null ? null : v / MIB));
}

function formatSize(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Math.abs(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || value >= 100 ? 0 : 1;
  return `${bytes < 0 ? "-" : ""}${value.toFixed(digits)} ${units[unit]}`;
}

function layout(extra) {
  return {
    margin: { l: 56, r: 12, t: 8, b: 36 },
    xaxis: { title: { text: "daemon time (s)" }, zeroline: false },
    yaxis: { title: { text: "MiB" }, rangemode: "tozero" },
    legend: { orientation: "h", y: -0.25 },
    uirevision: "keep", // zoom and legend clicks survive redraws
    // The history's arrays grow in place; a new revision makes Plotly look at them again.
    datarevision: lastVersion(),
    ...extra,
  };
}

// Background bands for the host's free-memory states (docs/policy.md), so a chart shows
// when the host was short, not just that it is now.
const STATE_COLORS = { high: "#d3f0dc", soft: "#fff1c2", hard: "#ffd8b5", low: "#ffc9c4" };

function stateBands() {
  const { time_s: times, host_state: states } = page.history;
  const bands = [];
  let start = 0;
  for (let i = 1; i <= states.length; i += 1) {
    if (i === states.length || states[i] !== states[start]) {
      bands.push({
        type: "rect",
        xref: "x",
        yref: "paper",
        x0: times[start],
        x1: times[Math.min(i, times.length - 1)],
        y0: 0,
        y1: 1,
        fillcolor: STATE_COLORS[states[start]] || "#eee",
        opacity: 0.5,
        line: { width: 0 },
        layer: "below",
      });
      start = i;
    }
  }
  return bands;
}

function drawHost() {
  const h = page.history;
  const traces = Object.entries(h.guests).map(([name, series]) => ({
    name,
    x: h.time_s,
    y: mib(series.allocated_bytes),
    type: "scatter",
    mode: "lines",
    stackgroup: "allocated",
    line: { width: 1 },
  }));
  traces.push({
    name: "host: what the guests share",
    x: h.time_s,
    y: mib(h.host_memory_bytes),
    type: "scatter",
    mode: "lines",
    line: { color: "#333", width: 2, dash: "dash" },
  });
  Plotly.react("host-chart", traces, layout({ height: 300, shapes: stateBands() }), PLOT_CONFIG);
}

function sharesProcessors() {
  return page.history.host_cpus.some((v) => v !== null);
}

function drawCpus() {
  const panel = document.getElementById("cpu-panel");
  panel.hidden = !sharesProcessors();
  if (panel.hidden) return;
  const h = page.history;
  const traces = Object.entries(h.guests)
    .filter(([, series]) => series.online_vcpus.some((v) => v !== null))
    .map(([name, series]) => ({
      name,
      x: h.time_s,
      y: series.online_vcpus,
      type: "scatter",
      mode: "lines",
      stackgroup: "vcpus",
      line: { width: 1, shape: "hv" },
    }));
  traces.push({
    name: "host processors",
    x: h.time_s,
    y: h.host_cpus,
    type: "scatter",
    mode: "lines",
    line: { color: "#333", width: 2, dash: "dash", shape: "hv" },
  });
  const look = layout({ height: 240 });
  look.yaxis = { title: { text: "vCPUs online" }, rangemode: "tozero", dtick: 1 };
  Plotly.react("cpu-chart", traces, look, PLOT_CONFIG);
}

function drawGuest(name) {
  const card = page.cards.get(name);
  const series = page.history.guests[name];
  if (!card || !series || !card.visible) return;
  const cpus = series.online_vcpus.some((v) => v !== null);
  const traces = GUEST_SERIES.filter((s) => cpus || !s.cpu).map((s) => ({
    name: s.label,
    x: page.history.time_s,
    y: s.cpu ? series[s.key] : mib(series[s.key]),
    yaxis: s.cpu ? "y2" : "y",
    type: "scatter",
    mode: "lines",
    line: { color: s.color, dash: s.dash, width: s.width, shape: s.cpu ? "hv" : "linear" },
  }));
  const compact = layout({ height: 220, legend: { orientation: "h", y: -0.15 } });
  compact.xaxis = { zeroline: false }; // the host chart above names the axis
  if (cpus) {
    compact.yaxis2 = {
      title: { text: "vCPUs" },
      overlaying: "y",
      side: "right",
      rangemode: "tozero",
      dtick: 1,
      showgrid: false,
    };
    compact.margin = { ...compact.margin, r: 48 };
  }
  Plotly.react(card.chart, traces, compact, PLOT_CONFIG);
}

function redraw() {
  page.redrawTimer = null;
  drawHost();
  drawCpus();
  for (const name of page.cards.keys()) drawGuest(name);
}

function scheduleRedraw() {
  if (page.redrawTimer === null) page.redrawTimer = setTimeout(redraw, REDRAW_EVERY_MS);
}

// --- the status: header and guest cards ---------------------------------------------

function setConnection(text) {
  document.getElementById("connection").textContent = text;
}

function showStatus(status) {
  page.status = status;
  const state = document.getElementById("host-state");
  state.textContent = status.host.state;
  state.dataset.state = status.host.state;
  const host = status.host;
  const processors = host.cpus === null ? "" : `; ${host.cpus} processors`;
  // The host's own count (real VMs) next to the balloons' arithmetic.
  const truth = host.truth ?? null;
  const counted =
    truth === null
      ? ""
      : `; the host counts ${formatSize(truth.held_bytes)} held, ${formatSize(truth.free_bytes)} free`;
  document.getElementById("host-summary").textContent =
    `${formatSize(host.memory_bytes)} shared, ${formatSize(host.free_bytes)} free${counted}${processors}`;
  document.getElementById("ksm").textContent = ksmSummary(host.ksm ?? null);
  document.getElementById("freed").textContent = freedSummary(host.freed ?? null);
  document.getElementById("policy").textContent =
    `policy ${status.policy.name}, idle tax ${status.policy.tax_rate}`;
  document.getElementById("guest-count").textContent = `${status.guests.length}`;
  const seen = new Set();
  for (const guest of status.guests) {
    seen.add(guest.name);
    showGuest(guest);
  }
  for (const [name, card] of page.cards) {
    if (!seen.has(name)) {
      page.observer.unobserve(card.root);
      Plotly.purge(card.chart);
      card.root.remove();
      page.cards.delete(name);
    }
  }
}

// Where the memory the host got back came from, since the daemon started.
function freedSummary(freed) {
  if (freed === null) return "";
  const t = freed.total_bytes;
  return (
    `got back: sharing ${formatSize(t.sharing)}, ` +
    `reporting ${formatSize(t.free_page_reporting)}, ballooning ${formatSize(t.ballooning)}, ` +
    `host paging ${formatSize(t.host_paging)}`
  );
}

// KSM in a few words: who runs it, whether it scans, what merging saves.
function ksmSummary(ksm) {
  if (ksm === null) return "";
  if (ksm.mode !== "managing") return `KSM ${ksm.mode}${ksm.reason ? `: ${ksm.reason}` : ""}`;
  const saved = ksm.saved_bytes === null ? "" : `, saves ${formatSize(Math.max(0, ksm.saved_bytes))}`;
  return `KSM ${ksm.running ? `scanning ${ksm.pages_to_scan} pages a wake-up` : "stopped"}${saved}`;
}

function showGuest(guest) {
  let card = page.cards.get(guest.name);
  if (!card) card = addCard(guest.name);
  const text = (selector, value) => {
    card.root.querySelector(selector).textContent = value;
  };
  text(".allocated", formatSize(guest.allocated_bytes));
  text(".target", formatSize(guest.allocation_target_bytes));
  text(".balloon", `${formatSize(guest.balloon_bytes)} → ${formatSize(guest.balloon_target_bytes)}`);
  text(".working-set", formatSize(guest.working_set_bytes));
  text(".shares", String(guest.shares));
  text(".min", formatSize(guest.min_bytes));
  text(".max", formatSize(guest.max_bytes));
  const rate = guest.inflate_rate_bytes_per_s;
  text(".rate", rate === null ? "-" : `${formatSize(rate)}/s`);
  // What the host counts its QEMU process holds, next to what the balloon says.
  const host = guest.host ?? null;
  for (const el of card.root.querySelectorAll(".host-only")) el.hidden = host === null;
  if (host !== null) {
    const qemu = host.overhead_bytes === null ? "" : ` (QEMU ${formatSize(host.overhead_bytes)})`;
    const merged = host.ksm_merged_bytes ? `, KSM merged ${formatSize(host.ksm_merged_bytes)}` : "";
    const unheld =
      host.unheld_bytes === null || host.unheld_bytes === undefined
        ? ""
        : `; ${formatSize(Math.abs(host.unheld_bytes))} ${host.unheld_bytes >= 0 ? "below" : "above"} its allocation`;
    // Host paging: only for a guest whose balloon does not work, in HARD and LOW.
    const capped = host.cap_bytes ? `; capped at ${formatSize(host.cap_bytes)} by the host` : "";
    const swapped = host.swapped_bytes ? `, ${formatSize(host.swapped_bytes)} in host swap` : "";
    text(".host-held", `${formatSize(host.held_bytes)}${qemu}${merged}${unheld}${capped}${swapped}`);
  }
  const cpu = guest.cpu;
  for (const el of card.root.querySelectorAll(".cpu-only")) el.hidden = cpu === null;
  if (cpu !== null) {
    text(".vcpus", `${cpu.online_vcpus} of ${cpu.vcpus} (target ${cpu.allocation_target_cpus})`);
    text(".cpu-demand", cpu.demand_vcpus.toFixed(1));
    text(".cpu-shares", String(cpu.shares));
    text(".cpu-bounds", `${cpu.min_cpus} to ${cpu.max_cpus}`);
  }
  text(".cooperative", guest.cooperative ? "" : "uncooperative");
  card.root.classList.toggle("uncooperative", !guest.cooperative);
}

function addCard(name) {
  const root = document.getElementById("guest-template").content.firstElementChild.cloneNode(true);
  root.dataset.guest = name;
  root.querySelector(".name").textContent = name;
  const card = { root, chart: root.querySelector(".guest-chart"), visible: false };
  root.querySelector("form").addEventListener("submit", (event) => onChange(event, name));
  // Insert in name order, so cards keep their places as guests come and go.
  const after = [...page.cards.keys()].sort().find((other) => other > name);
  document.getElementById("guests").insertBefore(root, after ? page.cards.get(after).root : null);
  page.cards.set(name, card);
  page.observer.observe(root);
  return card;
}

function onVisibility(entries) {
  // Only cards on screen get a chart: a host with hundreds of guests stays usable.
  for (const entry of entries) {
    const name = entry.target.dataset.guest;
    const card = page.cards.get(name);
    if (!card) continue;
    card.visible = entry.isIntersecting;
    if (card.visible) drawGuest(name);
  }
}

async function onChange(event, name) {
  event.preventDefault();
  const form = event.target;
  const output = form.querySelector(".result");
  const body = {};
  for (const key of ["shares", "cpu_shares", "min_cpus", "max_cpus"]) {
    const value = form.elements[key].value.trim();
    if (value !== "") body[key] = Number(value);
  }
  for (const key of ["min", "max"]) {
    const value = form.elements[key].value.trim();
    if (value !== "") body[key] = value;
  }
  if (Object.keys(body).length === 0) {
    output.textContent = "nothing to change";
    output.className = "result error";
    return;
  }
  try {
    await api(`/v1/guests/${encodeURIComponent(name)}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    form.reset();
    output.textContent = "accepted: applies at the next period";
    output.className = "result ok";
  } catch (error) {
    if (error.status === 401) return showLogin("the token was refused");
    output.textContent = error.message;
    output.className = "result error";
  }
}

// --- the event stream ---------------------------------------------------------------

async function stream() {
  const response = await api("/v1/events", { headers: { Accept: "text/event-stream" } });
  setConnection("live");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      onEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

function onEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (event !== "status" || data.length === 0) return;
  const status = JSON.parse(data.join("\n"));
  if (status.version > lastVersion()) appendStatus(status);
  showStatus(status);
  scheduleRedraw();
}

// --- start-up -----------------------------------------------------------------------

async function start() {
  setConnection("connecting");
  try {
    const status = await getJson("/v1/status");
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    appendColumns(await getJson(`/v1/history?since=${lastVersion()}`));
    showStatus(status);
    redraw();
    await stream();
    setConnection("reconnecting");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      const hadToken = page.token !== null;
      sessionStorage.removeItem(TOKEN_KEY);
      page.token = null;
      return showLogin(hadToken ? "the token was refused" : "");
    }
    // 503 before the daemon's first period, a stopped daemon, a dropped stream
    setConnection(`reconnecting (${error.message})`);
  }
  setTimeout(start, RETRY_MS);
}

function main() {
  page.observer = new IntersectionObserver(onVisibility);
  document.getElementById("login-form").addEventListener("submit", onLogin);
  takeToken();
  start();
}

main();
