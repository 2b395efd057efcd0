"""Which cgroup version this machine has, and where this process's own cgroup is.

BenchExec's cgroup code is the model: find the version, find our own cgroup in
``/proc/self/cgroup``, and nest everything MOAT makes under it. This module reads
``/proc/self/cgroup`` (:func:`parse_proc_cgroup`), finds the v1 controller hierarchies and
the v2 mount (including hybrid mounts and containers that see only their own subtree), and
answers :func:`detect`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from agent.hosting.cgroups.base import (
    DEFAULT_ROOT,
    PROC_SELF_CGROUP,
    V1_CONTROLLERS,
    V2_CONTROLLERS,
    CgroupError,
    CgroupVersion,
)

__all__ = ["ProcCgroup", "parse_proc_cgroup", "detect"]

log = logging.getLogger(__name__)


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
