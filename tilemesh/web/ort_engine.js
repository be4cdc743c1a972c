// onnxruntime-web inside the peer runtime's Worker: runs the tiles the Python peer hands out.
//
// The Python peer (tilemesh.runtime.peer, in deferred mode) stays in charge of plans, regions, halos and the
// wire; it answers every event with a reply whose `compute` list names the tasks whose inputs are all here.
// This module runs those tasks, each in the onnxruntime-web session made for it when the plan was adopted
// (tilemesh.runtime.task_model: the tile's steps with its own pads, weights as external data in the compact
// model's blob), and folds each result back into the reply (tilemesh.runtime.engine_bridge) until nothing is
// left to compute; only then does the worker post the reply to the main thread.
//
// Data path: a request's inputs are read through PyProxy.getBuffer() (a view into Pyodide's heap that
// onnxruntime-web copies into its own), and outputs are assigned straight into numpy arrays: one copy each way.
// Any failure leaves the device on numpy (the reference), with the reason in `engine.reason`.
import { normalizeFrame } from "/web/camera.js";
import { sessionNow } from "/web/clock.js";

const ORT_URL = "/static/vendor/ort/";
const BRIDGE = "tilemesh.runtime.engine_bridge";
const BLOB_NAME = "model.bin";

// Firefox runs onnxruntime-web on one thread: in Firefox ESR a device joining with the threaded build hung in
// 'measuring speed' in three of five full-suite runs here (its Worker never answered: every call waits behind the
// engine's), never when its test ran alone, never in Chromium. onnxruntime-web starts its threads as workers
// nested in ours, and upstream reports threaded sessions that never resolve (microsoft/onnxruntime#26858): until
// that is understood, one thread (the roster says why).
const FIREFOX = typeof navigator !== "undefined" && /Firefox\//.test(navigator.userAgent || "");

// Threads need SharedArrayBuffer, i.e. a cross-origin isolated page (our COOP/COEP headers), and not Firefox.
export function threadsAllowed() { return Boolean(self.crossOriginIsolated) && !FIREFOX; }

export function defaultThreads() {
  return threadsAllowed() ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
}

function noThreadsWhy() {
  return FIREFOX ? " (Firefox: one thread, threaded runs hung at join)" : " (no cross-origin isolation: no threads)";
}

// Seconds of one call of `fn` (async), as tilemesh.runtime.profile._time_call: a warm-up, repetitions adapted
// to the budget, the lower quartile (other processes only ever add time).
export async function timeCall(fn, budgetS) {
  let t0 = performance.now();
  await fn();
  const first = (performance.now() - t0) / 1e3;
  const inner = first >= 0.002 ? 1 : Math.min(1000, Math.floor(0.002 / Math.max(first, 1e-7)) + 1);
  const one = Math.max(first * inner, 1e-9);
  const reps = Math.floor(Math.max(5 * one > budgetS ? 3 : 5, Math.min(21, budgetS / one)));
  const samples = [];
  for (let r = 0; r < reps; r++) {
    t0 = performance.now();
    for (let k = 0; k < inner; k++) await fn();
    samples.push((performance.now() - t0) / 1e3 / inner);
  }
  samples.sort((a, b) => a - b);
  return samples[samples.length >> 2];
}

// Seconds of each of `fn`'s runs back to back (after one warm-up) for about `budgetS`, as
// tilemesh.runtime.profile.sustained_samples: the figures the planner's totals rest on take their median.
export async function sustainedSamples(fn, budgetS, minRuns = 5, maxRuns = 50) {
  await fn();
  const out = [];
  const start = performance.now();
  while (out.length < maxRuns && (out.length < minRuns || (performance.now() - start) / 1e3 < budgetS)) {
    const t0 = performance.now();
    await fn();
    out.push((performance.now() - t0) / 1e3);
  }
  return out;
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n % 2 ? s[n >> 1] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
}

// Thrown inside a background measurement's runs when frames are waiting for the worker.
export const PREEMPTED = new Error("measurement preempted: frames are waiting");

function toJsObject(proxy) {
  try { return proxy.toJs({ dict_converter: Object.fromEntries }); } finally { proxy.destroy(); }
}

// A Python list of (name, array) pairs as JS pairs of PyProxies; the list and pair proxies are released.
function takePairs(list) {
  const pairs = [];
  for (let j = 0; j < list.length; j++) {
    const pair = list.get(j);
    pairs.push([pair.get(0), pair.get(1)]);
    pair.destroy();
  }
  list.destroy();
  return pairs;
}

