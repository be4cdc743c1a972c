// A full mesh of WebRTC data channels among the peers of a room, over the signaling client (web/signaling.js).
//
//   const mesh = new Mesh(signaling, { onMessage(fromPeer, bytes) {...}, onPeer(peerId, state) {...} });
//   await signaling.connect();                  // create the Mesh first: it offers from the welcome
//   await mesh.waitOpen(peerId);
//   await mesh.send(peerId, uint8array);        // at most mesh.maxMessageSize(peerId) bytes
//   await mesh.sendChunks(peerId, joined);      // the bytes of tilemesh.runtime.wire.encode_joined(...)
//
// Conventions shared with tilemesh/edge (the aiortc side):
// - the newcomer offers to every peer in its welcome; existing peers answer (the signaling offer rule);
// - one ordered binary channel per pair, pre-negotiated with id 0, so both ends have it before connecting;
// - signal data: {kind: "offer"|"answer", sdp} | {kind: "candidate", candidate, sdpMid, sdpMLineIndex} | {kind: "bye"}
//   | {kind: "hello"} (asks the receiver to offer anew: sent by a mesh created after its page joined);
// - a message is at most the remote's SCTP maxMessageSize (64 KiB to aiortc, 256 KiB between Chromiums):
//   larger sends throw in the browser, so tensors are chunked by tilemesh.runtime.wire for each receiver;
// - sends wait below a high-water mark of buffered bytes (bufferedAmountLowThreshold), so a fast producer
//   never piles megabytes into the channel; sends to one peer go out in call order.
//
// Peer states reported through onPeer and the "peer" event: "connecting", "open", "gone". A peer is gone when
// the server says it left, its channel closes or its connection fails: pending sends to it reject with a
// PeerGoneError. On pagehide the mesh closes every connection and leaves the room, so others see it at once.

export class PeerGoneError extends Error {
  constructor(peerId, reason = "gone") {
    super(`peer ${peerId} is gone (${reason})`);
    this.name = "PeerGoneError";
    this.peerId = peerId;
  }
}

const CHANNEL_ID = 0;
// Chromium refuses single sends above this whatever the remote advertises; RFC 8841's default is 64 KiB.
const BROWSER_MAX_MESSAGE = 262144;
const DEFAULT_MAX_MESSAGE = 65536;

class Link {
  constructor(mesh, remote) {
    this.mesh = mesh;
    this.remote = remote;
    this.state = "new";
    this.gone = false;
    this.remoteSet = false;
    this.earlyCandidates = [];
    this.tail = Promise.resolve();
    this.waiters = new Set();
    this.pc = new RTCPeerConnection({ iceServers: mesh.signaling.iceServers || [] });
    this.dc = this.pc.createDataChannel("tilemesh", { negotiated: true, id: CHANNEL_ID, ordered: true });
    this.dc.binaryType = "arraybuffer";
    this.dc.bufferedAmountLowThreshold = mesh.lowWater;
    this.opened = new Promise((resolve) => { this._resolveOpen = resolve; });
    this.pc.onicecandidate = (e) => mesh._signal(remote, {
      kind: "candidate",
      candidate: e.candidate ? e.candidate.candidate : "",
      sdpMid: e.candidate ? e.candidate.sdpMid : null,
      sdpMLineIndex: e.candidate ? e.candidate.sdpMLineIndex : null,
    });
    this.pc.onconnectionstatechange = () => {
      const s = this.pc.connectionState;
      if (s === "failed" || s === "closed") mesh._drop(remote, `connection ${s}`, this);
      else if (s === "connecting" && this.state === "new") this._setState("connecting");
    };
    this.dc.onopen = () => { this._setState("open"); this._resolveOpen(); };
    this.dc.onclose = () => mesh._drop(remote, "channel closed", this);
    this.dc.onbufferedamountlow = () => this._wake();
    this.dc.onmessage = (e) => {
      if (typeof e.data === "string") return;  // the mesh is binary only
      mesh.received += e.data.byteLength;
      mesh.onMessage(remote, new Uint8Array(e.data));
    };
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.mesh._emitPeer(this.remote, state);
  }

  _wake() {
    const ws = [...this.waiters];
    this.waiters.clear();
    ws.forEach((w) => w());
  }

  // Resolves on the next bufferedamountlow (or gone); the caller re-checks both.
  _nextLow() { return new Promise((resolve) => this.waiters.add(resolve)); }

  maxMessageSize() {
    const m = this.pc.sctp ? this.pc.sctp.maxMessageSize : 0;
    // 0 or Infinity means "any size" from the remote; the browser's own send limit still applies.
    if (!m || !Number.isFinite(m)) return this.pc.sctp ? BROWSER_MAX_MESSAGE : DEFAULT_MAX_MESSAGE;
    return Math.min(m, BROWSER_MAX_MESSAGE);
  }

