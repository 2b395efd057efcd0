"""agent.broker.admission and agent.broker.directory: which instance takes a request (patent
Fig. 12, step 208), refusals, release (step 230), the move-service seam, and registrations
from the wire."""

from __future__ import annotations

import pytest

from agent.broker.admission import Admission, AdmissionPolicy, Decision
from agent.broker.directory import Instance, Lifecycle, ServiceDirectory
from agent.broker.leases import LeaseRequest
from agent.broker.errors import BadRequest, LeaseDenied
from fakeclock import FakeClock


def instance(iid: str, share: float = 100.0, cpu: float = 1.0, n: int = 10,
             service: str = "counter", **kwargs) -> Instance:
    return Instance(service, iid, f"10.0.1.{n}", 4000, "r1", share, cpu, **kwargs)


class Env:
    def __init__(self, *instances: Instance, policy: AdmissionPolicy | None = None) -> None:
        self.clock = FakeClock(100.0)
        self.directory = ServiceDirectory()
        for i in instances:
            self.directory.register(i)
        self.admission = Admission(self.directory, policy, self.clock)

    def take(self, lease_id: str, share: float, cpu: float, target: str = "counter") -> Instance:
        chosen = self.admission.admit(LeaseRequest(target, share, cpu))
        self.admission.hold(lease_id, chosen, share, cpu)
        return chosen


def test_refuses_then_admits_after_a_release() -> None:
    env = Env(instance("a", share=100, cpu=1.0))
    env.take("L1", 70, 0.5)
    with pytest.raises(LeaseDenied) as err:
        env.take("L2", 40, 0.1)
    assert err.value.reason == "no_capacity" and "30%" in err.value.detail
    assert env.admission.release("L1") is not None
    assert env.admission.release("L1") is None  # idempotent: freed once
    assert env.take("L2", 40, 0.1).instance_id == "a"


def test_cpu_alone_can_refuse() -> None:
    env = Env(instance("a", share=100, cpu=1.0))
    env.take("L1", 10, 0.75)
    with pytest.raises(LeaseDenied):
        env.take("L2", 10, 0.5)
    assert env.take("L3", 10, 0.25).instance_id == "a"


def test_shares_add_up_exactly_to_the_capacity() -> None:
    env = Env(instance("a", share=100, cpu=1.0))
    for n in range(3):
        env.take(f"L{n}", 100 / 3, 1 / 3)
    assert env.admission.free(env.directory.get("a")).share == pytest.approx(0, abs=1e-9)
    with pytest.raises(LeaseDenied):
        env.take("L9", 0.001, 0.001)


def test_picks_the_instance_with_most_free_share_unless_a_cost_is_given() -> None:
    env = Env(instance("a", n=10), instance("b", n=11))
    env.take("L1", 30, 0.1)  # tie: a (by id)
    assert env.take("L2", 10, 0.1).instance_id == "b"  # a has 70 free, b 100
    cost = {"a": 1.0, "b": 9.0}
    req = LeaseRequest("counter", 10, 0.1)
    assert env.admission.admit(req, lambda i: cost[i.instance_id]).instance_id == "a"
    cost = {"a": 9.0, "b": 1.0}
    assert env.admission.admit(req, lambda i: cost[i.instance_id]).instance_id == "b"


def test_found_by_object_name_too_and_unknown_service() -> None:
    env = Env(instance("a", objects=("counter_obj",)))
    assert env.take("L1", 10, 0.1, target="counter_obj").instance_id == "a"
    with pytest.raises(LeaseDenied) as err:
        env.take("L2", 10, 0.1, target="nothing")
    assert err.value.reason == "unknown_service"


def test_an_instance_past_its_lifecycle_takes_nothing() -> None:
    env = Env(instance("a", lifecycle=Lifecycle(max_duration_s=50.0, running_since=60.0)))
    env.take("L1", 10, 0.1)  # 10 s left
    env.clock.advance(10.0)
    with pytest.raises(LeaseDenied) as err:
        env.take("L2", 10, 0.1)
    assert err.value.reason == "policy"