// onnxruntime-web's module with `threads` threads, the wasm handed over (no second fetch). The thread count is
// fixed per instance when its first session is made, so a second count needs a second instance (`tag` makes the
// module URL, hence the instance, its own).
async function loadOrt(threads, tag, wasmBinary) {
  const ort = await import(ORT_URL + "ort.wasm.min.mjs" + (tag ? `?instance=${tag}` : ""));
  const env = ort.env;
  env.wasm.wasmPaths = ORT_URL;
  if (wasmBinary) env.wasm.wasmBinary = wasmBinary;
  env.wasm.numThreads = threads;
  env.wasm.proxy = false;
  return ort;
}

// The whole-model session made before Python is up (the worker calls this while Pyodide boots): onnxruntime-web's
// module, its wasm instance and the session from the server's `whole.onnx` (the bytes the runtime would build)
// with the weights as external data. `threads`: pinned (?ort_threads), else the count this device chose on an
// earlier visit (`cachedThreads`), else the default.
export async function preloadOrt({ threads, cachedThreads, wasmBinary, model, blob }) {
  const n = threadsAllowed() ? (threads || cachedThreads || defaultThreads()) : 1;
  const ort = await loadOrt(n, "", wasmBinary);
  const t0 = performance.now();
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ["wasm"], graphOptimizationLevel: "all", externalData: [{ path: BLOB_NAME, data: blob }],
  });
  return { ort, model, whole: { session, outputs: [...session.outputNames], createMs: performance.now() - t0 } };
}

function sameBytes(a, b) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

export class OrtEngine {
  constructor(pyodide, { threads, wasmBinary, ep, preloaded, cachedThreads, cachedTrial, deferTrial } = {}) {
    this.pyodide = pyodide;
    // Execution provider: "wasm" (CPU), or "webgpu" where navigator.gpu gives an adapter and the WebGPU build
    // measured faster on the whole model; `?ort_ep=wasm|webgpu` pins it (webgpu: for correctness tests).
    this.epPinned = ep || null;
    this.eps = ["wasm"];
    this.gpuTrial = null;    // {wasm: ms, webgpu: ms} when WebGPU was tried
    this.threads = threads || defaultThreads();
    // ?ort_threads=N pins the count; otherwise loading the model measures this count against one thread and
    // keeps the faster (a browser under a CPU quota, or a phone's slow cores, often runs 2 threads slower).
    this.threadsPinned = Boolean(threads);
    this.threadTrial = null;   // {threads: ms} measured when the count was chosen
    // A room device joins on the count it chose on an earlier visit (`cachedThreads`, with the times that chose
    // it), or on the default count, and runs the trial later, when the room has settled (`profile(.., {trial})`):
    // the trial costs a second instance and about a second of runs, which joining should not wait for.
    this.cachedThreads = cachedThreads || null;
    if (cachedThreads && !threads) {
      this.threads = cachedThreads;
      this.threadTrial = cachedTrial || null;
      this.trialCached = Boolean(cachedTrial);
    }
    this.deferTrial = Boolean(deferTrial);
    this.preloaded = preloaded || null;  // a promise of preloadOrt's result
    this.wasmBinary = wasmBinary;  // prefetched with progress at boot (else onnxruntime-web fetches it)
    this.ort = null;
    this.active = false;
    this.whole = null;       // {session, outputs} of the whole graph (single-device classifier, profile)
    this.plans = new Map();  // plan id -> {planId, tasks: [{session, outputs}]}: every plan this device runs
    this.info = { engine: "numpy", reason: "onnxruntime-web not loaded" };
    this.shouldYield = () => false;  // the worker says when other messages wait (background measurements stop)
    this.trialOne = null;    // [instance, session] of one thread while a trial is under way
  }

  bridge() { return this.pyodide.pyimport(BRIDGE); }

