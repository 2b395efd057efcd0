"""Data-plane reconciliation: the tunnel and routes follow the binding and visitor tables.

The role logic (:mod:`agent.mobility.home`, :mod:`agent.mobility.foreign`) only keeps tables;
this module makes the kernel and the GRE backend match them, comparing what it installed
last time with what the tables want now, so calling it after every change and on every
housekeeping tick is cheap and idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from agent.core import netlink
from agent.core.errors import AgentError
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent

log = logging.getLogger(__name__)

#: A visitor's path at the FOA: (HOA address, GRE key, LAN router that runs it or None for
#: this router, reverse tunnel).
ForeignPath = tuple[str, int, Optional[str], bool]


class DataPlane:
    """Installs the HOA's tunnels and the FOA's decapsulation and local routes."""

    def __init__(self, tunnel: Any, addresses: set[str]) -> None:
        self.tunnel = tunnel
        self.addresses = addresses
        self._home_peers: dict[str, list[tuple[str, int]]] = {}
        self._foreign_paths: dict[str, ForeignPath] = {}
        #: Visitors' mobile network prefixes (NEMO) -> the LAN router that runs the object.
        self._prefix_routes: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def sync_home(self, home: HomeAgent) -> None:
        """HOA: tunnel each away object's home address to every live binding (bicast)."""
        wanted = {address: [(b.care_of_address, b.gre_key) for b in bindings]
                  for address, bindings in home.bindings.served().items()}
        for address in set(self._home_peers) | set(wanted):
            peers = sorted(wanted.get(address, []))
            if self._home_peers.get(address) == peers:
                continue
            self.tunnel.set_peers(address, peers)
            for b in home.bindings.for_home(address):
                if b.reverse_tunnel:  # T: the FOA tunnels the object's replies back to us
                    self.tunnel.accept(b.care_of_address, b.gre_key)
            log.info("HOA data plane: %s -> %s", address, peers or "home (no tunnel)")
            if peers:
                self._home_peers[address] = peers
            else:
                self._home_peers.pop(address, None)

    async def sync_foreign(self, foreign: ForeignAgent) -> None:
        """FOA: accept each visitor's tunnel and route its home address to its router.

        Returns once the routes are in place: the FOA relays a registration reply only after
        this, so no tunnelled packet reaches it before it knows where to deliver it."""
        async with self._lock:
            for address, old, new in self._foreign_changes(foreign):
                if old is not None:
                    self.tunnel.forget(old[0], old[1])
                    if old[3]:
                        self.tunnel.set_reverse(address, None)
                    await set_local_route(address, None)
                if new is not None:
                    self.tunnel.accept(new[0], new[1])
                    await set_local_route(address, new[2])
                    if new[3]:
                        self.tunnel.set_reverse(address, (new[0], new[1]))
                    self._foreign_paths[address] = new
                    log.info("FOA data plane: GRE key %d from %s delivers %s via %s", new[1],
                             new[0], address, new[2] or "this router")
                else:
                    self._foreign_paths.pop(address, None)
            await self._sync_prefixes(foreign)
            await self._settle()

    async def _sync_prefixes(self, foreign: ForeignAgent) -> None:
        """A visitor's mobile network prefix goes where its home address goes: to the LAN
        router that runs the object (which tunnels on to its secondaries). A visitor on this
        router needs none: its nested home agent's host routes are here already."""
        wanted = {v.network_prefix: v.local_address for v in foreign.visitors.snapshot_objects()
                  if v.network_prefix and v.gre_key is not None
                  and v.local_address not in self.addresses}
        for prefix in [p for p in self._prefix_routes if wanted.get(p) != self._prefix_routes[p]]:
            await set_route(prefix, None)
            del self._prefix_routes[prefix]
        for prefix, via in wanted.items():
            if prefix not in self._prefix_routes:
                await set_route(prefix, via)
                self._prefix_routes[prefix] = via
                log.info("FOA data plane: mobile network %s via %s", prefix, via)

    async def _settle(self) -> None:
        """Wait for the tunnel's queued kernel changes (decapsulation, reverse routes)."""
        try:
            await self.tunnel.settle()
        except AgentError as exc:  # refused changes are logged and undone by the tunnel
            log.warning("FOA data plane: %s", exc)

    def _foreign_changes(self, foreign: ForeignAgent
                         ) -> list[tuple[str, ForeignPath | None, ForeignPath | None]]:
        """(home address, installed path, wanted path) for every path that must change."""
        wanted: dict[str, ForeignPath] = {}
        for v in foreign.visitors.snapshot_objects():
            if v.gre_key is None:
                continue
            via = None if v.local_address in self.addresses else v.local_address
            wanted[v.home_address] = (v.home_agent, v.gre_key, via, v.reverse_tunnel)
        return [(a, self._foreign_paths.get(a), wanted.get(a))
                for a in sorted(set(self._foreign_paths) | set(wanted))
                if self._foreign_paths.get(a) != wanted.get(a)]

    async def close(self) -> None:
        """Remove every local route this data plane added, then close the tunnel."""
        async with self._lock:
            for address in list(self._foreign_paths):
                await set_local_route(address, None)
            self._foreign_paths.clear()
            for prefix in list(self._prefix_routes):
                await set_route(prefix, None)
            self._prefix_routes.clear()
        await self.tunnel.aclose()


async def set_local_route(address: str, via: str | None) -> None:
    """``address``/32 via the LAN router ``via`` (None: remove the route)."""
    await set_route(f"{address}/32", via)


async def set_route(destination: str, via: str | None) -> None:
    """``destination`` (a prefix) via the LAN router ``via`` (None: remove the route)."""
    try:
        if via is None:
            await netlink.route_del(destination)
        else:
            await netlink.route_replace(destination, via)
    except AgentError as exc:
        log.warning("route %s via %s: %s", destination, via, exc)
