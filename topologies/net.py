"""Build and run a Mininet network from a MOAT topology, the way every MOAT tool does.

MOAT's machines have no Open vSwitch and MOAT needs no OpenFlow: each network is one
Linux bridge (``mininet.nodelib.LinuxBridge``, STP off — one bridge per LAN has no loop)
and there is no controller. Links are :class:`topologies.links.MoatLink` (htb bandwidth,
netem where the kernel has it). MACs follow the node number (``autoSetMacs``) so captures
are easy to read.

Two promises: a failed build stops whatever it already started (no half-built net, no
orphaned daemons), and :func:`running_net` always stops the net it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)
from mininet.net import Mininet
from mininet.nodelib import LinuxBridge
from mininet.topo import Topo

from topologies.errors import TopologyError
from topologies.links import MoatLink
from topologies.nodes import MoatHost

__all__ = ["build_net", "running_net", "root_namespace_conflicts", "root_namespace_names"]

log = logging.getLogger(__name__)


def root_namespace_conflicts(topo: Topo, sys_class_net: str = "/sys/class/net") -> list[str]:
    """Names ``topo`` would create in the root namespace that already exist there.

    Bridges and their ports live in the root namespace; a leftover from a crashed run
    makes Mininet fail with a bare "RTNETLINK answers: File exists" halfway through.
    Router and host interfaces are created directly inside their namespaces and cannot
    collide.
    """
    try:
        existing = set(os.listdir(sys_class_net))
    except OSError:
        return []
    return sorted(set(root_namespace_names(topo)) & existing)


def root_namespace_names(topo: Topo) -> list[str]:
    """The interfaces ``topo`` creates in the root namespace: bridges and their ports."""
    wanted: list[str] = list(topo.switches())
    for node1, node2, info in topo.links(withInfo=True):
        for node, key, port in ((node1, "intfName1", "port1"), (node2, "intfName2", "port2")):
            if topo.isSwitch(node):
                wanted.append(info.get(key) or f"{node}-eth{info[port]}")
    return wanted


def build_net(topo: Topo, *, check_leftovers: bool = True, **kw: Any) -> Mininet:
    """Construct and build (not start) a Mininet network for ``topo``.

    Defaults: ``switch=LinuxBridge``, ``controller=None``, ``link=MoatLink``,
    ``host=MoatHost``, ``autoSetMacs=True``; any of them can be overridden through ``kw``.
    Call ``net.start()`` next, and ``net.stop()`` in a ``finally`` — or use
    :func:`running_net`. Raises :class:`TopologyError` if bridges or bridge ports of the
    topology already exist (a previous run was not cleaned up).
    """
    if check_leftovers:
        clashes = root_namespace_conflicts(topo)
        if clashes:
            raise TopologyError(
                "interfaces from an earlier run still exist in the root namespace: "
                f"{', '.join(clashes)}; remove them (e.g. `moat clean`) before building"
            )
    opts: dict[str, Any] = {
        "topo": topo,
        "switch": LinuxBridge,
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
        "built %s: %d nodes, %d switches, %d links",
        type(topo).__name__, len(net.hosts), len(net.switches), len(net.links),
    )
    return net


@contextlib.contextmanager
def running_net(topo: Topo, **kw: Any) -> Iterator[Mininet]:
    """Build and start ``topo`` and stop it on the way out, whatever happens."""
    net = build_net(topo, **kw)
    try:
        net.start()
        yield net
    finally:
        net.stop()
