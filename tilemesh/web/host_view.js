// The host page's picture of the room's work: the plan the server's planner made (strategy, predicted latency,
// which device computes which part of the frame, the candidates it compared, the predicted timeline as a Gantt
// chart), and a live timeline of the last frame the devices reported. Plain DOM and SVG drawn from protocol
// messages only (no runtime, no mesh), so tests feed it real `plan` messages and `DeviceRunner.report` dicts.
//
//   const view = new HostView({ planEl, liveEl });
//   view.attach(signaling, engine);    // plans, frame_report broadcasts, this device's own reports, names
import { DEVICE_COLOURS } from "/web/ar.js";
import { pageModel } from "/web/model.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const KEEP_PLANS = 8;

// The served model's size comes from the server (web/model.js: node count, MACs per profile op class at full
// resolution, "elementwise" counting elements); null without a model.
export { pageModel };

// tilemesh.runtime.profile.predict_graph_seconds for the whole model at full size: each node costs the fixed
// overhead plus its MACs at its class's rate, all times chain_factor. Null for a malformed profile (they
// come from other people's devices) or without a model.
export function modelSeconds(profile, model = pageModel()) {
  if (!model || !model.macs) return null;
  if (!profile || typeof profile.sec_per_mac !== "object" || profile.sec_per_mac === null) return null;
  let t = model.nodes * Number(profile.overhead_s);
  for (const [cls, macs] of Object.entries(model.macs)) t += macs * Number(profile.sec_per_mac[cls]);
  t *= Number(profile.chain_factor ?? 1);
  return Number.isFinite(t) && t > 0 ? t : null;
}

// Effective speed on the served model: 2 FLOP per multiply-accumulate of its convolutions and classifier.
export function effectiveGflops(profile, model = pageModel()) {
  const s = modelSeconds(profile, model);
  if (s === null) return null;
  const { elementwise, ...real } = model.macs;  // elements, not multiply-accumulates
  return (2 * Object.values(real).reduce((a, b) => a + b, 0)) / s / 1e9;
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
  if (ms >= 10000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 10) return `${Math.round(ms)} ms`;
  return `${ms.toFixed(1)} ms`;
}

