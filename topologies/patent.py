"""The patent's topology (Figs. 1 and 6): home network 16, foreign networks 12 and 14.

::

        net 12 (10.12.0.0/24, s12)       net 14 (10.14.0.0/24, s14)
        r18a .1 (border, FOA)  r18b .2   r20a .1 (border)   co14 .30
        co12 .30       |                        |
                       | 10.255.0.0/30          | 10.255.0.4/30
              r18a .2  |               r20a .6  |
                       +------ r22a ------------+        (triangle=True adds
                          .1 (border)  .5                r18a .9 - r20a .10,
        net 16 (10.16.0.0/21, s16, home)                 10.255.0.8/30)
        r22a .1 (border)  r22b .2 (HOA)  r22c .3  dns23 .23  site24 .24
        mobile-object home addresses 10.16.0.100-199, 10.16.1-7.1-254 (reserved, unassigned)

The backbone is a star around the home border router ``r22a`` by default: a tree gives
every pair of networks exactly one path, so captures are unambiguous and the HOA-to-FOA
tunnel always crosses ``r22a``. ``triangle=True`` adds the ``r18a``-``r20a`` link for
experiments that want foreign-to-foreign traffic (e.g. a corresponding object on net 14
talking to an object moved to net 12) to bypass the home network.

Parameters (also from the command line, ``--topo patent,backbone_bw=10,triangle=True``):
``backbone_bw`` Mbit/s (default 100; ``None`` = unshaped), ``backbone_delay`` (e.g.
``"5ms"``) and ``backbone_loss`` (%) — both need netem and degrade to a logged warning
where it is missing — ``lan_bw`` Mbit/s for the LAN links (default unshaped),
``triangle`` and ``attacker`` (default off): a host ``att12`` at 10.12.0.66 on net 12, from
which ``moat run attacks`` attacks the run (it holds no key of the run).

Run it with Mininet directly (as root, from the repository root)::

    mn --custom topologies/patent.py --topo patent --switch lxbr --controller none --test pingall

``python -m topologies.patent`` prints the address plan and routes (no root needed).
"""

from __future__ import annotations

import sys

if not globals().get("__package__"):
    # Executed by `mn --custom` (exec'd with bare globals) or run as a script: make the
    # repository root importable so the absolute imports below resolve. `__file__` is not
    # defined under `mn --custom`, but the code object's filename is.
    import os as _os

    _root = _os.path.dirname(
        _os.path.dirname(_os.path.abspath(sys._getframe(0).f_code.co_filename))
    )
    if _root not in sys.path:
        sys.path.insert(0, _root)

import logging  # noqa: E402
from typing import Any  # noqa: E402

from topologies.base import MoatTopo, as_bool, check_bw, check_delay, check_loss  # noqa: E402
from topologies.errors import TopologyParamError  # noqa: E402

__all__ = ["PatentTopo", "topos", "ATTACKER_HOST", "ATTACKER_OCTET"]

log = logging.getLogger(__name__)

#: The attack suite's host (``attacker=True``) and its octet on net 12.
ATTACKER_HOST = "att12"
ATTACKER_OCTET = 66


class PatentTopo(MoatTopo):
    """Home network 16 and foreign networks 12 and 14, joined by border routers."""

    def build(  # type: ignore[override]
        self,
        backbone_bw: float | None = 100,
        backbone_delay: str | float | None = None,
        backbone_loss: float | None = None,
        lan_bw: float | None = None,
        triangle: bool | str = False,
        attacker: bool | str = False,
        **_ignored: Any,
    ) -> None:
        """Lay out Figs. 1/6; see the module docstring for the parameters."""
        if _ignored:
            raise TopologyParamError(f"unknown PatentTopo parameters: {sorted(_ignored)}")
        bw = check_bw(backbone_bw, "backbone_bw")
        delay = check_delay(backbone_delay, "backbone_delay")
        loss = check_loss(backbone_loss, "backbone_loss")
        self.set_lan_link_options(bw=check_bw(lan_bw, "lan_bw"))
        self.triangle = as_bool(triangle, "triangle")

        self.add_home_network()
        self.add_foreign_network(12, ["r18a", "r18b"], co_host="co12")
        self.add_foreign_network(14, ["r20a"], co_host="co14")
        self.attacker = as_bool(attacker, "attacker")
        if self.attacker:
            # On the LAN of the FOA r18a and the hosting router r18b: on-link to both, so its
            # advertisements and replayed registrations reach them as a local host's would.
            self.add_end_host(ATTACKER_HOST, 12, ATTACKER_OCTET, role="attacker")

        self.add_backbone("r22a", "r18a", bw=bw, delay=delay, loss=loss)
        self.add_backbone("r22a", "r20a", bw=bw, delay=delay, loss=loss)
        if self.triangle:
            self.add_backbone("r18a", "r20a", bw=bw, delay=delay, loss=loss)


#: What `mn --custom topologies/patent.py` looks for (topologies/catalog.py offers them all).
topos: dict[str, type] = {"patent": PatentTopo}

if __name__ == "__main__":
    print(PatentTopo().describe())