  // Load onnxruntime-web and make the whole-model session; on success the peer hands its tasks to this engine.
  async init(modelJson) {
    const t0 = performance.now();
    const bridge = this.bridge();
    if (this.active && this.modelJson === modelJson) {
      bridge.use_engine(this.info.engine, true, this.info.reason).destroy();
      bridge.destroy();
      return this.info;
    }
    this.modelJson = modelJson;
    try {
      this.blob = this._fileBytes(bridge.blob_path(modelJson));
      const whole = bridge.whole_model();
      try {
        if (!await this._adoptPreloaded(whole)) {
          this.ort = await this._loadOrt(threadsAllowed() ? this.threads : 1, "");
          this.whole = await this._session(whole);
        }
      } finally { whole.destroy(); }
      if (!this.deferTrial) await this._withModelInput(bridge, (x, name) => this._chooseThreads(x, name, 0.15));
      await this._withModelInput(bridge, (x, name) => this._tryWebGpu(bridge, x, name, 0.3));
      const name = this.eps[0] === "webgpu" ? "ort-webgpu" : "ort-wasm";
      const reason = this._reason();
      bridge.use_engine(name, true, reason).destroy();
      this.active = true;
      this.info = { engine: name, reason, threads: this.ort.env.wasm.numThreads, thread_trial_ms: this.threadTrial,
        gpu_trial_ms: this.gpuTrial, gpu_note: this.gpuNote || null, init_ms: performance.now() - t0,
        session_ms: this.whole.createMs, cross_origin_isolated: self.crossOriginIsolated === true };
    } catch (err) {
      this.active = false;
      this.info = { engine: "numpy", reason: `onnxruntime-web unavailable: ${err && err.message ? err.message : err}` };
      try { bridge.use_engine("numpy", false, this.info.reason).destroy(); } catch { /* peer not loaded */ }
      console.warn("tilemesh:", this.info.reason);
    } finally {
      bridge.destroy();
    }
    return this.info;
  }

  // The session the worker made while Python booted, if it is of the same bytes the runtime builds (a server
  // of another version, or another model file, is not): true when adopted.
  async _adoptPreloaded(whole) {
    const pending = this.preloaded;
    this.preloaded = null;
    const pre = pending ? await pending.catch(() => null) : null;
    if (!pre) return false;
    const bytes = whole.get("model");
    const buf = bytes.getBuffer("u8");
    let same;
    try { same = sameBytes(buf.data, pre.model); } finally { buf.release(); bytes.destroy(); }
    if (!same) {
      pre.whole.session.release().catch(() => {});
      console.warn("tilemesh: the served whole.onnx differs from the runtime's model; building the session again");
      return false;
    }
    this.ort = pre.ort;
    this.whole = pre.whole;
    this.threads = pre.ort.env.wasm.numThreads;
    this.preloadedSession = true;
    return true;
  }

  _reason() {
    if (this.eps[0] === "webgpu") {
      const trial = this.gpuTrial ? ` (chosen by measurement: webgpu ${this.gpuTrial.webgpu.toFixed(1)} ms, wasm ` +
        `${this.gpuTrial.wasm.toFixed(1)} ms)` : " (pinned)";
      return `onnxruntime-web ${this.ort.env.versions?.web || ""} WebGPU` + trial;
    }
    const env = this.ort.env;
    const threads = env.wasm.numThreads;
    const trial = this.threadTrial
      ? ` (chosen by measurement${this.trialCached ? " on an earlier visit" : ""}: ` +
        `${Object.entries(this.threadTrial).map(([t, ms]) => `${t}: ${Number(ms).toFixed(1)} ms`).join(", ")})`
      : (this.threadsPinned || !threadsAllowed() || threads <= 1 ? "" : " (default; measuring)");
    return `onnxruntime-web ${env.versions?.web || ""} wasm SIMD, ${threads} thread${threads > 1 ? "s" : ""}` +
      (threadsAllowed() ? trial : noThreadsWhy()) +
      (this.gpuNote ? `; ${this.gpuNote}` : "");
  }

  _loadOrt(threads, tag) { return loadOrt(threads, tag, this.wasmBinary); }

  // Whether `_chooseThreads` would still run (the count is neither pinned, chosen, nor the only one possible).
  _trialPending() {
    return !this.threadsPinned && !this.threadTrial && threadsAllowed() && this.eps[0] === "wasm" &&
      this.ort.env.wasm.numThreads > 1;
  }

