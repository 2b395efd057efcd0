"""cgroup v2: one directory in the unified hierarchy.

Controllers reach a cgroup only through its parent's ``cgroup.subtree_control``
(:meth:`CgroupV2.enable`); limits are ``cpu.max``, ``memory.max`` (with no swap, and
``memory.oom.group`` so an OOM kills the whole object) and ``pids.max``; OOM kills and limit
hits are read from ``memory.events`` and ``pids.events``; ``cgroup.kill`` (Linux 5.14)
empties a cgroup at once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.hosting.cgroups.base import CPU_PERIOD_US, CgroupError, CgroupVersion, Limits, check_name
from agent.hosting.cgroups.cgroup import Cgroup
from agent.hosting.cgroups.kernel import (
    _int_or_none,
    _mkdir_checked,
    parse_keyed,
    read_optional,
    write_file,
)

__all__ = ["CgroupV2"]

log = logging.getLogger(__name__)


class CgroupV2(Cgroup):
    """A v2 cgroup: one directory in the unified hierarchy."""

    version = CgroupVersion.V2

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path

    @property
    def dirs(self) -> list[Path]:
        return [self.path]

    def controllers(self) -> set[str]:
        return set((read_optional(self.path / "cgroup.controllers") or "").split())

    def subtree_control(self) -> set[str]:
        return set((read_optional(self.path / "cgroup.subtree_control") or "").split())

    def is_root(self) -> bool:
        """The true root cgroup has no cgroup.type (and may hold processes and controllers)."""
        return not (self.path / "cgroup.type").exists()

    def enable(self, controller: str) -> None:
        """Hand ``controller`` to the children (``+controller`` in cgroup.subtree_control)."""
        if controller not in self.subtree_control():
            write_file(self.path / "cgroup.subtree_control", f"+{controller}")

    @classmethod
    def create(cls, parent: Cgroup, name: str, exist_ok: bool = False) -> CgroupV2:
        if not isinstance(parent, CgroupV2):
            raise CgroupError(f"parent {parent!r} is not a cgroup v2")
        check_name(name)
        _mkdir_checked(parent.path / name, exist_ok)
        return cls(name, parent.path / name)

    def _need(self, controller: str, file: str) -> Path:
        path = self.path / file
        if not path.exists():
            raise CgroupError(f"cgroup v2 controller {controller!r} is not enabled for "
                              f"{self.path} (not in its parent's cgroup.subtree_control)")
        return path

    def set_limits(self, limits: Limits) -> None:
        if limits.cpu_quota is not None:
            write_file(self._need("cpu", "cpu.max"), f"{limits.cpu_quota_us()} {CPU_PERIOD_US}")
        if limits.memory_bytes is not None:
            write_file(self._need("memory", "memory.max"), str(limits.memory_bytes))
            if (self.path / "memory.swap.max").exists():
                write_file(self.path / "memory.swap.max", "0")
            if (self.path / "memory.oom.group").exists():
                # an OOM kills the whole object, not one of its processes at random
                write_file(self.path / "memory.oom.group", "1")
        if limits.pids_max is not None:
            write_file(self._need("pids", "pids.max"), str(limits.pids_max))

    def usage(self) -> dict[str, float | int | None]:
        usec = parse_keyed(read_optional(self.path / "cpu.stat")).get("usage_usec")
        return {
            "cpu_seconds": None if usec is None else usec / 1e6,
            "memory_bytes": _int_or_none(read_optional(self.path / "memory.current")),
            "memory_peak_bytes": _int_or_none(read_optional(self.path / "memory.peak")),
            "pids": _int_or_none(read_optional(self.path / "pids.current")),
        }

    def oom_kills(self) -> int | None:
        text = read_optional(self.path / "memory.events")
        return None if text is None else parse_keyed(text).get("oom_kill", 0)

    def memory_limit_hits(self) -> int | None:
        text = read_optional(self.path / "memory.events")
        return None if text is None else parse_keyed(text).get("max", 0)

    def pids_limit_hits(self) -> int | None:
        text = read_optional(self.path / "pids.events")
        return None if text is None else parse_keyed(text).get("max", 0)

    def _kill_fast(self) -> None:
        kill = self.path / "cgroup.kill"  # Linux 5.14
        if kill.exists() and self.path.is_dir():
            try:
                write_file(kill, "1")
            except CgroupError as exc:
                log.debug("%s", exc)
