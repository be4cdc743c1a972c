// The web AR classifier: the camera fills the screen and the top-3 labels, speed and the map of which device
// computed which part of the frame are drawn over it. Classification goes through an engine: the local engine
// runs the whole network in this browser's worker; the room engine (distributed) has the same interface.
import { PeerRuntime, bindProgress, MODEL_FILES } from "/web/runtime.js";
import { openCamera, grabFrame, cropRect, GRAB_SIZE, sizesOf, rescaleFrame } from "/web/camera.js";
import { pageModel } from "/web/model.js";
import { EarlyExit, bindExitToggle } from "/web/early_exit.js";
import { bindTarget, variantName } from "/web/scaling.js";

export const DEVICE_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"];

// Runs everything here. classify() resolves to {top: [{label, p}], parts: [{device, r0, r1, c0, c1}], ...}.
export class LocalEngine {
  constructor(runtime) { this.runtime = runtime; this.name = "this device"; }
  async load() {
    return this.runtime.call("tilemesh.runtime.session", "load",
      ["/model/graph.json", "/model/labels.json", "/model/card.json"]);
  }
  async classify(frame, size = GRAB_SIZE) {
    const out = await this.runtime.call("tilemesh.runtime.session", "classify_local", [frame, size, size, 5],
      [frame.buffer]);
    this.name = `this device · ${out.engine || "numpy"}`;  // which engine ran it (onnxruntime-web or numpy)
    return { ...out, parts: [{ device: this.name, r0: 0, r1: 1, c0: 0, c1: 1 }] };
  }
}

function drawLabels(el, top) {
  el.replaceChildren(...top.slice(0, 3).map(({ label, p }) => {
    const li = document.createElement("li");
    li.textContent = `${label} ${(p * 100).toFixed(0)}%`;
    return li;
  }));
  el.dataset.top1 = top[0].label;
  el.dataset.state = "running";
}

// Paint each device's share of the frame (fractions of the model's input) over the part of the video it covers.
function drawMap(canvas, video, parts, legend, nameOf = (d) => d) {
  const box = video.getBoundingClientRect();
  const scale = Math.max(box.width / video.videoWidth, box.height / video.videoHeight);  // object-fit: cover
  const { x, y, side } = cropRect(video);
  const left = box.width / 2 + (x - video.videoWidth / 2) * scale;
  const top = box.height / 2 + (y - video.videoHeight / 2) * scale;
  const size = side * scale;
  Object.assign(canvas.style, { left: `${left}px`, top: `${top}px`, width: `${size}px`, height: `${size}px` });
  canvas.width = canvas.height = 64;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, 64, 64);
  const devices = [...new Set(parts.map((p) => p.device))];
  for (const p of parts) {
    ctx.fillStyle = DEVICE_COLOURS[devices.indexOf(p.device) % DEVICE_COLOURS.length];
    ctx.fillRect(p.c0 * 64, p.r0 * 64, (p.c1 - p.c0) * 64, (p.r1 - p.r0) * 64);
  }
  legend.replaceChildren(...devices.flatMap((d, i) => {
    const swatch = document.createElement("span");
    swatch.style.background = DEVICE_COLOURS[i % DEVICE_COLOURS.length];
    return [swatch, document.createTextNode(nameOf(d))];
  }));
}

// Classifies with the room's plan; asks the planner when there is none, and falls back to this device alone for
// a frame when the room cannot answer (no plan yet, a device left mid-frame), so the labels never freeze.
// By default the camera is a stream (the room schedules its frames over lanes, several in flight) for the
// objective the user picks; a benchmark baseline (?strategy=...) plans single frames as before.
export class RoomArEngine {
  constructor(room, local, exit = null) {
    this.room = room;
    this.local = local;
    this.exit = exit;  // early exit (early_exit.js): easy frames answered here by a cheap pass; null: none
    this.target = null;  // context-aware scaling (scaling.js): {kind: "fps"|"latency", value}; null: none
    this.name = "room";
    this.planning = null;
    this.lastError = "";
    // ?strategy=equal_split (or any benchmark baseline) on the page's URL; the planner's own choice by default.
    const q = new URLSearchParams(location.search);
    this.strategy = q.get("strategy") || "tilemesh";
    // The model variant the room runs (heavy mode: ?variant=heavy or the page's mode picker); null: as served.
    this.variant = null;
    this.setVariant(q.get("variant"));
    this.devices = null;  // plan over these peers only (set by benchmarks); null: every ready device
    // ?objective=latency|throughput and ?private=1 preset the stream's choices (the overlay's controls change them).
    this.stream = { objective: q.get("objective") === "latency" ? "latency" : "throughput", private: q.get("private") === "1" };
    // ?bound=2: the throughput objective's latency bound, x the fastest single device (default 1.2; benchmarks).
    // The server takes 1-10 (protocol's plan_request); beyond, the nearest end, never a request it refuses.
    if (Number(q.get("bound")) >= 1) this.stream.latencyFactor = Math.min(10, Number(q.get("bound")));
    room.addEventListener("replan", () => { this.planning = null; });
  }

