"""The VM role's durable record of its VMs, so that a restarted agent rebuilds its VM table.

A VM's objects outlive a crash of the agent like placed objects do (their relays hold their
channels, :mod:`agent.hosting.sandbox`); the VM table around them (what PROVISION configured,
the installed version, the egress cap, which object is mobile and how it registers) must
too. It is written here, beside the hosted-object registry in the router's root-only
directory (``<run>/<router>-hosted/vms.json``, 0600, atomic writes: the same
:class:`agent.hosting.hosted_registry.HostedRegistry`), one entry per VM::

    {"vm": <VirtualMachine, its objects left out>,
     "objects": {<manifest object>: {"process": <ObjectProcess.record()>,
                                     "checkpoint": <its last state>, "checkpoint_at": <time>}},
     "shaping": [<the htb classes and filters its egress cap added>]}

The record holds the mobile objects' registration keys and the service key of a leased
VM: hence root-only. An entry that does not describe a VM raises :class:`VmRecordError`; a
file that is not a record at all is reported and kept aside by the registry.
"""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.hosting.hosted_registry import HostedRegistry
from agent.vm.machine import VirtualMachine

RECORD_FILE = "vms.json"

#: The type each recorded field of a VM must have (None allowed where the VM allows it).
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "service": (str,), "address": (str,), "interface": (str, type(None)),
    "port": (int,), "cpu": (int, float), "memory_mb": (int,), "pids": (int,),
    "egress_kbit": (int, type(None)), "authorized": (list,), "policy": (dict,), "version": (str,),
    "installed": (str,), "steps": (list,), "running_since": (int, float, type(None)),
    "shaper_key": (int, type(None)), "last_update_check": (int, float), "mobile": (dict,),
    "only": (list,), "leased": (bool,), "epoch": (str,), "share": (int, float), "part": (str,),
    "at_home": (list,), "moved": (dict,), "parent_router": (str,), "ready": (bool,),
    "parent_instance": (str,),
}
#: Fields every recorded VM has (the others have defaults).
_REQUIRED = ("name", "kind", "service", "address", "interface", "port", "cpu", "memory_mb",
             "pids", "egress_kbit", "authorized", "policy")


class VmRecordError(AgentError):
    """A record entry that does not describe a VM (edited by hand, of another version)."""


def vm_to_json(vm: VirtualMachine) -> dict[str, Any]:
    """Every field of ``vm`` but its running processes."""
    out = {f.name: getattr(vm, f.name) for f in fields(vm) if f.name != "objects"}
    out["steps"] = [[str(what), float(at)] for what, at in vm.steps]
    return out


def vm_from_json(doc: Any) -> VirtualMachine:
    """The VM ``doc`` (:func:`vm_to_json`) describes, with no objects yet; VmRecordError for
    anything else (an unknown or missing field, a field of the wrong type)."""
    if not isinstance(doc, dict):
        raise VmRecordError("a VM's record is not a JSON object")
    unknown = set(doc) - set(_TYPES)
    missing = [k for k in _REQUIRED if k not in doc]
    if unknown or missing:
        raise VmRecordError(f"VM record with unknown fields {sorted(unknown)} / missing "
                            f"{missing}")
    for key, value in doc.items():
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and bool not in _TYPES[key]):
            raise VmRecordError(f"VM record field {key} is {type(value).__name__}")
    try:
        steps = [(str(what), float(at)) for what, at in doc.get("steps", [])]
    except (TypeError, ValueError):
        raise VmRecordError("VM record steps are not [what, when] pairs") from None
    if not all(isinstance(c, dict) for c in doc["mobile"].values()):
        raise VmRecordError("VM record mobile configurations are not objects")
    return VirtualMachine(**{**doc, "steps": steps})


def shaping_to_json(installed: list[Any]) -> list[dict[str, Any]]:
    """The egress cap's classes and filters (:class:`agent.vm.shaping.EgressShaper` caps)."""
    return [{"index": i.index, "major": i.major, "ours": i.ours, "rate": i.rate,
             "filters": [[prio, list(keys)] for prio, keys in i.filters]} for i in installed]


def shaping_from_json(docs: Any) -> list[Any]:
    """What :func:`shaping_to_json` wrote, as the shaper keeps it (so removing the VM removes
    exactly the classes and filters its cap added); VmRecordError for anything else."""
    from agent.vm.shaping import _Installed

    try:
        return [_Installed(int(d["index"]), int(d["major"]), bool(d["ours"]), str(d["rate"]),
                           [(int(prio), [str(k) for k in keys]) for prio, keys in d["filters"]])
                for d in docs]
    except (KeyError, TypeError, ValueError):
        raise VmRecordError("VM record shaping is not a list of installed caps") from None


class VmRecord(HostedRegistry):
    """The VMs of one router's agent, by name, kept on disk as they change.

        record = VmRecord(run_dir / "r18b-hosted")
        record.load()                       # what the last agent left ({} if nothing usable)
        record.keep(vm, shaping, states)    # written at once
        record.checkpoint("m1", "counter", state)   # in memory; save() writes
        record.remove("m1")
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, file=RECORD_FILE, key="vms", what="VM record")

    def entry(self, vm: VirtualMachine, shaping: list[Any], states: dict[str, Any] | None = None,
              now: float | None = None) -> dict[str, Any]:
        """The entry of ``vm`` now: each object whose process can say how to find it again
        (started with a relay), with ``states``' checkpoint for it, or the one recorded
        before for the same object.

        An object recorded before that has no running process now is kept as it was (an
        upgrade stops every object before it starts the new ones: a crash in between must
        find them, to restart from their checkpoints), unless it left the VM: a mobile
        object no longer in ``vm.mobile`` (it migrated), a part that runs elsewhere."""
        now = time.time() if now is None else now
        before = self.entries.get(vm.name, {}).get("objects", {})
        objects: dict[str, Any] = {}
        for name, process in vm.objects.items():
            if getattr(process, "relay_dir", None) is None or getattr(process, "sandbox", None) is None:
                continue  # it dies with the agent: nothing to find again
            try:
                record = process.record()
            except AgentError:
                continue  # not running (stopped meanwhile)
            old = before.get(name, {})
            if states and states.get(name) is not None:
                checkpoint, at = states[name], now
            else:
                checkpoint, at = old.get("checkpoint"), old.get("checkpoint_at")
            objects[name] = {"process": record, "checkpoint": checkpoint, "checkpoint_at": at,
                             "mobile": name in vm.mobile}
        for name, old in before.items():
            left = name in vm.moved or (old.get("mobile") and name not in vm.mobile)
            if name not in objects and not left:
                objects[name] = old
        return {"vm": vm_to_json(vm), "objects": objects, "shaping": shaping_to_json(shaping)}

    def keep(self, vm: VirtualMachine, shaping: list[Any], states: dict[str, Any] | None = None) -> None:
        """Write ``vm`` as it is now (RegistryError when the disk refuses)."""
        self.put(vm.name, self.entry(vm, shaping, states))

    def checkpoint(self, vm: str, obj: str, state: Any, now: float | None = None) -> bool:
        """Keep ``state`` as object ``obj``'s last checkpoint (in memory: :meth:`save` writes
        it); False when the record has no such object (removed or stopped meanwhile)."""
        objects = self.entries.get(vm, {}).get("objects", {})
        if obj not in objects or state is None:
            return False
        objects[obj] = dict(objects[obj], checkpoint=state,
                            checkpoint_at=time.time() if now is None else now)
        return True
