"""Where a warm instance's home address is (agent.hosting.objects, issue 14): on a router that
is the foreign agent it registers through, delivered only to what does not come from that
FOA's LANs (a local route in a table of its own, after a rule that sends the LANs' packets on
to the home agent) until it goes live; on the object's home link, not the router's (no ARP
answers) but delivered by the same table until it goes live; elsewhere on lo as before. Against a fake kernel (what the netlink worker was asked)."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from agent.core.config import Credential, Interface, ObjectConfig
from agent.hosting import objects as objects_mod
from agent.hosting.objects import DARK_LAN_PRIORITY, DARK_PRIORITY, DARK_TABLE, MAIN_TABLE, HostingRole
from packets import AdvFlags, AgentAdvertisement
from fakenetlink import default_worker_over

HOME = "10.16.0.100"
OWN = "10.14.0.1"


class FakeKernel:
    """Records address, route and rule requests; lo is ifindex 1."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def link_lookup(self, ifname: str) -> list[int]:
        return [{"lo": 1, "eth0": 2, "eth1": 3}[ifname]]

    def addr(self, command: str, **kw: Any) -> None:
        self.calls.append(("addr", command, kw))

    def route(self, command: str, **kw: Any) -> None:
        self.calls.append(("route", command, kw))

    def rule(self, command: str, **kw: Any) -> None:
        self.calls.append(("rule", command, kw))

    def close(self) -> None:
        pass


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    with default_worker_over(FakeKernel()) as fake:
        yield fake


class FakeProcess:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = True

    async def start(self, warm: bool = False, state: Any = None) -> None:
        self.calls.append("start")

    async def call(self, cmd: str, **_kw: Any) -> Any:
        self.calls.append(cmd)
        return {}

    async def stop(self, kill: bool = False) -> Any:
        return None

    def usage(self) -> dict:
        return {}

    @property
    def pid(self) -> int:
        return 4242


class FakeDiscovery:
    """The router heard these agents (address -> flags)."""

    def __init__(self, heard: dict[str, AdvFlags]) -> None:
        self.heard = heard
        self.listeners: list = []

    def known(self) -> list:
        return [(a, AgentAdvertisement(1, 300, f, [a]), 2, time.monotonic())
                for a, f in self.heard.items()]

    def solicit(self) -> None:
        pass

    def announce_home(self, ifindex: int, address: str) -> None:
        pass


def role(tmp_path, roles: list[str], interfaces: list[Interface],
         heard: dict[str, AdvFlags]) -> HostingRole:
    addresses = {i.address for i in interfaces}
    agent = SimpleNamespace(config=SimpleNamespace(
        run_id="t", name="r20a", run_dir=str(tmp_path), addresses=addresses, roles=roles,
        interfaces=interfaces, advertise_interval=1.0, object_resources={}),
        role=lambda _cls: None)
    hosting = HostingRole(agent)
    hosting.discovery = FakeDiscovery(heard)  # type: ignore[assignment]
    return hosting


FOA = AdvFlags.F | AdvFlags.G
HA = AdvFlags.H | AdvFlags.G
FOREIGN_LINKS = [Interface("eth0", OWN, 24, advertise=True),
                 Interface("eth1", "10.255.0.6", 30, advertise=False)]


def config() -> ObjectConfig:
    return ObjectConfig("counter", HOME, "10.16.0.2", "counter@home", Credential(0x1001, b"k"),
                        Credential(0x2002, b"f"))


async def host(hosting: HostingRole, warm: bool = True, arriving: bool = True) -> None:
    await hosting.host_object(config(), FakeProcess(), warm=warm,  # type: ignore[arg-type]
                              arriving=arriving and warm)
    hosting.objects["counter"].client._task.cancel()  # type: ignore[union-attr]


def kinds(kernel: FakeKernel) -> list[tuple[str, str]]:
    return [(what, cmd) for what, cmd, _ in kernel.calls]


@pytest.fixture(autouse=True)
def no_home_check(monkeypatch) -> None:
    monkeypatch.setattr(objects_mod, "check_home_address", lambda *_a: None)


def test_registering_through_its_own_foa_the_lan_is_dark_until_it_goes_live(tmp_path, kernel) -> None:
    hosting = role(tmp_path, ["foreign"], FOREIGN_LINKS, {OWN: FOA, "10.14.0.9": FOA})

    async def main() -> None:
        await host(hosting)
        hosted = hosting.objects["counter"]
        assert hosted.lan_dark and not hosted.dark
        calls = list(kernel.calls)
        assert [c[0] for c in calls] == ["route", "rule", "rule"]  # no address on lo
        route, lan, rest = (c[2] for c in calls)
        assert (route["dst"], route["table"], route["type"], route["oif"]) == \
            (f"{HOME}/32", DARK_TABLE, "local", 1)
        assert (lan["dst"], lan["iifname"], lan["table"], lan["priority"]) == \
            (HOME, "eth0", MAIN_TABLE, DARK_LAN_PRIORITY)
        assert (rest["dst"], rest["table"], rest["priority"]) == (HOME, DARK_TABLE, DARK_PRIORITY)
        assert "iifname" not in rest
        kernel.calls.clear()
        at_serve: list = []

        async def serve() -> str:
            at_serve.append(kinds(kernel))
            return "served"

        assert await hosting.go_live("counter", serve) == "served"
        assert at_serve == [[("addr", "add")]]  # the address first: it serves at once
        assert kinds(kernel) == [("addr", "add")]
        assert not hosted.lan_dark
        await hosting.forget_dark("counter")  # after the switch
        assert kinds(kernel)[1:] == [("rule", "del"), ("rule", "del"), ("route", "del")]
        kernel.calls.clear()
        await hosting.cmd_object_stop("counter", deregister=False)
        assert kinds(kernel) == [("addr", "del")]

    asyncio.run(main())


