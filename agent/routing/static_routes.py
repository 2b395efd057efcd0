"""The static-routes role: the routes the topology gave this router stay installed.

Each router gets its routes once (``topologies.nodes.install_routes``, from the topology's
computed table) and runs no routing daemon. When a link goes down the kernel flushes every
route through it; when the link comes back, nothing would install them again and traffic
across it would stay lost (issue 13, a backbone link down and up). This role keeps exactly
those routes (:attr:`agent.core.config.AgentConfig.static_routes`) installed:

* at start it looks once (an agent restarted after a link flap repairs what it missed);
* when the kernel announces a link up with carrier or an address added
  (:mod:`agent.routing.link_events`) it looks at once;
* every :data:`CHECK_PERIOD` seconds it looks anyway (a lost announcement, a route someone
  deleted by hand): one route lookup per configured prefix and a dump of the links, a
  cost that does not grow with the data plane's host routes (a router with more than
  :data:`LOOKUP_MAX` routes, a scale topology's, dumps the main table instead).

A look (:func:`plan`) finds each configured route whose prefix has no route in the main table;
one whose next hop is on a link that is up (admin up and carrier) is installed again, the
others wait for their link. A route the table has for that prefix, whatever its next hop, is
left alone, and no other route is ever touched: the data plane's host routes, a visitor's
route, a route an operator added are not this role's. What it puts back is logged once per
route per outage; a route that waits is logged once when it goes, never again while its link
stays down; a refused install is logged rate-limited.

Kernel changes go through :mod:`agent.core.netlink`'s worker, as every change the agent makes.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from agent.core import netlink
from agent.core.config import StaticRoute
from agent.core.netlink import NetlinkError, Op, error_code, tolerate
from agent.core.role import Periodic, Role
from agent.mobility.ratelog import RateLimitedLog
from agent.routing.link_events import IFF_LOWER_UP, IFF_UP, LinkEvents, LinkEventsError

log = logging.getLogger(__name__)

#: Seconds between two looks without an announcement (the fallback, not the usual path).
CHECK_PERIOD = 1.0
#: The fallback look's period on a router with more than LOOKUP_MAX routes (check_period).
LARGE_CHECK_PERIOD = 10.0
#: The kernel's main routing table, where the topology's routes are.
MAIN_TABLE = 254
#: A route that cannot be installed, or a look that fails: one log line per this many seconds.
FAILURE_LOG_INTERVAL = 30.0


@dataclass(frozen=True)
class Link:
    """An interface as the kernel reports it: whether it carries traffic, and its subnets."""

    name: str
    #: Admin up and with carrier (``IFF_UP`` and ``IFF_LOWER_UP``).
    up: bool
    networks: tuple[ipaddress.IPv4Network, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """What a look reads: the destinations in the main table and the links."""

    #: Destination prefixes of the main table's IPv4 routes, canonical ("10.1.0.0/24").
    destinations: frozenset[str]
    links: tuple[Link, ...]


@dataclass(frozen=True)
class Plan:
    """The configured routes, sorted by what a look found."""

    #: Missing, next hop on a link that is up: to install again now.
    reinstall: tuple[StaticRoute, ...]
    #: Missing, next hop on no link that is up: they come back with their link.
    waiting: tuple[StaticRoute, ...]
    #: The table has a route to that prefix (ours or anyone's: left alone).
    present: tuple[StaticRoute, ...]


def next_hop_link(via: str, links: Iterable[Link]) -> Link | None:
    """The link that is up and has ``via`` in one of its subnets, or None."""
    address = ipaddress.IPv4Address(via)
    return next((link for link in links
                 if link.up and any(address in net for net in link.networks)), None)


def plan(routes: Sequence[StaticRoute], snapshot: Snapshot) -> Plan:
    """Which of ``routes`` to install again given ``snapshot`` (pure: no kernel, no clock)."""
    reinstall: list[StaticRoute] = []
    waiting: list[StaticRoute] = []
    present: list[StaticRoute] = []
    for route in routes:
        if route.prefix in snapshot.destinations:
            present.append(route)
        elif next_hop_link(route.via, snapshot.links) is not None:
            reinstall.append(route)
        else:
            waiting.append(route)
    return Plan(tuple(reinstall), tuple(waiting), tuple(present))


# --- the kernel side (operations for the netlink worker) ------------------------------------


def snapshot_of(routes: Iterable[Any], links: Iterable[Any], addresses: Iterable[Any]) -> Snapshot:
    """A :class:`Snapshot` from pyroute2's route, link and address messages."""
    destinations = set()
    for msg in routes:
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if msg["family"] != socket.AF_INET or table != MAIN_TABLE:
            continue
        dst = msg.get_attr("RTA_DST") or "0.0.0.0"
        destinations.add(str(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)))
    networks: dict[int, list[ipaddress.IPv4Network]] = {}
    for msg in addresses:
        local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if msg["family"] == socket.AF_INET and local:
            networks.setdefault(msg["index"], []).append(
                ipaddress.IPv4Network(f"{local}/{msg['prefixlen']}", strict=False))
    return Snapshot(frozenset(destinations), tuple(
        Link(str(msg.get_attr("IFLA_IFNAME")),
             bool(msg["flags"] & IFF_UP and msg["flags"] & IFF_LOWER_UP),
             tuple(networks.get(msg["index"], ())))
        for msg in links))


