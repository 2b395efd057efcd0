"""Issue 15, item 2: the address plan has room for 1,000 objects and more (1,878), and every
user of the plan agrees on the wider home network: the topologies' addresses and routes,
the agents' home prefix checks, MoatNetwork's objects."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.core import fields
from agent.hosting.objects import check_home_address
from topologies import addressing
from topologies.addressing import (
    HOME_NETWORK,
    HOME_PREFIX_LEN,
    MAX_OBJECTS,
    home_address,
    lan_subnet,
    mo_home_addresses,
)
from topologies.errors import AddressPlanError
from topologies.patent import PatentTopo
from topologies.scale import ScaleTopo

HOA = "10.16.0.2"


def test_the_plan_has_room_for_a_thousand_objects_all_distinct_on_the_home_network() -> None:
    homes = mo_home_addresses()
    assert len(homes) == len(set(homes)) == MAX_OBJECTS >= 1000
    home_net = lan_subnet(HOME_NETWORK)
    assert home_net == IPv4Network(f"10.16.0.0/{HOME_PREFIX_LEN}")
    for h in homes:
        assert h in home_net and h not in (home_net.network_address, home_net.broadcast_address)
        assert int(h) & 0xFF not in (0, 255)
    # The first hundred are the old ones, in the old order: objects keep their addresses.
    assert homes[:100] == [IPv4Address(f"10.16.0.{o}") for o in range(100, 200)]
    assert homes[100] == IPv4Address("10.16.1.1") and homes[-1] == IPv4Address("10.16.7.254")


def test_home_address_by_index_is_the_list_and_refuses_beyond_it() -> None:
    homes = mo_home_addresses()
    assert [home_address(i) for i in range(len(homes))] == homes
    for bad in (len(homes), -1, True, "3"):
        with pytest.raises(AddressPlanError):
            home_address(bad)  # type: ignore[arg-type]
    # A /24 LAN has only the first hundred.
    assert len(mo_home_addresses(12)) == 100
    with pytest.raises(AddressPlanError, match="beyond"):
        home_address(100, 12)


def test_the_agents_home_prefix_checks_take_every_plan_address_and_nothing_past_it() -> None:
    assert fields.HOME_PREFIX_LEN == HOME_PREFIX_LEN
    assert fields.home_network(HOA) == lan_subnet(HOME_NETWORK)
    homes = mo_home_addresses()
    for h in homes[::7] + homes[-1:]:  # every block, its first and last (a sample: fast)
        check_home_address(str(h), HOA, {"10.16.0.3"})
        assert fields.home_address(str(h), HOA, "h") == str(h)
    for outside in ("10.16.8.1", "10.15.255.254", "10.17.0.100"):
        with pytest.raises(ValueError):
            check_home_address(outside, HOA, set())
        with pytest.raises(fields.FieldError):
            fields.home_address(outside, HOA, "h")


@pytest.mark.parametrize("topo", [PatentTopo(), ScaleTopo(n_foreign=4, routers_per_net=2)],
                         ids=["patent", "scale"])
def test_no_node_in_the_home_blocks_and_every_router_routes_them_home(topo) -> None:
    homes = set(mo_home_addresses())
    home_net = lan_subnet(HOME_NETWORK)
    for node, addrs in topo.all_addresses().items():
        for a in addrs:
            assert a.ip not in homes, node
            if a.ip in home_net:  # every home-LAN node has the whole /21 on-link: it ARPs
                assert a.network == home_net, node  # for any home address, the HOA answers
    for router in topo.router_names():
        if any(a.network == home_net for a in topo.addresses(router)):
            continue
        routed = [IPv4Network(r.prefix) for r in topo.routes(router)]
        assert home_net in routed, router  # the last home address goes home like the first
        for h in (min(homes), max(homes)):
            assert [n for n in routed if h in n] == [home_net]


def test_a_network_with_a_thousand_objects_gives_each_its_own_home_address(tmp_path) -> None:
    from topologies.moatnet import MoatNetwork
    from topologies.run import Run

    names = [f"o{i}" for i in range(1000)]
    net = MoatNetwork(PatentTopo(), objects=names, run=Run(root=tmp_path))
    homes = [net.objects[n].home_address for n in names]
    assert len(set(homes)) == 1000
    assert homes == [str(a) for a in mo_home_addresses()[:1000]]
    hoa = net.agent_config(net.hoa).home
    assert hoa is not None and {o.home_address for o in hoa.objects} == set(homes)


def test_the_docstring_says_how_many_objects_the_plan_holds() -> None:
    doc = addressing.__doc__ or ""
    assert f"{MAX_OBJECTS:,}" in doc and f"/{HOME_PREFIX_LEN}" in doc
