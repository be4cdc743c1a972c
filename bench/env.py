"""The emulated room for `tilemesh bench`: one network namespace and one CPU cgroup per device.

Why not one namespace for everyone (as the browser tests do): browsers sharing a namespace share its address,
so their WebRTC traffic to each other is local delivery over `lo` and never crosses the veth that `tc` shapes.
Here every device gets its own namespace and veth, plugged into a bridge in a hub namespace (a small Wi-Fi
access point):

    device ns "phone"  10.99.N.10 --veth--+
    device ns "laptop" 10.99.N.11 --veth--+-- bridge (hub ns, 10.99.N.1, the bench process's HTTP side)
    device ns "edge"   10.99.N.12 --veth--+       (the server, and its aiortc edge peer, live in "edge")

Each device's link is `tc qdisc netem rate R delay D` on both ends of its veth: R and D apply to its uplink
and to its downlink. Kernels without sch_netem (this machine's: only tbf, htb, pfifo, bfifo and clsact exist)
get `tbf rate R` instead and no added delay; `StarNet.shaping` says which was used, and the report prints it.
A transfer from A to B therefore meets A's uplink then B's downlink: one-way delay
D_A + D_B, rate min(R_A, R_B), round trip 2 (D_A + D_B). Limits: no loss, no jitter, no contention for a
shared radio channel between devices (each link is its own wire into the bridge); everything, page loads
and signaling included, is shaped. The bench process itself stays in the calling namespace; it reaches the
server from a thread moved into the hub namespace, and drives Chromium over pipes.

Every device's processes (a Chromium tree, or the server for the edge) start through a wrapper that puts them
in a cgroup v1 `cpu` group (the quota: `cores` of CPU) and a `cpuacct` group of the same name (their CPU
time, which `usage_seconds()` reads: the requesting phone's energy stand-in). Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
CPU_ROOT = Path("/sys/fs/cgroup/cpu")
ACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")
# A short CFS period: with the default 100 ms, a 0.5-core device runs at full speed for 50 ms, then stops for 50:
# short compute bursts (the profile's layer timings, small tiles) would see a fast device and long ones a slow
# one. 10 ms makes a slow device uniformly slow, as a slow phone is.
PERIOD_US = 10_000
# netem's queue, in packets: a 1.6 MB activation map in flight must queue, not drop (SCTP would back off and
# the benchmark would measure its retransmission timers).
NETEM_LIMIT = 100_000
# tbf's bucket must hold the largest packet or it drops it, and veth hands over GSO packets of up to 64 KiB.
TBF_BURST = 96 * 1024


def unavailable_reason() -> str | None:
    """None when the emulation can run here, else why not."""
    if os.geteuid() != 0:
        return "the benchmark needs root: network namespaces, tc and cgroups"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2)"
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists() or not (ACCT_ROOT / "cpuacct.usage").exists():
        return "no cgroup v1 cpu and cpuacct controllers under /sys/fs/cgroup"
    return None


def _run(*argv: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed: {res.stderr.strip()}")


def _executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


class CpuGroup:
    """A cgroup v1 cpu quota (`cores`; None = no quota) plus a cpuacct group of the same name for its usage."""

    def __init__(self, name: str, cores: float | None):
        self.name = name
        self.cores = cores
        self.cpu = CPU_ROOT / name
        self.acct = ACCT_ROOT / name

    def create(self) -> CpuGroup:
        self.cpu.mkdir()
        self.acct.mkdir()
        (self.cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        quota = -1 if self.cores is None else max(1000, int(self.cores * PERIOD_US))
        (self.cpu / "cpu.cfs_quota_us").write_text(str(quota))
        return self

    def join_lines(self) -> str:
        """Shell lines that move the running shell (and so what it execs) into both groups."""
        return f"echo $$ > {self.cpu}/cgroup.procs\necho $$ > {self.acct}/cgroup.procs\n"

    def usage_seconds(self) -> float:
        return int((self.acct / "cpuacct.usage").read_text()) / 1e9

    def remove(self, wait_s: float = 5.0) -> None:
        """Delete both groups. Processes still inside (a browser shutting down) are moved to the root group; a
        group whose last process is still exiting cannot be removed yet, so this retries for `wait_s`."""
        deadline = time.monotonic() + wait_s
        for group, root in ((self.cpu, CPU_ROOT), (self.acct, ACCT_ROOT)):
            while group.exists():
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(pid)
                try:
                    group.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) and of its waited-for children, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the ")" the fields start at field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    ticks = sum(int(fields[i - 3]) for i in (14, 15, 16, 17))
    return ticks / os.sysconf("SC_CLK_TCK")


def _free_subnet() -> int:
    """A 10.99.N.0/24 not used by the calling namespace (the device namespaces are private anyway; this only
    avoids confusing anyone reading `ip addr` while a browser test's NetNS is up)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = ipaddress.ip_interface(parts[parts.index("inet") + 1]).ip
            if addr in ipaddress.ip_network("10.99.0.0/16"):
                used.add(addr.packed[2])
    free = [n for n in range(255, 0, -1) if n not in used]
    if not free:
        raise RuntimeError("every 10.99.N.0/24 subnet is in use")
    return free[0]


class StarNet:
    """Device namespaces around a bridge, each device link shaped by netem. See the module docstring."""

    def __init__(self, links: dict[str, tuple[float, float] | None]):
        """`links`: device name -> (Mbit/s, one-way delay in ms), or None for a link left unshaped (tests), in
        address order."""
        self.links = dict(links)
        self.veth: dict[str, tuple[str, str]] = {}  # device -> (its end, the hub's end)
        self.tag = secrets.token_hex(2)
        self.hub = f"tmb{self.tag}-hub"
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self.hub_addr = ""
        self._made: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tmb{self.tag}-")
        self.shaping = ""  # "netem" (rate and delay) or "tbf" (rate only), known after create()

    def _shaper(self, mbps: float, delay_ms: float) -> list[str]:
        if self.shaping == "netem":
            return ["netem", "delay", f"{delay_ms}ms", "rate", f"{mbps}mbit", "limit", str(NETEM_LIMIT)]
        # latency bounds the queue (rate x latency bytes): long enough that nothing is dropped.
        return ["tbf", "rate", f"{mbps}mbit", "burst", str(TBF_BURST), "latency", "2s"]

    def create(self) -> StarNet:
        n = _free_subnet()
        self.hub_addr = f"10.99.{n}.1"
        bridge = f"tb{self.tag}br"
        try:
            _run("ip", "netns", "add", self.hub)
            self._made.append(self.hub)
            hub = ["ip", "netns", "exec", self.hub]
            _run(*hub, "ip", "link", "set", "lo", "up")
            _run(*hub, "ip", "link", "add", bridge, "type", "bridge")
            _run(*hub, "ip", "addr", "add", f"{self.hub_addr}/24", "dev", bridge)
            _run(*hub, "ip", "link", "set", bridge, "up")
            probe = subprocess.run([*hub, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                                   capture_output=True, text=True)
            self.shaping = "netem" if probe.returncode == 0 else "tbf"
            for i, (name, link) in enumerate(self.links.items()):
                ns = f"tmb{self.tag}-{i}"
                outer, inner = f"tb{self.tag}{i}h", f"tb{self.tag}{i}d"
                _run("ip", "netns", "add", ns)
                self._made.append(ns)
                self.ns[name], self.addr[name] = ns, f"10.99.{n}.{10 + i}"
                self.veth[name] = (inner, outer)
                dev = ["ip", "netns", "exec", ns]
                _run(*dev, "ip", "link", "set", "lo", "up")
                _run(*dev, "ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
                _run(*dev, "ip", "link", "set", outer, "netns", self.hub)
                _run(*dev, "ip", "addr", "add", f"{self.addr[name]}/24", "dev", inner)
                _run(*dev, "ip", "link", "set", inner, "up")
                # Chromium picks its local address from the route table: without a default route it may gather
                # no host candidate at all.
                _run(*dev, "ip", "route", "add", "default", "via", self.hub_addr)
                _run(*hub, "ip", "link", "set", outer, "master", bridge)
                _run(*hub, "ip", "link", "set", outer, "up")
                if link is None:
                    continue
                shaper = self._shaper(*link)
                _run(*dev, "tc", "qdisc", "add", "dev", inner, "root", *shaper)   # the device's uplink
                _run(*hub, "tc", "qdisc", "add", "dev", outer, "root", *shaper)   # and its downlink
        except BaseException:
            self.remove()
            raise
        return self

    def cut(self, device: str) -> None:
        """`device` drops off the network (its access point is gone): the hub's end of its link goes down, so
        nothing more reaches it or leaves it, and nobody is told. This kernel has no netem loss and no tc drop
        action, so the link itself is taken down."""
        _run("ip", "netns", "exec", self.hub, "ip", "link", "set", self.veth[device][1], "down")

    def wrap(self, device: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[device], *argv]

    def launcher(self, device: str, argv: list[str], group: CpuGroup | None = None) -> str:
        """An executable script: joins `group`, then execs `argv` plus its own arguments in `device`'s namespace
        (for Playwright's executable_path, or as a subprocess prefix)."""
        script = Path(self._tmp.name) / f"run-{device}"
        body = "#!/bin/sh\n" + (group.join_lines() if group else "")
        body += f'exec {shlex.join(self.wrap(device, argv))} "$@"\n'
        return _executable(script, body)

    def call_in_hub(self, fn, *args):
        """Run `fn(*args)` on a thread moved into the hub namespace (its sockets reach every device)."""
        box: dict = {}

        def target():
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.hub}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({self.hub}) failed")
                finally:
                    os.close(fd)
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 (re-raised on the caller's thread)
                box["error"] = exc

        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def remove(self) -> None:
        # Deleting a namespace destroys the veth ends inside it, and a veth pair dies with either end.
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._made = []
        self._tmp.cleanup()

    def __enter__(self) -> StarNet:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()