#: Up to this many configured routes a look asks for each (:func:`op_snapshot_for`); more
#: (a scale topology's router has a route to every network) and one dump of the main table
#: costs less than the lookups (pyroute2 parses a lookup in about 0.5 ms, a dumped route in
#: about 0.08 ms: 100 lookups 45 ms, a dump of 1,101 routes 86 ms, measured in a namespace).
LOOKUP_MAX = 16


def op_snapshot(ipr: Any) -> Snapshot:
    """Read the main table's IPv4 routes, the links and their IPv4 addresses."""
    return snapshot_of(ipr.get_routes(family=socket.AF_INET, table=MAIN_TABLE),
                       ipr.get_links(), ipr.get_addr(family=socket.AF_INET))


#: ``RTM_F_FIB_MATCH``: a route lookup answers the table entry that matched (its prefix),
#: not a host route for the address asked (``ip route get fibmatch``, Linux 4.13).
RTM_F_FIB_MATCH = 0x2000


def matching_prefix(answer: Iterable[Any]) -> str | None:
    """The main-table prefix a fibmatch lookup answered, canonical, or None."""
    for msg in answer:
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if msg["family"] == socket.AF_INET and table == MAIN_TABLE:
            dst = msg.get_attr("RTA_DST") or "0.0.0.0"
            return str(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False))
    return None


def op_snapshot_for(prefixes: Iterable[str]) -> Op[Snapshot]:
    """Read, for each of ``prefixes``, whether the main table has a route to exactly it, and
    the links with their IPv4 addresses.

    One fibmatch lookup per configured prefix, not a dump of the table: the HOA's userspace
    tunnel keeps a host route per away object in the main table, and a dump every second
    cost 85 ms of CPU with 1,000 bindings (2.4 ms with 17 routes), housekeeping that grew
    with the bindings (issue 15). A lookup for a prefix's first address cannot be answered by
    those host routes (objects never sit on a network address), so what it finds is the
    prefix's own route or a wider one (then the prefix's is missing)."""
    wanted = tuple(prefixes)

    def run(ipr: Any) -> Snapshot:
        destinations = set()
        for prefix in wanted:
            address = str(ipaddress.IPv4Network(prefix, strict=False).network_address)
            try:
                found = matching_prefix(ipr.route("get", dst=address, flags=RTM_F_FIB_MATCH))
            except Exception as exc:  # noqa: BLE001 - pyroute2's error classes vary by version
                if error_code(exc) in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT):
                    continue  # nothing matches: the prefix's route is missing
                raise
            if found == prefix:
                destinations.add(prefix)
        links = snapshot_of((), ipr.get_links(), ipr.get_addr(family=socket.AF_INET)).links
        return Snapshot(frozenset(destinations), links)

    return run


def check_period(routes: int) -> float:
    """Seconds between fallback looks: :data:`CHECK_PERIOD`, or :data:`LARGE_CHECK_PERIOD`
    for a router whose look is a dump (more than :data:`LOOKUP_MAX` routes). A scale
    topology's hundred routers each dumping ~110 routes every second kept about 0.8 s of
    CPU a second busy on two cores; link-up and address events still trigger a look at once,
    so only a lost event or a route deleted by hand waits longer."""
    return CHECK_PERIOD if routes <= LOOKUP_MAX else LARGE_CHECK_PERIOD


def snapshot_op(prefixes: Sequence[str]) -> Op[Snapshot]:
    """How a look reads the kernel: a lookup per prefix, or one dump when there are more
    than :data:`LOOKUP_MAX`."""
    return op_snapshot_for(prefixes) if len(prefixes) <= LOOKUP_MAX else op_snapshot


def op_route_add(route: StaticRoute) -> Op[bool]:
    """Add ``route`` to the main table; True when added, False when the prefix already had a
    route (``add``, not ``replace``: a route someone put there since the look is kept)."""
    run = tolerate(lambda ipr: ipr.route("add", dst=route.prefix, gateway=route.via,
                                         table=MAIN_TABLE) or True, errno.EEXIST)
    return lambda ipr: bool(run(ipr))


