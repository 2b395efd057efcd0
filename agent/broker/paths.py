"""Dynamic service paths (patent Fig. 12, step 202): a goal met by a chain of services.

"The request may include translation of text to RTF ... the dynamic path may be text to HTML
to RTF or text to WORD to RTF depending on the lease constraints." Services declare the format
they consume and the one they produce, so the registered instances form a graph whose nodes
are formats and whose edges are instances (DESIGN.md §8). For a goal ``source -> sink``:

1. keep only the instances that can take the request (free share and CPU, still alive —
   the caller's ``fits``): an infeasible hop is hidden, so the other path is chosen;
2. weight each edge by the measured cost between the CO's network and the instance plus the
   instance's processing cost (the patent's "amount of processing resources ... the amount
   of traffic flow");
3. take the cheapest path (networkx Dijkstra) and return its instances, one per hop.

Of several instances converting the same pair of formats only the cheapest fitting one is an
edge (a plain DiGraph), which is all a shortest path can use anyway.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Mapping, Union

import networkx as nx

from agent.broker.directory import Instance
from agent.broker.errors import LeaseDenied
from agent.broker.goals import Goal

log = logging.getLogger(__name__)

Fits = Callable[[Instance], bool]
CostFn = Callable[[Instance], float]
#: A function of the instance, or measurements by instance id, router name or address.
NetworkCost = Union[CostFn, Mapping[str, float], None]


def cost_function(network_cost: NetworkCost, unknown: float = 0.0) -> CostFn:
    """``network_cost`` as a function; a mapping is looked up by instance id, then router,
    then address, and an instance with no measurement costs ``unknown``."""
    if network_cost is None:
        return lambda instance: 0.0
    if callable(network_cost):
        return network_cost
    table = dict(network_cost)

    def lookup(instance: Instance) -> float:
        for key in (instance.instance_id, instance.router, instance.address):
            if key in table:
                return table[key]
        return unknown

    return lookup


def hop_cost(instance: Instance, network_cost: CostFn) -> float:
    """Edge weight: network cost to the instance plus its processing cost (>= 0, finite)."""
    weight = float(network_cost(instance)) + instance.processing_cost
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"cost of {instance.instance_id} is {weight!r}: must be finite, >= 0")
    return weight


def service_graph(instances: Iterable[Instance], network_cost: CostFn,
                  fits: Fits | None = None) -> nx.DiGraph:
    """Formats as nodes; per (consumes, produces) the cheapest instance that ``fits``, with
    its ``weight``. Without ``fits`` every converter is an edge (the graph of what exists)."""
    graph = nx.DiGraph()
    for instance in sorted(instances, key=lambda i: i.instance_id):
        if not instance.converts or (fits is not None and not fits(instance)):
            continue
        weight = hop_cost(instance, network_cost)
        u, v = instance.consumes, instance.produces
        if graph.has_edge(u, v) and graph[u][v]["weight"] <= weight:
            continue
        graph.add_edge(u, v, weight=weight, instance=instance)
    return graph


def plan(goal: Goal, instances: Iterable[Instance], fits: Fits,
         network_cost: NetworkCost = None) -> list[Instance]:
    """The instances, in order, of the cheapest path for ``goal`` that can take the request.

    LeaseDenied("unknown_service") when no chain of registered services reaches the goal at
    all, LeaseDenied("no_capacity") when chains exist but each has a hop that cannot fit.
    """
    instances = list(instances)
    cost = cost_function(network_cost)
    everything = service_graph(instances, cost)
    if not _reachable(everything, goal):
        raise LeaseDenied("unknown_service",
                          f"no chain of registered services turns {goal.source} into {goal.sink}")
    feasible = service_graph(instances, cost, fits)
    if not _reachable(feasible, goal):
        full = [i.instance_id for i in instances if i.converts and not fits(i)]
        raise LeaseDenied("no_capacity", f"every path {goal} has a hop without the share or "
                                         f"CPU asked for (cannot fit: {', '.join(sorted(full)[:8])})")
    formats = nx.shortest_path(feasible, goal.source, goal.sink, weight="weight")
    hops = [feasible[u][v]["instance"] for u, v in zip(formats, formats[1:])]
    log.debug("path %s: %s", goal, " -> ".join(h.instance_id for h in hops))
    return hops


def _reachable(graph: nx.DiGraph, goal: Goal) -> bool:
    return goal.source in graph and goal.sink in graph and nx.has_path(graph, goal.source,
                                                                        goal.sink)
