"""Shared builder for MOAT topologies: LANs, routers, hosts, backbone links, routes.

A Mininet ``Topo`` is pure data, and MOAT keeps it that way: :class:`MoatTopo` assigns
every address from :mod:`topologies.addressing`, names every interface, computes every
static route with :func:`topologies.routing.compute_routes`, and writes the results into
node and link params. Building needs no root and no Mininet network, so unit tests and
experiments can inspect a topology (``topo.addresses('r22b')``, ``topo.hoa``) before — or
without — running it, and ``mn --custom`` gets exactly the same network as
:func:`topologies.net.build_net`.

Conventions every topology built with these helpers follows:

* one Linux bridge per network, the switch ``s<network>`` (``s16``); in the kernel its
  name is scoped to the run, ``<tag>-s16`` (:mod:`topologies.naming`), set by
  :func:`topologies.net.scope_topology` when the network is built;
* a node's LAN link is its first link, so its LAN interface is ``<node>-eth0`` and
  Mininet's ``node.IP()`` is its LAN address;
* backbone links join border routers only, numbered in creation order (``/30`` #k);
* routers forward and carry explicit routes; hosts get a single default route when all
  their routes share one next hop (otherwise explicit routes).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)
from mininet.topo import Topo

from topologies.addressing import (
    BORDER_OCTET,
    CO_OCTET,
    DNS_OCTET,
    HOME_NETWORK,
    HOST_OCTETS,
    ROUTER_OCTETS,
    SITE_OCTET,
    backbone_pair,
    check_ifname,
    lan_address,
    lan_subnet,
)
from topologies.errors import AddressPlanError, TopologyParamError
from topologies.bridge import MoatBridge
from topologies.links import MoatLink
from topologies.nodes import MoatHost, MoatRouter
from topologies.dns import DnsServer
from topologies.site import RemoteSite
from topologies.routing import Route, compute_routes, default_gateway, router_hops

__all__ = [
    "InterfaceSpec",
    "NetworkSpec",
    "BackboneSpec",
    "MoatTopo",
    "check_bw",
    "check_delay",
    "check_loss",
    "as_bool",
    "router_letter",
]

log = logging.getLogger(__name__)

#: Largest bandwidth Mininet's TCIntf accepts (Mbit/s).
MAX_BW_MBIT: float = 1000.0


@dataclass(frozen=True)
class InterfaceSpec:
    """One addressed interface of a router or host."""

    node: str
    name: str
    address: IPv4Interface
    peer: str  # the switch for a LAN interface, the other router for a backbone one

    @property
    def network(self) -> IPv4Network:
        return self.address.network


@dataclass
class NetworkSpec:
    """One LAN (a patent "network"): its number, subnet, bridge and members."""

    number: int
    subnet: IPv4Network
    switch: str
    kind: str  # "home" or "foreign"
    border: str | None = None
    routers: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BackboneSpec:
    """One point-to-point link between border routers."""

    index: int
    subnet: IPv4Network
    ends: tuple[InterfaceSpec, InterfaceSpec]
    bw: float | None
    delay: str | None
    loss: float | None


def as_bool(value: Any, name: str) -> bool:
    """Accept a bool or the strings ``mn --topo x,flag=True`` passes through."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise TopologyParamError(f"{name} must be a boolean, got {value!r}")


