"""Unit tests of topologies/ that need neither root nor a running network.

A Topo is pure data, so the patent layout, the address plan, the computed routes and the
parameter validation are all checked here; tests/netns/test_topologies_net.py checks that
the same data produces a working network.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

pytest.importorskip("mininet.topo", reason="Mininet (Debian package `mininet`) not installed")

from topologies import addressing, links  # noqa: E402
from topologies.addressing import (  # noqa: E402
    AGENT_OCTETS,
    HOST_OCTETS,
    MO_HOME_OCTETS,
    ROUTER_OCTETS,
    backbone_pair,
    check_ifname,
    lan_address,
    mo_home_addresses,
)
from topologies.base import MoatTopo  # noqa: E402
from topologies.errors import (  # noqa: E402
    AddressPlanError,
    RoutingError,
    TopologyParamError,
)
from topologies.links import MoatIntf  # noqa: E402
from topologies.nodes import MoatHost, MoatRouter  # noqa: E402
from topologies.patent import PatentTopo  # noqa: E402
from topologies.routing import Route, compute_routes, default_gateway  # noqa: E402
from topologies.scale import ScaleTopo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- helpers


def lan_neighbours(topo: MoatTopo, node: str) -> set[str]:
    """Names of the nodes ``node`` has links to (switches included)."""
    out = set()
    for n1, n2 in topo.links():
        if node in (n1, n2):
            out.add(n2 if n1 == node else n1)
    return out


def forwarding_walk(topo: MoatTopo, src: str, dst: IPv4Address, max_hops: int = 16) -> list[str]:
    """Follow the topology's routes hop by hop (longest prefix match) from ``src`` to ``dst``.

    Returns the nodes visited; raises AssertionError on a black hole or a loop. A stronger
    check than "a route exists": it proves the routes of *all* nodes on the path agree.
    """
    owner = {a.ip: n for n, addrs in topo.all_addresses().items() for a in addrs}
    assert dst in owner, f"{dst} is nobody's address"
    path = [src]
    node = src
    for _ in range(max_hops):
        if owner[dst] == node:
            return path
        attached = [a for a in topo.addresses(node) if dst in a.network]
        if attached:
            nxt = owner[dst]  # on-link: ARP and deliver
            assert any(dst in a.network for a in topo.addresses(nxt))
        else:
            table = [(IPv4Network(r.prefix), r.via) for r in topo.routes(node)]
            gw = topo.gateway(node)
            if gw:
                table.append((IPv4Network("0.0.0.0/0"), gw))
            matches = [(net, via) for net, via in table if dst in net]
            assert matches, f"{node} has no route to {dst} (path {path})"
            _, via = max(matches, key=lambda m: m[0].prefixlen)
            via_ip = IPv4Address(via)
            assert any(via_ip in a.network for a in topo.addresses(node)), (
                f"{node}: next hop {via} is not on-link"
            )
            nxt = owner[via_ip]
            assert nxt in topo.router_names(), f"{node} routes {dst} via non-router {nxt}"
        assert nxt not in path, f"routing loop {path + [nxt]}"
        path.append(nxt)
        node = nxt
    raise AssertionError(f"{src} -> {dst}: more than {max_hops} hops: {path}")


# ------------------------------------------------------------------------- PatentTopo


PATENT_ROUTERS = {"r22a", "r22b", "r22c", "r18a", "r18b", "r20a"}
PATENT_HOSTS = {"dns23", "site24", "co12", "co14"}


def test_patent_nodes_and_networks() -> None:
    topo = PatentTopo()
    assert set(topo.router_names()) == PATENT_ROUTERS
    assert set(topo.end_host_names()) == PATENT_HOSTS
    assert set(topo.switches()) == {"s12", "s14", "s16"}
    assert set(topo.hosts()) == PATENT_ROUTERS | PATENT_HOSTS  # Mininet's "hosts": non-switches

    nets = topo.networks
    assert set(nets) == {12, 14, 16}
    assert nets[16].kind == "home" and nets[12].kind == nets[14].kind == "foreign"
    assert set(nets[16].routers) == {"r22a", "r22b", "r22c"}
    assert set(nets[16].hosts) == {"dns23", "site24"}
    assert set(nets[12].routers) == {"r18a", "r18b"} and nets[12].hosts == ["co12"]
    assert nets[14].routers == ["r20a"] and nets[14].hosts == ["co14"]
    assert (nets[16].border, nets[12].border, nets[14].border) == ("r22a", "r18a", "r20a")
    assert topo.foas == {12: "r18a", 14: "r20a"}
    for number, spec in nets.items():
        length = 21 if number == 16 else 24  # the home network is wider (issue 15)
        assert spec.subnet == IPv4Network(f"10.{number}.0.0/{length}")
        assert spec.switch == f"s{number}"
        for node in spec.routers + spec.hosts:
            # every node's first interface is on its own network's bridge
            first = topo.interfaces(node)[0]
            assert first.name == f"{node}-eth0" and first.peer == spec.switch
            assert first.address.network == spec.subnet
            assert topo.nodeInfo(node)["network"] == number


def test_patent_node_classes_and_roles() -> None:
    topo = PatentTopo()
    for name in PATENT_ROUTERS:
        assert topo.nodeInfo(name)["cls"] is MoatRouter
    for name in PATENT_HOSTS:
        assert issubclass(topo.nodeInfo(name)["cls"], MoatHost)
    from topologies.site import RemoteSite

    assert topo.nodeInfo("site24")["cls"] is RemoteSite
    roles = {n: topo.nodeInfo(n)["role"] for n in PATENT_HOSTS}
    assert roles == {"dns23": "dns", "site24": "site", "co12": "co", "co14": "co"}
    from mininet.nodelib import LinuxBridge

    from topologies.bridge import MoatBridge

    for sw in topo.switches():
        info = topo.nodeInfo(sw)
        # A Linux bridge whose kernel name is the run's (topologies.naming).
        assert info["cls"] is MoatBridge and issubclass(MoatBridge, LinuxBridge)
        assert info["stp"] is False


def test_patent_named_addresses() -> None:
    topo = PatentTopo()
    lan = {n: topo.addresses(n)[0] for n in PATENT_ROUTERS | PATENT_HOSTS}
    assert lan["r22a"] == IPv4Interface("10.16.0.1/21")
    assert lan["r22b"] == IPv4Interface("10.16.0.2/21")
    assert lan["r22c"] == IPv4Interface("10.16.0.3/21")
    assert lan["dns23"] == IPv4Interface("10.16.0.23/21")
    assert lan["site24"] == IPv4Interface("10.16.0.24/21")
    assert lan["r18a"] == IPv4Interface("10.12.0.1/24")
    assert lan["r18b"] == IPv4Interface("10.12.0.2/24")
    assert lan["r20a"] == IPv4Interface("10.14.0.1/24")
    assert lan["co12"] == IPv4Interface("10.12.0.30/24")
    assert lan["co14"] == IPv4Interface("10.14.0.30/24")
    # Mininet configures the node-level `ip` on eth0: it must equal the LAN address.
    for node, addr in lan.items():
        assert topo.nodeInfo(node)["ip"] == str(addr)


def test_hoa_router_is_not_a_border_router() -> None:
    topo = PatentTopo(triangle=True)  # even with the extra backbone link
    assert topo.hoa == "r22b"
    assert topo.networks[16].border == "r22a" != topo.hoa
    assert topo.nodeInfo("r22b")["border"] is False
    assert lan_neighbours(topo, "r22b") == {"s16"}
    assert [i.address.network for i in topo.interfaces("r22b")] == [IPv4Network("10.16.0.0/21")]
    for link in topo.backbone:
        assert "r22b" not in {end.node for end in link.ends}


def test_backbone_links_and_parameters() -> None:
    topo = PatentTopo(backbone_bw=42, backbone_delay="7ms", backbone_loss=0.5)
    assert [(a.node, b.node) for a, b in (l.ends for l in topo.backbone)] == [
        ("r22a", "r18a"), ("r22a", "r20a"),
    ]
    a, b = topo.backbone[0].ends
    assert (a.address, b.address) == (IPv4Interface("10.255.0.1/30"), IPv4Interface("10.255.0.2/30"))
    a, b = topo.backbone[1].ends
    assert (a.address, b.address) == (IPv4Interface("10.255.0.5/30"), IPv4Interface("10.255.0.6/30"))
    info = topo.linkInfo("r22a", "r18a")
    assert info["bw"] == 42 and info["delay"] == "7ms" and info["loss"] == 0.5
    assert info["params1"]["ip"] in ("10.255.0.1/30", "10.255.0.2/30")
    # LAN links are unshaped unless asked for
    assert "bw" not in topo.linkInfo("r22b", "s16")
    assert topo.linkInfo("r22b", "s16", None)["cls"] is links.MoatLink
    shaped = PatentTopo(lan_bw=10)
    assert shaped.linkInfo("r22b", "s16")["bw"] == 10
    unshaped = PatentTopo(backbone_bw=None)
    assert "bw" not in unshaped.linkInfo("r22a", "r18a")

    tri = PatentTopo(triangle=True)
    assert len(tri.backbone) == 3
    a, b = tri.backbone[2].ends
    assert (a.node, b.node) == ("r18a", "r20a")
    assert tri.backbone[2].subnet == IPv4Network("10.255.0.8/30")
    assert PatentTopo(triangle="True").triangle is True  # as `mn --topo patent,triangle=True`


def test_every_address_unique_and_in_plan() -> None:
    for topo in (PatentTopo(triangle=True), ScaleTopo(n_foreign=5, routers_per_net=4)):
        seen: dict[IPv4Address, str] = {}
        for node, addrs in topo.all_addresses().items():
            for addr in addrs:
                assert addr.ip not in seen, f"{addr.ip} on {seen.get(addr.ip)} and {node}"
                seen[addr.ip] = node
                assert addr.ip not in (addr.network.network_address, addr.network.broadcast_address)
                octet = int(addr.ip) & 0xFF
                if addr.network.prefixlen in (21, 24):
                    assert int(addr.ip) >> 8 & 0xFF == 0  # nodes only in a LAN's first /24
                    assert octet not in MO_HOME_OCTETS and octet not in AGENT_OCTETS
                    if node in topo.router_names():
                        assert octet in ROUTER_OCTETS
                    else:
                        assert octet in HOST_OCTETS
                else:
                    assert addr.network.subnet_of(addressing.BACKBONE_SUPERNET)
                    assert addr.network.prefixlen == 30
        # interface names unique per node and legal
        for node in topo.all_addresses():
            names = [i.name for i in topo.interfaces(node)]
            assert len(names) == len(set(names))
            for name in names:
                assert check_ifname(name) == name


def test_interface_names_match_link_params() -> None:
    topo = PatentTopo()
    for n1, n2, info in topo.links(withInfo=True):
        assert info["intfName1"] == f"{n1}-eth{info['port1']}"
        assert info["intfName2"] == f"{n2}-eth{info['port2']}"
        assert len(info["intfName1"]) <= 15 and len(info["intfName2"]) <= 15


@pytest.mark.parametrize(
    "topo",
    [PatentTopo(), PatentTopo(triangle=True), ScaleTopo(n_foreign=3, routers_per_net=2)],
    ids=["patent", "patent-triangle", "scale-3x2"],
)
def test_routes_reach_every_subnet_from_every_node(topo: MoatTopo) -> None:
    subnets = {a.network for addrs in topo.all_addresses().values() for a in addrs}
    for node in topo.all_addresses():
        attached = {a.network for a in topo.addresses(node)}
        if node in topo.router_names():
            assert topo.gateway(node) is None
            routed = {IPv4Network(r.prefix) for r in topo.routes(node)}
            assert routed == subnets - attached, node
            assert not routed & attached
        else:
            assert topo.gateway(node) is not None, node
            # a host's gateway is its LAN's border router
            net = topo.networks[topo.nodeInfo(node)["network"]]
            assert topo.gateway(node) == str(topo.addresses(net.border)[0].ip)
        # and following the routes hop by hop really gets everywhere
        for other, addrs in topo.all_addresses().items():
            for addr in addrs:
                if other != node:
                    forwarding_walk(topo, node, addr.ip)


def test_patent_paths_cross_the_home_border() -> None:
    topo = PatentTopo()
    path = forwarding_walk(topo, "co14", IPv4Address("10.12.0.30"))
    assert path == ["co14", "r20a", "r22a", "r18a", "co12"]
    assert forwarding_walk(topo, "r22b", IPv4Address("10.14.0.30")) == ["r22b", "r22a", "r20a", "co14"]
    tri = PatentTopo(triangle=True)
    assert forwarding_walk(tri, "co14", IPv4Address("10.12.0.30")) == ["co14", "r20a", "r18a", "co12"]


def test_mobile_object_home_range_is_free() -> None:
    topo = PatentTopo()
    homes = set(mo_home_addresses())
    assert len(homes) == 1878 >= 1000  # issue 15: room for 1,000 objects
    assert min(homes) == IPv4Address("10.16.0.100") and max(homes) == IPv4Address("10.16.7.254")
    used = {a.ip for addrs in topo.all_addresses().values() for a in addrs}
    assert not homes & used


# ---------------------------------------------------------------------------- ScaleTopo


@pytest.mark.parametrize("n,m", [(1, 1), (3, 2), (4, 5), (100, 1), (1, 19)])
def test_scale_sizes(n: int, m: int) -> None:
    topo = ScaleTopo(n_foreign=n, routers_per_net=m)
    assert len(topo.router_names()) == 3 + n * m
    assert len(topo.end_host_names()) == 2 + n
    assert len(topo.switches()) == 1 + n
    assert len(topo.backbone) == n
    assert len(topo.links()) == (3 + n * m) + (2 + n) + n  # one LAN link per node + star
    assert set(topo.networks) == {16} | {100 + i for i in range(1, n + 1)}
    for i in range(1, n + 1):
        number = 100 + i
        spec = topo.networks[number]
        assert spec.subnet == IPv4Network(f"10.{number}.0.0/24")
        assert spec.border == f"r{number}a" == topo.foas[number]
        assert len(spec.routers) == m and spec.hosts == [f"co{number}"]
        end_home, end_foreign = topo.backbone[i - 1].ends
        assert (end_home.node, end_foreign.node) == ("r22a", f"r{number}a")
    assert topo.hoa == "r22b"


def test_scale_home_network_matches_patent() -> None:
    scale, patent = ScaleTopo(n_foreign=2, routers_per_net=2), PatentTopo()
    for node in ("r22a", "r22b", "r22c", "dns23", "site24"):
        assert scale.addresses(node)[0] == patent.addresses(node)[0]


def test_scale_max_size_routes() -> None:
    topo = ScaleTopo(n_foreign=100, routers_per_net=19)
    assert len(topo.router_names()) == 3 + 1900
    assert topo.networks[200].routers[-1] == "r200s"
    path = forwarding_walk(topo, "r200s", IPv4Address("10.101.0.19"))
    assert path == ["r200s", "r200a", "r22a", "r101a", "r101s"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_foreign": 0},
        {"n_foreign": 101},
        {"n_foreign": -1},
        {"n_foreign": 2.5},
        {"n_foreign": True},
        {"n_foreign": "3"},
        {"routers_per_net": 0},
        {"routers_per_net": 20},
        {"routers_per_net": None},
        {"backbone_bw": 0},
        {"backbone_bw": -5},
        {"backbone_bw": 1001},
        {"backbone_bw": "fast"},
        {"backbone_loss": 101},
        {"backbone_loss": -1},
        {"backbone_delay": "soon"},
        {"backbone_delay": -3},
        {"lan_bw": 0},
        {"bogus": 1},
    ],
)
def test_scale_bad_params_raise(kwargs: dict) -> None:
    with pytest.raises(TopologyParamError):
        ScaleTopo(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"backbone_bw": 0},
        {"backbone_bw": 5000},
        {"backbone_loss": 200},
        {"backbone_delay": "x"},
        {"triangle": "maybe"},
        {"lan_bw": -1},
        {"typo_bw": 1},
    ],
)
def test_patent_bad_params_raise(kwargs: dict) -> None:
    with pytest.raises(TopologyParamError) as info:
        PatentTopo(**kwargs)
    assert isinstance(info.value, ValueError)  # typed, and still a ValueError


def test_delay_forms() -> None:
    assert PatentTopo(backbone_delay=5).backbone[0].delay == "5ms"
    assert PatentTopo(backbone_delay="2.5ms").backbone[0].delay == "2.5ms"
    assert PatentTopo(backbone_delay="100us").backbone[0].delay == "100us"


# --------------------------------------------------------------------------- addressing


def test_address_helpers() -> None:
    assert lan_address(16, 2) == IPv4Interface("10.16.0.2/21")
    assert lan_address(12, 2) == IPv4Interface("10.12.0.2/24")
    assert backbone_pair(0) == (IPv4Interface("10.255.0.1/30"), IPv4Interface("10.255.0.2/30"))
    assert backbone_pair(3) == (IPv4Interface("10.255.0.13/30"), IPv4Interface("10.255.0.14/30"))
    assert backbone_pair(16383)[1] == IPv4Interface("10.255.255.254/30")
    for bad in (-1, 16384, True):
        with pytest.raises(AddressPlanError):
            backbone_pair(bad)
    for net, octet in ((0, 1), (255, 1), (16, 0), (16, 255)):
        with pytest.raises(AddressPlanError):
            lan_address(net, octet)
    with pytest.raises(AddressPlanError):
        check_ifname("r12345678901-eth0")  # 17 characters


def test_topology_helpers_enforce_the_plan() -> None:
    class Bad(MoatTopo):
        def build(self, case: str) -> None:
            self.add_lan(16, "home")
            if case == "router-octet":
                self.add_router("r1", 16, 50)  # routers live in .1-.19
            elif case == "border-octet":
                self.add_router("r1", 16, 2, border=True)  # the border is .1
            elif case == "host-octet":
                self.add_end_host("h1", 16, 150, role="co")  # .150 is a home address
            elif case == "long-name":
                self.add_router("router_with_long_name", 16, 1, border=True)
            elif case == "partition":
                self.add_router("r1", 16, 1, border=True)
                self.add_lan(12, "foreign")
                self.add_end_host("h1", 12, 30, role="co")

    for case, exc in (
        ("router-octet", AddressPlanError),
        ("border-octet", AddressPlanError),
        ("host-octet", AddressPlanError),
        ("long-name", AddressPlanError),
        ("partition", RoutingError),
    ):
        with pytest.raises(exc):
            Bad(case)


# ------------------------------------------------------------------------------ routing


def test_compute_routes_line() -> None:
    # h1 - [A] - r1 - [B] - r2 - [C] - h2
    table = compute_routes(
        {
            "h1": ["10.0.1.10/24"],
            "r1": ["10.0.1.1/24", "10.0.2.1/24"],
            "r2": ["10.0.2.2/24", "10.0.3.1/24"],
            "h2": ["10.0.3.10/24"],
        },
        routers={"r1", "r2"},
    )
    assert table["r1"] == [Route("10.0.3.0/24", "10.0.2.2")]
    assert table["r2"] == [Route("10.0.1.0/24", "10.0.2.1")]
    assert table["h1"] == [Route("10.0.2.0/24", "10.0.1.1"), Route("10.0.3.0/24", "10.0.1.1")]
    assert default_gateway(table["h1"]) == "10.0.1.1"
    assert default_gateway([]) is None


def test_compute_routes_hosts_do_not_forward() -> None:
    # The only link between the two LANs is a dual-homed *host*: no route may use it.
    with pytest.raises(RoutingError, match="no path"):
        compute_routes(
            {
                "r1": ["10.0.1.1/24"],
                "h": ["10.0.1.5/24", "10.0.2.5/24"],
                "r2": ["10.0.2.1/24"],
            },
            routers={"r1", "r2"},
        )


def test_compute_routes_ties_and_weights() -> None:
    # A square: r1 reaches [far] through r2 or r3 at equal cost; ties go to the smaller name.
    ifs = {
        "r1": ["10.1.12.1/30", "10.1.13.1/30"],
        "r2": ["10.1.12.2/30", "10.1.24.1/30"],
        "r3": ["10.1.13.2/30", "10.1.34.1/30"],
        "r4": ["10.1.24.2/30", "10.1.34.2/30", "10.9.0.1/24"],
    }
    routers = set(ifs)
    table = compute_routes(ifs, routers)
    far = {r.prefix: r.via for r in table["r1"]}
    assert far["10.9.0.0/24"] == "10.1.12.2"  # via r2
    assert compute_routes(ifs, routers) == table  # deterministic
    heavy = compute_routes(ifs, routers, weights={"10.1.24.0/30": 5})
    assert {r.prefix: r.via for r in heavy["r1"]}["10.9.0.0/24"] == "10.1.13.2"  # via r3
    with pytest.raises(RoutingError):
        compute_routes(ifs, routers, weights={"10.1.24.0/30": 0})


@pytest.mark.parametrize(
    "ifs,routers",
    [
        ({"a": ["10.0.0.1/24"], "b": ["10.0.0.1/24"]}, {"a"}),  # duplicate address
        ({"a": ["10.0.0.0/24"]}, {"a"}),  # network address
        ({"a": ["10.0.0.255/24"]}, {"a"}),  # broadcast address
        ({"a": ["not-an-address"]}, {"a"}),
        ({"a": ["10.0.0.1/24"]}, {"a", "ghost"}),  # router without interfaces
    ],
)
def test_compute_routes_rejects_bad_input(ifs: dict, routers: set) -> None:
    with pytest.raises(RoutingError):
        compute_routes(ifs, routers)


def test_compute_routes_is_pure() -> None:
    ifs = {n: [str(a) for a in addrs] for n, addrs in PatentTopo().all_addresses().items()}
    before = {n: list(a) for n, a in ifs.items()}
    routers = frozenset(PATENT_ROUTERS)
    assert compute_routes(ifs, routers) == compute_routes(ifs, routers)
    assert ifs == before


# -------------------------------------------------------------------------------- links


class _FakeNode:
    name = "x"


def _bare_intf(monkeypatch: pytest.MonkeyPatch) -> tuple[MoatIntf, dict]:
    """A MoatIntf whose TCIntf.config only records what it would have been given."""
    seen: dict = {}

    def fake_config(self, **params):  # noqa: ANN001, ANN202
        seen.update(params)
        return {}

    monkeypatch.setattr(links.TCIntf, "config", fake_config)
    intf = object.__new__(MoatIntf)
    intf.name = "r22a-eth1"
    intf.node = _FakeNode()
    return intf, seen


def test_netem_params_dropped_with_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    intf, seen = _bare_intf(monkeypatch)
    monkeypatch.setattr(links, "netem_available", lambda: False)
    monkeypatch.setattr(links, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="topologies.links"):
        intf.config(bw=10, delay="5ms", loss=1.0, ip="10.255.0.1/30")
    assert seen == {"bw": 10, "ip": "10.255.0.1/30"}
    assert intf.dropped_netem == {"delay": "5ms", "loss": 1.0}
    assert any(
        "netem is not available" in r.getMessage() and "r22a-eth1" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


def test_netem_params_kept_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    intf, seen = _bare_intf(monkeypatch)
    monkeypatch.setattr(links, "netem_available", lambda: True)
    intf.config(bw=10, delay="5ms", jitter="1ms", loss=1.0)
    assert seen == {"bw": 10, "delay": "5ms", "jitter": "1ms", "loss": 1.0}
    assert intf.dropped_netem == {}


def test_bandwidth_only_needs_no_netem(monkeypatch: pytest.MonkeyPatch) -> None:
    intf, seen = _bare_intf(monkeypatch)

    def boom() -> bool:
        raise AssertionError("netem must not be probed for a bandwidth-only link")

    monkeypatch.setattr(links, "netem_available", boom)
    intf.config(bw=100)
    assert seen == {"bw": 100}


@pytest.mark.parametrize("value,expected", [("0", False), ("off", False), ("1", True)])
def test_netem_env_override(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("MOAT_NETEM", value)
    links.netem_available.cache_clear()
    try:
        assert links.netem_available() is expected
    finally:
        links.netem_available.cache_clear()


def test_htb_quantum_is_explicit() -> None:
    intf = object.__new__(MoatIntf)
    intf.node = _FakeNode()
    cmds, parent = intf.bwCmds(bw=100)
    cls_cmd = [c for c in cmds if "classid 5:1 htb" in c]
    assert cls_cmd and cls_cmd[0].endswith("quantum 200000")
    assert parent.strip() == "parent 5:1"
    cmds, _ = intf.bwCmds(bw=0.01)
    assert [c for c in cmds if "classid 5:1 htb" in c][0].endswith("quantum 1514")


def test_importing_topologies_keeps_standard_loggers() -> None:
    # mininet.log swaps logging's logger class process-wide; topologies undoes that.
    import topologies.net  # noqa: F401

    assert logging.getLoggerClass() is logging.Logger
    assert type(logging.getLogger("topologies.test.fresh")) is logging.Logger


# ------------------------------------------------------------------------ mn --custom


def _mn_python() -> str:
    """The interpreter `mn` runs under (its shebang), else this one."""
    mn = shutil.which("mn")
    if mn:
        first = Path(mn).read_text(errors="replace").splitlines()[0]
        if first.startswith("#!") and Path(first[2:].split()[0]).exists():
            return first[2:].split()[0]
    return sys.executable


@pytest.mark.parametrize("filename, offered", [("patent.py", {"patent"}), ("scale.py", {"scale"}),
                                               ("catalog.py", {"patent", "scale"})])
def test_custom_file_loads_like_mn_custom(filename: str, offered: set[str], tmp_path: Path) -> None:
    """Load the file the way `mn --custom` does: exec with bare globals, from another cwd,
    with the repository not on sys.path (-I drops PYTHONPATH and the cwd entry). Each
    topology file offers its own topology; the catalog offers them all."""
    rel = os.path.relpath(REPO / "topologies" / filename, tmp_path)
    script = f"""
