"""The VM role's durable record of its VMs and the take-over from it (issue 13, item 3), with
fakes: no root, no processes, no network. Real: the record file, the manager's table, its
removal, the shaper's bookkeeping."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.core.config import Credential, ObjectConfig
from agent.hosting import runtime
from agent.hosting.runtime import ObjectProcessError
from agent.vm import recovery as recovery_mod
from agent.vm.machine import VirtualMachine
from agent.vm.manager import VmBaseline, VmManager
from agent.vm.recovery import checkpoint_vms, recover_vms
from agent.vm.shaping import _Installed
from agent.vm.vm_record import (VmRecord, VmRecordError, shaping_from_json, vm_from_json,
                                vm_to_json)

ROUTER = "r2"


def vm_of(name: str, **kw: Any) -> VirtualMachine:
    fields: dict[str, Any] = dict(
        name=name, kind="service", service="counter-svc", address="0.0.0.0", interface=None,
        port=5001, cpu=0.5, memory_mb=64, pids=16, egress_kbit=None, authorized=["/k/acme.pub"],
        policy={"max_transactions": 40}, version="1.0", installed=f"/s/installed/{name}",
        running_since=1_800_000_000.0, steps=[("initialised", 1_800_000_000.0)])
    fields.update(kw)
    return VirtualMachine(**fields)


def mobile_config(name: str) -> dict[str, Any]:
    cred = Credential(300, b"k" * 16)
    return ObjectConfig(name, "10.16.0.100", "10.16.0.2", f"{name}@home.moat", cred, cred).to_json()


class FakeProcess:
    """An object process as the record and the take-over see it."""

    def __init__(self, name: str, pid: int, relay_dir: Path | None = Path("/relays")) -> None:
        self.name, self.pid, self.relay_dir = name, pid, relay_dir
        self.sandbox = object()
        self.running = True
        self.started_with: Any = "not started"
        self.stopped = False
        self.state: Any = {"object": {"count": pid}}
        self.address = "10.16.0.100"

    def usage(self) -> dict[str, Any]:
        return {}

    def exit_info(self) -> None:
        return None

    def record(self) -> dict[str, Any]:
        if not self.running:
            raise ObjectProcessError(f"object {self.name} is not running")
        return {"name": self.name, "relay": {"object_pid": self.pid}}

    async def start(self, warm: bool = False, state: Any = None) -> None:
        self.started_with = state

    async def call(self, cmd: str, **_kw: Any) -> Any:
        assert cmd == "get_state"
        return self.state

    async def stop(self, kill: bool = False) -> Any:
        self.stopped, self.running = True, False
        return None


# --- the record -------------------------------------------------------------------------------


def test_a_vm_round_trips_through_the_record_with_its_objects_and_cap(tmp_path: Path) -> None:
    vm = vm_of("m1", mobile={"counter": mobile_config("svc1")}, at_home=["part"],
               moved={"logger": "r3"}, leased=True, share=50.0, shaper_key=3, egress_kbit=800)
    vm.objects = {"counter": FakeProcess("svc1", 41), "logger": FakeProcess("logger", 42),
                  "dies": FakeProcess("dies", 43, relay_dir=None)}  # no relay: not recorded
    cap = [_Installed(4, 0x77, True, "800kbit", [(0x103, ["0x0a100064/0xffffffff+12"])])]
    record = VmRecord(tmp_path / "r2-hosted")
    record.keep(vm, cap, {"counter": {"object": {"count": 7}}})
    assert stat.S_IMODE(os.stat(record.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(record.directory).st_mode) == 0o700

    again = VmRecord(tmp_path / "r2-hosted")
    entry = again.load()["m1"]
    back = vm_from_json(entry["vm"])
    assert vm_to_json(back) == vm_to_json(vm) and back.objects == {}
    assert back.steps == vm.steps and isinstance(back.steps[0], tuple)
    assert set(entry["objects"]) == {"counter", "logger"}
    assert entry["objects"]["counter"]["process"]["relay"]["object_pid"] == 41
    assert entry["objects"]["counter"]["checkpoint"] == {"object": {"count": 7}}
    assert entry["objects"]["logger"]["checkpoint"] is None
    assert shaping_from_json(entry["shaping"]) == cap

    # A later keep without states carries the object's checkpoint over.
    again.keep(vm, cap)
    entry = VmRecord(tmp_path / "r2-hosted").load()["m1"]
    assert entry["objects"]["counter"]["checkpoint"] == {"object": {"count": 7}}
    # Objects stopped for an upgrade (not running, still the VM's) stay recorded as they
    # were, to restart from their checkpoints should the agent crash before they start again.
    vm.moved = {}
    vm.objects = {}
    again.keep(vm, cap)
    assert VmRecord(tmp_path / "r2-hosted").load()["m1"]["objects"] == entry["objects"]
    # An object that left is not in it any more: a part now run elsewhere, a mobile object
    # that migrated (gone from the VM's mobile objects).
    vm.moved = {"logger": "r3"}
    again.keep(vm, cap)
    assert set(VmRecord(tmp_path / "r2-hosted").load()["m1"]["objects"]) == {"counter"}
    vm.mobile = {}
    again.keep(vm, cap)
    assert VmRecord(tmp_path / "r2-hosted").load()["m1"]["objects"] == {}
    vm.mobile = {"counter": mobile_config("svc1")}
    vm.objects = {"counter": FakeProcess("svc1", 41)}
    again.keep(vm, cap, {"counter": {"object": {"count": 7}}})
    assert again.checkpoint("m1", "counter", {"object": {"count": 9}}) is True
    assert again.checkpoint("m1", "logger", {"object": {"count": 1}}) is False
    again.save()
    assert VmRecord(tmp_path / "r2-hosted").load()["m1"]["objects"]["counter"]["checkpoint"] == \
        {"object": {"count": 9}}


def test_an_absent_record_is_empty_and_no_error(tmp_path: Path) -> None:
    record = VmRecord(tmp_path / "r2-hosted")
    assert record.load() == {} and record.load_error is None


@pytest.mark.parametrize("text", ['{"version": 1, "vms": {"m1": {"vm"', "", "[]",
                                  '{"version": 1, "objects": {}}', '{"version": 1, "vms": {"m1": 2}}'])
def test_a_corrupt_record_is_reported_kept_aside_and_yields_nothing(tmp_path: Path, text: str) -> None:
    record = VmRecord(tmp_path / "r2-hosted")
    record.keep(vm_of("m1"), [])
    record.path.write_text(text)
    again = VmRecord(tmp_path / "r2-hosted")
    assert again.load() == {}
    assert again.load_error and "VM record" in again.load_error and "kept as vms.json.bad-" in again.load_error
    names = [p.name for p in again.directory.iterdir()]
    assert "vms.json" not in names and any(n.startswith("vms.json.bad-") for n in names)


@pytest.mark.parametrize("change", [{"surprise": 1}, {"port": "5001"}, {"leased": 1},
                                    {"steps": [["x"]]}, {"mobile": {"o": 3}}, {"name": None}])
def test_an_entry_that_is_not_a_vm_is_refused(change: dict[str, Any]) -> None:
    doc = dict(vm_to_json(vm_of("m1")), **change)
    with pytest.raises(VmRecordError):
        vm_from_json(doc)
    missing = vm_to_json(vm_of("m1"))
    del missing["service"]
    with pytest.raises(VmRecordError, match="missing"):
        vm_from_json(missing)


# --- the manager keeps it and removes it ------------------------------------------------------


def manager_in(tmp_path: Path, host: Any = None) -> VmManager:
    baseline = VmBaseline(authorized_keys=[], storage=str(tmp_path / "storage"))
    manager = VmManager(baseline, ROUTER, "run1", {"eth1": "10.0.2.2"}, cgroups=object(), host=host)
    manager.relay_dir = tmp_path / "r2-hosted"
    manager.record = VmRecord(manager.relay_dir)
    return manager


def test_an_event_keeps_the_vm_and_its_removal_removes_it(tmp_path: Path) -> None:
    manager = manager_in(tmp_path)
    vm = vm_of("m1", installed=str(tmp_path / "storage" / "installed" / "m1"))
    vm.objects = {"counter": FakeProcess("counter", 41)}
    manager.vms["m1"] = vm
    manager.changed(vm)
    assert set(VmRecord(manager.relay_dir).load()) == {"m1"}
    asyncio.run(manager.remove("m1"))
    assert vm.objects["counter"].stopped
    assert VmRecord(manager.relay_dir).load() == {}


# --- the take-over at start -------------------------------------------------------------------


class FakeHost:
    def __init__(self) -> None:
        self.adopted: list[tuple[str, int, bool, Any]] = []
        self.hosted: dict[str, Any] = {}
        self.stopped: list[str] = []

    async def adopt_object(self, config: ObjectConfig, process: Any, *, register: bool,
                           vm: Any = None) -> Any:
        self.adopted.append((config.name, process.pid, register, vm))
        self.hosted[config.name] = process

    async def host_object(self, config: ObjectConfig, process: Any, *, warm: bool, state: Any,
                          vm: Any, register: bool = True) -> dict:
        await process.start(warm=warm, state=state)
        self.hosted[config.name] = process
        return {}

    async def cmd_object_stop(self, name: str, deregister: bool = True) -> dict:
        self.stopped.append(name)
        self.hosted.pop(name, None)
        return {}

    def hosted_process(self, name: str) -> Any:
        return self.hosted.get(name)


@pytest.fixture
def takeover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    alive = {"svc1": 41, "plain": 42}  # object name -> the pid still there
    discarded: list[str] = []

    async def adopt(record: dict[str, Any], **_kw: Any) -> FakeProcess:
        if alive.get(record["name"]) != record["relay"]["object_pid"]:
            raise ObjectProcessError(f"object {record['name']} cannot be taken over: gone")
        return FakeProcess(record["name"], record["relay"]["object_pid"])

    def from_record(record: dict[str, Any], **_kw: Any) -> FakeProcess:
        process = FakeProcess(record["name"], 99)
        process.running = True
        return process

    async def discard(record: dict[str, Any], **_kw: Any) -> None:
        discarded.append(record["name"])

    monkeypatch.setattr(runtime.ObjectProcess, "adopt", staticmethod(adopt))
    monkeypatch.setattr(runtime.ObjectProcess, "from_record", staticmethod(from_record))
    monkeypatch.setattr(recovery_mod, "discard_leftovers", discard)
    host = FakeHost()
    return {"host": host, "manager": manager_in(tmp_path, host), "discarded": discarded}


def write_record(manager: VmManager, entries: dict[str, Any]) -> None:
    manager.record.entries = entries
    manager.record.save()


def entry_of(vm: VirtualMachine, objects: dict[str, tuple[int, Any]], shaping: list | None = None) -> dict:
    return {"vm": vm_to_json(vm), "shaping": shaping or [],
            "objects": {o: {"process": {"name": n, "relay": {"object_pid": pid}}, "checkpoint": cp}
                        for o, (pid, cp) in objects.items() for n in [vm.mobile.get(o, {}).get("name", o)]}}


def test_start_rebuilds_the_table_adopts_live_objects_and_restarts_dead_ones(
        takeover: dict[str, Any], tmp_path: Path) -> None:
    manager, host = takeover["manager"], takeover["host"]
    cap = [{"index": 4, "major": 0x77, "ours": True, "rate": "800kbit",
            "filters": [[0x103, ["0x0a100064/0xffffffff+12"]]]}]
    m1 = vm_of("m1", mobile={"counter": mobile_config("svc1")}, shaper_key=3, egress_kbit=800,
               installed=str(tmp_path / "storage" / "versions" / "m1" / "2"))
    m2 = vm_of("m2")
    m3 = vm_of("m3")  # its one object died and left no checkpoint: nothing to run
    m4 = vm_of("m4", running_since=None)  # the crash cut its provisioning
    m5 = vm_of("m5", running_since=None, shaper_key=5, egress_kbit=800)  # ... before any object
    write_record(manager, {
        "m1": entry_of(m1, {"counter": (41, {"object": {"count": 3}})}, cap),
        "m2": entry_of(m2, {"plain": (42, None), "dead": (50, {"object": {"count": 5}})}),
        "m3": entry_of(m3, {"gone": (51, None)}),
        "m4": entry_of(m4, {"half": (52, {"object": {"count": 1}})}),
        "m5": entry_of(m5, {}, cap),
        "bad": {"vm": {"name": "bad"}, "objects": {}},
    })
    manager.record.load()
    events: list[tuple[str, str]] = []
    manager.listeners.append(lambda event, vm: events.append((event, vm.name)))
    uncapped: list[tuple[int, Any]] = []

    async def uncap(key: int) -> None:
        uncapped.append((key, manager.shaper.caps.pop(key, None)))

    manager.shaper.uncap = uncap  # type: ignore[method-assign]

    report = asyncio.run(recover_vms(manager, host))

    assert report == {"adopted": ["m1/counter", "m2/plain"], "restarted": ["m2/dead", "m4/half"],
                      "lost": ["m3/gone", "bad"], "removed": ["m3", "m4", "m5"]}
    assert uncapped == [(5, shaping_from_json(cap))], "the cut VM's cap, exactly as it was added"
    assert set(manager.vms) == {"m1", "m2"}
    assert manager.vms["m1"].objects["counter"].pid == 41, "the same process, running all along"
    assert host.adopted == [("svc1", 41, True, ("m1", "counter"))], "it registers again"
    assert manager.vms["m2"].objects["plain"].started_with == "not started"
    assert manager.vms["m2"].objects["dead"].started_with == {"object": {"count": 5}}
    assert sorted(takeover["discarded"]) == ["dead", "gone", "half"]
    # The egress cap as the shaper added it (removing the VM removes exactly that), and the
    # numbering of caps and upgrades goes on after the recorded ones.
    assert manager.shaper.caps[3] == shaping_from_json(cap)
    assert manager._next_key == 5 and manager._upgrades == 2
    # The listeners (broker registration) learn the VMs again, and the removed ones' going.
    assert ("started", "m1") in events and ("started", "m2") in events
    assert ("removed", "m4") in events and ("removed", "m3") in events
    on_disk = VmRecord(manager.relay_dir).load()
    assert set(on_disk) == {"m1", "m2"}
    assert on_disk["m2"]["objects"]["dead"]["process"]["relay"]["object_pid"] == 99
    assert on_disk["m2"]["objects"]["dead"]["checkpoint"] == {"object": {"count": 5}}


def test_checkpoints_of_running_vm_objects_are_written(takeover: dict[str, Any]) -> None:
    manager = takeover["manager"]
    vm = vm_of("m2")
    write_record(manager, {"m2": entry_of(vm, {"plain": (42, None)})})
    manager.record.load()

    async def main() -> None:
        await recover_vms(manager, takeover["host"])
        process = manager.vms["m2"].objects["plain"]
        process.state = {"object": {"count": 12}}
        assert await checkpoint_vms(manager) == 1
        process.running = False
        assert await checkpoint_vms(manager) == 0

    asyncio.run(main())
    entry = json.loads(manager.record.path.read_text())["vms"]["m2"]
    assert entry["objects"]["plain"]["checkpoint"] == {"object": {"count": 12}}
    assert entry["objects"]["plain"]["checkpoint_at"] is not None


# --- the role: an unreadable record does not stop the agent -----------------------------------


def test_an_unreadable_record_is_reported_and_the_role_serves_on(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from agent.vm.role import VmRole

    hosted = tmp_path / "r2-hosted"
    hosted.mkdir(mode=0o700)
    (hosted / "vms.json").write_text('{"version": 1, "vms": {"m1": {"vm": ')  # torn
    hosting = SimpleNamespace(cgroups=object(), hosted_dir=hosted)
    config = SimpleNamespace(name=ROUTER, run_id="run1", router_key=None, interfaces=[],
                             vm={"authorized_keys": [], "storage": str(tmp_path / "storage")})
    agent = SimpleNamespace(config=config, require=lambda _cls: hosting)
    role = VmRole(agent)

    async def main() -> None:
        await role.start()
        assert role.status()["recovered_vms"] is None  # not taken over yet
        await role.recover()

    asyncio.run(main())
    status = role.status()
    assert "VM record" in status["vm_record_error"] and "not usable" in status["vm_record_error"]
    assert status["recovered_vms"] == {"adopted": [], "restarted": [], "lost": [], "removed": []}
    assert role.cmd_vm() == []
    assert any(p.name.startswith("vms.json.bad-") for p in hosted.iterdir()), "kept for a person"
