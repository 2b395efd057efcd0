"""A signed counter service for the VM tests: the counter object packaged like a provider
would, and published into a running network's remote site."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from agent.repository import package_service, publish_service
from topologies.moatnet import MoatNetwork

REPO = Path(__file__).resolve().parents[2]


def counter_source(root: Path, cpu: float = 0.2) -> Path:
    src = root / "counter-src" / "counter"
    src.mkdir(parents=True)
    shutil.copy(REPO / "agent" / "objects" / "counter.py", src / "counter_object.py")
    (src / "object.json").write_text(json.dumps(
        {"entry": "counter_object:Counter", "resources": {"cpu": cpu, "memory_mb": 96, "pids": 16}}))
    return src.parent


def publish(m: MoatNetwork, tmp: Path, service: str, key: Path, cpu: float = 0.2,
            version: str = "1.0") -> None:
    signed = package_service(counter_source(tmp, cpu), service, version, "acme", key, tmp / "out")
    publish_service(signed.path, m.net[m.site].repo_root)
