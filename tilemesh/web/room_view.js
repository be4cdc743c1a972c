// The room as the host and the phones see it: a live roster (name, device kind, state, a progress bar while
// booting), and `enterRoom()`, the glue both pages share: join over signaling, boot this device's runtime,
// report progress, leave on pagehide. Tests reach everything through `window.tilemesh`. Ready devices show
// their measured speed (effective GFLOP/s on the demo model) and the links they measured to the others.
import { SignalingClient } from "/web/signaling.js";
import { PeerRuntime, bindProgress, MODEL_FILES, engineOptionsFromUrl } from "/web/runtime.js";
import { Mesh } from "/web/mesh.js";
import { RoomEngine, rememberedThreads } from "/web/room_engine.js";
import { effectiveGflops, modelSeconds, fmtMs } from "/web/host_view.js";
import { pageModel } from "/web/model.js";

const STYLE = `
.roster { list-style: none; padding: 0; margin: .5rem 0; display: grid; gap: .4rem; }
.peer { display: grid; grid-template-columns: 1fr auto; gap: .1rem .75rem; padding: .5rem .75rem;
  border: 1px solid color-mix(in srgb, currentColor 20%, transparent); border-radius: .5rem; }
.peer .name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.peer .kind, .peer .detail { font-size: .8rem; opacity: .7; }
.peer .state { justify-self: end; font-size: .85rem; }
.peer progress { grid-column: 1 / -1; width: 100%; height: .5rem; accent-color: var(--accent, #2a7de1); }
.peer[data-state="ready"] .state { color: #1a8f3c; }
.peer[data-state="busy"] .state { color: #c47f00; }
.peer[data-state="gone"], .peer[data-connected="false"] { opacity: .5; }
.peer.self { border-color: var(--accent, #2a7de1); }
.peer[data-colour] { border-left: .35rem solid var(--device); }
.peer .speed, .peer .links { grid-column: 1 / -1; font-size: .8rem; font-variant-numeric: tabular-nums; }
.peer .speed b { font-weight: 700; }
.peer .links { display: flex; flex-wrap: wrap; gap: .15rem .8rem; opacity: .8; }
.peer .links:empty, .peer .speed:empty { display: none; }
.peer .link { white-space: nowrap; }
`;

let styled = false;
function addStyle() {
  if (styled) return;
  styled = true;
  const sheet = new CSSStyleSheet();
  sheet.replaceSync(STYLE);
  document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
}

const KIND_LABEL = { phone: "phone", laptop: "laptop", edge: "edge server" };

// Renders roster entries into `root` (a <ul>), keyed by peer id so rows update in place.
// The engine's thread count, and when it was chosen by measurement the times that chose it ("1 thread: 52 ms
// vs 2: 120 ms"): a browser whose quota or slow cores make threads a loss says so.
function threadsText(compute) {
  const t = Number(compute.threads);
  if (!t) return "";
  const trial = compute.thread_trial_ms && typeof compute.thread_trial_ms === "object" ? compute.thread_trial_ms : null;
  const other = trial ? Object.entries(trial).find(([k]) => Number(k) !== t) : null;
  const mine = trial ? trial[String(t)] : null;
  return ` · ${t} thread${t > 1 ? "s" : ""}` +
    (other && Number.isFinite(mine) ? ` (${fmtMs(mine)} vs ${fmtMs(other[1])} on ${other[0]})` : "");
}

export class RoomView {
  constructor(root, { goneMs = 1500 } = {}) {
    addStyle();
    this.root = root;
    this.root.classList.add("roster");
    this.goneMs = goneMs;
    this.selfId = null;
    this.rows = new Map();
    this.peers = [];
    this.colours = new Map();  // device -> colour of the current plan (the host's charts and the AR map)
  }

  // Colours of the room's current plan, so a roster row matches its bars in the host's charts.
  setColours(colours) {
    this.colours = new Map(colours);
    for (const [id, row] of this.rows) this._colour(row, id);
  }

  _colour(row, id) {
    const c = this.colours.get(id);
    if (c) {
      row.li.dataset.colour = c;
      row.li.style.setProperty("--device", c);
    } else {
      delete row.li.dataset.colour;
      row.li.style.removeProperty("--device");
    }
  }

  update(peers, selfId = this.selfId) {
    this.selfId = selfId;
    this.peers = peers;
    const seen = new Set();
    for (const peer of peers) {
      seen.add(peer.id);
      let row = this.rows.get(peer.id);
      if (!row) {
        row = this._makeRow(peer.id);
        this.rows.set(peer.id, row);
        this.root.append(row.li);
      }
      this._fill(row, peer);
    }
    for (const id of this.rows.keys()) if (!seen.has(id)) this.markGone(id);
    this.root.dataset.count = String(seen.size);
  }

