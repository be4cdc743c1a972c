// One Firefox ESR device in a tilemesh room, for tests: opens the join URL, then prints one JSON line of its state
// every 500 ms ({ready, peerId, tasksRun, errors, ...}) until its standard input closes, then closes Firefox.
//
//   node device.mjs https://10.99.0.1:8443/join/<room>?kind=laptop
//
// Driven by puppeteer-core over WebDriver BiDi (the only way to drive a stock Firefox headless); it never
// downloads a browser: it runs /usr/bin/firefox-esr (TILEMESH_FIREFOX overrides).
import puppeteer from "puppeteer-core";

const url = process.argv[2];
if (!url) { console.error("usage: node device.mjs JOIN_URL"); process.exit(2); }

const browser = await puppeteer.launch({
  browser: "firefox",
  executablePath: process.env.TILEMESH_FIREFOX || "/usr/bin/firefox-esr",
  headless: true,
  acceptInsecureCerts: true,  // the test server's own self-signed certificate
  extraPrefsFirefox: {
    // WebRTC between namespace addresses: real host candidates, no mDNS names (Chromium runs with the same).
    "media.peerconnection.ice.obfuscate_host_addresses": false,
    // Nothing may leave the machine: no captive-portal, connectivity, update or safe-browsing probes.
    "network.captive-portal-service.enabled": false,
    "network.connectivity-service.enabled": false,
    "app.update.enabled": false,
    "extensions.update.enabled": false,
    "browser.safebrowsing.malware.enabled": false,
    "browser.safebrowsing.phishing.enabled": false,
    "browser.safebrowsing.downloads.enabled": false,
  },
});
const page = await browser.newPage();
const log = [];
page.on("console", (m) => { if (m.type() === "error" || m.type() === "warn") log.push(`${m.type()}: ${m.text()}`); });
page.on("pageerror", (e) => log.push(`pageerror: ${e.message}`));

let closing = false;
process.stdin.on("end", () => { closing = true; });
process.stdin.on("close", () => { closing = true; });
process.stdin.resume();

await page.goto(url);
while (!closing) {
  let state;
  try {
    state = await page.evaluate(() => {
      const tm = window.tilemesh;
      const last = tm?.signaling?.lastState;
      return {
        ready: last?.state === "ready",
        // Where it is: the state it reported to the room and its detail ("downloading…", "measuring speed"),
        // the boot bar's text, and the signaling socket's status.
        stage: last ? `${last.state}${last.detail ? ": " + last.detail : ""}` : null,
        boot: document.querySelector("#boot .label")?.textContent ?? null,
        socket: document.getElementById("status")?.dataset.status ?? null,
        peerId: tm?.peerId ?? null,
        tasksRun: tm?.engine?.tasksRun ?? {},
        errors: tm?.engine?.errors ?? [],
        backend: tm?.signaling?.lastState?.profile?.compute?.backend ?? null,
        crossOriginIsolated,
        userAgent: navigator.userAgent,
      };
    });
  } catch (err) {
    state = { ready: false, evalError: String(err.message || err) };
  }
  process.stdout.write(JSON.stringify({ ...state, log: log.slice(-20) }) + "\n");
  await new Promise((r) => setTimeout(r, 500));
}
await browser.close();
