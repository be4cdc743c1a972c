// The peer runtime's Web Worker: boots Pyodide, loads numpy and tilemesh.runtime, then runs Python calls.
// Compute lives here so the camera and UI on the main thread stay smooth; the main thread owns the
// RTCPeerConnections (they do not exist in Workers) and hands buffers over as transferables.
import { loadPyodide } from "/static/vendor/pyodide/pyodide.mjs";
import { OrtEngine, preloadOrt } from "/web/ort_engine.js";

let pyodide = null;
let booting = null;
let engineOptions = {};   // boot option `ort`: {threads, disabled}
let engine = null;        // OrtEngine once the model is loaded (numpy when it is not active)
const SESSION = "tilemesh.runtime.session";
// The model files the early onnxruntime-web session needs (runtime.js MODEL_FILES).
const WHOLE_PATH = "/model/whole.onnx";
const BLOB_PATH = "/model/graph.bin";

function progress(stage, fraction, detail = "") {
  postMessage({ type: "progress", stage, fraction, detail });
}

// Downloads with byte progress, all at once, as one truthful bar: the bytes received over the bytes announced
// (shown once every download started has announced its size). The bar moves with the bytes until Python
// starts booting (`stop()`); downloads still running after that keep their bytes in the step's text ("starting
// Python · 21.3 / 38.6 MB"), so the bar never goes back. Later fetches of the same URLs (Pyodide's own fetch of
// its wasm) come from the HTTP cache.
class Downloads {
  constructor(from, to) {
    Object.assign(this, { from, to, got: 0, total: 0, step: null, asking: 0 });
  }

  bytes() { return `${(this.got / 1e6).toFixed(1)} / ${(this.total / 1e6).toFixed(1)} MB`; }

  // From now on the bar belongs to `stage` at `fraction`; bytes still coming show in its text.
  stop(stage, fraction, detail) {
    this.step = { stage, fraction, detail };
    this._report();
  }

  _report() {
    if (this.step) {
      const { stage, fraction, detail } = this.step;
      const pending = this.got < this.total;
      progress(stage, fraction, pending ? `${detail} · ${this.bytes()}` : detail);
    } else if (this.total && !this.asking) {  // every size is known: the bar never goes back
      progress("download", this.from + ((this.to - this.from) * this.got) / this.total, this.bytes());
    }
  }

  async fetch(url) {
    this.asking++;
    let resp;
    try { resp = await fetch(url); } finally { this.asking--; }
    if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
    const size = Number(resp.headers.get("Content-Length")) || 0;
    this.total += size;
    const reader = resp.body.getReader();
    const chunks = [];
    let got = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      got += value.length;
      this.got += value.length;
      if (!size) this.total += value.length;  // no Content-Length: counted as it comes
      this._report();
    }
    const out = new Uint8Array(got);
    let off = 0;
    for (const c of chunks) { out.set(c, off); off += c.length; }
    return out;
  }
}

// Versioned URLs (?v=<sha256 prefix> from the setup manifest) let the browser cache assets forever yet never run
// a stale tilemesh.runtime after an update.
async function assetVersions() {
  try {
    const resp = await fetch("/static/manifest.json", { cache: "no-cache" });
    const manifest = await resp.json();
    const versions = {};
    for (const group of Object.values(manifest)) {
      for (const [name, sha] of Object.entries(group.files || {})) versions[name] = sha.slice(0, 16);
    }
    return versions;
  } catch {
    return {};
  }
}

function versioned(url, versions) {
  const v = versions[url.slice(url.lastIndexOf("/") + 1)];
  return v ? `${url}?v=${v}` : url;
}

const marks = {};  // ms since the worker started, per boot step (join_ready prints them)
const mark = (name) => { marks[name] = Math.round(performance.now()); };

