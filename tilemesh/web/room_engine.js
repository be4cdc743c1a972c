// Distributed inference in the browser: the main-thread glue between the WebRTC mesh and the peer runtime's
// worker. The worker (tilemesh.runtime.peer) owns the plan and the frames; this file only moves bytes.
//
//   const engine = new RoomEngine({ runtime, signaling, mesh });
//   await engine.measure();                    // compute profile + links, reported in state.profile
//   engine.requestPlan();                      // the device with the camera asks the server's planner
//   const result = await engine.classify(rgbaFrame);   // {top, parts, ms, report, plan}
//
// Every device runs one: devices without a camera just answer chunks as they come. Calls into the worker are
// posted in arrival order and the worker handles them one at a time, so chunks are never reordered here.
import { LinkProbe } from "/web/mesh.js";
import { FRAME_SIZE } from "/web/camera.js";

const FRAME_TIMEOUT_MS = 8000;
// Long enough to get past SCTP's slow start (a 256 KiB burst read 3-4x low), short enough for every pair at boot.
const LINK_PROBE_BYTES = 1024 * 1024;
const REPORT_EVERY = 4;
// A device whose measured compute per frame stays this far off the planner's prediction re-measures itself
// (a phone heating up and throttling, a laptop that started another job) and the source replans.
const DRIFT_FACTOR = 2;
const DRIFT_FRAMES = 5;
const DRIFT_COOLDOWN_MS = 30000;

export class RoomEngine extends EventTarget {
  constructor({ runtime, signaling, mesh }) {
    super();
    this.runtime = runtime;
    this.signaling = signaling;
    this.mesh = mesh;
    this.probe = new LinkProbe(mesh);
    this.plan = null;       // the `plan` message this device runs
    this.parts = [];        // which device computes which part of the frame (fractions), for the AR map
    this.frameId = 0;
    this.waiting = new Map();
    this.compute = null;
    this.links = {};
    this.name = "room";
    this.loaded = null;
    this.errors = [];
    this.tasksRun = {};     // plan id -> tasks this device has computed under it
    mesh.onMessage = (from, bytes) => this._onMessage(from, bytes);
    signaling.on("plan", (msg) => this._onPlan(msg));
    signaling.on("peer_left", ({ id }) => this._onPeerLeft(id));
    signaling.on("broadcast", ({ from, data }) => {
      // A device of our plan re-measured itself: plan again with its new speed at the next frame.
      if (data && data.kind === "profile_changed" && this.plan && this.plan.devices.includes(from)) {
        this.plan = null;
        this._emit("replan", { reason: `device ${from} changed speed (x${Number(data.ratio).toFixed(1)})` });
      }
    });
    signaling.on("error", (e) => {
      if (e.code === "plan_failed") this._emit("plan_failed", e);
    });
    mesh.addEventListener("peer", (e) => {
      if (e.detail.state === "open") this._measureLink(e.detail.peerId).catch(() => {});
    });
  }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  // Loads the model into the worker (once); resolves with its size.
  load(modelJson = "/model/graph.json", labelsJson = "/model/labels.json", cardJson = "/model/card.json") {
    this.loaded ??= this.runtime.call("tilemesh.runtime.peer", "load", [modelJson, labelsJson, cardJson]);
    return this.loaded;
  }

  // Speed on the model's own layers, then links to every open peer; both go into this peer's roster profile.
  async measure() {
    await this.load();
    this.compute = await this.runtime.call("tilemesh.runtime.peer", "profile", []);
    this.lastMeasured = performance.now();
    for (const peer of this.mesh.openPeers()) await this._measureLink(peer).catch(() => {});
    this._report();
    return { compute: this.compute, links: this.links };
  }

  async _measureLink(peer) {
    const rtts = await this.probe.rtt(peer, 64, 10);
    const bulk = await this.probe.throughput(peer, Math.min(this.mesh.maxMessageSize(peer), 262144),
      LINK_PROBE_BYTES);
    rtts.sort((a, b) => a - b);
    // LinkProbe reports megabytes per second; the planner wants megabits.
    this.links[peer] = { rtt_ms: +rtts[rtts.length >> 1].toFixed(3), mbps: +(bulk.mbps * 8).toFixed(2) };
    if (this.compute) this._report();
  }

  _report() {
    const state = (this.signaling.lastState || {}).state || "ready";
    this.signaling.setState(state, { profile: { ...(this.signaling.lastState?.profile || {}),
      compute: this.compute, links: this.links } });
  }

  requestPlan(strategy = "tilemesh") {
    this.signaling.send("plan_request", { strategy });
    return this.signaling.waitFor("plan", (p) => p.source === this.signaling.peerId, 15000);
  }

