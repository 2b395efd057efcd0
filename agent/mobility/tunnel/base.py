"""What both GRE backends share: errors, IPv4 parsing, argument checks and the kernel queue.

A tunnel's methods (``set_peers``, ``accept``, ...) are synchronous and are called from the
daemon's event loop, so they must not wait for the kernel. Each one updates the tunnel's
tables at once (the userspace data path reads them on the next packet) and queues its route,
rule, link and tc changes on the agent's netlink worker (:mod:`agent.core.netlink`), which
applies them in order. :meth:`Tunnel.settle` awaits them and reports refusals;
:meth:`Tunnel.astart` / :meth:`Tunnel.aclose` are ``start``/``close`` plus that wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from packets.errors import MalformedMessage

from agent.core import netlink as nl
from agent.core.errors import AgentError

log = logging.getLogger(__name__)

GRE_PROTO = 47
#: Policy-routing table (and rule priority) for reverse-tunnelled sources. The kernel backend
#: uses one table per HOA device, counting up from here.
REVERSE_TABLE = 4347
REVERSE_PRIORITY = 4347
#: Longest :meth:`Tunnel.settle` waits for queued kernel changes.
SETTLE_TIMEOUT = nl.NETLINK_TIMEOUT

STAT_KEYS = (
    "encapsulated",          # inner packets taken from the kernel and sent (once per packet)
    "copies_sent",           # GRE packets sent (one per peer: bicast sends several)
    "decapsulated",          # inner packets handed back to the kernel
    "dropped_unknown_peer",  # GRE from a (remote, key) that was not accepted, or without a key
    "dropped_malformed",     # bad outer IPv4, bad GRE, not IPv4 inside
    "dropped_no_peer",       # routed into the tunnel but no peer for its dst nor reverse src
    "dropped_send_error",    # sendto/write failed (buffer full, no route to the remote...)
    "dropped_loop",          # our own GRE routed back into the tunnel
    "dropped_not_visitor",   # decapsulated for an address the (remote, key) does not serve
    "rerouted",              # read while its route into the tunnel was being deleted, sent again
)


class TunnelError(AgentError):
    """A tunnel that cannot be set up (device, socket, netlink)."""


class TunnelUnavailable(TunnelError):
    """The requested backend cannot run here; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# --- small helpers ---------------------------------------------------------------------------


class Ipv4Header(NamedTuple):
    """The fields of an IPv4 header the tunnel looks at."""

    header_length: int  # bytes (IHL * 4)
    total_length: int
    protocol: int
    src: str
    dst: str


def parse_ipv4(data: bytes) -> Ipv4Header:
    """The header of an IPv4 packet; :class:`MalformedMessage` unless it is a sane one.

    Checks version 4, IHL >= 5 and that both the header and the total length fit in ``data``
    (trailing bytes after the total length are allowed; callers cut them off).
    """
    if len(data) < 20:
        raise MalformedMessage(f"IPv4 packet is {len(data)} bytes < 20")
    version, ihl = data[0] >> 4, (data[0] & 0x0F) * 4
    if version != 4:
        raise MalformedMessage(f"IP version {version} != 4", 0)
    if ihl < 20 or ihl > len(data):
        raise MalformedMessage(f"IPv4 header length {ihl} does not fit {len(data)} bytes", 0)
    (total,) = struct.unpack_from("!H", data, 2)
    if total < ihl or total > len(data):
        raise MalformedMessage(f"IPv4 total length {total} does not fit {len(data)} bytes", 2)
    return Ipv4Header(ihl, total, data[9], socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]))


def ipv4_addresses(packet: bytes) -> tuple[str, str] | None:
    """(src, dst) of an IPv4 packet, or None if it is not one."""
    try:
        header = parse_ipv4(packet)
    except MalformedMessage:
        return None
    return header.src, header.dst