def check_bw(value: Any, name: str) -> float | None:
    """A bandwidth in Mbit/s in (0, 1000], or ``None`` for an unshaped link."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TopologyParamError(f"{name} must be a number of Mbit/s, got {value!r}")
    if not 0 < value <= MAX_BW_MBIT:
        raise TopologyParamError(f"{name} must be in (0, {MAX_BW_MBIT:g}] Mbit/s, got {value}")
    return float(value)


def check_delay(value: Any, name: str) -> str | None:
    """A one-way delay: ``None``, a number of milliseconds, or a tc time (``"5ms"``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TopologyParamError(f"{name} must be a delay, got {value!r}")
    if isinstance(value, numbers.Real):
        if value < 0:
            raise TopologyParamError(f"{name} must not be negative, got {value}")
        return f"{value:g}ms"
    if isinstance(value, str) and value.strip():
        text = value.strip()
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        try:
            if float(digits) < 0:
                raise ValueError
        except ValueError:
            raise TopologyParamError(f"{name} must look like '5ms', got {value!r}") from None
        return text
    raise TopologyParamError(f"{name} must be a delay, got {value!r}")


def check_loss(value: Any, name: str) -> float | None:
    """A loss percentage in [0, 100], or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 100:
        raise TopologyParamError(f"{name} must be a percentage in [0, 100], got {value!r}")
    return float(value)


def router_letter(index: int) -> str:
    """``0 -> 'a'``, ``1 -> 'b'``, ... : the patent's router suffixes (22a, 22b, 22c)."""
    if not 0 <= index < len(ROUTER_OCTETS):
        raise TopologyParamError(f"at most {len(ROUTER_OCTETS)} routers per network")
    return "abcdefghijklmnopqrstuvwxyz"[index]


class MoatTopo(Topo):
    """Base class: subclasses implement ``build()`` with the ``add_*`` helpers.

    After ``build()`` the constructor computes and stores the static routes, so a
    constructed topology is complete. Attributes for experiments:

    * ``networks`` — network number -> :class:`NetworkSpec`;
    * ``backbone`` — the :class:`BackboneSpec` list, in /30 order;
    * ``home_network`` — 16; ``hoa`` — the router meant to run the home object agent;
    * ``foas`` — foreign network number -> router meant to run its foreign object agent.
    """

    def __init__(self, *args: Any, **params: Any) -> None:
        self.networks: dict[int, NetworkSpec] = {}
        self.backbone: list[BackboneSpec] = []
        self.home_network: int = HOME_NETWORK
        self.hoa: str | None = None
        self.foas: dict[int, str] = {}
        self._ifaces: dict[str, list[InterfaceSpec]] = {}
        self._routers: list[str] = []
        self._end_hosts: list[str] = []
        self._lan_opts: dict[str, Any] = {}
        super().__init__(*args, **params)
        self._assign_routes()

    # ----------------------------------------------------------------- building blocks

    def set_lan_link_options(self, bw: float | None = None) -> None:
        """Shape every LAN link added afterwards (``bw`` Mbit/s on both ends)."""
        self._lan_opts = {} if bw is None else {"bw": bw}

    def add_lan(self, number: int, kind: str) -> NetworkSpec:
        """Add network ``number`` as one Linux bridge, the switch ``s<number>`` (STP off)."""
        if number in self.networks:
            raise AddressPlanError(f"network {number} added twice")
        if kind not in ("home", "foreign"):
            raise TopologyParamError(f"network kind must be 'home' or 'foreign', got {kind!r}")
        switch = check_ifname(f"s{number}")
        # STP off: each LAN is a single bridge, so there is no loop to break, and STP
        # would hold ports in "listening" for ~30 s after start.
        # The kernel name is the run's (``<tag>-s16``, topologies.naming), set when a run
        # scopes the topology (topologies.net.scope_topology); the node stays ``s16``.
        self.addSwitch(switch, cls=MoatBridge, stp=False)
        spec = NetworkSpec(number, lan_subnet(number), switch, kind)
        self.networks[number] = spec
        return spec

    def add_router(
        self, name: str, network: int, octet: int, border: bool = False, **params: Any
    ) -> str:
        """Add router ``name`` at ``10.<network>.0.<octet>`` on that network's LAN."""
        spec = self._network(network)
        if border and spec.border is not None:
            raise AddressPlanError(f"network {network} already has border router {spec.border}")
        if octet not in ROUTER_OCTETS or (octet == BORDER_OCTET) != border:
            raise AddressPlanError(
                f"{name}: router octet .{octet} breaks the plan (border = .{BORDER_OCTET}, "
                f"other routers .{ROUTER_OCTETS.start + 1}-.{ROUTER_OCTETS.stop - 1})"
            )
        addr = lan_address(network, octet)
        self.addNode(
            name, cls=MoatRouter, ip=str(addr), network=network, role="router",
            border=border, **params,
        )
        self._routers.append(name)
        spec.routers.append(name)
        if border:
            spec.border = name
        self._lan_link(name, spec, addr)
        return name

    def add_end_host(
        self, name: str, network: int, octet: int, role: str, cls: type = MoatHost, **params: Any
    ) -> str:
        """Add host ``name`` (a server or corresponding object) on a network's LAN."""
        spec = self._network(network)
        if octet not in HOST_OCTETS:
            raise AddressPlanError(
                f"{name}: host octet .{octet} is outside .{HOST_OCTETS.start}-"
                f".{HOST_OCTETS.stop - 1}"
            )
        addr = lan_address(network, octet)
        self.addNode(name, cls=cls, ip=str(addr), network=network, role=role, **params)
        self._end_hosts.append(name)
        spec.hosts.append(name)
        self._lan_link(name, spec, addr)
        return name

    def add_backbone(
        self,
        first: str,
        second: str,
        bw: float | None = None,
        delay: str | None = None,
        loss: float | None = None,
    ) -> BackboneSpec:
        """Join two routers with the next backbone /30 (shaped by ``bw``/``delay``/``loss``)."""
        for name in (first, second):
            if name not in self._routers:
                raise TopologyParamError(f"backbone end {name!r} is not a router")
        index = len(self.backbone)
        addr1, addr2 = backbone_pair(index)
        opts: dict[str, Any] = {}
        if bw is not None:
            opts["bw"] = bw
        if delay is not None:
            opts["delay"] = delay
        if loss is not None:
            opts["loss"] = loss
        name1, name2 = self._link(
            first, second, {"ip": str(addr1)}, {"ip": str(addr2)}, opts
        )
        end1 = InterfaceSpec(first, name1, addr1, second)
        end2 = InterfaceSpec(second, name2, addr2, first)
        self._ifaces.setdefault(first, []).append(end1)
        self._ifaces.setdefault(second, []).append(end2)
        spec = BackboneSpec(index, addr1.network, (end1, end2), bw, delay, loss)
        self.backbone.append(spec)
        return spec

    def add_home_network(self) -> NetworkSpec:
        """The patent's home network 16 (Figs. 1 and 6), shared by every MOAT topology.

        ``r22a`` (.1) is the border router; ``r22b`` (.2) is the HOA router and is
        deliberately *not* the border: traffic for a home address arrives from ``r22a``
        over the LAN, so the HOA only gets it by answering ARP for that address (proxy
        ARP), as in Mobile IP. ``r22c`` (.3) hosts the second part of the service
        (Fig. 6). ``dns23`` (.23) and ``site24`` (.24) are the DNS server 23 and the
        remote site 24.
        """
        spec = self.add_lan(HOME_NETWORK, "home")
        self.add_router("r22a", HOME_NETWORK, BORDER_OCTET, border=True)
        self.add_router("r22b", HOME_NETWORK, 2)
        self.add_router("r22c", HOME_NETWORK, 3)
        # The DNS server runs dnsmasq: object names -> home addresses (topologies/dns.py).
        self.add_end_host("dns23", HOME_NETWORK, DNS_OCTET, role="dns", cls=DnsServer)
        # The remote site runs its own sshd serving the logic repository (Figs. 1 and 4).
        self.add_end_host("site24", HOME_NETWORK, SITE_OCTET, role="site", cls=RemoteSite)
        self.hoa = "r22b"
        return spec

    def add_foreign_network(
        self, number: int, routers: list[str], co_host: str | None
    ) -> NetworkSpec:
        """A foreign network: ``routers[0]`` is its border (.1) and its FOA, the rest
        follow at .2, .3, ...; plus an optional corresponding-object host at .30."""
        spec = self.add_lan(number, "foreign")
        for i, name in enumerate(routers):
            self.add_router(name, number, BORDER_OCTET + i, border=(i == 0))
        if co_host:
            self.add_end_host(co_host, number, CO_OCTET, role="co")
        self.foas[number] = routers[0]
        return spec

    # ----------------------------------------------------------------------- queries

    def router_names(self) -> list[str]:
        """Routers, in the order they were added."""
        return list(self._routers)

    def end_host_names(self) -> list[str]:
        """Non-router hosts (servers, corresponding objects), in the order added."""
        return list(self._end_hosts)

    def interfaces(self, node: str) -> list[InterfaceSpec]:
        """The addressed interfaces of ``node``, LAN first."""
        return list(self._ifaces[node])

    def addresses(self, node: str) -> list[IPv4Interface]:
        """The addresses (with prefix) of ``node``, LAN first."""
        return [i.address for i in self._ifaces[node]]

    def all_addresses(self) -> dict[str, list[IPv4Interface]]:
        """Every router's and host's addresses."""
        return {node: self.addresses(node) for node in self._ifaces}

    def routes(self, node: str) -> list[Route]:
        """The explicit routes ``node`` will install (hosts: usually none, see ``gateway``)."""
        return list(self.nodeInfo(node).get("routes", []))

    def gateway(self, node: str) -> str | None:
        """The default gateway of host ``node`` (routers have none)."""
        return self.nodeInfo(node).get("gateway")

    def network_hops(self) -> dict[str, dict[str, int]]:
        """Hops from each network (LAN prefix) to each router, along the static routes: the
        service broker's cost between a corresponding object's network and an instance."""
        return router_hops(
            {node: [i.address for i in ifs] for node, ifs in self._ifaces.items()},
            self._routers,
            [spec.subnet for _, spec in sorted(self.networks.items())],
        )

    def describe(self) -> str:
        """A human-readable table of networks, nodes, addresses and routes."""
        lines = [f"{type(self).__name__}: home network {self.home_network}, HOA {self.hoa}"]
        for number in sorted(self.networks):
            net = self.networks[number]
            lines.append(
                f"network {number} ({net.kind}) {net.subnet} bridge {net.switch} "
                f"border {net.border}"
            )
            for node in net.routers + net.hosts:
                addrs = ", ".join(f"{i.name}={i.address}" for i in self._ifaces[node])
                lines.append(f"  {node:8} {self.nodeInfo(node)['role']:7} {addrs}")
                gw = self.gateway(node)
                if gw:
                    lines.append(f"           default via {gw}")
                for route in self.routes(node):
                    lines.append(f"           {route.prefix} via {route.via}")
        for link in self.backbone:
            a, b = link.ends
            lines.append(
                f"backbone #{link.index} {link.subnet}: {a.node}({a.address.ip}) - "
                f"{b.node}({b.address.ip}) bw={link.bw} delay={link.delay} loss={link.loss}"
            )
        return "\n".join(lines)

    # ---------------------------------------------------------------------- internals

    def _network(self, number: int) -> NetworkSpec:
        try:
            return self.networks[number]
        except KeyError:
            raise TopologyParamError(f"network {number} has not been added") from None

    def _lan_link(self, node: str, spec: NetworkSpec, addr: IPv4Interface) -> None:
        if node in self._ifaces:
            raise AddressPlanError(f"{node}: the LAN link must be the node's first link")
        name, _ = self._link(node, spec.switch, {"ip": str(addr)}, None, dict(self._lan_opts))
        self._ifaces[node] = [InterfaceSpec(node, name, addr, spec.switch)]

    def _link(
        self,
        node1: str,
        node2: str,
        params1: dict[str, Any] | None,
        params2: dict[str, Any] | None,
        opts: dict[str, Any],
    ) -> tuple[str, str]:
        """Add a MoatLink and name both interfaces ``<node>-eth<port>`` explicitly."""
        link_opts: dict[str, Any] = {"cls": MoatLink, **opts}
        if params1:
            link_opts["params1"] = params1
        if params2:
            link_opts["params2"] = params2
        key = self.addLink(node1, node2, **link_opts)
        info = self.linkInfo(node1, node2, key)
        name1 = check_ifname(f"{node1}-eth{info['port1']}")
        name2 = check_ifname(f"{node2}-eth{info['port2']}")
        info["intfName1"], info["intfName2"] = name1, name2
        return name1, name2

    def _assign_routes(self) -> None:
        """Compute static routes and store them in the node params."""
        if not self._ifaces:
            return
        table = compute_routes(
            {node: [i.address for i in ifs] for node, ifs in self._ifaces.items()},
            self._routers,
        )
        for node, node_routes in table.items():
            info = self.nodeInfo(node)
            if node in self._routers:
                info["routes"] = node_routes
                continue
            gateway = default_gateway(node_routes)
            if gateway is not None:
                info["gateway"] = gateway
            elif node_routes:
                info["routes"] = node_routes
        log.debug("%s: routes assigned to %d nodes", type(self).__name__, len(table))
