"""agent.broker.leases: Jini lease semantics (FixedLeasePeriodPolicy, renew, cancel, expiry)
on a fake clock, and the validation of lease requests from the wire."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.broker.errors import BadRequest, LeaseDenied, UnknownLease
from agent.broker.leases import ANY, LeasePolicy, LeaseRequest, LeaseTable
from fakeclock import FakeClock

POLICY = LeasePolicy(default_s=60.0, max_s=300.0, max_leases_per_holder=3)


class Env:
    def __init__(self, policy: LeasePolicy = POLICY) -> None:
        self.clock = FakeClock(1000.0)
        self.ended: list[tuple[str, str]] = []
        self.table = LeaseTable(policy, self.clock,
                                on_end=lambda lease, why: self.ended.append((lease.lease_id, why)))

    def grant(self, holder: str = "co1", requested=ANY, limit_s=None):
        return self.table.grant(holder, "text2html", "t2h@r1", 25.0, 0.5, requested, limit_s)


# --- the policy: never longer than asked, never longer than the maximum, ANY -> default ---

@pytest.mark.parametrize("asked, granted", [(ANY, 60.0), (10.0, 10.0), (300.0, 300.0),
                                            (301.0, 300.0), (86400.0, 300.0)])
def test_policy_clips_like_fixed_lease_period_policy(asked, granted) -> None:
    assert POLICY.grant(asked) == granted


def test_lifecycle_limit_clips_the_grant_and_an_exhausted_one_is_denied() -> None:
    assert POLICY.grant(ANY, limit_s=20.0) == 20.0
    assert POLICY.grant(10.0, limit_s=20.0) == 10.0
    with pytest.raises(LeaseDenied) as err:
        POLICY.grant(10.0, limit_s=0.0)
    assert err.value.reason == "policy"


@given(asked=st.floats(min_value=1e-3, max_value=1e6),
       max_s=st.floats(min_value=1.0, max_value=1e4),
       limit=st.none() | st.floats(min_value=1e-3, max_value=1e5))
def test_a_grant_never_exceeds_what_was_asked_the_maximum_or_the_lifetime(asked, max_s, limit):
    policy = LeasePolicy(default_s=min(60.0, max_s), max_s=max_s)
    granted = policy.grant(asked, limit)
    expected = min(asked, max_s) if limit is None else min(asked, max_s, limit)
    assert granted == expected
    assert granted > 0


def test_policy_rejects_a_default_longer_than_the_maximum() -> None:
    with pytest.raises(BadRequest):
        LeasePolicy(default_s=500.0, max_s=300.0)


# --- the table -------------------------------------------------------------------------------

def test_grant_expires_now_plus_granted_and_ids_are_unguessable() -> None:
    env = Env()
    leases = [env.grant(requested=30.0) for _ in range(3)]
    assert {lease.expires_at for lease in leases} == {1030.0}
    assert len({lease.lease_id for lease in leases}) == 3
    # 128 bits, in hex: never starts with "-", so no command line takes an id for an option
    assert all(len(lease.lease_id) == 32 and int(lease.lease_id, 16) >= 0 for lease in leases)


def test_renew_sets_expiration_to_now_plus_new_grant_even_if_shorter() -> None:
    env = Env()
    lease = env.grant(requested=200.0)
    env.clock.advance(50)
    renewed = env.table.renew(lease.lease_id, "co1", 10.0)
    assert renewed.expires_at == 1060.0 and renewed.granted_s == 10.0
    env.clock.advance(5)
    assert env.table.renew(lease.lease_id, "co1", 1e5).expires_at == 1055.0 + 300.0
    assert env.table.renew(lease.lease_id, "co1").expires_at == 1055.0 + 60.0


def test_cancel_ends_once_and_renewing_a_cancelled_lease_is_unknown() -> None:
    env = Env()
    lease = env.grant()
    env.table.cancel(lease.lease_id, "co1")
    assert env.ended == [(lease.lease_id, "cancelled")]
    for op in (env.table.renew, env.table.cancel):
        with pytest.raises(UnknownLease):
            op(lease.lease_id, "co1")
    assert env.ended == [(lease.lease_id, "cancelled")]
    assert len(env.table) == 0


def test_expire_returns_only_leases_that_ran_out_and_releases_each_once() -> None:
    env = Env()
    short, long_ = env.grant(requested=10.0), env.grant(requested=100.0)
    env.clock.advance(9.999)
    assert env.table.expire() == []
    env.clock.advance(0.001)
    assert [lease.lease_id for lease in env.table.expire()] == [short.lease_id]
    assert env.table.expire() == []
    assert env.ended == [(short.lease_id, "expired")]
    assert [lease.lease_id for lease in env.table] == [long_.lease_id]


def test_renewing_an_expired_lease_before_housekeeping_fails_and_releases_it() -> None:
    env = Env()
    lease = env.grant(requested=10.0)
    env.clock.advance(10.0)
    with pytest.raises(UnknownLease):
        env.table.renew(lease.lease_id, "co1", 10.0)
    assert env.ended == [(lease.lease_id, "expired")]
    assert env.table.expire() == []


def test_someone_elses_lease_is_answered_exactly_like_an_unknown_one() -> None:
    env = Env()
    lease = env.grant(holder="co1")
    errors = []
    for lease_id, holder in ((lease.lease_id, "mallory"), ("no-such-lease", "mallory"),
                             (lease.lease_id[:-1], "co1")):
        for op in (env.table.renew, env.table.cancel):
            with pytest.raises(UnknownLease) as err:
                op(lease_id, holder)
            errors.append(err.value.as_dict())
    assert all(e == errors[0] for e in errors)
    assert env.ended == [] and env.table.get(lease.lease_id, "co1").expires_at == 1060.0


def test_holder_is_required_and_capped() -> None:
    env = Env()
    with pytest.raises(LeaseDenied) as err:
        env.grant(holder="")
    assert err.value.reason == "bad_credentials"
    for _ in range(3):
        env.grant(holder="greedy")
    with pytest.raises(LeaseDenied) as err:
        env.grant(holder="greedy")
    assert err.value.reason == "policy"
    env.grant(holder="other")


# --- requests from the wire ------------------------------------------------------------------

def test_request_round_trips() -> None:
    req = LeaseRequest("text -> rtf", 40, 0.5, 30)
    assert LeaseRequest.from_dict(req.as_dict()) == req
    assert req.goal is not None and (req.goal.source, req.goal.sink) == ("text", "rtf")
    assert LeaseRequest.from_dict({"target": "text2html", "share": 1, "cpu": 0.1}).duration == ANY


GOOD = {"target": "text2html", "share": 50, "cpu": 0.5, "duration": 30}


@pytest.mark.parametrize("change", [
    {"share": 0}, {"share": 100.5}, {"share": True}, {"share": "50"}, {"share": math.nan},
    {"cpu": 0}, {"cpu": -1}, {"cpu": math.inf}, {"duration": -5}, {"duration": 0},
    {"duration": "forever"}, {"duration": None}, {"target": ""}, {"target": "a b"},
    {"target": "text -> text"}, {"target": "a -> b -> c"}, {"target": 7}, {"extra": 1},
], ids=repr)
def test_request_fields_are_validated(change) -> None:
    with pytest.raises(BadRequest):
        LeaseRequest.from_dict({**GOOD, **change})


@pytest.mark.parametrize("doc", [None, [], "text2html", {"share": 5, "cpu": 1}])
def test_request_must_be_an_object_with_a_target(doc) -> None:
    with pytest.raises(BadRequest):
        LeaseRequest.from_dict(doc)
