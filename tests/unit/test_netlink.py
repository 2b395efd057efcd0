"""agent.core.netlink without root: a fake IPRoute injected into the real worker thread.

What is checked: arguments are refused before anything is queued, kernel refusals become
NetlinkError with their errno (and "already there / already gone" is not an error), every
operation runs on the worker thread in the order given, and the event loop keeps running
while the kernel is slow.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.core import netlink
from agent.core.netlink import Netlink, NetlinkArgumentError, NetlinkError, NetlinkTimeout


class FakeError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(code, os.strerror(code))


class FakeIPRoute:
    """Records (thread, method, args, kwargs); ``errors`` maps a method to one error to raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.threads: set[int] = set()
        self.errors: dict[str, Exception] = {}
        self.delay = 0.0
        self.closed = False
        self.index = {"eth0": 2, "veth1": 3}

    def _call(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay)
        self.calls.append((method, args, kwargs))
        error = self.errors.pop(method, None)
        if error is not None:
            raise error

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.index[ifname]] if ifname in self.index else []

    def addr(self, *a: Any, **kw: Any) -> None:
        self._call("addr", *a, **kw)

    def route(self, *a: Any, **kw: Any) -> None:
        self._call("route", *a, **kw)

    def rule(self, *a: Any, **kw: Any) -> None:
        self._call("rule", *a, **kw)

    def neigh(self, *a: Any, **kw: Any) -> None:
        self._call("neigh", *a, **kw)

    def link(self, *a: Any, **kw: Any) -> None:
        self._call("link", *a, **kw)

    def tc(self, *a: Any, **kw: Any) -> None:
        self._call("tc", *a, **kw)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def ipr() -> Iterator[FakeIPRoute]:
    fake = FakeIPRoute()
    worker = Netlink(lambda: fake, timeout=2)
    old = netlink.use(worker)
    yield fake
    netlink.use(old)
    worker.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# --- the four calls the roles make ------------------------------------------------------------


def test_address_add_and_del(ipr: FakeIPRoute) -> None:
    run(netlink.address_add("10.0.0.5", 32, "eth0"))
    run(netlink.address_del("10.0.0.5", 32, "eth0"))
    assert ipr.calls == [("addr", ("add",), {"index": 2, "address": "10.0.0.5", "prefixlen": 32}),
                         ("addr", ("del",), {"index": 2, "address": "10.0.0.5", "prefixlen": 32})]


def test_already_there_or_already_gone_is_not_an_error(ipr: FakeIPRoute) -> None:
    ipr.errors["addr"] = FakeError(errno.EEXIST)
    run(netlink.address_add("10.0.0.5", 32, "eth0"))
    ipr.errors["addr"] = FakeError(errno.EADDRNOTAVAIL)
    run(netlink.address_del("10.0.0.5", 32, "eth0"))
    ipr.errors["route"] = FakeError(errno.ESRCH)
    run(netlink.route_del("10.97.0.100/32"))
    ipr.errors["rule"] = FakeError(errno.ENOENT)
    run(netlink.rule_del("10.97.0.100", 4347, 4347))
    assert len(ipr.calls) == 4


def test_route_replace_and_del(ipr: FakeIPRoute) -> None:
    run(netlink.route_replace("10.97.0.100/32", "10.0.1.2"))
    run(netlink.route_del("10.97.0.100"))  # a bare address is a host route
    assert ipr.calls == [("route", ("replace",), {"dst": "10.97.0.100/32", "gateway": "10.0.1.2"}),
                         ("route", ("del",), {"dst": "10.97.0.100/32"})]