  // Switch the room to a variant of the model (null: the model as served); the next frame asks for its plan.
  setVariant(variant) {
    const known = pageModel()?.variants ?? {};
    this.variant = variant && known[variant] ? variant : null;
    this.planning = null;
  }


  // Context-aware scaling: with a target the planner picks the variant (the one in use is sent along, for
  // hysteresis); without one the room runs the picker's choice again.
  setTarget(target) {
    this.target = target;
    if (target) return this.replan();
    if (this.room.plan?.scaling) this.room.plan = null;  // chosen for the target that is gone
    this.setVariant(document.getElementById("ar-mode")?.value || null);
    return null;
  }

  // Ask the planner again in the background, after any request still running (the server takes one at a time);
  // the current plan runs until the new one is adopted.
  replan() {
    const ask = (this.planning ?? Promise.resolve()).then(() => this.room.requestPlan(this.strategy, this.variant,
      this.devices, this.target)).catch((err) => { this.lastError = err.message; });
    this.planning = ask;
    ask.finally(() => setTimeout(() => { if (this.planning === ask) this.planning = null; }, 1000));
  }

  // A stream by default; a target asks for one scaled plan instead (the planner picks the variant for it, and the
  // server's scaling plans single frames), and removing the target brings the stream back.
  streaming() { return this.strategy === "tilemesh" && !this.target; }

  // What the stream asks the room for: the user's objective and privacy, on the model size picked.
  streamRequest() { return { ...this.stream, variant: this.variant, devices: this.devices }; }

  // The user changed the objective or privacy: the room plans the stream again; frames keep coming meanwhile.
  setStream(choice) {
    this.stream = { ...this.stream, ...choice };
    if (!this.streaming()) return Promise.resolve(null);
    this.planning = this.room.requestStream(this.streamRequest()).catch((err) => { this.lastError = err.message; })
      .finally(() => setTimeout(() => { this.planning = null; }, 1000));
    return this.planning;
  }

  // Frames the stream's lanes hold in flight at once (null: not a stream, the depth tuner decides).
  capacity() { return this.streaming() && this.room.plan && this.room.capacity ? this.room.capacity : null; }

  stop() { if (this.streaming() && this.room.plan) this.room.stopStream(); }

  async load() { await this.room.load(); }

  // The current plan's id when other devices share its work (a second frame in flight may then pay off).
  pipelineKey() {
    const p = this.room.plan;
    return p && p.devices.some((d) => d !== this.room.signaling.peerId) ? p.plan_id : null;
  }

  // Device names for the legend: people know "Anna's phone", not peer ids.
  nameOf(id) {
    if (id === this.local.name) return id;
    const peer = this.room.signaling.peer(id);
    const me = id === this.room.signaling.peerId ? " (this)" : "";
    return peer ? `${peer.name}${me}` : id;
  }

  async _ensurePlan() {
    if (this.target && this.room.plan) this.variant = this.room.plan.variant ?? null;  // the planner's choice
    // A plan for another variant, or of the other kind (a background replan answered with a stream while a
    // benchmark baseline is wanted, or the reverse; a plan not chosen for the target while one is set), is not
    // this engine's plan: ask for its own.
    const p = this.room.plan;
    if (p && ((p.variant ?? null) !== this.variant || Boolean(p.stream) !== this.streaming()
              || (!p.stream && p.strategy !== this.strategy) || (this.target && !p.scaling))) this.room.plan = null;
    if (this.room.plan) return true;
    // One request at a time (frames in flight all land here while there is no plan; the server refuses a
    // second plan_request while one runs, and every extra plan would replace the one before).
    this.planning ??= (this.streaming() ? this.room.requestStream(this.streamRequest())
      : this.room.requestPlan(this.strategy, this.variant, this.devices, this.target))
      .catch((err) => { this.lastError = err.message; })
      .finally(() => setTimeout(() => { this.planning = null; }, 1000));
    await this.planning;
    return Boolean(this.room.plan);
  }

