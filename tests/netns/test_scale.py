"""Agents on the parametric topology (issue 3, line 2): an object registers from the farthest
foreign network of a ScaleTopo."""

from __future__ import annotations

from topologies.moatnet import MoatNetwork
from topologies.scale import ScaleTopo


def test_registration_across_scale_topology() -> None:
    topo = ScaleTopo(n_foreign=3, routers_per_net=2)
    with MoatNetwork(topo, objects=["counter", "echo"]) as m:
        last = max(n for n, spec in topo.networks.items() if spec.kind == "foreign")
        host_router = topo.networks[last].routers[-1]
        m.start_object("echo", host_router)
        rows = m.wait_for(lambda: m.agent(m.hoa).call("bindings"), timeout=15)
        assert rows[0]["home_address"] == m.objects["echo"].home_address
        assert rows[0]["care_of_address"] == f"10.{last}.0.1"
        assert len(m.foreign_agents) == 3 * 2
