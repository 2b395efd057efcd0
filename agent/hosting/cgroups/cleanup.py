"""Finding and removing what a run made (``moat clean``), even after a ``kill -9``.

Every cgroup MOAT makes is named ``moat-<run_id>-...``, so a run's cgroups are found by
name in every hierarchy (:func:`find_run_cgroups`) and removed leaves first, their processes
killed (:func:`remove_tree`, :func:`clean_run`). Agent leaves are the exception: their
processes are the user's shell and experiment, so a populated one is left alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from agent.hosting.cgroups.base import DEFAULT_ROOT, KILL_TIMEOUT, CgroupError, is_agent_leaf, run_prefix
from agent.hosting.cgroups.detect import _is_hierarchy
from agent.hosting.cgroups.kernel import kill_procs, read_optional, rmdir_retry, write_file

__all__ = ["find_run_cgroups", "remove_tree", "clean_run"]

log = logging.getLogger(__name__)


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