  // A departed peer stays visible for a moment as "gone", so people see who dropped instead of a jump.
  markGone(id) {
    const row = this.rows.get(id);
    if (!row || row.li.dataset.state === "gone") return;
    row.li.dataset.state = "gone";
    row.state.textContent = "gone";
    row.bar.hidden = true;
    setTimeout(() => {
      if (this.rows.get(id) === row && row.li.dataset.state === "gone") {
        row.li.remove();
        this.rows.delete(id);
      }
    }, this.goneMs);
  }

  _makeRow(id) {
    const li = document.createElement("li");
    li.className = "peer";
    li.dataset.peerId = id;
    const name = document.createElement("span");
    name.className = "name";
    const state = document.createElement("span");
    state.className = "state";
    const kind = document.createElement("span");
    kind.className = "kind";
    const detail = document.createElement("span");
    detail.className = "detail";
    const bar = document.createElement("progress");
    bar.max = 1;
    const speed = document.createElement("span");
    speed.className = "speed";
    const links = document.createElement("span");
    links.className = "links";
    li.append(name, state, kind, detail, bar, speed, links);
    return { li, name, state, kind, detail, bar, speed, links };
  }

  _fill(row, peer) {
    const isSelf = peer.id === this.selfId;
    row.li.classList.toggle("self", isSelf);
    row.li.dataset.kind = peer.kind;
    row.li.dataset.state = peer.state;
    row.li.dataset.connected = String(peer.connected !== false);
    // textContent, never innerHTML: names come from other people's devices.
    row.name.textContent = peer.name + (isSelf ? " (this device)" : "");
    row.kind.textContent = KIND_LABEL[peer.kind] || peer.kind;
    row.state.textContent = peer.connected === false ? "reconnecting…" : peer.state;
    // A ready device may still be refining what it measured while the room was booting (its speed, links).
    row.detail.textContent = peer.state === "booting" ? peer.detail || ""
      : peer.detail === "refining" ? "refining its measurements…" : "";
    row.li.dataset.refining = String(peer.state !== "booting" && peer.detail === "refining");
    row.bar.hidden = peer.state !== "booting";
    row.bar.value = peer.progress || 0;
    this._colour(row, peer.id);
    this._fillProfile(row, peer);
  }

  // Speed and links once the device has measured them (profile.compute, profile.links); links only to peers
  // still in the room, named, since ids mean nothing to people.
  _fillProfile(row, peer) {
    const profile = peer.profile && typeof peer.profile === "object" ? peer.profile : {};
    const gflops = peer.state === "gone" ? null : effectiveGflops(profile.compute);
    if (gflops === null) {
      row.speed.replaceChildren();
      delete row.li.dataset.gflops;
    } else {
      const b = document.createElement("b");
      b.textContent = `${gflops >= 10 ? gflops.toFixed(0) : gflops.toFixed(1)} GFLOP/s`;
      // Which engine computes here (numpy, ort-wasm, native onnxruntime on the edge) and why, e.g. no threads.
      const backend = String(profile.compute.backend || "numpy");
      // A device on a slower path than it could have says why (no onnxruntime-web, or no threads without
      // cross-origin isolation), in the roster line itself.
      const reason = String(profile.compute.engine_reason || "");
      const slower = backend === "numpy" || reason.includes("no threads");
      row.speed.replaceChildren(b,
        ` · ${pageModel()?.name ?? "the model"} alone in ${fmtMs(modelSeconds(profile.compute) * 1e3)}`,
        ` · ${backend}`, threadsText(profile.compute), slower && reason ? ` (${reason})` : "",
        // The server's own edge is reached through the signaling socket, not WebRTC (protocol: Relay).
        peer.relay ? " · via the server's socket" : "");
      row.speed.title = "effective speed on the served model, predicted from this device's measured profile" +
        (profile.compute.engine_reason ? `; ${profile.compute.engine_reason}` : "");
      row.li.dataset.gflops = gflops.toPrecision(6);
      row.li.dataset.backend = backend;
      row.li.dataset.relay = peer.relay ? "1" : "0";
    }
    const names = new Map(this.peers.map((p) => [p.id, p.name]));
    const links = Object.entries(profile.links && typeof profile.links === "object" ? profile.links : {})
      .filter(([id, l]) => names.has(id) && l && Number.isFinite(l.rtt_ms) && Number.isFinite(l.mbps));
    row.links.replaceChildren(...links.map(([id, l]) => {
      const span = document.createElement("span");
      span.className = "link";
      span.dataset.peer = id;
      const mbps = l.mbps >= 10 ? l.mbps.toFixed(0) : l.mbps.toFixed(1);
      span.textContent = `↔ ${names.get(id)} ${fmtMs(l.rtt_ms)} · ${mbps} Mbit/s`;
      span.title = `round trip ${l.rtt_ms} ms and throughput ${l.mbps} Mbit/s, measured by ${peer.name}`;
      return span;
    }));
  }
}

