"""agent.broker.renewal.LeaseRenewalManager: when to renew, for how long, when to stop, and
how failures are reported — on a fake clock, and driven against a real Broker."""

from __future__ import annotations

import asyncio

import pytest

from agent.broker.broker import Broker
from agent.broker.directory import Instance
from agent.broker.leases import ANY, LeasePolicy
from agent.broker.errors import UnknownLease
from agent.broker.renewal import LeaseExpired, LeaseRenewalManager
from fakeclock import FakeClock


class Env:
    def __init__(self, **kwargs) -> None:
        self.clock = FakeClock(0.0)
        self.failures: list[tuple[str, BaseException]] = []
        self.lrm = LeaseRenewalManager(
            self.clock, lambda lease, err: self.failures.append((lease.lease_id, err)), **kwargs)


def test_renews_once_two_thirds_of_the_grant_have_passed() -> None:
    env = Env()
    env.lrm.renew_for("L", granted_s=30.0)
    env.clock.advance(19.99)
    assert env.lrm.due() == []
    env.clock.advance(0.01)
    (renewal,) = env.lrm.due()
    assert renewal.lease_id == "L" and renewal.duration == ANY and renewal.asked_at == 20.0
    assert env.lrm.due() == []  # in flight: not asked twice


def test_renews_earlier_when_less_than_the_margin_would_remain() -> None:
    env = Env(margin_s=1.0)
    env.lrm.renew_for("L", granted_s=2.0)  # 2/3 would be 1.33 s, leaving only 0.67 s
    env.clock.advance(0.99)
    assert env.lrm.due() == []
    env.clock.advance(0.01)
    assert [r.lease_id for r in env.lrm.due()] == ["L"]


def test_a_renewal_counts_from_when_it_was_sent() -> None:
    env = Env()
    env.lrm.renew_for("L", granted_s=30.0)
    env.clock.advance(20.0)
    (renewal,) = env.lrm.due()
    env.clock.advance(3.0)  # the answer took 3 s
    env.lrm.renewed("L", 30.0, renewal.asked_at)
    assert env.lrm.get("L").expires_at == 50.0
    assert env.lrm.next_wakeup() == 40.0


def test_never_asks_past_the_desired_expiration_then_lets_the_lease_expire() -> None:
    env = Env()
    env.lrm.renew_for("L", granted_s=30.0, desired_duration=45.0, renew_duration=30.0)
    env.clock.advance(20.0)
    (renewal,) = env.lrm.due()
    assert renewal.duration == 25.0  # 45 - 20, not 30
    env.lrm.renewed("L", 25.0, renewal.asked_at)
    env.clock.advance(20.0)
    assert env.lrm.due() == []  # lasts to the desired expiration: coasting
    assert env.lrm.finished() == []
    env.clock.advance(5.0)
    (ending,) = env.lrm.finished()
    assert ending.lease.lease_id == "L" and ending.cancel is False
    assert len(env.lrm) == 0 and env.failures == []


def test_cancel_at_end_asks_to_cancel_a_lease_that_outlasts_the_desire() -> None:
    env = Env()
    env.lrm.renew_for("L", granted_s=60.0, desired_duration=10.0, cancel_at_end=True)
    env.lrm.renew_for("M", granted_s=60.0, desired_duration=10.0)
    assert env.lrm.due() == []
    env.clock.advance(10.0)
    assert {(e.lease.lease_id, e.cancel) for e in env.lrm.finished()} == {("L", True),
                                                                          ("M", False)}


def test_a_definite_failure_is_reported_and_the_lease_dropped() -> None:
    env = Env()
    env.lrm.renew_for("L", granted_s=30.0, payload="hop 1")
    env.clock.advance(20.0)
    env.lrm.due()
    err = UnknownLease()
    env.lrm.failed("L", err)
    assert env.failures == [("L", err)] and "L" not in env.lrm


def test_an_indefinite_failure_retries_until_the_lease_expires() -> None:
    env = Env(retry_s=2.0)
    env.lrm.renew_for("L", granted_s=30.0)
    env.clock.advance(20.0)
    env.lrm.due()
    env.lrm.failed("L", TimeoutError(), definite=False)
    assert env.failures == [] and env.lrm.due() == []
    env.clock.advance(2.0)
    (retry,) = env.lrm.due()
    env.lrm.failed("L", TimeoutError(), definite=False)
    env.clock.advance(8.0)  # t = 30: expired without a renewal
    assert env.lrm.due() == []
    (ending,) = env.lrm.finished()
    assert ending.cancel is False
    (lease_id, error), = env.failures
    assert lease_id == "L" and isinstance(error, LeaseExpired)


@pytest.mark.parametrize("kwargs", [{"fraction": 0}, {"fraction": 1}, {"margin_s": -1},
                                    {"retry_s": 0}])
def test_bad_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        LeaseRenewalManager(FakeClock(0), **kwargs)


# --- run() against a real broker on the same fake clock --------------------------------------

class World:
    """A broker, a manager and a sleep that moves the shared fake clock."""

    def __init__(self) -> None:
        self.clock = FakeClock(0.0)
        self.wall = FakeClock(1.7e9)
        self.broker = Broker(LeasePolicy(default_s=30.0, max_s=60.0), clock=self.clock,
                             wall_clock=self.wall)
        self.broker.register_instance(Instance("counter", "c@r1", "10.0.1.10", 4000, "r1",
                                               share=100.0, cpu=1.0))
        self.failures: list[BaseException] = []
        self.lrm = LeaseRenewalManager(self.clock, lambda lease, err: self.failures.append(err))
        self.renewals: list[float] = []
        self.cancelled: list[str] = []

    async def renew(self, renewal) -> float:
        self.renewals.append(self.clock())
        return self.broker.renew(renewal.lease_id, "co1", renewal.duration).granted_s

    async def cancel(self, lease) -> None:
        self.cancelled.append(lease.lease_id)
        self.broker.cancel(lease.lease_id, "co1")

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.clock.advance(seconds)
        self.wall.advance(seconds)
        self.broker.expire()


def test_run_keeps_a_lease_alive_past_the_maximum_then_cancels_it() -> None:
    world = World()
    grant = world.broker.request("co1", "counter", 50, 0.5)
    lease_id = grant.hops[0].lease_id
    world.lrm.renew_for(lease_id, grant.granted_s, desired_duration=200.0, cancel_at_end=True)
    asyncio.run(world.lrm.run(world.renew, world.sleep, world.cancel))
    assert world.clock() == 200.0
    assert world.renewals and all(b - a <= 20.0 + 1e-9 for a, b in
                                  zip([0.0, *world.renewals], world.renewals))
    assert world.failures == [] and world.cancelled == [lease_id]
    assert world.broker.leases() == []


def test_run_reports_a_lease_the_broker_no_longer_knows() -> None:
    world = World()
    grant = world.broker.request("co1", "counter", 50, 0.5)
    world.lrm.renew_for(grant.hops[0].lease_id, grant.granted_s)  # forever
    world.broker.remove_instance("c@r1")  # its VM retired
    asyncio.run(world.lrm.run(world.renew, world.sleep, world.cancel))
    assert len(world.lrm) == 0 and [type(e) for e in world.failures] == [UnknownLease]
    assert world.clock() == 20.0  # found out at the first renewal
