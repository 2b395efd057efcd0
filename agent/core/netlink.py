"""Addresses, routes, rules, neighbours, links and tc of the agent's namespace, off the loop.

The one netlink layer of the agent (issue 9): every kernel network change in ``agent/`` goes
through here, never through ``ip``/``tc`` subprocesses.

Why a worker thread: pyroute2 >= 0.9 runs an asyncio loop inside the synchronous ``IPRoute``,
which therefore cannot be used on a thread whose loop is running (the daemon's); its
``AsyncIPRoute`` has changed API between 0.9 releases and has thinner tc support. So
:class:`Netlink` owns one ``IPRoute`` on one dedicated thread; callers hand it *operations*
(functions of the ``IPRoute``) and await the result (:meth:`Netlink.run`) or, from synchronous
code in the loop, get a future at once (:meth:`Netlink.submit`). One thread: operations apply
in the order given, and the loop never waits for the kernel.

``op_*`` functions build operations (checking their arguments at once, in the caller); the
``async`` functions below them are the everyday API. A kernel refusal becomes
:class:`NetlinkError` with the errno in ``code``; bad arguments :class:`NetlinkArgumentError`.
Adding what is already there, or removing what is already gone, is not an error.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import errno
import ipaddress
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

T = TypeVar("T")
#: An operation: runs on the worker thread with the ``IPRoute``.
Op = Callable[[Any], T]

#: Longest wait for one operation; a healthy kernel answers in well under a millisecond.
NETLINK_TIMEOUT = 10.0
#: tc parent of a clsact qdisc's egress hook (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)).
CLSACT_EGRESS = 0xFFFFFFF3
ETH_P_IP = 0x0800
GRE_KEY_FLAG = 0x2000  # GRE_KEY in if_tunnel.h, big-endian as IFLA_GRE_[IO]FLAGS carry it
NUD_PERMANENT = 0x80


class NetlinkError(AgentError):
    """The kernel refused an address, route, rule, neighbour, link or tc change."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class NetlinkArgumentError(NetlinkError, ValueError):
    """An operation asked for with arguments the kernel would refuse anyway."""


class NetlinkTimeout(NetlinkError, TimeoutError):
    """The worker did not answer within its time limit."""


def error_code(exc: BaseException) -> int | None:
    """The errno of a pyroute2 ``NetlinkError`` (or an ``OSError``), else None."""
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        code = getattr(exc, "errno", None)
    return code if isinstance(code, int) else None


def _describe(exc: BaseException, what: str) -> NetlinkError:
    if isinstance(exc, NetlinkError):
        return exc
    code = error_code(exc)
    reason = os.strerror(code) if code else f"{type(exc).__name__}: {exc}"
    return NetlinkError(f"{what}: {reason}", code)


def tolerate(op: Op[T], *codes: int) -> Op[T | None]:
    """``op``, but a refusal with one of ``codes`` (already there / already gone) is None."""

    def run(ipr: Any) -> T | None:
        try:
            return op(ipr)
        except Exception as exc:  # noqa: BLE001 - pyroute2's error classes vary by version
            if error_code(exc) in codes:
                return None
            raise

    return run


# --- the worker ------------------------------------------------------------------------------


def _open_iproute() -> Any:
    """The kernel's rtnetlink through pyroute2, with :mod:`agent.core.rtnl` beside it for
    the changes on a move's path (routes and addresses: about 0.6 ms each through pyroute2,
    10 µs by hand). A stand-in (tests' fakes) has no ``moat_rtnl`` and gets every call."""
    from pyroute2 import IPRoute

    from agent.core.rtnl import Rtnl

    ipr = IPRoute()
    ipr.moat_rtnl = Rtnl()
    return ipr


def _rtnl(ipr: Any) -> Any:
    """The hand-built rtnetlink path of a real worker's IPRoute, else None."""
    return getattr(ipr, "moat_rtnl", None)


