"""The egress shaper's arguments and its netlink calls, through a fake IPRoute on the real
netlink worker (the kernel side is tested in tests/netns/test_vm.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.core import netlink
from agent.vm.shaping import MOAT_MAJOR, ROOT_PARENT, EgressShaper


@pytest.mark.parametrize("kw", [
    dict(key=0, kbit=100, interfaces=[], src="10.0.0.1"),
    dict(key=1, kbit=0, interfaces=[], src="10.0.0.1"),
    dict(key=1, kbit=100, interfaces=[]),
    dict(key=1, kbit=100, interfaces=[], src=[f"10.0.0.{i}" for i in range(16)]),
])
def test_cap_refuses_bad_arguments(kw) -> None:
    with pytest.raises(ValueError):
        asyncio.run(EgressShaper().cap(**kw))


def test_a_port_is_matched_for_udp_and_tcp_and_addresses_each_get_a_filter() -> None:
    filters = EgressShaper.filters(5, ["10.16.0.100", "10.12.0.201"], 4341)
    prios = [p for p, _ in filters]
    assert len(set(prios)) == 4 and all(p & 0xFFF == 0x105 for p in prios)
    assert filters[0][1] == ["0x0a100064/0xffffffff+12"]
    protos = sorted(keys[1] for _, keys in filters[2:])
    assert protos == ["0x00060000/0x00ff0000+8", "0x00110000/0x00ff0000+8"]
    assert all(keys[0] == "0x10f50000/0xffff0000+20" for _, keys in filters[2:])


class Qdisc(dict):
    def get_attr(self, name: str) -> Any:
        return self["kind"] if name == "TCA_KIND" else None


class FakeIPRoute:
    """Interfaces eth0 (noqueue) and eth1 (netem); records tc calls and their thread."""

    def __init__(self) -> None:
        self.tc_calls: list[tuple[Any, ...]] = []
        self.threads: set[int] = set()
        self.roots = {2: "noqueue", 3: "netem"}

    def link_lookup(self, ifname: str) -> list[int]:
        return {"eth0": [2], "eth1": [3]}.get(ifname, [])

    def get_qdiscs(self, index: int) -> list[Qdisc]:
        return [Qdisc(parent=ROOT_PARENT, handle=0, kind=self.roots[index])]

    def tc(self, command: str, kind: str, index: int, handle: int = 0, **kw: Any) -> None:
        self.threads.add(threading.get_ident())
        self.tc_calls.append((command, kind, index, handle, kw.get("prio")))

    def close(self) -> None:
        pass


@pytest.fixture
def ipr() -> Iterator[FakeIPRoute]:
    fake = FakeIPRoute()
    worker = netlink.Netlink(lambda: fake, timeout=2)
    old = netlink.use(worker)
    yield fake
    netlink.use(old)
    worker.close()


def test_cap_and_uncap_go_through_the_netlink_worker(ipr: FakeIPRoute) -> None:
    shaper = EgressShaper()

    async def main() -> list[str]:
        done = await shaper.cap(5, 800, ["eth0", "eth1", "nope0"], src="10.16.0.100")
        await shaper.uncap(5)
        return done

    assert asyncio.run(main()) == ["eth0"]  # netem root left alone, a missing one skipped
    classid = (MOAT_MAJOR << 16) | 0x105
    assert ipr.tc_calls == [
        ("replace", "htb", 2, MOAT_MAJOR << 16, None),
        ("add-class", "htb", 2, classid, None),
        ("add-filter", "u32", 2, 0, 0x105),
        ("del-filter", "u32", 2, 0, 0x105),
        ("del-class", "htb", 2, classid, None),
        ("del", "htb", 2, MOAT_MAJOR << 16, None),
    ]
    assert ipr.threads == {netlink.default().thread.ident}
    assert shaper.caps == {}
