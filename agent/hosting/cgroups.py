"""Per-object cgroups, cgroup v1 and v2, written directly (no cgroup-tools).

BenchExec's cgroup code is the model: find the version, find our own cgroup in
``/proc/self/cgroup``, nest everything MOAT makes under it, write the interface files
ourselves, and read OOM kills from the kernel's own counters.

Layout (``P`` = ``moat-<run_id>-``, or ``moat-`` without a run id)::

    v1, in every controller hierarchy (cpu, cpuacct, memory, pids) at the agent's own path:
        <agent cgroup>/P objects/P<name>

    v2, in the unified hierarchy:
        <agent cgroup>/P agent          every process that was in <agent cgroup> (see below)
        <agent cgroup>/P objects        controllers enabled in its cgroup.subtree_control
        <agent cgroup>/P objects/P<name>    one leaf per object: cpu.max, memory.max, pids.max

cgroup v2 "no internal processes" rule: a non-root cgroup may not hold processes and hand
controllers to its children (``+cpu`` into its ``cgroup.subtree_control``) at the same time.
The agent's own cgroup normally holds processes: the agent, and on a Mininet node also the
experiment script, the node shells and the other routers' agents (Mininet nodes share the
cgroup of the script that made them). So before enabling controllers there, every process
of that cgroup is moved into the leaf ``P agent`` (as BenchExec does with its
``benchexec_process_`` child). Processes keep every limit and all accounting of the agent's
cgroup, since the leaf is its child. A second agent that later reads ``/proc/self/cgroup``
and finds itself in such a leaf treats the leaf's parent as its own cgroup, so the layout
never nests deeper run after run. The true root cgroup is exempt from the rule and is used
as is. ``moat clean`` never kills the processes of an agent leaf (they are the user's shell
and experiment); it removes the leaf only once it is empty.

On v2 a controller missing from the agent's ``cgroup.controllers`` (systemd enables ``memory``
and ``pids`` for a login session but usually not ``cpu``) is enabled, when
``enable_ancestors`` is set, down the chain of ancestors from the root, with a warning.
The alternative is to start the experiment in a delegated scope
(``systemd-run --scope -p Delegate=yes ...``).

Every name MOAT makes starts with ``moat-<run_id>-`` so that :func:`find_run_cgroups` finds
them after a ``kill -9``. All failures are :class:`CgroupError`.

The low-level file operations (``_read``, ``_write``, ``_mkdir``, ``_rmdir``, ``_kill``) are
module functions so that the unit tests can put a small fake kernel behind a fake tree.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar, Iterable

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

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


# --- low-level file operations (patched by the unit tests' fake kernel) ------------------


def _read(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _mkdir(path: Path) -> None:
    os.mkdir(path)


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def _kill(pid: int, sig: int) -> None:
    os.kill(pid, sig)


def _error(what: str, path: Path, exc: OSError) -> CgroupError:
    hint = ""
    if exc.errno == errno.EBUSY and path.name == "cgroup.subtree_control":
        hint = " (cgroup v2: this cgroup still holds processes)"
    return CgroupError(f"cannot {what} {path}: {exc.strerror or exc}{hint}", exc.errno)


def read_file(path: Path) -> str:
    try:
        return _read(path)
    except OSError as exc:
        raise _error("read", path, exc) from None


def read_optional(path: Path) -> str | None:
    """The file's text, or None when it does not exist (an absent controller or feature)."""
    try:
        return _read(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _error("read", path, exc) from None


def write_file(path: Path, value: str) -> None:
    try:
        _write(path, value)
    except OSError as exc:
        raise _error(f"write {value!r} to", path, exc) from None


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        raise CgroupError(f"not a number: {text!r}") from None


def parse_keyed(text: str | None) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, memory.oom_control, pids.events)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise CgroupError(f"bad cgroup name {name!r} (letters, digits, _.:@+- only)")
    return name