def test_lo_and_a_known_index_need_no_lookup(ipr: FakeIPRoute, monkeypatch) -> None:
    """A home address goes on or off lo at every move's switch, an eBPF HOA's peer
    route names the device it made: neither costs a lookup round trip."""
    looked: list[str] = []
    monkeypatch.setattr(ipr, "link_lookup", lambda ifname: looked.append(ifname) or [])
    run(netlink.address_add("10.16.0.100", 32, "lo"))
    run(netlink.default().run(netlink.op_route("replace", "10.16.0.100/32", ifindex=7, table=4348), "route"))
    assert looked == []
    assert ipr.calls == [("addr", ("add",), {"index": netlink.LOOPBACK_IFINDEX,
                                             "address": "10.16.0.100", "prefixlen": 32}),
                         ("route", ("replace",), {"dst": "10.16.0.100/32", "table": 4348, "oif": 7})]
    with pytest.raises(netlink.NetlinkArgumentError):
        netlink.op_route("replace", "10.16.0.100/32", ifindex=7, ifname="eth0")


@pytest.mark.parametrize("call, method, code", [
    (lambda: netlink.address_add("10.0.0.5", 32, "eth0"), "addr", errno.EPERM),
    (lambda: netlink.address_del("10.0.0.5", 32, "eth0"), "addr", errno.EPERM),
    (lambda: netlink.route_replace("10.97.0.0/24", "10.0.1.2"), "route", errno.ENETUNREACH),
    (lambda: netlink.route_del("10.97.0.0/24"), "route", errno.EPERM),
])
def test_refusals_are_netlink_errors_with_the_errno(ipr: FakeIPRoute, call: Any, method: str,
                                                    code: int) -> None:
    ipr.errors[method] = FakeError(code)
    with pytest.raises(NetlinkError) as exc:
        run(call())
    assert exc.value.code == code and os.strerror(code) in str(exc.value)


def test_unknown_interface_is_enodev(ipr: FakeIPRoute) -> None:
    with pytest.raises(NetlinkError, match="no interface nope0") as exc:
        run(netlink.address_add("10.0.0.5", 32, "nope0"))
    assert exc.value.code == errno.ENODEV and ipr.calls == []


@pytest.mark.parametrize("call", [
    lambda: netlink.address_add("10.0.0", 32, "eth0"),
    lambda: netlink.address_add("10.0.0.5", 33, "eth0"),
    lambda: netlink.address_add("10.0.0.5", True, "eth0"),
    lambda: netlink.address_del("10.0.0.5", 32, "x" * 16),
    lambda: netlink.address_del("10.0.0.5", 32, ""),
    lambda: netlink.route_replace("10.97.0.1/24", "10.0.1.2"),  # host bits set
    lambda: netlink.route_replace("10.97.0.0/24", "gateway"),
    lambda: netlink.route_del("10.97.0.0/99"),
    lambda: netlink.rule_add("10.97.0.1", 2**32, 1),
    lambda: netlink.neighbour_replace("10.0.0.9", "eth0", ""),
])
def test_bad_arguments_refused_before_anything_is_queued(ipr: FakeIPRoute, call: Any) -> None:
    with pytest.raises(NetlinkArgumentError) as exc:
        run(call())
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, NetlinkError)
    assert ipr.calls == []


# --- rules, neighbours, links, tc ------------------------------------------------------------------


def test_rules_neighbours_and_links(ipr: FakeIPRoute) -> None:
    run(netlink.rule_add("10.97.0.100", 4347, 4347))
    run(netlink.neighbour_replace("10.0.0.9", "eth0", "02:00:00:00:00:09"))
    run(netlink.neighbour_del("10.0.0.9", "eth0"))
    run(netlink.link_set("eth0", up=True, mtu=1472, txqlen=4096))
    assert run(netlink.link_index("veth1")) == 3 and run(netlink.link_index("nope0")) is None
    assert ipr.calls == [
        ("rule", ("add",), {"src": "10.97.0.100", "src_len": 32, "table": 4347, "priority": 4347}),
        ("neigh", ("replace",), {"ifindex": 2, "dst": "10.0.0.9", "lladdr": "02:00:00:00:00:09",
                                 "state": netlink.NUD_PERMANENT}),
        ("neigh", ("del",), {"ifindex": 2, "dst": "10.0.0.9"}),
        ("link", ("set",), {"index": 2, "state": "up", "mtu": 1472, "txqlen": 4096}),
    ]


