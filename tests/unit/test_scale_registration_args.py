"""register_many refuses what it cannot run before sending anything, and its figures and
the HOA-cost benchmark's are computed as documented (no root, no network)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from experiments.bench_bindings import parse_sizes, step_row
from experiments.regswarm import Outcome, summary
from experiments.scale_registration import (
    ScaleRegistrationError,
    register_many,
    swarm_object_names,
)
from topologies.moatnet import MoatNetwork
from topologies.run import Run
from topologies.scale import ScaleTopo


def test_swarm_object_names() -> None:
    assert swarm_object_names(3) == ["m0000", "m0001", "m0002"]
    assert swarm_object_names(0) == []
    for bad in (-1, 10_000, True, 2.0):
        with pytest.raises(ScaleRegistrationError):
            swarm_object_names(bad)  # type: ignore[arg-type]


@pytest.fixture
def net(tmp_path: Path) -> MoatNetwork:
    """A network configured (its objects file written) but not started."""
    from topologies.client import write_objects

    moat = MoatNetwork(ScaleTopo(n_foreign=2, routers_per_net=1),
                       objects=["counter", *swarm_object_names(200)], run=Run(root=tmp_path))
    moat.run.dir.mkdir(parents=True, exist_ok=True)
    write_objects(moat.run, moat._object_configs())
    return moat


@pytest.mark.parametrize("kwargs, match", [
    (dict(count=0), "positive"),
    (dict(count=201), "200 swarm objects"),
    (dict(count=5, names=["counter"]), "not swarm objects"),
    (dict(count=2, names=["m0001", "m0001"]), "distinct"),
    (dict(count=5, foreign_networks=[16]), "not a foreign network"),
    (dict(count=5, foreign_networks=[]), "no foreign network"),
    (dict(count=129, foreign_networks=[101, 102]), "do not fit"),  # 2 FOAs x 64
    (dict(count=5, lifetime=0), "lifetime"),
])
def test_register_many_refuses_what_cannot_run_before_any_packet(net, kwargs, match) -> None:
    count = kwargs.pop("count")
    with pytest.raises(ScaleRegistrationError, match=match):
        register_many(net, count, **kwargs)


def test_register_many_needs_the_runs_objects_file(tmp_path: Path) -> None:
    bare = SimpleNamespace(run=SimpleNamespace(dir=tmp_path))
    with pytest.raises(ScaleRegistrationError, match="cannot read the run's objects"):
        register_many(bare, 1)


def test_summary_times_the_last_acceptance_and_only_when_all_came() -> None:
    outcomes = [Outcome("a", "m0", "10.16.0.100", 0, 0.010, 11.0),
                Outcome("a", "m1", "10.16.0.101", 1, 0.030, 12.5),
                Outcome("b", "m2", "10.16.0.102", 0, 0.020, 11.5)]
    s = summary(outcomes, since=10.0)
    assert (s["registered"], s["seconds"], s["rtt_p50_ms"], s["rtt_max_ms"]) == (3, 2.5, 20.0, 30.0)
    assert s["networks"]["b"]["seconds"] == 1.5 and s["failed_count"] == 0
    outcomes.append(Outcome("b", "m3", "10.16.0.103", 133, 0.02, None, error="replay"))
    s = summary(outcomes, since=10.0)
    assert s["seconds"] is None and s["last_accepted_s"] == 2.5 and s["failed_count"] == 1
    assert s["failed"] == [{"name": "m3", "network": "b", "code": 133, "error": "replay"}]


def test_bench_bindings_sizes_and_rows() -> None:
    assert parse_sizes("100,1000") == [100, 1000]
    for bad in ("", "1000,100", "100,100", "0,5", "x", "2000"):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    row = step_row(1000, 900, 3.21, 0.45, 10.0, 0.12, 70.5, 900)
    assert row["hoa_cpu_per_registration_ms"] == 0.5 and row["hoa_idle_cpu_pct"] == 1.2
    assert step_row(0, 0, None, 0.0, 10.0, 0.1, 60.0, 0)["hoa_cpu_per_registration_ms"] is None