  // `cheap`: the same camera frame at the early exit's cheap size (early_exit.js grab), when early exit is on.
  async classify(frame, size = GRAB_SIZE, cheap = null) {
    if (cheap && this.exit && this.exit.on) {
      let c;
      try {
        c = await this.exit.run(cheap);
      } catch (err) {  // the cheap pass failed: early exit turns itself off, the frame goes to the room
        this.lastError = `early exit off: ${err.message || err}`;
        await this.exit.setOn(false).catch(() => {});
        return this._classify(frame, size);
      }
      if (c.exit) {  // answered here: the room is not asked for this frame
        this.name = `this phone alone · ${this.exit.variantName} · entropy ${c.entropy.toFixed(3)}`;
        return this.exit.result(c);
      }
      const r = await this._classify(frame, size);
      await this.exit.answered(r);
      return { ...r, cheap: { entropy: c.entropy, top1: c.top1, reason: c.reason } };  // why it went to the room
    }
    return this._classify(frame, size);
  }

  async _classify(frame, size) {
    if (await this._ensurePlan()) {
      // A frame grabbed for another size of the model (scaling switched variants meanwhile) is rescaled.
      const want = sizesOf(this.room.plan.variant).grab;
      try {
        const r = await this.room.classify(rescaleFrame(frame, size, want).slice(), want);
        const p = r.plan;
        const mode = p.variant || this.target ? ` · ${variantName(p.variant)}` : "";
        const target = this.target ? ` (target ${this.target.value} ${this.target.kind === "fps" ? "fps" : "s"})` : "";
        const lanes = p.lanes ? ` · ${p.lanes} lane${p.lanes > 1 ? "s" : ""}` : "";  // plan_summary: a count
        this.name = `${p.devices.length} device${p.devices.length > 1 ? "s" : ""}${lanes} · plan ${p.plan_id}${mode}${target}`;
        return r;
      } catch (err) {
        // Every lane full (the plan just shrank): this frame is skipped, not classified alone.
        if (String(err.message).startsWith("busy")) return { skipped: true, retryMs: err.retryMs || 0 };
        this.lastError = err.message;
        this.room.plan = null;
      }
    }
    this.name = `this device alone${this.lastError ? " (" + this.lastError + ")" : ""}`;
    return this.local.classify(rescaleFrame(frame, size, GRAB_SIZE), GRAB_SIZE);
  }
}

// The overlay's stream controls: "most frames/s" or "fastest answer", and "pixels stay on this phone".
function bindStreamControls(engine) {
  const objective = document.getElementById("ar-objective");
  const priv = document.getElementById("ar-private");
  if (!objective || !priv) return;
  objective.value = engine.stream.objective;
  priv.checked = engine.stream.private;
  const apply = () => engine.setStream({ objective: objective.value, private: priv.checked });
  objective.onchange = apply;
  priv.onchange = apply;
}

export function arElements() {
  const $ = (id) => document.getElementById(id);
  return { root: $("ar"), video: $("video"), labels: $("labels"), stats: $("stats"), map: $("map"),
    legend: $("legend"), error: $("error") };
}

function showError(els, err) {
  els.error.hidden = false;
  els.error.textContent = String(err.message || err);
  els.labels.dataset.state = "error";
}

// Frames in flight at once. One device alone gains nothing from more (its worker runs one thing at a time). In
// a room a second frame can start its first tiles while the last one's deep layers run elsewhere (pipelining,
// as in Hadidi et al.): measured +38% frames/s when the phone offloads to the edge, but on a saturated plan
// (every device busy, e.g. an equal split) only twice the latency for the same frame rate. Which one a plan is,
// the cost model does not tell reliably, so each new plan is tried both ways for a few frames and keeps two
// frames in flight only if that raised the frame rate by more than GAIN (30%: a second frame in flight costs latency).
export class DepthTuner {
  static TRIAL = 6;
  static GAIN = 1.3;

