"""A restarted agent rebuilds its VM table from the record and takes the VMs' objects over.

The VM role's half of issue 13 item 3 (the hosting role does the same for placed objects):
the record (:mod:`agent.vm.vm_record`) says what each VM was configured with and how to find
each of its objects again. :func:`recover_vms` puts each VM back in the manager's table with
its egress cap as the shaper added it, then for each object
(:func:`agent.hosting.takeover.take_over`): processes still there are adopted (same pid, state
exact), processes that died meanwhile are restarted from their last checkpoint; a mobile
object is hosted again with its registration client, which re-registers with its home agent.
A VM whose provisioning the crash interrupted, or left with no object, is removed as a
refused provisioning would be (address, cap, files). Then every VM is announced to the
listeners (the broker registration, the distribution role) as started, since they forgot
it with the old agent. One VM's or object's failure never stops the others or the agent.

:func:`checkpoint_vms` keeps every VM object's state in the record every few seconds: what an
object whose processes die while no agent watches restarts from.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.hosting.hosted_registry import RegistryError
from agent.hosting.takeover import discard_leftovers, take_over
from agent.vm.vm_record import VmRecordError, shaping_from_json, vm_from_json

log = logging.getLogger(__name__)


def empty_report() -> dict[str, list[str]]:
    """What a recovery found: objects (``vm/object``) adopted, restarted, lost; VMs removed."""
    return {"adopted": [], "restarted": [], "lost": [], "removed": []}


async def recover_vms(manager: Any, host: Any) -> dict[str, list[str]]:
    """Rebuild ``manager``'s VMs from ``manager.record`` (loaded) and take their objects over,
    hosting the mobile ones on ``host`` (the hosting role); returns the report."""
    report = empty_report()
    record = manager.record
    if record is None:
        return report
    started = []
    for name, entry in list(record.entries.items()):
        if name in manager.vms:
            log.warning("VM %s was provisioned again before its record was read: the record's "
                        "is not taken over", name)
            continue
        try:
            vm = _restore_vm(manager, name, entry)
        except VmRecordError as exc:
            log.error("VM %s not recovered: %s", name, exc)
            report["lost"].append(name)
            record.entries.pop(name, None)
            continue
        objects = entry.get("objects")
        for obj, obj_entry in (objects.items() if isinstance(objects, dict) else []):
            try:
                adopted = await _recover_object(manager, host, vm, str(obj), obj_entry)
            except Exception as exc:  # noqa: BLE001 - the VM's other objects still come back
                log.error("object %s of VM %s not recovered: %s", obj, name, exc)
                report["lost"].append(f"{name}/{obj}")
                continue
            report["adopted" if adopted else "restarted"].append(f"{name}/{obj}")
        if vm.running_since is None or not vm.objects:
            why = "its provisioning was cut by the crash" if vm.running_since is None \
                else "none of its objects came back"
            log.warning("VM %s removed: %s", name, why)
            await manager.remove(name)
            report["removed"].append(name)
            continue
        vm.steps.append(("taken over by a restarted agent", time.time()))
        started.append(vm)
    for vm in started:
        manager.changed(vm)  # kept in the record, and the listeners learn it again
    try:
        record.save()
    except RegistryError as exc:
        log.error("%s", exc)
    return report


def _restore_vm(manager: Any, name: str, entry: dict[str, Any]) -> Any:
    """The VM of ``entry`` in the manager's table, its cap and numbering as before."""
    vm = vm_from_json(entry.get("vm"))
    if vm.name != name:
        raise VmRecordError(f"record entry {name} holds VM {vm.name}")
    shaping = shaping_from_json(entry.get("shaping") or [])
    manager.vms[name] = vm
    if vm.shaper_key is not None:
        # Its classes and filters are still in the kernel: removing it removes exactly them.
        manager.shaper.caps[vm.shaper_key] = shaping
        manager._next_key = max(manager._next_key, vm.shaper_key)
    installed = Path(vm.installed) if vm.installed else None
    if installed is not None and installed.parent.parent.name == "versions" and installed.name.isdigit():
        # Upgrades install into versions/<vm>/<n>: the next one must not reuse this one's.
        manager._upgrades = max(manager._upgrades, int(installed.name))
    return vm


async def _recover_object(manager: Any, host: Any, vm: Any, obj: str, entry: Any) -> bool:
    """Take object ``obj`` of ``vm`` over (True) or restart it from its checkpoint (False)."""
    from agent.core.config import ObjectConfig

    if not isinstance(entry, dict) or not isinstance(entry.get("process"), dict):
        raise VmRecordError("no process record")
    objects_dir = Path(manager.baseline.storage) / "objects"
    relay_dir = manager.relay_dir
    found = await take_over(
        entry["process"], entry.get("checkpoint"), objects_dir=objects_dir,
        cgroups=manager._cgroups, relay_dir=relay_dir,
        discard=functools.partial(discard_leftovers, cgroups=manager._cgroups,
                                  relay_dir=relay_dir, objects_dir=objects_dir))
    process = found.process
    try:
        mobile = vm.mobile.get(obj)
        config = ObjectConfig.from_json(mobile) if mobile else None
        register = obj not in vm.at_home
        if found.adopted:
            if config is not None:
                await host.adopt_object(config, process, register=register, vm=(vm.name, obj))
        elif config is not None:
            await host.host_object(config, process, warm=False, state=found.checkpoint,
                                   vm=(vm.name, obj), register=register)
        else:
            await process.start(state=found.checkpoint)
    except BaseException:
        await process.stop()  # never left running unknown to the VM
        raise
    vm.objects[obj] = process
    if found.adopted:
        log.info("object %s of VM %s taken over (pid %s)", obj, vm.name, process.pid)
    else:
        log.warning("object %s of VM %s restarted from its checkpoint of %s", obj, vm.name,
                    time.ctime(entry.get("checkpoint_at") or 0))
    return found.adopted


async def checkpoint_vms(manager: Any) -> int:
    """Every running VM object's checkpoint into the record (one write); how many."""
    record = manager.record
    if record is None:
        return 0
    kept = 0
    for vm in list(manager.vms.values()):
        for obj, process in list(vm.objects.items()):
            if not getattr(process, "running", False):
                continue
            try:
                state = await process.call("get_state")
            except AgentError as exc:
                log.debug("object %s of VM %s: no checkpoint now: %s", obj, vm.name, exc)
                continue
            # Not stopped, replaced or removed meanwhile.
            if manager.vms.get(vm.name) is vm and vm.objects.get(obj) is process \
                    and record.checkpoint(vm.name, obj, state):
                kept += 1
    if kept:
        try:
            record.save()
        except RegistryError as exc:
            log.error("%s", exc)
    return kept
