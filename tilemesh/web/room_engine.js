// Distributed inference in the browser: plumbing between the device session in the worker
// (tilemesh.runtime.session, the same core the edge runs) and what only the page has: the WebRTC mesh, the
// signaling socket, the camera's frames and the UI. Events go to the session; its effects are carried out here.
//
//   const engine = new RoomEngine({ runtime, signaling, mesh });
//   await engine.measure();                    // compute profile + links, reported in state.profile
//   engine.requestPlan();                      // the device with the camera asks the server's planner
//   engine.requestStream({ objective: "throughput", private: false });  // ...or plans its camera as a stream
//   const result = await engine.classify(rgbaFrame);   // {top, parts, ms, report, plan, shown, stream}
//
// Every device runs one: devices without a camera just answer chunks as they come. Events are posted in
// arrival order and the worker handles them one at a time, so chunks are never reordered here.
import { LinkProbe } from "/web/mesh.js";
import { GRAB_SIZE } from "/web/camera.js";
import { pageModel } from "/web/model.js";
import { sessionNow } from "/web/clock.js";

const SESSION = "tilemesh.runtime.session";
const TICK_MS = 500;
// A probe whose answers stop coming (the peer vanished mid-probe) gives up, so `measure()` always resolves.
const PROBE_TIMEOUT_MS = 20000;
// Once the room settles, each device re-measures in its turn, this long apart (a profile with the thread trial
// takes about a second on a phone).
const SETTLE_TURN_MS = 1500;
const IDLE_MS = 2000;  // and waits for this long without frames or chunks (a device computing is not measured)
const BUSY_EVENTS = new Set(["frame", "chunk", "plan", "tick"]);
const RETRY_MAX_MS = 30000;  // a refinement that gave way to frames tries again later, backing off to this

// onnxruntime-web's thread count, chosen by measurement, is remembered per device and model (the page's storage),
// so the next visit joins on it without a trial.
function threadsKey() {
  const model = pageModel();
  return `tilemesh.ort_threads:${navigator.hardwareConcurrency || 0}:${(model && model.sha256) || "model"}`;
}

export function rememberedThreads() {
  try {
    const got = JSON.parse(localStorage.getItem(threadsKey()) || "null");
    return got && Number.isInteger(got.threads) && got.threads > 0 ? got : null;
  } catch { return null; }
}

function rememberThreads(compute) {
  try {
    localStorage.setItem(threadsKey(), JSON.stringify({ threads: compute.threads, trial: compute.thread_trial_ms }));
  } catch { /* storage off: the next visit measures again */ }
}

