"""How long a network's start may take: a budget that grows with its size (issue 15).

A fixed wait (``moat up`` had 60 s, the agents 30 s) is too short for 100 routers and far too
long to notice a small network that hangs. The budget is a fixed part (one interpreter and
the agent's imports in the zygote, Mininet's own start) plus a part per node: Mininet
configures nodes one after another (a shell, its interfaces, sysctls and routes), and each
router's agent starts (forked, then its roles' sockets and first advertisements) on the
machine's cores. The per-node figures are about three times what this 2-core machine takes
(``moat bench scale``: about 0.1 s per router forked), so a loaded machine still fits, and a
network that hangs is reported within a minute or two, not never.
"""

from __future__ import annotations

#: Seconds every start may take whatever its size.
BASE_S = 30.0
#: Seconds more per router (Mininet's configuration and its agent's start).
PER_ROUTER_S = 0.4
#: Seconds more per host or switch (Mininet's configuration, a daemon at most).
PER_NODE_S = 0.1


def agents_timeout(routers: int) -> float:
    """Seconds to wait for ``routers`` agents to answer once Mininet has built the network."""
    if routers < 0:
        raise ValueError(f"routers must be >= 0, got {routers}")
    return BASE_S + PER_ROUTER_S * routers


def up_timeout(routers: int, other_nodes: int) -> float:
    """Seconds ``moat up`` waits for a network of ``routers`` routers and ``other_nodes``
    hosts and switches: the build, then the agents (:func:`agents_timeout`)."""
    if other_nodes < 0:
        raise ValueError(f"other_nodes must be >= 0, got {other_nodes}")
    return agents_timeout(routers) + BASE_S + PER_ROUTER_S * routers + PER_NODE_S * other_nodes
