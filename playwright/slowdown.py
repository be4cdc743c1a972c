"""Emulating a slower device: a cgroup CPU quota around a whole Chromium process tree.

CDP's CPU throttling slows only a page's main thread, not its Workers, and tilemesh computes in a Worker; a
cgroup quota slows every process Chromium starts (shared/PLATFORM.md: a 25% quota slowed Workers about 4x).
Uses the cgroup v1 `cpu` controller mounted at /sys/fs/cgroup/cpu (this machine kind); needs root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def unavailable_reason() -> str | None:
    if not (CPU_ROOT / "cpu.cfs_quota_us").exists():
        return "no cgroup v1 cpu controller at /sys/fs/cgroup/cpu"
    if os.geteuid() != 0:
        return "a cgroup CPU quota needs root"
    return None


class CpuLimit:
    """Caps the processes started through `wrapper()` to `cores` CPUs (0.5 = half of one core)."""

    def __init__(self, cores: float, name: str | None = None):
        self.cores = cores
        self.path = CPU_ROOT / (name or f"tilemesh-{secrets.token_hex(4)}")
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> CpuLimit:
        self.path.mkdir()
        (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(self.cores * PERIOD_US))))
        return self

    def wrapper(self, executable: str) -> str:
        """A script that joins the cgroup, then execs `executable` with its arguments (for executable_path)."""
        self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="tm-cpu-")
        script = Path(self._tmp.name) / "limited"
        script.write_text(f'#!/bin/sh\necho $$ > {self.path}/cgroup.procs\nexec {executable} "$@"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return str(script)

    def usage_seconds(self) -> float:
        """CPU time the group has used (cpu.stat's throttling data lives here; usage is in cpuacct)."""
        acct = Path("/sys/fs/cgroup/cpuacct") / self.path.name / "cpuacct.usage"
        return int(acct.read_text()) / 1e9 if acct.exists() else float("nan")

    def __exit__(self, *exc) -> None:
        # Processes left behind (a crashed browser) go back to the root group so the directory can go.
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # the process may have exited meanwhile
                (CPU_ROOT / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()
        if self._tmp is not None:
            self._tmp.cleanup()