def check_address(address: str, what: str) -> str:
    """``address`` as a normalised IPv4 string; ValueError naming ``what`` otherwise."""
    try:
        return str(ipaddress.IPv4Address(address))
    except (ipaddress.AddressValueError, ValueError) as exc:
        raise ValueError(f"{what} {address!r} is not an IPv4 address") from exc


def check_key(key: int) -> int:
    """A GRE key is a 32-bit unsigned integer (and not a bool)."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= 0xFFFFFFFF:
        raise ValueError(f"GRE key {key!r} is not a 32-bit unsigned integer")
    return key


def check_peer(peer: Sequence[Any]) -> tuple[str, int]:
    """A ``(remote, key)`` pair, checked."""
    remote, key = peer
    return check_address(remote, "remote"), check_key(key)


def dedupe(peers: Iterable[Sequence[Any]]) -> list[tuple[str, int]]:
    """Checked peers, duplicates dropped, order kept (the first is the primary)."""
    out: list[tuple[str, int]] = []
    for peer in peers:
        p = check_peer(peer)
        if p not in out:
            out.append(p)
    return out


def write_sysctl(path: str, value: str) -> bool:
    """Write a /proc/sys value; False (logged at debug) where the kernel has no such knob."""
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)
        return False


def read_sysctl(path: str) -> str | None:
    """A /proc or /sys value, stripped; None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class RpFilter:
    """Decapsulated packets come in on the tunnel device with sources routed elsewhere.

    Reverse-path filtering must be off on the tunnel device, and only there. The kernel uses
    the larger of ``all`` and the device's value, so while ``all`` is above 0 no device can
    be off. :meth:`relax_all` therefore moves ``all``'s value down onto every other interface
    (and ``default``, for interfaces made later), each keeping max(its own, ``all``) — what
    the kernel applied to it anyway — and then sets ``all`` to 0: the filtering of every
    other interface is unchanged and the tunnel device alone is off. :meth:`restore` puts
    back every value it changed.
    """

    CONF = "/proc/sys/net/ipv4/conf"

    def __init__(self, conf: str = CONF) -> None:
        self.conf = conf
        #: Path -> value before relax_all changed it.
        self._saved: dict[str, str] = {}
        #: Tunnel devices that stay off (see relax_device).
        self._exempt: set[str] = set()

    @staticmethod
    def device(ifname: str, conf: str = CONF) -> None:
        """Turn reverse-path filtering off on the tunnel device ``ifname``."""
        write_sysctl(f"{conf}/{ifname}/rp_filter", "0")
        # A tunnel carries IPv4 only; no IPv6 link-local chatter into it.
        write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")

    def relax_device(self, ifname: str) -> None:
        """:meth:`device`, and keep ``ifname`` off when :meth:`relax_all` runs later."""
        self._exempt.add(ifname)
        self.device(ifname, self.conf)

    def relax_all(self) -> None:
        """Let the tunnel devices be off without relaxing any other interface (see above)."""
        all_path = f"{self.conf}/all/rp_filter"
        value = read_sysctl(all_path)
        if value not in ("1", "2"):
            return  # 0 (or unreadable): each interface's own value applies already
        try:
            names = sorted(os.listdir(self.conf))
        except OSError as exc:
            log.warning("cannot list %s: %s; rp_filter left as it is", self.conf, exc)
            return
        for name in names:
            if name == "all" or name in self._exempt:
                continue
            path = f"{self.conf}/{name}/rp_filter"
            own = read_sysctl(path)
            if own is not None and own.isdigit() and int(own) < int(value) \
                    and write_sysctl(path, value):
                self._saved[path] = own
        if write_sysctl(all_path, "0"):
            self._saved[all_path] = value
            log.info("net.ipv4.conf.all.rp_filter %s moved onto each interface, so that only "
                     "the tunnel devices are off", value)

    def restore(self) -> None:
        for path, value in self._saved.items():
            write_sysctl(path, value)
        self._saved.clear()