def test_registered_through_another_foa_after_all_the_address_is_the_routers(tmp_path, kernel) -> None:
    hosting = role(tmp_path, ["foreign"], FOREIGN_LINKS, {OWN: FOA})

    async def main() -> None:
        await host(hosting)
        kernel.calls.clear()
        assert await hosting.registered_at("counter", "10.14.0.9")
        assert kinds(kernel)[0] == ("addr", "add") and not hosting.objects["counter"].lan_dark
        assert not await hosting.registered_at("counter", "10.14.0.9")  # once

    asyncio.run(main())


def test_behind_another_routers_foa_the_address_is_on_lo(tmp_path, kernel) -> None:
    """r18b behind r18a: r18a's route brings net 12's packets here; sent back they loop."""
    hosting = role(tmp_path, ["foreign"], [Interface("eth0", "10.14.0.2", 24)],
                   {"10.14.0.1": FOA, "10.14.0.2": FOA})

    async def main() -> None:
        await host(hosting)
        assert kinds(kernel) == [("addr", "add")]
        assert not hosting.objects["counter"].lan_dark

    asyncio.run(main())


def test_a_router_that_is_no_foa_a_serving_start_and_a_warm_start_that_is_no_move_keep_the_address_on_lo(
        tmp_path, kernel) -> None:
    """A warm start that is no move's (a distribution's duplicate or secondary, which serves
    without going live) has its address at once, as before."""
    async def main() -> None:
        await host(role(tmp_path, [], FOREIGN_LINKS, {OWN: FOA}))
        await host(role(tmp_path / "b", ["foreign"], FOREIGN_LINKS, {OWN: FOA}), warm=False)
        await host(role(tmp_path / "c", ["foreign"], FOREIGN_LINKS, {OWN: FOA}), arriving=False)
        await host(role(tmp_path / "d", [], [Interface("eth0", "10.16.0.4", 21)],
                        {"10.16.0.2": HA}), arriving=False)
        assert kinds(kernel) == [("addr", "add")] * 4

    for sub in "bcd":
        (tmp_path / sub).mkdir()
    asyncio.run(main())


def test_on_the_home_link_a_warm_instance_has_no_address_until_it_goes_live(tmp_path, kernel) -> None:
    hosting = role(tmp_path, [], [Interface("eth0", "10.16.0.4", 21)], {"10.16.0.2": HA})

    async def main() -> None:
        await host(hosting)
        hosted = hosting.objects["counter"]
        assert hosted.dark and hosted.client.dark
        # No address (no ARP answers on the home link), only its own table for what
        # reaches it anyway (queued here, not bounced back to the HOA): nothing exempt.
        assert kinds(kernel) == [("route", "replace"), ("rule", "add")]
        assert kernel.calls[1][2]["table"] == DARK_TABLE and "iifname" not in kernel.calls[1][2]
        kernel.calls.clear()
        at_serve: list = []

        async def serve() -> None:
            at_serve.append(kinds(kernel))

        await hosting.go_live("counter", serve)
        assert at_serve == [[("addr", "add")]]  # the address before it serves
        assert kinds(kernel) == [("addr", "add")] and not hosted.dark
        kernel.calls.clear()
        await hosting.cmd_object_stop("counter", deregister=False)  # before forget_dark
        assert kinds(kernel) == [("rule", "del"), ("route", "del"), ("addr", "del")]

    asyncio.run(main())


def test_a_dark_instance_serves_while_its_client_claims_the_home_link(tmp_path, kernel) -> None:
    """The claim (a direct deregistration, a round trip to the HOA, then an announcement)
    runs beside the restore: the clients' requests wait for the restore alone; the switch
    is answered once both are done."""
    hosting = role(tmp_path, [], [Interface("eth0", "10.16.0.4", 21)], {"10.16.0.2": HA})

    async def main() -> None:
        await host(hosting)
        hosted = hosting.objects["counter"]
        answered = asyncio.Event()
        order: list[str] = []

        async def claim() -> None:
            order.append("claim sent")
            await answered.wait()  # the HOA's answer, not yet here
            order.append("claimed")

        async def serve() -> str:
            order.append("serving")
            asyncio.get_running_loop().call_soon(answered.set)
            return "served"

        hosted.client.go_live = claim  # type: ignore[method-assign]
        # (Claimed before it serves, as it once was, this would wait for ever: the answer
        # comes only once it serves.)
        assert await asyncio.wait_for(hosting.go_live("counter", serve), 5) == "served"
        assert sorted(order) == ["claim sent", "claimed", "serving"]
        assert order.index("serving") < order.index("claimed") and order[-1] == "claimed"

    asyncio.run(main())


def test_a_claim_that_fails_after_the_instance_served_is_logged_not_raised(tmp_path, kernel,
                                                                          caplog) -> None:
    """The instance serves already: a switch is not undone (the move aborted, the state it
    served since lost) because its claim of the home link failed; a failed restore is still
    the caller's error."""
    hosting = role(tmp_path, [], [Interface("eth0", "10.16.0.4", 21)], {"10.16.0.2": HA})

    async def main() -> None:
        await host(hosting)
        hosted = hosting.objects["counter"]

        async def claim() -> None:
            raise OSError("network unreachable")

        async def serve() -> str:
            return "served"

        async def refused() -> None:
            raise ValueError("bad checkpoint")

        hosted.client.go_live = claim  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING):
            assert await hosting.go_live("counter", serve) == "served"
        assert "claiming the home link at its switch failed" in caplog.text
        with pytest.raises(ValueError, match="bad checkpoint"):
            await hosting.go_live("counter", refused)

    asyncio.run(main())
