"""What every part of the cgroup code shares: constants, the error, the version, limits, names.

Kept free of any file access so that detection, the v1 and v2 adapters, the manager and the
cleanup all build on it without importing each other. Every name MOAT makes starts with
``moat-<run_id>-`` (:func:`run_prefix`) so that :func:`agent.hosting.cgroups.find_run_cgroups`
finds them after a ``kill -9``; the leaf that holds the agent's own processes on v2 is
``moat-<run_id>-agent`` (:func:`is_agent_leaf`). All failures are :class:`CgroupError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from agent.core.errors import AgentError

__all__ = [
    "DEFAULT_ROOT",
    "PROC_SELF_CGROUP",
    "CPU_PERIOD_US",
    "MIN_CPU_QUOTA_US",
    "V2_CONTROLLERS",
    "V1_CONTROLLERS",
    "KILL_TIMEOUT",
    "CgroupError",
    "CgroupVersion",
    "Limits",
    "check_name",
    "run_prefix",
    "is_agent_leaf",
]

DEFAULT_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")

CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses a CFS quota below 1 ms
V2_CONTROLLERS = ("cpu", "memory", "pids")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
KILL_TIMEOUT = 5.0

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,120}$")
_AGENT_LEAF_RE = re.compile(r"^moat-(?:.+-)?agent$")


class CgroupError(AgentError):
    """A cgroup that cannot be found, made, limited, read or removed."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class CgroupVersion(str, Enum):
    V1 = "v1"
    V2 = "v2"
    NONE = "none"


@dataclass(frozen=True)
class Limits:
    """Limits of one object; ``None`` leaves that resource unlimited.

    cpu_quota: CPU time per wall-clock time, in CPUs (0.5 = half of one CPU, 2.0 = two CPUs).
    memory_bytes: memory limit (and no swap, where the kernel lets us say so).
    pids_max: processes and threads the object may have at once.
    """

    cpu_quota: float | None = None
    memory_bytes: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        if self.cpu_quota is not None and not (
                self.cpu_quota * CPU_PERIOD_US >= MIN_CPU_QUOTA_US and self.cpu_quota < 1e6):
            raise CgroupError(f"cpu_quota {self.cpu_quota!r} out of range (>= 0.01 CPU)")
        if self.memory_bytes is not None and (not isinstance(self.memory_bytes, int)
                                              or self.memory_bytes < 4096):
            raise CgroupError(f"memory_bytes {self.memory_bytes!r} must be an int >= 4096")
        if self.pids_max is not None and (not isinstance(self.pids_max, int) or self.pids_max < 1):
            raise CgroupError(f"pids_max {self.pids_max!r} must be an int >= 1")

    def cpu_quota_us(self) -> int | None:
        return None if self.cpu_quota is None else int(round(self.cpu_quota * CPU_PERIOD_US))

    def is_empty(self) -> bool:
        return self.cpu_quota is None and self.memory_bytes is None and self.pids_max is None


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise CgroupError(f"bad cgroup name {name!r} (letters, digits, _.:@+- only)")
    return name


def run_prefix(run_id: str | None) -> str:
    """``moat-<run_id>-``: the start of every cgroup name a run makes."""
    if run_id is None or run_id == "":
        return "moat-"
    check_name(run_id)
    return f"moat-{run_id}-"


def is_agent_leaf(name: str) -> bool:
    return bool(_AGENT_LEAF_RE.fullmatch(name))
