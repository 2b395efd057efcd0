"""agent.broker.broker.Broker: the facade end to end on fake clocks — grants with
credentials, expiry and cancel releasing share and CPU (step 230), renewals, lifecycle
clipping (step 206), instances leaving, all-or-nothing path grants and JSON snapshots."""

from __future__ import annotations

import json

import pytest

from agent.broker.broker import Broker, Grant
from agent.broker.credentials import Verifier
from agent.broker.directory import Instance, Lifecycle
from agent.broker.errors import CredentialError, LeaseDenied, UnknownLease
from agent.broker.leases import LeasePolicy
from agent.broker.errors import BadRequest
from fakeclock import FakeClock

WALL0 = 1_700_000_000.0


class Env:
    def __init__(self, policy: LeasePolicy | None = None) -> None:
        self.clock = FakeClock(500.0)
        self.wall = FakeClock(WALL0)
        self.broker = Broker(policy or LeasePolicy(default_s=60.0, max_s=300.0),
                             clock=self.clock, wall_clock=self.wall)
        self.broker.register_instance(Instance("counter", "c@r1", "10.0.1.10", 4000, "r1",
                                               share=100.0, cpu=1.0, objects=("counter",)))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def verifier(self, service: str = "counter") -> Verifier:
        return Verifier({service: self.broker.service_key(service)}, self.broker.revocations,
                        clock=self.wall)


def test_a_grant_names_the_instance_and_carries_a_credential_the_object_accepts() -> None:
    env = Env()
    grant = env.broker.request("co1", "counter", 40, 0.5, 30.0)
    (hop,) = grant.hops
    assert (hop.service, hop.instance, hop.address, hop.port) == ("counter", "c@r1",
                                                                  "10.0.1.10", 4000)
    assert hop.granted_s == 30.0 and hop.expires_at == WALL0 + 30.0
    verified = env.verifier().verify(hop.credential, "counter", instance="c@r1")
    assert verified.lease_id == hop.lease_id and verified.holder == "co1"
    assert Grant.from_dict(json.loads(json.dumps(grant.as_dict()))) == grant


def test_expiry_releases_share_and_cpu() -> None:
    env = Env()
    env.broker.request("co1", "counter", 80, 0.8, 30.0)
    with pytest.raises(LeaseDenied) as err:
        env.broker.request("co2", "counter", 30, 0.1)
    assert err.value.reason == "no_capacity"
    env.advance(29.9)
    assert env.broker.expire() == []
    env.advance(0.1)
    assert [lease.holder for lease in env.broker.expire()] == ["co1"]
    (svc,) = env.broker.services()
    assert svc["instances"][0]["free_share"] == 100 and svc["instances"][0]["free_cpu"] == 1.0
    assert env.broker.request("co2", "counter", 30, 0.1).hops[0].instance == "c@r1"


def test_cancel_releases_and_revokes_the_credential() -> None:
    env = Env()
    hop = env.broker.request("co1", "counter", 100, 1.0, 30.0).hops[0]
    env.broker.cancel(hop.lease_id, "co1")
    with pytest.raises(CredentialError) as err:
        env.verifier().verify(hop.credential, "counter")
    assert err.value.reason == "revoked"
    env.broker.request("co2", "counter", 100, 1.0)
    env.advance(31.5)  # past the credential's expiry and the margin: pruned
    env.broker.expire()
    assert len(env.broker.revocations) == 0


def test_someone_elses_lease_cannot_be_renewed_or_cancelled() -> None:
    env = Env()
    hop = env.broker.request("co1", "counter", 50, 0.5).hops[0]
    for op in (env.broker.renew, env.broker.cancel):
        with pytest.raises(UnknownLease):
            op(hop.lease_id, "mallory")
    assert [d["holder"] for d in env.broker.leases()] == ["co1"]


def test_renew_is_now_plus_granted_with_a_new_credential() -> None:
    env = Env()
    hop = env.broker.request("co1", "counter", 50, 0.5, 30.0).hops[0]
    env.advance(20.0)
    renewed = env.broker.renew(hop.lease_id, "co1", 1000.0)
    assert renewed.granted_s == 300.0 and renewed.expires_at == WALL0 + 20 + 300
    assert renewed.lease_id == hop.lease_id and renewed.credential != hop.credential
    assert env.broker.leases()[0]["expires_at"] == 500.0 + 20 + 300
    env.advance(15.0)  # the old credential keeps its own expiry: it was not extended
    with pytest.raises(CredentialError) as err:
        env.verifier().verify(hop.credential, "counter")
    assert err.value.reason == "expired"
    assert env.verifier().verify(renewed.credential, "counter").lease_id == hop.lease_id