  constructor(engine) {
    this.engine = engine;
    this.forced = Number(new URLSearchParams(location.search).get("depth")) || 0;  // ?depth=1|2 pins it
    this.key = null;
    this.reset(null);
  }

  reset(key) {
    this.key = key;
    this.phase = key === null ? "done" : "one";  // one -> two -> done
    this.chosen = 1;
    this.marks = [];
    this.rates = {};
  }

  depth() {
    if (this.forced >= 1 && this.forced <= 4) return this.forced;
    const lanes = this.engine.capacity ? this.engine.capacity() : null;  // a stream: its lanes' slots
    if (lanes) return lanes;
    const key = this.engine.pipelineKey ? this.engine.pipelineKey() : null;
    if (key !== this.key) this.reset(key);
    return { one: 1, two: 2, done: this.chosen }[this.phase];
  }

  // A frame finished at time `t` (ms). The first frame after a depth change only fills the pipeline: not counted.
  done(t) {
    if (this.phase === "done") return;
    this.marks.push(t);
    if (this.marks.length < DepthTuner.TRIAL + 1) return;
    const span = this.marks[this.marks.length - 1] - this.marks[1];
    this.rates[this.phase] = (this.marks.length - 2) / span;
    this.marks = [];
    if (this.phase === "one") {
      this.phase = "two";
    } else {
      this.chosen = this.rates.two > this.rates.one * DepthTuner.GAIN ? 2 : 1;
      this.phase = "done";
    }
  }
}

// The stream's figures under the labels: measured (frames shown per second, latency) and, for a room's stream,
// what the planner predicted; "private" when the camera's pixels stay on this phone.
function statsText(fps, latency, result, name) {
  const planned = result.plan && result.plan.stream;
  const pred = planned ? ` (planned ${Number(planned.predicted_fps).toFixed(1)} fps · ${Number(planned.predicted_ms).toFixed(0)} ms)` : "";
  const priv = planned && planned.private ? " · private" : "";
  return `${fps ? fps.toFixed(1) : "…"} fps · ${latency.toFixed(0)} ms${pred}${priv} · ${name}`;
}

export async function runLoop({ engine, els, shouldRun = () => true }) {
  const { video } = els;
  const grab = document.createElement("canvas");
  const inflight = new Map();  // loop frame number -> its promise
  const tuner = new DepthTuner(engine);
  let started = 0;
  let frames = 0;
  let since = performance.now();
  let fps = 0;
  let late = 0;
  const start = () => {
    const id = ++started;
    const t0 = performance.now();
    // Each frame's result, or its error: one failed frame must not stop the frames queued behind it.
    const sizes = sizesOf(engine.variant ?? null);
    const cheap = engine.exit ? engine.exit.grab(video) : null;  // early exit's cheap-pass frame, when on
    inflight.set(id, engine.classify(grabFrame(video, grab, sizes), sizes.grab, cheap)
      .then((result) => ({ id, result, t0, t1: performance.now() }), (error) => ({ id, error })));
  };
  while (shouldRun() || inflight.size) {
    while (shouldRun() && inflight.size < tuner.depth()) start();
    // Whichever frame finishes first; the session says whether it may be shown (never older than one shown).
    const done = await Promise.race(inflight.values());
    inflight.delete(done.id);
    if (done.error) throw done.error;
    const { result } = done;
    if (result.skipped) {  // no lane could take it in order yet: try again when one can (at the next paint at least)
      await new Promise((resolve) => setTimeout(() => requestAnimationFrame(resolve), result.retryMs || 0));
      continue;
    }
    tuner.done(done.t1);
    // The next frame starts now, before this one is drawn: capture never waits on the display, and the worker
    // computes the next frame while this thread draws and yields to the next paint (measured: 14% of a lone
    // phone's stream was spent between a result and the next grab when this came after the paint).
    while (shouldRun() && inflight.size < tuner.depth()) start();
    els.stats.dataset.depth = String(tuner.depth());
    if (result.shown === false) { late += 1; els.stats.dataset.droppedLate = String(late); continue; }
    const latency = done.t1 - done.t0;
    frames += 1;
    if (performance.now() - since > 1000) {
      fps = (frames * 1000) / (performance.now() - since);
      frames = 0;
      since = performance.now();
    }
    drawLabels(els.labels, result.top);
    els.labels.dataset.source = result.exit ? "exit" : "room";  // an early exit's answer is marked as such
    drawMap(els.map, video, result.parts, els.legend, engine.nameOf ? (d) => engine.nameOf(d) : undefined);
    els.stats.textContent = statsText(fps, latency, result, engine.name) + (engine.exit ? engine.exit.text() : "");
    els.stats.dataset.variant = result.exit ? "" : result.plan?.variant ?? "";
    els.stats.dataset.latencyMs = latency.toFixed(1);
    els.stats.dataset.fps = fps.toFixed(2);
    const planned = result.plan && result.plan.stream;
    if (planned) {
      els.stats.dataset.predictedFps = Number(planned.predicted_fps).toFixed(2);
      els.stats.dataset.predictedMs = Number(planned.predicted_ms).toFixed(1);
      els.stats.dataset.private = String(Boolean(planned.private));
    }
    els.stats.dataset.devices = String(new Set(result.parts.map((p) => p.device)).size);
    els.labels.dataset.frames = String(Number(els.labels.dataset.frames || 0) + 1);
    // Every shown frame as an event (tests and benchmarks read which path answered it, and with what).
    els.root.dispatchEvent(new CustomEvent("tilemesh-frame", { detail: { exit: Boolean(result.exit),
      label: result.top[0].label, index: result.top[0].index, latencyMs: latency, t0: done.t0, t1: done.t1,
      variant: result.exit ? null : result.plan?.variant ?? null, entropy: result.entropy ?? null,
      reason: result.reason ?? null, scores: result.exit ? null : result.scores ?? null, frame: result.frame ?? null } }));
    // Yield so the video and the UI repaint between frames.
    await new Promise((resolve) => requestAnimationFrame(resolve));
  }
}

