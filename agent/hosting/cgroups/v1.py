"""cgroup v1: one directory per controller hierarchy (cpu, cpuacct, memory, pids).

The same-named directory in each hierarchy is one cgroup; cpu and cpuacct may be co-mounted
and then share a directory. Limits are the CFS quota, ``memory.limit_in_bytes`` and
``pids.max``; an OOM kill is read from ``memory.oom_control`` (Linux 4.13 and later).
"""

from __future__ import annotations

from pathlib import Path

from agent.hosting.cgroups import kernel
from agent.hosting.cgroups.base import CPU_PERIOD_US, CgroupError, CgroupVersion, Limits, check_name
from agent.hosting.cgroups.cgroup import Cgroup
from agent.hosting.cgroups.kernel import (
    _int_or_none,
    _mkdir_checked,
    parse_keyed,
    read_optional,
    write_file,
)

__all__ = ["CgroupV1"]


class CgroupV1(Cgroup):
    """A v1 cgroup: one directory per controller hierarchy (cpu and cpuacct may share one)."""

    version = CgroupVersion.V1

    def __init__(self, name: str, paths: dict[str, Path]) -> None:
        super().__init__(name)
        self.paths = dict(paths)

    @property
    def dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.paths.values()))

    def controllers(self) -> set[str]:
        return set(self.paths)

    @classmethod
    def create(cls, parent: Cgroup, name: str, exist_ok: bool = False) -> CgroupV1:
        if not isinstance(parent, CgroupV1):
            raise CgroupError(f"parent {parent!r} is not a cgroup v1")
        check_name(name)
        made: list[Path] = []
        mapping: dict[Path, Path] = {}
        try:
            for d in parent.dirs:
                child = d / name
                if _mkdir_checked(child, exist_ok):
                    made.append(child)
                mapping[d] = child
        except CgroupError:
            for child in reversed(made):
                try:
                    kernel._rmdir(child)
                except OSError:
                    pass
            raise
        return cls(name, {c: mapping[p] for c, p in parent.paths.items()})

    def _need(self, controller: str) -> Path:
        if controller not in self.paths:
            raise CgroupError(f"cgroup v1 controller {controller!r} is not mounted "
                              f"(no hierarchy for it under the cgroup root)")
        return self.paths[controller]

    def set_limits(self, limits: Limits) -> None:
        if limits.cpu_quota is not None:
            d = self._need("cpu")
            write_file(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            write_file(d / "cpu.cfs_quota_us", str(limits.cpu_quota_us()))
        if limits.memory_bytes is not None:
            d = self._need("memory")
            write_file(d / "memory.limit_in_bytes", str(limits.memory_bytes))
        if limits.pids_max is not None:
            d = self._need("pids")
            write_file(d / "pids.max", str(limits.pids_max))

    def _file(self, controller: str, name: str) -> str | None:
        d = self.paths.get(controller)
        return None if d is None else read_optional(d / name)

    def usage(self) -> dict[str, float | int | None]:
        ns = _int_or_none(self._file("cpuacct", "cpuacct.usage"))
        return {
            "cpu_seconds": None if ns is None else ns / 1e9,
            "memory_bytes": _int_or_none(self._file("memory", "memory.usage_in_bytes")),
            "memory_peak_bytes": _int_or_none(self._file("memory", "memory.max_usage_in_bytes")),
            "pids": _int_or_none(self._file("pids", "pids.current")),
        }

    def oom_kills(self) -> int | None:
        # "oom_kill N" since Linux 4.13; older kernels only say under_oom / failcnt.
        return parse_keyed(self._file("memory", "memory.oom_control")).get("oom_kill")

    def memory_limit_hits(self) -> int | None:
        return _int_or_none(self._file("memory", "memory.failcnt"))

    def pids_limit_hits(self) -> int | None:
        text = self._file("pids", "pids.events")
        return None if text is None else parse_keyed(text).get("max", 0)
