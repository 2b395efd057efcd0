"""The static-routes role without root: which routes to put back, and that it touches no other.

The pure part (:func:`plan`, :func:`snapshot_of`, :func:`up_events`) is checked on tables and
messages built here; the role runs on the real netlink worker with a fake ``IPRoute`` that
keeps a routing table and links the way the kernel does (a link going down takes its routes).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.core.config import AgentConfig, Interface, StaticRoute
from agent.core.wait import async_wait_until
from agent.routing import link_events
from agent.routing.link_events import IFF_LOWER_UP, IFF_UP, RTM_NEWADDR, RTM_NEWLINK, up_events
from agent.routing.static_routes import Link, Snapshot, StaticRoutesRole, plan, snapshot_of
from fakenetlink import default_worker_over

#: r22a's view: two backbone links (eth1 to r18a, eth2 to r20a) and its LAN (eth0).
BEHIND_R18A = StaticRoute("10.18.0.0/24", "10.255.0.2")
ALSO_R18A = StaticRoute("10.16.0.0/24", "10.255.0.2")
BEHIND_R20A = StaticRoute("10.20.0.0/24", "10.255.0.6")
ROUTES = [BEHIND_R18A, ALSO_R18A, BEHIND_R20A]

UP = IFF_UP | IFF_LOWER_UP


def links(eth1_up: bool = True) -> tuple[Link, ...]:
    return (Link("eth0", True, (ipaddress.IPv4Network("10.22.0.0/24"),)),
            Link("eth1", eth1_up, (ipaddress.IPv4Network("10.255.0.0/30"),)),
            Link("eth2", True, (ipaddress.IPv4Network("10.255.0.4/30"),)))


# --- plan: the pure decision ----------------------------------------------------------------------


def test_missing_routes_with_a_reachable_next_hop_are_reinstalled() -> None:
    found = plan(ROUTES, Snapshot(frozenset({"10.20.0.0/24", "10.22.0.0/24"}), links()))
    assert found.reinstall == (BEHIND_R18A, ALSO_R18A)
    assert found.present == (BEHIND_R20A,) and found.waiting == ()


def test_routes_whose_link_is_down_wait_for_it() -> None:
    found = plan(ROUTES, Snapshot(frozenset({"10.20.0.0/24"}), links(eth1_up=False)))
    assert found.reinstall == () and found.waiting == (BEHIND_R18A, ALSO_R18A)


def test_a_next_hop_on_no_link_waits() -> None:
    stray = StaticRoute("10.30.0.0/24", "192.0.2.1")
    assert plan([stray], Snapshot(frozenset(), links())).waiting == (stray,)


def test_a_route_to_the_prefix_by_anyone_is_left_alone() -> None:
    # The table has 10.18.0.0/24 (whatever its next hop): nothing to do for it; a host route
    # inside a configured prefix is not a route to the prefix.
    found = plan(ROUTES, Snapshot(frozenset({"10.18.0.0/24", "10.16.0.5/32", "10.20.0.0/24"}), links()))
    assert found.present == (BEHIND_R18A, BEHIND_R20A) and found.reinstall == (ALSO_R18A,)


# --- reading the kernel's messages ------------------------------------------------------------------


class Msg(dict):
    """A pyroute2 message: fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def route_msg(dst: str | None, dst_len: int, table: int = 254, family: int = socket.AF_INET,
              gateway: str | None = None) -> Msg:
    return Msg({"RTA_DST": dst, "RTA_TABLE": table, "RTA_GATEWAY": gateway},
               family=family, dst_len=dst_len, table=table if table < 256 else 252)


def link_msg(index: int, name: str, flags: int) -> Msg:
    return Msg({"IFLA_IFNAME": name}, index=index, flags=flags)


def addr_msg(index: int, address: str, prefixlen: int) -> Msg:
    return Msg({"IFA_LOCAL": address, "IFA_ADDRESS": address}, index=index, prefixlen=prefixlen,
               family=socket.AF_INET)