class Netlink:
    """One ``IPRoute`` on one thread of its own; operations run there in submission order."""

    def __init__(self, factory: Callable[[], Any] = _open_iproute, *,
                 timeout: float = NETLINK_TIMEOUT) -> None:
        self.timeout = timeout
        self._factory = factory
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="moat-netlink", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The worker thread (tests check that operations run there)."""
        return self._thread

    def _serve(self) -> None:
        try:
            ipr, broken = self._factory(), None
        except Exception as exc:  # noqa: BLE001 - every later operation reports it
            ipr, broken = None, NetlinkError(f"cannot open netlink: {exc}", error_code(exc))
            log.warning("%s", broken)
        while True:
            item = self._queue.get()
            if item is None:
                break
            op, future, what = item
            if not future.set_running_or_notify_cancel():
                continue
            if broken is not None:
                future.set_exception(broken)
                continue
            try:
                future.set_result(op(ipr))
            except BaseException as exc:  # noqa: BLE001 - goes to the caller, typed
                future.set_exception(_describe(exc, what))
        if ipr is not None:
            try:
                fast = _rtnl(ipr)
                if fast is not None:
                    fast.close()
                ipr.close()
            except Exception as exc:  # noqa: BLE001 - closing must not fail
                log.debug("netlink close: %s", exc)

    def submit(self, op: Op[T], what: str) -> concurrent.futures.Future[T]:
        """Queue ``op``; never blocks. Its future fails with :class:`NetlinkError`."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise NetlinkError(f"{what}: the netlink worker is closed")
            self._queue.put((op, future, what))
        return future

    async def run(self, op: Op[T], what: str, timeout: float | None = None) -> T:
        """Run ``op`` on the worker and await its result without blocking the loop."""
        future = self.submit(op, what)
        limit = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), limit)
        except asyncio.TimeoutError:
            future.cancel()
            raise NetlinkTimeout(f"{what}: no answer within {limit:g}s") from None

    def call(self, op: Op[T], what: str, timeout: float | None = None) -> T:
        """Run ``op`` and wait for it: for code outside the event loop (probes, threads)."""
        if threading.current_thread() is self._thread:
            raise NetlinkError(f"{what}: called from the netlink worker itself (would deadlock)")
        limit = self.timeout if timeout is None else timeout
        future = self.submit(op, what)
        try:
            return future.result(limit)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise NetlinkTimeout(f"{what}: no answer within {limit:g}s") from None

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued (up to ``timeout``), then close the ``IPRoute``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(self.timeout if timeout is None else timeout)
        if self._thread.is_alive():
            log.warning("netlink worker still busy after close: abandoning it")


_default: Netlink | None = None
_default_pid = 0
_default_lock = threading.Lock()


def default() -> Netlink:
    """This process's worker (made on first use; a forked child gets its own)."""
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default_pid != os.getpid():
            _default, _default_pid = Netlink(), os.getpid()
        return _default


def use(netlink: Netlink | None) -> Netlink | None:
    """Make ``netlink`` the default (tests inject one with a fake IPRoute); the old one."""
    global _default, _default_pid
    with _default_lock:
        old, _default, _default_pid = _default, netlink, os.getpid()
        return old


@atexit.register
def shutdown() -> None:
    """Apply what is still queued before the process goes (a tunnel's last route removals)."""
    with _default_lock:
        netlink = _default if _default_pid == os.getpid() else None
    if netlink is not None:
        netlink.close()


# --- argument checks ---------------------------------------------------------------------------


def _address(value: str, what: str = "address") -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise NetlinkArgumentError(f"{what} {value!r} is not an IP address") from exc


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value if value != "default" else "0.0.0.0/0")
    except ValueError as exc:
        raise NetlinkArgumentError(f"destination {value!r} is not a network (a.b.c.d/len)") from exc


def _prefixlen(value: int, address: str) -> int:
    limit = 32 if ipaddress.ip_address(address).version == 4 else 128
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise NetlinkArgumentError(f"prefix length {value!r} is not 0..{limit}")
    return value


