"""Moving a running object between routers, with its state, in band (TCP 4340).

The source router drives the move; the target obeys MIGRATE and STATE_TRANSFER messages in
MOAT's control framing, so captures show the whole exchange (docs/architecture.md §4.2). Two modes:

* **make-before-break**: the target starts a *warm* instance (it queues requests) and
  registers it with ``S`` (the HOA bicasts to both); only then does the source deregister its
  own binding and stop, keeping its final checkpoint, which it sends to the target; the
  target replays its queue through the at-most-once filter and serves. Every request after
  the target's registration reaches the target, so none is lost; they are only delayed by
  the hand-over.
* **break-before-make**: the source stops (keeping the checkpoint), the target starts from it
  and registers without ``S``. Requests in between are lost.

Any failure leaves the object serving at the source with its state: before the source stops
nothing changed there; after, it restarts from the checkpoint it kept and registers again.
The target undoes whatever it started. Before anything stops, the source takes a checkpoint
and checks it: one that is not strict JSON (:class:`CheckpointInvalid`) or too large for a
move (:class:`CheckpointTooLarge`, over :data:`MAX_CHECKPOINT_BYTES`) refuses the move and
the object serves on. An object that no longer answers its router (time-out, garbage, gone),
or that cannot be started again here, cannot be left serving: it is killed, deregistered and
reported (:class:`ObjectKilled`; ``moat show status`` lists it with why), never left
half-stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from packets import ControlMessage, ControlType
from packets.control import MAX_BODY

from agent.core import rpc
from agent.core.errors import AgentError, ControlError
from agent.core.peer import PeerError, RouterKeyAuth, peer_call
from agent.core.role import InBand, Role
from agent.core.wait import WaitTimeout, async_wait_until
from agent.hosting.migration_fields import check_migrate, check_state_transfer
from agent.hosting.objects import HostedObject, HostingRole
from agent.hosting.runtime import ObjectProcessError
from agent.vm.role import VmRole

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = 10.0
MODES = ("make-before-break", "break-before-make")
#: In-band messages failure injection can refuse (what a move does when the target breaks).
FAULT_POINTS = ("migrate_start", "state_transfer")
#: Largest checkpoint (strict JSON, bytes) a move carries: it travels sealed, in base64 (4/3),
#: in one MIGRATE or STATE_TRANSFER body of at most MAX_BODY, with the object's configuration
#: and VM; 32 KiB are left for those and the authenticator.
MAX_CHECKPOINT_BYTES = MAX_BODY * 3 // 4 - (32 << 10)


class MigrationFailed(AgentError):
    """A move that did not happen; the object still serves where it was (unless
    :class:`ObjectKilled`)."""


class CheckpointInvalid(MigrationFailed):
    """The object's checkpoint is not strict JSON (NaN, a non-object): it cannot move."""


class CheckpointTooLarge(MigrationFailed):
    """The object's checkpoint is over :data:`MAX_CHECKPOINT_BYTES`: it cannot move."""


class ObjectKilled(MigrationFailed):
    """The object could not be left serving at the source (it no longer answered, or could
    not start again): it was stopped, killed and deregistered there."""


@dataclass
class MigrationReport:
    """What happened, step by step, with monotonic timestamps (seconds)."""

    name: str
    mode: str
    source: str
    target: str
    ok: bool = False
    error: str = ""
    steps: list[tuple[str, float]] = field(default_factory=list)
    target_registration: dict[str, Any] | None = None
    #: The target's registration round trip (request sent to reply received), ms.
    registration_rtt_ms: float | None = None
    #: The failure's type (CheckpointTooLarge, ObjectKilled, ...), "" when it moved.
    error_type: str = ""
    #: The move failed and the object could not be left serving: it was killed.
    killed: bool = False

    def step(self, what: str) -> None:
        self.steps.append((what, time.time()))
        log.info("migrate %s %s->%s: %s", self.name, self.source, self.target, what)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, steps=[list(s) for s in self.steps])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class _Move:
    """What a migration needs to know about the object it moves, taken before it stops."""

    def __init__(self, hosted: HostedObject, config: dict[str, Any]) -> None:
        assert hosted.process is not None
        self.hosted = hosted
        self.config = config
        self.spec = hosted.process.spec
        self.resources = hosted.resources
        self.vm = hosted.vm