def _text(routes: Iterable[StaticRoute]) -> str:
    return ", ".join(f"{r.prefix} via {r.via}" for r in routes)


class StaticRoutesRole(Role):
    """Keeps this router's topology routes installed across link outages (module docstring)."""

    name = "static-routes"

    def __init__(self, agent: Any, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(agent)
        self.routes: tuple[StaticRoute, ...] = tuple(self.config.static_routes)
        self.clock = clock
        #: Routes found missing, with when they were first found so (cleared when back).
        self.missing_since: dict[StaticRoute, float] = {}
        #: Routes this role installed again since it started, and looks made.
        self.reinstalled = 0
        self.looks = 0
        self.last_reason = ""
        self.events: LinkEvents | None = None
        self._task: asyncio.Task[None] | None = None
        #: Why another look is due once the one running ends ("" none).
        self._again = ""
        self._failures = RateLimitedLog(log, FAILURE_LOG_INTERVAL, clock)

    async def start(self) -> None:
        if not self.routes:
            return
        loop = self.agent.loop or asyncio.get_running_loop()
        try:
            self.events = LinkEvents(loop, lambda events: self.poke(events[0]))
        except LinkEventsError as exc:
            log.warning("%s: routes are checked every %g s only", exc, CHECK_PERIOD)
        await self._looks("start")

    async def stop(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stop never raises
                pass

    def periodic(self) -> list[Periodic]:
        if not self.routes:
            return []
        return [Periodic("static routes", check_period(len(self.routes)),
                         lambda: self.poke("periodic"))]

    # --- looking ---------------------------------------------------------------------------

    def poke(self, reason: str) -> None:
        """Look soon (from the loop, never blocking): one look at a time, and a poke during a
        look makes one more after it, so no announcement is missed and none piles up."""
        if not self.routes:
            return
        if self._task is not None and not self._task.done():
            self._again = self._again or reason
            return
        self._task = asyncio.get_running_loop().create_task(self._looks(reason))

    async def _looks(self, reason: str) -> None:
        while True:
            try:
                await self.look(reason)
            except NetlinkError as exc:
                self._failures("look", logging.WARNING, "could not read the routing table: %s", exc)
            except Exception:  # noqa: BLE001 - a bug here must not end the looks to come
                self._failures("bug", logging.ERROR, "looking at the static routes failed",
                               exc_info=True)
            if not self._again:
                return
            reason, self._again = self._again, ""

    async def look(self, reason: str) -> Plan:
        """One look: read the table and links, install what is missing and reachable."""
        worker = netlink.default()
        snapshot = await worker.run(snapshot_op([r.prefix for r in self.routes]),
                                    "read routes and links")
        found = plan(self.routes, snapshot)
        self.looks += 1
        self.last_reason = reason
        now = self.clock()
        gone = [r for r in found.waiting if r not in self.missing_since]
        for route in found.waiting:
            self.missing_since.setdefault(route, now)
        if gone:
            log.info("static routes gone, next hop on no link that is up (they come back with "
                     "their link): %s", _text(gone))
        back: list[str] = []
        for route in found.reinstall:
            try:
                added = await worker.run(op_route_add(route), f"route {route.prefix} via {route.via}")
            except NetlinkError as exc:
                self.missing_since.setdefault(route, now)
                self._failures(f"install {route.prefix}", logging.WARNING,
                               "could not install static route %s via %s again: %s",
                               route.prefix, route.via, exc)
                continue
            since = self.missing_since.pop(route, now)
            if added:
                self.reinstalled += 1
                back.append(f"{route.prefix} via {route.via} (missing {now - since:.1f} s)")
        for route in found.present:
            self.missing_since.pop(route, None)
        if back:
            log.info("static routes installed again (%s): %s", reason, ", ".join(back))
        return found

    # --- what it shows ---------------------------------------------------------------------

    def cmd_static_routes(self) -> list[dict[str, Any]]:
        """Each configured route and whether the last look found it (``missing_s``: for how
        long it has been missing, None when installed)."""
        now = self.clock()
        return [{"prefix": r.prefix, "via": r.via,
                 "missing_s": round(now - self.missing_since[r], 3)
                 if r in self.missing_since else None}
                for r in self.routes]

    def status(self) -> dict[str, Any]:
        return {"static_routes": {"configured": len(self.routes),
                                  "missing": _text(sorted(self.missing_since, key=str)),
                                  "reinstalled": self.reinstalled}}
