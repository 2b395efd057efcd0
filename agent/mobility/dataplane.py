"""Data-plane reconciliation: the tunnel and routes follow the binding and visitor tables.

The role logic (:mod:`agent.mobility.home`, :mod:`agent.mobility.foreign`) only keeps tables;
this module makes the kernel and the GRE backend match them, comparing what it installed
last time with what the tables want now, so calling it again is idempotent. The object
agent calls it after every change, and again when a reconciliation left something undone,
and at start on the tables its journal restored (:meth:`DataPlane.remove_leftovers` first
takes away what the previous process left in the kernel for visitors that expired since).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Optional

from agent.core import netlink
from agent.core.errors import AgentError
from agent.mobility.foreign import ForeignAgent
from agent.mobility.home import HomeAgent

log = logging.getLogger(__name__)

#: How often and how long the FOA looks for a router's MAC after asking the kernel for it.
ARP_POLLS, ARP_POLL_S = 25, 0.02

#: A visitor's path at the FOA: (HOA address, GRE key, LAN router that runs it or None for
#: this router, reverse tunnel, delivered as frames to that router rather than routed, the
#: inner destinations it may carry: its home address and mobile network).
ForeignPath = tuple[str, int, Optional[str], bool, bool, frozenset]
#: A visitor: (home address, care-of address).
VisitorKey = tuple[str, str]


class DataPlane:
    """Installs the HOA's tunnels and the FOA's decapsulation and local routes."""

    def __init__(self, tunnel: Any, addresses: set[str]) -> None:
        self.tunnel = tunnel
        self.addresses = addresses
        self._home_peers: dict[str, list[tuple[str, int]]] = {}
        #: The binding table the HOA's peers were last synced from (None: none yet).
        self._home_table: object | None = None
        #: Addresses :meth:`sync_home` has looked at, for tests and benchmarks (its cost).
        self.home_looked_at = 0
        self._foreign_paths: dict[VisitorKey, ForeignPath] = {}
        #: Home addresses routed to the LAN router that runs them.
        self._routes: dict[str, str] = {}
        #: Visitors' mobile network prefixes (NEMO) -> the LAN router that runs the object.
        self._prefix_routes: dict[str, str] = {}
        #: Home addresses this router is about to hold (or holds) itself, beside a visitor
        #: behind it: that visitor gets its packets as frames even while it visits alone.
        self.frames_for: set[str] = set()
        self._lock = asyncio.Lock()

    def sync_home(self, home: HomeAgent) -> None:
        """HOA: tunnel each away object's home address to every live binding (bicast).

        The first call for a table walks every address; later ones only those whose
        bindings changed since (:meth:`BindingTable.take_changed`), so a registration costs
        the same beside ten bindings or ten thousand (issue 15). Addresses left undone by a
        failure are looked at again on the next call."""
        table = home.bindings
        served = table.served()
        changed = table.take_changed()
        if self._home_table is not table:
            self._home_table = table
            changed |= set(served) | set(self._home_peers)
        todo = sorted(changed)
        self.home_looked_at += len(todo)
        done = 0
        try:
            for address in todo:
                peers = sorted((b.care_of_address, b.gre_key) for b in served.get(address, ()))
                if self._home_peers.get(address) != peers:
                    self.tunnel.set_peers(address, peers)
                    for b in table.for_home(address):
                        if b.reverse_tunnel:  # T: the FOA tunnels the object's replies to us
                            self.tunnel.accept(b.care_of_address, b.gre_key)
                    log.info("HOA data plane: %s -> %s", address, peers or "home (no tunnel)")
                    if peers:
                        self._home_peers[address] = peers
                    else:
                        self._home_peers.pop(address, None)
                done += 1
        finally:
            if done < len(todo):
                table.note_changed(todo[done:])

    async def sync_foreign(self, foreign: ForeignAgent) -> bool:
        """FOA: accept each visitor's tunnel and deliver its home address to its router;
        False when some path could not be set up as wanted (call again to retry).

        Returns once the routes are in place: the FOA relays a registration reply only after
        this, so no tunnelled packet reaches it before it knows where to deliver it.

        Normally a route (home address via the LAN router that runs the object) delivers.
        When two instances of one object visit (patent 104/108: one on this very router,
        one behind it, at two care-of addresses), no route can tell them apart — and this
        router would take every packet for the home address itself — so the tunnel hands the
        one behind it its packets as frames to that router (by GRE key)."""
        async with self._lock:
            wanted = self._wanted_paths(foreign)
            for key in sorted(set(self._foreign_paths) | set(wanted)):
                old, new = self._foreign_paths.get(key), wanted.get(key)
                if old == new:
                    continue
                address = key[0]
                if old is not None:
                    self.tunnel.forget(old[0], old[1])
                    if old[3]:
                        self.tunnel.set_reverse(address, None)
                    if old[4]:
                        self._set_delivery(old, None)
                if new is not None:
                    self.tunnel.accept(new[0], new[1])
                    self.tunnel.restrict(new[0], new[1], new[5])
                    if new[4] and not await self._deliver_as_frames(new):
                        new = new[:4] + (False,) + new[5:]  # type: ignore[assignment]
                    if new[3]:
                        self.tunnel.set_reverse(address, (new[0], new[1]))
                    self._foreign_paths[key] = new
                    log.info("FOA data plane: GRE key %d from %s delivers %s via %s%s", new[1],
                             new[0], address, new[2] or "this router",
                             " (frames)" if new[4] else "")
                else:
                    self._foreign_paths.pop(key, None)
            await self._sync_routes()
            await self._sync_prefixes(foreign)
            await self._settle()
            return all(self._foreign_paths.get(k) == v for k, v in wanted.items())

    def _wanted_paths(self, foreign: ForeignAgent) -> dict[VisitorKey, ForeignPath]:
        by_home: dict[str, list[Any]] = {}
        for v in foreign.visitors.snapshot_objects():
            if v.gre_key is not None:
                by_home.setdefault(v.home_address, []).append(v)
        wanted: dict[VisitorKey, ForeignPath] = {}
        for home, visitors in by_home.items():
            shared = len(visitors) > 1 or home in self.frames_for
            for v in visitors:
                via = None if v.local_address in self.addresses else v.local_address
                serves = frozenset([home, *(str(a) for a in (
                    ipaddress.IPv4Network(v.network_prefix) if v.network_prefix else ()))])
                wanted[(home, v.care_of_address)] = (v.home_agent, v.gre_key, via,
                                                     v.reverse_tunnel, shared and via is not None,
                                                     serves)
        return wanted

    async def _sync_routes(self) -> None:
        """One route per home address whose only visitor is routed (not this router, not
        delivered as frames)."""
        wanted: dict[str, str] = {}
        homes: dict[str, int] = {}
        for (home, _coa), path in self._foreign_paths.items():
            homes[home] = homes.get(home, 0) + 1
            if path[2] is not None and not path[4]:
                wanted[home] = path[2]
        wanted = {h: via for h, via in wanted.items() if homes[h] == 1}
        for home in [h for h in self._routes if self._routes[h] != wanted.get(h)]:
            await set_local_route(home, None)
            del self._routes[home]
        for home, via in wanted.items():
            if self._routes.get(home) != via:
                await set_local_route(home, via)
                self._routes[home] = via

    async def _deliver_as_frames(self, path: ForeignPath) -> bool:
        """Look up the router's MAC and tell the tunnel; False (logged) when it cannot."""
        via = path[2]
        assert via is not None
        try:
            neighbour = await netlink.neighbour_of(via)
            if neighbour is None:
                _provoke_arp(via)
                for _ in range(ARP_POLLS):
                    await asyncio.sleep(ARP_POLL_S)
                    neighbour = await netlink.neighbour_of(via)
                    if neighbour is not None:
                        break
            if neighbour is None:
                raise AgentError(f"no link-layer address for {via}")
            self._set_delivery(path, neighbour)
            return True
        except AgentError as exc:
            log.warning("FOA data plane: cannot deliver key %d to %s as frames: %s", path[1],
                        via, exc)
            return False

    def _set_delivery(self, path: ForeignPath, via: tuple[str, str] | None) -> None:
        try:
            self.tunnel.set_delivery(path[0], path[1], via)
        except AgentError as exc:
            log.warning("FOA data plane: %s", exc)

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

    async def remove_leftovers(self, expired: list[Any], foreign: ForeignAgent) -> None:
        """Remove the routes a previous agent process installed for visitors that expired
        while no agent ran (a killed agent removes nothing; its TUN device and the routes
        through it vanish with it, but routes via a LAN router stay). A home address or
        prefix a live visitor still has is left to :meth:`sync_foreign`."""
        live = foreign.visitors.snapshot_objects()
        homes = {v.home_address for v in live}
        prefixes = {v.network_prefix for v in live if v.network_prefix}
        async with self._lock:
            for v in expired:
                if v.local_address in self.addresses:
                    continue  # delivered here: no route was added for it
                if v.home_address not in homes:
                    await set_local_route(v.home_address, None)
                if v.network_prefix and v.network_prefix not in prefixes:
                    await set_route(v.network_prefix, None)

    async def settle(self) -> None:
        """Wait until the tunnel's queued kernel changes are done (refusals are logged)."""
        await self._settle()

    async def _settle(self) -> None:
        """Wait for the tunnel's queued kernel changes (decapsulation, reverse routes)."""
        try:
            await self.tunnel.settle()
        except AgentError as exc:  # refused changes are logged and undone by the tunnel
            log.warning("FOA data plane: %s", exc)

    async def close(self) -> None:
        """Remove every local route this data plane added, then close the tunnel."""
        async with self._lock:
            for address in list(self._routes):
                await set_local_route(address, None)
            self._routes.clear()
            self._foreign_paths.clear()
            for prefix in list(self._prefix_routes):
                await set_route(prefix, None)
            self._prefix_routes.clear()
        await self.tunnel.aclose()


def _provoke_arp(address: str) -> None:
    """Make the kernel resolve an on-link ``address`` (a datagram to its discard port). The
    FOA has just exchanged registration messages with that router, so its entry is normally
    there already."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"", (address, 9))
        except OSError:
            pass


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