  // The whole model run back to back with this instance's threads and with one thread on a second instance,
  // in alternating blocks (load from elsewhere hits both alike); the faster one stays. Once per page, when the
  // model is loaded, so the lone-device /ar page runs on the faster count too.
  // `go` wraps each run (a background measurement gives way to frames: it throws PREEMPTED); the one-thread
  // instance and its session are kept for the next try.
  async _chooseThreads(x, name, budgetS, go = (fn) => fn) {
    if (this.threadsPinned || this.threadTrial || !threadsAllowed() || this.ort.env.wasm.numThreads <= 1) {
      return;
    }
    const many = this.ort.env.wasm.numThreads;
    if (!this.trialOne) {
      const alt = await this._loadOrt(1, "t1");
      const bridge = this.bridge();
      const whole = bridge.whole_model();
      try { this.trialOne = [alt, await this._session(whole, alt)]; } finally { whole.destroy(); bridge.destroy(); }
    }
    const [alt, one] = this.trialOne;
    const runs = { [many]: [], 1: [] };
    const engines = { [many]: [this.ort, this.whole], 1: [alt, one] };
    for (let block = 0; block < 3; block++) {
      for (const t of [many, 1]) {
        const [ort, entry] = engines[t];
        runs[t].push(...await sustainedSamples(go(() => this._run(entry, [[name, x]], ort)), budgetS / 6, 2, 20));
      }
    }
    this.trialOne = null;
    this.threadTrial = { [many]: median(runs[many]) * 1e3, 1: median(runs[1]) * 1e3 };
    if (this.threadTrial[1] < this.threadTrial[many]) {
      this.whole.session.release().catch(() => {});
      this.ort = alt;
      this.whole = one;
      this.threads = 1;
    } else {
      one.session.release().catch(() => {});
    }
    this.info = { ...this.info, threads: this.ort.env.wasm.numThreads, reason: this._reason(),
      thread_trial_ms: this.threadTrial };
  }

  // WebGPU where navigator.gpu gives an adapter: onnxruntime-web's WebGPU build (its own instance; its 27 MB
  // wasm is fetched only now, on such devices) runs the whole model back to back against the CPU engine, in
  // alternating blocks after a warm-up (the first runs compile shaders); the faster stays. `?ort_ep=webgpu`
  // takes it whenever there is an adapter (correctness tests on a software adapter), `?ort_ep=wasm` never.
  async _tryWebGpu(bridge, x, name, budgetS) {
    if (this.epPinned === "wasm" || this.gpuTried) return;
    this.gpuTried = true;
    const gpuApi = self.navigator && self.navigator.gpu;
    const adapter = gpuApi ? await gpuApi.requestAdapter().catch(() => null) : null;
    if (!adapter) { this.gpuNote = gpuApi ? "no WebGPU adapter" : "no WebGPU"; return; }
    let gpu, entry;
    try {
      gpu = await import(ORT_URL + "ort.webgpu.min.mjs?instance=gpu");
      gpu.env.wasm.wasmPaths = ORT_URL;
      gpu.env.wasm.numThreads = 1;  // the GPU computes; the asyncify build's CPU side stays on one thread
      gpu.env.wasm.proxy = false;
      gpu.env.webgpu.adapter = adapter;
      const whole = bridge.whole_model();
      try { entry = await this._session(whole, gpu, ["webgpu"]); } finally { whole.destroy(); }
    } catch (err) {
      this.gpuNote = `WebGPU unavailable: ${err && err.message ? err.message : err}`;
      return;
    }
    if (this.epPinned !== "webgpu") {
      const runs = { wasm: [], webgpu: [] };
      await this._run(entry, [[name, x]], gpu);  // shaders compile on the first runs
      for (let block = 0; block < 2; block++) {
        runs.wasm.push(...await sustainedSamples(() => this._run(this.whole, [[name, x]]), budgetS / 4, 2, 20));
        runs.webgpu.push(...await sustainedSamples(() => this._run(entry, [[name, x]], gpu), budgetS / 4, 2, 20));
      }
      this.gpuTrial = { wasm: median(runs.wasm) * 1e3, webgpu: median(runs.webgpu) * 1e3 };
      if (this.gpuTrial.webgpu >= this.gpuTrial.wasm) {
        this.gpuNote = `WebGPU measured slower (${this.gpuTrial.webgpu.toFixed(1)} ms vs ` +
          `${this.gpuTrial.wasm.toFixed(1)} ms on wasm)`;
        entry.session.release().catch(() => {});
        return;
      }
    }
    this.whole.session.release().catch(() => {});
    this.ort = gpu;
    this.whole = entry;
    this.eps = ["webgpu"];
  }