def test_snapshot_reads_the_main_table_and_links_with_carrier() -> None:
    snap = snapshot_of(
        [route_msg(None, 0), route_msg("10.18.0.0", 24), route_msg("10.97.0.0", 24, table=4347),
         route_msg("10.19.0.0", 24, family=socket.AF_INET6)],
        [link_msg(2, "eth0", UP), link_msg(3, "eth1", IFF_UP), link_msg(4, "eth2", 0)],
        [addr_msg(2, "10.22.0.1", 24), addr_msg(3, "10.255.0.1", 30)])
    assert snap.destinations == {"0.0.0.0/0", "10.18.0.0/24"}
    assert [(link.name, link.up) for link in snap.links] == [("eth0", True), ("eth1", False),
                                                             ("eth2", False)]
    assert snap.links[1].networks == (ipaddress.IPv4Network("10.255.0.0/30"),)
    assert snap.links[2].networks == ()


class FibIpr:
    """An IPRoute that answers fibmatch lookups from ``table`` (prefix -> route message, or
    an errno) and refuses to dump the routing table."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []

    def route(self, command: str, dst: str, flags: int) -> list[Msg]:
        assert command == "get"
        self.asked.append((dst, flags))
        answer = self.table[dst]
        if isinstance(answer, int):
            raise OSError(answer, os.strerror(answer))
        return [answer]

    def get_routes(self, **_: Any) -> list[Msg]:
        raise AssertionError("a look must not dump the routing table")

    def get_links(self) -> list[Msg]:
        return [link_msg(2, "eth0", UP)]

    def get_addr(self, **_: Any) -> list[Msg]:
        return [addr_msg(2, "10.255.0.1", 30)]


def test_a_look_asks_each_configured_prefix_with_fibmatch_and_never_dumps_the_table() -> None:
    """Its cost is one lookup per configured route, whatever the data plane's host routes
    (1,000 of them on an HOA with 1,000 bindings: issue 15)."""
    from agent.routing.static_routes import RTM_F_FIB_MATCH, op_snapshot_for

    ipr = FibIpr({
        "10.16.0.0": route_msg("10.16.0.0", 21),                  # its own route: present
        "10.12.0.0": route_msg(None, 0),                          # only the default: missing
        "10.14.0.0": errno.ENETUNREACH,                           # nothing at all: missing
        "10.20.0.0": route_msg("10.20.0.0", 24, table=4347),      # another table's: missing
        "0.0.0.0": route_msg(None, 0),                            # the default itself
    })
    snap = op_snapshot_for(["10.16.0.0/21", "10.12.0.0/24", "10.14.0.0/24", "10.20.0.0/24",
                            "0.0.0.0/0"])(ipr)
    assert snap.destinations == {"10.16.0.0/21", "0.0.0.0/0"}
    assert ipr.asked == [(a, RTM_F_FIB_MATCH) for a in
                         ("10.16.0.0", "10.12.0.0", "10.14.0.0", "10.20.0.0", "0.0.0.0")]
    assert [link.name for link in snap.links] == ["eth0"]


def test_a_router_with_a_route_to_every_network_dumps_the_table_once_instead() -> None:
    from agent.routing.static_routes import LOOKUP_MAX, op_snapshot, snapshot_op

    many = [f"10.{100 + i}.0.0/24" for i in range(LOOKUP_MAX + 1)]
    assert snapshot_op(many) is op_snapshot
    assert snapshot_op(many[:LOOKUP_MAX]) is not op_snapshot


def test_a_router_whose_look_is_a_dump_looks_less_often_without_an_event() -> None:
    from agent.routing.static_routes import (CHECK_PERIOD, LARGE_CHECK_PERIOD, LOOKUP_MAX,
                                             check_period)

    assert check_period(LOOKUP_MAX) == CHECK_PERIOD < LARGE_CHECK_PERIOD == check_period(LOOKUP_MAX + 1)


def test_a_lookup_refused_for_another_reason_is_an_error_not_a_missing_route() -> None:
    from agent.routing.static_routes import op_snapshot_for

    with pytest.raises(OSError):
        op_snapshot_for(["10.16.0.0/21"])(FibIpr({"10.16.0.0": errno.EPERM}))


# --- link announcements -------------------------------------------------------------------------------


def nlmsg(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + b"\0" * ((-length) % 4)


def newlink(index: int, flags: int) -> bytes:
    return nlmsg(RTM_NEWLINK, struct.pack("=BBHiII", 0, 0, 1, index, flags, 0) + b"\0" * 5)


def test_up_events_name_links_up_with_carrier_and_added_addresses() -> None:
    data = (newlink(3, IFF_UP) + newlink(4, UP) + nlmsg(17, b"\0" * 16) + newlink(5, 0)
            + nlmsg(RTM_NEWADDR, b"\0" * 8))
    assert up_events(data) == ["link 4", "address"]


def test_up_events_skip_a_host_address() -> None:
    """An object's home address added on lo at every move (/32) puts no next hop on-link:
    no look of the routes on a move's switch."""
    host = struct.pack("=BBBBI", 2, 32, 0, 0, 1)
    subnet = struct.pack("=BBBBI", 2, 24, 0, 0, 3)
    assert up_events(nlmsg(RTM_NEWADDR, host)) == []
    assert up_events(nlmsg(RTM_NEWADDR, host) + nlmsg(RTM_NEWADDR, subnet)) == ["address"]