// `files`: [{url, path}] fetched into Pyodide's file system after boot (the model, labels). Everything downloads
// at once with one progress bar. onnxruntime-web starts as soon as its wasm and the model's whole-graph ONNX and
// weights are here (`preloadOrt`: module, wasm instance, the whole-model session), while Pyodide boots; the engine
// adopts that session when Python loads the model.
async function boot({ packages = ["numpy"], runtimeUrl = "/static/wheels/tilemesh_runtime.zip", files = [],
  ort = {} } = {}) {
  const t0 = performance.now();
  engineOptions = ort;
  const versions = await assetVersions();
  const indexURL = "/static/vendor/pyodide/";
  const dl = new Downloads(0, 0.4);
  const pyWasm = dl.fetch(indexURL + "pyodide.asm.wasm");
  const ortWasm = ort.disabled ? null : dl.fetch(versioned("/static/vendor/ort/ort-wasm-simd-threaded.wasm", versions));
  const fileData = files.map(({ url }) => dl.fetch(versioned(url, versions)));
  const byPath = Object.fromEntries(files.map(({ path }, i) => [path, fileData[i]]));
  if (ortWasm && byPath[WHOLE_PATH] && byPath[BLOB_PATH]) {
    engineOptions = { ...ort, preloaded: (async () => {
      const [wasmBinary, model, blob] = await Promise.all([ortWasm, byPath[WHOLE_PATH], byPath[BLOB_PATH]]);
      mark("downloads_for_ort");
      const pre = await preloadOrt({ ...ort, wasmBinary, model, blob });
      mark("ort_session");
      return pre;
    })() };
    engineOptions.preloaded.catch((err) => console.warn("tilemesh: onnxruntime-web preload failed", err));
  }
  await pyWasm;
  mark("pyodide_wasm");
  dl.stop("boot", 0.45, "starting Python");
  pyodide = await loadPyodide({ indexURL, fullStdLib: false });
  mark("python");
  dl.stop("packages", 0.6, packages.join(", "));
  await pyodide.loadPackage(packages, { messageCallback: () => {}, errorCallback: (m) => console.warn(m) });
  mark("packages");
  dl.stop("runtime", 0.75, "tilemesh.runtime");
  const zip = await dl.fetch(versioned(runtimeUrl, versions));
  pyodide.unpackArchive(zip, "zip", { extractDir: "/home/pyodide/lib" });
  pyodide.runPython("import sys; sys.path.insert(0, '/home/pyodide/lib')");
  dl.stop("model", 0.85, "the model's files");
  for (const [i, { path }] of files.entries()) {
    const data = await fileData[i];
    pyodide.FS.mkdirTree(path.slice(0, path.lastIndexOf("/")) || "/");
    pyodide.FS.writeFile(path, data);
  }
  mark("files");
  if (ortWasm) engineOptions.wasmBinary = await ortWasm;  // the engine's fallback path loads it again
  const info = pyodide.runPython(
    "import tilemesh.runtime, numpy, sys, json; json.dumps({'runtime': tilemesh.runtime.__version__, " +
    "'numpy': numpy.__version__, 'python': sys.version.split()[0]})");
  progress("ready", 1, "");
  mark("booted");
  return { ...JSON.parse(info), pyodide: pyodide.version, bootMs: performance.now() - t0, marks: { ...marks } };
}

// Arguments cross into Python with toPy (TypedArrays become memoryviews, objects dicts); results come back as
// plain JS (bytes-like -> Uint8Array, transferred). Python functions called here stay free of browser imports.
function toJs(value) {
  if (value === undefined || value === null || typeof value !== "object" || !value.toJs) return value;
  try {
    if (value.type === "bytes" || value.type === "bytearray" || value.type === "memoryview") {
      const buf = value.getBuffer("u8");
      try { return new Uint8Array(buf.data); } finally { buf.release(); }
    }
    return value.toJs({ dict_converter: Object.fromEntries, create_pyproxies: false });
  } finally {
    value.destroy();
  }
}

function collectTransfer(value, out = []) {
  if (value instanceof Uint8Array || ArrayBuffer.isView(value)) out.push(value.buffer);
  else if (Array.isArray(value)) value.forEach((v) => collectTransfer(v, out));
  else if (value && typeof value === "object") Object.values(value).forEach((v) => collectTransfer(v, out));
  return out;
}

