// llnode dashboard: no libraries, no CDN (phones may be offline). Gossip view in, DOM + <canvas> out.
"use strict";

const PALETTE = ["#60a5fa", "#34d399", "#fbbf24", "#f472b6", "#a78bfa", "#f97316", "#22d3ee", "#a3e635",
  "#fb7185", "#e879f9"];
const HORIZON_S = 300;
const TOKEN_KEY = "llnode.token";

const $ = (id) => document.getElementById(id);
const state = { doc: null, samples: [], colors: {}, mode: "connecting", lastMessage: 0, chat: [], busy: false };

// ---- token: ?token= once, then sessionStorage (this tab only), sent as a bearer --------------------------
(function takeTokenFromUrl() {
  const url = new URL(location.href);
  const token = url.searchParams.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash); // keep it out of history/screens
  }
})();

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  return headers;
}

class Unauthorized extends Error {}

function setMode(mode, text) {
  state.mode = mode;
  const el = $("conn");
  el.dataset.state = mode;
  el.textContent = text || mode;
  $("auth").hidden = mode !== "unauthorized";
}

// ---- updates: SSE over fetch (EventSource cannot send Authorization), polling as the fallback -----------
async function streamEvents() {
  const ctrl = new AbortController();
  const watchdog = setInterval(() => {
    if (Date.now() - state.lastMessage > 5000) ctrl.abort(); // the node stopped talking: reconnect
  }, 1000);
  try {
    const resp = await fetch("/api/events", { headers: authHeaders(), signal: ctrl.signal, cache: "no-store" });
    if (resp.status === 401) throw new Unauthorized();
    if (!resp.ok || !resp.body || !resp.body.getReader) throw new Error("no event stream: " + resp.status);
    state.lastMessage = Date.now();
    setMode("live", "live");
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
        if (data) onDoc(JSON.parse(data));
      }
    }
  } finally {
    clearInterval(watchdog);
  }
}

