"""Where the handoff experiment moves its object on each topology (issue 15, item 5)."""

from __future__ import annotations

import pytest

from experiments.handoff import CO_HOSTS, ITINERARY, HandoffPlanError, handoff_columns, plan_for
from topologies.catalog import make_topo


def test_the_patent_plan_is_unchanged() -> None:
    plan = plan_for(make_topo("patent"))
    assert plan.co_hosts == CO_HOSTS and plan.itinerary == ITINERARY and plan.home_router == "r22c"
    assert [c[0] for c in plan.captures] == ["home_lan", "foreign_lan_12", "backbone_r22a_r18a"]


def test_on_the_scale_topology_the_object_goes_between_the_farthest_foreign_networks() -> None:
    topo = make_topo("scale,n_foreign=6,routers_per_net=3")
    plan = plan_for(topo)
    assert plan.itinerary == [("net 101", "r101c"), ("net 106", "r106c"), ("home", "r22c")]
    assert plan.co_hosts == {"co101": "net 101", "co106": "net 106", "dns23": "home"}
    name, link, node = plan.captures[2]
    assert node == "r22a" and name == "backbone_r22a_r101a"
    assert any(i.name == link and i.peer == "r101a" for i in topo.interfaces("r22a"))
    assert "lost_co106" in handoff_columns(plan.co_hosts)


def test_one_foreign_network_is_not_enough() -> None:
    with pytest.raises(HandoffPlanError, match="two foreign networks"):
        plan_for(make_topo("scale,n_foreign=1,routers_per_net=2"))