  async _onPlan(msg) {
    const me = this.signaling.peerId;
    this.lastPlan = msg;
    const involved = msg.devices.includes(me) || msg.source === me;
    const maxMessage = {};
    for (const d of msg.devices) {
      if (d !== me && this.mesh.state(d) === "open") maxMessage[d] = this.mesh.maxMessageSize(d);
    }
    if (!involved) { this._emit("plan", { plan: msg, role: "idle" }); return; }
    try {
      await this.load();
      const role = await this.runtime.call("tilemesh.runtime.peer", "set_plan", [msg.spec, me, maxMessage]);
      this._handle(role);  // chunks that outran this plan message were held in the worker and replayed now
      if (msg.source === me) {
        this.plan = msg;
        this.parts = role.parts || [];
        // Frames of the previous plan can no longer finish: fail them now rather than at their timeout.
        for (const [frame, w] of this.waiting) w.reject(new Error(`plan replaced while frame ${frame} ran`));
      }
      this._emit("plan", { plan: msg, role });
    } catch (err) {
      this.errors.push(String(err.message || err));
      console.error("tilemesh: adopting plan failed", err);
    }
  }

  _onPeerLeft(id) {
    if (this.plan && this.plan.devices.includes(id)) {
      for (const [frame, w] of this.waiting) w.reject(new Error(`device ${id} left during frame ${frame}`));
      this.plan = null;
      this._emit("replan", { reason: `device ${id} left` });
    }
  }

  _onMessage(from, bytes) {
    if (this.probe.onMessage(from, bytes)) return;
    this.runtime.call("tilemesh.runtime.peer", "on_chunk", [from, bytes], [bytes.buffer])
      .then((res) => this._handle(res))
      .catch((err) => {
        this.errors.push(String(err.message || err));
        console.warn("tilemesh: chunk from", from, "refused:", err.message);
      });
  }

  _handle(res) {
    if (res.plan_id !== undefined) this.tasksRun[res.plan_id] = res.tasks_run;
    for (const report of res.reports || []) {
      this._shareReport(res.plan_id, report);
      this._checkDrift(res.plan_id, report);
    }
    for (const out of res.out || []) {
      for (const chunk of out.chunks) {
        this.mesh.send(out.dst, chunk).catch((err) => console.warn("tilemesh: send failed", err.message));
      }
    }
    for (const r of res.results || []) {
      const w = this.waiting.get(r.frame);
      if (w) { this.waiting.delete(r.frame); clearTimeout(w.timer); w.resolve(r); }
    }
  }

  _checkDrift(planId, report) {
    const plan = this.lastPlan;
    const predicted = plan && plan.plan_id === planId ? plan.timeline?.devices?.[this.signaling.peerId]?.compute_s : 0;
    if (!predicted || !report.compute_ms) return;
    this.driftRatios = [...(this.driftRatios || []).slice(1 - DRIFT_FRAMES), report.compute_ms / (predicted * 1e3)];
    const sorted = [...this.driftRatios].sort((a, b) => a - b);
    const median = sorted[sorted.length >> 1];
    const off = median > DRIFT_FACTOR || median < 1 / DRIFT_FACTOR;
    const now = performance.now();
    if (this.driftRatios.length < DRIFT_FRAMES || !off || now - (this.lastMeasured || 0) < DRIFT_COOLDOWN_MS) return;
    this.lastMeasured = now;
    this.driftRatios = [];
    this._emit("drift", { ratio: median });
    this.runtime.call("tilemesh.runtime.peer", "profile", []).then((compute) => {
      this.compute = compute;
      this._report();
      this.signaling.broadcast({ kind: "profile_changed", ratio: median });
    }).catch((err) => this.errors.push(String(err.message || err)));
  }

  // Each device's timings of a frame go to the whole room (the host page draws the timeline). Only every
  // REPORT_EVERY-th frame, chosen by frame id so all devices report the same frames and signaling is not flooded.
  _shareReport(planId, report) {
    if (report.frame % REPORT_EVERY !== 1) return;
    this.signaling.broadcast({ kind: "frame_report", plan_id: planId, report });
    this._emit("report", { plan_id: planId, report, from: this.signaling.peerId });
  }

  // Classify one 256x256 RGBA frame with the room's plan; rejects on timeout or when a device leaves.
  classify(frame) {
    if (!this.plan) return Promise.reject(new Error("no plan yet"));
    const id = ++this.frameId;
    const result = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error(`frame ${id} timed out after ${FRAME_TIMEOUT_MS} ms`));
      }, FRAME_TIMEOUT_MS);
      this.waiting.set(id, { resolve, reject: (e) => { clearTimeout(timer); this.waiting.delete(id); reject(e); },
        timer });
    });
    this.runtime.call("tilemesh.runtime.peer", "start_frame", [id, frame, FRAME_SIZE, FRAME_SIZE], [frame.buffer])
      .then((res) => this._handle(res))
      .catch((err) => { const w = this.waiting.get(id); if (w) w.reject(err); });
    const plan = this.plan;
    return result.then((r) => ({ ...r, parts: this.parts, plan }));
  }
}
