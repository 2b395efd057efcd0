"""A Linux bridge whose kernel name is the run's, and that removes only what it made.

Mininet's ``LinuxBridge`` names the kernel bridge after the Mininet node (``s16``) and, to
start, runs ``brctl delbr s16`` then ``brctl addbr s16``: a second network on the machine
deleted the first one's bridge and took its name. :class:`MoatBridge` keeps the node name
(``net['s16']``, the topology's links) and creates the kernel bridge under the run-scoped
name given as the ``bridge`` param (:mod:`topologies.naming`), with ``ip link add``, which
fails if the name exists instead of taking it over. It deletes the bridge at stop only if
it created it, so a start that failed on a clash never removes someone else's bridge.
"""

from __future__ import annotations

import logging
from typing import Any

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)
from mininet.node import Switch
from mininet.nodelib import LinuxBridge

from topologies.errors import TopologyError

__all__ = ["BridgeExistsError", "MoatBridge"]

log = logging.getLogger(__name__)


class BridgeExistsError(TopologyError):
    """The bridge's kernel name is taken (another run, a leftover): nothing was changed."""


class MoatBridge(LinuxBridge):
    """One LAN's bridge, named ``params['bridge']`` in the kernel (default: the node name)."""

    def __init__(self, name: str, bridge: str | None = None, **params: Any) -> None:
        #: The kernel name (``m3f9c-s16``); the Mininet node stays ``name`` (``s16``).
        self.bridge = bridge or name
        self.created = False
        super().__init__(name, **params)

    def connected(self) -> bool:
        if self.stp:
            return "forwarding" in self.cmd("brctl showstp", self.bridge)
        return True

    def start(self, _controllers: Any) -> None:
        """Create the bridge (refused if the name exists), enslave its ports, bring it up."""
        out = self.cmd("ip link add name", self.bridge, "type bridge stp_state",
                       1 if self.stp else 0).strip()
        if out:
            raise BridgeExistsError(f"cannot create bridge {self.bridge} (for {self.name}): {out}")
        self.created = True
        if self.stp:
            self.cmd("ip link set dev", self.bridge, "type bridge priority", self.prio)
        for intf in self.intfList():
            if intf.name != "lo":
                out = self.cmd("ip link set dev", intf, "master", self.bridge).strip()
                if out:
                    raise TopologyError(f"cannot add {intf} to bridge {self.bridge}: {out}")
        self.cmd("ip link set dev", self.bridge, "up")

    def stop(self, deleteIntfs: bool = True) -> None:  # noqa: N803 - Mininet's signature
        """Delete the bridge if this node created it, then its ports (Mininet's stop)."""
        if self.created:
            self.cmd("ip link del dev", self.bridge)
            self.created = False
        Switch.stop(self, deleteIntfs)

    def deleteIntfs(self, checkName: bool = True) -> None:  # noqa: N802,N803 - Mininet's
        """Delete this bridge's ports: those named after its kernel name (all of them)."""
        for intf in list(self.intfs.values()):
            if intf.name.startswith(f"{self.bridge}-") or not checkName:
                intf.delete()

    def dpctl(self, *args: Any) -> str:
        return self.cmd("brctl", *args)