  async offer() {
    this._setState("connecting");
    await this.pc.setLocalDescription(await this.pc.createOffer());
    this.mesh._signal(this.remote, { kind: "offer", sdp: this.pc.localDescription.sdp });
  }

  async onSignal(data) {
    if (data.kind === "offer" || data.kind === "answer") {
      await this.pc.setRemoteDescription({ type: data.kind, sdp: data.sdp });
      this.remoteSet = true;
      if (data.kind === "offer") {
        this._setState("connecting");
        await this.pc.setLocalDescription(await this.pc.createAnswer());
        this.mesh._signal(this.remote, { kind: "answer", sdp: this.pc.localDescription.sdp });
      }
      const early = this.earlyCandidates;
      this.earlyCandidates = [];
      for (const c of early) await this._addCandidate(c);
    } else if (data.kind === "candidate") {
      if (this.remoteSet) await this._addCandidate(data);
      else this.earlyCandidates.push(data);
    } else if (data.kind === "bye") {
      this.mesh._drop(this.remote, "bye", this);
    }
  }

  async _addCandidate(data) {
    if (!data.candidate) return;  // end-of-candidates; nothing to do once the descriptions are set
    try {
      await this.pc.addIceCandidate({ candidate: data.candidate, sdpMid: data.sdpMid, sdpMLineIndex: data.sdpMLineIndex });
    } catch (err) {
      console.warn("mesh: bad ICE candidate from", this.remote, err.message);
    }
  }

  send(data) {
    // Chained so concurrent callers keep their order on the ordered channel.
    const p = this.tail.then(() => this._send(data));
    this.tail = p.catch(() => {});
    return p;
  }

  async _send(data) {
    if (this.gone) throw new PeerGoneError(this.remote);
    if (this.state !== "open") {
      await Promise.race([this.opened, this._nextLow()]);
      if (this.gone) throw new PeerGoneError(this.remote);
      if (this.state !== "open") return this._send(data);
    }
    const max = this.maxMessageSize();
    if (data.byteLength > max) throw new RangeError(`${data.byteLength}-byte message; ${this.remote} accepts ${max}`);
    while (this.dc.bufferedAmount > this.mesh.highWater) {
      await this._nextLow();
      if (this.gone) throw new PeerGoneError(this.remote);
    }
    if (this.gone || this.dc.readyState !== "open") throw new PeerGoneError(this.remote);
    this.dc.send(data);
    this.mesh.sent += data.byteLength;
  }

  close() {
    this.gone = true;
    this._wake();
    try { this.dc.close(); } catch { /* closing anyway */ }
    try { this.pc.close(); } catch { /* closing anyway */ }
  }
}

// The server's own edge peer (roster entry `relay: true`) is reached through the signaling WebSocket instead of a
// data channel (see tilemesh/server/signaling/protocol.py, Relay): same surface as Link, open at once.
const RELAY_MAX_MESSAGE = 262144;

class RelayLink {
  constructor(mesh, remote) {
    this.mesh = mesh;
    this.remote = remote;
    this.state = "new";
    this.gone = false;
    this.relay = true;
    this.tail = Promise.resolve();
    this.opened = Promise.resolve();
  }

  open() { if (this.state !== "open") { this.state = "open"; this.mesh._emitPeer(this.remote, "open"); } }
  maxMessageSize() { return RELAY_MAX_MESSAGE; }
  async onSignal() { /* a relay member has no WebRTC connection */ }

  send(data) {
    const p = this.tail.then(() => this._send(data));
    this.tail = p.catch(() => {});
    return p;
  }

