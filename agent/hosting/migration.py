"""Moving a running object between routers, with its state, in band (TCP 4340).

The source router drives the move; the target obeys MIGRATE and STATE_TRANSFER messages in
MOAT's control framing, so captures show the whole exchange (docs/architecture.md §4.2). Two modes:

* **make-before-break**: the target starts a *warm* instance (it queues requests) and
  registers it with ``S`` (the HOA bicasts to both); only then does the source deregister its
  own binding and hand its final checkpoint over; the target replays its queue through the
  at-most-once filter and serves. Every request after the target's registration reaches the
  target, so none is lost; they are only delayed by the hand-over. Two transfers
  (:data:`TRANSFERS`): ``precopy`` (the default) sends a checkpoint taken while the source
  still serves with the MIGRATE start (the target keeps it, its instance held and
  untouched), then, once the target is registered, holds the object (it keeps running, answering none), takes the final
  checkpoint and sends only what changed (a merge patch) *with* the commit, in one round
  trip; the target restores and serves at once, and only then does the source stop its held
  instance. ``stop-copy`` (the baseline) stops the source first, then sends the whole
  checkpoint and the commit in two round trips. A VM's object always moves stop-copy (its
  VM's recovery, not the hosted registry, would take a held instance over).
* **break-before-make**: the source stops (keeping the checkpoint), the target starts from it
  and registers without ``S``. Requests in between are lost. With the ``precopy`` transfer
  (nothing goes before the break, so nothing is pre-copied) the source *holds* its object
  instead of stopping it, and the MIGRATE start carries the checkpoint and ``commit``: the
  target serves as soon as it is registered and answers ``committed`` (one round trip); only
  then does the source stop its held instance.

Both follow the hand-over protocol of :mod:`agent.hosting.handover` (its docstring has the
states): every message carries the move's epoch; the target starts the object *held* (it
queues requests, answers none) and serves only on the source's ``commit``; the source writes
its final checkpoint to the run directory right after the stop and deletes it only once the
target answered ``committed`` or the object serves here again. A failure before the commit
(the target refusing or dying, the transfer cut) cancels the move at the target (a lost
cancel: the target drops itself at its deadline) and restarts the object here from that
checkpoint; an unanswered commit leaves the move undecided until the target answers. After
a crash, the restarted agent resolves what it had on disk (:meth:`MigrationRole.start`).
Failure injection (``inject_fault``) arms each step: :data:`FAULT_POINTS`. Before anything stops, the source takes a checkpoint
and checks it: one that is not strict JSON (:class:`CheckpointInvalid`) or too large for a
move (:class:`CheckpointTooLarge`, over :data:`MAX_CHECKPOINT_BYTES`) refuses the move and
the object serves on. An object that no longer answers its router (time-out, garbage, gone),
or that cannot be started again here, cannot be left serving: it is killed, deregistered and
reported (:class:`ObjectKilled`; ``moat show status`` lists it with why), never left
half-stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from packets import ControlMessage, ControlType
from packets.control import MAX_BODY

from agent.core import rpc
from agent.core.errors import AgentError, ControlError
from agent.core.peer import PeerError, PeerNotSent, RouterKeyAuth, peer_call
from agent.core.role import InBand, Role
from agent.hosting.handover import (DEFAULT_DEADLINE, MAX_DEADLINE, MIN_DEADLINE, Arrivals,
                                    HandoverError, HandoverStore, Phase, SourceRecord, new_epoch)
from agent.hosting import merge_patch
from agent.hosting.hosted_registry import RegistryError
from agent.hosting.migration_fields import check_migrate, check_state_transfer
from agent.hosting.objects import HostedObject, HostingRole
from agent.hosting.runtime import ObjectProcessError
from agent.mobility.client import ACCEPTED_CODES
from agent.vm.role import VmRole

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = 10.0
MODES = ("make-before-break", "break-before-make")
#: How make-before-break hands the state over (see the module docstring); the first is the default.
TRANSFERS = ("precopy", "stop-copy")
#: Failure injection (``inject_fault``), each point a step of a move (tests and
#: ``moat run faults``). Messages the target refuses before it handles them:
REFUSE_POINTS = ("migrate_start", "state_transfer", "migrate_commit", "migrate_cancel")
#: Steps the target takes whose answer is then lost (to the source, a cut connection):
CUT_POINTS = ("transfer_cut", "commit_cut")
#: Steps after which this router's agent dies at once (SIGKILL: what ``kill -9`` does):
CRASH_POINTS = ("source_after_start", "source_after_stop", "source_after_transfer",
                "source_after_commit", "target_after_start", "target_after_restore")
#: A lost cancel is a refused one (the target's instance must drop itself).
ALIASES = {"cancel_lost": "migrate_cancel"}
FAULT_POINTS = REFUSE_POINTS + CUT_POINTS + CRASH_POINTS + tuple(ALIASES)
#: How often a source asks for a commit before it leaves the move to its resolver, and the
#: resolver's back-off (seconds, doubling up to the last).
#: Times a cancel that got no answer is sent again (with RESOLVE_BACKOFF's back-off).
CANCEL_TRIES = 5
COMMIT_TRIES = 3
RESOLVE_BACKOFF = (0.2, 10.0)
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


class MoveNotSent(MigrationFailed):
    """A message of the move provably never reached the target (not sealed, not encoded, no
    connection): the target cannot have acted on it."""


class HandoverPending(MigrationFailed):
    """The source asked the target to commit and got no answer: the move is undecided. The
    object serves wherever the target's decision puts it; the source keeps its checkpoint and
    asks again until the target answers (then it starts the object again only if aborted)."""


class _Crashed(BaseException):
    """Raised by :meth:`MigrationRole._crash` where a real agent would be dead (tests)."""


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
    #: The move's epoch (every message of it carries it: agent.hosting.handover).
    epoch: str = ""
    #: The commit went unanswered: the source's resolver will learn the decision.
    pending: bool = False
    #: How the state went over (:data:`TRANSFERS`; break-before-make: "stop-copy").
    transfer: str = "stop-copy"
    #: Bytes of the final state the switch carried (pre-copy: the merge patch), when known.
    final_bytes: int | None = None

    def step(self, what: str) -> None:
        self.steps.append((what, time.time()))
        log.info("migrate %s %s->%s: %s", self.name, self.source, self.target, what)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, steps=[list(s) for s in self.steps])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class _Move:
    """What a migration needs to know about the object it moves, taken before it stops."""

    def __init__(self, hosted: HostedObject, config: dict[str, Any], target: str, mode: str,
                 deadline: float) -> None:
        assert hosted.process is not None
        self.hosted = hosted
        self.config = config
        self.spec = hosted.process.spec
        self.resources = hosted.resources
        self.vm = hosted.vm
        self.target, self.mode, self.deadline = target, mode, deadline
        self.epoch = new_epoch()
        #: The checkpoint taken (and checked) before anything else: a pre-copy's base.
        self.base: dict[str, Any] | None = None


class MigrationRole(Role):
    """Both ends of a move: the source drives it (``migrate``), the target obeys MIGRATE and
    STATE_TRANSFER, each authenticated with the run's router key; both follow the hand-over
    protocol of :mod:`agent.hosting.handover`."""

    name = "migration"

    def __init__(self, agent: Any) -> None:
        super().__init__(agent)
        self.router_key = bytes.fromhex(self.config.router_key) if self.config.router_key else None
        #: Signed for this router's addresses, secrets sealed for its key (agent.core.peer).
        self.auth = RouterKeyAuth.of(self.config)
        #: The routers' public keys (by address): a move's configuration, VM and checkpoint
        #: are sealed for the target (agent.core.sealing).
        self.seal_keys = self.config.seal_keys()
        #: Failure injection for experiments and tests: point -> how many times it fires.
        self.faults: dict[str, int] = {}
        self.store = HandoverStore(self.config.run_dir, self.config.name)
        #: Target side: the moves arriving here and their decisions.
        self.arrivals = Arrivals(persist=self.store.save_arrivals)
        #: Source side: objects stopped for a move not decided yet (name -> record).
        self.departures: dict[str, SourceRecord] = {}
        self._decide = asyncio.Lock()
        self._wake: asyncio.Event | None = None
        #: The source's resolvers of undecided moves (agent.hosting.handover).
        self._tasks: set[asyncio.Task] = set()
        self._expiry: asyncio.Task | None = None

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

    async def start(self) -> None:
        """After a crash: abort the arrivals that were not committed (drop what is left of
        them) and resolve the moves this router had stopped an object for."""
        for arrival in self.arrivals.load(self.store.arrivals()):
            log.warning("move %s of %s was undecided when this agent stopped: aborted",
                        arrival.epoch, arrival.name)
            if arrival.name in self.hosting.objects:
                await self._drop(arrival.name)
        self._wake = asyncio.Event()
        self._expiry = asyncio.get_running_loop().create_task(self._expiry_loop())
        for record in self.store.records():
            log.warning("move %s of %s to %s was %s when this agent stopped: resolving it",
                        record.epoch, record.name, record.target, record.phase)
            self.departures[record.name] = record
            self._spawn(self.resolve(record, forever=True))

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._expiry] if self._expiry is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {"arrivals": [a for a in self.arrivals.status()
                             if a["phase"] in ("warm", "precopied", "restored")],
                "departures": [{"name": r.name, "epoch": r.epoch, "target": r.target,
                                "phase": r.phase, "held": r.held} for r in self.departures.values()]}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hand-over task failed: %s", task.exception())

    async def _call(self, target: str, ctype: ControlType, body: dict[str, Any]) -> dict[str, Any]:
        # A commit and a cancel are idempotent per epoch (the target answers a repeat with
        # its decision): a kept connection that broke after one went may send it again.
        idempotent = ctype is ControlType.MIGRATE and body.get("action") in ("commit", "cancel")
        try:
            return await peer_call(target, ctype, body, key=self.router_key,
                                   seal_keys=self.seal_keys, idempotent=idempotent)
        except PeerNotSent as exc:
            raise MoveNotSent(str(exc)) from None
        except PeerError as exc:
            raise MigrationFailed(str(exc)) from None
        except (AgentError, TypeError, ValueError) as exc:  # encoding or sealing the body
            raise MoveNotSent(f"cannot send {ctype.name} to {target}: {exc}") from None

    # --- failure injection ---------------------------------------------------------------

    def _fires(self, point: str) -> bool:
        if self.faults.get(point, 0) > 0:
            self.faults[point] -= 1
            return True
        return False

    def _injected(self, point: str) -> None:
        if self._fires(point):
            raise ControlError(f"injected fault: {point} refused")

    def _crash_point(self, point: str) -> None:
        if self._fires(point):
            log.error("injected fault %s: this agent dies now (SIGKILL)", point)
            self._crash()

    def _crash(self) -> None:
        """Die as ``kill -9`` would make it: nothing after this runs (tests replace it)."""
        os.kill(os.getpid(), signal.SIGKILL)
        raise _Crashed("killed")  # not reached

    def cmd_inject_fault(self, point: str, count: int = 1) -> dict:
        """Make step ``point`` of the next ``count`` moves fail (:data:`FAULT_POINTS`): a
        message the target refuses, an answer lost after the target acted, or this agent
        dying (SIGKILL) right after a step."""
        point = ALIASES.get(point, point)
        if point not in FAULT_POINTS:
            raise ControlError(f"fault point must be one of {FAULT_POINTS}")
        self.faults[point] = int(count)
        return dict(self.faults)

    # --- target side ---------------------------------------------------------------------

    async def on_migrate(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        body = check_migrate(body, own=self.config.addresses)  # every field before use
        action = body.get("action")
        self._injected(f"migrate_{action}")
        if action == "start":
            return await self._arrive(body)
        if action == "commit":
            if body.get("state") is not None:
                return await self._switch_arrival(body)
            return await self._commit_arrival(body["name"], body["epoch"])
        if action == "cancel":
            async with self._decide:
                phase, arrival = self.arrivals.abort(body["name"], body.get("epoch"))
                if arrival is not None and arrival.name in self.hosting.objects:
                    await self._drop(arrival.name)
            return {"ok": True, "phase": phase.value}
        raise ControlError(f"unexpected MIGRATE action {action!r}")

    async def _arrive(self, body: dict[str, Any]) -> dict[str, Any]:
        """A MIGRATE start: host the object held (it queues requests and answers none) until
        the source commits; registered (with ``S`` when warm: make-before-break)."""
        name, epoch = body["config"]["name"], body["epoch"]
        if name in self.hosting.objects:
            raise ControlError(f"object {name} already runs on {self.config.name}")
        precopy = bool(body.get("precopy"))
        if precopy:  # a pre-copy comes with this start: it may be refused (a lost pre-copy)
            self._injected("state_transfer")
        arrival = self.arrivals.begin(name, epoch, float(body.get("deadline", DEFAULT_DEADLINE)),
                                      restored=body.get("state") is not None and not precopy)
        if precopy:  # kept as the commit's base; the instance starts held, without it
            self.arrivals.precopied(name, epoch, body["state"])
            body = {k: v for k, v in body.items() if k != "state"}
        arrival.deadline = math.inf  # while it starts (a VM's fetch may take long): then touched
        try:
            await self._start_arriving(body)
            status = await self.wait_registered(name)
        except BaseException:
            async with self._decide:
                self.arrivals.abort(name, epoch)
                if name in self.hosting.objects:
                    await self._drop(name)
            raise
        coa = (status.get("registration") or {}).get("care_of_address", "")
        if coa and await self.hosting.registered_at(name, coa):
            log.info("move %s of %s: registered through another router's FOA: its address is "
                     "this router's as usual", epoch, name)
        self.arrivals.touch(name, epoch)
        self._rearm()
        self._crash_point("target_after_start")
        if precopy:
            self._crash_point("target_after_restore")  # it took the pre-copy
            if self._fires("transfer_cut"):
                raise ControlError("injected fault: transfer_cut (the target took the pre-copy, "
                                   "its answer is lost)")
        rtts = [a["rtt"] for a in status["attempts"] if a["rtt"] is not None]
        phase = "registered"
        if body.get("commit"):  # break-before-make in one round trip: serve now
            phase = (await self._commit_arrival(name, epoch))["phase"]
        return {"ok": True, "registration": status["registration"], "at_home": status["at_home"],
                "registration_rtt": rtts[-1] if rtts else None, "phase": phase}

    async def on_state_transfer(self, msg: ControlMessage, body: dict[str, Any]) -> dict[str, Any]:
        """The source's final checkpoint: taken, still held (it serves only on commit)."""
        body = check_state_transfer(body)
        self._injected("state_transfer")
        name, epoch = body["name"], body["epoch"]
        async with self._decide:
            self.arrivals.restored(name, epoch)
            try:
                await self.hosting.cmd_object_restore(name, body["state"], serve=False)
            except (AgentError, ObjectProcessError) as exc:
                self.arrivals.abort(name, epoch)
                if name in self.hosting.objects:
                    await self._drop(name)
                raise ControlError(f"{name} did not take its state on {self.config.name}: {exc}") from None
        self._crash_point("target_after_restore")
        if self._fires("transfer_cut"):
            raise ControlError("injected fault: transfer_cut (the target restored, its answer is lost)")
        return {"ok": True, "phase": Phase.RESTORED.value}

    async def _switch_arrival(self, body: dict[str, Any]) -> dict[str, Any]:
        """A commit with the final state (pre-copy): the patch applied to the pre-copied
        checkpoint must give exactly the checkpoint whose digest the source sent (else it is
        refused, undecided: the source's cancel decides); then one step restores the held
        instance and makes it serve (replaying its queue), and the decision is kept.
        Idempotent like a commit; an instance that cannot serve is dropped: ``aborted``."""
        name, epoch, state = body["name"], body["epoch"], body["state"]
        async with self._decide:
            arrival = self.arrivals.get(name, epoch)
            if arrival is None or arrival.phase.decided:
                phase = arrival.phase if arrival is not None else Phase.ABORTED
                return {"ok": True, "phase": phase.value, "replayed": 0}
            if body.get("delta"):
                if arrival.phase is not Phase.PRECOPIED:
                    raise HandoverError(f"move {epoch} of {name} has no pre-copy to patch")
                try:
                    final = merge_patch.apply(arrival.base, state["patch"])
                    same = merge_patch.digest(final) == state["digest"]
                except (ValueError, TypeError, RecursionError) as exc:
                    raise HandoverError(f"move {epoch} of {name}: the patch does not apply: {exc}") from None
                if not same:
                    raise HandoverError(f"move {epoch} of {name}: the patched checkpoint is not the "
                                        "source's (digest differs)")
            else:
                final = state
            try:
                answer = await self.hosting.go_live(
                    name, lambda: self.hosting.cmd_object_restore(name, final, serve=True))
                replayed = int((answer or {}).get("replayed", 0))
            except (AgentError, ObjectProcessError, TypeError, ValueError) as exc:
                log.warning("move %s of %s: the instance cannot take its state and serve (%s): "
                            "aborted", epoch, name, exc)
                self.arrivals.abort(name, epoch)
                if name in self.hosting.objects:
                    await self._drop(name)
                return {"ok": True, "phase": Phase.ABORTED.value, "replayed": 0}
            phase, _new = self.arrivals.commit(name, epoch, final=True)
        self._spawn(self.hosting.forget_dark(name))  # off the answer's path
        if self._fires("commit_cut"):
            raise ControlError("injected fault: commit_cut (the target committed, its answer is lost)")
        return {"ok": True, "phase": phase.value, "replayed": replayed}

    async def _commit_arrival(self, name: str, epoch: str) -> dict[str, Any]:
        """The source's commit: the held instance serves (replaying its queue), then the
        decision is kept. Idempotent: a repeat gets the decision taken; an unknown epoch was
        aborted. An instance that cannot serve is dropped: the answer is ``aborted``."""
        replayed = 0
        async with self._decide:
            arrival = self.arrivals.get(name, epoch)
            if arrival is None or arrival.phase.decided:
                phase = arrival.phase if arrival is not None else Phase.ABORTED
                return {"ok": True, "phase": phase.value, "replayed": 0}
            if arrival.phase is not Phase.RESTORED:
                raise HandoverError(f"move {epoch} of {name} has no state yet: it cannot commit")
            try:
                answer = await self.hosting.go_live(name, lambda: self.hosting.process(name).call("serve"))
                replayed = int((answer or {}).get("replayed", 0))
            except (AgentError, ObjectProcessError, TypeError, ValueError) as exc:
                log.warning("move %s of %s: the instance cannot serve (%s): aborted", epoch, name, exc)
                self.arrivals.abort(name, epoch)
                if name in self.hosting.objects:
                    await self._drop(name)
                return {"ok": True, "phase": Phase.ABORTED.value, "replayed": 0}
            phase, _new = self.arrivals.commit(name, epoch)
        self._spawn(self.hosting.forget_dark(name))  # off the answer's path
        if self._fires("commit_cut"):
            raise ControlError("injected fault: commit_cut (the target committed, its answer is lost)")
        return {"ok": True, "phase": phase.value, "replayed": replayed}

    async def expire(self) -> list[str]:
        """Drop every arrival whose source went silent past its deadline (deregistered)."""
        dropped = []
        async with self._decide:
            for arrival in self.arrivals.expired():
                if arrival.name in self.hosting.objects:
                    await self._drop(arrival.name)
                dropped.append(arrival.name)
        return dropped

    def _rearm(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _expiry_loop(self) -> None:
        assert self._wake is not None
        while True:
            due = self.arrivals.next_deadline()
            delay = None if due is None else max(0.0, due - self.arrivals.clock())
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.expire()
            except Exception:  # noqa: BLE001 - the loop must outlive one failed drop
                log.exception("dropping expired arrivals failed")

    async def wait_registered(self, name: str, timeout: float = REGISTER_TIMEOUT) -> dict:
        """Until the object's client holds an accepted registration (or is home)."""
        client = self.hosting.client(name)

        def registered() -> dict | None:
            status = client.status()
            return status if status["registration"] is not None or status["at_home"] else None

        # Woken by the client as its registration is accepted (or it is home); looked at
        # again every 0.1 s all the same.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (status := registered()) is None and loop.time() < deadline:
            client.settled.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client.settled.wait(), min(0.1, deadline - loop.time()))
        if status is not None:
            return status
        last = client.history[-1].as_dict() if client.history else {}
        raise MigrationFailed(f"{name} did not register from {self.config.name} within "
                              f"{timeout:.0f}s (last attempt: {last})") from None

    async def _start_arriving(self, body: dict[str, Any]) -> None:
        """Start a migrating object here, held: in a VM of its service when it came from one
        (this router fetches and verifies the code itself, Fig. 5), else placed directly."""
        state = body.get("state")
        vm_body = body.get("vm")
        if vm_body:
            if self.vm is None:
                raise ControlError(f"{self.config.name} runs no virtual machines")
            (obj,) = vm_body["objects"]
            await self.vm.provision(vm_body, warm=True, states={obj: state})
        else:
            await self.hosting.cmd_object_start(body["config"], spec=body["spec"], warm=True,
                                                state=state, resources=body.get("resources"),
                                                arriving=True)

    async def _drop(self, name: str) -> None:
        """Undo an arrival: stop the object, deregister, and remove the VM made for it."""
        hosted = self.hosting.objects.get(name)
        if hosted is not None and hosted.vm is not None and self.vm is not None:
            await self.vm.remove(hosted.vm[0])
        if name in self.hosting.objects:
            await self.hosting.cmd_object_stop(name, deregister=True)

    # --- source side ---------------------------------------------------------------------

    async def cmd_migrate(self, name: str, target: str, mode: str = "make-before-break",
                          target_name: str = "", deadline: float = DEFAULT_DEADLINE,
                          transfer: str = TRANSFERS[0]) -> dict:
        """Move object ``name`` (running here) to the router at address ``target``;
        ``deadline``: how long the target waits for each next step before it drops its
        instance (agent.hosting.handover); ``transfer``: how make-before-break hands the
        state over (:data:`TRANSFERS`; a VM's object and break-before-make: stop-copy)."""
        if mode not in MODES:
            raise ControlError(f"mode must be one of {MODES}")
        if transfer not in TRANSFERS:
            raise ControlError(f"transfer must be one of {TRANSFERS}")
        if not MIN_DEADLINE <= float(deadline) <= MAX_DEADLINE:
            raise ControlError(f"deadline must be in [{MIN_DEADLINE}, {MAX_DEADLINE}] seconds")
        if name in self.departures:
            raise ControlError(f"the last move of {name} is still undecided")
        hosted = self.hosting.hosted(name)
        if hosted.process is None or hosted.client is None:
            raise ControlError(f"object {name!r} does not run and register here")
        report = MigrationReport(name, mode, self.config.name, target_name or target)
        move = _Move(hosted, hosted.client.config.to_json(), target, mode, float(deadline))
        report.epoch = move.epoch
        precopy = transfer == "precopy" and move.vm is None
        report.transfer = "precopy" if precopy else "stop-copy"
        try:
            await self._check_source(move, report)
            if precopy and mode == "make-before-break":
                await self._migrate_precopy(move, report)
            elif precopy:
                await self._migrate_bbm_held(move, report)
            elif mode == "make-before-break":
                await self._migrate_mbb(move, report)
            else:
                await self._migrate_bbm(move, report)
            report.ok = True
        except ObjectKilled as exc:
            report.error, report.error_type, report.killed = str(exc), type(exc).__name__, True
            report.step(f"failed: {exc}; the object was stopped and killed on {self.config.name}")
            return report.as_dict()
        except HandoverPending as exc:
            report.error, report.error_type, report.pending = str(exc), type(exc).__name__, True
            report.step(f"undecided: {exc}; {self.config.name} keeps the checkpoint and asks again")
            return report.as_dict()
        except (MigrationFailed, ObjectProcessError, ControlError) as exc:
            report.error, report.error_type = str(exc), type(exc).__name__
            report.step(f"failed: {exc}; the object keeps serving on {self.config.name}")
            return report.as_dict()
        if move.vm is not None and self.vm is not None:
            await self.vm.detach(*move.vm)
        return report.as_dict()

    def _start_body(self, move: _Move, warm: bool, state: Any = None) -> dict[str, Any]:
        config = dict(move.config, simultaneous=warm)
        body: dict[str, Any] = {"action": "start", "spec": move.spec, "warm": warm, "config": config,
                                "resources": move.resources, "epoch": move.epoch,
                                "deadline": move.deadline}
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
        move.base = state
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

    def _keep(self, move: _Move, state: Any, phase: str = "stopped", held: bool = False) -> SourceRecord:
        """The final checkpoint, on disk before it goes anywhere (a full or read-only run
        directory is logged; the move goes on with the record in memory only)."""
        record = SourceRecord(
            name=move.hosted.name, epoch=move.epoch, target=move.target, mode=move.mode,
            phase=phase, held=held, state=state, config=move.config, spec=move.spec,
            resources=move.resources, vm=list(move.vm) if move.vm else None,
            vm_body=self.vm.migration_body(*move.vm, move.config)
            if move.vm is not None and self.vm is not None else None)
        self.departures[record.name] = record
        self._save(record)
        return record

    def _save(self, record: SourceRecord) -> None:
        try:
            self.store.save(record)
        except OSError as exc:
            log.error("move %s of %s: its checkpoint is not on disk (%s): a crash of this agent "
                      "now would lose it", record.epoch, record.name, exc)

    def _done(self, record: SourceRecord) -> None:
        self.departures.pop(record.name, None)
        self.store.remove(record.name)

    async def _restart(self, record: SourceRecord) -> None:
        """The move failed after the object stopped here: start it again from the record's
        checkpoint, the way it ran (in its VM, or placed directly), and register it again.
        If it cannot start, it is killed (whatever part of it started) and reported."""
        name = record.name
        try:
            if name in self.hosting.objects:
                log.warning("%s already runs here again: not restarted", name)
            elif record.vm is not None and self.vm is not None and record.vm[0] in self.vm.vms:
                await self.vm.restart_object(*record.vm, record.state)
            elif record.vm_body is not None and self.vm is not None:
                (obj,) = record.vm_body["objects"]
                await self.vm.provision(record.vm_body, states={obj: record.state})
            else:
                await self.hosting.cmd_object_start(record.config, spec=record.spec,
                                                    state=record.state, resources=record.resources)
        except (AgentError, TypeError, ValueError, KeyError) as exc:
            self._done(record)
            await self.hosting.kill(name, f"could not start again after a failed move: {exc}")
            raise ObjectKilled(f"object {name} could not start again on "
                               f"{self.config.name} after the failed move: {exc}") from None
        self._done(record)

    async def _abort(self, record: SourceRecord) -> Phase | None:
        """Tell the target the move is off; its decision, None when it did not answer (then
        the cancel is sent again in the background, :meth:`_abort_again`)."""
        try:
            return await self._send_cancel(record)
        except MigrationFailed as exc:
            log.warning("could not cancel move %s of %s at %s: %s (asking again; it drops "
                        "itself at its deadline anyway)", record.epoch, record.name, record.target, exc)
            self._spawn(self._abort_again(record))
            return None

    async def _send_cancel(self, record: SourceRecord) -> Phase:
        answer = await self._call(record.target, ControlType.MIGRATE,
                                  {"action": "cancel", "name": record.name, "epoch": record.epoch})
        return _phase(answer)

    async def _abort_again(self, record: SourceRecord) -> None:
        """A lost or refused cancel, sent again with back-off (:data:`CANCEL_TRIES` times): a
        held instance the target drops now is one that no longer holds the object's home
        address and the target's next move until its deadline. Idempotent at the target."""
        delay = RESOLVE_BACKOFF[0]
        for _ in range(CANCEL_TRIES):
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESOLVE_BACKOFF[1])
            try:
                phase = await self._send_cancel(record)
            except MigrationFailed:
                continue
            log.info("move %s of %s: cancel taken by %s on a later try (%s)",
                     record.epoch, record.name, record.target, phase.value)
            return

    async def _give_back(self, record: SourceRecord) -> None:
        """Before any commit was sent: abort at the target and serve here again. A target
        that did not hear the abort is held (silent) and drops itself at its deadline."""
        await self._abort(record)
        await self._restart(record)

    async def _ask_commit(self, record: SourceRecord) -> Phase:
        answer = await self._call(record.target, ControlType.MIGRATE,
                                  {"action": "commit", "name": record.name, "epoch": record.epoch})
        return _phase(answer)

    async def _commit(self, record: SourceRecord, report: MigrationReport) -> None:
        """Ask the target to commit (idempotent, a few times); served there: done;
        aborted: serve here again; no answer: left to :meth:`resolve`."""
        record.phase = "committing"
        self._save(record)
        delay, last = RESOLVE_BACKOFF[0], ""
        for attempt in range(COMMIT_TRIES):
            try:
                phase = await self._ask_commit(record)
            except MigrationFailed as exc:
                last = str(exc)
                await asyncio.sleep(delay * (2 ** attempt))
                continue
            self._crash_point("source_after_commit")
            if phase is Phase.COMMITTED:
                self._done(record)
                report.step("target committed: it serves")
                return
            report.step("target aborted the move: restart at source from the checkpoint")
            await self._restart(record)
            raise MigrationFailed(f"{record.target} aborted move {record.epoch} of {record.name}")
        self._spawn(self.resolve(record, forever=True))
        raise HandoverPending(f"{record.target} did not answer the commit of move {record.epoch} "
                              f"({last})")

    async def resolve(self, record: SourceRecord, forever: bool = False) -> str:
        """Settle a move this router stopped an object for (see the module docstring):
        ``committed`` (the target serves) or ``restarted`` (the object serves here). A
        ``committing`` record whose target does not answer is asked again with back-off."""
        if record.held:
            return await self._resolve_held(record, forever)
        if record.phase == "starting":
            await self._abort(record)
            self._done(record)
            hosted = self.hosting.objects.get(record.name)
            if hosted is None:
                log.error("move %s of %s never stopped it here, yet it does not run here",
                          record.epoch, record.name)
            elif hosted.process is not None:
                # A pre-copy source that died between its hold and its record left the
                # object held: it serves again (a no-op for one that never was held).
                try:
                    await hosted.process.call("serve")
                except ObjectProcessError as exc:
                    log.warning("move %s of %s: the object here did not take serve: %s",
                                record.epoch, record.name, exc)
            return "kept"
        if record.phase == "stopped":
            await self._give_back(record)
            return "restarted"
        if await self._until_decided(record, self._ask_commit, forever) is Phase.COMMITTED:
            self._done(record)
            if record.vm is not None and self.vm is not None and record.vm[0] in self.vm.vms:
                await self.vm.detach(*record.vm)
            return "committed"
        await self._restart(record)
        return "restarted"

    async def _until_decided(self, record: SourceRecord,
                             ask: Callable[[SourceRecord], Awaitable[Phase]], forever: bool) -> Phase:
        """The target's decision on ``record``'s move, asked with ``ask`` (a commit or a
        cancel: either gets the decision); no answer: :class:`HandoverPending`, or with
        ``forever`` asked again with back-off until the target answers."""
        delay = RESOLVE_BACKOFF[0]
        while True:
            try:
                phase = await ask(record)
            except MigrationFailed as exc:
                if not forever:
                    raise HandoverPending(str(exc)) from None
                log.warning("move %s of %s undecided: %s; asking again in %.1fs",
                            record.epoch, record.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESOLVE_BACKOFF[1])
                continue
            if phase is Phase.COMMITTED:
                log.info("move %s of %s committed at %s", record.epoch, record.name, record.target)
            else:
                log.warning("move %s of %s aborted at %s: the object serves here again",
                            record.epoch, record.name, record.target)
            return phase

    async def _migrate_mbb(self, move: _Move, report: MigrationReport) -> None:
        """Make the new place reachable first, then hand the state over at one instant.

        The target's warm instance is registered (with ``S``: the HOA bicasts) before the
        source stops, so every request from then on reaches the target, which queues it. The
        source's final checkpoint therefore covers exactly what the target must not replay,
        whichever way a request travelled (through the tunnel, or straight to a source that is
        its client's own gateway). The target serves only once the source commits.
        """
        hosted = move.hosted
        assert hosted.process is not None and hosted.client is not None
        report.step("start warm instance at target, register with S")
        # On disk before the start goes: a crash of this agent from here until the object
        # stops leaves the target a WARM instance that its restart cancels at once.
        starting = SourceRecord(hosted.name, move.epoch, move.target, move.mode, "starting",
                                None, move.config)
        self.departures[starting.name] = starting
        self._save(starting)
        try:
            answer = await self._call(move.target, ControlType.MIGRATE, self._start_body(move, warm=True))
            report.target_registration = answer.get("registration")
            report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
            report.step("target registered (its instance queues requests)")
            self._crash_point("source_after_start")
            await self._release_binding(move, answer, report)
            stopped = await self.hosting.cmd_object_stop(hosted.name, deregister=False)
            state = await self._final_state(move, stopped)
        except _Crashed:
            raise
        except Exception:
            # Failed before a final checkpoint was kept (the start refused or cut, the object
            # gave no state): the target may hold a WARM instance, which cannot commit.
            await self._abort(starting)
            self._done(starting)
            await self._register_again(move)
            raise
        record = self._keep(move, state)
        report.step("source stopped with its final checkpoint (kept on disk)")
        self._crash_point("source_after_stop")
        try:
            self.check_checkpoint(hosted.name, state)  # it may have grown since the check
            await self._call(move.target, ControlType.STATE_TRANSFER,
                             {"name": hosted.name, "epoch": move.epoch, "state": state})
            report.step("target restored (held until the commit)")
        except MigrationFailed:
            report.step("transfer failed: cancel at target, restart at source from the checkpoint")
            await self._give_back(record)
            raise
        self._crash_point("source_after_transfer")
        await self._commit(record, report)

    async def _migrate_precopy(self, move: _Move, report: MigrationReport) -> None:
        """Make-before-break with pre-copy: the target gets the state while the object still
        serves here, and at the switch only what changed, with the commit (handover's
        docstring says what is on disk before which message)."""
        hosted = move.hosted
        assert hosted.process is not None and hosted.client is not None
        report.step("start warm instance at target, register with S")
        starting = SourceRecord(hosted.name, move.epoch, move.target, move.mode, "starting",
                                None, move.config)
        self.departures[starting.name] = starting
        self._save(starting)
        try:
            body = dict(self._start_body(move, warm=True), state=move.base, precopy=True)
            answer = await self._call(move.target, ControlType.MIGRATE, body)
            report.target_registration = answer.get("registration")
            report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
            report.step("target registered with the pre-copy (its instance queues requests)")
            self._crash_point("source_after_start")
            self._crash_point("source_after_transfer")
        except _Crashed:
            raise
        except Exception:
            # Nothing stopped or held here: the object serves on; the target holds at most a
            # WARM or PRECOPIED instance, which cannot commit without the final state.
            await self._abort(starting)
            self._done(starting)
            await self._register_again(move)
            raise
        # Deregistered first, held after: the old foreign agent drops its route to this
        # router before relaying the reply, so once the reply is here nothing more comes
        # that way, and what it had already sent arrived before the reply (one link, in
        # order) and is served or queued. Overlapped, the home address went while the old
        # foreign agent still routed it here: a request then looped between the two routers
        # until its TTL ran out (one of co12's, make-before-break from net 12). After the
        # hold, what reaches this router is routed on to the home agent and the target.
        try:
            await self._let_go_of_binding(move, answer, report)
        except _Crashed:
            raise
        except Exception as exc:  # the binding here could not be dropped: serve on here
            await self._abort(starting)
            self._done(starting)
            await self._register_again(move)
            report.step("source binding not deregistered: the object serves here on")
            raise MigrationFailed(f"could not deregister {move.hosted.name} here: {exc}") from None
        state = await self._hold_here(move, starting, report)
        assert move.base is not None
        base = move.base
        record = self._keep(move, state, phase="committing", held=True)
        self._keep_held_in_registry(record)
        report.step("source held with its final checkpoint (kept on disk)")
        self._crash_point("source_after_stop")
        await self._switch(record, base, report)

    async def _register_again(self, move: _Move) -> None:
        """After a move that failed before the hold: register this care-of address again
        (without ``S``), which replaces at the HOA the binding the target's instance may
        still hold (a target that died keeps it until its lifetime ends), as the restarted
        object of a stop-copy move does. Best effort: the client's own loop renews anyway."""
        client = move.hosted.client
        if client is None or move.hosted.name not in self.hosting.objects:
            return
        try:
            if client.at_home or client.dark:  # the home link back, every binding gone
                await client.claim_home()
                return
            await client.register()
        except Exception as exc:  # noqa: BLE001 - the move's own error is what is reported
            log.warning("move %s of %s: registering here again failed: %s", move.epoch,
                        move.hosted.name, exc)

    async def _let_go_of_binding(self, move: _Move, answer: dict[str, Any],
                                 report: MigrationReport) -> None:
        """Deregister this care-of address (the target's binding stays) and stop the
        object's registration client, which would otherwise register here again while the
        object is held."""
        await self._release_binding(move, answer, report)
        client = move.hosted.client
        assert client is not None
        await client.stop(deregister=False)
        move.hosted.client = None

    async def _release_binding(self, move: _Move, answer: dict[str, Any],
                               report: MigrationReport) -> None:
        """The source's own binding goes, the target's stays: away, this care-of address
        is deregistered; at home, the instance says it leaves (the home agent kept the
        target's binding on standby until then and serves it from now on)."""
        client = move.hosted.client
        assert client is not None
        mine = client.current
        theirs = (answer.get("registration") or {}).get("care_of_address")
        if client.at_home and move.config.get("part", "primary") == "primary":
            # The HOA kept the target's binding on standby: the home link is this
            # instance's until it says it leaves (agent.mobility.bindings). (A part's
            # binding with its nested home agent is never a standby one.)
            attempt = await client.leave_home()
            if attempt.code not in ACCEPTED_CODES:
                raise MigrationFailed(f"the home agent did not take {move.hosted.name}'s "
                                      f"leave-home: {attempt.error or attempt.code}")
            report.step("source left home (the home agent serves the target's binding)")
        elif mine is not None and mine.care_of_address != theirs:
            await client.deregister()  # lifetime 0 for this care-of address only
            report.step("source binding deregistered")

    async def _hold_here(self, move: _Move, starting: SourceRecord | None, report: MigrationReport) -> Any:
        """Hold the object (it runs on, queueing what it gets, answering nothing), take its
        home address away, and take its final checkpoint (the queue in it as ``pending``).
        An object that does not answer, or gives no checkpoint, is killed (never left
        half-stopped) after the target's instance is cancelled."""
        hosted = move.hosted
        assert hosted.process is not None
        try:
            await hosted.process.call("hold")
            hosted.held = True
            try:
                await self.hosting._home_address(hosted.home_address, add=False)
                hosted.address_gone = True
            except ControlError as exc:
                log.warning("move %s of %s: %s", move.epoch, hosted.name, exc)
            state = await hosted.process.call("get_state")
        except _Crashed:
            raise
        except ObjectProcessError as exc:
            if starting is not None:
                await self._abort(starting)
                self._done(starting)
            await self.hosting.kill(hosted.name, f"no final checkpoint at a move's hold: {exc}")
            raise ObjectKilled(f"object {hosted.name} gave no final checkpoint ({exc}): "
                               "it cannot be started again with its state") from None
        try:
            self.check_checkpoint(hosted.name, state)  # it may have grown since the check
        except MigrationFailed:
            # It cannot move, but it can serve here again, from that state.
            if starting is not None:
                await self._abort(starting)
            report.step("final checkpoint cannot move: the object starts here again")
            await self._restart_held(self._keep(move, state, held=True))
            raise
        report.step("source held, home address removed, final checkpoint taken")
        return state

    def _keep_held_in_registry(self, record: SourceRecord) -> None:
        """The hosted registry's entry: the final checkpoint, and no registration, so an
        agent restarted before the move is decided takes the held object over without
        pulling the binding back from a target that may serve."""
        registry = getattr(self.hosting, "registry", None)
        if registry is None or record.name not in registry.entries:
            return
        try:
            # Not fsynced: it is on the switch's path, and only an agent's crash (which
            # keeps the page cache) must find it; a machine's ends the move's both ends.
            registry.update(record.name, durable=False, register=False,
                            checkpoint=record.state, checkpoint_at=time.time())
        except RegistryError as exc:
            log.error("move %s of %s: the hosted registry was not updated (%s): an agent "
                      "restarted now would register the held object", record.epoch, record.name, exc)

    def _commit_body(self, record: SourceRecord, patch: dict[str, Any] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"action": "commit", "name": record.name, "epoch": record.epoch}
        if patch is None:
            body["state"] = record.state
        else:
            body.update(delta=True, state={"patch": patch, "digest": merge_patch.digest(record.state)})
        return body

    async def _switch(self, record: SourceRecord, base: dict[str, Any], report: MigrationReport) -> None:
        """One message: the commit with what changed since the pre-copy (or the whole final
        checkpoint when a patch cannot say it, and on every repeat). Committed: stop the
        held instance here; aborted: start here again from the newest state; no answer
        after a few tries: left to :meth:`_resolve_held` (a cancel decides)."""
        patch = merge_patch.diff(base, record.state)
        body = self._commit_body(record, patch)
        report.final_bytes = len(json.dumps(body["state"], separators=(",", ":")))
        whole = len(json.dumps(record.state, separators=(",", ":")))
        if patch is not None and report.final_bytes >= whole:  # a small checkpoint: it is shorter
            patch, body, report.final_bytes = None, self._commit_body(record, None), whole
        report.step(f"commit sent with the final state ({'patch' if patch is not None else 'whole'}, "
                    f"{report.final_bytes} bytes)")
        delay, last = RESOLVE_BACKOFF[0], ""
        for attempt in range(COMMIT_TRIES):
            try:
                phase = _phase(await self._call(record.target, ControlType.MIGRATE, body))
            except MigrationFailed as exc:
                last = str(exc)
                body = self._commit_body(record, None)  # a repeat carries it whole
                await asyncio.sleep(delay * (2 ** attempt))
                continue
            self._crash_point("source_after_commit")
            if phase is Phase.COMMITTED:
                report.step("target committed: it serves")
                await self._stop_held(record, linger=True)
                self._done(record)
                report.step("source let go of its held instance (its process ends after)")
                return
            report.step("target aborted the move: the object starts here again")
            await self._restart_held(record)
            raise MigrationFailed(f"{record.target} aborted move {record.epoch} of {record.name}")
        self._spawn(self._resolve_held(record, forever=True))
        raise HandoverPending(f"{record.target} did not answer the commit of move {record.epoch} "
                              f"({last})")

    async def _stop_held(self, record: SourceRecord, linger: bool = False) -> Any:
        """Stop the held instance here, if it is (still, or taken over again) hosted: its
        state (None: it gave none). ``linger``: the target serves, its state is not wanted:
        the process ends after the move's report (HostingRole.cmd_object_stop)."""
        if record.name not in self.hosting.objects:
            return None
        stopped = await self.hosting.cmd_object_stop(record.name, deregister=False, linger=linger)
        return stopped.get("state")

    async def _restart_held(self, record: SourceRecord) -> None:
        """The target can no longer commit: serve here again, from the held instance's own
        state when it gives one (it is the record's plus what it queued since), else from
        the record's."""
        newest = await self._stop_held(record)
        if isinstance(newest, dict):
            record.state = newest
        await self._restart(record)

    async def _resolve_held(self, record: SourceRecord, forever: bool = False) -> str:
        """A pre-copy move whose commit may have gone: a cancel decides (``aborted`` if the
        target never took the commit, else ``committed``); asked again with back-off until
        the target answers. Nothing serves here meanwhile (the instance is held)."""
        if await self._until_decided(record, self._send_cancel, forever) is Phase.COMMITTED:
            await self._stop_held(record)
            self._done(record)
            return "committed"
        await self._restart_held(record)
        return "restarted"

    async def _migrate_bbm_held(self, move: _Move, report: MigrationReport) -> None:
        """Break-before-make in one round trip: hold here (record ``committing``, ``held``,
        on disk first), then a MIGRATE start with the checkpoint and ``commit``; the target
        serves once registered. A lost answer is decided by a cancel (:meth:`_decide_held`)."""
        report.step("hold source, keep checkpoint")
        client = move.hosted.client
        if client is not None:  # no renewal from here: the target's registration replaces it
            await client.stop(deregister=False)
            move.hosted.client = None
        state = await self._hold_here(move, None, report)
        record = self._keep(move, state, phase="committing", held=True)
        self._keep_held_in_registry(record)
        self._crash_point("source_after_stop")
        try:
            body = dict(self._start_body(move, False, state), commit=True)
            answer = await self._call(move.target, ControlType.MIGRATE, body)
            phase = _phase(answer)
        except (AgentError, TypeError, ValueError) as exc:  # the start body too: never half-stopped
            await self._decide_held(record, report, exc)
            return
        report.target_registration = answer.get("registration")
        report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
        report.step("target registered with the checkpoint and serves")
        self._crash_point("source_after_start")
        if phase is not Phase.COMMITTED:
            report.step("target aborted the move: the object starts here again")
            await self._restart_held(record)
            raise MigrationFailed(f"{record.target} aborted move {record.epoch} of {record.name}")
        await self._stop_held(record, linger=True)
        self._done(record)
        report.step("source let go of its held instance (its process ends after)")

    async def _decide_held(self, record: SourceRecord, report: MigrationReport, exc: Exception) -> None:
        """The message that could commit got no answer: a cancel decides. Committed (only
        its answer was lost): the move is done. Aborted: the object serves here again and
        the move failed. No answer: undecided, left to :meth:`_resolve_held`. A message that
        never left (:class:`MoveNotSent`, or a body that could not even be built) cannot have
        committed anything: the object serves here again at once, whatever the target says."""
        if isinstance(exc, MoveNotSent) or not isinstance(exc, MigrationFailed):
            report.step("the move's message never left: the object serves here again")
            await self._restart_held(record)
            if isinstance(exc, MigrationFailed):
                raise exc
            raise MigrationFailed(f"cannot send MIGRATE start: {exc}") from None
        try:
            phase = await self._send_cancel(record)
        except MigrationFailed as again:
            self._spawn(self._resolve_held(record, forever=True))
            raise HandoverPending(f"{record.target} did not answer move {record.epoch} ({exc}; "
                                  f"then {again})") from None
        if phase is Phase.COMMITTED:
            report.step("target had committed (its answer was lost): it serves")
            await self._stop_held(record)
            self._done(record)
            return
        report.step("target failed: cancelled there, the object starts here again")
        await self._restart_held(record)
        if isinstance(exc, MigrationFailed):
            raise exc
        raise MigrationFailed(f"cannot send MIGRATE start: {exc}") from None

    async def _migrate_bbm(self, move: _Move, report: MigrationReport) -> None:
        report.step("stop source, keep checkpoint")
        stopped = await self.hosting.cmd_object_stop(move.hosted.name, deregister=False)
        state = await self._final_state(move, stopped)
        record = self._keep(move, state)
        self._crash_point("source_after_stop")
        try:
            self.check_checkpoint(move.hosted.name, state)  # it may have grown since the check
            answer = await self._call(move.target, ControlType.MIGRATE, self._start_body(move, False, state))
        except (AgentError, TypeError, ValueError) as exc:  # the start body too: never half-stopped
            report.step("target failed: cancel at target, restart at source from the checkpoint")
            await self._give_back(record)
            if isinstance(exc, MigrationFailed):
                raise
            raise MigrationFailed(f"cannot send MIGRATE start: {exc}") from None
        report.target_registration = answer.get("registration")
        report.registration_rtt_ms = _ms(answer.get("registration_rtt"))
        report.step("target registered with the checkpoint (held until the commit)")
        self._crash_point("source_after_start")
        await self._commit(record, report)


def _phase(answer: dict[str, Any]) -> Phase:
    """A target's decision from its answer; anything else is no answer at all."""
    try:
        return Phase(answer.get("phase"))
    except ValueError:
        raise MigrationFailed(f"the target answered no decision: {answer.get('phase')!r}") from None
