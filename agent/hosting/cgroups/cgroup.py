"""One cgroup, whatever the version: the interface the manager and the sandbox program against.

:class:`Cgroup` holds what v1 and v2 share (joining, listing and killing processes, removal)
and declares what differs (limits, usage, OOM and limit counters), which
:class:`~agent.hosting.cgroups.v1.CgroupV1` and :class:`~agent.hosting.cgroups.v2.CgroupV2`
implement.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from agent.hosting.cgroups.base import KILL_TIMEOUT, CgroupVersion, Limits
from agent.hosting.cgroups.kernel import kill_procs, read_optional, rmdir_retry, write_file

__all__ = ["Cgroup"]


class Cgroup(ABC):
    """One cgroup (in v1: the same-named directory in each controller hierarchy)."""

    version: ClassVar[CgroupVersion]

    def __init__(self, name: str) -> None:
        self.name = name

    # creation / identity

    @classmethod
    @abstractmethod
    def create(cls, parent: Cgroup, name: str, exist_ok: bool = False) -> Cgroup:
        """Make the child ``name`` of ``parent``."""

    @property
    @abstractmethod
    def dirs(self) -> list[Path]:
        """The distinct directories of this cgroup."""

    @abstractmethod
    def controllers(self) -> set[str]:
        """The controllers usable in this cgroup (v1: the mounted hierarchies)."""

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {' '.join(str(d) for d in self.dirs)}>"

    # limits

    @abstractmethod
    def set_limits(self, limits: Limits) -> None:
        """Write the limits; a set limit whose controller is missing raises CgroupError."""

    # processes

    def procs_files(self) -> list[Path]:
        """The files a process writes its pid into to join this cgroup (all of them)."""
        return [d / "cgroup.procs" for d in self.dirs]

    def add_process(self, pid: int) -> None:
        for f in self.procs_files():
            write_file(f, str(pid))

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for f in self.procs_files():
            text = read_optional(f)
            pids.update(int(x) for x in (text or "").split())
        return sorted(pids)

    # measurements

    @abstractmethod
    def usage(self) -> dict[str, float | int | None]:
        """{cpu_seconds, memory_bytes, memory_peak_bytes, pids}; None where not measurable."""

    @abstractmethod
    def oom_kills(self) -> int | None:
        """Processes the kernel OOM-killed in this cgroup; None if the kernel does not say."""

    def oom_killed(self) -> bool:
        return (self.oom_kills() or 0) > 0

    @abstractmethod
    def memory_limit_hits(self) -> int | None:
        """Times the memory limit was reached (v1 memory.failcnt, v2 memory.events max)."""

    @abstractmethod
    def pids_limit_hits(self) -> int | None:
        """Forks refused by pids.max (pids.events ``max``)."""

    # teardown

    def _kill_fast(self) -> None:
        """Kill every process at once where the kernel can (v2 cgroup.kill)."""

    def kill_all(self, timeout: float = KILL_TIMEOUT) -> None:
        """SIGKILL every process in this cgroup (this cgroup only) until none is left."""
        self._kill_fast()
        kill_procs(self.procs, str(self), timeout)

    def remove(self, timeout: float = KILL_TIMEOUT) -> None:
        """Kill what is left in it, then remove it (all its directories)."""
        deadline = time.monotonic() + timeout
        if self.exists():
            self.kill_all(timeout)
        for d in self.dirs:
            rmdir_retry(d, max(0.5, deadline - time.monotonic()))