  async _send(data) {
    if (data.byteLength > RELAY_MAX_MESSAGE) throw new RangeError(`${data.byteLength}-byte message; relay accepts ${RELAY_MAX_MESSAGE}`);
    // A WebSocket has no bufferedamountlow event: poll while above the high-water mark.
    while (!this.gone && this.mesh.signaling.bufferedAmount > this.mesh.highWater) {
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    if (this.gone || !this.mesh.signaling.sendRelay(this.remote, data)) throw new PeerGoneError(this.remote);
    this.mesh.sent += data.byteLength;
  }

  close() { this.gone = true; }
}

export class Mesh extends EventTarget {
  constructor(signaling, {
    onMessage = () => {}, onPeer = () => {}, highWater = 1 << 20, lowWater = 256 << 10, leaveOnPagehide = true,
  } = {}) {
    super();
    this.signaling = signaling;
    this.onMessage = onMessage;
    this.onPeerCb = onPeer;
    this.highWater = highWater;
    this.lowWater = lowWater;
    this.links = new Map();
    this.sent = 0;
    this.received = 0;
    this.closed = false;
    this._offs = [
      signaling.on("welcome", (w) => this._welcome(w)),
      signaling.on("signal", ({ from, data }) => this._onSignal(from, data)),
      signaling.on("roster", ({ peers }) => this._relayPeers(peers)),
      signaling.on("relay", ({ from, bytes }) => {
        const link = this.links.get(from);
        if (!link || !link.relay) return;
        this.received += bytes.byteLength;
        this.onMessage(from, bytes);
      }),
      signaling.on("peer_left", ({ id, reason }) => this._drop(id, `left: ${reason}`)),
      // A reconnect that could not resume made us a new peer: every old connection is stale.
      signaling.on("reset", () => { for (const id of [...this.links.keys()]) this._drop(id, "reset"); }),
    ];
    if (leaveOnPagehide && typeof addEventListener === "function") {
      this._pagehide = () => { this.close(); signaling.leave(); };
      addEventListener("pagehide", this._pagehide);
    }
    if (signaling.joined && signaling.peerId) this._attachLate();
  }

  // Created after the welcome: offers that arrived before us are lost. Offer to the peers that were here
  // first (as the welcome would have), and ask the later ones with a "hello" to offer again.
  _attachLate() {
    const peers = this.signaling.peers || [];
    const me = peers.find((p) => p.id === this.peerId);
    for (const p of peers) {
      if (p.id === this.peerId || this.links.has(p.id)) continue;
      if (p.relay) { this._relayLink(p.id); continue; }
      const first = me && (p.joined_at < me.joined_at || (p.joined_at === me.joined_at && p.id < me.id));
      if (first) this._offerTo(p.id);
      else this._signal(p.id, { kind: "hello" });
    }
  }

  _offerTo(remote) {
    const link = this._link(remote);
    link.offer().catch((err) => { console.warn("mesh: offer failed", err); this._drop(remote, "offer failed"); });
  }

  get peerId() { return this.signaling.peerId; }

  _welcome(w) {
    for (const p of w.peers || []) {
      if (p.id === w.peer_id || this.links.has(p.id)) continue;
      if (p.relay) this._relayLink(p.id);
      else this._offerTo(p.id);
    }
  }

  // Relay members (the server's edge) are linked as soon as the roster shows them; they never offer.
  _relayPeers(peers) {
    if (this.closed || !this.peerId) return;
    for (const p of peers || []) if (p.relay && p.id !== this.peerId && !this.links.has(p.id)) this._relayLink(p.id);
  }

  _relayLink(remote) {
    const link = new RelayLink(this, remote);
    this.links.set(remote, link);
    link.open();
  }

  _link(remote) {
    let link = this.links.get(remote);
    if (!link) {
      link = new Link(this, remote);
      this.links.set(remote, link);
    }
    return link;
  }

  async _onSignal(from, data) {
    if (this.closed || !data || from === this.peerId) return;
    let link = this.links.get(from);
    if (link && link.relay) return;  // a relay member has no WebRTC connection
    if (data.kind === "hello") {
      // The remote has no connection to us (its mesh started after our offer): start over.
      this._drop(from, "hello");
      this._offerTo(from);
      return;
    }
    if (data.kind === "offer" && link && link.remoteSet) {
      this._drop(from, "renegotiated");  // the remote restarted: start over with its new offer
      link = null;
    }
    if (!link) {
      if (data.kind !== "offer") return;  // late candidates of a dropped connection
      link = this._link(from);
    }
    try {
      await link.onSignal(data);
    } catch (err) {
      console.warn("mesh: signal from", from, "failed:", err.message);
    }
  }

  _signal(to, data) { if (!this.closed) this.signaling.signal(to, data); }

  // With `only`, drops the link just if it is still that one: a replaced connection's late close event must not
  // take down its successor.
  _drop(remote, reason, only = null) {
    const link = this.links.get(remote);
    if (!link || (only && link !== only)) return;
    this.links.delete(remote);
    link.close();
    this._emitPeer(remote, "gone", reason);
  }

  _emitPeer(peerId, state, reason = "") {
    try { this.onPeerCb(peerId, state, reason); } catch (err) { console.error(err); }
    this.dispatchEvent(new CustomEvent("peer", { detail: { peerId, state, reason } }));
  }

  state(peerId) { const l = this.links.get(peerId); return l ? l.state : "gone"; }
  openPeers() { return [...this.links.values()].filter((l) => l.state === "open").map((l) => l.remote); }

  maxMessageSize(peerId) {
    const link = this.links.get(peerId);
    if (!link) throw new PeerGoneError(peerId);
    return link.maxMessageSize();
  }

