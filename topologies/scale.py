"""A parametric topology for scale experiments: the home network plus N foreign networks.

The home network is the patent's network 16 unchanged (``r22a`` border, ``r22b`` HOA,
``r22c``, ``dns23``, ``site24``; see :meth:`topologies.base.MoatTopo.add_home_network`).
Foreign network ``i`` (1 <= i <= N) has network number ``n = 100 + i``:

* LAN ``10.n.0.0/24`` on bridge ``s<n>``;
* ``M`` routers ``r<n>a``, ``r<n>b``, ... at ``.1``, ``.2``, ...; ``r<n>a`` is the border
  router and the intended FOA;
* a corresponding-object host ``co<n>`` at ``.30``.

Every foreign border router is joined to ``r22a`` by its own backbone ``/30`` (a star:
foreign network ``i`` uses backbone link ``i-1``, ``10.255.0.4(i-1)/30``), so any two
foreign networks are two backbone hops apart, through the home border.

Bounds: ``1 <= n_foreign <= 100`` (network numbers 101..200) and
``1 <= routers_per_net <= 19`` (router octets .1-.19); anything else raises
:class:`topologies.errors.TopologyParamError`. Memory, not the address plan, is the
practical limit: each router and host is a shell process plus a network namespace.

``mn --custom topologies/scale.py --topo scale,3,2 --switch lxbr --controller none``
"""

from __future__ import annotations

import sys

if not globals().get("__package__"):
    # See topologies/patent.py: make `mn --custom` and script runs find the package.
    import os as _os

    _root = _os.path.dirname(
        _os.path.dirname(_os.path.abspath(sys._getframe(0).f_code.co_filename))
    )
    if _root not in sys.path:
        sys.path.insert(0, _root)

import logging  # noqa: E402
from typing import Any  # noqa: E402

from topologies.addressing import MAX_SCALE_FOREIGN, ROUTER_OCTETS, SCALE_NETWORK_BASE  # noqa: E402
from topologies.base import MoatTopo, check_bw, check_delay, check_loss, router_letter  # noqa: E402
from topologies.errors import TopologyParamError  # noqa: E402

__all__ = ["ScaleTopo", "topos", "MAX_ROUTERS_PER_NET"]

log = logging.getLogger(__name__)

#: Largest ``routers_per_net`` the address plan allows (.1-.19).
MAX_ROUTERS_PER_NET: int = len(ROUTER_OCTETS)


def _check_count(value: Any, name: str, upper: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TopologyParamError(f"{name} must be an int, got {value!r}")
    if not 1 <= value <= upper:
        raise TopologyParamError(f"{name} must be in 1..{upper}, got {value}")
    return value


class ScaleTopo(MoatTopo):
    """Home network 16 plus ``n_foreign`` foreign networks of ``routers_per_net`` routers."""

    def build(  # type: ignore[override]
        self,
        n_foreign: int = 3,
        routers_per_net: int = 2,
        backbone_bw: float | None = 100,
        backbone_delay: str | float | None = None,
        backbone_loss: float | None = None,
        lan_bw: float | None = None,
        **_ignored: Any,
    ) -> None:
        """Lay out the star; see the module docstring for names, addresses and bounds."""
        if _ignored:
            raise TopologyParamError(f"unknown ScaleTopo parameters: {sorted(_ignored)}")
        n = _check_count(n_foreign, "n_foreign", MAX_SCALE_FOREIGN)
        m = _check_count(routers_per_net, "routers_per_net", MAX_ROUTERS_PER_NET)
        bw = check_bw(backbone_bw, "backbone_bw")
        delay = check_delay(backbone_delay, "backbone_delay")
        loss = check_loss(backbone_loss, "backbone_loss")
        self.set_lan_link_options(bw=check_bw(lan_bw, "lan_bw"))
        self.n_foreign, self.routers_per_net = n, m

        self.add_home_network()
        for i in range(1, n + 1):
            number = SCALE_NETWORK_BASE + i
            routers = [f"r{number}{router_letter(j)}" for j in range(m)]
            self.add_foreign_network(number, routers, co_host=f"co{number}")
            self.add_backbone("r22a", routers[0], bw=bw, delay=delay, loss=loss)


#: What `mn --custom topologies/scale.py` looks for (topologies/catalog.py offers them all).
topos: dict[str, type] = {"scale": ScaleTopo}

if __name__ == "__main__":
    print(ScaleTopo().describe())
