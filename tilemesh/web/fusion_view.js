// Multi-view fusion on the pages (protocol: `fusion`, `view`, `fused`; the rule runs on the server, in
// tilemesh.runtime.fusion). Several phones look at the same object; each classifies its own view as usual and sends
// its view's class scores once per shown frame; the server fuses the views inside the time window and tells the
// room. This module only carries messages and draws them:
//
//   const phone = new PhoneFusion({ signaling, root: arSection, el: overlayEl });  // a camera phone's AR page
//   const host = new HostFusion({ signaling, el: panelEl });                       // the host page's panel
//
// The AR loop (ar.js) dispatches `tilemesh-frame` on its root for every shown frame, with the frame's encoded
// `scores` (tilemesh.runtime.classify.answer), and `tilemesh-camera-off` when the camera closes.

const pct = (p) => `${(100 * p).toFixed(0)}%`;
const modeText = (mode) => `${mode.method === "max" ? "max" : "average"} of softmax · ${mode.window_s} s window`;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// What the room's fusion says, as data attributes tests and scripts read (`data-top1`, `data-index`,
// `data-views`: views inside the window, `data-method`).
function mark(target, fused) {
  const top = fused.top[0];
  target.dataset.top1 = top ? top.label ?? String(top.index) : "";
  target.dataset.index = top ? String(top.index) : "";
  target.dataset.views = String(fused.views.length);
  target.dataset.method = fused.method;
  target.dataset.updates = String(Number(target.dataset.updates || 0) + 1);
}

// One line per view: which phone, its own top-1, its weight in the fused label.
function viewLines(fused, me) {
  return fused.views.map((v) => {
    const li = el("li");
    li.dataset.peer = v.peer;
    li.dataset.top1 = v.label ?? String(v.index);
    li.dataset.weight = v.weight.toFixed(4);
    const who = el("b", `${v.name}${v.peer === me ? " (this)" : ""}`);
    li.append(who, ` ${v.label ?? v.index} ${pct(v.p)} · weight ${pct(v.weight)}`);
    return li;
  });
}

export class PhoneFusion {
  // `note`: an element on the join page saying the room fuses views (shown while it does).
  constructor({ signaling, root, el: box, note = null }) {
    this.signaling = signaling;
    this.root = root;
    this.el = box;
    this.note = note;
    this.mode = null;
    this.sending = false;  // this phone's view is in the fusion (it sent scores since its camera opened)
    this.sent = 0;
    signaling.on("welcome", (w) => this.setMode(w.fusion ?? null));
    signaling.on("fusion", ({ mode }) => this.setMode(mode));
    signaling.on("fused", (msg) => this.show(msg));
    root.addEventListener("tilemesh-frame", (e) => this.frame(e.detail));
    root.addEventListener("tilemesh-camera-off", () => this.stop());
  }

  setMode(mode) {
    this.mode = mode;
    if (this.note) {
      this.note.hidden = !mode;
      if (mode) this.note.textContent = `This room fuses its phones' views (${modeText(mode)}): point your camera at the same object as the others.`;
    }
    if (!mode) { this.sending = false; this.el.hidden = true; this.el.replaceChildren(); }
  }

  // A frame this phone showed: its view's scores go to the room (an early exit's cheap answer does not: its scores
  // are another model's).
  frame(detail) {
    if (!this.mode || !detail || detail.exit || typeof detail.scores !== "string") return;
    this.signaling.send("view", { scores: detail.scores, ...(Number.isInteger(detail.frame) ? { frame: detail.frame } : {}) });
    this.sending = true;
    this.sent += 1;
    this.el.dataset.sent = String(this.sent);
  }

  stop() {
    if (this.sending) this.signaling.send("view", { stop: true });
    this.sending = false;
    this.el.hidden = true;
  }