async function call({ module, fn, args = [] }) {
  if (!pyodide) throw new Error("runtime not booted");
  const mod = pyodide.pyimport(module);
  try {
    const pyArgs = args.map((a) => (a !== null && typeof a === "object" ? pyodide.toPy(a) : a));
    try {
      if (module === SESSION && fn === "classify_local" && engine && engine.active) {
        return toJs(await engine.classifyLocal(pyArgs, args));
      }
      // The early exit's cheap pass on onnxruntime-web (numpy otherwise: exit_bridge.cheap_pass itself).
      if (module === "tilemesh.runtime.exit_bridge" && fn === "cheap_pass" && engine && engine.active) {
        return toJs(await engine.cheapPass(pyArgs, args));
      }
      // Session events go through the engine: its compute requests run here before the effects leave.
      if (module === SESSION && fn === "handle" && engine) return toJs(await engine.handle(pyArgs));
      if (module === SESSION && fn === "profile") return toJs(await profile(mod, args[0] || {}));
      let result = mod[fn](...pyArgs);
      if (result && typeof result.then === "function") result = await result;
      if (module === SESSION) result = await afterSessionCall(fn, args, result);
      return toJs(result);
    } finally {
      pyArgs.forEach((a) => a && a.destroy && a.destroy());
    }
  } finally {
    mod.destroy();
  }
}

// The compute engine around the peer's calls: loaded with the model, sessions made when a plan is adopted, and
// every `compute` request of a reply run before the reply leaves the worker.
async function afterSessionCall(fn, args, result) {
  if (fn === "load") {
    // A second load (the /ar overlay inside a room) makes a fresh Python peer: rebind it to the same engine.
    if (!engine || engine.modelJson !== args[0]) {
      engine = new OrtEngine(pyodide, engineOptions);
      engine.shouldYield = () => waiting > 0;
    }
    const info = engineOptions.disabled
      ? (engine.info = { engine: "numpy", reason: "onnxruntime-web turned off for this page (?ort=off)" })
      : await engine.init(args[0]);
    result.set("engine", pyodide.toPy(info));
    return result;
  }
  return result;
}

// The device's profile (`opts` from the page: {trial}: choose onnxruntime-web's thread count first, if not yet).
// Python measures what only it does (the camera's per-frame work) and numpy's profile only when this device has
// no faster engine (or onnxruntime-web failing), or when `numpy` asks for it; the engine measures itself.
// `background`: a refinement that stops (null) as soon as another message waits for this worker.
async function profile(mod, { trial = false, numpy = false, background = false } = {}) {
  if (background && waiting > 0) return null;  // frames are waiting: not even Python's part now
  const withEngine = engine && engine.whole && !engineOptions.disabled;
  let result = mod.profile(!withEngine || numpy);
  if (!withEngine) {
    if (engine) result.set("engine_reason", engine.info.reason);  // why numpy (the roster says it)
    return result;
  }
  const pyResult = result;
  result = await engine.profile(result, 0.3, { trial, background });
  if (result === null) { pyResult.destroy(); return null; }
  if (!result.has("sec_per_mac")) {  // the engine failed while profiling: numpy's profile after all
    result.destroy();
    result = mod.profile(true);
    result.set("engine_reason", engine.info.reason);
  }
  return result;
}

// One message at a time, in arrival order: a call that awaits the engine must not interleave with the next one
// (Python state, and the heap views handed to onnxruntime-web, stay still while a task runs).
let queue = Promise.resolve();
let waiting = 0;  // messages queued behind the one being handled (background measurements give way to them)
onmessage = (event) => {
  waiting++;
  queue = queue.then(() => { waiting--; return handle(event); });
};

async function handle(event) {
  const { id, cmd } = event.data;
  try {
    let value;
    if (cmd === "boot") value = await (booting ??= boot(event.data.options));
    else if (cmd === "call") value = await call(event.data);
    else if (cmd === "exec") value = toJs(await pyodide.runPythonAsync(event.data.code));
    else throw new Error(`unknown command ${cmd}`);
    postMessage({ type: "result", id, value }, collectTransfer(value));
  } catch (err) {
    postMessage({ type: "error", id, message: String(err && err.message ? err.message : err) });
  }
}