export class RoomEngine extends EventTarget {
  constructor({ runtime, signaling, mesh }) {
    super();
    this.runtime = runtime;
    this.signaling = signaling;
    this.mesh = mesh;
    this.probe = new LinkProbe(mesh);
    this.plan = null;       // the plan this device is the source of (set from the session's notices)
    this.capacity = 0;      // frames its lanes hold in flight at once (a stream's plan; 0: up to the caller)
    this.streamStats = null;  // the session's latest measured figures of this camera's stream
    this.lastPlan = null;   // the last plan message the room made
    this.parts = [];
    this.frameId = 0;
    this.waiting = new Map();
    this.compute = null;
    this.links = {};
    this.name = "room";
    this.loaded = null;
    this.errors = [];
    this.tasksRun = {};     // plan id -> tasks this device has computed under it
    this.ticker = null;
    this.probing = new Map();  // peer -> the probe running on its link
    this.lastBusy = -Infinity;  // when a frame, chunk or plan last came (refinement waits for quiet)
    this.refineTimer = null;
    mesh.onMessage = (from, bytes) => this._onMessage(from, bytes);
    signaling.on("plan", (msg) => this._fire({ on: "plan", msg, me: signaling.peerId }));
    // How many other devices are still booting: measurements taken meanwhile are provisional (the session's rule).
    this.booting = null;
    this.refining = [];     // what the session will measure again once the room has settled
    signaling.on("roster", ({ peers }) => {
      const n = peers.filter((p) => p.id !== signaling.peerId && p.state === "booting").length;
      if (n !== this.booting) { this.booting = n; this._fire({ on: "room", booting: n }); }
    });
    signaling.on("peer_left", ({ id }) => this._fire({ on: "peer_left", peer: id }));
    // Who is ready with a profile (the session asks for a new plan when a device arrives mid-stream); only
    // changes of that set reach the worker, not every profile update.
    this.readyKey = "";
    signaling.on("roster", ({ peers }) => {
      const ready = (peers || []).filter((p) => p.connected !== false && (p.state === "ready" || p.state === "busy") &&
        p.profile?.compute)
        .map((p) => p.id).sort();
      const key = ready.join(",");
      if (key !== this.readyKey) { this.readyKey = key; this._fire({ on: "roster", ready }); }
    });
    signaling.on("broadcast", ({ from, data }) => {
      if (data && typeof data === "object") this._fire({ on: "broadcast", sender: from, data });
    });
    signaling.on("error", (e) => {
      if (e.code === "plan_failed") this._emit("plan_failed", e);
    });
    mesh.addEventListener("peer", (e) => {
      const { peerId, state } = e.detail;
      if (state === "open") this._fire({ on: "link_opened", peer: peerId, max_message: mesh.maxMessageSize(peerId) });
      // A link that closed without the server saying the peer left (a failed connection) is gone all the same.
      else if (state === "gone") this._fire({ on: "peer_left", peer: peerId });
    });
  }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  // Loads the model into the worker once it has booted; resolves with its size.
  load(modelJson = "/model/graph.json", labelsJson = "/model/labels.json", cardJson = "/model/card.json") {
    this.loaded ??= this.runtime.ready.then(() => this.runtime.call(SESSION, "load",
      [modelJson, labelsJson, cardJson]));
    return this.loaded;
  }

  // Speed on the model's own layers, and the links being probed: reported to the roster when this resolves.
  async measure() {
    await this.load();
    await this._profile();
    // Links still unmeasured are waited for; a second measurement of a measured link (asked for after the first
    // profile) updates the roster when it lands, without holding the device back from ready.
    const known = this.links || {};
    await Promise.allSettled([...this.probing].filter(([peer]) => !(peer in known)).map(([, p]) => p));
    return { compute: this.compute, links: this.links };
  }

  // `variant`: one of the model card's variants (e.g. "heavy"); null: the model as served. `devices`: plan over
  // these peers only (benchmarks: rooms of 1..N equal phones in one run); null: every ready device.
  // `target` ({kind: "fps"|"latency", value}): the planner picks the variant that meets it (`variant` is then
  // the one in use; the plan answering it carries `scaling`); the session asks again with it when the room
  // changes (a device leaves, drift).
  requestPlan(strategy = "tilemesh", variant = null, devices = null, target = null) {
    const adopted = this._adopted((p) => !p.stream && p.strategy === strategy
      && (target ? Boolean(p.scaling) : (p.variant ?? null) === variant));
    this._fire({ on: "request_plan", strategy, ...(variant ? { variant } : {}), ...(devices ? { devices } : {}),
      ...(target ? { target } : {}) });
    return adopted;
  }