class LogLimiter:
    """At most one log line per kind per ``interval`` seconds: a flood must not flood the log."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if len(self._last) > 1024:  # kinds can come from the wire (sources, keys): stay bounded
            self._last.clear()
        if now - self._last.get(kind, -self.interval) >= self.interval:
            self._last[kind] = now
            log.log(level, msg, *args)


# --- the common part ---------------------------------------------------------------------------


class Tunnel:
    """What both backends keep and offer; see the package docstring."""

    backend = "none"
    #: Whether :meth:`set_peers` takes effect only once queued kernel work is done (eBPF
    #: maps, kernel GRE devices), rather than at once in this process (userspace): a home
    #: agent then answers a deregistration only after :meth:`settle`.
    peers_in_kernel = True

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 netlink: nl.Netlink | None = None) -> None:
        if not name or len(name) > 15:
            raise ValueError(f"interface name {name!r} must be 1..15 characters")
        self.loop = loop
        self.local = check_address(local, "local address")
        self.name = name
        #: the netlink worker; None: the process's default (looked up when first needed)
        self.netlink = netlink
        #: inner destination (home address) -> [(remote, key)] in the order given
        self.peers: dict[str, list[tuple[str, int]]] = {}
        #: (remote, key) pairs whose GRE is decapsulated
        self.accepted: set[tuple[str, int]] = set()
        #: inner source (visitor's home address) -> (remote, key) it is reverse-tunnelled to
        self.reverse: dict[str, tuple[str, int]] = {}
        self._counters = {k: 0 for k in STAT_KEYS}
        self._rp = RpFilter()
        self._limit = LogLimiter()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._failures: list[str] = []

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._counters)

    # --- the kernel queue ----------------------------------------------------------------------

    def _apply(self, op: nl.Op[Any], what: str, on_error: Callable[[], None] | None = None
               ) -> concurrent.futures.Future[Any] | None:
        """Queue one kernel change; a refusal is logged, undone with ``on_error`` (on the
        loop) and reported by the next :meth:`settle`. Its future (None if not queued)."""
        try:
            future = (self.netlink or nl.default()).submit(op, what)
        except nl.NetlinkError as exc:
            self._failed(str(exc), on_error)
            return None
        self._pending.add(future)
        future.add_done_callback(lambda f: self._finished(f, on_error))
        return future

    def _finished(self, future: concurrent.futures.Future[Any],
                  on_error: Callable[[], None] | None) -> None:
        """Runs on the netlink worker: hand the outcome to the loop's thread."""
        try:
            self.loop.call_soon_threadsafe(self._outcome, future, on_error)
        except RuntimeError:  # the loop is closed (shutdown): nobody is left to tell
            self._pending.discard(future)
            if not future.cancelled() and future.exception() is not None:
                log.warning("%s", future.exception())

    def _outcome(self, future: concurrent.futures.Future[Any],
                 on_error: Callable[[], None] | None) -> None:
        self._pending.discard(future)
        if future.cancelled():
            self._failed("a kernel change was cancelled", on_error)
        elif future.exception() is not None:
            self._failed(str(future.exception()), on_error)

    def _failed(self, message: str, on_error: Callable[[], None] | None) -> None:
        log.warning("tunnel %s: %s", self.name, message)
        self._failures.append(message)
        del self._failures[:-32]  # bounded: a tunnel nobody settles must not grow
        if on_error is not None:
            on_error()

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until the kernel has every change asked for so far.

        Raises :class:`TunnelError` naming the changes the kernel refused since the last
        call (they were logged when they happened), or those still pending at ``timeout``.
        """
        pending = [asyncio.wrap_future(f) for f in list(self._pending)]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
            if late:
                raise TunnelError(f"{len(late)} kernel change(s) not done within {timeout:g}s")
        await asyncio.sleep(0)  # the outcome callbacks queued on the loop run first
        failures, self._failures = self._failures, []
        if failures:
            raise TunnelError("; ".join(failures))

    def start(self) -> None:
        """Set the tunnel up, waiting (once, at start-up) until the kernel has done it: the
        agent serves nothing before, and every later change finds a warm netlink worker.
        :class:`TunnelError` if it cannot be done; :meth:`astart` does not block the loop."""
        future = self._begin()
        if future is None:
            return
        try:
            future.result(SETTLE_TIMEOUT)
        except Exception as exc:
            self.close()
            raise TunnelError(str(exc)) from exc

    async def astart(self) -> None:
        """:meth:`start` without blocking the loop (TunnelError if it cannot be done)."""
        self._begin()
        try:
            await self.settle()
        except TunnelError:
            self.close()
            raise

    def _begin(self) -> concurrent.futures.Future[Any] | None:
        """Start: what can be done at once, plus the queued kernel change to wait for."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """:meth:`close`, returning once routes, rules and devices are gone."""
        self.close()
        try:
            await self.settle()
        except TunnelError as exc:
            log.warning("closing tunnel %s: %s", self.name, exc)

    # --- the interface -------------------------------------------------------------------------

    def close(self) -> None:
        raise NotImplementedError

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        raise NotImplementedError

    def accept(self, remote: str, key: int) -> None:
        raise NotImplementedError

    def forget(self, remote: str, key: int) -> None:
        raise NotImplementedError

    def restrict(self, remote: str, key: int, destinations: frozenset[str] | None) -> None:
        """Decapsulate from ``(remote, key)`` only packets for ``destinations`` (an FOA's
        visitor: its home address and mobile network), dropping the rest (issue 12). The
        kernel backend decapsulates in the kernel and does not check (documented)."""

    def set_delivery(self, remote: str, key: int, via: tuple[str, str] | None) -> None:
        """Deliver what arrives from ``(remote, key)`` as a frame to the on-link neighbour
        ``via`` = (interface, MAC), not through the routing table (None: the table again):
        an FOA whose own router answers on the same home address for another instance.
        Backends that cannot raise :class:`TunnelError`."""
        raise TunnelError(f"the {self.backend} backend cannot deliver to a neighbour directly")

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        raise NotImplementedError

    # --- the reverse tunnel's policy routing (userspace and ebpf backends) --------------------
    # Both send a reverse-tunnelled source into their device by one policy table (``table``)
    # whose default route is the device, and a rule per source; they keep ``_rules`` (the
    # sources with a rule) and ``_reverse_route`` (the table's route is there).

    def _route_reverse(self, inner_src: str) -> None:
        """What ``inner_src`` sends goes into this device: the table's default route (once)
        and a rule for the source (once)."""
        if not self._reverse_route:
            self._reverse_route = True
            self._apply(nl.op_route("replace", "0.0.0.0/0", ifname=self.name, table=self.table),
                        f"default route dev {self.name} table {self.table}",
                        on_error=lambda: setattr(self, "_reverse_route", False))
        if inner_src not in self._rules:
            self._rules.add(inner_src)
            self._apply(nl.op_rule("add", inner_src, self.table, self.priority),
                        f"rule from {inner_src} lookup {self.table}",
                        on_error=lambda: self._rules.discard(inner_src))

    def _unroute_reverse(self, inner_src: str | None = None) -> None:
        """The rule for ``inner_src`` goes (every rule when None: closing), and the table's
        default route with the last reverse-tunnelled source."""
        for src in list(self._rules) if inner_src is None else [inner_src]:
            self._del_rule(src)
        if (inner_src is None or not self.reverse) and self._reverse_route:
            self._apply(nl.op_route("del", "0.0.0.0/0", ifname=self.name, table=self.table),
                        f"remove default route of table {self.table}")
            self._reverse_route = False

    def _del_rule(self, inner_src: str) -> None:
        if inner_src in self._rules:
            self._apply(nl.op_rule("del", inner_src, self.table, self.priority),
                        f"remove rule from {inner_src} lookup {self.table}")
            self._rules.discard(inner_src)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} local={self.local} peers={self.peers} "
                f"accepted={sorted(self.accepted)} reverse={self.reverse}>")
