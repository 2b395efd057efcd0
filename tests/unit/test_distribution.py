"""Lease-driven distribution without root or network (patent Fig. 12, steps 208-230):
room and reservations on a fake clock, where a duplicate may go and in which order, offers
from the wire, the all-or-part rule; the broker's growth policy, its release of idle
duplicates and where revocations go; the broker's side of growing (a fake peer); the broker
role growing once per service for requests that wait; and the distribution role's in-band
answers and its grow steps with a fake VM manager and a fake peer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from agent.broker import role as broker_role_mod
from agent.broker.admission import GrowthPolicy
from agent.broker.broker import Broker
from agent.broker.directory import Instance, Lifecycle
from agent.broker.errors import BadRequest, LeaseDenied, NeedsGrowth
from agent.broker.growth import Growth
from agent.broker.leases import LeasePolicy, LeaseRequest
from agent.broker.role import BrokerRole
from agent.core.config import AgentConfig, BrokerConfig, Interface
from agent.core.daemon import AgentDaemon
from agent.core.errors import ControlError
from agent.core.msgauth import sign_hmac
from agent.core.peer import PeerError, PeerRefused
from agent.distribution import grow as grow_mod
from agent.distribution import role as dist_mod
from agent.distribution.capacity import (MAX_RESERVATIONS, NoRoom, Offer, Reservations, Room,
                                         placeable, rank)
from agent.distribution.decide import all_or_part
from agent.distribution.role import DistributionRole, GrowRefused
from agent.hosting.migration import MigrationRole
from agent.hosting.objects import HostingRole
from agent.vm.machine import VirtualMachine, VmBaseline
from agent.vm.role import VmRole
from fakeclock import FakeClock
from packets import ControlMessage, ControlType

ROUTER_KEY = bytes(range(32))
CO_KEY = bytes(range(32, 64))
HOME = "10.16.0.100"
WALL0 = 1_700_000_000.0


# --- room and reservations ------------------------------------------------------------------


def test_room_covers_minus_and_total() -> None:
    assert Room(1.0, 256).covers(Room(1.0, 256)) and not Room(1.0, 256).covers(Room(1.0, 257))
    assert not Room(0.5, 1024).covers(Room(0.6, 1))
    assert Room(1.0, 100).minus(Room(1.5, 50)) == Room(0.0, 50)  # never below zero
    assert Room.total([Room(0.5, 10), Room(0.25, 20)]) == Room(0.75, 30)
    assert sum([0.1] * 10) != 1.0 and Room(sum([0.1] * 10), 1).covers(Room(1.0, 1))  # EPS


def test_reservations_hold_room_until_released() -> None:
    table = Reservations(FakeClock(0.0))
    free = Room(2.0, 2048)
    table.reserve("a", "svc", Room(1.0, 256), free)
    assert table.held() == Room(1.0, 256) and len(table) == 1
    table.reserve("b", "svc", Room(1.0, 1792), free)  # exactly what is left
    with pytest.raises(NoRoom, match="0 CPU and 0 MiB free"):
        table.reserve("c", "svc", Room(0.1, 1), free)
    assert table.release("a").room == Room(1.0, 256)  # type: ignore[union-attr]
    assert table.release("a") is None  # once
    table.reserve("c", "svc", Room(0.5, 100), free)
    assert sorted(r["reservation"] for r in table.snapshot()) == ["b", "c"]


def test_asking_again_with_the_same_id_renews_and_a_failed_renewal_keeps_the_promise() -> None:
    clock = FakeClock(100.0)
    table = Reservations(clock, ttl_s=30.0)
    free = Room(2.0, 2048)
    table.reserve("a", "svc", Room(1.5, 256), free)
    clock.advance(20)
    # The old promise does not count against its own renewal (1.5 + 1.5 > 2 otherwise).
    renewed = table.reserve("a", "svc", Room(1.5, 256), free)
    assert renewed.until == 150.0 and len(table) == 1
    table.reserve("b", "svc", Room(0.5, 256), free)
    with pytest.raises(NoRoom):
        table.reserve("a", "svc", Room(2.0, 256), free)  # too big now: refused ...
    kept = table.get("a")
    assert kept is not None and kept.room == Room(1.5, 256) and kept.until == 150.0  # ... kept


def test_a_reservation_runs_out_after_its_ttl() -> None:
    clock = FakeClock(0.0)
    table = Reservations(clock, ttl_s=30.0)
    free = Room(2.0, 2048)
    table.reserve("a", "svc", Room(2.0, 1), free)
    table.reserve("short", "op", Room(0.0001, 1), Room(5.0, 10), ttl_s=5.0)
    clock.advance(5.0)
    assert table.get("short") is None and table.get("a") is not None
    assert table.snapshot()[0]["remaining_s"] == 25.0
    clock.advance(24.9)
    with pytest.raises(NoRoom):
        table.reserve("b", "svc", Room(1.0, 1), free)
    clock.advance(0.1)
    assert table.get("a") is None and table.held() == Room(0.0, 0)
    table.reserve("b", "svc", Room(2.0, 1), free)  # the room is offered again
    assert table.expire() == []


def test_the_expired_are_returned_once_for_the_log() -> None:
    clock = FakeClock(0.0)
    table = Reservations(clock, ttl_s=1.0)
    table.reserve("a", "svc", Room(1.0, 1), Room(2.0, 2))
    clock.advance(1.0)
    assert [r.reservation_id for r in table.expire()] == ["a"]
    assert table.expire() == []


def test_a_router_keeps_a_bounded_number_of_reservations() -> None:
    table = Reservations(FakeClock(0.0))
    free = Room(64.0, 1 << 20)
    for n in range(MAX_RESERVATIONS):
        table.reserve(f"r{n}", "svc", Room(0.01, 1), free)
    with pytest.raises(NoRoom):
        table.reserve("one-more", "svc", Room(0.01, 1), free)
    table.reserve("r0", "svc", Room(0.02, 1), free)  # a renewal is not one more
    assert len(table) == MAX_RESERVATIONS


# --- offers, placement, order -----------------------------------------------------------------


def offer(router: str, network: str, cpu: float = 2.0, memory_mb: int = 2048,
          objects: tuple[str, ...] = (), home: bool = False) -> Offer:
    return Offer(router, "10.0.0.1", network, Room(cpu, memory_mb), objects, home)


GOOD_OFFER = {"ok": True, "router": "r20a", "address": "10.14.0.1", "network": "10.14.0.0/24",
              "free_cpu": 1.5, "free_memory_mb": 1024, "objects": ["svc2"], "home": False}


def test_an_offer_from_the_wire_round_trips() -> None:
    parsed = Offer.from_dict(GOOD_OFFER)
    assert parsed == Offer("r20a", "10.14.0.1", "10.14.0.0/24", Room(1.5, 1024), ("svc2",), False)
    assert Offer.from_dict(parsed.as_dict()) == parsed
    minimal = {k: GOOD_OFFER[k] for k in ("router", "address", "network", "free_cpu",
                                          "free_memory_mb")}
    assert Offer.from_dict(minimal).objects == () and not Offer.from_dict(minimal).home


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, "unknown fields"),
    ({"free_cpu": -0.5}, "free_cpu"),
    ({"free_cpu": True}, "free_cpu"),
    ({"free_cpu": float("nan")}, "free_cpu"),
    ({"free_memory_mb": 1.5}, "free_memory_mb"),
    ({"free_memory_mb": -1}, "free_memory_mb"),
    ({"home": "no"}, "home"),
    ({"home": 1}, "home"),
    ({"router": "bad name"}, "router"),
    ({"objects": ["ok", 5]}, "object"),
    ({"network": None}, "network"),
])
def test_a_bad_offer_is_refused(change: dict, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        Offer.from_dict({**GOOD_OFFER, **change})
    with pytest.raises(BadRequest):
        Offer.from_dict(["not", "a", "mapping"])


def test_a_duplicate_goes_to_a_foreign_network_that_runs_no_instance_and_has_the_room() -> None:
    need = Room(1.0, 256)
    offers = [
        offer("r22a", "10.16.0.0/24", home=True),  # home: the HOA answers for the address
        offer("r18b", "10.12.0.0/24", objects=("svc",)),  # runs the primary
        offer("r18a", "10.12.0.0/24"),  # its network runs it: excluded too
        offer("r20a", "10.14.0.0/24", objects=("other",)),  # another object is no obstacle
        offer("r30a", "10.30.0.0/24", cpu=0.5),  # too little CPU
        offer("r31a", "10.31.0.0/24", memory_mb=255),  # too little memory
        offer("r32a", "10.32.0.0/24", cpu=1.0, memory_mb=256),  # exactly enough
    ]
    assert [o.router for o in placeable(offers, "svc", need)] == ["r20a", "r32a"]
    assert [o.router for o in placeable(offers, "elsewhere", need)] == \
        ["r18b", "r18a", "r20a", "r32a"]
    assert placeable([], "svc", need) == []


def test_candidates_are_tried_by_hops_then_traffic_then_free_cpu_then_name() -> None:
    a = offer("ra", "10.1.0.0/24", cpu=1.0)
    b = offer("rb", "10.2.0.0/24", cpu=1.5)
    c = offer("rc", "10.3.0.0/24", cpu=1.5)
    d = offer("rd", "10.4.0.0/24", cpu=4.0)
    names = lambda offers: [o.router for o in offers]  # noqa: E731
    # Hops from the CO's network first; a router with unknown hops goes last.
    assert names(rank([a, b, c, d], {"ra": 1, "rb": 2, "rc": 2}, {})) == ["ra", "rb", "rc", "rd"]
    # Equal hops: the network the object's traffic comes from first.
    assert names(rank([a, b, c], {"ra": 2, "rb": 2, "rc": 2},
                      {"10.3.0.0/24": 9, "10.1.0.0/24": 3})) == ["rc", "ra", "rb"]
    # Equal hops and traffic: the most free CPU, then the name.
    assert names(rank([a, c, b, d], {}, {})) == ["rd", "rb", "rc", "ra"]


def test_all_or_part() -> None:
    assert all_or_part("count-svc", "count-svc", ["counter"]).whole
    assert all_or_part("counter", "count-svc", ["counter"]).whole  # its only object: all
    move = all_or_part("renderer", "editor", ["editor", "renderer"])
    assert (move.kind, move.part, move.whole) == ("part", "renderer", False)
    assert all_or_part("editor-svc", "editor-svc", ["editor", "renderer"]).whole
    assert all_or_part("nothing", "editor", ["editor", "renderer"]).whole


# --- the broker: the growth policy ------------------------------------------------------------


def primary(share: float = 100.0, cpu: float = 1.0, router_address: str = "10.12.0.2",
            **kw: Any) -> Instance:
    return Instance("count-svc", "r18b/cnt@1", HOME, 4341, "r18b", share, cpu, ("svc",),
                    router_address=router_address, **kw)


def duplicate(n: int = 1, router: str = "r20a", router_address: str = "10.14.0.1") -> Instance:
    return Instance("count-svc", f"{router}/cnt-d{n}@2", HOME, 4341, router, 100.0, 1.0,
                    ("svc",), part="duplicate", router_address=router_address)


class Env:
    def __init__(self, *instances: Instance, max_instances: int = 3) -> None:
        self.clock = FakeClock(500.0)
        self.wall = FakeClock(WALL0)
        self.broker = Broker(LeasePolicy(default_s=60.0, max_s=300.0),
                             admission_policy=GrowthPolicy(max_instances),
                             clock=self.clock, wall_clock=self.wall)
        for instance in instances:
            self.broker.register_instance(instance)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def lease(self, holder: str, share: float = 60, cpu: float = 0.6, duration: float = 60):
        return self.broker.request(holder, "count-svc", share, cpu, duration).hops[0]


def test_a_full_service_with_a_mobile_primary_grows_from_it() -> None:
    env = Env(primary())
    assert env.lease("co12").instance == "r18b/cnt@1"
    with pytest.raises(NeedsGrowth) as err:
        env.lease("co14")
    assert err.value.instance == env.broker.directory.get("r18b/cnt@1")
    assert err.value.reason == "no_capacity" and "40%" in err.value.detail
    assert len(env.broker.leases()) == 1  # nothing granted while it grows
    # Asked by its object's name, it grows too.
    with pytest.raises(NeedsGrowth):
        env.broker.request("co14", "svc", 60, 0.6)


def test_it_never_grows_for_what_is_not_a_lack_of_room() -> None:
    env = Env(primary(lifecycle=Lifecycle(10.0, 480.0)))  # its lifetime ran out at 490
    with pytest.raises(LeaseDenied) as err:
        env.lease("co12")
    assert not isinstance(err.value, NeedsGrowth) and err.value.reason == "policy"
    with pytest.raises(LeaseDenied) as err:
        env.broker.request("co12", "nothing", 10, 0.1)
    assert not isinstance(err.value, NeedsGrowth) and err.value.reason == "unknown_service"


def test_the_policy_grows_for_no_capacity_only() -> None:
    env = Env(primary())
    request = LeaseRequest("count-svc", 60, 0.6)
    admission = env.broker.admission
    decision = GrowthPolicy(3).on_refusal(request, env.broker.directory, admission, "policy",
                                          "its lifetime is over")
    assert decision.grow_from is None and decision.instance is None
    assert (decision.reason, decision.detail) == ("policy", "its lifetime is over")
    grow = GrowthPolicy(3).on_refusal(request, env.broker.directory, admission, "no_capacity",
                                      "full")
    assert grow.grow_from == env.broker.directory.get("r18b/cnt@1") and grow.detail == "full"


@pytest.mark.parametrize("instance, why", [
    (primary(router_address=""), "no mobile primary"),  # its router is not known: not mobile
    (duplicate(), "no mobile primary"),  # a duplicate alone does not grow
])
def test_it_grows_only_from_a_movable_primary(instance: Instance, why: str) -> None:
    env = Env(instance)
    env.lease("co12")
    with pytest.raises(LeaseDenied) as err:
        env.lease("co14")
    assert not isinstance(err.value, NeedsGrowth), err.value
    assert err.value.reason == "no_capacity" and why in err.value.detail


def test_a_dead_primary_does_not_grow_its_live_duplicate() -> None:
    env = Env(primary(lifecycle=Lifecycle(10.0, 480.0)), duplicate())
    env.lease("co12")  # on the duplicate: the primary's lifetime is over
    with pytest.raises(LeaseDenied) as err:
        env.lease("co14")
    assert not isinstance(err.value, NeedsGrowth) and "no mobile primary" in err.value.detail


def test_it_stops_growing_at_max_instances() -> None:
    env = Env(primary(), duplicate(1), max_instances=2)
    env.lease("co12")
    env.lease("co14")
    with pytest.raises(LeaseDenied) as err:
        env.lease("co16")
    assert not isinstance(err.value, NeedsGrowth)
    assert "already runs 2 instances" in err.value.detail
    env3 = Env(primary(), duplicate(1), max_instances=3)
    env3.lease("co12")
    env3.lease("co14")
    with pytest.raises(NeedsGrowth):
        env3.lease("co16")


def test_a_request_larger_than_a_whole_instance_does_not_grow() -> None:
    env = Env(primary(share=50.0, cpu=0.5))
    with pytest.raises(LeaseDenied) as err:
        env.lease("co12", 60, 0.2)
    assert not isinstance(err.value, NeedsGrowth)
    assert "more than one whole instance" in err.value.detail
    with pytest.raises(LeaseDenied) as err:
        env.lease("co12", 10, 0.6)  # the CPU alone is too much
    assert not isinstance(err.value, NeedsGrowth)


# --- the broker: releasing idle duplicates, revocations to the router --------------------------


def test_cancelling_a_duplicates_last_lease_releases_it() -> None:
    env = Env(primary(), duplicate())
    env.lease("co12", 90, 0.9)
    first = env.lease("co14", 60, 0.6)
    second = env.lease("co14", 20, 0.2)
    assert {first.instance, second.instance} == {"r20a/cnt-d1@2"}
    env.broker.cancel(first.lease_id, "co14")
    assert env.broker.take_releases() == []  # one lease left on it
    env.broker.cancel(second.lease_id, "co14")
    assert env.broker.take_releases() == [{"instance_id": "r20a/cnt-d1@2",
                                           "router_address": "10.14.0.1"}]
    assert env.broker.take_releases() == []  # told once
    assert "r20a/cnt-d1@2" not in env.broker.directory  # no new lease lands on it
    assert env.broker.stats["released"] == 1
    revoked = env.broker.take_revocations()
    assert [r["address"] for r in revoked] == ["10.14.0.1", "10.14.0.1"]  # its router's


def test_a_duplicates_last_lease_running_out_releases_it() -> None:
    env = Env(primary(), duplicate())
    env.lease("co12", 50, 0.5, duration=300)
    env.lease("co14", 60, 0.6, duration=10)
    env.advance(10)
    assert [lease.holder for lease in env.broker.expire()] == ["co14"]
    assert env.broker.take_releases() == [{"instance_id": "r20a/cnt-d1@2",
                                           "router_address": "10.14.0.1"}]
    assert env.broker.take_revocations() == []  # expiry needs no revocation


def test_the_primary_is_never_released() -> None:
    env = Env(primary())
    hop = env.lease("co12")
    env.broker.cancel(hop.lease_id, "co12")
    hop = env.lease("co12", duration=5)
    env.advance(5)
    env.broker.expire()
    assert env.broker.take_releases() == [] and "r18b/cnt@1" in env.broker.directory
    # Its revocations go to its router too, not to the home address every instance shares.
    hop = env.lease("co12")
    env.broker.cancel(hop.lease_id, "co12")
    assert env.broker.take_revocations()[-1]["address"] == "10.12.0.2"


def test_an_instance_without_a_router_address_is_revoked_at_its_address() -> None:
    fixed = Instance("conv", "r22a/conv@1", "10.16.0.1", 5101, "r22a")
    env = Env(fixed)
    hop = env.broker.request("co14", "conv", 10, 0.1)
    env.broker.cancel(hop.hops[0].lease_id, "co14")
    assert env.broker.take_revocations()[0]["address"] == "10.16.0.1"
    assert env.broker.take_releases() == []


def test_a_duplicate_that_left_by_itself_is_not_released_again() -> None:
    env = Env(primary(), duplicate())
    env.lease("co12", 50, 0.5)
    hop = env.lease("co14", 60, 0.6)
    ended = env.broker.remove_instance("r20a/cnt-d1@2")  # its VM went (retired, removed)
    assert [lease.lease_id for lease in ended] == [hop.lease_id]
    assert env.broker.take_releases() == []
    assert env.broker.take_revocations() == []  # an instance that left needs no telling


# --- the broker's side of growing ---------------------------------------------------------------


def duplicate_doc(n: int = 1) -> dict:
    return {"service": "count-svc", "instance_id": f"r20a/cnt-d{n}@2", "address": HOME,
            "port": 4341, "router": "r20a", "share": 100.0, "cpu": 1.0, "objects": ["svc"],
            "lifecycle": {"max_duration_s": None, "uptime_s": 3.0}, "part": "duplicate",
            "router_address": "10.14.0.1"}


async def grow_60(env: Env, growth: Growth, co_address: str | None = None) -> Instance:
    """Growth of count-svc from its primary for a 60 % / 0.6 CPU request."""
    primary_instance = env.broker.directory.get("r18b/cnt@1")
    assert primary_instance is not None
    return await growth.grow(primary_instance, 60, 0.6, "count-svc", co_address)


class FakeCall:
    """Stands in for peer_call: records (address, type, body, key, timeout); answers with
    ``answer`` or raises it."""

    def __init__(self, answer: Any = None, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.sent: list[tuple[str, ControlType, dict, Any, float]] = []

    async def __call__(self, address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        self.sent.append((address, ctype, body, kw.get("key"), kw.get("timeout")))
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.answer, Exception):
            raise self.answer
        if callable(self.answer):
            return self.answer(address, ctype, body)
        return self.answer if self.answer is not None else {"ok": True}


def test_growth_asks_the_primarys_router_and_registers_the_duplicate() -> None:
    env = Env(primary())
    env.lease("co12")
    fake = FakeCall({"ok": True, "instance": duplicate_doc(), "router": "r20a",
                     "tried": [{"router": "r20a", "refused": ""}],
                     "steps": [["candidates: ['r20a']", 2.0]]})
    growth = Growth(env.broker, ROUTER_KEY, call=fake, clock=env.clock)
    made = asyncio.run(grow_60(env, growth, "10.14.0.30"))
    ((address, ctype, body, key, timeout),) = fake.sent
    assert (address, ctype, key) == ("10.12.0.2", ControlType.SERVICE_GROW, ROUTER_KEY)
    assert body == {"service": "count-svc", "instance_id": "r18b/cnt@1", "share": 60,
                    "cpu": 0.6, "target": "count-svc", "co_address": "10.14.0.30"}
    assert timeout >= 25  # a duplicate is fetched, verified, started and registered
    assert made.instance_id == "r20a/cnt-d1@2" and made.part == "duplicate"
    assert env.broker.directory.get("r20a/cnt-d1@2") == made
    (record,) = growth.history
    assert record["instance"] == made.instance_id and record["router"] == "r20a"
    assert record["from"] == "r18b/cnt@1" and record["tried"][0]["router"] == "r20a"
    assert record["steps"] and "error" not in record and record["ms"] == 0.0
    assert env.broker.stats["grown"] == 1
    # Admission, asked again, now finds the room.
    assert env.lease("co14").instance == "r20a/cnt-d1@2"


@pytest.mark.parametrize("failure, detail", [
    (PeerRefused("10.12.0.2", "no router on a foreign network without svc has 1 CPU"),
     "could not grow: no router on a foreign network"),
    (PeerError("target 10.12.0.2 unreachable"), "could not grow: target 10.12.0.2 unreachable"),
])
def test_a_growth_that_fails_is_a_no_capacity_refusal_with_why(failure: Exception,
                                                               detail: str) -> None:
    env = Env(primary())
    growth = Growth(env.broker, ROUTER_KEY, call=FakeCall(failure), clock=env.clock)
    with pytest.raises(LeaseDenied) as err:
        asyncio.run(grow_60(env, growth))
    assert err.value.reason == "no_capacity" and detail in err.value.detail, err.value.detail
    assert not isinstance(err.value, NeedsGrowth)
    assert growth.history[-1]["error"] and "instance" not in growth.history[-1]
    assert [i.instance_id for i in env.broker.directory] == ["r18b/cnt@1"]
    assert env.broker.stats["grown"] == 0


def test_a_growth_answered_with_a_bad_instance_registers_nothing() -> None:
    env = Env(primary())
    bad = dict(duplicate_doc(), port=0)
    growth = Growth(env.broker, ROUTER_KEY, call=FakeCall({"ok": True, "instance": bad}))
    with pytest.raises(LeaseDenied) as err:
        asyncio.run(grow_60(env, growth))
    assert err.value.reason == "no_capacity"
    growth2 = Growth(env.broker, ROUTER_KEY, call=FakeCall({"ok": True}))  # no instance at all
    with pytest.raises(LeaseDenied):
        asyncio.run(grow_60(env, growth2))
    assert [i.instance_id for i in env.broker.directory] == ["r18b/cnt@1"]


def test_push_releases_tells_the_duplicates_router() -> None:
    env = Env(primary(), duplicate())
    env.lease("co12", 90, 0.9)
    hop = env.lease("co14", 60, 0.6)
    assert hop.instance == "r20a/cnt-d1@2"
    fake = FakeCall()
    growth = Growth(env.broker, ROUTER_KEY, call=fake)

    async def cancel_and_push() -> int:
        env.broker.cancel(hop.lease_id, "co14")
        tasks = growth.push_releases()
        await asyncio.gather(*tasks)
        return len(tasks)

    assert asyncio.run(cancel_and_push()) == 1
    ((address, ctype, body, key, _),) = fake.sent
    assert (address, ctype, body, key) == ("10.14.0.1", ControlType.INSTANCE_RELEASE,
                                           {"instance_id": "r20a/cnt-d1@2"}, ROUTER_KEY)
    assert env.broker.stats["release_sent"] == 1
    assert asyncio.run(_push(growth)) == 0  # nothing more to tell


async def _push(growth: Growth) -> int:
    tasks = growth.push_releases()
    await asyncio.gather(*tasks)
    return len(tasks)


def test_a_release_that_cannot_be_delivered_is_counted_not_raised() -> None:
    env = Env(primary(), duplicate())
    env.lease("co12", 90, 0.9)
    hop = env.lease("co14", 60, 0.6)
    assert hop.instance == "r20a/cnt-d1@2"
    env.broker.cancel(hop.lease_id, "co14")
    growth = Growth(env.broker, ROUTER_KEY, call=FakeCall(PeerError("unreachable")))
    assert asyncio.run(_push(growth)) == 1
    assert env.broker.stats["release_failed"] == 1 and env.broker.stats["release_sent"] == 0


def test_one_growth_lock_per_service() -> None:
    growth = Growth(Env().broker, None)
    assert growth.lock("a") is growth.lock("a") and growth.lock("a") is not growth.lock("b")


# --- the broker role: grow, ask again, once per service ------------------------------------------


def broker_daemon() -> AgentDaemon:
    cfg = AgentConfig(name="r22b", run_dir="/nonexistent", roles=[],
                      interfaces=[Interface("lo", "127.0.0.1", 8)], router_key=ROUTER_KEY.hex(),
                      broker=BrokerConfig(address="10.16.0.2", serve=True,
                                          co_keys={"co12": CO_KEY, "co14": CO_KEY}))
    return AgentDaemon(cfg, roles=[BrokerRole])


def signed(ctype: ControlType, body: dict, txid: int, key: bytes = CO_KEY,
           key_id: str = "co14") -> ControlMessage:
    return ControlMessage(ctype, txid, sign_hmac(ctype, txid, body, key, key_id=key_id,
                                                 to="10.16.0.2"))


def lease_request(share: float, txid: int, holder: str = "co14") -> ControlMessage:
    return signed(ControlType.LEASE_REQUEST,
                  {"request": {"target": "count-svc", "share": share, "cpu": share / 100}},
                  txid, key_id=holder)


def test_the_broker_role_grows_once_for_requests_that_wait_and_releases_after(
        monkeypatch) -> None:
    pushed: list = []

    async def revocation_peer(address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        pushed.append((address, ctype))
        return {"ok": True}

    monkeypatch.setattr(broker_role_mod, "peer_call", revocation_peer)
    d = broker_daemon()
    role = d.require(BrokerRole)
    role.broker.register_instance(primary())

    def answer(address: str, ctype: ControlType, body: dict) -> dict:
        if ctype == ControlType.SERVICE_GROW:
            return {"ok": True, "instance": duplicate_doc(), "tried": [], "steps": []}
        return {"ok": True}

    fake = FakeCall(answer, delay=0.05)
    role.growth._call = fake  # the broker's peer for SERVICE_GROW and INSTANCE_RELEASE

    async def scenario() -> list[dict]:
        first = await d.on_peer_message(lease_request(70, 1, "co12"))
        assert first["grant"]["hops"][0]["instance"] == "r18b/cnt@1"
        # Two requests that do not fit, side by side: one growth, and both fit after it.
        grants = await asyncio.gather(d.on_peer_message(lease_request(40, 2)),
                                      d.on_peer_message(lease_request(40, 3)))
        return [first, *grants]

    first, a, b = asyncio.run(scenario())
    fake.delay = 0.0
    assert [s[1] for s in fake.sent] == [ControlType.SERVICE_GROW]
    assert {a["grant"]["hops"][0]["instance"], b["grant"]["hops"][0]["instance"]} == \
        {"r20a/cnt-d1@2"}
    assert [r.get("instance") for r in role.cmd_growth()] == ["r20a/cnt-d1@2"]
    used = {i["instance_id"]: i["used_share"] for s in role.cmd_services()
            for i in s["instances"]}
    assert used == {"r18b/cnt@1": 70, "r20a/cnt-d1@2": 80}

    # The duplicate's leases cancelled: the second cancel releases it at its router.
    for txid, grant in ((4, a), (5, b)):
        lease_id = grant["grant"]["hops"][0]["lease_id"]
        asyncio.run(d.on_peer_message(signed(ControlType.LEASE_CANCEL, {"lease_id": lease_id},
                                             txid)))
    assert [(s[0], s[1], s[2]) for s in fake.sent[1:]] == [
        ("10.14.0.1", ControlType.INSTANCE_RELEASE, {"instance_id": "r20a/cnt-d1@2"})]
    assert pushed == [("10.14.0.1", ControlType.LEASE_REVOKE)] * 2
    assert [i["instance_id"] for s in role.cmd_services() for i in s["instances"]] == \
        ["r18b/cnt@1"]


def test_the_broker_role_refuses_with_why_when_growth_fails() -> None:
    d = broker_daemon()
    role = d.require(BrokerRole)
    role.broker.register_instance(primary())
    role.growth._call = FakeCall(PeerRefused("10.12.0.2", "every candidate refused: r20a: full"))
    asyncio.run(d.on_peer_message(lease_request(70, 1, "co12")))
    with pytest.raises(LeaseDenied) as err:
        asyncio.run(d.on_peer_message(lease_request(40, 2)))
    assert err.value.reason == "no_capacity"
    assert "every candidate refused: r20a: full" in err.value.detail
    assert role.cmd_growth()[-1]["error"] == "every candidate refused: r20a: full"
    assert len(role.broker.leases()) == 1


# --- the distribution role: a fake VM manager, hosting, migration and peer -----------------------


def vm(name: str, part: str = "primary", cpu: float = 1.0, memory_mb: int = 256,
       obj_name: str = "svc", objects: tuple[str, ...] = ("counter",)) -> VirtualMachine:
    mobile = {"counter": {"name": obj_name, "home_address": HOME, "home_agent": "10.16.0.2"}}
    return VirtualMachine(name, "service", "count-svc", "0.0.0.0", None, 4341, cpu, memory_mb,
                          64, None, [], {}, objects={o: None for o in objects},
                          mobile=mobile if "counter" in objects else {}, leased=True, part=part,
                          running_since=WALL0, epoch="e1")


class FakeManager:
    def __init__(self, router: str) -> None:
        self.router = router
        self.baseline = VmBaseline(authorized_keys=[], storage="/nonexistent")
        self.vms: dict[str, VirtualMachine] = {}
        self.errors: list[dict] = []
        self.calls: list[tuple[str, str, str]] = []
        self.provisioned: list[tuple[dict, dict]] = []
        self.removed: list[str] = []
        self.fail_provision: Exception | None = None
        self.state: Any = {"state": {"count": 41}, "seen": {}}
        self.changes: list[str] = []

    def changed(self, v: VirtualMachine) -> None:
        self.changes.append(v.name)

    def instance_id(self, v: VirtualMachine) -> str:
        return f"{self.router}/{v.name}@{v.epoch}"

    def record_error(self, vm_name: Any, service: Any, step: str, reason: str) -> None:
        self.errors.append({"vm": vm_name, "service": service, "step": step, "reason": reason})

    async def call(self, vm_name: str, obj: str, method: str) -> Any:
        self.calls.append((vm_name, obj, method))
        if method == "get_state":
            return self.state
        return {"by_network": {"10.14.0.0/24": 5}}

    async def provision(self, body: dict, states: dict | None = None, warm: bool = False) -> dict:
        self.provisioned.append((body, states or {}))
        if self.fail_provision is not None:
            raise self.fail_provision
        made = vm(body["vm"], part=body.get("part", "primary"), cpu=body["resources"]["cpu"],
                  memory_mb=body["resources"]["memory_mb"])
        self.vms[made.name] = made
        return {}

    async def remove(self, name: str) -> dict | None:
        self.removed.append(name)
        return {} if self.vms.pop(name, None) is not None else None


class FakeMigration:
    def __init__(self) -> None:
        self.fail: Exception | None = None

    async def wait_registered(self, name: str) -> dict:
        if self.fail is not None:
            raise self.fail
        return {"registration": {"care_of_address": "10.14.0.1"}}


class FakeDistAgent:
    def __init__(self, name: str, address: str, manager: FakeManager) -> None:
        routers = {"r18a": "10.12.0.1", "r18b": "10.12.0.2", "r20a": "10.14.0.1",
                   "r22a": "10.16.0.1"}
        self.config = AgentConfig(
            name=name, run_dir="/nonexistent", roles=[],
            interfaces=[Interface("eth0", address, 24)], router_key=ROUTER_KEY.hex(), vm={},
            broker=BrokerConfig(address="10.16.0.2", routers=routers,
                                network_hops={"10.14.0.0/24": {"r20a": 1, "r18a": 3, "r18b": 4,
                                                               "r22a": 2}}))
        self.loop = None
        self.vm_role = SimpleNamespace(manager=manager)
        self.migration = FakeMigration()
        client = SimpleNamespace(config=SimpleNamespace(simultaneous=False))
        self.hosting = SimpleNamespace(objects={"svc": SimpleNamespace(client=client)})

    def role(self, cls: type) -> Any:
        return {VmRole: self.vm_role, MigrationRole: self.migration,
                HostingRole: self.hosting}.get(cls)

    def require(self, cls: type) -> Any:
        return self.role(cls)


def target(vms: tuple[VirtualMachine, ...] = ()) -> tuple[DistributionRole, FakeManager]:
    """r20a (net 14) as the router asked for room."""
    manager = FakeManager("r20a")
    for v in vms:
        manager.vms[v.name] = v
    agent = FakeDistAgent("r20a", "10.14.0.1", manager)
    return DistributionRole(agent), manager


def negotiate(role: DistributionRole, body: dict) -> dict:
    msg = ControlMessage(ControlType.VM_NEGOTIATE, 1, body)
    return asyncio.run(role.on_negotiate(msg, body))


def test_distribution_role_is_wanted_with_a_broker_and_vms() -> None:
    role, _ = target()
    assert DistributionRole.wanted(role.config)
    assert not DistributionRole.wanted(AgentConfig(name="x", run_dir="/", roles=[],
                                                   interfaces=[Interface("e", "10.0.0.1")],
                                                   vm={}))
    assert set(role.in_band()) == {ControlType.VM_NEGOTIATE, ControlType.SERVICE_GROW,
                                   ControlType.INSTANCE_RELEASE}
    assert role.in_band()[ControlType.VM_NEGOTIATE].answer == ControlType.VM_OFFER


def test_a_query_is_answered_with_an_offer_of_what_the_vms_leave() -> None:
    role, _ = target((vm("other", obj_name="svc2", cpu=0.5, memory_mb=512),))
    answer = negotiate(role, {"action": "query", "home_address": HOME})
    parsed = Offer.from_dict(answer)  # what the asking router accepts
    assert parsed == Offer("r20a", "10.14.0.1", "10.14.0.0/24", Room(1.5, 1536), ("svc2",), False)
    # A router on the home address's network says so (duplicates never go home).
    assert negotiate(role, {"action": "query", "home_address": "10.14.0.77"})["home"] is True
    assert role.stats["queries"] == 2
    with pytest.raises(BadRequest):
        negotiate(role, {"action": "query", "home_address": "not-an-ip"})
    with pytest.raises(BadRequest):
        negotiate(role, {"action": "query"})


def test_reserve_refuses_beyond_the_room_and_release_gives_it_back() -> None:
    role, _ = target((vm("other", obj_name="svc2", cpu=1.0),))
    reserve = {"action": "reserve", "reservation": "r1", "service": "count-svc", "cpu": 1.0,
               "memory_mb": 256}
    assert negotiate(role, reserve) == {"ok": True, "reservation": "r1", "router": "r20a"}
    assert negotiate(role, {"action": "query", "home_address": HOME})["free_cpu"] == 0.0
    with pytest.raises(ControlError, match="no room on r20a"):
        negotiate(role, dict(reserve, reservation="r2", cpu=0.1))
    assert role.stats["reservations_refused"] == 1
    assert negotiate(role, {"action": "release", "reservation": "r1"})["released"] is True
    assert negotiate(role, {"action": "release", "reservation": "r1"})["released"] is False
    assert negotiate(role, dict(reserve, reservation="r2"))["ok"]


@pytest.mark.parametrize("body", [
    {"action": "steal"},
    {},
    {"action": "reserve", "reservation": "r1", "service": "s", "cpu": 0, "memory_mb": 1},
    {"action": "reserve", "reservation": "r1", "service": "s", "cpu": 1.0, "memory_mb": 0},
    {"action": "reserve", "reservation": "r1", "service": "bad name", "cpu": 1.0, "memory_mb": 1},
    {"action": "reserve", "service": "s", "cpu": 1.0, "memory_mb": 1},
    {"action": "release"},
])
def test_a_bad_negotiation_is_a_bad_request_and_holds_nothing(body: dict) -> None:
    role, _ = target()
    with pytest.raises(BadRequest):
        negotiate(role, body)
    assert len(role.reservations) == 0


def dup_body(name: str = "cnt-d1") -> dict:
    body = dict(vm("cnt").provision_body(), vm=name, objects=["counter"], part="duplicate",
                mobile={"counter": {"name": "svc", "home_address": HOME,
                                    "home_agent": "10.16.0.2", "part": "duplicate"}})
    return body


def test_start_needs_a_reservation_and_a_one_object_duplicate() -> None:
    role, manager = target()
    with pytest.raises(ControlError, match="no reservation"):
        negotiate(role, {"action": "start", "reservation": "r1", "vm": dup_body(), "state": {}})
    negotiate(role, {"action": "reserve", "reservation": "r1", "service": "count-svc",
                     "cpu": 1.0, "memory_mb": 256})
    for bad in (dict(dup_body(), part="primary"), dict(dup_body(), objects=["a", "b"]), "x"):
        with pytest.raises(BadRequest):
            negotiate(role, {"action": "start", "reservation": "r1", "vm": bad, "state": {}})
    assert manager.provisioned == [] and manager.vms == {}


def test_start_runs_the_duplicate_from_the_checkpoint_and_frees_the_reservation() -> None:
    role, manager = target()
    negotiate(role, {"action": "reserve", "reservation": "r1", "service": "count-svc",
                     "cpu": 1.0, "memory_mb": 256})
    state = {"state": {"count": 7}, "seen": {}}
    answer = negotiate(role, {"action": "start", "reservation": "r1", "vm": dup_body(),
                              "state": state})
    ((body, states),) = manager.provisioned
    assert body["vm"] == "cnt-d1" and states == {"counter": state}
    doc = answer["instance"]
    assert doc["instance_id"] == "r20a/cnt-d1@e1" and doc["part"] == "duplicate"
    assert doc["router_address"] == "10.14.0.1" and doc["address"] == HOME
    Instance.from_dict(doc, 0.0)  # what the broker registers
    assert answer["registration"] == {"care_of_address": "10.14.0.1"}
    assert len(role.reservations) == 0 and role.stats["duplicates_hosted"] == 1
    # Offered to the broker only once registered with its home agent (then "started" again).
    assert manager.changes == ["cnt-d1"] and manager.vms["cnt-d1"].ready
    assert negotiate(role, {"action": "query", "home_address": HOME})["objects"] == ["svc"]


def test_a_duplicate_that_does_not_start_or_register_leaves_nothing() -> None:
    role, manager = target()
    reserve = {"action": "reserve", "reservation": "r1", "service": "count-svc", "cpu": 1.0,
               "memory_mb": 256}
    negotiate(role, reserve)
    manager.fail_provision = RuntimeError("TamperedArchive: sha256 differs")
    with pytest.raises(ControlError, match="duplicate svc failed on r20a: TamperedArchive"):
        negotiate(role, {"action": "start", "reservation": "r1", "vm": dup_body(), "state": {}})
    assert manager.vms == {} and len(role.reservations) == 0

    manager.fail_provision = None
    role.agent.migration.fail = RuntimeError("no FOA answered")  # type: ignore[attr-defined]
    negotiate(role, reserve)
    with pytest.raises(ControlError, match="no FOA answered"):
        negotiate(role, {"action": "start", "reservation": "r1", "vm": dup_body(), "state": {}})
    assert manager.vms == {} and manager.removed == ["cnt-d1"]
    assert manager.errors[-1]["step"] == "duplicate" and len(role.reservations) == 0
    assert role.stats["duplicates_hosted"] == 0


def release(role: DistributionRole, iid: str) -> dict:
    body = {"instance_id": iid}
    return asyncio.run(role.on_release(ControlMessage(ControlType.INSTANCE_RELEASE, 1, body), body))


def test_release_removes_a_duplicate_never_the_primary() -> None:
    role, manager = target((vm("cnt-d1", part="duplicate"), vm("cnt")))
    answer = release(role, "r20a/cnt-d1@e1")
    assert answer["released"] is True and manager.removed == ["cnt-d1"]
    assert release(role, "r20a/cnt-d1@e1") == {"ok": True, "released": False}  # gone already
    with pytest.raises(ControlError, match="primary"):
        release(role, "r20a/cnt@e1")
    assert "cnt" in manager.vms and role.stats["released"] == 1


def test_room_hold_reserves_what_is_free_and_no_more() -> None:
    role, _ = target((vm("cnt-d1", part="duplicate"),))
    held = role.cmd_room_hold(cpu=0.75, memory_mb=100, seconds=10)
    assert held["reservation"].startswith("held-")
    room = role.cmd_room()
    assert (room["free_cpu"], room["capacity_cpu"]) == (1.0, 2.0)  # reservations apart
    assert [r["cpu"] for r in room["reservations"]] == [0.75]
    assert negotiate(role, {"action": "query", "home_address": HOME})["free_cpu"] == 0.25
    with pytest.raises(ControlError, match="cannot hold room"):
        role.cmd_room_hold(cpu=0.5)
    with pytest.raises(ControlError, match="cannot hold room"):
        role.cmd_room_hold(cpu="lots")  # type: ignore[arg-type]


# --- the distribution role: growing from the primary (r18b) ---------------------------------------


class FakePeer:
    """The other routers as the primary's router sees them: offers by address; reservations
    refused at ``refuse``; a start that answers the duplicate's document or fails."""

    OFFERS = {
        "10.12.0.1": dict(router="r18a", address="10.12.0.1", network="10.12.0.0/24",
                          free_cpu=2.0, free_memory_mb=2048),
        "10.14.0.1": dict(router="r20a", address="10.14.0.1", network="10.14.0.0/24",
                          free_cpu=2.0, free_memory_mb=2048),
        "10.16.0.1": dict(router="r22a", address="10.16.0.1", network="10.16.0.0/24",
                          free_cpu=2.0, free_memory_mb=2048, home=True),
    }

    def __init__(self, offers: dict | None = None, refuse: set[str] = frozenset(),
                 start_fails: bool = False) -> None:
        self.offers = dict(self.OFFERS if offers is None else offers)
        self.refuse = refuse
        self.start_fails = start_fails
        self.sent: list[tuple[str, str, dict]] = []

    async def __call__(self, address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        assert ctype == ControlType.VM_NEGOTIATE and kw["key"] == ROUTER_KEY
        action = body["action"]
        self.sent.append((address, action, body))
        if action == "query":
            if address not in self.offers:
                raise PeerError(f"{address} unreachable")
            return {"ok": True, **self.offers[address]}
        if action == "reserve" and address in self.refuse:
            raise PeerRefused(address, f"no room on {address}")
        if action == "start":
            if self.start_fails:
                raise PeerRefused(address, "TamperedArchive: sha256 differs")
            return {"ok": True, "instance": dict(duplicate_doc(), instance_id="r?/d@1")}
        return {"ok": True}

    def actions(self) -> list[tuple[str, str]]:
        return [(a, act) for a, act, _ in self.sent if act != "query"]


def grower(monkeypatch, peer: FakePeer) -> tuple[DistributionRole, FakeManager]:
    """r18b (net 12) running the primary ``cnt`` of mobile object svc."""
    monkeypatch.setattr(dist_mod, "peer_call", peer)
    monkeypatch.setattr(grow_mod, "peer_call", peer)
    manager = FakeManager("r18b")
    manager.vms["cnt"] = vm("cnt")
    return DistributionRole(FakeDistAgent("r18b", "10.12.0.2", manager)), manager


GROW = {"service": "count-svc", "instance_id": "r18b/cnt@e1", "share": 60, "cpu": 0.6,
        "target": "count-svc", "co_address": "10.14.0.30"}


def grow(role: DistributionRole, body: dict = GROW) -> dict:
    return asyncio.run(role.on_grow(ControlMessage(ControlType.SERVICE_GROW, 1, body), body))


def test_grow_places_a_duplicate_on_the_first_foreign_candidate_with_the_checkpoint(
        monkeypatch) -> None:
    peer = FakePeer()
    role, manager = grower(monkeypatch, peer)
    answer = grow(role)
    assert answer["router"] == "r20a" and answer["tried"] == [{"router": "r20a", "refused": ""}]
    # Every other router asked (itself not), side by side.
    assert sorted(a for a, act, _ in peer.sent if act == "query") == \
        ["10.12.0.1", "10.14.0.1", "10.16.0.1"]
    assert peer.actions() == [("10.14.0.1", "reserve"), ("10.14.0.1", "start")]
    reserve = peer.sent[-2][2]
    assert (reserve["cpu"], reserve["memory_mb"], reserve["service"]) == (1.0, 256, "count-svc")
    start = peer.sent[-1][2]
    assert start["reservation"] == reserve["reservation"]
    assert start["state"] == manager.state  # the primary's checkpoint, taken while it serves
    body = start["vm"]
    assert body["part"] == "duplicate" and body["vm"].startswith("cnt-d")
    assert body["objects"] == ["counter"] and body["leased"] is True
    config = body["mobile"]["counter"]
    assert (config["name"], config["part"], config["part_id"], config["simultaneous"]) == \
        ("svc", "duplicate", 1, True)
    assert body["resources"]["cpu"] == 1.0 and body["resources"]["memory_mb"] == 256
    # From now on the primary registers with S, so its renewals keep the duplicate's binding.
    hosting = role.agent.hosting  # type: ignore[attr-defined]
    assert hosting.objects["svc"].client.config.simultaneous is True
    steps = [s for s, _ in answer["steps"]]
    assert steps[0] == "asked 4 routers for room, 4 answered"
    assert steps[1] == "candidates: ['r20a']"  # r18a: the primary's own network; r22a: home
    assert role.stats["grown"] == 1 and manager.errors == []


def test_grow_passes_over_a_refused_reservation_in_rank_order(monkeypatch) -> None:
    offers = dict(FakePeer.OFFERS)
    offers["10.30.0.1"] = dict(router="r30a", address="10.30.0.1", network="10.30.0.0/24",
                               free_cpu=2.0, free_memory_mb=2048)
    peer = FakePeer(offers, refuse={"10.14.0.1"})
    role, _ = grower(monkeypatch, peer)
    role.routers["r30a"] = "10.30.0.1"
    answer = grow(role)  # from net 14: r20a is 1 hop, r30a unknown (last)
    assert answer["router"] == "r30a"
    assert answer["tried"] == [{"router": "r20a", "refused": "no room on 10.14.0.1"},
                               {"router": "r30a", "refused": ""}]
    assert peer.actions() == [("10.14.0.1", "reserve"), ("10.30.0.1", "reserve"),
                              ("10.30.0.1", "start")]


def test_grow_refuses_when_no_router_has_room_and_records_why(monkeypatch) -> None:
    offers = dict(FakePeer.OFFERS)
    offers["10.14.0.1"] = dict(offers["10.14.0.1"], free_cpu=0.5)
    peer = FakePeer(offers)
    role, manager = grower(monkeypatch, peer)
    with pytest.raises(GrowRefused, match="no router on a foreign network without svc has 1 CPU"):
        grow(role)
    assert peer.actions() == []
    assert manager.errors == [{"vm": "r18b/cnt@e1", "service": "count-svc", "step": "grow",
                               "reason": "no router on a foreign network without svc has 1 CPU "
                                         "and 256 MiB free"}]
    assert role.stats["grow_refused"] == 1
    # A router that does not answer is no candidate either.
    del peer.offers["10.14.0.1"]
    with pytest.raises(GrowRefused):
        grow(role)


def test_grow_refuses_when_every_candidate_refuses(monkeypatch) -> None:
    peer = FakePeer(refuse={"10.14.0.1"})
    role, manager = grower(monkeypatch, peer)
    with pytest.raises(GrowRefused, match="every candidate refused: r20a: no room on 10.14.0.1"):
        grow(role)
    assert manager.errors[-1]["step"] == "grow"
    assert [c[2] for c in manager.calls] == ["stats"]  # no checkpoint taken


def test_a_duplicate_that_fails_at_the_target_releases_its_reservation(monkeypatch) -> None:
    peer = FakePeer(start_fails=True)
    role, manager = grower(monkeypatch, peer)
    with pytest.raises(GrowRefused, match="the duplicate on r20a failed: TamperedArchive"):
        grow(role)
    assert peer.actions() == [("10.14.0.1", "reserve"), ("10.14.0.1", "start"),
                              ("10.14.0.1", "release")]
    assert peer.sent[-1][2]["reservation"] == peer.sent[-3][2]["reservation"]
    assert "TamperedArchive" in manager.errors[-1]["reason"] and role.stats["grown"] == 0


@pytest.mark.parametrize("change, message", [
    ({"instance_id": "r18b/nothing@e1"}, "not a primary"),
    ({"target": "renderer"}, "not a part of count-svc that can move"),
])
def test_grow_refuses_what_it_cannot_grow(monkeypatch, change: dict, message: str) -> None:
    peer = FakePeer()
    role, manager = grower(monkeypatch, peer)
    manager.vms["cnt"].objects = {"counter": None, "renderer": None}
    with pytest.raises(GrowRefused, match=message):
        grow(role, {**GROW, **change})
    assert peer.sent == []


def test_a_duplicate_is_not_grown_from(monkeypatch) -> None:
    peer = FakePeer()
    role, manager = grower(monkeypatch, peer)
    manager.vms["cnt"].part = "duplicate"
    with pytest.raises(GrowRefused, match="not a primary"):
        grow(role)