def run_prefix(run_id: str | None) -> str:
    """``moat-<run_id>-``: the start of every cgroup name a run makes."""
    if run_id is None or run_id == "":
        return "moat-"
    check_name(run_id)
    return f"moat-{run_id}-"


def is_agent_leaf(name: str) -> bool:
    return bool(_AGENT_LEAF_RE.match(name))


# --- /proc/self/cgroup and detection -----------------------------------------------------


@dataclass(frozen=True)
class ProcCgroup:
    """One line of /proc/<pid>/cgroup: ``hierarchy-id:controller,list:/path``."""

    hierarchy: int
    controllers: tuple[str, ...]
    path: str


def parse_proc_cgroup(text: str) -> list[ProcCgroup]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise CgroupError(f"bad /proc/self/cgroup line {line!r}")
        hid, ctrls, path = parts
        try:
            hierarchy = int(hid)
        except ValueError:
            raise CgroupError(f"bad /proc/self/cgroup line {line!r}") from None
        out.append(ProcCgroup(hierarchy, tuple(c for c in ctrls.split(",") if c), path))
    return out


def _read_proc(proc_self_cgroup: Path) -> list[ProcCgroup]:
    try:
        return parse_proc_cgroup(proc_self_cgroup.read_text())
    except OSError as exc:
        raise CgroupError(f"cannot read {proc_self_cgroup}: {exc.strerror}", exc.errno) from None


def _is_hierarchy(path: Path) -> bool:
    return (path / "cgroup.procs").is_file()


def _v1_mount(root: Path, controllers: tuple[str, ...]) -> Path | None:
    """Where a v1 hierarchy is mounted: ``cpu,cpuacct`` co-mounted, or one dir per controller."""
    for cand in (",".join(controllers), *controllers):
        if cand and _is_hierarchy(root / cand):
            return root / cand
    return None


def _v1_hierarchies(root: Path, lines: list[ProcCgroup]) -> dict[str, tuple[Path, str]]:
    """controller -> (mount dir, our path in that hierarchy), for the controllers MOAT uses."""
    out: dict[str, tuple[Path, str]] = {}
    for line in lines:
        if line.hierarchy == 0:
            continue
        wanted = [c for c in line.controllers if c in V1_CONTROLLERS]
        if not wanted:
            continue
        mount = _v1_mount(root, line.controllers)
        if mount is None:
            continue
        for c in wanted:
            out[c] = (mount, line.path)
    return out


def _v2_mount(root: Path) -> Path:
    return root if (root / "cgroup.controllers").is_file() else root / "unified"


