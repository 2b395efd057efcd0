"""Issue 12, item 4: every name, address and port that arrives in an in-band message is
checked against a strict pattern or range before use, and a bad one is refused with a clear
error that touched nothing.

Table-driven: each bad value is sent to the handler that receives it (PROVISION through the
VM manager, VM_NEGOTIATE / SERVICE_GROW / INSTANCE_RELEASE through the distribution role,
LEASE_* / SERVICE_(DE)REGISTER through the broker role, LEASE_REVOKE through the instances'
parser) or, for MIGRATE and STATE_TRANSFER, to their check functions
(:mod:`agent.hosting.migration_fields`); each test also sends the good value, so a handler
that refused everything would fail.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.broker.errors import BadRequest
from agent.broker.instances import revocations_by_service
from agent.broker.role import BrokerRole
from agent.core import fields
from agent.core.config import AgentConfig, BrokerConfig, Credential, Interface, ObjectConfig
from agent.core.daemon import AgentDaemon
from agent.core.fields import FieldError
from agent.hosting.migration_fields import check_migrate, check_state_transfer
from agent.vm.manager import ProvisionError
from packets import ControlMessage, ControlType

import test_distribution as dist
from test_vm_manager import SERVICE, Env

# --- the field checks themselves ---------------------------------------------------------------

GOOD_AND_BAD: list[tuple[str, Callable[[Any], Any], list[Any], list[Any]]] = [
    ("name", lambda v: fields.name(v, "f"), ["v1", "counter-svc", "a.b_c", "x" * 64],
     ["../x", "a/b", "", ".hidden", "x" * 65, "v1\n", "a b", None, 5, "é"]),
    ("identifier", lambda v: fields.identifier(v, "f"), ["r18b/cnt-d1@3fa2", "co14"],
     ["a b", "", "/x", "x\n", 7, "x" * 129]),
    ("token", lambda v: fields.token(v, "f"), ["0123abcd" * 4, "held-12ab"],
     ["", "a/b", "../x", "a b", None, "x" * 129]),
    ("nai", lambda v: fields.nai(v, "f"), ["cam@home.moat", "logger.cam@home.moat", "cam"],
     ["", "a b@x", "cam@", "cam@@x", "@x", None]),
    ("spec", lambda v: fields.spec(v, "f"), ["agent.objects.counter:Counter", "m:C"],
     ["os:system;rm", "../x:C", "m", "m:", ":C", "m:C\n", "m.:C", 3]),
    ("port", lambda v: fields.port(v, "f"), [1, 4341, 65535],
     [0, 65536, -1, "80", True, 80.0, None]),
    ("address", lambda v: fields.address(v, "f"), ["10.16.0.100", "192.0.2.1"],
     ["::1", "010.16.0.1", "10.16.0.1\n", "10.16.0", "0.0.0.0", "127.0.0.1", "224.0.0.1",
      "255.255.255.255", "169.254.1.1", "240.0.0.1", 167772161, None, "x"]),
    ("prefix", lambda v: fields.prefix(v, "f"), ["10.16.0.224/30", "10.0.0.0/8"],
     ["10.16.0.225/30", "10.16.0.224", "10.16.0.224/33", "224.0.0.0/4", "::/0", 5]),
    ("number", lambda v: fields.number(v, "f", gt=0, le=10), [0.5, 10, 3],
     [0, -1, 11, float("nan"), float("inf"), True, "1", None]),
    ("flag", lambda v: fields.flag(v, "f"), [True, False], ["false", 0, 1, None]),
    ("text", lambda v: fields.text(v, "f", max_len=8), ["abc", ""], ["x" * 9, "a\nb", 5]),
]


@pytest.mark.parametrize("what, check, good, bad", GOOD_AND_BAD, ids=[g[0] for g in GOOD_AND_BAD])
def test_each_field_check_takes_the_good_and_refuses_the_bad_by_name(
        what: str, check: Callable[[Any], Any], good: list, bad: list) -> None:
    for value in good:
        assert check(value) == value
    for value in bad:
        with pytest.raises(FieldError) as info:
            check(value)
        assert info.value.field == "f" and str(info.value).startswith("f ")


def test_an_address_within_networks_excludes_their_network_and_broadcast_and_own() -> None:
    nets = ["10.16.0.0/24"]
    assert fields.address("10.16.0.7", "a", within=nets) == "10.16.0.7"
    for bad in ("10.16.0.0", "10.16.0.255", "10.12.0.7"):
        with pytest.raises(FieldError, match="not a host address"):
            fields.address(bad, "a", within=nets)
    with pytest.raises(FieldError, match="may not take"):
        fields.address("10.16.0.7", "a", within=nets, exclude=["10.16.0.7"])


def test_a_home_address_must_be_on_its_home_agents_network_and_not_the_agent() -> None:
    assert fields.home_address("10.16.0.100", "10.16.0.2", "h") == "10.16.0.100"
    assert fields.home_address("10.16.3.7", "10.16.0.2", "h") == "10.16.3.7"  # the /21
    for bad in ("10.12.0.100", "10.16.0.2", "10.16.7.255", "10.16.0.0", "10.16.8.1"):
        with pytest.raises(FieldError):
            fields.home_address(bad, "10.16.0.2", "h")
    with pytest.raises(FieldError, match="may not take"):  # the router's own address
        fields.home_address("10.16.0.1", "10.16.0.2", "h", own={"10.16.0.1"})
    with pytest.raises(FieldError, match="home agent"):
        fields.home_address("10.16.0.100", "r22b", "h")


def object_config(**change: Any) -> dict[str, Any]:
    cfg = ObjectConfig("cam", "10.0.1.10", "10.0.1.1", "cam@home.moat", Credential(4097, b"a" * 16),
                       Credential(8194, b"b" * 16), network_prefix="10.0.1.224/30").to_json()
    cfg.update(change)
    return {k: v for k, v in cfg.items() if v is not ...}


BAD_OBJECT_CONFIGS = [
    ({"name": "../x"}, "name"),
    ({"name": ...}, "name"),
    ({"nai": "cam @home"}, "nai"),
    ({"home_address": "10.12.0.10"}, "home_address"),  # off its home agent's network
    ({"home_address": "10.0.1.1"}, "home_address"),  # the home agent's own
    ({"home_address": "10.0.2.2"}, "home_address"),  # the router's own (Env's eth1)
    ({"home_address": "10.0.1.10/32"}, "home_address"),
    ({"home_agent": "hoa"}, "home agent"),
    ({"lifetime": 0}, "lifetime"),
    ({"lifetime": 70000}, "lifetime"),
    ({"preferred_agent": "255.255.255.255"}, "preferred_agent"),
    ({"care_of_address": "10.14.0.1.5"}, "care_of_address"),
    ({"network_prefix": "10.9.0.224/30"}, "network_prefix"),  # off the home network
    ({"network_prefix": "10.0.1.0/24"}, "network_prefix"),  # more than 16 addresses
    ({"network_prefix": "10.0.1.225/30"}, "network_prefix"),  # host bits
    ({"network_prefix": "10.0.1.8/29"}, "network_prefix"),  # holds the home address
    ({"mobile_home": {"spi": 4097, "key": ""}}, "credential"),
    ({"part": "tertiary"}, "part"),
]


def test_a_good_object_config_is_taken() -> None:
    cfg = fields.object_config(object_config(), "mobile.counter", own={"10.0.2.2"})
    assert (cfg.name, cfg.home_address, cfg.network_prefix) == ("cam", "10.0.1.10", "10.0.1.224/30")


@pytest.mark.parametrize("change, field", BAD_OBJECT_CONFIGS)
def test_a_bad_object_config_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(FieldError, match=field):
        fields.object_config(object_config(**change), "mobile.counter", own={"10.0.2.2"})


# --- PROVISION (the VM manager) ----------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    return Env(tmp_path, monkeypatch)


IFACE = {"kind": "interface", "interface": "eth1"}
BAD_PROVISIONS: list[tuple[dict[str, Any], str]] = [
    ({"vm": "../victim"}, "message"),
    ({"vm": "v1\n"}, "message"),
    ({"service": "../victim"}, "message"),
    ({"service": "x/../../victim"}, "message"),
    ({"service": 7}, "message"),
    ({"kind": "container"}, "message"),
    ({"port": 0}, "message"),
    ({"port": 65536}, "message"),
    ({"port": "4341"}, "message"),
    ({"port": True}, "message"),
    ({**IFACE, "address": "10.0.3.7"}, "virtual interface"),  # off eth1's network
    ({**IFACE, "address": "10.0.2.2"}, "virtual interface"),  # the router's own
    ({**IFACE, "address": "10.0.2.255"}, "virtual interface"),
    ({**IFACE, "address": "224.0.0.5"}, "virtual interface"),
    ({**IFACE, "address": "010.0.2.7"}, "virtual interface"),
    ({**IFACE, "address": "::1"}, "virtual interface"),
    ({**IFACE, "interface": ["eth1"], "address": "10.0.2.7"}, "virtual interface"),
    ({"resources": {"cpu": 0}}, "message"),
    ({"resources": {"cpu": float("nan")}}, "message"),
    ({"resources": {"cpu": "1"}}, "message"),
    ({"resources": {"cpu": 1e9}}, "message"),
    ({"resources": {"memory_mb": 1.5}}, "message"),
    ({"resources": {"pids": 0}}, "message"),
    ({"resources": {"egress_kbit": -5}}, "message"),
    ({"resources": {"disk": 5}}, "message"),
    ({"resources": "lots"}, "message"),
    ({"policy": {"max_transactions": 0}}, "message"),
    ({"policy": {"max_duration_s": float("inf")}}, "message"),
    ({"policy": {"extensible": "no"}}, "message"),
    ({"policy": {"evil": 1}}, "message"),
    ({"policy": "x"}, "message"),
    ({"policy": {"format": 2}}, "message"),
    ({"credentials": "abc"}, "message"),
    ({"credentials": [1]}, "message"),
    ({"objects": ["../x"]}, "message"),
    ({"objects": ["counter", "counter"]}, "message"),
    ({"mobile": {"../x": object_config()}}, "message"),
    ({"part": "tertiary"}, "message"),
    ({"parent_router": "r18b"}, "message"),
    ({"parent_instance": "a b"}, "message"),
    ({"running_since": "yesterday"}, "message"),
    ({"running_since": -1}, "message"),
    ({"running_since": 1e13}, "message"),
    *[({"mobile": {"counter": object_config(**change)}}, "mobile objects")
      for change, _ in BAD_OBJECT_CONFIGS],
]


def test_a_good_provision_with_every_checked_field_is_taken(env: Env) -> None:
    """The good values of the table below, together: the refusals are for their field."""
    vm = env.provision(**IFACE, address="10.0.2.77", port=4342,
                       resources={"cpu": 0.5, "memory_mb": 64, "pids": 16, "egress_kbit": 0},
                       policy={"max_transactions": 5, "extensible": False},
                       mobile={"counter": object_config()}, running_since=env.clock.now - 5)
    assert vm["address"] == "10.0.2.77" and vm["port"] == 4342 and vm["cpu"] == 0.5
    assert env.addresses == [("add", "10.0.2.77", 32, "eth1")]


def test_the_body_a_vm_sends_on_passes_the_checks(env: Env) -> None:
    """What a migration or a duplicate sends (VirtualMachine.provision_body: the policy as
    the manifest writes it, running_since, credentials, ...) is taken by the target."""
    env.provision(mobile={"counter": object_config()}, policy={"max_transactions": 5})
    body = dict(env.manager.vms["v1"].provision_body(), vm="v2", objects=["counter"],
                mobile={"counter": object_config(name="cam2", home_address="10.0.1.11")},
                part="duplicate")
    assert "format" in body["policy"]
    assert asyncio.run(env.manager.provision(body))["name"] == "v2"


@pytest.mark.parametrize("change, step", BAD_PROVISIONS,
                         ids=[json.dumps(c, default=str)[:60] for c, _ in BAD_PROVISIONS])
def test_a_provision_with_a_bad_field_is_refused_and_touches_nothing(
        env: Env, change: dict, step: str) -> None:
    victim = env.storage / "victim"
    victim.mkdir(parents=True)
    (victim / "keep").write_text("mine")
    (env.tmp / "victim").mkdir()
    (env.tmp / "victim" / "keep").write_text("mine")
    err = env.refused(**change)
    assert err.step == step, err
    assert env.manager.errors[-1]["step"] == step  # recorded, with why
    assert env.fetches == [] and env.addresses == [] and env.journal == []
    assert env.manager.vms == {} and env.host.calls == []
    assert env.leftovers("fetched") == []
    assert (victim / "keep").read_text() == "mine"
    assert (env.tmp / "victim" / "keep").read_text() == "mine"


# --- VM_NEGOTIATE, SERVICE_GROW, INSTANCE_RELEASE (the distribution role) ----------------------


def reserve(role: Any) -> None:
    dist.negotiate(role, {"action": "reserve", "reservation": "r1", "service": "count-svc",
                          "cpu": 1.0, "memory_mb": 256})


def start_with(vm_change: dict | None = None, mobile_change: dict | None = None) -> dict:
    body = dist.dup_body()
    body.update(vm_change or {})
    if mobile_change is not None:
        body["mobile"] = {"counter": {**body["mobile"]["counter"], **mobile_change}}
    return {"action": "start", "reservation": "r1", "vm": body, "state": {}}


BAD_NEGOTIATIONS: list[dict[str, Any]] = [
    {"action": "query", "home_address": "::1"},
    {"action": "query", "home_address": "10.16.0.100\n"},
    {"action": "query", "home_address": "224.0.0.1"},
    {"action": "query", "home_address": 5},
    {"action": "reserve", "reservation": "../x", "service": "count-svc", "cpu": 1.0,
     "memory_mb": 256},
    {"action": "reserve", "reservation": "", "service": "count-svc", "cpu": 1.0,
     "memory_mb": 256},
    {"action": "release", "reservation": "a b"},
    start_with({"vm": "../victim"}),
    start_with({"vm": "cnt"}),  # the primary that runs here
    start_with({"objects": ["../x"], "mobile": {"../x": {}}}),
    start_with(mobile_change={"name": "a/b"}),
    start_with(mobile_change={"home_address": "10.12.0.100"}),  # off the home network
    start_with(mobile_change={"home_address": "10.14.0.1"}),  # this router's own
    start_with(mobile_change={"home_agent": "hoa"}),
    start_with({"reservation": "a b"}) | {"reservation": "a b"},
    {"action": "restore", "vm": "../x", "name": "svc", "state": {}},
    {"action": "restore", "vm": "cnt-d1", "name": "a/b", "state": {}},
    {"action": "restore", "part": "../x", "state": {}},
    {"action": "cancel", "vm": "../cnt"},
    {"action": "return", "part": "../x", "state": {}},
]


def test_good_negotiations_are_taken() -> None:
    role, manager = dist.target((dist.vm("cnt"),))
    assert dist.negotiate(role, {"action": "query", "home_address": dist.HOME})["ok"]
    reserve(role)
    assert dist.negotiate(role, start_with())["instance"]["part"] == "duplicate"
    assert [b["vm"] for b, _ in manager.provisioned] == ["cnt-d1"]


@pytest.mark.parametrize("body", BAD_NEGOTIATIONS,
                         ids=[json.dumps(b)[:70] for b in BAD_NEGOTIATIONS])
def test_a_negotiation_with_a_bad_field_is_refused_and_touches_nothing(body: dict) -> None:
    role, manager = dist.target((dist.vm("cnt"),))
    reserve(role)
    with pytest.raises(BadRequest):
        dist.negotiate(role, body)
    assert manager.provisioned == [] and manager.removed == [] and manager.errors == []
    assert list(manager.vms) == ["cnt"] and len(role.reservations) == 1
    assert role.stats["duplicates_hosted"] == 0


@pytest.mark.parametrize("change", [
    {"instance_id": "a b"}, {"instance_id": 7}, {"co_address": "::1"},
    {"co_address": "not-an-ip"}, {"target": "../x"}, {"target": 5},
])
def test_a_grow_with_a_bad_field_is_refused_before_any_router_is_asked(
        monkeypatch: pytest.MonkeyPatch, change: dict) -> None:
    peer = dist.FakePeer()
    role, manager = dist.grower(monkeypatch, peer)
    with pytest.raises(BadRequest):
        dist.grow(role, {**dist.GROW, **change})
    assert peer.sent == [] and manager.calls == [] and role.stats["grown"] == 0
    assert dist.grow(role)["router"] == "r20a"  # the good body grows


@pytest.mark.parametrize("iid", ["a b", "", 7, None, "r20a/cnt-d1@e1\n"])
def test_a_release_with_a_bad_instance_id_is_refused_and_removes_nothing(iid: Any) -> None:
    role, manager = dist.target((dist.vm("cnt-d1", part="duplicate"),))
    with pytest.raises(BadRequest):
        dist.release(role, iid)
    assert manager.removed == [] and "cnt-d1" in manager.vms
    assert dist.release(role, "r20a/cnt-d1@e1")["released"] is True


@pytest.mark.parametrize("change", [
    {"address": "10.14.0.1\n"}, {"address": "::1"}, {"address": "224.0.0.2"},
    {"network": "10.14.0.1/24"}, {"network": "net14"}, {"visiting": ["10.16.0.100", "x"]},
])
def test_an_offer_with_a_bad_address_is_refused(change: dict) -> None:
    """VM_OFFER: its address is where the reservation and the start go next."""
    from agent.distribution.capacity import Offer

    assert Offer.from_dict(dict(dist.GOOD_OFFER, visiting=["10.16.0.100"])).address == "10.14.0.1"
    with pytest.raises(BadRequest):
        Offer.from_dict({**dist.GOOD_OFFER, **change})


# --- the broker's messages ----------------------------------------------------------------------


def broker() -> BrokerRole:
    cfg = AgentConfig(name="r22b", run_dir="/nonexistent", roles=[],
                      interfaces=[Interface("eth0", "10.16.0.2", 24)],
                      router_key=dist.ROUTER_KEY.hex(),
                      broker=BrokerConfig(address="10.16.0.2", serve=True,
                                          co_keys={"co14": dist.CO_KEY}))
    return AgentDaemon(cfg, roles=[BrokerRole]).require(BrokerRole)


def from_co(ctype: ControlType, body: dict) -> ControlMessage:
    """A message its authenticator accepted, as the handler sees it."""
    return ControlMessage(ctype, 1, dict(body, auth={"key_id": "co14"}))


def handle(role: BrokerRole, ctype: ControlType, body: dict) -> dict:
    handler = role.in_band()[ctype].handler
    return asyncio.run(handler(from_co(ctype, body), dict(body)))


def registered(role: BrokerRole) -> list:
    """The registered instances and what they hold (not their ages, which run on)."""
    return [(i["instance_id"], i["address"], i["used_share"], i["leases"])
            for s in role.broker.services() for i in s["instances"]]


BAD_REGISTRATIONS = [
    {"address": "::1"}, {"address": "224.0.0.1"}, {"address": "10.16.0.100\n"},
    {"address": "127.0.0.1"}, {"router_address": "10.14.0.1.1"},
    {"object_addresses": {"part": "255.255.255.255"}}, {"network": "10.14.0.7/24"},
    {"network": "::/0"}, {"port": 0}, {"port": 70000}, {"service": "../x"},
    {"instance_id": "a b"},
]


def test_a_good_registration_and_lease_round_are_taken() -> None:
    role = broker()
    handle(role, ControlType.SERVICE_REGISTER, {"instance": dist.duplicate_doc()})
    assert registered(role) == [("r20a/cnt-d1@2", dist.HOME, 0, 0)]
    grant = handle(role, ControlType.LEASE_REQUEST,
                   {"request": {"target": "count-svc", "share": 10, "cpu": 0.1},
                    "co_address": "10.14.0.30"})
    lease_id = grant["grant"]["hops"][0]["lease_id"]
    assert handle(role, ControlType.LEASE_RENEW, {"lease_id": lease_id})["ok"]
    assert handle(role, ControlType.LEASE_CANCEL, {"lease_id": lease_id})["ok"]
    assert handle(role, ControlType.SERVICE_DEREGISTER,
                  {"instance_id": "r20a/cnt-d1@2"})["ok"]
    assert registered(role) == []


@pytest.mark.parametrize("change", BAD_REGISTRATIONS,
                         ids=[json.dumps(c)[:50] for c in BAD_REGISTRATIONS])
def test_a_registration_with_a_bad_field_registers_nothing(change: dict) -> None:
    role = broker()
    with pytest.raises(BadRequest):
        handle(role, ControlType.SERVICE_REGISTER, {"instance": {**dist.duplicate_doc(), **change}})
    assert registered(role) == []


@pytest.mark.parametrize("ctype, body", [
    (ControlType.LEASE_REQUEST, {"request": {"target": "count-svc", "share": 10, "cpu": 0.1},
                                 "co_address": "::1"}),
    (ControlType.LEASE_REQUEST, {"request": {"target": "count-svc", "share": 10, "cpu": 0.1},
                                 "co_address": 5}),
    (ControlType.LEASE_REQUEST, {"request": {"target": "../x", "share": 10, "cpu": 0.1}}),
    (ControlType.LEASE_RENEW, {"lease_id": "../x"}),
    (ControlType.LEASE_RENEW, {}),
    (ControlType.LEASE_CANCEL, {"lease_id": "a b"}),
    (ControlType.LEASE_CANCEL, {"lease_id": 5}),
    (ControlType.SERVICE_DEREGISTER, {"instance_id": "a b"}),
    (ControlType.SERVICE_DEREGISTER, {}),
])
def test_a_lease_or_deregistration_with_a_bad_field_changes_nothing(ctype: ControlType,
                                                                     body: dict) -> None:
    role = broker()
    handle(role, ControlType.SERVICE_REGISTER, {"instance": dist.duplicate_doc()})
    before = (registered(role), role.broker.leases(), dict(role.broker.stats))
    with pytest.raises(BadRequest):
        handle(role, ctype, body)
    assert (registered(role), role.broker.leases(), dict(role.broker.stats)) == before


@pytest.mark.parametrize("row", [
    {"service": "count-svc", "lease_id": "../x", "until": 1.0},
    {"service": "count-svc", "lease_id": "", "until": 1.0},
    {"service": "../x", "lease_id": "ab12", "until": 1.0},
    {"service": "count-svc", "lease_id": "ab12", "until": -1},
])
def test_a_revocation_with_a_bad_field_is_refused(row: dict) -> None:
    good = {"service": "count-svc", "lease_id": "ab12", "until": 1.0}
    assert revocations_by_service({"revoked": [good]}) == {
        "count-svc": [{"lease_id": "ab12", "until": 1.0}]}
    with pytest.raises(BadRequest):
        revocations_by_service({"revoked": [good, row]})


# --- MIGRATE and STATE_TRANSFER ------------------------------------------------------------------

ROUTER = {"10.14.0.1"}


def migrate_start(**change: Any) -> dict[str, Any]:
    config = object_config(home_address="10.16.0.100", home_agent="10.16.0.2",
                           network_prefix="10.16.0.224/30")
    body = {"action": "start", "spec": "agent.objects.counter:Counter", "warm": True,
            "config": config, "resources": {"cpu": 1.0, "memory_mb": 256, "pids": 64},
            "state": {"count": 1}, "epoch": "5eed5eed5eed5eed", "deadline": 15.0}
    body.update(change)
    return body


def vm_start(**vm_change: Any) -> dict[str, Any]:
    body = migrate_start()
    vm = {"vm": "v1", "kind": "service", "service": "counter-svc", "objects": ["counter"],
          "mobile": {"counter": body["config"]}}
    vm.update(vm_change)
    return dict(body, vm=vm, spec=None, resources=None)


BAD_MIGRATES = [
    {"action": "steal"},
    {"action": "cancel", "name": "../x"},
    {"action": "cancel"},
    migrate_start(config=object_config(home_address="10.12.0.100", home_agent="10.16.0.2")),
    migrate_start(config=object_config(home_address="10.14.0.1", home_agent="10.14.0.2")),
    migrate_start(config=object_config(name="../../victim", home_address="10.16.0.100",
                                       home_agent="10.16.0.2", network_prefix="")),
    migrate_start(config="x"),
    migrate_start(spec="os:system;x"),
    migrate_start(spec=None),
    migrate_start(warm="yes"),
    migrate_start(resources={"cpu": -1}),
    migrate_start(resources={"memory_mb": 2 ** 40}),
    migrate_start(resources={"root": True}),
    vm_start(vm="../victim"),
    vm_start(objects=["counter", "logger"]),
    vm_start(mobile={"logger": migrate_start()["config"]}),
    vm_start(mobile={"counter": object_config(name="other", home_address="10.16.0.100",
                                              home_agent="10.16.0.2", network_prefix="")}),
    # The hand-over protocol (issue 13): every start and commit names its move's epoch.
    migrate_start(epoch=None),
    migrate_start(epoch="../x"),
    migrate_start(deadline=0),
    migrate_start(deadline=float("inf")),
    migrate_start(deadline=True),
    {"action": "commit", "name": "cam"},
    {"action": "commit", "name": "cam", "epoch": "a b"},
    {"action": "cancel", "name": "cam", "epoch": 7},
]


def test_good_migrate_and_state_transfer_bodies_pass() -> None:
    for body in (migrate_start(), vm_start(), {"action": "cancel", "name": "cam"},
                 {"action": "cancel", "name": "cam", "epoch": "e1"},
                 {"action": "commit", "name": "cam", "epoch": "e1"}):
        assert check_migrate(body, own=ROUTER) == body
    assert check_state_transfer({"name": "cam", "epoch": "e1", "state": {"count": 3}})["name"] == "cam"


@pytest.mark.parametrize("body", BAD_MIGRATES, ids=[json.dumps(b)[:70] for b in BAD_MIGRATES])
def test_a_migrate_with_a_bad_field_is_refused(body: dict) -> None:
    with pytest.raises(FieldError):
        check_migrate(body, own=ROUTER)


@pytest.mark.parametrize("body", [{"name": "../x", "epoch": "e1", "state": {}},
                                  {"name": "cam", "epoch": "e1"}, "x",
                                  {"name": None, "epoch": "e1", "state": 1},
                                  {"name": "cam", "state": {}}, {"name": "cam", "epoch": "", "state": {}}])
def test_a_state_transfer_with_a_bad_field_is_refused(body: Any) -> None:
    with pytest.raises(FieldError):
        check_state_transfer(body)