def test_mirrors_replace_the_clsact_qdisc_and_its_filters(ipr: FakeIPRoute) -> None:
    ipr.errors["tc"] = FakeError(errno.ENOENT)  # no clsact yet: the delete is not an error
    worker = netlink.default()
    run(worker.run(netlink.op_mirrors("eth0", {"10.97.0.100": ["veth1"]}, 4347), "mirrors"))
    assert [c[1][:3] for c in ipr.calls] == [("del", "clsact", 2), ("add", "clsact", 2),
                                             ("add-filter", "u32", 2)]
    kwargs = ipr.calls[-1][2]
    assert kwargs["parent"] == netlink.CLSACT_EGRESS and kwargs["keys"] == ["0x0a610064/0xffffffff+16"]
    assert kwargs["action"] == [{"kind": "mirred", "direction": "egress", "action": "mirror", "ifindex": 3}]


def test_gre_device_left_by_a_killed_agent_is_replaced(ipr: FakeIPRoute) -> None:
    ipr.errors["link"] = FakeError(errno.EEXIST)
    ipr.index["mg42"] = 9
    worker = netlink.default()
    index = run(worker.run(netlink.op_gre_add("mg42", "10.0.0.1", "10.0.0.2", 42), "gre"))
    assert index == 9
    assert [c[1][0] for c in ipr.calls] == ["add", "del", "add", "set"]
    assert ipr.calls[0][2]["gre_ikey"] == 42 and ipr.calls[0][2]["gre_iflags"] == netlink.GRE_KEY_FLAG


# --- the worker ---------------------------------------------------------------------------------


def test_operations_run_on_the_worker_thread_in_order(ipr: FakeIPRoute) -> None:
    async def main() -> int:
        await asyncio.gather(*(netlink.route_del(f"10.97.0.{i}/32") for i in range(20)))
        return threading.get_ident()

    loop_thread = run(main())
    assert ipr.threads == {netlink.default().thread.ident} and loop_thread not in ipr.threads
    assert [c[2]["dst"] for c in ipr.calls] == [f"10.97.0.{i}/32" for i in range(20)]


def test_the_loop_keeps_running_while_the_kernel_is_slow(ipr: FakeIPRoute) -> None:
    ipr.delay = 0.3
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> None:
        task = asyncio.create_task(ticker())
        await netlink.route_del("10.97.0.1/32")
        task.cancel()

    run(main())
    assert ticks >= 10


def test_a_worker_that_does_not_answer_times_out(ipr: FakeIPRoute) -> None:
    ipr.delay = 0.5
    worker = netlink.default()
    with pytest.raises(NetlinkTimeout, match="no answer within 0.1s"):
        run(worker.run(netlink.op_route("del", "10.97.0.1/32"), "slow", timeout=0.1))
    with pytest.raises(NetlinkTimeout):
        worker.call(netlink.op_route("del", "10.97.0.2/32"), "slow", timeout=0.1)


def test_a_netlink_that_cannot_open_fails_every_operation() -> None:
    def broken() -> Any:
        raise OSError(errno.EACCES, "Permission denied")

    worker = Netlink(broken, timeout=2)
    try:
        with pytest.raises(NetlinkError, match="cannot open netlink") as exc:
            worker.call(netlink.op_route("del", "10.97.0.1/32"), "route")
        assert exc.value.code == errno.EACCES
    finally:
        worker.close()


def test_close_finishes_what_is_queued_then_refuses() -> None:
    fake = FakeIPRoute()
    fake.delay = 0.02
    worker = Netlink(lambda: fake, timeout=2)
    futures = [worker.submit(netlink.op_route("del", f"10.97.0.{i}/32"), "route") for i in range(5)]
    worker.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(fake.calls) == 5 and fake.closed
    with pytest.raises(NetlinkError, match="closed"):
        worker.submit(netlink.op_route("del", "10.97.0.9/32"), "route")


def test_default_worker_is_made_once_per_process() -> None:
    old = netlink.use(None)
    try:
        first = netlink.default()
        assert netlink.default() is first
    finally:
        netlink.use(old)
        first.close()