async function pollOnce(withHistory) {
  const resp = await fetch("/api/dashboard?history=" + (withHistory ? 1 : 0),
    { headers: authHeaders(), cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized();
  if (!resp.ok) throw new Error("status " + resp.status);
  onDoc(await resp.json());
}

async function connect() {
  for (;;) {
    try {
      await streamEvents();
    } catch (err) {
      if (err instanceof Unauthorized) { setMode("unauthorized", "token needed"); return; }
    }
    // Stream broken or unsupported: poll every 2 s for a while, then try the stream again.
    const until = Date.now() + 15000;
    let first = true;
    while (Date.now() < until) {
      try {
        await pollOnce(first || state.samples.length === 0);
        first = false;
        setMode("polling", "polling");
      } catch (err) {
        if (err instanceof Unauthorized) { setMode("unauthorized", "token needed"); return; }
        setMode("offline", "node unreachable");
      }
      await sleep(2000);
    }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("auth-token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("auth-token").value = "";
  setMode("connecting", "connecting");
  connect();
});

// ---- rendering ---------------------------------------------------------------------------------------
function onDoc(doc) {
  state.lastMessage = Date.now();
  state.doc = doc;
  if (Array.isArray(doc.history)) {
    state.samples = doc.history.slice();
  } else if (doc.sample && (!state.samples.length || doc.sample.t > state.samples[state.samples.length - 1].t)) {
    state.samples.push(doc.sample);
  }
  const cutoff = doc.t - HORIZON_S;
  while (state.samples.length && state.samples[0].t < cutoff) state.samples.shift();
  // Colours by position in the id-sorted member list: the same on every node's dashboard.
  state.colors = {};
  doc.nodes.forEach((n, i) => { state.colors[n.id] = PALETTE[i % PALETTE.length]; });
  render();
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

const gib = (b) => (b / 2 ** 30).toFixed(b >= 10 * 2 ** 30 ? 0 : 1) + " GiB";
const ms = (v) => (v === null || v === undefined ? "—" : v < 10 ? v.toFixed(2) + " ms" : v.toFixed(1) + " ms");
const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

function render() {
  const doc = state.doc;
  const leader = doc.nodes.find((n) => n.id === doc.leader);
  const p = doc.pipeline || {};
  const summary = $("summary");
  summary.replaceChildren(
    "cluster ", el("b", {}, doc.cluster_id || "?"), " · this node ", el("b", {}, doc.name || doc.id),
    " · leader ", el("b", {}, leader ? leader.name : "none"), " · term ", el("b", {}, doc.term),
    p.model ? " · model " : "", p.model ? el("b", {}, p.model) : "",
    p.state ? " · " : "", p.state ? el("b", { class: p.serving ? "" : "slow" }, p.state) : "");
  renderPeers(doc);
  renderPlan(doc);
  renderCharts();
  renderEvents(doc);
}

function renderPeers(doc) {
  const alive = doc.nodes.filter((n) => n.alive).length;
  $("peer-count").textContent = `${alive} alive of ${doc.nodes.length}`;
  const cards = doc.nodes.map((n) => {
    const roles = el("div", { class: "roles" });
    if (n.leader) roles.append(el("span", { class: "role leader" }, "leader"));
    if (n.stage !== null && n.stage !== undefined) roles.append(el("span", { class: "role" }, "stage " + n.stage));
    if (!n.leader && (n.stage === null || n.stage === undefined)) roles.append(el("span", { class: "role idle" }, "idle"));
    const kv = el("div", { class: "kv" });
    const add = (k, v) => kv.append(el("span", {}, k), el("span", { title: String(v) }, v));
    add("term", n.term);
    add("gossip", n.self ? "this node" : `${n.silent_s.toFixed(1)} s ago`);
    if (n.decode_ms !== null) add("decode", ms(n.decode_ms) + "/tok");
    if (n.queue !== null && n.queue !== undefined) add("queue", n.queue);
    add("sessions", n.sessions || 0);
    if (n.busy !== null) add("busy", Math.round(n.busy * 100) + " %");
    if (n.cpu_limit && n.cores && n.cpu_limit < n.cores) add("CPU limit", n.cpu_limit.toFixed(2) + " cores");
    if (n.battery && n.battery.level !== null && n.battery.level !== undefined) {
      add("battery", `${n.battery.level} %${n.battery.charging ? " ⚡ charging" : ""}`);
    }
    let mem = null;
    if (n.memory_total) {
      const used = n.memory_total - (n.memory_free || 0);
      const pct = Math.max(0, Math.min(100, (100 * used) / n.memory_total));
      mem = el("div", { class: "mem" },
        el("div", { class: "meter", title: "memory used" }, el("div", { style: `width:${pct.toFixed(1)}%` })),
        el("div", { class: "muted" }, `memory ${gib(used)} used of ${gib(n.memory_total)} (${gib(n.memory_free || 0)} available)`));
    }
    return el("div", { class: "card", "data-id": n.id, "data-status": n.status, "data-name": n.name,
        style: `--c:${state.colors[n.id]}` },
      el("div", { class: "top" },
        el("span", { class: "name", title: n.id }, n.name, n.self ? el("span", { class: "self" }, "(this node)") : null),
        el("span", { class: "badge status status-" + n.status }, n.status)),
      el("div", { class: "addr", title: n.id }, n.address || "address unknown"),
      roles, kv, mem);
  });
  $("peers").replaceChildren(...cards);
}

function renderPlan(doc) {
  const plan = doc.plan;
  const bar = $("planbar");
  const body = $("stages").querySelector("tbody");
  const problem = $("plan-problem");
  const p = doc.pipeline || {};
  problem.hidden = !(p.problem || (plan && plan.error));
  problem.textContent = (plan && plan.error) ? "infeasible: " + plan.error : (p.problem || "");
  if (!plan || !plan.stages || !plan.stages.length || !plan.num_modules) {
    $("plan-meta").textContent = plan ? `epoch ${plan.epoch}` : "no plan yet";
    bar.replaceChildren(el("div", { class: "seg gap", style: "flex:1" }, p.state || "waiting for a plan"));
    $("planscale").replaceChildren();
    body.replaceChildren();
    return;
  }
  const total = plan.num_modules;
  $("plan-meta").textContent = `epoch ${plan.epoch} · ${total} modules · ${plan.stages.length} stage(s) · ` +
    (plan.tokens_per_s ? `predicted ${plan.tokens_per_s.toFixed(1)} tok/s · ` : "") + (plan.solver || "");
  const segs = [];
  let at = 0;
  const gap = (a, b) => el("div", { class: "seg gap", style: `flex:${b - a}`, title: `modules ${a}..${b - 1} unassigned` }, "—");
  for (const s of [...plan.stages].sort((a, b) => a.start - b.start)) {
    if (s.start > at) segs.push(gap(at, s.start));
    segs.push(el("div", {
      class: "seg" + (s.alive ? "" : " dead"), style: `flex:${s.end - s.start};background:${state.colors[s.device_id] || "#888"}`,
      title: `stage ${s.index}: ${s.name}, modules ${s.start}..${s.end - 1}`,
      "data-start": s.start, "data-end": s.end, "data-node": s.device_id,
      "data-label": segLabel(s, total), "data-short": s.name,
    }, segLabel(s, total)));
    at = Math.max(at, s.end);
  }
  if (at < total) segs.push(gap(at, total));
  bar.replaceChildren(...segs);
  fitSegLabels();
  const ticks = [];
  for (const t of [...new Set([0, ...plan.stages.map((s) => s.start), total])].sort((a, b) => a - b)) {
    if (ticks.length && (t - ticks[ticks.length - 1]) / total < 0.06) { // labels would overlap
      if (t !== total) continue;
      if (ticks.length > 1) ticks.pop();
    }
    ticks.push(t);
  }
  $("planscale").replaceChildren(...ticks.map((t) => el("span", { style: `left:${(100 * t) / total}%` }, t)));
  body.replaceChildren(...plan.stages.map((s) => {
    const slow = s.measured_ms !== null && s.predicted_ms > 0 && s.measured_ms > 1.5 * s.predicted_ms;
    return el("tr", {},
      el("td", {}, s.index),
      el("td", {}, el("span", { class: "dot", style: `background:${state.colors[s.device_id] || "#888"}` }), s.name),
      el("td", {}, `${s.start}–${s.end - 1}`),
      el("td", { title: `compute ${ms(s.compute_ms)} + link ${ms(s.link_ms)}` }, ms(s.predicted_ms)),
      el("td", { class: slow ? "slow" : "" }, ms(s.measured_ms)));
  }));
}

function fitSegLabels() {
  // Labels that do not fit their range (narrow phone screens) fall back to the name, then to nothing.
  for (const seg of document.querySelectorAll("#planbar .seg[data-node]")) {
    const full = seg.dataset.label;
    seg.textContent = full;
    if (seg.scrollWidth > seg.clientWidth) seg.textContent = seg.dataset.short;
    if (seg.scrollWidth > seg.clientWidth) seg.textContent = "";
  }
}

function segLabel(s, total) {
  const frac = (s.end - s.start) / total; // narrow segments: shorter labels (the tooltip has it all)
  if (frac < 0.05) return "";
  if (frac < 0.16) return s.name;
  return `${s.name} [${s.start},${s.end})`;
}

// ---- charts: a tiny line plotter on <canvas> ----------------------------------------------------------
function drawChart(canvas, series, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const now = state.doc ? state.doc.t : Date.now() / 1000;
  const t0 = now - HORIZON_S;
  let max = 0;
  for (const s of series) for (const [, v] of s.points) max = Math.max(max, v);
  max = niceMax(max);
  const left = 40, right = 8, top = 8, bottom = 18;
  const x = (t) => left + ((t - t0) / HORIZON_S) * (w - left - right);
  const y = (v) => top + (1 - v / max) * (h - top - bottom);
  ctx.font = "10px system-ui, sans-serif";
  ctx.fillStyle = "#8b96ad";
  ctx.strokeStyle = "#26304a";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 3; i++) {
    const v = (max * i) / 3;
    ctx.beginPath(); ctx.moveTo(left, y(v) + 0.5); ctx.lineTo(w - right, y(v) + 0.5); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(fmt(v), left - 4, y(v));
  }
  ctx.textAlign = "left"; ctx.textBaseline = "top";
  ctx.fillText(unit, left + 4, top + 2);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const m of [5, 4, 3, 2, 1]) ctx.fillText(`-${m}m`, x(now - 60 * m), h - bottom + 4);
  ctx.textAlign = "right"; ctx.fillText("now", w - right, h - bottom + 4);
  let any = false;
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.8; ctx.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (t < t0) continue;
      if (v === null || v === undefined) { pen = false; continue; }
      if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
      pen = true; any = true;
    }
    ctx.stroke();
    const lastPoint = [...s.points].reverse().find(([t, v]) => t >= t0 && v !== null && v !== undefined);
    if (lastPoint) { // mark the latest value: a lone sample is otherwise invisible
      ctx.fillStyle = s.color; ctx.beginPath(); ctx.arc(x(lastPoint[0]), y(lastPoint[1]), 2.5, 0, 2 * Math.PI); ctx.fill();
    }
  }
  if (!any) {
    ctx.fillStyle = "#8b96ad"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText("no data yet", left + (w - left - right) / 2, top + (h - top - bottom) / 2);
  }
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v * 1.1));
  for (const m of [1, 1.5, 2, 3, 5, 7.5, 10]) if (m * p >= v * 1.1) return m * p;
  return 10 * p;
}
const fmt = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v >= 1 ? v.toFixed(2) : v.toFixed(2));