def test_up_events_stop_at_a_truncated_message() -> None:
    whole = newlink(4, UP)
    assert up_events(whole + newlink(6, UP)[:20]) == ["link 4"]
    assert up_events(struct.pack("=IHHII", 8, RTM_NEWLINK, 0, 0, 0)) == []
    assert up_events(b"") == []


def test_link_events_socket_reports_a_link_coming_up() -> None:
    """The real socket, fed through a socketpair standing in for the kernel's side."""
    async def main() -> list[list[str]]:
        seen: list[list[str]] = []
        theirs, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        events = link_events.LinkEvents(asyncio.get_running_loop(), seen.append, sock=ours)
        theirs.send(newlink(4, IFF_UP))  # up without carrier: nothing
        await async_wait_until(lambda: events.batches == 1, 2, what="first batch read")
        theirs.send(newlink(4, UP) + nlmsg(RTM_NEWADDR, b"\0" * 8))
        await async_wait_until(lambda: seen, 2, what="the link up reported")
        events.close()
        events.close()
        theirs.close()
        assert events.batches == 2
        return seen

    assert asyncio.run(main()) == [["link 4", "address"]]


# --- the role, on the netlink worker with a fake kernel -------------------------------------------------


class FakeError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(code)


class FakeKernel:
    """An IPRoute over a main table and links that behave like the kernel's: a link taken
    down loses its connected route and every route through it; one brought up gets its
    connected route back, and nothing else."""

    def __init__(self) -> None:
        self.links = {"eth0": [2, UP], "eth1": [3, UP], "eth2": [4, UP]}
        self.addresses = {"eth0": ("10.22.0.1", 24), "eth1": ("10.255.0.1", 30),
                          "eth2": ("10.255.0.5", 30)}
        #: prefix -> gateway (None: connected or a device route).
        self.table: dict[str, str | None] = {}
        for name in self.links:
            self.table[self.subnet(name)] = None
        self.calls: list[tuple[str, dict[str, Any]]] = []
        #: Errno to raise on each "add" (None: accept it).
        self.refuse: int | None = None
        #: Set: a snapshot waits until it is cleared (a slow kernel).
        self.hold = threading.Event()
        self.released = threading.Event()
        self.released.set()
        self.dumps = 0

    def subnet(self, name: str) -> str:
        address, length = self.addresses[name]
        return str(ipaddress.IPv4Network(f"{address}/{length}", strict=False))

    def set_link(self, name: str, up: bool) -> None:
        self.links[name][1] = UP if up else 0
        net = ipaddress.IPv4Network(self.subnet(name))
        if up:
            self.table[str(net)] = None
        else:
            for prefix, via in list(self.table.items()):
                if prefix == str(net) or (via and ipaddress.IPv4Address(via) in net):
                    del self.table[prefix]

    def get_routes(self, family: int, table: int) -> list[Msg]:
        raise AssertionError("a look asks for its prefixes, it does not dump the table")

    def lookup(self, dst: str) -> list[Msg]:
        """A fibmatch lookup: the longest prefix of the table holding ``dst``."""
        address = ipaddress.IPv4Address(dst)
        matches = [ipaddress.IPv4Network(p) for p in self.table
                   if address in ipaddress.IPv4Network(p)]
        if not matches:
            raise FakeError(errno.ENETUNREACH)
        best = max(matches, key=lambda net: net.prefixlen)
        return [route_msg(str(best.network_address), best.prefixlen, gateway=self.table[str(best)])]

    def get_links(self) -> list[Msg]:
        self.dumps += 1  # once per look (a slow kernel holds it here)
        self.released.wait(5)
        return [link_msg(i, n, flags) for n, (i, flags) in self.links.items()]

    def get_addr(self, family: int) -> list[Msg]:
        return [addr_msg(self.links[n][0], a, plen) for n, (a, plen) in self.addresses.items()]

    def route(self, command: str, **kw: Any) -> Any:
        if command == "get":
            assert kw.get("flags") == 0x2000, kw  # fibmatch
            return self.lookup(kw["dst"])
        self.calls.append((command, kw))
        if command != "add":
            raise AssertionError(f"the role must only add routes, not {command} {kw}")
        if self.refuse is not None:
            raise FakeError(self.refuse)
        if kw["dst"] in self.table:
            raise FakeError(errno.EEXIST)
        self.table[kw["dst"]] = kw["gateway"]

    def close(self) -> None:
        pass


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    with default_worker_over(FakeKernel()) as fake:
        yield fake


