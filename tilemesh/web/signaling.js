// Browser client of the signaling protocol (server/protocol.py documents the wire format): join a room, keep the
// socket alive with pings, reconnect and resume after a drop, and turn server messages into DOM events.
//
//   const sig = new SignalingClient({ room, name: "Phone 3f2a", kind: "phone" });
//   sig.on("roster", ({ peers }) => ...);               // every roster change (also fired from welcome)
//   sig.on("signal", ({ from, data }) => ...);          // SDP / ICE from another peer
//   const welcome = await sig.connect();                // {peer_id, peers, ice_servers, resumed, ...}
//   sig.signal(peerId, { sdp }); sig.setState("ready", { progress: 1 }); sig.broadcast({ plan });
//
// Events (CustomEvent, the message in `event.detail`; `on()` passes the detail straight to the handler):
//   welcome, roster, signal, broadcast, peer_left, error, pong  - server messages, as received
//   reset    {oldPeerId, peerId}  - a reconnect could not resume: this device is a new peer, rebuild every
//                                  peer connection (the offer rule applies again: offer to all in welcome)
//   status   {status}             - "connecting" | "open" (joined) | "reconnecting" | "closed"
//   fatal    {code, message}      - the room is gone or full; no more reconnects
//
// Offer rule: after a fresh (not resumed) welcome, offer to every peer in welcome.peers except yourself;
// answer offers from anyone else. Messages sent while reconnecting are buffered (bounded) and sent once the
// peer is resumed; after a reset they are dropped, except the last state, which is re-sent.

export const PROTOCOL_VERSION = 1;
const BUFFER_LIMIT = 256;
const FATAL_JOIN_ERRORS = new Set(["unknown_room", "room_full", "server_full", "bad_version", "invalid_field"]);
const CLOSE_REPLACED = 4000;