export function fmtBytes(n) {
  if (!Number.isFinite(n)) return "–";
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(n >= 1e5 ? 0 : 1)} kB`;
  return `${n} B`;
}

// One split of the plan spec as rectangles in fractions of the plane: [{device, r0, r1, c0, c1}], row-major,
// the order the AR overlay colours its map in. Accepts both spec forms (tilemesh.runtime.peer.split_from_json).
export function splitRects(split) {
  if (!split || typeof split !== "object") return [];
  if (Array.isArray(split.devices)) {
    const rows = split.devices;
    const cuts = (shares, n) => {
      const s = Array.isArray(shares) && shares.length === n ? shares.map(Number) : Array(n).fill(1);
      const total = s.reduce((a, b) => a + b, 0) || 1;
      const out = [0];
      for (const v of s) out.push(out[out.length - 1] + v / total);
      return out;
    };
    const rb = cuts(split.row_shares, rows.length);
    const cb = cuts(split.col_shares, (rows[0] || []).length);
    const out = [];
    rows.forEach((row, i) => row.forEach((device, j) => {
      if (rb[i + 1] > rb[i] && cb[j + 1] > cb[j]) out.push({ device, r0: rb[i], r1: rb[i + 1], c0: cb[j], c1: cb[j + 1] });
    }));
    return out;
  }
  const first = Object.values(split)[0] || {};  // {tensor: {device: [r0, r1, c0, c1]}}
  const regions = Object.entries(first);
  const h = Math.max(1, ...regions.map(([, r]) => r[1]));
  const w = Math.max(1, ...regions.map(([, r]) => r[3]));
  return regions.map(([device, r]) => ({ device, r0: r[0] / h, r1: r[1] / h, c0: r[2] / w, c1: r[3] / w }));
}

// Devices of a plan in colour order: the first segment's split as the AR map draws it, then the rest.
export function planDevices(plan) {
  const order = [];
  const add = (d) => { if (d && !order.includes(d)) order.push(d); };
  splitRects((plan.spec?.splits || [])[0]).forEach((r) => add(r.device));
  (plan.devices || []).forEach(add);
  Object.keys(plan.timeline?.devices || {}).forEach(add);
  add(plan.source);
  return order;
}

export function colourMap(devices) {
  return new Map(devices.map((d, i) => [d, DEVICE_COLOURS[i % DEVICE_COLOURS.length]]));
}

// ----------------------------------------------------------------------------------------------- drawing

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function swatch(colour) {
  return el("span", { class: "swatch", style: `background:${colour}` });
}

// Tick spacing of 1, 2 or 5 x 10^k so about `n` labelled ticks fit.
function ticks(maxMs, n = 5) {
  if (!(maxMs > 0)) return [0];
  const raw = maxMs / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let t = 0; t <= maxMs + 1e-9; t += step) out.push(t);
  return out;
}

// A Gantt chart: `rows` = [{device, label, colour, bars: [{start, end, kind, colour, title, text}]}] in ms.
// kind "compute" fills the main lane, "send" a thin lane under it, "wait" a hatched band; "mark" is a tick.
function gantt(rows, { width, maxMs, endMs = null, endLabel = "" }) {
  const narrow = width < 520;
  const labelW = narrow ? 86 : 130;
  const lane = 18;
  const sendH = 6;
  const rowH = lane + sendH + 10;
  const top = endMs !== null ? 16 : 4;
  const plotW = Math.max(60, width - labelW - 12);
  const height = top + rows.length * rowH + 22;
  const x = (ms) => labelW + (maxMs > 0 ? (ms / maxMs) * plotW : 0);
  const root = svg("svg", { class: "gantt", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  for (const t of ticks(maxMs, narrow ? 3 : 6)) {
    root.append(svg("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: height - 18 }),
      svg("text", { class: "tick", x: x(t), y: height - 5, "text-anchor": "middle" }, fmtMs(t)));
  }
  rows.forEach((row, i) => {
    const y = top + i * rowH + 4;
    const g = svg("g", { class: "row", "data-device": row.device });
    // SVG text does not wrap or clip: cut long names to the label column (about 7 px a character at 12 px).
    const fit = Math.floor((labelW - 10) / 7);
    const shown = row.label.length > fit ? `${row.label.slice(0, fit - 1)}…` : row.label;
    const name = svg("text", { class: "dev", x: 8, y: y + lane - 5 }, shown);
    name.append(svg("title", {}, row.label));
    g.append(svg("rect", { x: 0, y: y + 3, width: 4, height: lane - 6, fill: row.colour }), name);
    for (const b of row.bars) {
      const x0 = x(b.start);
      const w = Math.max(1, x(b.end) - x0);
      let shape;
      if (b.kind === "send") {
        shape = svg("rect", { class: "bar send", x: x0, y: y + lane + 2, width: Math.max(2, w), height: sendH,
          fill: b.colour || row.colour });
      } else if (b.kind === "wait") {
        shape = svg("rect", { class: "bar wait", x: x0, y: y + 4, width: w, height: lane - 8 });
      } else if (b.kind === "mark") {
        shape = svg("path", { class: "bar mark", d: `M${x0 - 4},${y - 3} l4,6 l4,-6 z` });
      } else {
        shape = svg("rect", { class: "bar compute", x: x0, y, width: w, height: lane, fill: row.colour, rx: 2 });
      }
      for (const [k, v] of Object.entries(b.data || {})) shape.dataset[k] = v;
      shape.append(svg("title", {}, b.title));
      g.append(shape);
      if (b.text && b.kind === "compute" && w > 8 * b.text.length + 6) {
        g.append(svg("text", { class: "on-bar", x: x0 + w / 2, y: y + lane - 5, "text-anchor": "middle" }, b.text));
      }
    }
    root.append(g);
  });
  if (endMs !== null) {
    const xe = x(endMs);
    root.append(svg("line", { class: "end", x1: xe, x2: xe, y1: top - 2, y2: height - 18 }),
      svg("text", { class: "end-label", x: Math.min(xe, width - 4), y: 11,
        "text-anchor": xe > width - 90 ? "end" : "middle" }, endLabel));
  }
  return root;
}

function miniMap(rects, colours, size, title) {
  const root = svg("svg", { class: "frame-map", width: size, height: size, viewBox: "0 0 1 1",
    preserveAspectRatio: "none", role: "img" });
  root.append(svg("title", {}, title));
  for (const r of rects) {
    root.append(svg("rect", { x: r.c0, y: r.r0, width: r.c1 - r.c0, height: r.r1 - r.r0,
      fill: colours.get(r.device) || "#888", "data-device": r.device }));
  }
  return root;
}

// ------------------------------------------------------------------------------------------- the view

export class HostView {
  constructor({ planEl, liveEl, names = new Map() }) {
    this.planEl = planEl;
    this.liveEl = liveEl;
    this.names = new Map(names);
    this.profiles = new Map();  // device -> roster compute profile (for the "source alone" reference)
    this.plans = new Map();     // plan_id -> plan message (reports name their plan)
    this.plan = null;           // the newest plan
    this.frames = new Map();    // "plan:frame" -> Map(device -> report)
    this.latest = null;         // {planId, frame} of the newest reported frame
    this.onColours = null;      // called with Map(device -> colour) when a plan arrives (the roster's swatches)
    this._width = 0;
    if (typeof ResizeObserver === "function") {
      // Charts are drawn at the container's pixel width so their text stays legible on a phone.
      const ro = new ResizeObserver(() => {
        const w = this._chartWidth();
        if (Math.abs(w - this._width) > 8) this.render();
      });
      ro.observe(planEl);
    }
    this.render();
  }

  name(id) { return this.names.get(id) || id; }

  // Peer ids inside planner labels ("frame to pX, pX runs all") read better as names.
  _named(text) {
    let out = String(text || "");
    for (const [id, name] of this.names) if (id) out = out.split(id).join(name);
    return out;
  }

  setNames(peers) {
    for (const p of peers) if (p.profile && typeof p.profile === "object") this.profiles.set(p.id, p.profile.compute);
    const next = new Map(peers.map((p) => [p.id, p.name]));
    const same = next.size === this.names.size && [...next].every(([k, v]) => this.names.get(k) === v);
    if (same) return;
    this.names = next;
    this.render();
  }

  showPlan(msg) {
    if (!msg || !Array.isArray(msg.devices)) return;
    this.plan = msg;
    this.plans.set(msg.plan_id, msg);
    for (const id of [...this.plans.keys()].slice(0, -KEEP_PLANS)) this.plans.delete(id);
    this.render();
  }

  addReport(planId, report, from = null) {
    if (!report || !Number.isFinite(report.frame) || !Array.isArray(report.tasks)) return;
    const device = report.device || from;
    const key = `${planId}:${report.frame}`;
    if (!this.frames.has(key)) this.frames.set(key, new Map());
    this.frames.get(key).set(device, report);
    const newer = !this.latest || planId > this.latest.planId
      || (planId === this.latest.planId && report.frame >= this.latest.frame);
    if (newer) this.latest = { planId, frame: report.frame };
    for (const k of [...this.frames.keys()].slice(0, -16)) this.frames.delete(k);
    this._renderLive();
  }

  attach(signaling, engine = null) {
    signaling.on("plan", (msg) => this.showPlan(msg));
    signaling.on("roster", ({ peers }) => this.setNames(peers));
    signaling.on("broadcast", ({ from, data }) => {
      if (data && data.kind === "frame_report") this.addReport(data.plan_id, data.report, from);
      if (data && data.kind === "wrong_result") this.addWrongResult(data);
    });
    // Broadcasts are relayed to the others only: this device's own reports come from its engine.
    if (engine) {
      engine.addEventListener("report", (e) => this.addReport(e.detail.plan_id, e.detail.report, e.detail.from));
      engine.addEventListener("wrong_result", (e) => this.addWrongResult(e.detail));
    }
  }

  // A device caught returning wrong results (tilemesh.runtime.recovery): named on the page, left out of plans.
  addWrongResult({ device, frame, tensor, max_err: err }) {
    if (typeof device !== "string") return;
    this.wrong ??= new Map();
    if (!this.wrong.has(device)) this.wrong.set(device, { frame, tensor, err });
    this._renderPlan();
  }

  _wrongLines() {
    return [...(this.wrong || new Map())].map(([device, { frame, tensor, err }]) => el("p",
      { class: "wrong-result", "data-device": device },
      `⚠ ${this.name(device)} returned wrong results (frame ${frame}, ${tensor}, `
      + `${err >= 0 ? `off by up to ${Number(err).toPrecision(3)}` : "unreadable"}): it is left out of plans.`));
  }

  _chartWidth() {
    return Math.max(280, Math.floor(this.planEl.clientWidth || 600));
  }

  render() {
    this._width = this._chartWidth();
    this._renderPlan();
    this._renderLive();
  }

  _colours(plan) {
    return colourMap(plan ? planDevices(plan) : []);
  }

  _renderPlan() {
    const plan = this.plan;
    if (!plan) {
      this.planEl.dataset.state = "none";
      this.planEl.replaceChildren(el("p", { class: "hint" },
        "No plan yet. When a phone taps “Classify with this camera”, the server plans how the devices here share "
        + "each frame, and the plan appears here."), ...this._wrongLines());
      return;
    }
    const colours = this._colours(plan);
    if (this.onColours) this.onColours(colours);
    const tl = plan.timeline || { devices: {} };
    const devs = planDevices(plan);
    const totalMacs = devs.reduce((a, d) => a + (tl.devices?.[d]?.macs || 0), 0) || 1;
    this.planEl.dataset.state = "shown";
    this.planEl.dataset.planId = String(plan.plan_id);

    const head = el("div", { class: "plan-head" },
      el("div", { class: "plan-title" },
        el("span", { class: "strategy" }, plan.strategy), " ",
        el("span", { class: "label" }, this._named(plan.label))),
      el("div", { class: "predicted" }, el("span", { class: "predicted-ms" }, fmtMs(plan.predicted_ms)),
        el("span", { class: "small" }, " predicted per frame")));
    const meta = el("p", { class: "small plan-meta" },
      `plan ${plan.plan_id} · camera on ${this.name(plan.source)} · ${plan.devices.length} device`
      + `${plan.devices.length === 1 ? "" : "s"} · ${(plan.spec?.splits || []).length} segments`);

    // Who computes what: the frame map (first segment's split, as the AR overlay draws it) and a legend.
    const rects = splitRects((plan.spec?.splits || [])[0]);
    const area = new Map();
    for (const r of rects) area.set(r.device, (area.get(r.device) || 0) + (r.r1 - r.r0) * (r.c1 - r.c0));
    const legend = el("ul", { class: "shares" }, ...devs.map((d) => {
      const info = tl.devices?.[d] || {};
      const parts = [];
      if (area.has(d)) parts.push(`${Math.round(area.get(d) * 100)}% of the frame`);
      if (info.macs) {
        parts.push(`${Math.round((info.macs / totalMacs) * 100)}% of the MACs`);
        parts.push(`${fmtMs((info.compute_s || 0) * 1e3)} compute`);
      } else {
        parts.push("no compute");
      }
      if (info.bytes_sent) parts.push(`sends ${fmtBytes(info.bytes_sent)}`);
      return el("li", { "data-device": d, "data-macs-share": ((info.macs || 0) / totalMacs).toFixed(4) },
        swatch(colours.get(d)), el("span", { class: "dev-name" }, this.name(d)),
        d === plan.source ? el("span", { class: "tag" }, "camera") : null,
        el("span", { class: "small" }, parts.join(" · ")));
    }));
    const segs = el("div", { class: "segments" },
      el("span", { class: "small" }, "split per segment, input → output"),
      el("div", { class: "mini-maps" }, ...(plan.spec?.splits || []).map((s, i, all) => {
        const r = splitRects(s);
        // One line of squares when it fits: 16 px each on a laptop, smaller on a phone.
        const size = Math.max(8, Math.min(16, Math.floor((this._width - 40) / all.length) - 3));
        return miniMap(r, colours, size, `segment ${i}: ${r.map((x) => this.name(x.device)).join(", ")}`);
      })));
    const share = el("div", { class: "plan-share" },
      el("figure", { class: "map-figure" }, miniMap(rects, colours, 120, "which device computes which part of the frame"),
        el("figcaption", { class: "small" }, "frame map")),
      el("div", {}, legend, segs));

    // The candidates the planner compared: the best few, then the best of every other strategy.
    const cands = this._candidates(plan);
    const worst = Math.max(...cands.map((c) => c.predicted_s), 1e-9);
    const chosen = cands.find((c) => c.label === plan.label) || cands[0];
    const candList = el("ol", { class: "candidates" }, ...cands.map((c) => el("li",
      { "data-strategy": c.strategy, "data-ms": (c.predicted_s * 1e3).toFixed(1), class: c === chosen ? "best" : "" },
      el("span", { class: "cand-label", title: this._named(c.label) }, this._named(c.label),
        c.derived ? el("span", { class: "small" }, " (from its measured speed)") : null),
      el("span", { class: "cand-ms" }, fmtMs(c.predicted_s * 1e3)),
      el("span", { class: "cand-bar", style: `width:${((c.predicted_s / worst) * 100).toFixed(1)}%` }))));

    const width = this._width;
    const rows = devs.filter((d) => tl.devices?.[d]).map((d) => ({
      device: d,
      label: this.name(d),
      colour: colours.get(d),
      bars: (tl.devices[d].timeline || []).map((iv) => {
        const a = iv.start * 1e3;
        const b = iv.end * 1e3;
        const span = `${fmtMs(a)} → ${fmtMs(b)}`;
        if (iv.kind === "send") {
          return { kind: "send", start: a, end: b, colour: colours.get(iv.peer),
            title: `send ${iv.tensor || ""} (${fmtBytes(iv.bytes || 0)}) to ${this.name(iv.peer)}: ${span}`,
            data: { kind: "send", peer: iv.peer } };
        }
        if (iv.kind === "wait") {
          return { kind: "wait", start: a, end: b, title: `waits for input of segment ${iv.segment}: ${span}`,
            data: { kind: "wait" } };
        }
        return { kind: "compute", start: a, end: b, text: String(iv.segment ?? ""),
          title: `computes segment ${iv.segment}: ${span}`, data: { kind: "compute", segment: iv.segment ?? "" } };
      }),
    }));
    const total = (tl.total_s ?? plan.predicted_ms / 1e3) * 1e3;
    const chart = gantt(rows, { width, maxMs: total, endMs: total, endLabel: `result at ${fmtMs(total)}` });
    chart.classList.add("predicted-gantt");

    this.planEl.replaceChildren(head, meta, ...this._wrongLines(), share,
      el("h3", {}, "Candidates the planner compared"), candList,
      el("h3", {}, "Predicted timeline of one frame"), chart,
      el("p", { class: "small key" }, this._key()));
  }

  _key() {
    return el("span", {}, el("span", { class: "key-compute" }), " computing (segment number) ",
      el("span", { class: "key-send" }), " sending, in the receiver's colour ",
      el("span", { class: "key-wait" }), " waiting for data");
  }

  _candidates(plan, top = 3) {
    const all = [...(plan.candidates || [])].filter((c) => Number.isFinite(c.predicted_s))
      .sort((a, b) => a.predicted_s - b.predicted_s);
    const out = [];
    const labels = new Set();
    const strategies = new Set();
    for (const c of all) {
      if (labels.has(c.label)) continue;
      if (out.length < top || !strategies.has(c.strategy) || c.label === "source alone") {
        out.push(c);
        labels.add(c.label);
        strategies.add(c.strategy);
      }
    }
    // The server sends only its best few candidates, often all variants of one split; the camera device alone
    // is the reference people ask about, and its own profile predicts it exactly (no transfers in that plan).
    if (!labels.has("source alone")) {
      const alone = modelSeconds(this.profiles.get(plan.source));
      if (alone !== null) out.push({ strategy: "single", label: "source alone", predicted_s: alone, derived: true });
    }
    return out.sort((a, b) => a.predicted_s - b.predicted_s).slice(0, 8);
  }

  _renderLive() {
    if (!this.liveEl) return;
    if (!this.latest) {
      this.liveEl.dataset.state = "none";
      this.liveEl.replaceChildren(el("p", { class: "hint" },
        "No frame reported yet. While a phone classifies, every device reports its timings of every 4th frame."));
      return;
    }
    const { planId, frame } = this.latest;
    const reports = this.frames.get(`${planId}:${frame}`) || new Map();
    const plan = this.plans.get(planId) || null;
    const colours = plan ? this._colours(plan) : colourMap([...reports.keys()]);
    const order = plan ? planDevices(plan).filter((d) => reports.has(d) || plan.devices.includes(d))
      : [...reports.keys()];
    for (const d of reports.keys()) if (!order.includes(d)) order.push(d);
    const predicted = (d) => plan?.timeline?.devices?.[d];
    this.liveEl.dataset.state = "shown";
    this.liveEl.dataset.frame = String(frame);
    this.liveEl.dataset.planId = String(planId);

    const maxMs = Math.max(1, ...[...reports.values()].flatMap((r) => r.tasks.map((t) => t.end_ms)));
    const rows = order.filter((d) => reports.has(d)).map((d) => ({
      device: d,
      label: this.name(d),
      colour: colours.get(d) || "#888",
      bars: reports.get(d).tasks.flatMap((t) => [
        { kind: "mark", start: t.ready_ms, end: t.ready_ms, title: `inputs of segment ${t.segment} ready at ${fmtMs(t.ready_ms)}`,
          data: { kind: "ready" } },
        { kind: "compute", start: t.start_ms, end: t.end_ms, text: String(t.segment),
          title: `segment ${t.segment}: ${fmtMs(t.start_ms)} → ${fmtMs(t.end_ms)} (${fmtMs(t.end_ms - t.start_ms)})`,
          data: { kind: "compute", segment: t.segment } },
      ]),
    }));
    const chart = gantt(rows, { width: this._width, maxMs });
    chart.classList.add("live-gantt");

    const table = el("table", { class: "live-table" },
      el("thead", {}, el("tr", {}, ...["device", "compute", "predicted", "sent / received"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...order.map((d) => {
        const r = reports.get(d);
        const p = predicted(d);
        const measured = r ? r.compute_ms : null;
        const pred = p ? p.compute_s * 1e3 : null;
        const ratio = measured !== null && pred ? measured / pred : null;
        return el("tr", { "data-device": d, "data-compute-ms": r ? r.compute_ms.toFixed(2) : "",
          "data-predicted-ms": pred !== null ? pred.toFixed(2) : "" },
          el("td", {}, swatch(colours.get(d) || "#888"), this.name(d)),
          el("td", { class: "num" }, r ? fmtMs(measured) : "no report"),
          el("td", { class: "num" }, fmtMs(pred),
            ratio !== null ? el("span", { class: `ratio ${ratio > 1.5 ? "slow" : ratio < 0.67 ? "fast" : ""}` },
              ` ×${ratio.toFixed(1)}`) : null),
          el("td", { class: "num bytes" }, ...(r ? [el("span", { class: "nw" }, fmtBytes(r.bytes_sent)), " / ",
            el("span", { class: "nw" }, fmtBytes(r.bytes_received))] : ["–"])));
      })));

    this.liveEl.replaceChildren(
      el("p", { class: "live-head" }, el("span", { class: "frame-no" }, `frame ${frame}`),
        ` · plan ${planId} · ${reports.size} of ${plan ? plan.devices.length : reports.size} devices reported`),
      chart,
      el("p", { class: "small note" }, "Each device's times start when it first heard of this frame: their clocks "
        + "are not aligned, so compare bar lengths, not positions across rows. ▾ marks when a segment's inputs were ready."),
      el("div", { class: "table-scroll" }, table),
      el("p", { class: "small note" }, "compute: measured on the device; predicted: the planner's cost model; "
        + "×: measured / predicted."));
  }
}
