"""Taking over an object a crashed agent left running, or restarting it from its checkpoint.

An object started with a relay outlives its agent (:mod:`agent.hosting.sandbox`); what the next
agent of the router needs to find it again is its :meth:`~agent.hosting.runtime.ObjectProcess.record`
and its last checkpoint, kept in a root-only file of the run (the hosting role's registry of
placed objects, :mod:`agent.hosting.hosted_registry`; the VM role's record of its VMs,
:mod:`agent.vm.vm_record`). Both roles take their objects over here, so the rules are one:

* processes still there and proven to be the recorded ones (relay pid and start time,
  cgroup, the object's pid) are **adopted**: same pid, state exact;
* otherwise what they left (whatever still runs in their cgroup, the cgroup, the relay's
  socket, the working directory) is removed and the object is **restarted** from its last
  checkpoint (a new process configured as the record says, for the caller to start);
* with no checkpoint either, it is lost (:class:`TakeOverError`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from agent.core.errors import AgentError
from agent.hosting.runtime import ObjectProcess, ObjectProcessError

log = logging.getLogger(__name__)

#: Removes what an object that cannot be adopted left (given its record).
Discard = Callable[[dict[str, Any]], Awaitable[None]]


class TakeOverError(AgentError):
    """An object whose processes are gone and that left no checkpoint to restart from."""


@dataclass
class TakenOver:
    """The process of an object found again: ``adopted`` (running all along), or new and not
    started yet, to be started from ``checkpoint``."""

    process: ObjectProcess
    adopted: bool
    checkpoint: Any = None


async def take_over(record: dict[str, Any], checkpoint: Any, *, discard: Discard,
                    objects_dir: Path, cgroups: Any, relay_dir: Path | None) -> TakenOver:
    """The object ``record`` describes, adopted or to be restarted from ``checkpoint``;
    TakeOverError when neither can be (what it left is removed first)."""
    args: dict[str, Any] = {"objects_dir": objects_dir, "cgroups": cgroups, "relay_dir": relay_dir}
    try:
        return TakenOver(await ObjectProcess.adopt(record, **args), True)
    except (ObjectProcessError, ValueError) as exc:
        log.warning("%s", exc)
    await discard(record)
    if checkpoint is None:
        raise TakeOverError("its processes are gone and it left no checkpoint")
    try:
        process = ObjectProcess.from_record(record, **args)
    except ValueError as exc:
        raise TakeOverError(str(exc)) from None
    return TakenOver(process, False, checkpoint)


async def discard_leftovers(record: dict[str, Any], *, cgroups: Any, relay_dir: Path,
                            objects_dir: Path) -> None:
    """Remove what an object that cannot be taken over left: whatever still runs in its
    cgroup (it is that object's alone) and the cgroup, its relay's socket (only inside
    ``relay_dir``), its working directory (only inside ``objects_dir``)."""
    from agent.hosting.sandbox import SandboxError, existing_cgroup, remove_workdir

    relay = record.get("relay") if isinstance(record, dict) else None
    relay = relay if isinstance(relay, dict) else {}
    try:
        cg = existing_cgroup(cgroups, str(relay["cgroup"])) if relay.get("cgroup") else None
        if cg is not None:
            await asyncio.to_thread(cg.remove)
    except (AgentError, OSError) as exc:
        log.warning("leftover cgroup %s: %s", relay.get("cgroup"), exc)
    if isinstance(relay.get("socket"), str) and Path(relay["socket"]).parent == Path(relay_dir):
        Path(relay["socket"]).unlink(missing_ok=True)
    workdir = record.get("workdir") if isinstance(record, dict) else None
    if isinstance(workdir, str) and Path(workdir).resolve().parent == Path(objects_dir).resolve():
        try:
            remove_workdir(Path(workdir))
        except SandboxError as exc:
            log.warning("%s", exc)
