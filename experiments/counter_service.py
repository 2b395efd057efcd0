"""The counter object as a signed service of the run's provider, published to the run's
remote site: what the handoff experiment (``--from-site``), the provisioning benchmark and
the VM tests provision. The archive holds a copy of ``agent/objects/counter.py``, so the
code a router runs is the code the provider signed."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OBJECT_ENTRY = "counter_object:Counter"


def counter_source(root: Path, cpu: float = 0.2, memory_mb: int = 96, pids: int = 16) -> Path:
    """A service source tree under ``root`` with one object, ``counter``; returns the tree."""
    src = Path(root) / "counter-src" / "counter"
    src.mkdir(parents=True)
    shutil.copy(REPO / "agent" / "objects" / "counter.py", src / "counter_object.py")
    (src / "object.json").write_text(json.dumps(
        {"entry": OBJECT_ENTRY, "resources": {"cpu": cpu, "memory_mb": memory_mb, "pids": pids}}))
    return src.parent


def pair_source(root: Path, parts: tuple[str, ...] = ("tally",), cpu: float = 0.2,
                memory_mb: int = 96, pids: int = 16) -> Path:
    """A service source tree with the counter and, as further objects of the same service,
    counters named ``parts``: a mobile counter's *parts* (on its mobile network prefix),
    which can move as secondary objects. Returns the tree."""
    tree = counter_source(root, cpu, memory_mb, pids)
    for part in parts:
        dst = tree / part
        dst.mkdir()
        shutil.copy(REPO / "agent" / "objects" / "counter.py", dst / "counter_object.py")
        (dst / "object.json").write_text(json.dumps(
            {"entry": OBJECT_ENTRY, "resources": {"cpu": cpu, "memory_mb": memory_mb,
                                                  "pids": pids}}))
    return tree


def publish_pair(m: Any, service: str, parts: tuple[str, ...] = ("tally",),
                 version: str = "1.0", workdir: Path | None = None) -> Path:
    """:func:`publish_counter` for :func:`pair_source`'s service."""
    from agent.vm.repository import package_service, publish_service

    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="moat-pair-"))
    try:
        signed = package_service(pair_source(tmp / version, parts), service, version, "acme",
                                 m.provider_key, tmp / version / "out")
        return publish_service(signed.path, m.net[m.site].repo_root)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def publish_counter(m: Any, service: str, version: str = "1.0", key: Path | None = None,
                    cpu: float = 0.2, workdir: Path | None = None) -> Path:
    """Package the counter as ``service`` ``version``, signed with ``key`` (default: the
    run's provider key), and publish it to ``m``'s remote site; returns the published path."""
    from agent.vm.repository import package_service, publish_service

    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="moat-counter-"))
    try:
        signed = package_service(counter_source(tmp / version, cpu), service, version, "acme",
                                 key or m.provider_key, tmp / version / "out")
        return publish_service(signed.path, m.net[m.site].repo_root)
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