  waitOpen(peerId, timeoutMs = 15000) {
    return new Promise((resolve, reject) => {
      if (this.state(peerId) === "open") return resolve();
      const timer = setTimeout(() => { done(); reject(new Error(`no open channel to ${peerId} in ${timeoutMs} ms`)); },
        timeoutMs);
      const onPeer = (e) => { if (e.detail.peerId === peerId && e.detail.state === "open") { done(); resolve(); } };
      const done = () => { clearTimeout(timer); this.removeEventListener("peer", onPeer); };
      this.addEventListener("peer", onPeer);
    });
  }

  send(peerId, data) {
    const link = this.links.get(peerId);
    if (!link) return Promise.reject(new PeerGoneError(peerId, "no connection"));
    return link.send(data);
  }

  // Sends a concatenation of wire chunks (every chunk but the last exactly `chunkSize` bytes, as
  // tilemesh.runtime.wire.encode_joined makes them) one message per chunk.
  async sendChunks(peerId, joined, chunkSize = this.maxMessageSize(peerId)) {
    const sends = [];
    for (let off = 0; off < joined.byteLength; off += chunkSize) {
      sends.push(this.send(peerId, joined.subarray(off, Math.min(off + chunkSize, joined.byteLength))));
    }
    await Promise.all(sends);
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    for (const id of [...this.links.keys()]) this._drop(id, "closed");
    this._offs.forEach((off) => off());
    if (this._pagehide) removeEventListener("pagehide", this._pagehide);
  }
}

// --- link probes: round-trip time and throughput per link (diagnostics, `python -m bench.linkbench`) ---------
//
// Probe messages start with a tag byte from 0xB0, which never begins a wire chunk (magic "TMWT"):
//   0xB0 ping (echoed whole as 0xB1), 0xB2 bulk data (counted), 0xB3 end of a burst (answered by 0xB4 with the
//   byte count received since the previous end, as a float64). tilemesh/edge/probe.py speaks the same from aiortc.
export const PROBE = { PING: 0xb0, PONG: 0xb1, BULK: 0xb2, END: 0xb3, DONE: 0xb4 };

export class LinkProbe {
  constructor(mesh) {
    this.mesh = mesh;
    this.counted = new Map();
    this.pending = new Map();
  }

  // Returns true when `bytes` was a probe message (the caller then ignores it).
  onMessage(from, bytes) {
    const tag = bytes[0];
    if (tag === PROBE.PING) {
      const echo = bytes.slice();
      echo[0] = PROBE.PONG;
      this.mesh.send(from, echo).catch(() => {});
    } else if (tag === PROBE.BULK) {
      this.counted.set(from, (this.counted.get(from) || 0) + bytes.byteLength);
    } else if (tag === PROBE.END) {
      const done = new Uint8Array(9);
      done[0] = PROBE.DONE;
      new DataView(done.buffer).setFloat64(1, this.counted.get(from) || 0, true);
      this.counted.set(from, 0);
      this.mesh.send(from, done).catch(() => {});
    } else if (tag === PROBE.PONG || tag === PROBE.DONE) {
      const key = `${from}:${tag}`;
      const resolve = this.pending.get(key);
      this.pending.delete(key);
      if (resolve) resolve(bytes);
    } else {
      return false;
    }
    return true;
  }

  _expect(peer, tag) {
    return new Promise((resolve) => this.pending.set(`${peer}:${tag}`, resolve));
  }

  // Median-friendly list of round trips (ms) of `size`-byte messages echoed whole.
  async rtt(peer, size, count = 20) {
    const msg = new Uint8Array(size);
    msg[0] = PROBE.PING;
    const out = [];
    for (let i = 0; i < count; i++) {
      const back = this._expect(peer, PROBE.PONG);
      const t0 = performance.now();
      await this.mesh.send(peer, msg);
      await back;
      out.push(performance.now() - t0);
    }
    return out;
  }

  // Sends `total` bytes as `size`-byte messages and waits until the receiver has counted them all.
  async throughput(peer, size, total) {
    const msg = new Uint8Array(size);
    msg[0] = PROBE.BULK;
    const n = Math.max(1, Math.round(total / size));
    const done = this._expect(peer, PROBE.DONE);
    const t0 = performance.now();
    const sends = [];
    for (let i = 0; i < n; i++) sends.push(this.mesh.send(peer, msg));
    sends.push(this.mesh.send(peer, new Uint8Array([PROBE.END])));
    await Promise.all(sends);
    const reply = await done;
    const ms = performance.now() - t0;
    const got = new DataView(reply.buffer, reply.byteOffset).getFloat64(1, true);
    // Raw figures only: the planner's rate (Mbit/s) is tilemesh.runtime.session.link_figures, one definition.
    return { bytes: got, sent: n * size, ms };
  }
}