def test_hold_checks_again_so_nothing_is_over_committed() -> None:
    env = Env(instance("a", share=50))
    chosen = env.admission.admit(LeaseRequest("counter", 40, 0.1))
    env.admission.hold("L1", chosen, 40, 0.1)
    with pytest.raises(LeaseDenied):
        env.admission.hold("L2", chosen, 40, 0.1)
    with pytest.raises(ValueError):
        env.admission.hold("L1", chosen, 1, 0.1)


class Duplicate(AdmissionPolicy):
    """What the next issue does for real: move all of the service to a new VM (step 222)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def on_refusal(self, request, directory, admission, reason, detail) -> Decision:
        self.calls.append((request.target, reason))
        dup = instance("dup", n=20)
        directory.register(dup)
        return Decision.admit(dup)


def test_the_policy_seam_is_asked_on_refusal_and_may_place_the_request() -> None:
    policy = Duplicate()
    env = Env(instance("a", share=50), policy=policy)
    env.take("L1", 40, 0.1)
    assert policy.calls == []
    assert env.take("L2", 40, 0.1).instance_id == "dup"
    assert policy.calls == [("counter", "no_capacity")]


class Liar(AdmissionPolicy):
    def on_refusal(self, request, directory, admission, reason, detail) -> Decision:
        return Decision.admit(directory.get("a"))  # full: must not be accepted


def test_a_policy_cannot_place_a_request_where_it_does_not_fit() -> None:
    env = Env(instance("a", share=50), policy=Liar())
    env.take("L1", 40, 0.1)
    with pytest.raises(LeaseDenied) as err:
        env.take("L2", 40, 0.1)
    assert err.value.reason == "no_capacity"


def test_the_default_policy_refuses() -> None:
    decision = AdmissionPolicy().on_refusal(LeaseRequest("x", 1, 1), ServiceDirectory(),
                                            None, "no_capacity", "full")  # type: ignore[arg-type]
    assert decision == Decision.refuse("no_capacity", "full")


# --- the directory ---------------------------------------------------------------------------

REG = {"service": "text2html", "instance_id": "t2h@r1", "address": "10.0.1.10", "port": 4000,
       "router": "r1", "share": 100, "cpu": 0.5, "objects": ["text2html"],
       "consumes": "text", "produces": "html",
       "lifecycle": {"max_duration_s": 600, "uptime_s": 100}}


def test_registration_from_the_wire_and_describe() -> None:
    inst = Instance.from_dict(REG, now=1000.0)
    assert inst.lifecycle.remaining(1000.0) == 500.0
    directory = ServiceDirectory()
    directory.register(inst)
    (svc,) = directory.describe(1000.0)
    assert svc["service"] == "text2html"
    assert svc["instances"][0]["lifecycle"] == {"max_duration_s": 600, "uptime_s": 100.0,
                                                "remaining_s": 500.0}
    again = Instance.from_dict({k: v for k, v in svc["instances"][0].items()}, now=1000.0)
    assert again == inst
    assert directory.remove("t2h@r1") == inst and directory.remove("t2h@r1") is None


@pytest.mark.parametrize("change", [
    {"port": 0}, {"port": 70000}, {"port": "4000"}, {"address": "not-an-ip"}, {"share": 0},
    {"share": 150}, {"cpu": -1}, {"service": "a b"}, {"instance_id": ""}, {"objects": "x"},
    {"objects": ["ok", "not ok"]}, {"produces": ""}, {"consumes": "te xt"},
    {"lifecycle": {"max_duration_s": -1}}, {"lifecycle": {"uptime_s": -1}},
    {"lifecycle": []}, {"processing_cost": -1}, {"whatever": 1},
], ids=repr)
def test_registration_fields_are_validated(change) -> None:
    with pytest.raises(BadRequest):
        Instance.from_dict({**REG, **change}, now=1000.0)


def test_an_instance_id_cannot_change_service() -> None:
    directory = ServiceDirectory()
    directory.register(instance("x", service="a"))
    directory.register(instance("x", service="a", share=50))  # an update is fine
    with pytest.raises(BadRequest):
        directory.register(instance("x", service="b"))