  // Calls `fn(x, inputName)` with a model input made from a blank frame (the thread choice, the profile's scale).
  async _withModelInput(bridge, fn) {
    const frame = this.pyodide.toPy(new Uint8Array(256 * 256 * 4));
    const x = bridge.local_input(frame, 256, 256);
    frame.destroy();
    const x0 = x.get(0);
    try {
      return await fn(x0, this.whole.inputName || this._wholeInput());
    } finally { x0.destroy(); x.destroy(); }
  }

  // The weight blob as the in-memory file system holds it: a view, not a 14 MB copy (FS.readFile otherwise).
  _fileBytes(path) {
    const node = this.pyodide.FS.lookupPath(path).node;
    if (node.contents instanceof Uint8Array && Number.isInteger(node.usedBytes)) {
      return node.contents.subarray(0, node.usedBytes);
    }
    return this.pyodide.FS.readFile(path);
  }

  // A TaskModel dict (PyProxy) -> {session, outputs, createMs}.
  async _session(model, ort = this.ort, eps = this.eps) {
    const bytes = model.get("model");
    const buf = bytes.getBuffer("u8");
    const t0 = performance.now();
    try {
      const session = await ort.InferenceSession.create(buf.data, {
        executionProviders: eps,
        graphOptimizationLevel: "all",
        externalData: [{ path: BLOB_NAME, data: this.blob }],
      });
      const outs = model.get("outputs");
      const outputs = [...outs.keys()];
      outs.destroy();
      return { session, outputs, createMs: performance.now() - t0 };
    } finally {
      buf.release();
      bytes.destroy();
    }
  }

  // Sessions of plans the device no longer runs (retired lanes, another camera's stream that ended) go.
  release(live) {
    for (const [id, plan] of this.plans) {
      if (live.includes(id)) continue;
      this.plans.delete(id);
      for (const t of plan.tasks) if (t) t.session.release().catch(() => {});
    }
  }

  // After `set_plan`: one session per task of each plan just adopted, made now and never per frame. Adds the
  // creation time to the reply (an `engine` notice per plan).
  async adopt(reply, planIds) {
    for (const id of planIds) await this.adoptOne(reply, id);
    return reply;
  }

  async adoptOne(reply, planId) {
    if (!this.active) return reply;
    const bridge = this.bridge();
    // The peer's own choice is the truth: a device that profiled numpy faster makes no sessions.
    const chosen = bridge.engine();
    const onNumpy = chosen.get("name") === "numpy";
    chosen.destroy();
    if (onNumpy) { bridge.destroy(); return reply; }
    const t0 = performance.now();
    const models = bridge.plan_models(planId);
    try {
      if (!models) return reply;
      const tasks = [];
      let warmMs = 0;
      const list = models.get("tasks");
      try {
        for (let i = 0; i < list.length; i++) {
          const m = list.get(i);
          if (m === undefined || m === null) { tasks.push(null); continue; }  // an op without lowering: numpy
          try {
            const entry = await this._session(m);
            // One run on zeros now: the first run allocates the session's buffers (slower), not the first frame.
            const shapes = m.get("inputs").toJs({ dict_converter: Object.fromEntries });
            const w0 = performance.now();
            const feeds = {};
            for (const [name, dims] of Object.entries(shapes)) {
              feeds[name] = new this.ort.Tensor("float32", new Float32Array(dims.reduce((a, b) => a * b, 1)), dims);
            }
            await entry.session.run(feeds, entry.outputs);
            warmMs += performance.now() - w0;
            tasks.push(entry);
          } finally { m.destroy(); }
        }
      } finally { list.destroy(); }
      this.plans.set(planId, { planId, tasks });
      // The camera device rescues pieces and finishes frames alone on a reference run: its session is made now
      // (once per graph), not when a device has just vanished.
      if (models.get("source")) await this._reference(bridge, planId);
      // creation and warm-up, at adoption: a notice for the page and the tests
      this.lastAdoption = { plan_id: planId, sessions_ms: performance.now() - t0, warmup_ms: warmMs,
        engine: this.info.engine, tasks: tasks.length, on_numpy: tasks.filter((t) => t === null).length };
      const effects = reply.get("effects");
      effects.append(this.pyodide.toPy({ do: "notice", what: "engine", detail: this.lastAdoption }));
      effects.destroy();
    } catch (err) {
      // The plan still runs: this device falls back to numpy, and says why.
      this._fallBack(bridge, `sessions for plan failed: ${err.message || err}`);
    } finally {
      if (models) models.destroy();
      bridge.destroy();
    }
    return reply;
  }

