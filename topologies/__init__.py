"""MOAT topologies: Mininet ``Topo`` classes, node classes and the address plan.

Modules:

=========================  ==============================================================
``topologies.patent``      :class:`PatentTopo` — Figs. 1 and 6 (networks 12, 14, 16)
``topologies.scale``       :class:`ScaleTopo` — home network + N foreign networks of M
                           routers
``topologies.catalog``     every topology by name; :func:`make_topo` parses ``--topo``
``topologies.base``        :class:`MoatTopo` — shared builder, metadata for experiments
``topologies.moatnet``     :class:`MoatNetwork` — a running testbed (agents, run directory)
``topologies.client``      :class:`RunClient` — the one client of a running network
``topologies.nodes``       :class:`MoatRouter`, :class:`MoatHost` (routes, daemon hook)
``topologies.links``       :class:`MoatLink` — htb shaping, netem degrades to a warning
``topologies.net``         :func:`build_net` / :func:`running_net` — LinuxBridge, no
                           controller
``topologies.routing``     :func:`compute_routes` — pure shortest-path static routes
``topologies.addressing``  the address plan as constants and helpers
=========================  ==============================================================

Address plan (details and reasons in :mod:`topologies.addressing`):

======================  ===================  ===============================================
what                    addresses            nodes
======================  ===================  ===============================================
home network 16         10.16.0.0/21  s16    r22a .1 (border), r22b .2 (HOA), r22c .3,
                                             dns23 .23, site24 .24
mobile-object homes     10.16.0.100-.199,    reserved; never configured on a node
                        then 10.16.1-7.1-254 (1,878 in all)
foreign network 12      10.12.0.0/24  s12    r18a .1 (border, FOA), r18b .2, co12 .30
foreign network 14      10.14.0.0/24  s14    r20a .1 (border, FOA), co14 .30
scale foreign net i     10.(100+i).0.0/24    r<100+i>a .1 (border, FOA), r<100+i>b .2, ...,
(1 <= i <= 100)         s<100+i>             co<100+i> .30
any LAN, .200-.254      agent pool           reserved for agent-made addresses
                                             (virtual interfaces, care-of addresses)
backbone link k         10.255.0.4k/30       first router .4k+1, second .4k+2
patent backbone         #0 r22a .1 - r18a .2, #1 r22a .5 - r20a .6,
                        #2 r18a .9 - r20a .10 (only with ``triangle=True``)
scale backbone          #(i-1) r22a - r<100+i>a (star around r22a)
======================  ===================  ===============================================

Per-LAN host blocks: .1 border router, .2-.19 other routers, .20-.99 hosts, .100-.199
mobile-object home addresses, .200-.254 agent pool. Interfaces are ``<node>-eth<port>``,
the LAN interface is always ``eth0``. Hosts route by default via their LAN's border
router; routers carry explicit routes to every subnet.

The names above are importable from the package (``from topologies import PatentTopo``);
they load lazily so that ``import topologies`` stays cheap and Mininet-free.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PatentTopo",
    "ScaleTopo",
    "MoatTopo",
    "MoatRouter",
    "MoatHost",
    "MoatLink",
    "build_net",
    "running_net",
    "compute_routes",
    "netem_available",
    "make_topo",
    "RunClient",
]

_LAZY = {
    "PatentTopo": "topologies.patent",
    "ScaleTopo": "topologies.scale",
    "MoatTopo": "topologies.base",
    "MoatRouter": "topologies.nodes",
    "MoatHost": "topologies.nodes",
    "MoatLink": "topologies.links",
    "netem_available": "topologies.links",
    "build_net": "topologies.net",
    "running_net": "topologies.net",
    "compute_routes": "topologies.routing",
    "make_topo": "topologies.catalog",
    "RunClient": "topologies.client",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'topologies' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
