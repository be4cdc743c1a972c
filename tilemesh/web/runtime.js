// Main-thread handle on the peer runtime Worker: boot with progress, then call Python functions by name.
//
//   const rt = new PeerRuntime({ onProgress: (stage, fraction, detail) => ... });
//   const info = await rt.boot();                       // {runtime, numpy, python, pyodide, bootMs}
//   await rt.boot({ files: MODEL_FILES });             // the served model into the worker's file system
//   await rt.ready;                                     // resolves once a boot() (anyone's) has finished
//   const out = await rt.call("tilemesh.runtime.session", "classify_local", [rgba, 256, 256, 5], [rgba.buffer]);
import { pageModel } from "/web/model.js";

// The served model's files (whatever `tilemesh serve --model` serves, under fixed names), fetched into the
// worker's file system at boot (tilemesh.runtime.session.load reads them); each variant of the model (e.g. heavy
// mode) adds its topology file, a few tens of KB: it shares graph.bin.
export const MODEL_FILES = [
  { url: "/model/graph.json", path: "/model/graph.json" },
  { url: "/model/graph.bin", path: "/model/graph.bin" },
  { url: "/model/labels.json", path: "/model/labels.json" },
  { url: "/model/card.json", path: "/model/card.json" },
  // the whole graph as ONNX over graph.bin's weights: onnxruntime-web's session is made from it while Python boots
  { url: "/model/whole.onnx", path: "/model/whole.onnx" },
  ...Object.values(pageModel()?.variants ?? {}).map(({ file }) => ({ url: `/model/${file}`, path: `/model/${file}` })),
];

export function engineOptionsFromUrl(search = self.location ? self.location.search : "") {
  const q = new URLSearchParams(search);
  const threads = Number(q.get("ort_threads")) || undefined;
  const ep = ["wasm", "webgpu"].includes(q.get("ort_ep")) ? q.get("ort_ep") : undefined;
  return { disabled: q.get("ort") === "off", threads, ep };
}

export class PeerRuntime {
  constructor({ onProgress = () => {}, workerUrl = "/web/runtime_worker.js" } = {}) {
    this.worker = new Worker(workerUrl, { type: "module" });
    this.pending = new Map();
    this.nextId = 1;
    this.onProgress = onProgress;
    this.ready = new Promise((resolve) => { this._booted = resolve; });
    this.worker.onmessage = (event) => this._onMessage(event.data);
    this.worker.onerror = (event) => {
      const err = new Error(`runtime worker failed: ${event.message || "load error"}`);
      for (const { reject } of this.pending.values()) reject(err);
      this.pending.clear();
    };
  }

  _onMessage(msg) {
    if (msg.type === "progress") return this.onProgress(msg.stage, msg.fraction, msg.detail);
    const entry = this.pending.get(msg.id);
    if (!entry) return;
    this.pending.delete(msg.id);
    if (msg.type === "result") entry.resolve(msg.value);
    else entry.reject(new Error(msg.message));
  }

  _send(payload, transfer = []) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, ...payload }, transfer);
    });
  }

  // `options.ort` ({threads, disabled}) defaults to the page's query: `?ort=off` computes with numpy only,
  // `?ort_threads=N` fixes onnxruntime-web's thread count (default min(4, cores) when cross-origin isolated).
  boot(options = {}) {
    const booting = this._send({ cmd: "boot", options: { ort: engineOptionsFromUrl(), ...options } });
    booting.then(this._booted, () => {});
    return booting;
  }
  call(module, fn, args = [], transfer = []) { return this._send({ cmd: "call", module, fn, args }, transfer); }
  exec(code) { return this._send({ cmd: "exec", code }); }
  terminate() { this.worker.terminate(); }
}

// A progress bar bound to an element holding <progress> and a label; shared by every page that boots.
export function bindProgress(root) {
  const bar = root.querySelector("progress");
  const label = root.querySelector(".label");
  return (stage, fraction, detail) => {
    bar.value = fraction;
    label.textContent = `${stage}${detail ? ": " + detail : ""}`;
    root.dataset.stage = stage;
    // Once booted the bar has nothing left to say; the roster shows the device's state from then on.
    if (stage === "ready") setTimeout(() => root.classList.add("done"), 1500);
  };
}
