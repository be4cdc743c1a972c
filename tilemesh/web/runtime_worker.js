// The peer runtime's Web Worker: boots Pyodide, loads numpy and tilemesh.runtime, then runs Python calls.
// Compute lives here so the camera and UI on the main thread stay smooth; the main thread owns the
// RTCPeerConnections (they do not exist in Workers) and hands buffers over as transferables.
import { loadPyodide } from "/static/vendor/pyodide/pyodide.mjs";
import { OrtEngine } from "/web/ort_engine.js";

let pyodide = null;
let booting = null;
let engineOptions = {};   // boot option `ort`: {threads, disabled}
let engine = null;        // OrtEngine once the model is loaded (numpy when it is not active)
const SESSION = "tilemesh.runtime.session";

function progress(stage, fraction, detail = "") {
  postMessage({ type: "progress", stage, fraction, detail });
}

// Download a file with byte progress so the first visit shows real numbers; later fetches of the same URL
// (Pyodide's own) come from the HTTP cache.
async function fetchWithProgress(url, stage, from, to) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`${url}: HTTP ${resp.status}`);
  const total = Number(resp.headers.get("Content-Length")) || 0;
  const reader = resp.body.getReader();
  const chunks = [];
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    got += value.length;
    if (total) progress(stage, from + ((to - from) * got) / total, `${(got / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB`);
  }
  const out = new Uint8Array(got);
  let off = 0;
  for (const c of chunks) { out.set(c, off); off += c.length; }
  return out;
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

// `files`: [{url, path}] fetched into Pyodide's file system after boot (the model, labels), with byte progress.
async function boot({ packages = ["numpy"], runtimeUrl = "/static/wheels/tilemesh_runtime.zip", files = [],
  ort = {} } = {}) {
  const t0 = performance.now();
  engineOptions = ort;
  const versions = await assetVersions();
  const indexURL = "/static/vendor/pyodide/";
  await fetchWithProgress(indexURL + "pyodide.asm.wasm", "download", 0, 0.3);
  // onnxruntime-web's wasm (14 MB) with the same byte progress, handed to it at load (no second fetch).
  if (!ort.disabled) {
    const wasm = "/static/vendor/ort/ort-wasm-simd-threaded.wasm";
    engineOptions = { ...ort, wasmBinary: await fetchWithProgress(versioned(wasm, versions), "download", 0.3, 0.38) };
  }
  progress("boot", 0.4, "starting Python");
  pyodide = await loadPyodide({ indexURL, fullStdLib: false });
  progress("packages", 0.5, packages.join(", "));
  await pyodide.loadPackage(packages, { messageCallback: () => {}, errorCallback: (m) => console.warn(m) });
  progress("runtime", 0.6, "tilemesh.runtime");
  const zip = await fetchWithProgress(versioned(runtimeUrl, versions), "runtime", 0.6, 0.62);
  pyodide.unpackArchive(zip, "zip", { extractDir: "/home/pyodide/lib" });
  pyodide.runPython("import sys; sys.path.insert(0, '/home/pyodide/lib')");
  for (const [i, { url, path }] of files.entries()) {
    const from = 0.62 + (0.36 * i) / files.length;
    const data = await fetchWithProgress(versioned(url, versions), "model", from, from + 0.36 / files.length);
    pyodide.FS.mkdirTree(path.slice(0, path.lastIndexOf("/")) || "/");
    pyodide.FS.writeFile(path, data);
  }
  const info = pyodide.runPython(
    "import tilemesh.runtime, numpy, sys, json; json.dumps({'runtime': tilemesh.runtime.__version__, " +
    "'numpy': numpy.__version__, 'python': sys.version.split()[0]})");
  progress("ready", 1, "");
  return { ...JSON.parse(info), pyodide: pyodide.version, bootMs: performance.now() - t0 };
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
    if (!engine || engine.modelJson !== args[0]) engine = new OrtEngine(pyodide, engineOptions);
    const info = engineOptions.disabled
      ? (engine.info = { engine: "numpy", reason: "onnxruntime-web turned off for this page (?ort=off)" })
      : await engine.init(args[0]);
    result.set("engine", pyodide.toPy(info));
    return result;
  }
  if (engine && fn === "profile") return engine.profile(result);
  return result;
}

// One message at a time, in arrival order: a call that awaits the engine must not interleave with the next one
// (Python state, and the heap views handed to onnxruntime-web, stay still while a task runs).
let queue = Promise.resolve();
onmessage = (event) => { queue = queue.then(() => handle(event)); };

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