  // The reference run's session (tilemesh.runtime.recovery): the whole model keeping every block boundary's
  // tensor, made the first time a rescue needs it and kept per graph (the model, or a variant). If it cannot be
  // made, rescues stay on numpy and the session is told why.
  async _reference(bridge, planId) {
    const model = bridge.reference_model(planId);
    try {
      const key = model.get("key");
      if (this.reference && this.reference.key === key) return this.reference.entry;
      if (this.reference) this.reference.entry.session.release().catch(() => {});
      this.reference = null;
      const t0 = performance.now();
      const entry = await this._session(model);
      this.reference = { key, entry, createMs: performance.now() - t0 };
      return entry;
    } catch (err) {
      bridge.reference_off(`reference session failed: ${err.message || err}`);
      return null;
    } finally {
      model.destroy();
    }
  }

  _fallBack(bridge, reason) {
    this.active = false;
    this.info = { engine: "numpy", reason };
    bridge.use_engine("numpy", false, reason).destroy();
    console.warn("tilemesh: back to numpy:", reason);
  }

  async _run(entry, feedsFrom, ort = this.ort) {
    const feeds = {};
    const bufs = [];
    try {
      for (const [name, arr] of feedsFrom) {
        const buf = arr.getBuffer("f32");
        bufs.push(buf);
        feeds[name] = new ort.Tensor("float32", buf.data, buf.shape);
      }
      return await entry.session.run(feeds, entry.outputs);
    } finally {
      for (const b of bufs) b.release();
    }
  }

  // One session event with this engine (tilemesh.runtime.engine_bridge.handle): a plan adopted gets its sessions
  // first, then every compute request runs here, until none is left; returns the other effects (a PyProxy list).
  async handle([event, now]) {
    const bridge = this.bridge();
    const reply = bridge.handle(event, now);
    try {
      const adopted = reply.get("adopted");
      const live = reply.get("live");
      try {
        if (live) this.release(live.toJs());
        if (adopted && adopted.length) await this.adopt(reply, adopted.toJs());
      } finally {
        if (adopted) adopted.destroy();
        if (live) live.destroy();
      }
      await this.drain(reply);
      return reply.get("effects");
    } finally {
      reply.destroy();
      bridge.destroy();
    }
  }

  // Run every compute request of `reply` (a PyProxy dict from the bridge), folding results back, until none is left.
  async drain(reply) {
    if (!reply || reply.type !== "dict" || !reply.has("compute")) return reply;
    const bridge = this.bridge();
    let computeMs = 0;
    let runs = 0;
    let fallbacks = 0;
    try {
      for (;;) {
        const reqs = bridge.take_compute(reply);
        const n = reqs.length;
        try {
          if (n === 0) break;
          for (let i = 0; i < n; i++) {
            const req = reqs.get(i);
            try {
              const planId = req.get("plan_id");
              const task = req.get("task");
              // task -1: a reference run (rescues, a frame finished alone), in its own session made once per graph
              const plan = this.active ? this.plans.get(planId) : null;
              const entry = task < 0 ? (this.active ? await this._reference(bridge, planId) : null)
                : plan ? plan.tasks[task] : null;
              if (!entry) { fallbacks++; bridge.computed_numpy(reply, planId, req, sessionNow()).destroy(); continue; }
              const pairs = takePairs(req.get("inputs"));
              const t0 = performance.now();
              let results;
              try {
                results = await this._run(entry, pairs);
              } catch (err) {
                this._fallBack(bridge, `onnxruntime-web failed on a task: ${err.message || err}`);
                fallbacks++;
                bridge.computed_numpy(reply, planId, req, sessionNow()).destroy();
                continue;
              } finally {
                for (const [, a] of pairs) a.destroy();
              }
              computeMs += performance.now() - t0;
              runs++;
              const names = entry.outputs;
              bridge.computed(reply, planId, req.get("frame"), task, names, names.map((k) => results[k].data),
                names.map((k) => results[k].dims), sessionNow()).destroy();
            } finally {
              req.destroy();
            }
          }
        } finally {
          reqs.destroy();
        }
      }
      // For tests and logs: tasks run by the engine, and by numpy because the engine had no session or failed.
      reply.set("engine_ms", computeMs);
      reply.set("engine_runs", runs);
      reply.set("numpy_runs", fallbacks);
    } finally {
      bridge.destroy();
    }
    return reply;
  }

