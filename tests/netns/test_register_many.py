"""Issue 15, item 2: 1,000 objects register through their FOAs within 10 s of the network
being up, and the HOA holds the 1,000 bindings (real FOAs, real HOA, authenticated; the
objects are registration clients run by ``register_many``)."""

from __future__ import annotations

import pytest

from experiments.scale_registration import register_many, swarm_object_names
from topologies.moatnet import MoatNetwork
from topologies.scale import ScaleTopo


COUNT = 1000


@pytest.fixture(scope="module")
def run():
    # 8 networks of 2 routers: 16 FOAs of 64 visitors each hold the 1,000 objects.
    net = MoatNetwork(ScaleTopo(n_foreign=8, routers_per_net=2),
                      objects=swarm_object_names(COUNT), log_level="WARNING")
    with net:
        yield net


def test_a_thousand_objects_register_through_their_foas(run: MoatNetwork) -> None:
    """Every one registers, through real FOAs, and the HOA holds them all. How long it took
    is printed (the 10 s target is `moat bench scale`'s figure, not a timed assertion)."""
    result = register_many(run, COUNT)
    print(f"{result.registered} objects registered in {result.seconds} s; HOA holds "
          f"{result.hoa_bindings}; round trips p50 {result.summary['rtt_p50_ms']} ms, "
          f"max {result.summary['rtt_max_ms']} ms")
    assert result.complete, result.summary["failed"]
    assert result.seconds is not None
    assert result.hoa_bindings == COUNT
    bindings = {b["home_address"]: b for b in run.agent(run.hoa, timeout=30).call("bindings")}
    assert len(bindings) == COUNT
    # Each binding is at the care-of address of the FOA its object registered through.
    for outcome in result.outcomes[::97]:
        assert bindings[outcome.home_address]["care_of_address"] == outcome.care_of_address
    # Every FOA holds its share of visitors, and the HOA proxies for every home address.
    visitors = sum(len(run.agent(r).call("visitors")) for r in run.foreign_agents)
    assert visitors == COUNT
    proxied = set(run.agent(run.hoa).call("status")["proxy_arp"])
    assert {o.home_address for o in result.outcomes} <= proxied
