// The device session's clock (tilemesh.runtime.session: `handle(event, now)`), in seconds, the same in the page
// and in its Worker. `performance.now()` counts from each context's own time origin, and a Worker's origin is
// its creation, later than the page's: events timed by the page (frames, ticks) and by the Worker (compute
// results) on their own `performance.now()` disagreed by the Worker's start-up delay, so a frame could finish
// "before" it started (a negative latency crashed the stream scheduler) and a piece could look older than it
// was (a false stall, an honest device blamed). `timeOrigin + now()` is one timeline for every context.
export function sessionNow() {
  return (performance.timeOrigin + performance.now()) / 1e3;
}