def detect(root: Path = DEFAULT_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> CgroupVersion:
    """v2 when ``root`` is a cgroup2 mount; v1 when controller hierarchies are mounted under it
    (a hybrid mount whose ``unified`` part has no controllers counts as v1); else none."""
    if (root / "cgroup.controllers").is_file():
        return CgroupVersion.V2
    try:
        lines = _read_proc(proc_self_cgroup)
    except CgroupError:
        lines = []
    if _v1_hierarchies(root, lines):
        return CgroupVersion.V1
    unified = root / "unified" / "cgroup.controllers"
    if unified.is_file() and any(line.hierarchy == 0 for line in lines):
        try:
            if set(unified.read_text().split()) & set(V2_CONTROLLERS):
                return CgroupVersion.V2
        except OSError:
            pass
    return CgroupVersion.NONE


def _own_dir(mount: Path, path: str) -> Path:
    """Our cgroup's directory in a hierarchy mounted at ``mount``."""
    if path.startswith("/.."):
        raise CgroupError(f"this process is in cgroup {path}, outside the cgroup namespace "
                          f"of {mount}: give the container its own cgroup namespace")
    rel = path.strip("/")
    full = mount / rel if rel else mount
    if full.is_dir():
        return full
    # A container whose cgroup mount shows only its own subtree (no cgroup namespace): the
    # mount root is some ancestor of our path. Take the longest tail of the path that exists.
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        cand = mount.joinpath(*parts[i:]) if parts[i:] else mount
        if cand.is_dir():
            log.warning("cgroup %s is not under %s; using %s (container mount?)", path, mount, cand)
            return cand
    raise CgroupError(f"cannot find this process's cgroup {path} under {mount}")


# --- the cgroup adapters -----------------------------------------------------------------


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


def kill_procs(list_procs, what: str, timeout: float) -> None:
    """SIGKILL the pids ``list_procs()`` gives until it gives none.

    A pid is opened as a pidfd first and signalled only if it is still listed after the
    open, so a pid that exited and was reused by an unrelated process is never signalled.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        pids = list_procs()
        if not pids:
            return
        _signal_listed(pids, list_procs)
        if time.monotonic() > deadline:
            raise CgroupError(f"processes {pids[:8]} of {what} survive SIGKILL")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _signal_listed(pids: list[int], list_procs) -> None:
    pidfd_open = getattr(os, "pidfd_open", None)
    send = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is None or send is None or _kill is not os.kill:
        for pid in pids:
            try:
                _kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fds[pid] = pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError:
                try:  # no pidfd support after all: plain kill
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        still = set(list_procs())
        for pid, fd in fds.items():
            if pid in still:
                try:
                    send(fd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        for fd in fds.values():
            os.close(fd)


def rmdir_retry(path: Path, timeout: float) -> None:
    """rmdir a cgroup directory; EBUSY (a process still exiting) is retried until timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            _rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise _error("remove", path, exc) from None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _mkdir_checked(path: Path, exist_ok: bool) -> bool:
    """True when it made the directory."""
    try:
        _mkdir(path)
        return True
    except FileExistsError:
        if exist_ok:
            return False
        raise CgroupError(f"cgroup {path} exists already", errno.EEXIST) from None
    except OSError as exc:
        raise _error("create", path, exc) from None


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
                    _rmdir(child)
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


# --- the agent's manager -----------------------------------------------------------------


class CgroupManager:
    """The agent's view: finds its own cgroup, makes one leaf cgroup per object under it.

    ``create(name, limits)`` is all the VM needs; the first call prepares the layout
    described in the module docstring (idempotent, safe for several agents of one node).
    """

    def __init__(self, run_id: str | None = None, *, root: Path = DEFAULT_ROOT,
                 proc_self_cgroup: Path = PROC_SELF_CGROUP, version: CgroupVersion | None = None,
                 owner: str | None = None, enable_ancestors: bool = True) -> None:
        self.root = Path(root)
        self.proc_self_cgroup = Path(proc_self_cgroup)
        self.run_id = run_id
        self.prefix = run_prefix(run_id)
        self.version = version or detect(self.root, self.proc_self_cgroup)
        self.objects_name = self.prefix + (f"{check_name(owner)}-objects" if owner else "objects")
        self.agent_leaf_name = self.prefix + "agent"
        self.enable_ancestors = enable_ancestors
        self._objects: Cgroup | None = None
        self._warned: set[str] = set()

    # the agent's own cgroup

    def agent_cgroup(self) -> Cgroup:
        """A handle on the agent's own cgroup (not made by MOAT; never removed)."""
        lines = _read_proc(self.proc_self_cgroup)
        if self.version is CgroupVersion.V1:
            paths = {c: _own_dir(mount, path)
                     for c, (mount, path) in _v1_hierarchies(self.root, lines).items()}
            if not paths:
                raise CgroupError("no cgroup v1 hierarchy of cpu, cpuacct, memory or pids found")
            return CgroupV1("agent", paths)
        if self.version is CgroupVersion.V2:
            unified = [line for line in lines if line.hierarchy == 0]
            if not unified:
                raise CgroupError(f"no cgroup v2 line (0::/path) in {self.proc_self_cgroup}")
            path = _own_dir(_v2_mount(self.root), unified[0].path)
            if is_agent_leaf(path.name):
                path = path.parent  # an earlier agent moved us into its leaf: use its parent
            return CgroupV2("agent", path)
        raise CgroupError("no usable cgroup controllers on this machine (neither v1 nor v2)")

    # layout

    def objects_cgroup(self) -> Cgroup:
        """The intermediate node ``<agent>/moat-<run>-objects``, made on first use."""
        if self._objects is None:
            agent = self.agent_cgroup()
            if isinstance(agent, CgroupV2):
                self._objects = self._prepare_v2(agent)
            else:
                self._objects = CgroupV1.create(agent, self.objects_name, exist_ok=True)
        return self._objects

    def _prepare_v2(self, agent: CgroupV2) -> CgroupV2:
        wanted = set(V2_CONTROLLERS)
        missing = wanted - agent.controllers()
        if missing and self.enable_ancestors:
            self._enable_in_ancestors(agent, missing)
        usable = wanted & agent.controllers()
        todo = sorted(usable - agent.subtree_control())
        for attempt in range(5):
            if not todo:
                break
            if not agent.is_root():
                self._vacate(agent)
            try:
                for c in todo:
                    agent.enable(c)
                todo = []
            except CgroupError as exc:
                if exc.errno != errno.EBUSY or attempt == 4:
                    raise
                todo = sorted(usable - agent.subtree_control())  # a process slipped in: again
        objects = CgroupV2.create(agent, self.objects_name, exist_ok=True)
        for c in sorted(usable):
            objects.enable(c)
        return objects

    def _vacate(self, agent: CgroupV2) -> None:
        """Move every process of the agent's cgroup into its leaf ``moat-<run>-agent``."""
        if not agent.procs():
            return
        leaf = CgroupV2.create(agent, self.agent_leaf_name, exist_ok=True)
        moved: set[int] = set()
        for _ in range(10):
            pids = agent.procs()
            if not pids or set(pids) <= moved:
                break
            for pid in pids:
                try:
                    leaf.add_process(pid)
                    moved.add(pid)
                except CgroupError as exc:
                    if exc.errno != errno.ESRCH:
                        raise
        log.info("cgroup v2: moved %d process(es) of %s into %s (no internal processes rule)",
                 len(moved), agent.path, leaf.path)

    def _enable_in_ancestors(self, agent: CgroupV2, missing: set[str]) -> None:
        top = _v2_mount(self.root)
        available = set((read_optional(top / "cgroup.controllers") or "").split())
        chain: list[Path] = []
        p = agent.path
        while p != top and top in p.parents:
            p = p.parent
            chain.append(p)
        chain.reverse()  # from the root down to the agent's parent
        for c in sorted(missing & available):
            try:
                for node in chain:
                    CgroupV2(node.name, node).enable(c)
            except CgroupError as exc:
                log.warning("cgroup v2: cannot enable %s down to %s: %s", c, agent.path, exc)
                continue
            log.warning("cgroup v2: enabled controller %s in the ancestors of %s (it was not "
                        "delegated; a delegated scope avoids this)", c, agent.path)

    # objects

    def create(self, name: str, limits: Limits | None = None) -> Cgroup:
        """The leaf cgroup ``moat-<run>-<name>`` of one object, limits written."""
        limits = limits or Limits()
        leaf_name = self.prefix + check_name(name)
        if is_agent_leaf(leaf_name):
            raise CgroupError(f"object name {name!r} is reserved (agent leaves are named so)")
        parent = self.objects_cgroup()
        cg = type(parent).create(parent, leaf_name)
        try:
            self._check_controllers(cg, limits)
            cg.set_limits(limits)
        except BaseException:
            try:
                cg.remove()
            except CgroupError as exc:
                log.warning("%s", exc)
            raise
        return cg

    def _check_controllers(self, cg: Cgroup, limits: Limits) -> None:
        have = cg.controllers()
        if isinstance(cg, CgroupV2):
            have = have | {"cpuacct"}  # cpu.stat is always there on v2
        needs = {"cpu": limits.cpu_quota, "memory": limits.memory_bytes, "pids": limits.pids_max,
                 "cpuacct": None}
        for controller, value in needs.items():
            if controller in have:
                continue
            if value is not None:
                raise CgroupError(f"cgroup {self.version.value} controller {controller!r} is "
                                  f"not available here, but the object has a {controller} limit")
            if controller not in self._warned:
                self._warned.add(controller)
                lost = "limits" if (controller == "cpu" and isinstance(cg, CgroupV2)) \
                    else "limits or measurements"  # v2 has cpu.stat without the controller
                log.warning("cgroup %s controller %s not available: objects run without %s %s",
                            self.version.value, controller, controller, lost)

    def remove_objects(self) -> list[Path]:
        """Remove this agent's objects node and every leaf under it; returns what remains."""
        if self._objects is None:
            return []
        kept: list[Path] = []
        for d in self._objects.dirs:
            kept += remove_tree(d)
        self._objects = None
        return kept


# --- finding and removing what a run made (``moat clean``) -------------------------------


def _hierarchy_mounts(root: Path) -> list[Path]:
    if (root / "cgroup.controllers").is_file():
        return [root]
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and _is_hierarchy(p)
                      and not p.is_symlink())
    except OSError:
        return []


