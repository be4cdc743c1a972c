// The host page's streams: every camera streaming in the room, the devices its lanes use, what the planner
// predicted and what the camera measured (frames shown per second, p50/p90 latency, results dropped late).
// Drawn from protocol messages only: `plan` messages with a `stream`, and the cameras' `stream_stats` and
// `stream_stopped` broadcasts (tilemesh.runtime.session).
//
//   const view = new StreamsView({ el });
//   view.attach(signaling);
export class StreamsView {
  constructor({ el }) {
    this.el = el;
    this.names = new Map();
    this.streams = new Map();  // camera -> {plan, stats}
    this.render();
  }

  name(id) { return this.names.get(id) || id; }

  showPlan(msg) {
    if (!msg || !msg.stream || !Array.isArray(msg.lanes)) return;
    const prev = this.streams.get(msg.source);
    this.streams.set(msg.source, { plan: msg, stats: prev ? prev.stats : null });
    this.render();
  }

  showStats(from, stats) {
    const s = this.streams.get(from);
    if (!s) return;
    s.stats = stats;
    this.render();
  }

  drop(camera) {
    if (this.streams.delete(camera)) this.render();
  }

  attach(signaling) {
    signaling.on("plan", (msg) => this.showPlan(msg));
    signaling.on("roster", ({ peers }) => {
      this.names = new Map(peers.map((p) => [p.id, p.name]));
      for (const id of [...this.streams.keys()]) if (!this.names.has(id)) this.streams.delete(id);
      this.render();
    });
    signaling.on("peer_left", ({ id }) => this.drop(id));
    signaling.on("broadcast", ({ from, data }) => {
      if (!data || typeof data !== "object") return;
      if (data.kind === "stream_stats") this.showStats(from, data);
      else if (data.kind === "stream_stopped") this.drop(from);
    });
  }

  render() {
    if (!this.el) return;
    this.el.dataset.streams = String(this.streams.size);
    if (!this.streams.size) {
      const p = document.createElement("p");
      p.className = "hint";
      p.textContent = "No camera is streaming. Each phone that starts its camera gets a share of the devices here.";
      this.el.replaceChildren(p);
      return;
    }
    const table = document.createElement("table");
    table.className = "streams";
    const head = table.createTHead().insertRow();
    for (const h of ["camera", "objective", "devices", "planned", "measured", "late"]) {
      const th = document.createElement("th");
      th.textContent = h;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const [camera, { plan, stats }] of this.streams) {
      const row = body.insertRow();
      row.dataset.camera = camera;
      const st = plan.stream;
      const devices = [...new Set(plan.lanes.flatMap((l) => l.devices))];
      const planned = `${Number(st.predicted_fps).toFixed(1)} fps · ${Number(st.predicted_ms).toFixed(0)} ms`;
      const measured = stats && stats.fps
        ? `${stats.fps.toFixed(1)} fps · ${Number(stats.p50_ms).toFixed(0)} / ${Number(stats.p90_ms).toFixed(0)} ms`
        : "…";
      const cells = [
        this.name(camera),
        `${st.objective === "latency" ? "fastest answer" : "most frames/s"}${st.private ? " · pixels stay on the phone" : ""}`,
        `${devices.map((d) => this.name(d)).join(", ")} (${plan.lanes.length} lane${plan.lanes.length > 1 ? "s" : ""})`,
        planned, measured, stats ? String(stats.dropped_late) : "–",
      ];
      for (const text of cells) row.insertCell().textContent = text;
      if (stats) {
        row.dataset.fps = String(stats.fps);
        row.dataset.p90Ms = String(stats.p90_ms);
      }
    }
    this.el.replaceChildren(table);
  }
}
