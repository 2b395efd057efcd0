"""Where a service's requests come from, and when to place a duplicate near them (patent:
"the mobile objects also monitor the traffic flow on networks 12 and further distribute the
desired service to optimize the path of the service").

Pure logic on an injected clock. The primary's object counts its requests per source network
(/24, :mod:`agent.hosting.runner`); its router reads those counters every few seconds and
keeps the differences over a sliding window. The rule (the README states it):

    when, over the last ``window_s`` seconds, at least ``min_requests`` requests reached the
    primary and at least ``share`` of them came from one foreign network other than the
    primary's own (so they crossed the home network and the backbone, through the HOA's
    tunnel), place a duplicate on that network, once per ``cooldown_s``.

The duplicate is pre-placed: the leases already granted stay where they are (their
credentials name their instance), and the broker, which ranks instances by hops from the
CO's network, gives the next leases from that network to the nearby duplicate. A pre-placed
duplicate that no lease reaches is released like any other idle duplicate.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

Clock = Callable[[], float]


@dataclass(frozen=True)
class TrafficRule:
    """The thresholds of the rule (defaults: conservative, so a short test load never
    trips it by accident)."""

    window_s: float = 5.0
    min_requests: int = 200
    share: float = 0.75
    cooldown_s: float = 30.0
    enabled: bool = True


class TrafficWatch:
    """Counter samples of one object over a sliding window; :meth:`hot_network` applies the
    rule."""

    def __init__(self, rule: TrafficRule = TrafficRule(), clock: Clock = time.monotonic) -> None:
        self.rule = rule
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, int]]] = deque()
        self._last_fired = float("-inf")

    def sample(self, counts: dict[str, int]) -> None:
        """The object's cumulative per-network counters now (they only grow, unless the
        object restarted: then the window starts again)."""
        now = self._clock()
        if self._samples and any(counts.get(n, 0) < c for n, c in self._samples[-1][1].items()):
            self._samples.clear()  # a restart reset the counters
        self._samples.append((now, dict(counts)))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.rule.window_s:
            self._samples.popleft()

    def window(self) -> dict[str, int]:
        """Requests per network over the window (differences of the oldest and newest
        sample)."""
        if len(self._samples) < 2:
            return {}
        (_, old), (_, new) = self._samples[0], self._samples[-1]
        return {n: c - old.get(n, 0) for n, c in new.items() if c - old.get(n, 0) > 0}

    def hot_network(self, own_network: str, served: set[str]) -> str | None:
        """The foreign network to place a duplicate on now, or None. ``served``: networks
        that already run an instance (the primary's included)."""
        rule = self.rule
        if not rule.enabled or self._clock() - self._last_fired < rule.cooldown_s:
            return None
        counts = self.window()
        total = sum(counts.values())
        if total < rule.min_requests:
            return None
        network, top = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        if network in ("other", own_network) or network in served or top < rule.share * total:
            return None
        return network

    def fired(self) -> None:
        """A placement was tried: wait the cooldown before the next (whatever its outcome)."""
        self._last_fired = self._clock()
        self._samples.clear()