function renderCharts() {
  const samples = state.samples;
  const last = samples[samples.length - 1];
  $("tps-now").textContent = last
    ? `${last.tps.toFixed(1)} tok/s now` + (last.gen !== undefined ? ` · ${last.gen.toFixed(1)} generated` : "") : "";
  drawChart($("chart-tps"), [
    { color: "#60a5fa", points: samples.map((s) => [s.t, s.tps]) },
    { color: "#34d399", points: samples.map((s) => [s.t, s.gen === undefined ? null : s.gen]) },
  ], "tok/s");
  const ids = new Set();
  for (const s of samples) for (const id of Object.keys(s.stage_ms || {})) ids.add(id);
  const names = Object.fromEntries(state.doc.nodes.map((n) => [n.id, n.name]));
  const series = [...ids].map((id) => ({
    color: state.colors[id] || "#888", label: names[id] || id,
    points: samples.map((s) => [s.t, s.stage_ms && id in s.stage_ms ? s.stage_ms[id] : null]),
  }));
  drawChart($("chart-stage"), series, "ms");
  $("stage-legend").replaceChildren(...series.map((s) =>
    el("span", {}, el("span", { class: "dot", style: `background:${s.color}` }), s.label)));
}

function renderEvents(doc) {
  const tr = doc.transfers || { files: [] };
  $("transfers").replaceChildren(...(tr.files || []).map((f) => {
    const pct = f.total ? (100 * f.done) / f.total : 0;
    return el("div", { class: "tr" },
      `fetching ${f.file} from ${nodeName(f.peer)}: ${(f.done / 2 ** 20).toFixed(1)} / ${(f.total / 2 ** 20).toFixed(1)} MiB`,
      el("div", { class: "meter" }, el("div", { style: `width:${pct.toFixed(1)}%` })));
  }));
  const events = [...(doc.events || [])].reverse();
  if (!events.length) {
    $("events").replaceChildren(el("li", { class: "empty" }, "no events yet"));
    return;
  }
  $("events").replaceChildren(...events.map((e) => el("li", { "data-kind": e.kind },
    el("time", {}, clock(e.t)), el("span", { class: "kind kind-" + e.kind }, e.kind),
    el("span", { class: "msgtext" }, e.message))));
}