  // After Python's part of the profile (`pyProfile`, a PyProxy dict: the camera's per-frame work `frame_s`, and
  // numpy's own profile when this device has no faster engine, or when asked to compare): time the profile's probes
  // and the whole model on onnxruntime-web; the peer uses whichever engine predicts the model faster. Returns the
  // chosen profile (what the planner uses). `trial`: choose the thread count first, if it was not (a room device
  // joins on the default or cached count and runs the trial once the room has settled).
  // `background`: a refinement that gives way to frames: as soon as another message waits for the worker
  // (`shouldYield`), it stops and returns null (the page tries again when the device is idle).
  async profile(pyProfile, budgetS = 0.3, { trial = false, background = false } = {}) {
    const numpyProfile = pyProfile;
    if (!this.active && !this.whole) {
      // numpy is all this device has: the profile says why (the roster shows it).
      numpyProfile.set("engine_reason", this.info.reason);
      return numpyProfile;
    }
    const go = (fn) => (background ? () => {
      if (this.shouldYield()) throw PREEMPTED;
      return fn();
    } : fn);
    const t0 = performance.now();
    if (trial && !this.threadTrial && this.deferTrial) {
      const bridge = this.bridge();
      try {
        await this._withModelInput(bridge, (x, name) => this._chooseThreads(x, name, 0.15, go));
      } catch (err) {
        if (err === PREEMPTED) return null;
        throw err;
      } finally { bridge.destroy(); }
      this.info = { ...this.info, reason: this._reason() };
    }
    const trialMs = performance.now() - t0;
    const bridge = this.bridge();
    const probes = bridge.engine_probes();
    const seconds = {};
    // A frame's model input for the whole-model runs (the thread choice, the profile's scale).
    const frame = this.pyodide.toPy(new Uint8Array(256 * 256 * 4));
    const x = bridge.local_input(frame, 256, 256);
    frame.destroy();
    const x0 = x.get(0);
    try {
      const per = budgetS / (probes.length + 2);
      const name = this.whole.inputName || this._wholeInput();
      for (let i = 0; i < probes.length; i++) {
        const p = probes.get(i);
        const entry = await this._session(p);
        const pairs = takePairs(p.get("inputs"));
        try {
          const key = p.get("key");
          seconds[key] = await timeCall(go(() => this._run(entry, pairs)), key === "chain" ? 2 * per : per);
        } finally {
          for (const [, a] of pairs) a.destroy();
          entry.session.release().catch(() => {});
          p.destroy();
        }
      }
      // The whole model run back to back: its median sets the profile's scale (what a frame pays here, quota
      // and contention included); the probes above only give the op classes' proportions.
      const probesMs = performance.now() - t0 - trialMs;
      const samples = await sustainedSamples(go(() => this._run(this.whole, [[name, x0]])), 3 * per);
      samples.sort((a, b) => a - b);
      const modelS = median(samples);
      const pySeconds = this.pyodide.toPy(seconds);
      // The lower quartile too: the engine is chosen against numpy's profile, whose probes keep lower quartiles.
      const extra = this.pyodide.toPy({ model_best_ms: samples[samples.length >> 2] * 1e3,
        threads: this.ort.env.wasm.numThreads,
        ...(this.threadTrial ? { thread_trial_ms: this.threadTrial } : {}),
        ...(this.threadTrial && this.trialCached ? { thread_trial_cached: true } : {}),
        // on the default thread count, its trial still to come: the session measures again once the room settles
        ...(this._trialPending() ? { provisional: true } : {}),
        // where a profile's time goes (ms): the thread trial, the op-class probes, the whole model's runs
        measure_ms: { trial: Math.round(trialMs), probes: Math.round(probesMs),
          whole: Math.round(performance.now() - t0 - trialMs - probesMs) } });
      const chosen = bridge.engine_profile(this.info.engine === "numpy" ? "ort-wasm" : this.info.engine,
        pySeconds, this.info.reason || "", modelS * 1e3, numpyProfile, extra);
      pySeconds.destroy();
      extra.destroy();
      const backend = chosen.get("backend");
      this.active = backend !== "numpy";
      this.info = { ...this.info, engine: backend, reason: chosen.get("engine_reason") };
      return chosen;
    } catch (err) {
      if (err === PREEMPTED) return null;
      this._fallBack(bridge, `onnxruntime-web profile failed: ${err.message || err}`);
      return numpyProfile;
    } finally {
      x0.destroy();
      x.destroy();
      probes.destroy();
      bridge.destroy();
    }
  }

