"""Moving a part of a service: secondary objects (patent Fig. 12, step 218).

The primary object's router moves one *part* of its service — an object that ran beside the
primary on an address of its mobile network prefix — to another router's VM, make before
break, and becomes the part's home agent (:mod:`agent.distribution.nested`):

1. the target starts the part *warm* (it queues requests) from the part's checkpoint, in a VM
   of the same service that runs that object only (``part: secondary``), and the part
   registers through the target's FOA with the primary's home address as its home agent;
2. the part stops here: held, its address off this router's loopback, its final checkpoint
   taken; from now on this router's host route for the address sends its packets into the
   nested tunnel, to the secondary;
3. the final checkpoint goes to the target (``restore``), which replays its queue through
   the at-most-once filter and serves.

A failure before step 2 leaves the part serving here; after it, the part restarts here from
its final checkpoint and the target's VM is cancelled. A secondary released by the broker
(its last lease ended) gives its part back (``return``): the part restarts here from the
secondary's state, then the secondary's VM goes and its binding with it.

The nested home agents' bindings are durable (:mod:`agent.distribution.nested_store`): a
restarted agent (:meth:`PartMover.resume`) is its parts' home agent again at once, with the
bindings, GRE keys and tunnel its predecessor had, even if the object's VM died with it (the
secondaries run on elsewhere); such a nested home goes when its last binding does. A VM
removed here takes its nested home's files with it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any, Callable

from packets import ControlType

from agent.core.config import ObjectConfig
from agent.core.errors import ControlError
from agent.core.peer import PeerError, PeerRefused, peer_call
from agent.distribution.capacity import Offer
from agent.core.runfiles import RunDirError
from agent.distribution import nested_store
from agent.distribution.nested import NestedHomeAgent
from agent.mobility.journal import Journal

log = logging.getLogger(__name__)

#: Starting a secondary: fetch and verify from the site, start, register via its FOA.
START_TIMEOUT_S = 25.0
RESTORE_TIMEOUT_S = 10.0


class PartMoveFailed(ControlError):
    """The part could not move; it serves where it was."""


class PartMover:
    """The primary's side of secondaries: its nested home agents and the moves."""

    def __init__(self, vms: Callable[[], Any], hosting: Callable[[], Any], key: bytes | None,
                 router_address: str, seal_keys: dict[str, bytes] | None = None,
                 run_dir: str | None = None, router: str = "") -> None:
        self._vms = vms
        self._hosting = hosting
        self.key = key
        #: The routers' public keys by address: a part's VM and state are sealed for its target.
        self.seal_keys = seal_keys or {}
        self.router_address = router_address
        #: Per primary VM: the nested home agent of its parts.
        self.nested: dict[str, NestedHomeAgent] = {}
        #: Where the nested homes' journals and descriptions are kept (None: not kept).
        self.run_dir = run_dir
        self.router = router
        #: VMs whose nested home came back from the run directory and that run no VM here
        #: (yet; the VM role takes VMs over after the roles started): forgotten when their
        #: last binding goes, unless their VM is back by then.
        self.orphans: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    def _runs_here(self, vm_name: str) -> bool:
        try:
            return vm_name in self._vms().vms
        except Exception:  # noqa: BLE001 - no VM role (yet): no VM runs here
            return False

    def _tunnel_name(self) -> str:
        taken = {agent.tunnel_name for agent in self.nested.values()}
        return next(f"mnh{i}" for i in range(len(taken) + 1) if f"mnh{i}" not in taken)

    def _journal(self, obj: str) -> Journal | None:
        if self.run_dir is None:
            return None
        return Journal(nested_store.journal_path(self.run_dir, self.router, obj))

    async def resume(self) -> list[str]:
        """Start again every nested home the last agent of this router kept (its bindings
        from its journal, its tunnel rebuilt, then UDP 434); one with no live binding left
        is discarded. The VMs resumed."""
        if self.run_dir is None:
            return []
        resumed = []
        for spec in nested_store.load_specs(self.run_dir, self.router):
            if spec.vm in self.nested:
                continue
            if self.key is None:
                log.error("nested home of %s not restored: no router key", spec.object)
                continue
            agent = NestedHomeAgent.from_spec(spec, self.key, self._tunnel_name(),
                                              journal=self._journal(spec.object))
            agent.restore()
            if not len(agent.home.bindings):
                await agent.close()
                nested_store.discard(self.run_dir, self.router, spec.object)
                continue
            try:
                await agent.start()
            except Exception as exc:  # noqa: BLE001 - the others still come back
                await agent.close()
                log.error("nested home of %s not restored: %r", spec.object, exc)
                continue
            self.nested[spec.vm] = agent
            self.orphans.add(spec.vm)
            resumed.append(spec.vm)
        return resumed

    async def nested_for(self, vm: Any) -> NestedHomeAgent:
        """The nested home agent of ``vm``'s object (started on the first move)."""
        agent = self.nested.get(vm.name)
        if agent is not None:
            self.orphans.discard(vm.name)  # its VM runs here again
            return agent
        if self.key is None:
            raise PartMoveFailed("no router key: no nested home agent can sign its replies")
        own = vm.primary_object()
        primary = ObjectConfig.from_json(own[1])
        parts = {name: ObjectConfig.from_json(vm.mobile[name]) for name in
                 [*vm.at_home, *vm.moved]}
        kept = next((name for name in self.orphans
                     if self.nested[name].name == primary.name), None)
        if kept is not None:
            # Resumed for a VM of another name: it stops (the object's address has one
            # UDP 434) and the new one restores its bindings from the same journal.
            self.orphans.discard(kept)
            await self.nested.pop(kept).close()
        if self.run_dir is not None:
            try:  # before the journal: a journal never lacks its description
                nested_store.save_spec(self.run_dir, self.router,
                                       nested_store.NestedSpec.of(vm.name, primary, parts))
            except RunDirError as exc:
                log.error("nested home of %s: %s; its bindings will not outlive this agent",
                          primary.name, exc)
        agent = NestedHomeAgent(primary, parts, self.key, self._tunnel_name(), vm=vm.name,
                                journal=self._journal(primary.name))
        try:
            await agent.start()
        except Exception as exc:  # noqa: BLE001 - no nested home agent: the part stays
            await agent.close()
            raise PartMoveFailed(f"nested home agent of {primary.name}: {exc!r}") from None
        self.nested[vm.name] = agent
        return agent

    async def move(self, vm: Any, part: str, offer: Offer, rid: str, parent_instance: str,
                   step: Callable[[str], None]) -> dict[str, Any]:
        """Steps 1-3 of the module docstring at ``offer``'s router, under reservation
        ``rid``; the secondary's instance document."""
        if part not in vm.at_home:
            raise PartMoveFailed(f"{part} does not run beside its object here")
        await self.nested_for(vm)
        step("nested home agent listening on the object's home address")
        manager = self._vms()
        config = dict(vm.mobile[part])
        state = await manager.call(vm.name, part, "get_state")
        body = dict(vm.provision_body(), vm=f"{vm.name}-s{secrets.token_hex(2)}",
                    objects=[part], mobile={part: config}, part="secondary",
                    parent_router=self.router_address, parent_instance=parent_instance)
        try:
            answer = await self._call(offer.address, {"action": "start", "reservation": rid,
                                                      "vm": body, "state": state, "warm": True},
                                      START_TIMEOUT_S)
        except PeerError as exc:
            raise PartMoveFailed(f"the secondary on {offer.router} failed: {_why(exc)}") from None
        step(f"secondary {part} registered on {offer.router} with the nested home agent")
        stopped = await self._hosting().cmd_object_stop(config["name"], deregister=False)
        final = stopped.get("state")
        process = vm.objects.pop(part, None)
        if process is not None:
            await process.stop()
        vm.at_home.remove(part)
        vm.moved[part] = offer.router
        step(f"{part} stopped here with its final checkpoint (its address is now tunnelled)")
        try:
            if final is None:
                raise PartMoveFailed(f"{part} gave no checkpoint")
            await self._call(offer.address, {"action": "restore", "vm": body["vm"],
                                             "name": config["name"], "state": final},
                             RESTORE_TIMEOUT_S)
        except (PeerError, PartMoveFailed) as exc:
            await self._call_quietly(offer.address, {"action": "cancel", "vm": body["vm"]})
            await self.come_back(vm, part, final if final is not None else state)
            raise PartMoveFailed(f"the state of {part} did not reach {offer.router}: "
                                 f"{_why(exc) if isinstance(exc, PeerError) else exc}; "
                                 "it serves here again") from None
        step(f"secondary {part} restored its state and serves")
        manager.changed(vm)  # the primary's instance no longer offers the part
        return answer

    async def come_back(self, vm: Any, part: str, state: Any, warm: bool = False) -> None:
        """``part`` runs here again, from ``state`` (a move that failed half-way, or a
        secondary given back; ``warm``: it queues until the secondary's final state comes,
        :meth:`restore`)."""
        vm.moved.pop(part, None)
        if part not in vm.at_home:
            vm.at_home.append(part)
        await self._vms().restart_object(vm.name, part, state, warm=warm)
        self._vms().changed(vm)
        log.info("part %s of %s runs beside its object again", part, vm.service)

    async def restore(self, part: str, state: Any) -> dict[str, Any]:
        """A part given back warm gets the secondary's final state, replays what it queued
        meanwhile through the at-most-once filter, and serves."""
        vm = next((v for v in self._vms().vms.values() if part in v.at_home), None)
        if vm is None:
            raise PartMoveFailed(f"no part {part!r} runs here")
        name = str(vm.mobile[part]["name"])
        return await self._hosting().cmd_object_restore(name, state, serve=True) or {}

    def housekeeping(self) -> None:
        """Expiry and journal retries; a nested home with no VM here and no binding left
        goes (its last secondary stopped or its bindings ran out)."""
        for name, agent in list(self.nested.items()):
            agent.housekeeping()
            if name in self.orphans and self._runs_here(name):
                self.orphans.discard(name)  # its VM is back (taken over by this agent)
            if name in self.orphans and not len(agent.home.bindings):
                self.orphans.discard(name)
                log.info("nested home of %s: no VM here and no binding left: it goes",
                         agent.name)
                task = asyncio.get_running_loop().create_task(self.forget(name))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def bindings(self) -> dict[str, list[dict[str, Any]]]:
        return {vm: agent.bindings() for vm, agent in self.nested.items()}

    async def forget(self, vm_name: str) -> None:
        """The object's VM left or stopped here: its nested home stops and its files go."""
        agent = self.nested.pop(vm_name, None)
        self.orphans.discard(vm_name)
        if agent is not None:
            await agent.close()
            if self.run_dir is not None:
                nested_store.discard(self.run_dir, self.router, agent.name)

    async def close(self) -> None:
        """The agent stops: every nested home stops, its files kept for the next start."""
        for name in list(self.nested):
            agent = self.nested.pop(name)
            await agent.close()

    async def _call(self, address: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await peer_call(address, ControlType.VM_NEGOTIATE, body, key=self.key,
                               timeout=timeout, seal_keys=self.seal_keys)

    async def _call_quietly(self, address: str, body: dict[str, Any]) -> None:
        try:
            await self._call(address, body, RESTORE_TIMEOUT_S)
        except PeerError as exc:
            log.warning("%s at %s failed: %s", body.get("action"), address, exc)


def _why(exc: PeerError) -> str:
    return exc.reason if isinstance(exc, PeerRefused) else str(exc)