// Sends at most one progress update per `intervalMs` (the download stage reports every chunk, which would
// run into the server's rate limit), but always the last one and every stage change.
function throttledProgress(signaling, intervalMs = 250) {
  let last = 0;
  let lastStage = null;
  let timer = null;
  let pending = null;
  const flush = () => {
    timer = null;
    last = performance.now();
    signaling.setState("booting", pending);
  };
  return (stage, fraction, detail) => {
    pending = { progress: fraction, detail: detail ? `${stage}: ${detail}` : stage };
    if (stage !== lastStage || performance.now() - last >= intervalMs) {
      lastStage = stage;
      clearTimeout(timer);
      flush();
    } else if (!timer) {
      timer = setTimeout(flush, intervalMs);
    }
  };
}

function deviceProfile(info) {
  return {
    cores: navigator.hardwareConcurrency || null,
    memory_gb: navigator.deviceMemory || null,
    user_agent: navigator.userAgent,
    cross_origin_isolated: self.crossOriginIsolated === true,
    runtime: info ? { tilemesh: info.runtime, numpy: info.numpy, pyodide: info.pyodide, boot_ms: info.bootMs }
      : null,
  };
}

// Join `room`, render its roster into `rosterEl`, boot the runtime with progress in `bootEl`, report it.
export async function enterRoom({ room, name, kind, rosterEl, bootEl, statusEl }) {
  const signaling = new SignalingClient({ room, name, kind });
  const view = new RoomView(rosterEl);
  const app = Object.assign(window.tilemesh || {}, { signaling, runtime: null, view, room, bootInfo: null });
  window.tilemesh = app;
  Object.defineProperty(app, "peerId", { get: () => signaling.peerId, configurable: true });

  const showStatus = (text, status) => {
    if (!statusEl) return;
    statusEl.textContent = text;
    statusEl.dataset.status = status;
  };
  signaling.on("roster", ({ peers }) => view.update(peers, signaling.peerId));
  signaling.on("peer_left", ({ id }) => view.markGone(id));
  signaling.on("status", ({ status }) => showStatus(
    { connecting: "connecting…", open: "connected", reconnecting: "reconnecting…", closed: "disconnected" }[status]
      || status, status));
  signaling.on("fatal", ({ message }) => showStatus(message, "fatal"));
  signaling.on("error", (e) => console.warn("signaling error", e.code, e.message));

  // pagehide (not unload) is what mobile browsers reliably fire when a tab closes or is swiped away.
  addEventListener("pagehide", () => { if (app.mesh) app.mesh.close(); signaling.leave(); });
  // Back from the back/forward cache: we left on pagehide, so join again (as a new peer).
  addEventListener("pageshow", (event) => { if (event.persisted) signaling.connect().catch(() => {}); });

  const report = throttledProgress(signaling);
  const showBoot = bootEl ? bindProgress(bootEl) : () => {};
  // The mesh exists before the socket opens so that it offers to everyone listed in the welcome.
  const mesh = new Mesh(signaling, { leaveOnPagehide: false });
  const runtime = new PeerRuntime({ onProgress: (stage, fraction, detail) => {
    showBoot(stage, fraction, detail);
    if (stage !== "ready") report(stage, fraction, detail);
  } });
  app.runtime = runtime;
  app.mesh = mesh;
  app.engine = new RoomEngine({ runtime, signaling, mesh });
  signaling.setState("booting", { progress: 0, detail: "starting", profile: deviceProfile(null) });

  // Joining and booting run side by side: the roster shows this device while its runtime downloads.
  app.joined = signaling.connect().catch((err) => { showStatus(err.message, "fatal"); return null; });
  try {
    // A room device joins on onnxruntime-web's remembered thread count, or on the default one and chooses it by
    // measurement once the room has settled (RoomEngine's refinement), not while it joins.
    const remembered = rememberedThreads();
    const ort = { ...engineOptionsFromUrl(), deferTrial: true,
      ...(remembered ? { cachedThreads: remembered.threads, cachedTrial: remembered.trial } : {}) };
    const info = await runtime.boot({ files: MODEL_FILES, ort });
    app.bootInfo = info;
    signaling.setState("booting", { progress: 1, detail: "measuring speed", profile: deviceProfile(info) });
    await app.joined;
    await app.engine.measure();
    signaling.setState("ready", { progress: 1, detail: app.engine.refining.length ? "refining" : "" });
  } catch (err) {
    if (bootEl) bootEl.dataset.stage = "error";
    signaling.setState("booting", { detail: `runtime failed: ${err.message}` });
    console.error(err);
  }
  return app;
}
