"""Static routes computed from a topology's layer-3 graph (pure functions, no root).

MOAT's routers run no routing protocol: the agents' mobility signalling and tunnels are
what the experiments watch, and a routing daemon's own traffic and convergence time would
only blur captures and timings. Routes are therefore computed once, here, from the
addresses the topology assigns, and installed by the node classes when the net is built.

The model is deliberately small. A node has interfaces, each an address with its prefix
(``10.16.0.2/24``); nodes whose interfaces share a subnet are neighbours on that subnet.
Only *routers* forward; a host is a path's end, never its middle. For every node and every
subnet it is not attached to, the route goes to the nearest router attached to that subnet
(Dijkstra; each subnet crossed costs its weight, 1 by default) and names as next hop the
neighbour's address on the shared subnet. Ties are broken by node name and subnet, so the
same topology always yields the same routes.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Collection, Iterable, Mapping
from ipaddress import IPv4Interface, IPv4Network
from typing import NamedTuple

from topologies.errors import RoutingError

__all__ = ["Route", "compute_routes", "default_gateway", "router_hops"]

log = logging.getLogger(__name__)


class Route(NamedTuple):
    """One static route: destination prefix and next-hop address (both as text).

    A plain tuple on purpose: it travels through Mininet's node params and the node
    classes unpack it as ``(prefix, via)``.
    """

    prefix: str
    via: str


def _normalise(
    interfaces: Mapping[str, Iterable[IPv4Interface | str]],
) -> dict[str, list[IPv4Interface]]:
    """Parse every address and reject input routes cannot be computed from."""
    result: dict[str, list[IPv4Interface]] = {}
    owner: dict[object, str] = {}
    for node in sorted(interfaces):
        addrs: list[IPv4Interface] = []
        for raw in interfaces[node]:
            try:
                addr = raw if isinstance(raw, IPv4Interface) else IPv4Interface(raw)
            except ValueError as exc:
                raise RoutingError(f"{node}: bad interface address {raw!r}: {exc}") from exc
            if addr.ip in owner:
                raise RoutingError(
                    f"address {addr.ip} is on both {owner[addr.ip]} and {node}"
                )
            if addr.network.prefixlen < 31 and addr.ip in (
                addr.network.network_address,
                addr.network.broadcast_address,
            ):
                raise RoutingError(f"{node}: {addr} is not a host address of {addr.network}")
            owner[addr.ip] = node
            addrs.append(addr)
        result[node] = addrs
    return result


def _members(
    addrs: Mapping[str, list[IPv4Interface]],
) -> dict[IPv4Network, list[tuple[str, IPv4Interface]]]:
    """subnet -> [(node, its address on the subnet)], sorted for deterministic tie-breaks."""
    members: dict[IPv4Network, list[tuple[str, IPv4Interface]]] = {}
    for node, node_addrs in addrs.items():
        for addr in node_addrs:
            members.setdefault(addr.network, []).append((node, addr))
    for lst in members.values():
        lst.sort(key=lambda item: item[0])
    return members


def compute_routes(
    interfaces: Mapping[str, Iterable[IPv4Interface | str]],
    routers: Collection[str],
    weights: Mapping[IPv4Network | str, int] | None = None,
) -> dict[str, list[Route]]:
    """Shortest-path static routes for every node to every subnet it is not attached to.

    interfaces: node name -> its interface addresses with prefix (``"10.16.0.2/24"``).
    routers: the nodes that forward; others are only sources and destinations.
    weights: optional cost per subnet (default 1), e.g. to prefer one backbone link.

    Returns node name -> routes sorted by prefix. Raises :class:`RoutingError` on a
    duplicate address, a network/broadcast address, an unknown router, a non-positive
    weight, or a subnet some node cannot reach (a partitioned testbed is a bug, not a
    configuration).
    """
    addrs = _normalise(interfaces)
    unknown = set(routers) - set(addrs)
    if unknown:
        raise RoutingError(f"routers without interfaces: {sorted(unknown)}")
    forwarders = frozenset(routers)

    cost: dict[IPv4Network, int] = {}
    for key, value in (weights or {}).items():
        net = key if isinstance(key, IPv4Network) else IPv4Network(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RoutingError(f"weight of {net} must be a positive int, got {value!r}")
        cost[net] = value

    members = _members(addrs)
    subnets = sorted(members)

    routes: dict[str, list[Route]] = {node: [] for node in sorted(addrs)}
    for subnet in subnets:
        next_hop, _dist = _tree_towards(subnet, addrs, members, forwarders, cost)
        attached = {node for node, _ in members[subnet]}
        for node, node_routes in routes.items():
            if node in attached:
                continue
            if node not in next_hop:
                raise RoutingError(f"{node} has no path to {subnet}")
            node_routes.append(Route(str(subnet), next_hop[node]))
    for node, node_routes in routes.items():
        log.debug("routes of %s: %s", node, node_routes)
    return routes


def _tree_towards(
    subnet: IPv4Network,
    addrs: Mapping[str, list[IPv4Interface]],
    members: Mapping[IPv4Network, list[tuple[str, IPv4Interface]]],
    forwarders: frozenset[str],
    cost: Mapping[IPv4Network, int],
) -> tuple[dict[str, str], dict[str, int]]:
    """Shortest-path tree towards ``subnet``: node -> next-hop address on the way there,
    and node -> its distance (subnets crossed; 0 for the routers attached to ``subnet``).

    One multi-source Dijkstra per destination subnet, started from the routers attached
    to it, rather than one per source node: there are far fewer subnets than nodes, and a
    per-destination tree is loop-free by construction. Pops are ordered by (distance,
    name), so equal-cost ties always resolve the same way.
    """
    dist: dict[str, int] = {}
    next_hop: dict[str, str] = {}
    heap: list[tuple[int, str]] = []
    for node, _addr in members[subnet]:
        if node in forwarders:
            dist[node] = 0
            heap.append((0, node))
    heapq.heapify(heap)
    done: set[str] = set()
    while heap:
        d, node = heapq.heappop(heap)
        if node in done:
            continue
        done.add(node)
        if node not in forwarders:
            continue  # hosts end paths, they never carry them
        for addr in sorted(addrs[node], key=lambda a: a.network):
            if addr.network == subnet:
                continue
            nd = d + cost.get(addr.network, 1)
            for neighbour, _ in members[addr.network]:
                if neighbour in done or nd >= dist.get(neighbour, nd + 1):
                    continue
                dist[neighbour] = nd
                next_hop[neighbour] = str(addr.ip)
                heapq.heappush(heap, (nd, neighbour))
    return next_hop, {node: d for node, d in dist.items() if node in done}


def router_hops(
    interfaces: Mapping[str, Iterable[IPv4Interface | str]],
    routers: Collection[str],
    subnets: Iterable[IPv4Network | str],
) -> dict[str, dict[str, int]]:
    """How far each router is from each of ``subnets``, along the routes
    :func:`compute_routes` installs (every subnet weighing 1, as in ``MoatTopo``):
    subnet (text) -> router -> subnets crossed (0 for a router on the subnet itself).

    The service broker uses it as the cost between a corresponding object's network and a
    service instance's router (Fig. 12: prefer an instance close to the CO), so it comes from
    the same Dijkstra as the routes rather than from a second model of the topology.
    """
    addrs = _normalise(interfaces)
    forwarders = frozenset(routers)
    members = _members(addrs)
    out: dict[str, dict[str, int]] = {}
    for raw in subnets:
        subnet = raw if isinstance(raw, IPv4Network) else IPv4Network(raw)
        if subnet not in members:
            raise RoutingError(f"no node is attached to {subnet}")
        _next, dist = _tree_towards(subnet, addrs, members, forwarders, {})
        out[str(subnet)] = {node: d for node, d in sorted(dist.items()) if node in forwarders}
    return out


def default_gateway(routes: Iterable[Route | tuple[str, str]]) -> str | None:
    """The single next hop of ``routes`` if they all share one, else ``None``.

    Lets a host carry one default route instead of a list that says the same thing; a
    host on a LAN whose routers lead to different places keeps explicit routes.
    """
    vias = {via for _prefix, via in routes}
    return vias.pop() if len(vias) == 1 else None