export function defaultSignalingUrl(loc = location) {
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

export class SignalingClient extends EventTarget {
  constructor({ room, name = "", kind = "laptop", url = defaultSignalingUrl(), maxBackoffMs = 5000 } = {}) {
    super();
    this.room = room;
    this.name = name;
    this.kind = kind;
    this.url = url;
    this.maxBackoffMs = maxBackoffMs;
    this.peerId = null;
    this.resumeToken = null;
    this.iceServers = [];
    this.peers = [];
    this.status = "idle";
    this.heartbeatSec = 2;
    this.ws = null;
    this.joined = false;
    this.stopped = false;
    this.buffer = [];
    this.lastState = null;
    this.attempt = 0;
    this.lastHeard = 0;
    this.timer = null;
    this.retryTimer = null;
    this._onVisible = () => {
      if (document.visibilityState === "visible" && this.status === "reconnecting") this._reconnectNow();
    };
    this._onOnline = () => { if (this.status === "reconnecting") this._reconnectNow(); };
  }

  // Subscribe; returns the unsubscribe function.
  on(type, handler) {
    const listener = (event) => handler(event.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  // Resolves with the next event of `type` whose detail passes `predicate` (tests and one-shot waits).
  waitFor(type, predicate = () => true, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { off(); reject(new Error(`timed out waiting for ${type}`)); }, timeoutMs);
      const off = this.on(type, (detail) => {
        if (!predicate(detail)) return;
        clearTimeout(timer);
        off();
        resolve(detail);
      });
    });
  }

  // Opens the socket and joins; resolves with the first welcome, rejects if the room refuses us.
  connect() {
    this.stopped = false;
    if (typeof document !== "undefined") document.addEventListener("visibilitychange", this._onVisible);
    if (typeof window !== "undefined") window.addEventListener("online", this._onOnline);
    const ready = new Promise((resolve, reject) => {
      const offs = [
        this.on("welcome", (w) => { offs.forEach((f) => f()); resolve(w); }),
        this.on("fatal", (e) => { offs.forEach((f) => f()); reject(Object.assign(new Error(e.message), e)); }),
      ];
    });
    this._open();
    return ready;
  }

  signal(to, data) { this.send("signal", { to, data }); }

  // A mesh message to the server's own edge peer (protocol: Relay): one binary frame [n][peer id][payload].
  // Returns false when the socket is not open (the caller's link treats the peer as unreachable).
  sendRelay(to, payload) {
    if (!this.joined || !this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    const id = new TextEncoder().encode(to);
    const frame = new Uint8Array(1 + id.length + payload.byteLength);
    frame[0] = id.length;
    frame.set(id, 1);
    frame.set(payload, 1 + id.length);
    this.ws.send(frame);
    return true;
  }

  // Bytes the socket has not sent yet (relay senders wait below a high-water mark).
  get bufferedAmount() { return this.ws ? this.ws.bufferedAmount : 0; }
  broadcast(data) { this.send("broadcast", { data }); }

  // Remembered, so a reconnect that comes back as a new peer reports it again.
  setState(state, { progress, detail, profile, name } = {}) {
    const msg = { state };
    if (progress !== undefined) msg.progress = Math.max(0, Math.min(1, progress));
    if (detail !== undefined) msg.detail = String(detail).slice(0, 200);
    if (profile !== undefined) msg.profile = profile;
    if (name !== undefined) { msg.name = name; this.name = name; }
    this.lastState = { ...(this.lastState || {}), ...msg };
    this.send("state", msg);
  }

  send(type, fields = {}) {
    const msg = { v: PROTOCOL_VERSION, type, ...fields };
    if (this.joined && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(msg));
      return;
    }
    if (this.stopped) return;
    if (type === "state") return;  // lastState is re-sent after the next welcome
    this.buffer.push(msg);
    if (this.buffer.length > BUFFER_LIMIT) this.buffer.shift();
  }

  // Leave the room for good (the page calls this on pagehide, so others see us go at once).
  leave() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN && this.joined) {
      this.ws.send(JSON.stringify({ v: PROTOCOL_VERSION, type: "leave" }));
    }
    this.close();
  }

  close() {
    this.stopped = true;
    this.joined = false;
    clearInterval(this.timer);
    clearTimeout(this.retryTimer);
    if (typeof document !== "undefined") document.removeEventListener("visibilitychange", this._onVisible);
    if (typeof window !== "undefined") window.removeEventListener("online", this._onOnline);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onclose = ws.onmessage = ws.onerror = null;
      try { ws.close(1000, "bye"); } catch { /* already closing */ }
    }
    this._setStatus("closed");
  }

  peer(id) { return this.peers.find((p) => p.id === id); }

  // --- internals ---------------------------------------------------------------------------------------

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this._emit("status", { status });
  }

  _open() {
    this._setStatus(this.peerId ? "reconnecting" : "connecting");
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.joined = false;
    ws.onopen = () => {
      this.lastHeard = performance.now();
      this._sendJoin();
    };
    ws.onmessage = (event) => {
      this.lastHeard = performance.now();
      if (typeof event.data !== "string") return this._relayed(new Uint8Array(event.data));
      let msg;
      try { msg = JSON.parse(event.data); } catch { return; }
      if (!msg || msg.v !== PROTOCOL_VERSION || typeof msg.type !== "string") return;
      this._handle(msg);
    };
    ws.onclose = (event) => this._dropped(ws, event.code);
    ws.onerror = () => {};  // onclose follows and decides
  }

  _relayed(bytes) {
    const n = bytes[0];
    if (!n || bytes.length < 1 + n) return;
    const from = new TextDecoder().decode(bytes.subarray(1, 1 + n));
    this._emit("relay", { from, bytes: bytes.subarray(1 + n) });
  }

  _sendJoin() {
    const join = { v: PROTOCOL_VERSION, type: "join", room: this.room, name: this.name, kind: this.kind };
    if (this.peerId && this.resumeToken) Object.assign(join, { resume: this.peerId, token: this.resumeToken });
    this.ws.send(JSON.stringify(join));
  }

  _handle(msg) {
    switch (msg.type) {
      case "welcome": return this._welcome(msg);
      case "roster":
        this.peers = msg.peers;
        break;
      case "error":
        if (msg.ref === "join" && !this.joined) return this._joinRefused(msg);
        break;
      default:
        break;
    }
    this._emit(msg.type, msg);
  }

  _welcome(msg) {
    const oldPeerId = this.peerId;
    this.peerId = msg.peer_id;
    this.resumeToken = msg.resume_token;
    this.iceServers = msg.ice_servers || [];
    this.peers = msg.peers;
    this.heartbeatSec = msg.heartbeat || 2;
    this.joined = true;
    this.attempt = 0;
    const pending = this.buffer;
    this.buffer = [];
    if (this.lastState) this.ws.send(JSON.stringify({ v: PROTOCOL_VERSION, type: "state", ...this.lastState }));
    if (msg.resumed) for (const m of pending) this.ws.send(JSON.stringify(m));
    this._startHeartbeat();
    this._setStatus("open");
    if (oldPeerId && oldPeerId !== msg.peer_id) this._emit("reset", { oldPeerId, peerId: msg.peer_id });
    this._emit("welcome", msg);
    this._emit("roster", { v: PROTOCOL_VERSION, type: "roster", peers: msg.peers });
  }

  _joinRefused(msg) {
    if (msg.code === "bad_resume") {
      // The grace period ran out: join again as a new peer on the same socket.
      this.resumeToken = null;
      this._sendJoin();
      return;
    }
    this._emit("error", msg);
    if (FATAL_JOIN_ERRORS.has(msg.code)) {
      this.close();
      this._emit("fatal", { code: msg.code, message: msg.message });
    }
  }

  _startHeartbeat() {
    clearInterval(this.timer);
    const periodMs = this.heartbeatSec * 1000;
    this.timer = setInterval(() => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
      // Three silent periods (no pong, no anything): the socket is dead even if the browser has not noticed.
      if (performance.now() - this.lastHeard > 3 * periodMs) return this._reconnectNow();
      this.ws.send(JSON.stringify({ v: PROTOCOL_VERSION, type: "ping" }));
    }, periodMs);
  }

  _dropped(ws, code) {
    if (ws !== this.ws) return;
    this.joined = false;
    clearInterval(this.timer);
    if (this.stopped) return;
    if (code === CLOSE_REPLACED) {
      // Another tab or socket took over this peer; two sockets fighting over one id would loop forever.
      this.close();
      this._emit("fatal", { code: "replaced", message: "this peer was resumed elsewhere" });
      return;
    }
    this._setStatus("reconnecting");
    // Exponential backoff with jitter so a room full of phones does not reconnect in lockstep.
    const delay = Math.min(this.maxBackoffMs, 250 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this._open(), delay);
  }

  _reconnectNow() {
    clearTimeout(this.retryTimer);
    const old = this.ws;
    if (old) {
      old.onclose = old.onmessage = old.onerror = null;
      try { old.close(); } catch { /* ignore */ }
    }
    this.ws = null;
    this.joined = false;
    clearInterval(this.timer);
    if (!this.stopped) this._open();
  }
}