  show(fused) {
    if (!this.mode || !this.sending) return;
    mark(this.el, fused);
    const top = fused.top[0];
    const head = el("p", top ? `fused: ${top.label ?? top.index} ${pct(top.p)}` : "fused: no view in the window",
      "ar-fused-top");
    const n = fused.views.length;
    const sub = el("p", `${n} view${n === 1 ? "" : "s"} in the last ${fused.window_s} s · ${fused.method === "max" ? "max" : "average"}`,
      "ar-fused-sub");
    const list = el("ol");
    list.replaceChildren(...viewLines(fused, this.signaling.peerId));
    this.el.replaceChildren(head, sub, list);
    this.el.hidden = false;
  }
}

// The host page's panel: the room's mode (a switch and the rule), the fused label and every view's contribution.
// The controls are built once (a fused answer arrives several times a second; a picker must not be rebuilt
// under the user's finger); the results below them are redrawn.
export class HostFusion {
  constructor({ signaling, el: box }) {
    this.signaling = signaling;
    this.el = box;
    this.mode = null;
    this.fused = null;
    this.on = el("input");
    this.on.type = "checkbox";
    this.on.id = "fusion-on";
    this.method = el("select");
    this.method.id = "fusion-method";
    this.method.append(new Option("average of softmax", "avg"), new Option("max of softmax", "max"));
    this.window = el("select");
    this.window.id = "fusion-window";
    this.window.append(...[1, 2, 5, 10].map((s) => new Option(`views of the last ${s} s`, String(s))));
    this.window.value = "2";
    const toggle = el("label");
    toggle.append(this.on, " fuse the phones' views (they all look at the same object) ");
    const controls = el("p");
    controls.append(toggle, this.method, " ", this.window);
    this.results = el("div");
    box.replaceChildren(controls, this.results);
    const mode = () => ({ method: this.method.value, window_s: Number(this.window.value) });
    this.on.onchange = () => this.request(this.on.checked ? mode() : null);
    this.method.onchange = () => this.request(mode());
    this.window.onchange = () => this.request(mode());
    signaling.on("welcome", (w) => this.setMode(w.fusion ?? null));
    signaling.on("fusion", ({ mode }) => this.setMode(mode));
    signaling.on("fused", (msg) => { this.fused = msg; this.render(); });
    this.setMode(null);
  }

  setMode(mode) {
    this.mode = mode;
    if (!mode) this.fused = null;
    this.on.checked = Boolean(mode);
    this.method.disabled = this.window.disabled = !mode;
    if (mode) {
      this.method.value = mode.method;
      const w = String(mode.window_s);
      if (![...this.window.options].some((o) => o.value === w)) this.window.append(new Option(`views of the last ${w} s`, w));
      this.window.value = w;
    }
    this.render();
  }

  // Turn fusion on or off, or change the rule (the server answers everyone with `fusion`).
  request(mode) { this.signaling.send("fusion", { mode }); }

  render() {
    const box = this.el;
    box.dataset.mode = this.mode ? this.mode.method : "off";
    if (!this.mode) {
      Object.assign(box.dataset, { top1: "", index: "", views: "0" });
      this.results.replaceChildren(el("p", "Off: each camera phone shows its own answer.", "hint"));
      return;
    }
    const fused = this.fused;
    const top = fused && fused.top[0];
    if (fused) mark(box, fused);
    else Object.assign(box.dataset, { top1: "", index: "", views: "0" });
    const label = el("p", top ? `${top.label ?? top.index} ${pct(top.p)}` : "waiting for a camera phone…", "fused-label");
    label.id = "fusion-label";
    const n = fused ? fused.views.length : 0;
    const sub = el("p", `${n} view${n === 1 ? "" : "s"} inside the window · ${modeText(this.mode)}`, "hint");
    const list = el("ol");
    list.id = "fusion-views";
    if (fused) list.replaceChildren(...viewLines(fused, null));
    this.results.replaceChildren(label, sub, list);
  }
}
