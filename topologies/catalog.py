"""Every MOAT topology by name, and ``--topo NAME[,key=value,...]`` parsed into one.

The one place that knows all the topologies: ``topologies.patent`` and ``topologies.scale``
each define only their own (they used to import each other so that either file offered
both to ``mn --custom``, an import cycle). This file offers them all::

    mn --custom topologies/catalog.py --topo scale,3,2 --switch lxbr --controller none

and :func:`make_topo` turns the ``--topo`` text of ``moat up``, ``moat cli`` and the
experiments into a topology, the way Mininet's ``mn --topo`` does.
"""

from __future__ import annotations

import sys

if not globals().get("__package__"):
    # Executed by `mn --custom` (bare globals): see topologies/patent.py.
    import os as _os

    _root = _os.path.dirname(
        _os.path.dirname(_os.path.abspath(sys._getframe(0).f_code.co_filename))
    )
    if _root not in sys.path:
        sys.path.insert(0, _root)

import ast  # noqa: E402
import logging  # noqa: E402
from typing import Any  # noqa: E402

from topologies.base import MoatTopo  # noqa: E402
from topologies.errors import TopologyParamError  # noqa: E402
from topologies.patent import PatentTopo  # noqa: E402
from topologies.scale import ScaleTopo  # noqa: E402

__all__ = ["TOPOS", "topos", "make_topo"]

log = logging.getLogger(__name__)

#: Topology classes by the name ``--topo`` uses.
TOPOS: dict[str, type[MoatTopo]] = {"patent": PatentTopo, "scale": ScaleTopo}

#: What ``mn --custom`` looks for.
topos: dict[str, type] = dict(TOPOS)


def _value(text: str) -> Any:
    """A parameter's value: a Python literal when it is one, else the bare word (``5ms``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def make_topo(spec: str) -> MoatTopo:
    """``patent``, ``patent,backbone_bw=10``, ``scale,n_foreign=5,routers_per_net=2``."""
    name, *pairs = [p.strip() for p in spec.split(",") if p.strip()] or [""]
    if name not in TOPOS:
        raise TopologyParamError(f"unknown topology {name!r}; choose from {sorted(TOPOS)}")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise TopologyParamError(f"topology parameter {pair!r} is not key=value")
        params[key.strip()] = _value(raw.strip())
    return TOPOS[name](**params)