  // The card's preprocessing ({crop, mean, std}), read once from the peer runtime.
  _preprocessing() {
    if (!this.pre) {
      const bridge = this.bridge();
      try { this.pre = toJsObject(bridge.preprocessing()); } finally { bridge.destroy(); }
    }
    return this.pre;
  }

  // The single-device classifier on the whole-model session (`args` as the worker converted them for Python,
  // `raw` as the page sent them). A frame the page already scaled and cropped to the model's input (camera.js
  // grabFrame) is normalised here and never enters Python; other frames take the Python reference path.
  async classifyLocal([data, height, width, k = 5], raw = []) {
    const pre = this._preprocessing();
    const pixels = raw[0];
    if (pixels instanceof Uint8Array && height === pre.crop && width === pre.crop &&
        pixels.length === pre.crop * pre.crop * 4) {
      const p0 = performance.now();
      const x = normalizeFrame(pixels, pre.crop, pre.mean, pre.std);
      const preMs = performance.now() - p0;
      const t0 = performance.now();
      const feeds = { [this.whole.inputName || this._wholeInput()]: new this.ort.Tensor("float32", x, [1, 3, pre.crop, pre.crop]) };
      const out = await this.whole.session.run(feeds, this.whole.outputs);
      const ms = performance.now() - t0;
      const logits = out[this.whole.outputs[0]];
      const bridge = this.bridge();
      try {
        const result = bridge.local_result(logits.data, logits.dims, preMs, ms, k);
        result.set("preprocessed_by", "browser");
        return result;
      } finally { bridge.destroy(); }
    }
    const bridge = this.bridge();
    const input = bridge.local_input(data, height, width);
    try {
      const x = input.get(0);
      const t0 = performance.now();
      let out;
      try {
        out = await this._run(this.whole, [[this.whole.inputName || this._wholeInput(), x]]);
      } finally { x.destroy(); }
      const ms = performance.now() - t0;
      const logits = out[this.whole.outputs[0]];
      return bridge.local_result(logits.data, logits.dims, input.get(1), ms, k);
    } finally {
      input.destroy();
      bridge.destroy();
    }
  }

  // The early exit's cheap pass (tilemesh.runtime.exit_bridge): the card's cheap variant of the model on its own
  // session (made on first use, same weights blob, this engine's threads), the frame normalised here as for the
  // whole model; the scores go to the exit rule in Python, whose answer (exit or not, the cheap top-k) returns.
  // `args` as the worker converted them ([data, height, width, k]), `raw` as the page sent them.
  async cheapPass([data, height, width, k = 5], raw = []) {
    const EXIT = "tilemesh.runtime.exit_bridge";
    const exit = this.pyodide.pyimport(EXIT);
    try {
      const pre = toJsObject(exit.preprocessing());
      this.cheap ??= {};
      if (!this.cheap[pre.variant]) {
        const model = exit.variant_model();
        try { this.cheap[pre.variant] = await this._session(model); } finally { model.destroy(); }
        this.cheap[pre.variant].inputName = this.cheap[pre.variant].session.inputNames[0];
      }
      const entry = this.cheap[pre.variant];
      const pixels = raw[0];
      if (!(pixels instanceof Uint8Array) || height !== pre.crop || width !== pre.crop ||
          pixels.length !== pre.crop * pre.crop * 4) {
        return exit.cheap_pass(data, height, width, k);  // another frame size: Python's reference path (numpy)
      }
      const p0 = performance.now();
      const x = normalizeFrame(pixels, pre.crop, pre.mean, pre.std);
      const preMs = performance.now() - p0;
      const t0 = performance.now();
      const out = await entry.session.run(
        { [entry.inputName]: new this.ort.Tensor("float32", x, [1, 3, pre.crop, pre.crop]) }, entry.outputs);
      const ms = performance.now() - t0;
      const logits = out[entry.outputs[0]];
      const result = exit.cheap_result(logits.data, logits.dims, preMs, ms, k);
      result.set("engine", this.info.engine);
      return result;
    } finally {
      exit.destroy();
    }
  }

  _wholeInput() {
    this.whole.inputName = this.whole.session.inputNames[0];
    return this.whole.inputName;
  }
}