class FakeEvents:
    opened: list[Any] = []

    def __init__(self, loop: Any, on_up: Any) -> None:
        self.on_up = on_up
        self.closed = False
        FakeEvents.opened.append(self)

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeAgent:
    def __init__(self, routes: list[StaticRoute]) -> None:
        self.config = AgentConfig("r22a", "/nonexistent", [], [Interface("eth0", "10.22.0.1")],
                                  static_routes=routes)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ifindex: dict[str, int] = {}
        self.iface_by_index: dict[int, str] = {}


@pytest.fixture(autouse=True)
def fake_events(monkeypatch: pytest.MonkeyPatch) -> list[FakeEvents]:
    from agent.routing import static_routes

    FakeEvents.opened = []
    monkeypatch.setattr(static_routes, "LinkEvents", FakeEvents)
    return FakeEvents.opened


def installed(kernel: FakeKernel, routes: list[StaticRoute]) -> None:
    for r in routes:
        kernel.table[r.prefix] = r.via


def test_the_role_puts_back_exactly_the_routes_it_was_given(
        kernel: FakeKernel, fake_events: list[FakeEvents], caplog: pytest.LogCaptureFixture) -> None:
    installed(kernel, ROUTES)
    kernel.table["10.22.0.7/32"] = None               # the data plane's host route: not ours
    kernel.table["10.50.0.0/24"] = "10.255.0.2"       # an operator's route through eth1: not ours
    clock = Clock()
    caplog.set_level(logging.INFO, logger="agent.routing.static_routes")

    async def main() -> StaticRoutesRole:
        agent = FakeAgent(ROUTES)
        agent.loop = asyncio.get_running_loop()
        role = StaticRoutesRole(agent, clock=clock)
        await role.start()
        assert kernel.calls == [] and role.looks == 1  # all there at start: nothing done
        assert len(fake_events) == 1 and [p.name for p in role.periodic()] == ["static routes"]
        kernel.set_link("eth1", False)
        for _ in range(3):  # the link stays down: looks find the routes gone, log it once
            await role.look("periodic")
            clock.now += 1
        assert kernel.calls == []
        assert role.status()["static_routes"]["missing"] == "10.16.0.0/24 via 10.255.0.2, " \
                                                           "10.18.0.0/24 via 10.255.0.2"
        assert [r["missing_s"] for r in role.cmd_static_routes()] == [3.0, 3.0, None]
        kernel.set_link("eth1", True)
        await role.look("link 3")
        await role.stop()
        assert fake_events[0].closed
        return role

    role = asyncio.run(main())
    assert kernel.calls == [("add", {"dst": r.prefix, "gateway": r.via, "table": 254})
                            for r in (BEHIND_R18A, ALSO_R18A)]
    assert kernel.table[BEHIND_R18A.prefix] == "10.255.0.2" and "10.50.0.0/24" not in kernel.table
    assert kernel.table["10.22.0.7/32"] is None
    assert role.reinstalled == 2 and role.missing_since == {}
    assert all(r["missing_s"] is None for r in role.cmd_static_routes())
    gone = [m for m in caplog.messages if "gone" in m]
    back = [m for m in caplog.messages if "installed again" in m]
    assert len(gone) == 1 and "10.18.0.0/24 via 10.255.0.2" in gone[0]
    assert len(back) == 1 and "link 3" in back[0] and "missing 3.0 s" in back[0]


