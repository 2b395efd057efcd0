"""What the VM and distribution tests share: the signed counter service (see
experiments/counter_service.py), a process's cgroups, a router's newest error."""

from __future__ import annotations

from pathlib import Path

from experiments.counter_service import counter_source, publish_counter
from topologies.moatnet import MoatNetwork

__all__ = ["cgroup_dirs", "counter_source", "last_error", "publish"]


def publish(m: MoatNetwork, tmp: Path, service: str, key: Path, cpu: float = 0.2,
            version: str = "1.0") -> None:
    publish_counter(m, service, version, key=key, cpu=cpu, workdir=tmp)


def cgroup_dirs(pid: int, run_id: str) -> list[Path]:
    """The directories of the run's cgroups ``pid`` is in (v1 hierarchies or v2)."""
    dirs = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if run_id not in path:
            continue
        # v1: mounted per controller (or per joined controllers); v2: the root or "unified".
        mounts = {controllers, *controllers.split(",")} if controllers else {"", "unified"}
        for mount in mounts:
            d = Path("/sys/fs/cgroup") / mount / path.lstrip("/")
            if d.is_dir():
                dirs.append(d)
    return dirs


def last_error(m: MoatNetwork, router: str) -> dict:
    """The newest entry of ``router``'s ``errors`` (``moat show errors``); fails if none."""
    errors = m.agent(router).call("errors")
    assert errors, f"{router} lists no error"
    return errors[-1]