function nodeName(id) {
  const n = state.doc && state.doc.nodes.find((m) => m.id === id);
  return n ? n.name : id;
}

window.addEventListener("resize", () => { if (state.doc) { renderCharts(); fitSegLabels(); } });

// ---- chat: POST /v1/chat/completions with stream:true, read the SSE body as it arrives ----------------
let chatAbort = null;

async function modelName() {
  const p = state.doc && state.doc.pipeline;
  if (p && p.model) return p.model;
  const resp = await fetch("/v1/models", { headers: authHeaders() });
  const data = await resp.json();
  if (!resp.ok || !data.data || !data.data.length) throw new Error((data.error && data.error.message) || "no model");
  return data.data[0].id;
}

function chatMessage(role, text) {
  const div = el("div", { class: "msg " + role }, text);
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

async function sendChat(prompt) {
  state.chat.push({ role: "user", content: prompt });
  chatMessage("user", prompt);
  const out = chatMessage("assistant streaming", "");
  out.dataset.state = "streaming";
  const text = document.createTextNode("");
  out.append(text);
  chatAbort = new AbortController();
  $("chat-send").disabled = true; $("chat-stop").hidden = false;
  const started = performance.now();
  let pieces = 0, firstAt = null, answer = "", finish = null;
  try {
    const body = { model: await modelName(), messages: state.chat, stream: true, max_tokens: 128 };
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body), signal: chatAbort.signal,
    });
    if (!resp.ok) {
      let message = `HTTP ${resp.status}`;
      try { const e = await resp.json(); message = (e.error && e.error.message) || message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "generation failed");
        for (const c of chunk.choices || []) {
          const piece = (c.delta && c.delta.content) || "";
          if (piece) {
            if (firstAt === null) firstAt = performance.now();
            pieces++; answer += piece; text.data = answer;
            $("chat-log").scrollTop = $("chat-log").scrollHeight;
          }
          finish = c.finish_reason || finish;
        }
      }
    }
    state.chat.push({ role: "assistant", content: answer });
    const secs = (performance.now() - started) / 1000;
    const ttft = firstAt === null ? null : (firstAt - started) / 1000;
    out.append(el("span", { class: "stats" },
      `${pieces} chunks in ${secs.toFixed(1)} s` + (ttft !== null ? ` · first after ${ttft.toFixed(2)} s` : "") +
      (finish ? ` · finish: ${finish}` : "")));
  } catch (err) {
    state.chat.pop();
    if (err.name === "AbortError") {
      out.append(el("span", { class: "stats" }, "stopped"));
    } else {
      if (!answer) out.remove();
      chatMessage("error", "⚠ " + err.message);
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.state = "done";
    chatAbort = null;
    $("chat-send").disabled = false; $("chat-stop").hidden = true;
  }
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const prompt = $("chat-input").value.trim();
  if (!prompt || chatAbort) return;
  $("chat-input").value = "";
  sendChat(prompt);
});
$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-stop").addEventListener("click", () => { if (chatAbort) chatAbort.abort(); });
$("chat-clear").addEventListener("click", () => { state.chat = []; $("chat-log").replaceChildren(); });

connect();
