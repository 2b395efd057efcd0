"""The hand-over protocol of a move: who may serve an object while it moves, and how both
ends agree on it after a crash, a cut connection or a lost message (issue 13).

Every move has an *epoch*: a random id the source picks, carried by every MIGRATE and
STATE_TRANSFER of that move. The target alone decides, once per epoch, whether the move
*commits* (its instance serves) or *aborts* (its instance is dropped and deregistered):
the first of a ``commit`` message, an ``abort`` message or its deadline wins, and every
later message of that epoch gets the same answer (idempotent). The source never lets go of
the object without that answer:

Target (:class:`Arrivals`), per object::

    stop-copy:  start ──> WARM ──STATE_TRANSFER──> RESTORED ──commit──> COMMITTED (serves)
    pre-copy:   start (with a pre-copy) ──> PRECOPIED ──────────────────commit + delta──┘
                           │               │                     │
                           └─ abort / deadline ──────────────────┴──────> ABORTED (dropped)

A WARM, PRECOPIED or RESTORED instance never answers a request (it queues them); only a
commit makes it serve (replaying its queue). A PRECOPIED arrival holds, in its agent's memory
only, a checkpoint the source took while it still served; its commit carries the final
checkpoint as a merge patch against it (RFC 7386, :mod:`agent.hosting.merge_patch`) with the
final checkpoint's digest, or whole: the target restores the result and serves in one step,
and a result whose digest differs is refused (no decision: the source's cancel decides). Its deadline (the source's ``deadline`` seconds, renewed by
each message of the move) drops it when the source goes silent: a lost abort, a source that
died, a cut transfer. A break-before-make arrival starts RESTORED (its state came with it).
The target keeps each decision (tombstones too) in ``<run>/handover/<router>/arrivals.json``; after a
crash of its agent, an arrival that was not committed is aborted.

Source (:class:`SourceRecord`), per object, ``<run>/handover/<router>/<name>.json`` (root-only,
written atomically): written right after the object stopped, with the final checkpoint and
what it takes to start it again, *before* the state goes anywhere; phase ``stopped``, then
``committing`` just before the commit is sent. It is removed only once the target answered
``committed`` (the move is done) or the object serves at the source again. Resolving a
record (after any failure, or by the agent's next start after a crash):

* ``starting`` (make-before-break only, written before the MIGRATE start goes, without a
  state): the object never stopped here, so it still runs here (it outlives its agent) and
  the target holds at most a WARM instance, which cannot commit. Abort it at once, so the
  target is free for the next move instead of refusing it until its deadline.
* ``stopped``: the target cannot have committed (no commit was sent). Abort it (best
  effort) and start the object here from the record's checkpoint: a target that did not
  hear the abort is still only WARM/RESTORED (silent) and drops itself at its deadline.
* ``committing``: ask the target to commit (again). ``committed``: done. ``aborted``: start
  here from the checkpoint. No answer: the record stays and is asked again with back-off;
  the object is restarted only on an answer, because a target that did commit serves.

Pre-copy (make-before-break, the default transfer): the source keeps its object *running,
held*, instead of stopping it, so the object's latest state lives in its process (objects
outlive their agent) as well as on disk. What is on disk before which message:

1. ``starting`` record (no state), written, before the MIGRATE start (as above).
2. The pre-copy (a checkpoint taken while the object serves, sent with the MIGRATE start,
   ``precopy``) needs nothing new on disk: the object still serves here, and a failure or
   a crash resolves like ``starting`` (cancel the target; nothing ever stopped here).
3. The source deregisters its binding and stops its registration client while it holds the
   object (the deregistration's round trip overlaps the hold),
   takes its home address away and takes the final checkpoint (``get_state``: the held
   object's queue is in it as ``pending``). Then, before the commit goes, the record
   becomes ``committing`` with ``held`` set and the final checkpoint, written; the hosted
   registry's entry gets that checkpoint and ``register: false``, so an agent restarted
   from here takes the held object over without registering it (it must not pull the
   binding back from a target that may serve).
4. One MIGRATE ``commit`` carries the patch (or the whole checkpoint) and the digest; the
   target restores, serves and answers ``committed``. Only then does the source stop its
   held instance and remove the record.

A ``held`` record is resolved by a *cancel*, not a commit: the target answers ``aborted``
if it never took the commit (the cancel decides) or ``committed`` if it did. Committed: the
held instance here (taken over after a crash, or still hosted) is stopped. Aborted: it is
stopped and the object starts here again from the newest of its state and the record's
(never from a checkpoint older than the one the target might have served from). No answer:
asked again with back-off, forever; nothing starts here meanwhile (held: it answers none).

So at every step exactly one instance answers, with the latest checkpoint: never two (a
target serves only after a commit, which the source asks for only after it stopped, and the
source restarts only once the target can no longer commit), never none for longer than the
target's deadline or the two agents' restarts.

Written, not fsynced (issue 14): every record and ledger write replaces its file atomically
(a new file, renamed over the old), so a reader finds the old or the new, never half; it is
not flushed to the disk before the move goes on, because the ``committing`` record is
written while the object is held (its fsync was client-visible disruption: for a 10 KB
record 0.15-0.4 ms more at the median on the test machine's ext4 when idle, 0.6-2 ms more
under load, and its p95 up to 8 ms against 2-4 ms; measured) and because the
failure it would guard against cannot happen here: an agent that dies (``kill -9``, the
fault tests' crash) leaves the page cache to its restart, and a machine crash takes every
router, object and target of the run with it (they share one kernel), leaving no move to
resolve. ``HandoverStore(durable=True)`` fsyncs every write, for ends on separate machines.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

#: Default seconds a target waits for the next message of a move before it drops its instance.
DEFAULT_DEADLINE = 15.0
#: Bounds of a source's ``deadline`` (the MIGRATE field).
MIN_DEADLINE, MAX_DEADLINE = 0.5, 600.0
#: Decided arrivals remembered (so a late message of their epoch gets the same answer).
MAX_DECIDED = 256
HANDOVER_DIR = "handover"
ARRIVALS_FILE = "arrivals.json"


class HandoverError(AgentError):
    """A message that does not fit the move's state (a transfer to an aborted arrival, a
    second move of an object whose first is undecided)."""


class Phase(str, Enum):
    WARM = "warm"
    PRECOPIED = "precopied"
    RESTORED = "restored"
    COMMITTED = "committed"
    ABORTED = "aborted"

    @property
    def decided(self) -> bool:
        return self in (Phase.COMMITTED, Phase.ABORTED)


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass
class Arrival:
    """One move arriving at the target: its object, epoch, phase and (monotonic) deadline."""

    name: str
    epoch: str
    phase: Phase
    deadline: float
    timeout: float
    #: The pre-copied checkpoint (PRECOPIED), in memory only: a restarted target aborts.
    base: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "phase": self.phase.value}


class Arrivals:
    """The target's ledger: pure state, an injected clock, and ``persist`` called with the
    whole ledger (as JSON-able list) after every decision or new arrival."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 persist: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.clock = clock
        self.persist = persist
        self.moves: dict[tuple[str, str], Arrival] = {}

    # --- queries ---------------------------------------------------------------------------

    def pending(self, name: str) -> Arrival | None:
        """The undecided arrival of ``name``, if any."""
        for arrival in self.moves.values():
            if arrival.name == name and not arrival.phase.decided:
                return arrival
        return None

    def get(self, name: str, epoch: str) -> Arrival | None:
        return self.moves.get((name, epoch))

    def status(self) -> list[dict[str, Any]]:
        return [a.as_dict() for a in self.moves.values()]

    # --- transitions -----------------------------------------------------------------------

    def begin(self, name: str, epoch: str, timeout: float, restored: bool = False) -> Arrival:
        """A MIGRATE start: WARM (or RESTORED when its state came with it)."""
        if (name, epoch) in self.moves:
            raise HandoverError(f"move {epoch} of {name} already started here")
        other = self.pending(name)
        if other is not None:
            raise HandoverError(f"{name} is already arriving here (move {other.epoch}, {other.phase.value})")
        arrival = Arrival(name, epoch, Phase.RESTORED if restored else Phase.WARM,
                          self.clock() + timeout, timeout)
        self.moves[(name, epoch)] = arrival
        self._changed()
        return arrival

    def restored(self, name: str, epoch: str) -> Arrival:
        """A STATE_TRANSFER may be taken: the arrival is WARM (or RESTORED: a repeat)."""
        arrival = self.moves.get((name, epoch))
        if arrival is None or arrival.phase.decided:
            why = "unknown here" if arrival is None else arrival.phase.value
            raise HandoverError(f"move {epoch} of {name} is {why}: no state is taken")
        arrival.phase = Phase.RESTORED
        arrival.deadline = self.clock() + arrival.timeout
        return arrival

    def precopied(self, name: str, epoch: str, state: Any) -> Arrival:
        """A pre-copy may be taken: the arrival is WARM (or PRECOPIED: a repeat, whose newer
        checkpoint replaces the older)."""
        arrival = self.moves.get((name, epoch))
        if arrival is None or arrival.phase not in (Phase.WARM, Phase.PRECOPIED):
            why = "unknown here" if arrival is None else arrival.phase.value
            raise HandoverError(f"move {epoch} of {name} is {why}: no pre-copy is taken")
        arrival.phase, arrival.base = Phase.PRECOPIED, state
        arrival.deadline = self.clock() + arrival.timeout
        return arrival

    def touch(self, name: str, epoch: str) -> None:
        """A message of the move came: its deadline starts again."""
        arrival = self.moves.get((name, epoch))
        if arrival is not None and not arrival.phase.decided:
            arrival.deadline = self.clock() + arrival.timeout

    def commit(self, name: str, epoch: str, final: bool = False) -> tuple[Phase, bool]:
        """The source asks to commit: (the decision, whether it is new: then the caller
        makes the instance serve). Only a RESTORED arrival commits, or any undecided one when
        the commit carried the ``final`` state (pre-copy); an unknown epoch was aborted (it
        never started here, or this agent restarted before it committed)."""
        arrival = self.moves.get((name, epoch))
        if arrival is None:
            return Phase.ABORTED, False
        if arrival.phase.decided:
            return arrival.phase, False
        if arrival.phase is not Phase.RESTORED and not final:
            raise HandoverError(f"move {epoch} of {name} has no state yet: it cannot commit")
        arrival.phase, arrival.base = Phase.COMMITTED, None
        self._changed()
        return Phase.COMMITTED, True

    def abort(self, name: str, epoch: str | None) -> tuple[Phase, Arrival | None]:
        """The source asks to abort (``epoch`` None: any undecided arrival of ``name``):
        (the decision, the arrival to drop when it is new, else None)."""
        arrival = self.moves.get((name, epoch)) if epoch else self.pending(name)
        if arrival is None:
            return Phase.ABORTED, None
        if arrival.phase.decided:
            return arrival.phase, None
        arrival.phase, arrival.base = Phase.ABORTED, None
        self._changed()
        return Phase.ABORTED, arrival

    def expired(self) -> list[Arrival]:
        """Undecided arrivals past their deadline, now aborted: the caller drops each."""
        now = self.clock()
        gone = [a for a in self.moves.values() if not a.phase.decided and a.deadline <= now]
        for arrival in gone:
            arrival.phase = Phase.ABORTED
            log.warning("move %s of %s: no word from its source within %.1fs: aborted",
                        arrival.epoch, arrival.name, arrival.timeout)
        if gone:
            self._changed()
        return gone

    def next_deadline(self) -> float | None:
        deadlines = [a.deadline for a in self.moves.values() if not a.phase.decided]
        return min(deadlines) if deadlines else None

    # --- persistence -----------------------------------------------------------------------

    def load(self, records: list[dict[str, Any]]) -> list[Arrival]:
        """A restarted agent's ledger: decisions are kept; an undecided arrival is aborted
        (returned: the caller drops what is left of it)."""
        undecided = []
        for record in records[-MAX_DECIDED:]:
            try:
                name, epoch, phase = str(record["name"]), str(record["epoch"]), Phase(record["phase"])
            except (KeyError, TypeError, ValueError):
                log.warning("handover ledger: unreadable entry %r skipped", record)
                continue
            arrival = Arrival(name, epoch, phase, 0.0, 0.0)
            if not phase.decided:
                arrival.phase = Phase.ABORTED
                undecided.append(arrival)
            self.moves[(name, epoch)] = arrival
        if undecided:
            self._changed()
        return undecided

    def _changed(self) -> None:
        decided = [k for k, a in self.moves.items() if a.phase.decided]
        for key in decided[:max(0, len(decided) - MAX_DECIDED)]:
            del self.moves[key]
        if self.persist is not None:
            self.persist(self.status())