  // Resolves with this camera's next plan matching the request once the session has adopted it (not when the
  // server's message arrives: frames started before adoption would still go to the old plan, or find none);
  // rejects when the server refuses the request (e.g. a background replan of this device is still running), so
  // the caller asks again instead of waiting out the timeout.
  _adopted(match, timeoutMs = 15000) {
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.removeEventListener("plan", on);
        this.removeEventListener("plan_failed", failed);
      };
      const on = (e) => {
        if (e.detail.role.role !== "source" || !match(e.detail.plan)) return;
        done();
        resolve(e.detail.plan);
      };
      const failed = (e) => { done(); reject(new Error(`plan refused: ${e.detail.message}`)); };
      const timer = setTimeout(() => { done(); reject(new Error(`no plan within ${timeoutMs / 1000} s`)); },
        timeoutMs);
      this.addEventListener("plan", on);
      this.addEventListener("plan_failed", failed);
    });
  }

  // This camera as a stream: the room divides its devices among the cameras streaming and plans each as lanes.
  // objective: "throughput" (most frames/s within 1.2x the fastest single-device latency) or "latency".
  // `variant` and `devices` as for requestPlan.
  requestStream({ objective = "throughput", private: priv = false, latencyFactor = null, variant = null,
    devices = null } = {}) {
    const adopted = this._adopted((p) => Boolean(p.stream) && (p.variant ?? null) === variant);
    this._fire({ on: "request_plan", strategy: "tilemesh", objective, private: Boolean(priv),
      ...(latencyFactor ? { latency_factor: latencyFactor } : {}), ...(variant ? { variant } : {}),
      ...(devices ? { devices } : {}) });
    return adopted;
  }

  // The stream ends (the camera closed): frames in flight finish; the room re-divides among the other cameras.
  stopStream() {
    this.plan = null;
    this.capacity = 0;
    return this._fire({ on: "request_plan", objective: "stop" });
  }

  // Classify one camera frame (`size` square RGBA, camera.js grabFrame: GRAB_SIZE, or a model variant's size)
  // with the room's plan; rejects on timeout, replan or when a device leaves.
  classify(frame, size = GRAB_SIZE) {
    if (!this.plan) return Promise.reject(new Error("no plan yet"));
    const id = ++this.frameId;
    const result = new Promise((resolve, reject) => this.waiting.set(id, { resolve, reject }));
    this._fire({ on: "frame", frame: id, data: frame, height: size, width: size }, [frame.buffer]);
    this._startTicker();
    return result;
  }

  // The session's clock: frame timeouts on the camera, and on every device of a plan the stall rule (a device
  // waiting for a silent one's pieces asks the camera for them, which also clears it of the blame).
  _startTicker() {
    this.ticker ??= setInterval(() => {
      if (this.waiting.size || this.inPlan) this._fire({ on: "tick" });
    }, TICK_MS);
  }

  _onMessage(from, bytes) {
    if (this.probe.onMessage(from, bytes)) return;
    this._fire({ on: "chunk", peer: from, data: bytes }, [bytes.buffer]);
  }

  // One event to the session; its effects are carried out in order. Events queue in the worker in call order.
  async _fire(event, transfer = []) {
    if (BUSY_EVENTS.has(event.on)) this.lastBusy = performance.now();
    let effects;
    try {
      await this.load();
      effects = await this.runtime.call(SESSION, "handle", [event, sessionNow()], transfer);
    } catch (err) {
      this._error(`${event.on}: ${err.message || err}`);
      if (event.on === "frame") this._settle(event.frame, null, err);
      return;
    }
    for (const e of effects) this._execute(e);
  }

  _execute(e) {
    switch (e.do) {
      case "send":
        for (const chunk of e.chunks) {
          this.mesh.send(e.dst, chunk).catch((err) => console.warn("tilemesh: send failed", err.message));
        }
        break;
      case "signal": this.signaling.send(e.type, e.fields); break;
      case "report_profile": this._report(e.compute, e.links); break;
      case "frame_done": this._settle(e.frame, e.result, null); break;
      case "frame_failed": this._settle(e.frame, null, Object.assign(new Error(e.reason), { retryMs: e.retry_s * 1e3 })); break;
      case "probe": {
        // The session asks for a link's second measurement (after this device's first profile) while the first
        // one is still settling: it runs after it, never alongside.
        const prev = this.probing.get(e.peer);
        const entry = (prev ? prev.catch(() => {}) : Promise.resolve()).then(() => this._probe(e))
          .finally(() => { if (this.probing.get(e.peer) === entry) this.probing.delete(e.peer); });
        this.probing.set(e.peer, entry);
        break;
      }
      case "profile":
        if (e.reason === "settled") this._refine();
        else this._profile().catch((err) => this._error(`profile: ${err.message}`));
        break;
      case "notice": this._notice(e.what, e.detail); break;
      default: this._error(`unknown effect ${e.do}`);
    }
  }

  _notice(what, detail) {
    if (what === "plan") {
      const { plan, role } = detail;
      this.lastPlan = plan;  // the room's latest plan, whether or not this device is in it (the host page)
      if (role.role === "source") {
        this.plan = plan;
        this.parts = role.parts || [];
        this.capacity = plan.stream ? role.capacity || 1 : 0;
      }
      this.inPlan = role.role === "source" || role.role === "worker" || (this.inPlan && role.role === "idle");
      if (this.inPlan) this._startTicker();
      this._emit("plan", { plan, role });
    } else if (what === "replan") {
      this.plan = null;
      this.capacity = 0;
      this._emit("replan", detail);
    } else if (what === "stream_stats") {
      this.streamStats = detail;
      this._emit("stream_stats", detail);
    } else if (what === "tasks_run") {
      this.tasksRun[detail.plan_id] = detail.tasks_run;
    } else if (what === "refining") {
      this.refining = detail.pending || [];
      const last = this.signaling.lastState || {};
      if (last.state === "ready") this.signaling.setState("ready", { detail: this.refining.length ? "refining" : "" });
      this._emit("refining", detail);
    } else if (what === "report") {
      this._emit("report", { ...detail, from: this.signaling.peerId });
    } else if (what === "error") {
      this._error(detail.message);
    } else {
      this._emit(what, detail);  // drift; timings (every frame this device finished, for benchmarks)
    }
  }

  _settle(frame, result, error) {
    const w = this.waiting.get(frame);
    if (!w) return;
    this.waiting.delete(frame);
    if (error) w.reject(error);
    else w.resolve(result);
    if (!this.waiting.size && !this.inPlan && this.ticker) { clearInterval(this.ticker); this.ticker = null; }
  }

  _error(text) {
    this.errors.push(text);
    console.warn("tilemesh:", text);
  }

  // Once the room has settled: the profile again, the engine choosing its thread count first (deferred while
  // joining). Devices take turns (`SETTLE_TURN_MS` each, in peer id order): measurements that overlap share what
  // they measure (the air between phones; on an emulated room, the machine's cores too). It waits until this
  // device has had no frame or chunk for `IDLE_MS`, and gives way to frames (the worker stops it when a message
  // waits): a device in a running plan never stalls its frames for it; it tries again when idle.
  _refine(delay = this._turn() * SETTLE_TURN_MS, retry = IDLE_MS) {
    clearTimeout(this.refineTimer);
    this.refineTimer = setTimeout(async () => {
      const idle = performance.now() - this.lastBusy;
      if (idle < IDLE_MS) { this._refine(IDLE_MS - idle, retry); return; }
      try {
        if (!await this._profile({ trial: true, background: true })) {
          this._refine(retry, Math.min(RETRY_MAX_MS, 2 * retry));
        }
      } catch (err) { this._error(`profile: ${err.message}`); }
    }, delay);
  }

  // This device's place among the room's devices (peer id order; the server's own edge measures apart).
  _turn() {
    const ids = this.signaling.peers.filter((p) => p.kind !== "edge").map((p) => p.id).sort();
    return Math.max(0, ids.indexOf(this.signaling.peerId));
  }

  // Resolves once the session has reported the new profile. `opts.trial`: the engine chooses its thread count
  // first (if it has not yet).
  async _profile(opts = {}) {
    const compute = await this.runtime.call(SESSION, "profile", [opts]);
    if (!compute) return false;  // a background measurement that gave way to frames
    if (compute.thread_trial_ms && !compute.thread_trial_cached) rememberThreads(compute);
    await this._fire({ on: "profiled", compute });
    return true;
  }

  async _probe({ peer, rtt_size: rttSize, rtt_count: rttCount, message, total }) {
    let timer;
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer in ${PROBE_TIMEOUT_MS} ms`)), PROBE_TIMEOUT_MS);
    });
    try {
      const { rtts, bulk } = await Promise.race([late, (async () => ({
        rtts: await this.probe.rtt(peer, rttSize, rttCount),
        bulk: await this.probe.throughput(peer, Math.min(this.mesh.maxMessageSize(peer), message), total),
      }))()]);
      clearTimeout(timer);
      await this._fire({ on: "link_measured", peer, rtts_ms: rtts, nbytes: bulk.bytes, seconds: bulk.ms / 1e3 });
    } catch (err) {
      clearTimeout(timer);
      await this._fire({ on: "probe_failed", peer, reason: String(err.message || err) });
    }
  }

  _report(compute, links) {
    this.compute = compute;
    this.links = links;
    const last = this.signaling.lastState || {};
    this.signaling.setState(last.state || "ready", { profile: { ...(last.profile || {}), compute, links } });
  }
}