def test_leases_never_outlive_the_instance_lifecycle() -> None:
    env = Env()
    env.broker.register_instance(Instance(
        "short", "s@r2", "10.0.2.10", 4000, "r2",
        lifecycle=Lifecycle(max_duration_s=100.0, running_since=env.clock() - 80.0)))
    hop = env.broker.request("co1", "short", 10, 0.1, 60.0).hops[0]
    assert hop.granted_s == pytest.approx(20.0)
    env.advance(15.0)
    assert env.broker.renew(hop.lease_id, "co1").granted_s == pytest.approx(5.0)
    env.advance(5.0)
    with pytest.raises(LeaseDenied) as err:
        env.broker.request("co2", "short", 10, 0.1)
    assert err.value.reason == "policy"


def test_removing_an_instance_ends_and_revokes_its_leases() -> None:
    env = Env()
    hop = env.broker.request("co1", "counter", 50, 0.5).hops[0]
    ended = env.broker.remove_instance("c@r1")
    assert [lease.lease_id for lease in ended] == [hop.lease_id]
    assert env.broker.leases() == [] and env.broker.services() == []
    with pytest.raises(CredentialError):
        env.verifier().verify(hop.credential, "counter")
    with pytest.raises(LeaseDenied) as err:
        env.broker.request("co1", "counter", 50, 0.5)
    assert err.value.reason == "unknown_service"


def test_a_path_grant_is_all_or_nothing() -> None:
    env = Env(LeasePolicy(max_leases_per_holder=1))
    for iid, svc, src, dst, n in (("t2h", "text2html", "text", "html", 1),
                                  ("h2r", "html2rtf", "html", "rtf", 2)):
        env.broker.register_instance(Instance(svc, iid, f"10.0.{n}.20", 4000, "r1",
                                              consumes=src, produces=dst))
    with pytest.raises(LeaseDenied) as err:  # the second hop's lease is over the holder's cap
        env.broker.request("co1", "text -> rtf", 50, 0.5)
    assert err.value.reason == "policy"
    assert env.broker.leases() == [] and len(env.broker.revocations) == 0
    assert all(i["used_share"] == 0 for s in env.broker.services() for i in s["instances"])
    fresh = Broker(clock=env.clock, wall_clock=env.wall)
    for inst in env.broker.directory:
        fresh.register_instance(inst)
    hops = fresh.request("co1", "text -> rtf", 50, 0.5).hops
    assert [h.instance for h in hops] == ["t2h", "h2r"]
    assert len({h.lease_id for h in hops}) == 2  # one lease per hop


@pytest.mark.parametrize("holder", ["", None, "has space", 5])
def test_a_request_without_a_valid_holder_is_bad_credentials(holder) -> None:
    with pytest.raises(LeaseDenied) as err:
        Env().broker.request(holder, "counter", 10, 0.1)
    assert err.value.reason == "bad_credentials"


def test_requests_and_registrations_from_the_wire_are_validated() -> None:
    env = Env()
    grant = env.broker.request_from("co1", {"target": "counter", "share": 5, "cpu": 0.1})
    assert grant.hops[0].granted_s == 60.0
    with pytest.raises(BadRequest):
        env.broker.request_from("co1", {"target": "counter", "share": 500, "cpu": 0.1})
    with pytest.raises(BadRequest):
        env.broker.register_from({"service": "x"})
    key = env.broker.register_from({"service": "x", "instance_id": "x@r9",
                                    "address": "10.0.9.10", "port": 1, "router": "r9"})
    assert key == env.broker.service_key("x") != env.broker.service_key("counter")


def test_snapshots_are_json() -> None:
    env = Env()
    env.broker.request("co1", "counter", 25, 0.25)
    leases = json.loads(json.dumps(env.broker.leases()))
    services = json.loads(json.dumps(env.broker.services()))
    assert leases[0]["share"] == 25 and leases[0]["remaining"] == 60.0
    inst = services[0]["instances"][0]
    assert (inst["used_share"], inst["free_cpu"], inst["leases"]) == (25, 0.75, 1)
    assert env.broker.stats["granted"] == 1