// The standalone page (/ar): this device alone.
export async function startAr() {
  const els = arElements();
  try {
    const runtime = new PeerRuntime({ onProgress: bindProgress(document.getElementById("boot")) });
    const [stream] = await Promise.all([openCamera(els.video), runtime.boot({ files: MODEL_FILES })]);
    const engine = new LocalEngine(runtime);
    await engine.load();
    document.getElementById("boot").hidden = true;
    window.tilemeshAr = { runtime, engine, stream };
    await runLoop({ engine, els });
  } catch (err) {
    showError(els, err);
  }
}

// The model's sizes (the served model and its variants, e.g. "Heavy (448 px)") as a picker over the video: the
// room plans the chosen one on its next frame.
function modePicker(select, engine) {
  const model = pageModel();
  const variants = Object.entries(model?.variants ?? {})
    .sort(([, a], [, b]) => (a.preprocess?.crop ?? 0) - (b.preprocess?.crop ?? 0));  // smallest first
  if (!select || !variants.length) return;
  select.replaceChildren(new Option(`Normal (${model.preprocess.crop} px)`, ""),
    ...variants.map(([key, v]) => new Option(v.name, key)));
  select.value = engine.variant ?? "";
  select.hidden = false;
  select.onchange = () => engine.setVariant(select.value || null);
}

// Inside a room (the join page): the camera opens on demand and frames go through the room's plan.
export async function startRoomAr(app) {
  const els = arElements();
  els.root.hidden = false;
  let running = true;
  let stream = null;
  const close = document.getElementById("ar-close");
  if (close) close.onclick = () => { running = false; };
  try {
    stream = await openCamera(els.video);
    const exit = new EarlyExit(app.runtime);
    const engine = new RoomArEngine(app.engine, new LocalEngine(app.runtime), exit);
    modePicker(document.getElementById("ar-mode"), engine);
    bindExitToggle(document.getElementById("ar-exit"), exit);
    bindTarget(document.getElementById("ar-target"), engine);
    await engine.load();
    app.ar = { engine, stream };
    bindStreamControls(engine);
    await runLoop({ engine, els, shouldRun: () => running });
    engine.stop();
  } catch (err) {
    showError(els, err);
    return;
  } finally {
    if (!running) {
      if (stream) stream.getTracks().forEach((t) => t.stop());
      els.root.dispatchEvent(new CustomEvent("tilemesh-camera-off"));  // a fusion room drops this view now
      els.root.hidden = true;
    }
  }
}
