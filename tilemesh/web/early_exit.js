// Early exit on the camera phone (the page's side; the rule is tilemesh.runtime.early_exit, run in the worker by
// tilemesh.runtime.exit_bridge). Each camera frame is first classified here by a cheap pass: the served model at
// a lower input size (the model card's `early_exit.variant`, e.g. "Fast (160 px)": about half the MACs), on its
// own onnxruntime-web session. When its class scores are confident (normalized entropy at most the card's
// threshold) and name the room's latest answer (or, before the room has answered, are very confident), the
// frame's answer is the cheap pass's own, shown as such, and the room is not asked: no plan traffic for that
// frame. Otherwise the frame goes to the room at full resolution and its answer becomes the one to match.
//
//   const exit = new EarlyExit(runtime);        // from the page's model card; ?exit=1|0 pins the toggle
//   const cheap = exit.grab(video);              // the frame at the cheap pass's size (null when off)
//   const r = await exit.run(cheap);             // {exit, top, entropy, reason, exit_rate, threshold, ...}
//   if (!r.exit) exit.answered(await room.classify(frame));
import { grabFrame, sizesOf } from "/web/camera.js";
import { pageModel } from "/web/model.js";

const EXIT = "tilemesh.runtime.exit_bridge";
// Off unless asked for: measured on this machine it does not pay for itself (see the README's early-exit
// benchmark); the AR page's toggle turns it on.
export const DEFAULT_ON = false;

export class EarlyExit {
  constructor(runtime, model = pageModel()) {
    this.runtime = runtime;
    this.config = model?.early_exit ?? null;  // {variant, threshold, alone_threshold, max_run}
    this.available = Boolean(this.config && model?.variants?.[this.config.variant]);
    this.variantName = this.available ? model.variants[this.config.variant].name : "";
    const q = typeof location !== "undefined" ? new URLSearchParams(location.search) : new URLSearchParams();
    this.on = this.available && (q.has("exit") ? q.get("exit") === "1" : DEFAULT_ON);
    this.sizes = this.available ? sizesOf(this.config.variant, model) : null;
    this.canvas = null;
    this.configured = null;
    this.last = null;  // the last cheap pass's answer (counts, threshold)
  }

  async setOn(on) {
    this.on = this.available && Boolean(on);
    const box = document.getElementById("ar-exit");
    if (box) box.checked = this.on;
    if (!this.on && this.configured) {
      this.configured = null;
      await this.runtime.call(EXIT, "turn_off", []);
    }
  }

  _configure() {
    const c = this.config;
    this.configured ??= this.runtime.call(EXIT, "configure", [c.variant, c.threshold, c.alone_threshold, c.max_run]);
    return this.configured;
  }

  // The camera frame as the cheap pass sees it (the variant's crop and scale), or null when early exit is off.
  grab(video) {
    if (!this.on) return null;
    this.canvas ??= document.createElement("canvas");
    return grabFrame(video, this.canvas, this.sizes);
  }

  // The cheap pass and the exit rule on one frame: {exit, top (the cheap pass's own top-5), entropy, reason,
  // frames, exits, exit_rate, threshold, compute_ms}.
  async run(pixels) {
    await this._configure();
    const g = this.sizes.grab;
    const r = await this.runtime.call(EXIT, "cheap_pass", [pixels, g, g, 5], [pixels.buffer]);
    this.last = r;
    return r;
  }

  // The frame as the AR page shows an exit: the cheap pass's labels, this device's whole frame on the map.
  result(r) {
    return { ...r, exit: true, parts: [{ device: `this device · ${this.variantName}`, r0: 0, r1: 1, c0: 0, c1: 1 }] };
  }

  // The room answered a frame this camera did not exit: later exits must name that answer.
  async answered(result) {
    const top = result && result.top && result.top[0];
    if (!this.on || !this.configured || !top || !Number.isInteger(top.index)) return;
    this.last = { ...(this.last || {}), ...await this.runtime.call(EXIT, "room_answered", [top.index]) };
  }

  // "early exit 34% of 120 · threshold 0.10" for the AR page's stats line.
  text() {
    if (!this.on) return "";
    const r = this.last;
    if (!r || !r.frames) return ` · early exit on (threshold ${this.config.threshold})`;
    return ` · early exit ${(100 * r.exit_rate).toFixed(0)}% of ${r.frames} · threshold ${r.threshold}`;
  }
}

// The AR page's toggle ("Answer easy frames on this phone"), bound to `exit`.
export function bindExitToggle(input, exit) {
  if (!input) return;
  const row = input.closest("label") || input;
  row.hidden = !exit.available;
  input.checked = exit.on;
  input.onchange = () => exit.setOn(input.checked);
}
