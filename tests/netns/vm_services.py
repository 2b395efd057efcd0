"""The VM tests' signed counter service (see experiments/counter_service.py)."""

from __future__ import annotations

from pathlib import Path

from experiments.counter_service import counter_source, publish_counter
from topologies.moatnet import MoatNetwork

__all__ = ["counter_source", "publish"]


def publish(m: MoatNetwork, tmp: Path, service: str, key: Path, cpu: float = 0.2,
            version: str = "1.0") -> None:
    publish_counter(m, service, version, key=key, cpu=cpu, workdir=tmp)