class MigrationRole(Role):
    """Both ends of a move: the source drives it (``migrate``), the target obeys MIGRATE and
    STATE_TRANSFER, each authenticated with the run's router key."""

    name = "migration"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.router_key = bytes.fromhex(self.config.router_key) if self.config.router_key else None
        #: Signed for this router's addresses, secrets sealed for its key (agent.core.peer).
        self.auth = RouterKeyAuth.of(self.config)
        #: The routers' public keys (by address): a move's configuration, VM and checkpoint
        #: are sealed for the target (agent.core.sealing).
        self.seal_keys = self.config.seal_keys()
        #: Failure injection for experiments and tests: point -> how many times to refuse.
        self.faults: dict[str, int] = {}

    @property
    def hosting(self) -> HostingRole:
        return self.agent.require(HostingRole)

    @property
    def vm(self) -> Any:
        role = self.agent.role(VmRole)
        return role.manager if role is not None else None

    def in_band(self) -> dict[ControlType, InBand]:
        return {ControlType.MIGRATE: InBand(self.on_migrate, self.auth),
                ControlType.STATE_TRANSFER: InBand(self.on_state_transfer, self.auth)}

    async def _call(self, target: str, ctype: ControlType, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await peer_call(target, ctype, body, key=self.router_key,
                                   seal_keys=self.seal_keys)
        except PeerError as exc:
            raise MigrationFailed(str(exc)) from None
        except (AgentError, TypeError, ValueError) as exc:  # encoding or sealing the body
            raise MigrationFailed(f"cannot send {ctype.name} to {target}: {exc}") from None

    def _injected(self, point: str) -> None:
        if self.faults.get(point, 0) > 0:
            self.faults[point] -= 1
            raise ControlError(f"injected fault: {point} refused")

    # --- target side ---------------------------------------------------------------------

    async def on_migrate(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        body = check_migrate(body, own=self.config.addresses)  # every field before use
        action = body.get("action")
        self._injected(f"migrate_{action}")
        if action == "start":
            name = body["config"]["name"]
            await self._start_arriving(body)
            try:
                status = await self.wait_registered(name)
            except MigrationFailed:
                await self._drop(name)
                raise
            rtts = [a["rtt"] for a in status["attempts"] if a["rtt"] is not None]
            return {"ok": True, "registration": status["registration"], "at_home": status["at_home"],
                    "registration_rtt": rtts[-1] if rtts else None}
        if action == "cancel":
            if body["name"] in self.hosting.objects:
                await self._drop(body["name"])
            return {"ok": True}
        raise ControlError(f"unexpected MIGRATE action {action!r}")

    async def on_state_transfer(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        body = check_state_transfer(body)
        self._injected("state_transfer")
        result = await self.hosting.cmd_object_restore(body["name"], body["state"], serve=True)
        return {"ok": True, "replayed": result.get("replayed", 0)}

    async def wait_registered(self, name: str, timeout: float = REGISTER_TIMEOUT) -> dict:
        """Until the object's client holds an accepted registration (or is home)."""
        client = self.hosting.client(name)

        def registered() -> dict | None:
            status = client.status()
            return status if status["registration"] is not None or status["at_home"] else None

        try:
            return await async_wait_until(registered, timeout, interval=0.01,
                                          what=f"{name} registered")
        except WaitTimeout:
            last = client.history[-1].as_dict() if client.history else {}
            raise MigrationFailed(f"{name} did not register from {self.config.name} within "
                                  f"{timeout:.0f}s (last attempt: {last})") from None

    async def _start_arriving(self, body: dict[str, Any]) -> None:
        """Start a migrating object here: in a VM of its service when it came from one (this
        router fetches and verifies the code itself, Fig. 5), else placed directly."""
        warm, state = bool(body.get("warm", False)), body.get("state")
        vm_body = body.get("vm")
        if vm_body:
            if self.vm is None:
                raise ControlError(f"{self.config.name} runs no virtual machines")
            (obj,) = vm_body["objects"]
            await self.vm.provision(vm_body, warm=warm, states={obj: state})
        else:
            await self.hosting.cmd_object_start(body["config"], spec=body["spec"], warm=warm,
                                                state=state, resources=body.get("resources"))

    async def _drop(self, name: str) -> None:
        """Undo an arrival: stop the object, deregister, and remove the VM made for it."""
        hosted = self.hosting.objects.get(name)
        if hosted is not None and hosted.vm is not None and self.vm is not None:
            await self.vm.remove(hosted.vm[0])
        if name in self.hosting.objects:
            await self.hosting.cmd_object_stop(name, deregister=True)

    # --- source side ---------------------------------------------------------------------

    async def cmd_migrate(self, name: str, target: str, mode: str = "make-before-break",
                          target_name: str = "") -> dict:
        """Move object ``name`` (running here) to the router at address ``target``."""
        if mode not in MODES:
            raise ControlError(f"mode must be one of {MODES}")
        hosted = self.hosting.hosted(name)
        if hosted.process is None or hosted.client is None:
            raise ControlError(f"object {name!r} does not run and register here")
        report = MigrationReport(name, mode, self.config.name, target_name or target)
        move = _Move(hosted, hosted.client.config.to_json())
        try:
            await self._check_source(move, report)
            if mode == "make-before-break":
                await self._migrate_mbb(move, target, report)
            else:
                await self._migrate_bbm(move, target, report)
            report.ok = True
        except ObjectKilled as exc:
            report.error, report.error_type, report.killed = str(exc), type(exc).__name__, True
            report.step(f"failed: {exc}; the object was stopped and killed on {self.config.name}")
            return report.as_dict()
        except (MigrationFailed, ObjectProcessError, ControlError) as exc:
            report.error, report.error_type = str(exc), type(exc).__name__
            report.step(f"failed: {exc}; the object keeps serving on {self.config.name}")
            return report.as_dict()
        if move.vm is not None and self.vm is not None:
            await self.vm.detach(*move.vm)
        return report.as_dict()

    def cmd_inject_fault(self, point: str, count: int = 1) -> dict:
        """Refuse the next ``count`` in-band ``migrate_start`` or ``state_transfer`` messages
        (failure injection: what a migration does when the target breaks half-way)."""
        if point not in FAULT_POINTS:
            raise ControlError(f"fault point must be one of {FAULT_POINTS}")
        self.faults[point] = int(count)
        return dict(self.faults)

    def _start_body(self, move: _Move, warm: bool, state: Any = None) -> dict[str, Any]:
        config = dict(move.config, simultaneous=warm)
        body: dict[str, Any] = {"action": "start", "spec": move.spec, "warm": warm, "config": config,
                                "resources": move.resources}
        if state is not None:
            body["state"] = state
        if move.vm is not None:
            body["vm"] = self.vm.migration_body(*move.vm, config)
        return body

    async def _check_source(self, move: _Move, report: MigrationReport) -> None:
        """Before anything stops: the object answers its router with a checkpoint a move can
        carry. A refusal (its state is not JSON) or a checkpoint that cannot move leaves it
        serving; no answer at all (time-out, garbage, gone) means it cannot serve either:
        it is killed and reported."""
        name = move.hosted.name
        assert move.hosted.process is not None
        try:
            state = await move.hosted.process.call("get_state")
        except ObjectProcessError as exc:
            if isinstance(exc.__cause__, rpc.RpcRemoteError):
                raise MigrationFailed(f"object {name} gave no checkpoint: {exc}") from None
            await self.hosting.kill(name, f"did not answer its router before a move: {exc}")
            raise ObjectKilled(f"object {name} no longer answers its router: {exc}") from None
        size = self.check_checkpoint(name, state)
        report.step(f"source checkpoint checked ({size} bytes)")

    @staticmethod
    def check_checkpoint(name: str, state: Any) -> int:
        """The checkpoint's size as strict JSON; CheckpointInvalid or CheckpointTooLarge if
        a move cannot carry it."""
        if not isinstance(state, dict):
            raise CheckpointInvalid(f"object {name}'s checkpoint is not a JSON object")
        try:
            size = len(json.dumps(state, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise CheckpointInvalid(f"object {name}'s checkpoint is not strict JSON: {exc}") from None
        if size > MAX_CHECKPOINT_BYTES:
            raise CheckpointTooLarge(f"object {name}'s checkpoint is {size} bytes, more than the "
                                     f"{MAX_CHECKPOINT_BYTES} a move can carry")
        return size

    async def _final_state(self, move: _Move, stopped: dict[str, Any]) -> Any:
        """The checkpoint the source stopped with, checked; an object that gave none is gone
        (its process is stopped and killed) and cannot be started again with its state."""
        state = stopped.get("state")
        if state is None:
            why = "; ".join(stopped.get("errors") or []) or "it did not give one"
            await self.hosting.kill(move.hosted.name, f"no final checkpoint at a move's stop: {why}")
            raise ObjectKilled(f"object {move.hosted.name} gave no final checkpoint ({why}): "
                               "it cannot be started again with its state")
        return state

    async def _restart(self, move: _Move, state: Any) -> None:
        """The move failed after the object stopped here: start it again from ``state``,
        the way it ran (in its VM, or placed directly), and register it again. If it cannot
        start, it is killed (whatever part of it started) and reported."""
        try:
            if move.vm is not None and self.vm is not None:
                await self.vm.restart_object(*move.vm, state)
            else:
                await self.hosting.cmd_object_start(move.config, spec=move.spec, state=state,
                                                    resources=move.resources)
        except (AgentError, TypeError, ValueError) as exc:
            await self.hosting.kill(move.hosted.name, f"could not start again after a failed move: {exc}")
            raise ObjectKilled(f"object {move.hosted.name} could not start again on "
                               f"{self.config.name} after the failed move: {exc}") from None

    async def _migrate_mbb(self, move: _Move, target: str, report: MigrationReport) -> None:
        """Make the new place reachable first, then hand the state over at one instant.

        The target's warm instance is registered (with ``S``: the HOA bicasts) before the
        source stops, so every request from then on reaches the target, which queues it. The
        source's final checkpoint therefore covers exactly what the target must not replay,
        whichever way a request travelled (through the tunnel, or straight to a source that is
        its client's own gateway).
        """
        hosted = move.hosted
        assert hosted.process is not None and hosted.client is not None
        report.step("start warm instance at target, register with S")
        answer = await self._call(target, ControlType.MIGRATE, self._start_body(move, warm=True))
        report.target_registration = answer.get("registration")
        report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
        report.step("target registered (its instance queues requests)")
        mine = hosted.client.current
        theirs = (answer.get("registration") or {}).get("care_of_address")
        if mine is not None and mine.care_of_address != theirs:
            await hosted.client.deregister()  # lifetime 0 for this care-of address only
            report.step("source binding deregistered")
        stopped = await self.hosting.cmd_object_stop(hosted.name, deregister=False)
        try:
            state = await self._final_state(move, stopped)
        except ObjectKilled:
            await self._cancel(target, hosted.name)
            raise
        report.step("source stopped with its final checkpoint")
        try:
            self.check_checkpoint(hosted.name, state)  # it may have grown since the check
            await self._call(target, ControlType.STATE_TRANSFER, {"name": hosted.name, "state": state})
            report.step("target restored, replayed its queue and serves")
        except MigrationFailed:
            await self._cancel(target, hosted.name)
            report.step("transfer failed: restart at source from the checkpoint")
            await self._restart(move, state)
            raise

    async def _migrate_bbm(self, move: _Move, target: str, report: MigrationReport) -> None:
        report.step("stop source, keep checkpoint")
        stopped = await self.hosting.cmd_object_stop(move.hosted.name, deregister=False)
        state = await self._final_state(move, stopped)
        try:
            self.check_checkpoint(move.hosted.name, state)  # it may have grown since the check
            answer = await self._call(target, ControlType.MIGRATE, self._start_body(move, False, state))
        except (AgentError, TypeError, ValueError) as exc:  # the start body too: never half-stopped
            report.step("target failed: restart at source from the checkpoint")
            await self._restart(move, state)
            if isinstance(exc, MigrationFailed):
                raise
            raise MigrationFailed(f"cannot send MIGRATE start: {exc}") from None
        report.target_registration = answer.get("registration")
        report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
        report.step("target serving and registered")

    async def _cancel(self, target: str, name: str) -> None:
        try:
            await self._call(target, ControlType.MIGRATE, {"action": "cancel", "name": name})
        except MigrationFailed as exc:
            log.warning("could not cancel %s at %s: %s", name, target, exc)