#: A source record's phases: ``starting`` (a make-before-break start was sent, the object
#: still runs here), ``stopped`` (the object stopped here with this checkpoint), ``committing``
#: (with ``held``: the object runs here held, pre-copy; resolved by a cancel).
PHASES = ("starting", "stopped", "committing")


@dataclass
class SourceRecord:
    """What a source keeps of an object it stopped for a move until the move is decided."""

    name: str
    epoch: str
    target: str
    mode: str
    phase: str  # "starting" | "stopped" | "committing"
    state: Any
    #: What starting it again takes: its registration config, and its code (spec and
    #: resources) or its VM (the VM's name and object, and the provision body of that
    #: object alone, which can bring the VM back after an agent restart).
    config: dict[str, Any]
    spec: str | None = None
    resources: dict[str, Any] | None = None
    vm: list[str] | None = None
    vm_body: dict[str, Any] | None = None
    #: Pre-copy: the object was not stopped here but *held* (it runs, answers none, and an
    #: agent restarted meanwhile takes it over unregistered); resolved by a cancel.
    held: bool = False
    #: Wall clock of the record's last write.
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "SourceRecord":
        known = {f for f in cls.__dataclass_fields__}
        record = cls(**{k: v for k, v in doc.items() if k in known})
        if record.phase not in PHASES or not isinstance(record.config, dict):
            raise ValueError(f"not a hand-over record: phase {record.phase!r}")
        return record


