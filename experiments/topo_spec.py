"""Parse ``--topo NAME[,key=value,...]`` the way Mininet's ``mn --topo`` does."""

from __future__ import annotations

import ast
from typing import Any

from topologies.base import MoatTopo
from topologies.errors import TopologyParamError


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare words such as 5ms stay strings


def make_topo(spec: str) -> MoatTopo:
    """``patent``, ``patent,backbone_bw=10``, ``scale,n_foreign=5,routers_per_net=2``."""
    from topologies.patent import PatentTopo
    from topologies.scale import ScaleTopo

    known = {"patent": PatentTopo, "scale": ScaleTopo}
    name, *pairs = [p.strip() for p in spec.split(",") if p.strip()]
    if name not in known:
        raise TopologyParamError(f"unknown topology {name!r}; choose from {sorted(known)}")
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise TopologyParamError(f"topology parameter {pair!r} is not key=value")
        params[key.strip()] = _value(raw.strip())
    return known[name](**params)