def _subtree(path: Path) -> Iterable[Path]:
    for dirpath, dirnames, _ in os.walk(path):
        yield Path(dirpath)


def find_run_cgroups(run_id: str, root: Path = DEFAULT_ROOT) -> list[Path]:
    """Every cgroup directory run ``run_id`` made, in every hierarchy, leaves first."""
    if not run_id:
        raise CgroupError("find_run_cgroups needs a run id")
    prefix = run_prefix(run_id)
    found: set[Path] = set()
    for mount in _hierarchy_mounts(Path(root)):
        for dirpath, dirnames, _ in os.walk(mount):
            for d in list(dirnames):
                if d.startswith(prefix):
                    found.update(_subtree(Path(dirpath) / d))
                    dirnames.remove(d)
    return sorted(found, key=lambda p: (-len(p.parts), str(p)))


def remove_tree(path: Path, timeout: float = KILL_TIMEOUT) -> list[Path]:
    """Remove a cgroup directory and everything below it, leaves first, killing processes.

    Agent leaves (``moat-<run>-agent``) are the exception: their processes are the user's
    shell and experiment, so a populated one is left alone. Returns the directories left.
    """
    path = Path(path)
    if not path.is_dir():
        return []
    dirs = sorted(_subtree(path), key=lambda p: (-len(p.parts), str(p)))
    return _remove_dirs(dirs, timeout)


def _procs_of(d: Path) -> list[int]:
    text = read_optional(d / "cgroup.procs")
    return sorted(int(x) for x in (text or "").split())


def _remove_dirs(dirs: list[Path], timeout: float) -> list[Path]:
    kept: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        if any(k.is_relative_to(d) for k in kept):
            kept.append(d)  # a kept child keeps its parents
            continue
        if is_agent_leaf(d.name) and _procs_of(d):
            log.warning("leaving %s: it holds processes that are not MOAT's objects", d)
            kept.append(d)
            continue
        kill = d / "cgroup.kill"
        if kill.exists() and _procs_of(d):
            try:
                write_file(kill, "1")
            except CgroupError:
                pass
        kill_procs(lambda d=d: _procs_of(d), str(d), timeout)
        rmdir_retry(d, timeout)
    return kept


def clean_run(run_id: str, root: Path = DEFAULT_ROOT,
              timeout: float = KILL_TIMEOUT) -> tuple[list[Path], list[Path]]:
    """Remove every cgroup of run ``run_id``: (removed, kept) directories."""
    dirs = find_run_cgroups(run_id, root)
    kept = _remove_dirs(dirs, timeout)
    return [d for d in dirs if d not in kept], kept