import sys
customs = {{}}
exec(compile(open({rel!r}).read(), {rel!r}, 'exec'), customs, customs)
topos = customs['topos']
assert set(topos) == {offered!r}, topos
from topologies.patent import PatentTopo
from topologies.scale import ScaleTopo
p = topos.get('patent', PatentTopo)()
s = topos.get('scale', ScaleTopo)(2, 2)
assert p.hoa == 'r22b' and len(s.router_names()) == 7
print(p.nodeInfo('r22b')['cls'].__module__, len(p.routes('r22b')))
"""
    res = subprocess.run(
        [_mn_python(), "-I", "-c", script],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["topologies.nodes", "4"]


def test_module_main_prints_plan() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "topologies.patent"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "r22b" in res.stdout and "10.255.0.0/30" in res.stdout
    assert ipaddress.IPv4Address("10.16.0.2").exploded in res.stdout


def test_cgroup_mount_commands_rebuild_the_host_layout_in_a_node() -> None:
    from topologies.nodes import cgroup_mount_commands

    mounts = (
        "sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,nosuid,nodev,noexec,relatime,cpu 0 0\n"
        "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n"
        "cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,xattr,name=systemd 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
    )
    cmds = cgroup_mount_commands(mounts)
    assert cmds[0] == "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup"
    assert "mkdir -p /sys/fs/cgroup/cpu && mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu" in cmds
    assert "mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o xattr,name=systemd cgroup /sys/fs/cgroup/systemd" in cmds
    assert cmds[-1] == "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified"
    assert cgroup_mount_commands("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == [
        "mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup"]


# ------------------------------------------------------------------------ catalog


def test_make_topo_parses_like_mn_topo() -> None:
    from topologies.catalog import make_topo

    topo = make_topo("scale,n_foreign=2,routers_per_net=3,backbone_delay=5ms")
    assert isinstance(topo, ScaleTopo) and len(topo.router_names()) == 3 + 2 * 3
    assert isinstance(make_topo(" patent "), PatentTopo)


@pytest.mark.parametrize("spec", ["", "mesh", "patent,backbone_bw", "patent,nosuch=1"])
def test_make_topo_refuses_what_it_cannot_build(spec: str) -> None:
    from topologies.catalog import make_topo

    with pytest.raises(TopologyParamError):
        make_topo(spec)


def test_processes_in_a_netns_are_found_by_the_namespace_not_by_name(tmp_path) -> None:
    """A fake /proc: two processes share pid 10's network namespace, one is elsewhere, one
    cannot be read; only the two are found (pid 10 itself is not)."""
    from topologies.nodes import processes_in_netns_of

    for pid, ns in ((10, "net:[4026531999]"), (11, "net:[4026531999]"), (12, "net:[4026531840]"),
                    (13, "net:[4026531999]")):
        (tmp_path / str(pid) / "ns").mkdir(parents=True)
        (tmp_path / str(pid) / "ns" / "net").symlink_to(ns)
    (tmp_path / "14").mkdir()  # no ns directory (exited meanwhile)
    (tmp_path / "self").mkdir()
    assert processes_in_netns_of(10, proc=tmp_path) == [11, 13]
    assert processes_in_netns_of(99, proc=tmp_path) == []