def test_a_route_someone_added_meanwhile_is_kept_and_not_counted(kernel: FakeKernel) -> None:
    installed(kernel, [BEHIND_R20A])
    kernel.refuse = errno.EEXIST  # someone else's route to the prefix appeared after the look

    async def main() -> StaticRoutesRole:
        agent = FakeAgent([BEHIND_R18A])
        agent.loop = asyncio.get_running_loop()
        role = StaticRoutesRole(agent)
        await role.look("test")
        return role

    role = asyncio.run(main())
    assert [c[0] for c in kernel.calls] == ["add"]
    assert role.reinstalled == 0 and role.missing_since == {}


def test_a_refused_install_is_retried_and_logged_rate_limited(
        kernel: FakeKernel, caplog: pytest.LogCaptureFixture) -> None:
    kernel.refuse = errno.ENETUNREACH
    clock = Clock()

    async def main() -> StaticRoutesRole:
        agent = FakeAgent([BEHIND_R18A])
        agent.loop = asyncio.get_running_loop()
        role = StaticRoutesRole(agent, clock=clock)
        for _ in range(5):
            await role.look("periodic")
            clock.now += 1
        clock.now += 60
        await role.look("periodic")
        return role

    role = asyncio.run(main())
    assert len(kernel.calls) == 6  # tried on every look
    refusals = [r for r in caplog.records if "could not install" in r.getMessage()]
    assert len(refusals) == 2 and "4 more" in refusals[1].getMessage()
    assert role.reinstalled == 0 and BEHIND_R18A in role.missing_since


def test_pokes_during_a_look_make_one_more_look(kernel: FakeKernel) -> None:
    installed(kernel, ROUTES)

    async def main() -> StaticRoutesRole:
        agent = FakeAgent(ROUTES)
        agent.loop = asyncio.get_running_loop()
        role = StaticRoutesRole(agent)
        kernel.released.clear()  # the kernel is slow: the first look waits
        role.poke("link 3")
        await async_wait_until(lambda: kernel.dumps == 1, 5, what="first look started")
        for n in range(5):
            role.poke(f"link {n}")
        kernel.released.set()
        await async_wait_until(lambda: role._task is not None and role._task.done(), 5,
                               what="the looks ended")
        return role

    role = asyncio.run(main())
    assert role.looks == 2 and kernel.dumps == 2 and role.last_reason == "link 0"


def test_a_router_without_routes_does_nothing(kernel: FakeKernel, fake_events: list[FakeEvents]) -> None:
    async def main() -> StaticRoutesRole:
        agent = FakeAgent([])
        agent.loop = asyncio.get_running_loop()
        role = StaticRoutesRole(agent)
        await role.start()
        role.poke("periodic")
        await role.stop()
        return role

    role = asyncio.run(main())
    assert role.periodic() == [] and fake_events == [] and kernel.dumps == 0 and role.looks == 0
