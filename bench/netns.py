"""A private network namespace with one veth pair, for WebRTC tests and benchmarks.

Chromium never gathers loopback ICE candidates and aiortc skips 127.0.0.1, so peers on one machine need a real
interface. `NetNS` makes one: namespace `tm-<random>` holding `10.99.N.1/24` (loopback up, default route via
`.2`), and the other veth end with `10.99.N.2/24` in the calling namespace so the test process can reach the
server inside. Everything that speaks WebRTC (server, edge peer, Chromium) runs inside via `ip netns exec`;
Playwright drives Chromium over pipes, which cross namespaces. `N` is picked so two runs never share a subnet.

    with NetNS() as ns:
        subprocess.run(ns.wrap(["python", "-m", "tilemesh.cli", ...]))
        chromium_path = ns.chromium_wrapper("/usr/bin/chromium")   # for executable_path=

Needs root (CAP_NET_ADMIN) and iproute2; `unavailable_reason()` says why not, for a pytest skip.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

CLONE_NEWNET = 0x40000000


def unavailable_reason() -> str | None:
    """None when namespaces can be made here, else a sentence for pytest.skip."""
    if shutil.which("ip") is None:
        return "iproute2 `ip` is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (WebRTC cannot use loopback)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _used_subnets() -> set[int]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout
    used = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = ipaddress.ip_interface(parts[parts.index("inet") + 1])
            if addr.ip in ipaddress.ip_network("10.99.0.0/16"):
                used.add(int(addr.ip.packed[2]))
    return used


class NetNS:
    def __init__(self, name: str | None = None):
        self.name = name or f"tm-{secrets.token_hex(4)}"
        tag = secrets.token_hex(3)
        self.veth_in, self.veth_out = f"tmi{tag}", f"tmo{tag}"
        self.inner = self.outer = ""
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.created = False

    def create(self) -> NetNS:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        free = [n for n in range(256) if n not in _used_subnets()]
        if not free:
            raise RuntimeError("every 10.99.N.0/24 subnet is in use")
        n = free[0]
        self.inner, self.outer = f"10.99.{n}.1", f"10.99.{n}.2"
        _run("ip", "netns", "add", self.name)
        self.created = True
        try:
            _run("ip", "link", "add", self.veth_out, "type", "veth", "peer", "name", self.veth_in)
            _run("ip", "link", "set", self.veth_in, "netns", self.name)
            _run("ip", "addr", "add", f"{self.outer}/24", "dev", self.veth_out)
            _run("ip", "link", "set", self.veth_out, "up")
            inside = ["ip", "netns", "exec", self.name]
            # IPv4 only inside: an IPv6 link-local address finishing duplicate detection a second after the link
            # comes up is a network change to Chromium, which then fails a navigation with ERR_NETWORK_CHANGED.
            conf = ("all", "default", "lo", self.veth_in)
            _run(*inside, "sh", "-c", "; ".join(f"echo 1 > /proc/sys/net/ipv6/conf/{i}/disable_ipv6" for i in conf))
            _run(*inside, "ip", "link", "set", "lo", "up")
            _run(*inside, "ip", "addr", "add", f"{self.inner}/24", "dev", self.veth_in)
            _run(*inside, "ip", "link", "set", self.veth_in, "up")
            # Chromium picks its default local address from the route table; without a default route it may
            # gather no host candidate at all.
            _run(*inside, "ip", "route", "add", "default", "via", self.outer)
        except BaseException:
            self.remove()
            raise
        return self

    def wrap(self, argv: list[str]) -> list[str]:
        """The command line that runs `argv` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def chromium_wrapper(self, chromium: str = "/usr/bin/chromium") -> str:
        """Path of an executable script that starts `chromium` inside the namespace (Playwright executable_path)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        path = Path(self._tmp.name) / "chromium-in-netns"
        path.write_text(f'#!/bin/sh\nexec ip netns exec {self.name} {chromium} "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return str(path)

    def enter_current_thread(self) -> None:
        """Move the calling thread (not the process) into the namespace: sockets it opens from now on live there.

        Lets an in-process asyncio test (aiohttp server plus aiortc peers on a thread of its own) use the veth
        without a subprocess. Only the network namespace changes, which Linux allows per thread.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Delete the namespace (which destroys both veth ends); safe to call twice."""
        if self.created:
            # Deleting the namespace kills its veth end, and a veth pair dies with either end.
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
            subprocess.run(["ip", "link", "delete", self.veth_out], capture_output=True)
            self.created = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()
