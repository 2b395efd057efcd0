"""Build and run a Mininet network from a MOAT topology, the way every MOAT tool does.

MOAT's machines have no Open vSwitch and MOAT needs no OpenFlow: each network is one
Linux bridge (:class:`topologies.bridge.MoatBridge`, STP off — one bridge per LAN has no
loop) and there is no controller. What a network creates in the root namespace (bridges,
their ports) is named for its run (:mod:`topologies.naming`), so networks run side by
side. Links are :class:`topologies.links.MoatLink` (htb bandwidth, netem where the kernel
has it). MACs follow the node number (``autoSetMacs``) so captures
are easy to read.

Two promises: a failed build stops whatever it already started (no half-built net, no
orphaned daemons), and :func:`running_net` always stops the net it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)
from mininet.net import Mininet
from mininet.topo import Topo

from topologies.bridge import MoatBridge
from topologies.errors import TopologyError
from topologies.naming import bridge_name, choose_tag, port_name
from topologies.links import MoatLink
from topologies.nodes import MoatHost

__all__ = ["build_net", "running_net", "root_namespace_conflicts", "root_namespace_names",
           "scope_for_run", "scope_topology"]

if TYPE_CHECKING:
    from topologies.run import Run

log = logging.getLogger(__name__)


def scope_topology(topo: Topo, tag: str) -> list[str]:
    """Give ``topo``'s bridges and bridge ports their kernel names for run ``tag``
    (:mod:`topologies.naming`): switch ``s16`` becomes bridge ``<tag>-s16``, its port ``k``
    ``<tag>-s16-k``. Written into the node and link params (the names are computed from the
    topology's own switch names and port numbers, so scoping again with another tag gives
    that tag's names). Returns the names, bridges first."""
    for switch in topo.switches():
        topo.nodeInfo(switch)["bridge"] = bridge_name(tag, switch)
    for node1, node2, info in topo.links(withInfo=True):
        for node, key, port in ((node1, "intfName1", "port1"), (node2, "intfName2", "port2")):
            if topo.isSwitch(node):
                info[key] = port_name(topo.nodeInfo(node)["bridge"], info[port])
    return root_namespace_names(topo)


def scope_for_run(topo: Topo, run: "Run") -> tuple[list[str], list[str]]:
    """Scope ``topo`` to ``run``: reserve the run's tag (:meth:`Run.reserve_tag`), name the
    bridges and ports for it, and refuse (:class:`TopologyError`, nothing recorded) if one
    of those names exists already. Returns (bridges, bridge ports) for ``run.json``; the
    caller records them before anything is created."""
    tag = run.reserve_tag()
    names = scope_topology(topo, tag)
    clashes = root_namespace_conflicts(topo)
    if clashes:
        raise TopologyError(
            f"interfaces of run {run.run_id}'s names already exist in the root namespace: "
            f"{', '.join(clashes)}; they are not this run's and are left alone")
    bridges = [topo.nodeInfo(s)["bridge"] for s in topo.switches()]
    return bridges, [n for n in names if n not in bridges]


def root_namespace_conflicts(topo: Topo, sys_class_net: str = "/sys/class/net") -> list[str]:
    """Names ``topo`` would create in the root namespace that already exist there.

    Bridges and their ports live in the root namespace; a name that exists already belongs
    to another run or a leftover, and is never taken over (nor removed) by this one. Router
    and host interfaces are created directly inside their namespaces and cannot collide.
    """
    try:
        existing = set(os.listdir(sys_class_net))
    except OSError:
        return []
    return sorted(set(root_namespace_names(topo)) & existing)


def root_namespace_names(topo: Topo) -> list[str]:
    """The interfaces ``topo`` creates in the root namespace: bridges (their kernel names,
    once scoped) and their ports."""
    wanted: list[str] = [topo.nodeInfo(s).get("bridge", s) for s in topo.switches()]
    for node1, node2, info in topo.links(withInfo=True):
        for node, key, port in ((node1, "intfName1", "port1"), (node2, "intfName2", "port2")):
            if topo.isSwitch(node):
                wanted.append(info.get(key) or f"{node}-eth{info[port]}")
    return wanted


def build_net(topo: Topo, *, tag: str | None = None, check_leftovers: bool = True,
              **kw: Any) -> Mininet:
    """Construct and build (not start) a Mininet network for ``topo``.

    Its root-namespace names are scoped to ``tag`` (:func:`scope_topology`; a run passes
    the tag it reserved, see :meth:`topologies.run.Run.reserve_tag`); without one a fresh
    tag no existing interface carries is chosen, so builds of their own never collide
    either. Defaults: ``switch=MoatBridge``, ``controller=None``, ``link=MoatLink``,
    ``host=MoatHost``, ``autoSetMacs=True``; any of them can be overridden through ``kw``.
    Call ``net.start()`` next, and ``net.stop()`` in a ``finally`` — or use
    :func:`running_net`. Raises :class:`TopologyError` if one of its root-namespace names
    exists already (nothing is created then).
    """
    if tag is None:
        tag = choose_tag(_interfaces())
    scope_topology(topo, tag)
    if check_leftovers:
        clashes = root_namespace_conflicts(topo)
        if clashes:
            raise TopologyError(
                "interfaces of this run's names already exist in the root namespace: "
                f"{', '.join(clashes)}; they are not this run's and are left alone (a "
                "leftover of a crashed run is removed by `moat clean`)"
            )
    opts: dict[str, Any] = {
        "topo": topo,
        "switch": MoatBridge,
        "controller": None,
        "link": MoatLink,
        "host": MoatHost,
        "autoSetMacs": True,
    }
    opts.update(kw)
    opts["build"] = False
    net = Mininet(**opts)
    try:
        net.build()
    except BaseException:
        log.error("building %s failed; stopping what was already created", type(topo).__name__)
        net.stop()
        raise
    log.info(
        "built %s: %d nodes, %d switches, %d links (root-namespace names tagged %s)",
        type(topo).__name__, len(net.hosts), len(net.switches), len(net.links), tag,
    )
    return net


def _interfaces(sys_class_net: str = "/sys/class/net") -> list[str]:
    try:
        return os.listdir(sys_class_net)
    except OSError:
        return []


@contextlib.contextmanager
def running_net(topo: Topo, **kw: Any) -> Iterator[Mininet]:
    """Build and start ``topo`` and stop it on the way out, whatever happens."""
    net = build_net(topo, **kw)  # its own fresh tag unless kw gives one
    try:
        net.start()
        yield net
    finally:
        net.stop()
