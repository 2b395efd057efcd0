"""A bounded table of agents heard, keyed by the advertisement's source address.

Advertisements arrive before any authentication (RFC 5944 §2 has none), so whoever can put
a packet on a link can make a router remember an "agent". The table forgets an entry when
its advertisement's lifetime runs out, holds at most ``cap`` entries (the one heard longest
ago goes first) and finds what expired with a heap, so a flood of spoofed advertisements
costs bounded memory and bounded work per packet.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Generic, Iterator, TypeVar

from agent.mobility.bindings import ExpiryHeap

V = TypeVar("V")


class HeardTable(Generic[V]):
    """Source address → what was heard from it, pruned by lifetime and capped in size."""

    def __init__(self, cap: int, clock: Callable[[], float] = time.monotonic,
                 keep: Callable[[str], bool] = lambda source: False) -> None:
        """``keep(source)`` names the few entries a full table must not evict (an object's
        current agent: a flood of new ones must not make it look gone)."""
        if cap < 1:
            raise ValueError("cap must be >= 1")
        self.cap = cap
        self.clock = clock
        self.keep = keep
        #: Oldest heard first: (expires at, value) by source.
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._expiry = ExpiryHeap()
        #: Entries forgotten because the table was full, and because they expired.
        self.evicted = 0
        self.expired = 0

    def put(self, source: str, value: V, lifetime: float) -> None:
        """Remember ``value`` from ``source`` for ``lifetime`` seconds (at least one)."""
        self.prune()
        expires = self.clock() + max(1.0, float(lifetime))
        self._items.pop(source, None)
        self._items[source] = (expires, value)
        self._expiry.push(expires, (source, expires))
        while len(self._items) > self.cap:
            victim = next((k for k in self._items if k != source and not self.keep(k)), None)
            if victim is None:
                break  # everything else is kept: the table may exceed the cap by those few
            del self._items[victim]
            self.evicted += 1
        if len(self._expiry) > 4 * len(self._items) + 64:
            self._expiry.rebuild((at, (key, at)) for key, (at, _) in self._items.items())

    def prune(self) -> None:
        """Forget every entry whose lifetime has run out (O(expired + log n))."""
        for source, expires in self._expiry.due(self.clock()):
            current = self._items.get(source)
            if current is not None and current[0] == expires:
                del self._items[source]
                self.expired += 1

    def get(self, source: str, default: V | None = None) -> V | None:
        item = self._items.get(source)
        return default if item is None else item[1]

    def __getitem__(self, source: str) -> V:
        return self._items[source][1]

    def __contains__(self, source: object) -> bool:
        return source in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def values(self) -> list[V]:
        return [value for _, value in self._items.values()]

    def items(self) -> list[tuple[str, V]]:
        return [(key, value) for key, (_, value) in self._items.items()]