def _ifname(value: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= 15 or "/" in value or " " in value:
        raise NetlinkArgumentError(f"interface name {value!r} must be 1..15 characters")
    return value


def _u32(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise NetlinkArgumentError(f"{what} {value!r} is not a 32-bit unsigned integer")
    return value


#: The loopback device's ifindex in every network namespace (the kernel's LOOPBACK_IFINDEX).
LOOPBACK_IFINDEX = 1


def index_of(ipr: Any, ifname: str) -> int:
    """The ifindex of ``ifname`` (on the worker); :class:`NetlinkError` ENODEV if none.

    ``lo`` needs no lookup: a home address goes on or off it at every move's switch, and a
    lookup is a netlink round trip as long as the change itself (about 0.6 ms each)."""
    if ifname == "lo":
        return LOOPBACK_IFINDEX
    if _rtnl(ipr) is not None:  # the kernel itself: an ioctl, not a dump of links
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            raise NetlinkError(f"no interface {ifname}", errno.ENODEV) from None
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkError(f"no interface {ifname}", errno.ENODEV)
    return int(found[0])


# --- operations: addresses, routes, rules, neighbours --------------------------------------------


def op_address(command: str, address: str, prefixlen: int, ifname: str) -> Op[None]:
    """``add`` (already there is fine) or ``del`` (already gone is fine) an address."""
    address = _address(address)
    prefixlen, ifname = _prefixlen(prefixlen, address), _ifname(ifname)
    if command not in ("add", "del"):
        raise NetlinkArgumentError(f"address command {command!r} is not add or del")

    def run(ipr: Any) -> None:
        index = index_of(ipr, ifname)
        fast = _rtnl(ipr)
        if fast is not None and ipaddress.ip_address(address).version == 4:
            fast.address(command, index, address, prefixlen)
        else:
            ipr.addr(command, index=index, address=address, prefixlen=prefixlen)

    return tolerate(run, errno.EEXIST if command == "add" else errno.EADDRNOTAVAIL)


def op_route(command: str, destination: str, *, via: str | None = None, ifname: str | None = None,
             table: int | None = None, ifindex: int | None = None) -> Op[None]:
    """``replace`` or ``del`` the route to ``destination`` (via a gateway and/or a device,
    named, or by its ``ifindex`` when the caller made it and knows it: no lookup)."""
    net = _network(destination)
    spec: dict[str, Any] = {"dst": str(net)}
    if via is not None:
        spec["gateway"] = _address(via, "gateway")
    if table is not None:
        spec["table"] = _u32(table, "table")
    if ifindex is not None:
        if ifname is not None:
            raise NetlinkArgumentError("a route names its device or gives its index, not both")
        spec["oif"] = _u32(ifindex, "ifindex")
    if command == "replace" and via is None and ifname is None and ifindex is None:
        raise NetlinkArgumentError(f"a route to {destination} needs a gateway or a device")
    if command not in ("replace", "del"):
        raise NetlinkArgumentError(f"route command {command!r} is not replace or del")
    device = _ifname(ifname) if ifname is not None else None

    def run(ipr: Any) -> None:
        kwargs = dict(spec)
        if device is not None:
            kwargs["oif"] = index_of(ipr, device)
        fast = _rtnl(ipr)
        if fast is not None and net.version == 4:
            fast.route(command, str(net.network_address), net.prefixlen, oif=kwargs.get("oif"),
                       gateway=kwargs.get("gateway"), table=kwargs.get("table", 254))
        else:
            ipr.route(command, **kwargs)

    return run if command == "replace" else tolerate(run, errno.ESRCH, errno.ENOENT, errno.ENODEV)


def op_rule(command: str, src: str, table: int, priority: int) -> Op[None]:
    """``add`` or ``del`` the policy rule ``from src/32 lookup table priority priority``."""
    spec = {"src": _address(src, "source"), "src_len": 32, "table": _u32(table, "table"),
            "priority": _u32(priority, "priority")}
    if command not in ("add", "del"):
        raise NetlinkArgumentError(f"rule command {command!r} is not add or del")

    return tolerate(lambda ipr: ipr.rule(command, **spec),
                    errno.EEXIST if command == "add" else errno.ENOENT)


def op_dst_rule(command: str, dst: str, table: int, priority: int,
                iif: str | None = None) -> Op[None]:
    """``add`` or ``del`` the policy rule ``[iif IIF] to dst/32 lookup table priority P``."""
    spec: dict[str, Any] = {"dst": _address(dst, "destination"), "dst_len": 32,
                            "table": _u32(table, "table"), "priority": _u32(priority, "priority")}
    if iif is not None:
        spec["iifname"] = _ifname(iif)
    if command not in ("add", "del"):
        raise NetlinkArgumentError(f"rule command {command!r} is not add or del")

    return tolerate(lambda ipr: ipr.rule(command, **spec),
                    errno.EEXIST if command == "add" else errno.ENOENT)


def op_local_route(command: str, address: str, table: int) -> Op[None]:
    """``replace`` or ``del`` ``local address/32 dev lo table T``: delivered here, for the
    packets a rule sends to that table only (the address is not one of the router's)."""
    address = _address(address)
    spec: dict[str, Any] = {"dst": f"{address}/32", "table": _u32(table, "table"),
                            "type": "local", "scope": "host"}
    if command not in ("replace", "del"):
        raise NetlinkArgumentError(f"route command {command!r} is not replace or del")

    def run(ipr: Any) -> None:
        fast = _rtnl(ipr)
        if fast is not None and ipaddress.ip_address(address).version == 4:
            fast.route(command, address, 32, oif=LOOPBACK_IFINDEX, table=spec["table"], local=True)
        else:
            ipr.route(command, oif=index_of(ipr, "lo"), **spec)

    return run if command == "replace" else tolerate(run, errno.ESRCH, errno.ENOENT, errno.ENODEV)


def op_neighbour(command: str, address: str, ifname: str, lladdr: str | None = None) -> Op[None]:
    """``replace`` (permanent, with ``lladdr``) or ``del`` a neighbour entry."""
    spec: dict[str, Any] = {"dst": _address(address)}
    ifname = _ifname(ifname)
    if command == "replace":
        if not lladdr:
            raise NetlinkArgumentError("a neighbour entry needs a link-layer address")
        spec.update(lladdr=lladdr, state=NUD_PERMANENT)
    elif command != "del":
        raise NetlinkArgumentError(f"neighbour command {command!r} is not replace or del")

    run: Op[None] = lambda ipr: ipr.neigh(command, ifindex=index_of(ipr, ifname), **spec)  # noqa: E731
    return run if command == "replace" else tolerate(run, errno.ENOENT, errno.ESRCH)


# --- operations: links and tc ----------------------------------------------------------------------


def op_link_set(ifname: str, *, up: bool | None = None, mtu: int | None = None,
                txqlen: int | None = None) -> Op[None]:
    """Set a link's state, MTU and queue length."""
    ifname = _ifname(ifname)
    spec: dict[str, Any] = {}
    if up is not None:
        spec["state"] = "up" if up else "down"
    if mtu is not None:
        spec["mtu"] = _u32(mtu, "mtu")
    if txqlen is not None:
        spec["txqlen"] = _u32(txqlen, "txqlen")

    return lambda ipr: ipr.link("set", index=index_of(ipr, ifname), **spec)


def op_link_del(ifname: str) -> Op[None]:
    """Delete a link; one already gone is not an error."""
    ifname = _ifname(ifname)

    def run(ipr: Any) -> None:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=int(found[0]))

    return tolerate(run, errno.ENODEV)


def op_gre_add(ifname: str, local: str, remote: str, key: int | None = None, *,
               replace: bool = True, up: bool = True) -> Op[int]:
    """Make a GRE netdev (keyed if ``key``) and return its index.

    With ``replace`` a device of that name left by a killed agent is deleted and made again.
    """
    spec: dict[str, Any] = {"ifname": _ifname(ifname), "kind": "gre", "gre_local": _address(local),
                            "gre_remote": _address(remote)}
    if key is not None:
        spec.update(gre_ikey=_u32(key, "GRE key"), gre_okey=key, gre_iflags=GRE_KEY_FLAG,
                    gre_oflags=GRE_KEY_FLAG, gre_ttl=64)

    def run(ipr: Any) -> int:
        try:
            ipr.link("add", **spec)
        except Exception as exc:  # noqa: BLE001 - pyroute2's error classes vary by version
            if not replace or error_code(exc) != errno.EEXIST:
                raise
            log.warning("GRE device %s already exists: replacing it", ifname)
            ipr.link("del", index=index_of(ipr, ifname))
            ipr.link("add", **spec)
        index = index_of(ipr, ifname)
        if up:
            ipr.link("set", index=index, state="up")
        return index

    return run


def op_qdiscs(ifname: str) -> Op[tuple[int, list[tuple[int, int, str]]]]:
    """``(ifindex, [(parent, handle, kind)])`` of an interface's qdiscs; ENODEV if none."""
    ifname = _ifname(ifname)

    def run(ipr: Any) -> tuple[int, list[tuple[int, int, str]]]:
        index = index_of(ipr, ifname)
        return index, [(q["parent"], q["handle"], q.get_attr("TCA_KIND"))
                       for q in ipr.get_qdiscs(index)]

    return run


def op_tc(command: str, kind: str, index: int, handle: int = 0, *, missing_ok: bool = False,
          **kwargs: Any) -> Op[None]:
    """One pyroute2 ``tc`` call on interface ``index`` (a del of something gone is fine
    with ``missing_ok``)."""

    run: Op[None] = lambda ipr: ipr.tc(command, kind, index, handle, **kwargs)  # noqa: E731
    return tolerate(run, errno.ENOENT, errno.EINVAL) if missing_ok else run


def u32_match_dst(address: str) -> str:
    """The u32 key matching IPv4 destination ``address``/32 (offset 16 of the header)."""
    packed = ipaddress.IPv4Address(_address(address)).packed
    return f"0x{int.from_bytes(packed, 'big'):08x}/0xffffffff+16"


def op_mirrors(ifname: str, mirrors: dict[str, Sequence[str]], prio: int) -> Op[None]:
    """Replace ``ifname``'s egress mirrors: for each inner destination, copy its packets to
    the listed devices (a clsact qdisc with one u32 filter and mirred actions per
    destination). An empty ``mirrors`` just removes the clsact qdisc and its filters."""
    ifname = _ifname(ifname)
    wanted = {_address(dst): [_ifname(d) for d in devs] for dst, devs in mirrors.items()}

    def run(ipr: Any) -> None:
        index = index_of(ipr, ifname)
        tolerate(lambda i: i.tc("del", "clsact", index), errno.ENOENT, errno.EINVAL)(ipr)
        if not wanted:
            return
        ipr.tc("add", "clsact", index)
        for dst, others in sorted(wanted.items()):
            actions = [{"kind": "mirred", "direction": "egress", "action": "mirror",
                        "ifindex": index_of(ipr, other)} for other in others]
            ipr.tc("add-filter", "u32", index, parent=CLSACT_EGRESS, prio=prio, protocol=ETH_P_IP,
                   target=0, keys=[u32_match_dst(dst)], action=actions)

    return run


# --- the async API ---------------------------------------------------------------------------------


async def address_add(address: str, prefixlen: int, ifname: str) -> None:
    """Add ``address/prefixlen`` to ``ifname``; an address already there is not an error."""
    await default().run(op_address("add", address, prefixlen, ifname),
                        f"add address {address}/{prefixlen} to {ifname}")


async def address_del(address: str, prefixlen: int, ifname: str) -> None:
    """Remove ``address/prefixlen`` from ``ifname``; an address already gone is not an error."""
    await default().run(op_address("del", address, prefixlen, ifname),
                        f"remove address {address}/{prefixlen} from {ifname}")


async def route_replace(destination: str, via: str) -> None:
    """Route ``destination`` (``a.b.c.d/len``) through gateway ``via``."""
    await default().run(op_route("replace", destination, via=via), f"route {destination} via {via}")


async def route_del(destination: str) -> None:
    """Remove the route to ``destination``; a missing route is not an error."""
    await default().run(op_route("del", destination), f"remove route {destination}")


async def rule_add(src: str, table: int, priority: int) -> None:
    """Look up ``table`` for packets from ``src``; a rule already there is not an error."""
    await default().run(op_rule("add", src, table, priority), f"rule from {src} lookup {table}")


async def rule_del(src: str, table: int, priority: int) -> None:
    """Remove that rule; one already gone is not an error."""
    await default().run(op_rule("del", src, table, priority), f"remove rule from {src} lookup {table}")


async def neighbour_replace(address: str, ifname: str, lladdr: str) -> None:
    """A permanent neighbour entry ``address -> lladdr`` on ``ifname``."""
    await default().run(op_neighbour("replace", address, ifname, lladdr),
                        f"neighbour {address} lladdr {lladdr} on {ifname}")


async def neighbour_del(address: str, ifname: str) -> None:
    """Remove a neighbour entry; one already gone is not an error."""
    await default().run(op_neighbour("del", address, ifname), f"remove neighbour {address} on {ifname}")


async def neighbour_of(address: str) -> tuple[str, str] | None:
    """(interface, link-layer address) of on-link neighbour ``address`` as the kernel knows
    it now (any state with an address), or None."""
    dst = _address(address)

    def run(ipr: Any) -> tuple[str, str] | None:
        for msg in ipr.get_neighbours(dst=dst):
            lladdr = msg.get_attr("NDA_LLADDR")
            if lladdr:
                links = ipr.get_links(msg["ifindex"])
                return (links[0].get_attr("IFLA_IFNAME") if links else "", str(lladdr))
        return None

    return await default().run(run, f"neighbour {dst}")


async def link_set(ifname: str, *, up: bool | None = None, mtu: int | None = None,
                   txqlen: int | None = None) -> None:
    """Set a link's state, MTU and queue length."""
    await default().run(op_link_set(ifname, up=up, mtu=mtu, txqlen=txqlen), f"set link {ifname}")


async def link_index(ifname: str) -> int | None:
    """The ifindex of ``ifname``, or None if there is no such interface."""
    name = _ifname(ifname)

    def run(ipr: Any) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    return await default().run(run, f"look up {ifname}")