class HandoverStore:
    """One router's ``<run>/handover/<router>/``: its records as a source and its ledger as
    a target, root-only (0700 directories, 0600 files), each written atomically (a temporary
    file beside it, renamed; fsynced first only when ``durable``: the module's docstring says
    why not by default). Per router, since every router of a run shares the
    run directory: a restarted agent must resolve only its own moves and abort only its own
    arrivals, never the other end's (the source's restart once read the target's ledger and
    dropped the very object it was serving)."""

    def __init__(self, run_dir: str | os.PathLike[str], router: str, durable: bool = False) -> None:
        if not router or "/" in router or router.startswith("."):
            raise ValueError(f"not a router name for a hand-over directory: {router!r}")
        self.dir = Path(run_dir) / HANDOVER_DIR / router
        self.durable = durable
        self._made = False

    def _write(self, name: str, doc: Any) -> None:
        data = json.dumps(doc, separators=(",", ":")).encode()
        path = self.dir / name
        tmp = self.dir / f".{name}.{secrets.token_hex(4)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        if not self._made:
            self._make_dirs()
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # removed since (a cleaned run): made again, once
            self._make_dirs()
            fd = os.open(tmp, flags, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _make_dirs(self) -> None:
        # Inside the run directory (which is never made here): handover/, then the router's.
        for path in (self.dir.parent, self.dir):
            path.mkdir(mode=0o700, exist_ok=True)
        self._made = True

    def save(self, record: SourceRecord) -> None:
        """OSError (a full or read-only run directory) is the caller's to report."""
        record.at = time.time()
        self._write(f"{record.name}.json", record.to_json())

    def remove(self, name: str) -> None:
        try:
            (self.dir / f"{name}.json").unlink(missing_ok=True)
        except OSError as exc:
            log.error("hand-over record of %s not removed: %s", name, exc)

    def records(self) -> list[SourceRecord]:
        out = []
        if not self.dir.is_dir():
            return out
        for path in sorted(self.dir.glob("*.json")):
            if path.name == ARRIVALS_FILE:
                continue
            try:
                out.append(SourceRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("hand-over record %s unreadable: %s (left in place)", path, exc)
        return out

    def save_arrivals(self, ledger: list[dict[str, Any]]) -> None:
        try:
            self._write(ARRIVALS_FILE, ledger)
        except OSError as exc:
            log.error("hand-over ledger not written to %s: %s (kept in memory)", self.dir, exc)

    def arrivals(self) -> list[dict[str, Any]]:
        path = self.dir / ARRIVALS_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("hand-over ledger %s unreadable: %s", path, exc)
            return []
        return doc if isinstance(doc, list) else []
