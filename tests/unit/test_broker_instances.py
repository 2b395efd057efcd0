"""The instances' side of the broker (no root, no network): the instance document built from
a VM, registration and deregistration driven by the VM manager's events (retried while the
broker is unreachable), LEASE_REVOKE passed on to the service's object processes, the VM
manager's broker terms and listeners, and the manifest's consumes/produces."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.broker import instances as mod
from agent.broker.directory import Instance
from agent.broker.errors import BadRequest
from agent.broker.instances import (InstanceError, ServiceInstancesRole, instance_doc,
                                    revocations_by_service)
from agent.core.config import AgentConfig, BrokerConfig, Interface
from agent.core.msgauth import sign_hmac
from agent.core.peer import PeerError
from agent.vm.errors import ManifestError, ProvisionError
from agent.vm.manager import VirtualMachine, VmBaseline, VmManager
from agent.vm.manifest import Manifest, ObjectEntry
from agent.vm.role import VmRole
from packets import ControlMessage, ControlType

ROUTER_KEY = bytes(range(32))
SHA = "0" * 64


# --- fakes --------------------------------------------------------------------------------


class FakeProcess:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.revoked: list[list[dict]] = []

    async def revoke(self, revoked: list[dict], timeout: float = 5.0) -> int:
        if self.fail:
            raise asyncio.TimeoutError()
        self.revoked.append(revoked)
        return len(revoked)


@dataclass
class FakeVm:
    name: str = "vm1"
    service: str = "text2html"
    kind: str = "service"
    address: str = "0.0.0.0"
    port: int = 5101
    cpu: float = 0.5
    share: float = 40.0
    leased: bool = True
    installed: str = ""
    policy: dict = field(default_factory=dict)
    running_since: float | None = None
    objects: dict = field(default_factory=dict)
    mobile: dict = field(default_factory=dict)


class FakeManager:
    router = "r22a"

    def __init__(self) -> None:
        self.vms: dict[str, Any] = {}
        self.listeners: list = []

    def instance_id(self, vm: Any) -> str:
        return f"{self.router}/{vm.name}"


class FakeVmRole:
    def __init__(self, manager: FakeManager) -> None:
        self.manager = manager


class FakeAgent:
    def __init__(self, manager: FakeManager) -> None:
        self.config = AgentConfig(name="r22a", run_dir="/nonexistent", roles=[],
                                  interfaces=[Interface("r22a-eth0", "10.16.0.2", 24)],
                                  router_key=ROUTER_KEY.hex(),
                                  broker=BrokerConfig(address="10.16.0.3"))
        self.loop: asyncio.AbstractEventLoop | None = None
        self._vm_role = FakeVmRole(manager)

    def role(self, cls: type) -> Any:
        return self._vm_role if cls is VmRole else None


class FakeBroker:
    """peer_call's stand-in: records what the broker is told; ``down`` makes it unreachable."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ControlType, dict]] = []
        self.down = False
        self.directory: dict[str, dict] = {}

    async def __call__(self, address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        assert kw["key"] == ROUTER_KEY and kw["timeout"] <= 5
        if self.down:
            raise PeerError(f"target {address} unreachable")
        self.calls.append((address, ctype, body))
        if ctype == ControlType.SERVICE_REGISTER:
            doc = body["instance"]
            Instance.from_dict(doc, time.monotonic())  # what the real broker would accept
            self.directory[doc["instance_id"]] = doc
        else:
            self.directory.pop(body["instance_id"], None)
        return {"ok": True}


@pytest.fixture
def broker(monkeypatch) -> FakeBroker:
    fake = FakeBroker()
    monkeypatch.setattr(mod, "peer_call", fake)
    return fake


def installed_with_formats(tmp_path: Path, consumes: str = "text", produces: str = "html") -> str:
    manifest = Manifest("text2html", "1.0", "acme",
                        (ObjectEntry("text2html", "1.0", "text2html-1.0.tar.gz", SHA, "m:C"),),
                        consumes, produces)
    (tmp_path / "manifest.json").write_bytes(manifest.to_bytes())
    return str(tmp_path)


# --- the instance document ----------------------------------------------------------------


def test_instance_doc_of_a_virtual_service(tmp_path: Path) -> None:
    now = time.time()
    vm = FakeVm(installed=installed_with_formats(tmp_path), running_since=now - 12.5,
                policy={"max_duration_s": 120}, objects={"text2html": FakeProcess("text2html")})
    doc = instance_doc(vm, "r22a", "r22a/vm1", "10.16.0.2", now)
    assert doc == {"service": "text2html", "instance_id": "r22a/vm1", "address": "10.16.0.2",
                   "port": 5101, "router": "r22a", "share": 40.0, "cpu": 0.5,
                   "objects": ["text2html"], "consumes": "text", "produces": "html",
                   "lifecycle": {"max_duration_s": 120.0, "uptime_s": 12.5},
                   "part": "primary", "router_address": "", "network": "",  # not mobile
                   "gateway": False, "object_addresses": {}}
    inst = Instance.from_dict(doc, 1000.0)
    assert inst.lifecycle.remaining(1000.0) == pytest.approx(107.5)
    json.dumps(doc)


def test_instance_doc_addresses_and_names() -> None:
    now = time.time()
    iface = FakeVm(kind="interface", address="10.16.0.201", objects={"counter": None})
    assert instance_doc(iface, "r22a", "r22a/vm1", "10.16.0.2", now)["address"] == "10.16.0.201"
    mobile = FakeVm(objects={"counter": None},
                    mobile={"counter": {"name": "mo1", "home_address": "10.12.0.100"}})
    doc = instance_doc(mobile, "r22a", "r22a/vm1", "10.16.0.2", now)
    assert doc["address"] == "10.12.0.100" and doc["objects"] == ["mo1"]
    assert doc["consumes"] == doc["produces"] == ""  # no installed manifest: a plain service
    assert doc["lifecycle"] == {"max_duration_s": None, "uptime_s": 0.0}


def test_a_vm_the_broker_would_refuse_is_refused_here() -> None:
    with pytest.raises(InstanceError):
        instance_doc(FakeVm(objects={"bad name": None}), "r22a", "r22a/vm1", "10.16.0.2", time.time())


# --- registration driven by the VM manager's events ---------------------------------------


async def _started_role() -> tuple[ServiceInstancesRole, FakeManager]:
    manager = FakeManager()
    agent = FakeAgent(manager)
    agent.loop = asyncio.get_running_loop()
    role = ServiceInstancesRole(agent)
    await role.start()
    assert manager.listeners == [role.on_vm_event]
    return role, manager


async def _settle(role: ServiceInstancesRole) -> None:
    if role._task is not None:
        await role._task


def test_started_registers_and_removed_deregisters(broker: FakeBroker) -> None:
    async def scenario() -> None:
        role, manager = await _started_role()
        vm = FakeVm(running_since=time.time(), objects={"text2html": FakeProcess("text2html")})
        manager.vms[vm.name] = vm
        role.on_vm_event("started", vm)
        await _settle(role)
        assert list(broker.directory) == ["r22a/vm1"] and not role.pending
        assert broker.calls[0][0] == "10.16.0.3"
        assert broker.directory["r22a/vm1"]["share"] == 40.0
        role.on_vm_event("removed", manager.vms.pop(vm.name))
        await _settle(role)
        assert broker.directory == {} and role.registered == {}
        assert broker.calls[-1][1:] == (ControlType.SERVICE_DEREGISTER, {"instance_id": "r22a/vm1"})
        await role.stop()
        assert manager.listeners == []

    asyncio.run(scenario())


def test_a_duplicate_is_offered_to_the_broker_only_once_it_is_ready(broker: FakeBroker) -> None:
    """A duplicate or secondary VM starts (``started``) before it has registered with its
    home agent; the broker hears of it only when the distribution role says it is ready."""
    async def scenario() -> None:
        role, manager = await _started_role()
        vm = FakeVm(running_since=time.time())
        vm.ready = False  # type: ignore[attr-defined]
        manager.vms[vm.name] = vm
        role.on_vm_event("started", vm)
        await _settle(role)
        assert broker.directory == {} and not role.pending
        vm.ready = True  # type: ignore[attr-defined]
        role.on_vm_event("started", vm)
        await _settle(role)
        assert list(broker.directory) == ["r22a/vm1"]
        await role.stop()

    asyncio.run(scenario())


def test_an_unreachable_broker_is_retried_at_housekeeping(broker: FakeBroker) -> None:
    async def scenario() -> None:
        role, manager = await _started_role()
        broker.down = True
        vm = FakeVm(running_since=time.time())
        role.on_vm_event("started", vm)
        await _settle(role)
        assert role.pending and role.stats["failures"] == 1 and "unreachable" in role.last_error
        role.housekeeping()  # too early: waits RETRY_S
        await _settle(role)
        assert role.stats["failures"] == 1
        broker.down = False
        role._next_try = 0.0
        role.housekeeping()
        await _settle(role)
        assert list(broker.directory) == ["r22a/vm1"] and not role.pending
        assert role.cmd_instances()["registered"] == {"r22a/vm1": "text2html"}

    asyncio.run(scenario())


def test_a_vm_removed_before_the_broker_heard_of_it_is_never_sent(broker: FakeBroker) -> None:
    async def scenario() -> None:
        role, _manager = await _started_role()
        vm = FakeVm()
        role.on_vm_event("removed", vm)  # a provisioning that failed: never started
        await _settle(role)
        assert broker.calls == [] and not role.pending

    asyncio.run(scenario())


def test_stop_deregisters_what_the_broker_knows(broker: FakeBroker) -> None:
    async def scenario() -> None:
        role, _manager = await _started_role()
        role.on_vm_event("started", FakeVm(running_since=time.time()))
        await _settle(role)
        await role.stop()
        assert broker.directory == {}

    asyncio.run(scenario())


# --- LEASE_REVOKE -------------------------------------------------------------------------


def test_lease_revoke_goes_to_every_object_of_that_service(broker: FakeBroker) -> None:
    async def scenario() -> None:
        role, manager = await _started_role()
        a, b, other, stuck = (FakeProcess("a"), FakeProcess("b"), FakeProcess("c"),
                              FakeProcess("d", fail=True))
        manager.vms = {"vm1": FakeVm("vm1", objects={"a": a, "b": b}),
                       "vm2": FakeVm("vm2", service="html2rtf", objects={"c": other}),
                       "vm3": FakeVm("vm3", objects={"d": stuck}),
                       "vm4": FakeVm("vm4", leased=False, objects={"e": FakeProcess("e")})}
        until = time.time() + 30
        body = {"revoked": [{"lease_id": "L1", "until": until, "service": "text2html"}]}
        signed = sign_hmac(ControlType.LEASE_REVOKE, 7, body, ROUTER_KEY, to="10.16.0.2")
        msg = ControlMessage(ControlType.LEASE_REVOKE, 7, signed)
        inband = role.in_band()[ControlType.LEASE_REVOKE]
        answer = await inband.handler(msg, inband.authenticate(msg))
        assert answer == {"ok": True, "forwarded": 2}
        assert a.revoked == b.revoked == [[{"lease_id": "L1", "until": until}]]
        assert other.revoked == [] and role.stats["forward_failures"] == 1
        # an object of the service that starts later is told too
        late = FakeProcess("late")
        role.on_vm_event("started", FakeVm("vm5", objects={"late": late}))
        await asyncio.gather(*role._tasks)
        assert late.revoked == [[{"lease_id": "L1", "until": until}]]

    asyncio.run(scenario())


def test_lease_revoke_needs_the_router_key(broker: FakeBroker) -> None:
    from agent.core.errors import ControlError

    async def scenario() -> None:
        role, _ = await _started_role()
        body = {"revoked": [{"lease_id": "L1", "until": 1.0, "service": "text2html"}]}
        signed = sign_hmac(ControlType.LEASE_REVOKE, 7, body, bytes(32), to="10.16.0.2")
        with pytest.raises(ControlError):
            role.in_band()[ControlType.LEASE_REVOKE].authenticate(
                ControlMessage(ControlType.LEASE_REVOKE, 7, signed))
        other = sign_hmac(ControlType.LEASE_REVOKE, 8, body, ROUTER_KEY, to="10.16.0.9")
        with pytest.raises(ControlError, match="not for this receiver"):  # another router's
            role.in_band()[ControlType.LEASE_REVOKE].authenticate(
                ControlMessage(ControlType.LEASE_REVOKE, 8, other))

    asyncio.run(scenario())


@pytest.mark.parametrize("body", [
    {},
    {"revoked": []},
    {"revoked": "L1"},
    {"revoked": [{"lease_id": "L1", "until": 1.0}]},
    {"revoked": [{"lease_id": "L1", "until": "x", "service": "s"}]},
    {"revoked": [{"lease_id": "L1", "until": 1.0, "service": "bad name"}]},
    {"revoked": [{"lease_id": "L1", "until": 1.0, "service": "s"}], "more": 1},
    {"revoked": [{"lease_id": "L", "until": 1.0, "service": "s"}] * (mod.MAX_REVOKED + 1)},
])
def test_malformed_lease_revokes_are_refused(body: dict) -> None:
    with pytest.raises(BadRequest):
        revocations_by_service(body)


# --- the VM manager's broker terms and listeners ------------------------------------------


def manager(service_key: Any = None) -> VmManager:
    return VmManager(VmBaseline(authorized_keys=[], storage="/nonexistent"), "r22a", None,
                     {"r22a-eth0": "10.16.0.2"}, service_key=service_key)


@pytest.mark.parametrize("terms, error", [
    ({"leased": "true"}, "leased must be true or false"),
    ({"leased": 1}, "leased must be true or false"),
    ({"share": 0}, "share must be a number"),
    ({"share": 101}, "share must be a number"),
    ({"share": True}, "share must be a number"),
    ({"leased": True}, "no router key"),
])
def test_broker_terms_of_provision_are_checked(terms: dict, error: str) -> None:
    with pytest.raises(ProvisionError, match=error):
        manager()._configure({"vm": "v", "kind": "service", "service": "s", **terms})


def test_broker_terms_default_to_an_open_whole_service_and_travel_with_a_move() -> None:
    vm = manager()._configure({"vm": "v", "kind": "service", "service": "s"})
    assert (vm.leased, vm.share) == (False, 100.0)
    assert "leased" not in vm.provision_body() and "share" not in vm.provision_body()
    leased = manager(lambda s: b"k" * 32)._configure(
        {"vm": "v", "kind": "service", "service": "s", "leased": True, "share": 25})
    assert (leased.leased, leased.share) == (True, 25.0)
    assert leased.provision_body()["leased"] is True and leased.provision_body()["share"] == 25.0


def test_listeners_hear_a_removal_and_their_failures_are_theirs() -> None:
    m = manager()
    heard: list[tuple[str, str]] = []

    def broken(event: str, vm: VirtualMachine) -> None:
        raise RuntimeError("listener bug")

    m.listeners += [broken, lambda event, vm: heard.append((event, m.instance_id(vm)))]
    m.vms["v"] = m._configure({"vm": "v", "kind": "service", "service": "s"})
    assert asyncio.run(m.remove("v")) is not None
    assert [event for event, _ in heard] == ["removed"] and heard[0][1].startswith("r22a/v@")


def test_a_vm_provisioned_again_under_its_name_is_another_instance() -> None:
    """Credentials name the instance: one issued for a removed VM must not be honoured by
    the next VM of the same name on the same router."""
    m = manager()
    first = m.instance_id(m._configure({"vm": "v", "kind": "service", "service": "s"}))
    again = m.instance_id(m._configure({"vm": "v", "kind": "service", "service": "s"}))
    assert first.startswith("r22a/v@") and again.startswith("r22a/v@") and first != again


# --- manifest formats ---------------------------------------------------------------------


def _manifest(**formats: Any) -> Manifest:
    return Manifest("text2html", "1.0", "acme",
                    (ObjectEntry("text2html", "1.0", "text2html-1.0.tar.gz", SHA, "m:C"),), **formats)


def test_manifest_formats_round_trip_and_absent_ones_keep_the_bytes() -> None:
    with_formats = _manifest(consumes="text", produces="html")
    again = Manifest.from_bytes(with_formats.to_bytes())
    assert (again.consumes, again.produces) == ("text", "html")
    plain = _manifest()
    assert b"consumes" not in plain.to_bytes()
    assert Manifest.from_bytes(plain.to_bytes()) == plain


@pytest.mark.parametrize("formats", [
    {"consumes": "text"},
    {"produces": "html"},
    {"consumes": "text", "produces": "text"},
    {"consumes": "te xt", "produces": "html"},
    {"consumes": 3, "produces": "html"},
    {"consumes": "text", "produces": "h" * 65},
])
def test_bad_manifest_formats_are_refused(formats: dict) -> None:
    with pytest.raises(ManifestError):
        _manifest(**formats)
    doc = json.loads(_manifest().to_bytes())
    doc.update(formats)
    with pytest.raises(ManifestError):
        Manifest.from_bytes(json.dumps(doc).encode())
