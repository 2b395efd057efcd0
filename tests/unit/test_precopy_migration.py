"""Pre-copy moves (issue 14, item 2): the target gets a checkpoint taken while the source
serves (with the MIGRATE start), and at the switch one commit carries only what changed (a
merge patch) with the final checkpoint's digest. Wired through the ``Net`` harness of test_migration_handover: a crash
of either end at each step, a lost or refused pre-copy, a lost commit answer, a refused
commit; each ends with exactly one instance serving, with the latest state."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.fields import FieldError
from agent.hosting import merge_patch
from agent.hosting import migration as migration_mod
from agent.hosting.handover import HandoverError, Phase
from agent.hosting.migration_fields import check_migrate
from test_migration_handover import TARGET, HeldProcess, Net, TargetHosting, run
from test_migration_role import FakeClient, FakeHosting
from test_migration_role import run_dir  # noqa: F401 - autouse: each router its run directory

#: What the source's object answers get_state with, in turn: before the move (the check, the
#: pre-copy's base) and held at the switch (the final one: two more served, one queued).
#: Clients served before the move, unchanged by it (what a patch need not carry again).
OTHERS = {f"client-{i}": {"last": i, "reply": {"ok": True, "result": i}} for i in range(40)}
CHECK = {"object": {"count": 40}, "seen": dict(OTHERS, co14={"last": 40}), "served": 40, "pending": []}
PRECOPY = {"object": {"count": 41}, "seen": dict(OTHERS, co14={"last": 41}, co12={"last": 3}),
           "served": 41, "pending": []}
FINAL = {"object": {"count": 43}, "seen": dict(OTHERS, co14={"last": 43}), "served": 43,
         "pending": [[7, {"client": "co14", "seq": 44}, ["10.14.0.10", 5000]]]}


class LiveClient(FakeClient):
    async def stop(self, deregister: bool = True) -> None:
        self.stopped = True

    async def register(self) -> None:
        self.history.append("register")


class LiveProcess:
    """The source's object: serving until held; each get_state answers the next state."""

    def __init__(self, states: list[Any]) -> None:
        self.spec = "agent.objects.counter:Counter"
        self.states = list(states)
        self.calls: list[str] = []
        self.held = False

    @property
    def state(self) -> Any:
        return self.states[0]

    async def call(self, cmd: str, **_: Any) -> Any:
        self.calls.append(cmd)
        if cmd == "hold":
            self.held = True
            return {"queued": 1}
        if cmd == "serve":
            self.held = False
            return {"replayed": 1}
        assert cmd == "get_state", cmd
        state = self.states[0] if len(self.states) == 1 else self.states.pop(0)
        return copy.deepcopy(state)


class Registry:
    def __init__(self) -> None:
        self.entries: dict[str, dict] = {"counter": {"register": True}}

    def update(self, name: str, **fields: Any) -> None:
        self.entries[name] = dict(self.entries[name], **fields)


class SourceHosting(FakeHosting):
    """A source router whose object runs on when held (its process outlives the agent)."""

    def __init__(self, states: list[Any]) -> None:
        self.states = states
        self.registry = Registry()
        self.addresses: list[tuple[str, bool]] = []
        super().__init__(FINAL)

    def put(self, name: str, process: Any = None) -> None:
        super().put(name, process or LiveProcess(self.states))
        self.objects[name].client = LiveClient(name)  # type: ignore[assignment]

    async def _home_address(self, address: str, add: bool) -> None:
        self.addresses.append((address, add))

    async def cmd_object_stop(self, name: str, deregister: bool = True, linger: bool = False) -> dict:
        hosted = self.objects[name]
        await super().cmd_object_stop(name, deregister, linger)
        return {"state": copy.deepcopy(hosted.process.state)}  # type: ignore[union-attr]


class RestoringTarget(TargetHosting):
    """A target whose restore with ``serve`` makes the held instance serve, in one step."""

    async def cmd_object_restore(self, name: str, state: Any, serve: bool = True) -> dict:
        await super().cmd_object_restore(name, state, serve)
        if serve:
            self.objects[name].process.serving = True  # type: ignore[union-attr]
        return {"replayed": 1}


class PrecopyNet(Net):
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(monkeypatch)
        config = self.source_hosting.objects["counter"].client.config.to_json()  # type: ignore[union-attr]
        self.source_hosting = SourceHosting([PRECOPY, FINAL])
        self.source_hosting.objects["counter"].client.config.to_json = lambda: dict(config)  # type: ignore[union-attr]
        self.target_hosting = RestoringTarget()
        self.source = self.role(self.source_hosting, "r22c")
        self.target = self.role(self.target_hosting, "r14a")

    async def migrate(self, mode: str = "make-before-break", transfer: str = "precopy") -> dict | None:
        return await super().migrate(mode, transfer)

    def serving(self) -> list[str]:
        """A held source instance answers nothing either."""
        where = super().serving()
        hosted = self.source_hosting.objects.get("counter")
        if hosted is not None and getattr(hosted.process, "held", False):
            where.remove("source")
        return where

    def restored(self) -> list[Any]:
        return [e[2] for e in self.target_hosting.log if e[0] == "restore"]


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> PrecopyNet:
    return PrecopyNet(monkeypatch)


# --- the merge patch ---------------------------------------------------------------------------


def test_the_patch_applied_gives_exactly_the_final_checkpoint() -> None:
    patch = merge_patch.diff(PRECOPY, FINAL)
    assert patch is not None
    assert merge_patch.apply(PRECOPY, patch) == FINAL
    assert patch["seen"] == {"co14": {"last": 43}, "co12": None}  # co12 gone: null deletes
    assert "served" in patch and patch["pending"] == FINAL["pending"]
    assert len(merge_patch.canonical(patch)) < len(merge_patch.canonical(FINAL)) / 4
    assert merge_patch.diff(FINAL, FINAL) == {}
    assert PRECOPY["seen"]["co12"] == {"last": 3}  # neither argument changed


def test_a_change_a_merge_patch_cannot_say_gives_no_patch() -> None:
    """RFC 7386: null deletes; a member that becomes null needs the whole checkpoint."""
    assert merge_patch.diff({"object": {"x": 1}}, {"object": {"x": None}}) is None
    assert merge_patch.diff({"object": 1}, {"object": {"a": None}}) is None
    assert merge_patch.digest({"b": 1, "a": 2}) == merge_patch.digest({"a": 2, "b": 1})
    with pytest.raises(merge_patch.PatchError):
        deep: dict = {}
        for _ in range(merge_patch.MAX_DEPTH + 2):
            deep = {"a": deep}
        merge_patch.apply({}, deep)


# --- the wire fields ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"delta": True},  # a delta without its state
    {"delta": "yes", "state": {"patch": {}, "digest": "0" * 64}},
    {"delta": True, "state": {"patch": {}, "digest": "xyz"}},
    {"delta": True, "state": {"patch": [], "digest": "0" * 64}},
    {"delta": True, "state": {"patch": {}, "digest": "0" * 64, "more": 1}},
    {"state": ["not", "a", "checkpoint"]},
])
def test_a_commit_with_a_bad_final_state_is_refused(bad: dict) -> None:
    with pytest.raises(FieldError):
        check_migrate({"action": "commit", "name": "counter", "epoch": "e1", **bad})


def test_a_commit_with_a_good_final_state_and_a_precopy_flag_pass() -> None:
    ok = {"action": "commit", "name": "counter", "epoch": "e1", "delta": True,
          "state": {"patch": {"served": 2}, "digest": "a" * 64}}
    assert check_migrate(ok) == ok
    from test_migration_role import ARRIVAL
    assert check_migrate(dict(ARRIVAL, precopy=True, state=PRECOPY))["precopy"] is True
    for bad in (dict(ARRIVAL, precopy=1, state=PRECOPY), dict(ARRIVAL, precopy=True, state=[1]),
                dict(ARRIVAL, precopy=True), dict(ARRIVAL, precopy=True, state=PRECOPY, warm=False)):
        with pytest.raises(FieldError):
            check_migrate(bad)


# --- moves --------------------------------------------------------------------------------------


def test_a_precopy_move_sends_the_state_early_and_only_the_patch_with_the_commit(net: PrecopyNet) -> None:
    async def go() -> None:
        report = await net.migrate()
        assert report is not None and report["ok"] and report["transfer"] == "precopy", report
        assert net.sent == ["MIGRATE_start", "MIGRATE_commit"]
        [start] = [e for e in net.target_hosting.log if e[0] == "start"]
        assert start[3] is None and start[5] is True  # started held, the pre-copy kept aside
        assert net.restored() == [FINAL]  # exactly the final checkpoint, restored once
        assert net.serving() == ["target"]
        assert net.target.arrivals.get("counter", report["epoch"]).phase is Phase.COMMITTED
        assert report["final_bytes"] < len(merge_patch.canonical(FINAL)) / 3
        assert ("stop", "counter", False) in net.source_hosting.log  # the held one, after
        assert net.source_hosting.lingered == [True]  # its process ends after the report
        assert net.source_hosting.addresses == [("10.16.0.100", False)]
        assert net.records() == [] and net.source.departures == {}
    run(go)


def test_the_source_serves_until_the_switch(net: PrecopyNet) -> None:
    """It is held only after the pre-copy; its registry entry then says: do not register."""
    async def go() -> None:
        process = net.source_hosting.objects["counter"].process
        net.target.cmd_inject_fault("migrate_commit", migration_mod.COMMIT_TRIES)  # undecided
        report = await net.migrate()
        assert report is not None and report["pending"], report
        assert process.calls == ["get_state", "hold", "get_state"]  # type: ignore[union-attr]
        entry = net.source_hosting.registry.entries["counter"]
        assert entry["register"] is False and entry["checkpoint"] == FINAL
        [record] = net.records()
        assert (record.phase, record.held, record.state) == ("committing", True, FINAL)
        await asyncio.gather(*net.source._tasks)  # the resolver's cancel decides: aborted
        assert net.serving() == ["source"] and net.records() == []
        assert net.source_started_from() == FINAL
    run(go)


def test_a_refused_precopy_leaves_the_source_serving_untouched(net: PrecopyNet) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault("state_transfer")
        report = await net.migrate()
        assert report is not None and not report["ok"], report
        assert net.sent == ["MIGRATE_start", "MIGRATE_cancel"]
        assert net.serving() == ["source"] and net.source_started_from() is None  # never stopped
        assert net.records() == []
        # registered again without S: the HOA drops a binding the target may have kept
        assert net.source_hosting.objects["counter"].client.history == ["register"]  # type: ignore[union-attr]
    run(go)


def test_a_lost_precopy_answer_and_a_lost_cancel_let_the_target_expire(
        net: PrecopyNet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration_mod, "CANCEL_TRIES", 0)

    async def go() -> None:
        net.target.cmd_inject_fault("transfer_cut")
        net.target.cmd_inject_fault("cancel_lost")
        report = await net.migrate()
        assert report is not None and not report["ok"] and "transfer_cut" in report["error"]
        assert net.serving() == ["source"]
        assert await net.deadline_passes() == ["counter"]
        assert net.serving() == ["source"] and net.source_started_from() is None
    run(go)


@pytest.mark.parametrize("point", ["source_after_start", "source_after_transfer"])
def test_the_source_dying_before_the_hold_keeps_it_serving(net: PrecopyNet, point: str) -> None:
    """Nothing was held: the restarted source cancels the target's WARM/PRECOPIED instance."""
    async def go() -> None:
        net.source.cmd_inject_fault(point)
        assert await net.migrate() is None
        [record] = net.records()
        assert (record.phase, record.state, record.held) == ("starting", None, False)
        await net.restart_source(keep_objects=True)
        assert net.sent[-1] == "MIGRATE_cancel"
        assert ("stop", "counter", True) in net.target_hosting.log
        assert net.serving() == ["source"] and net.source_started_from() is None
        assert net.records() == []
    run(go)


@pytest.mark.parametrize("keep_objects", [True, False], ids=["held-object-outlives", "object-dies"])
def test_the_source_dying_after_the_hold_serves_again_from_the_final_state(
        net: PrecopyNet, keep_objects: bool) -> None:
    """Held with its record, the commit not sent: the restarted source's cancel aborts the
    target and the object starts here again from the final checkpoint."""
    async def go() -> None:
        net.source.cmd_inject_fault("source_after_stop")
        assert await net.migrate() is None
        assert net.serving() == []  # held here, held there
        await net.restart_source(keep_objects=keep_objects)
        assert net.sent[-1] == "MIGRATE_cancel"
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert ("stop", "counter", True) in net.target_hosting.log
        assert net.records() == []
    run(go)


def test_the_source_dying_after_the_commit_lets_the_target_serve(net: PrecopyNet) -> None:
    """The restarted source (its held object taken over) learns ``committed`` from its
    cancel and stops the held instance; it never starts here again."""
    async def go() -> None:
        net.source.cmd_inject_fault("source_after_commit")
        assert await net.migrate() is None
        await net.restart_source(keep_objects=True)
        assert net.serving() == ["target"] and net.restored() == [FINAL]
        assert "counter" not in net.source_hosting.objects and net.source_started_from() is None
        assert net.records() == []
    run(go)


@pytest.mark.parametrize("point", ["target_after_start", "target_after_restore"])
@pytest.mark.parametrize("keep_objects", [True, False], ids=["objects-outlive", "objects-die"])
def test_the_target_dying_leaves_the_source_serving_untouched(net: PrecopyNet, point: str,
                                                              keep_objects: bool) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault(point)
        report = await net.migrate()
        assert report is not None and not report["ok"], report
        assert net.serving() == ["source"] and net.source_started_from() is None
        await net.restart_target(keep_objects)
        assert "counter" not in net.target_hosting.objects
        answer = await net.target.on_migrate(None, {"action": "commit", "name": "counter",  # type: ignore[arg-type]
                                                    "epoch": report["epoch"], "state": FINAL})
        assert answer["phase"] == "aborted"
    run(go)


def test_a_lost_commit_answer_is_asked_again_and_serves_once(net: PrecopyNet) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault("commit_cut")
        report = await net.migrate()
        assert report is not None and report["ok"], report
        assert net.sent[-2:] == ["MIGRATE_commit", "MIGRATE_commit"]
        assert net.restored() == [FINAL] and net.serving() == ["target"]
    run(go)


@pytest.mark.parametrize("target_expires", [False, True], ids=["cancel-decides", "expired-first"])
def test_a_commit_that_never_arrives_is_decided_by_a_cancel(net: PrecopyNet, target_expires: bool) -> None:
    """The target never takes the commit: the source's cancel aborts the move (or finds it
    aborted at the deadline) and the object serves here again from the final state."""
    async def go() -> None:
        net.target.cmd_inject_fault("migrate_commit", migration_mod.COMMIT_TRIES)
        report = await net.migrate()
        assert report is not None and report["pending"], report
        assert net.serving() == []  # none answers, none twice
        if target_expires:
            await net.deadline_passes()
        await asyncio.gather(*net.source._tasks)
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert net.records() == [] and net.restored() == []
    run(go)


def test_a_patch_for_another_base_is_refused_undecided(net: PrecopyNet) -> None:
    async def go() -> None:
        net.target.arrivals.begin("counter", "e1", 5.0)
        net.target_hosting.put("counter", HeldProcess())
        net.target.arrivals.precopied("counter", "e1", dict(PRECOPY, extra=1))  # another base
        body = {"action": "commit", "name": "counter", "epoch": "e1", "delta": True,
                "state": {"patch": merge_patch.diff(PRECOPY, FINAL), "digest": merge_patch.digest(FINAL)}}
        with pytest.raises(HandoverError, match="digest differs"):
            await net.target.on_migrate(None, body)  # type: ignore[arg-type]
        assert net.target.arrivals.get("counter", "e1").phase is Phase.PRECOPIED
        assert net.restored() == []
        body.pop("delta")
        body["state"] = FINAL  # the whole checkpoint, as a repeat sends it
        assert (await net.target.on_migrate(None, body))["phase"] == "committed"  # type: ignore[arg-type]
        assert net.restored() == [FINAL]
    run(go)


def test_a_source_whose_object_gives_no_final_checkpoint_is_killed_and_the_target_cancelled(
        net: PrecopyNet) -> None:
    async def go() -> None:
        process = net.source_hosting.objects["counter"].process

        async def broken(cmd: str, **_: Any) -> Any:
            if cmd == "get_state" and process.held:  # type: ignore[union-attr]
                raise migration_mod.ObjectProcessError("object counter did not answer get_state")
            return await LiveProcess.call(process, cmd)  # type: ignore[arg-type]

        process.call = broken  # type: ignore[union-attr, method-assign]
        report = await net.migrate()
        assert report is not None and report["killed"], report
        assert net.sent[-1] == "MIGRATE_cancel" and net.serving() == []
        assert "counter" not in net.target_hosting.objects and net.records() == []
    run(go)


def test_an_unknown_transfer_is_refused(net: PrecopyNet) -> None:
    async def go() -> None:
        with pytest.raises(Exception, match="transfer must be one of"):
            await net.source.cmd_migrate("counter", TARGET, transfer="teleport")
        assert net.sent == [] and net.serving() == ["source"]
    run(go)


# --- break-before-make in one round trip ----------------------------------------------------------


@pytest.fixture
def bbm(net: PrecopyNet) -> PrecopyNet:
    """No pre-copy: the object answers the check, then (held) the final checkpoint."""
    net.source_hosting.objects["counter"].process.states = [CHECK, FINAL]  # type: ignore[union-attr]
    return net


def test_break_before_make_holds_and_commits_with_the_start(bbm: PrecopyNet) -> None:
    net = bbm

    async def go() -> None:
        report = await net.migrate("break-before-make")
        assert report is not None and report["ok"] and report["transfer"] == "precopy", report
        assert net.sent == ["MIGRATE_start"]
        [start] = [e for e in net.target_hosting.log if e[0] == "start"]
        assert start[3] == FINAL and start[5] is True  # the final state, started held
        assert net.serving() == ["target"]
        assert net.target.arrivals.get("counter", report["epoch"]).phase is Phase.COMMITTED
        assert ("stop", "counter", False) in net.source_hosting.log and net.records() == []
        assert net.source_hosting.lingered == [True]
    run(go)


def test_break_before_make_source_dying_after_the_hold_serves_again_here(bbm: PrecopyNet) -> None:
    net = bbm

    async def go() -> None:
        net.source.cmd_inject_fault("source_after_stop")
        assert await net.migrate("break-before-make") is None
        [record] = net.records()
        assert (record.phase, record.held, record.state) == ("committing", True, FINAL)
        await net.restart_source(keep_objects=True)
        assert net.sent == ["MIGRATE_cancel"]
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
    run(go)


def test_break_before_make_source_dying_after_the_start_lets_the_target_serve(bbm: PrecopyNet) -> None:
    net = bbm

    async def go() -> None:
        net.source.cmd_inject_fault("source_after_start")
        assert await net.migrate("break-before-make") is None
        await net.restart_source(keep_objects=True)
        assert net.serving() == ["target"] and net.source_started_from() is None
        assert "counter" not in net.source_hosting.objects and net.records() == []
    run(go)


def test_break_before_make_lost_start_answer_is_decided_by_a_cancel(bbm: PrecopyNet) -> None:
    net = bbm

    async def go() -> None:
        net.target.cmd_inject_fault("commit_cut")
        report = await net.migrate("break-before-make")
        assert report is not None and report["ok"], report  # committed: only the answer was lost
        assert net.sent == ["MIGRATE_start", "MIGRATE_cancel"]
        assert net.serving() == ["target"] and net.records() == []
    run(go)


def test_break_before_make_target_dying_before_its_commit(bbm: PrecopyNet) -> None:
    """No answer to the start nor to the cancel: undecided, nothing serves (held here, the
    target down); the restarted target aborts, and the source's cancel then restarts it here."""
    net = bbm

    async def go() -> None:
        net.target.cmd_inject_fault("target_after_start")
        report = await net.migrate("break-before-make")
        assert report is not None and report["pending"], report
        assert net.serving() == []
        await net.restart_target(keep_objects=True)
        await asyncio.gather(*net.source._tasks)
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert "counter" not in net.target_hosting.objects and net.records() == []
    run(go)


def test_a_start_with_commit_needs_the_state() -> None:
    from test_migration_role import ARRIVAL
    with pytest.raises(FieldError, match="commit"):
        check_migrate(dict(ARRIVAL, commit=True, warm=True))
    with pytest.raises(FieldError, match="commit"):
        check_migrate(dict(ARRIVAL, commit="yes", state=FINAL))


@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_a_final_checkpoint_too_large_serves_here_again_from_it(net: PrecopyNet, mode: str) -> None:
    """It grew past what a move carries while held: the target is cancelled (if it heard of
    the move) and the object starts here again from that final state, not killed."""
    big = dict(FINAL, object={"blob": "x" * migration_mod.MAX_CHECKPOINT_BYTES})
    net.source_hosting.objects["counter"].process.states = [CHECK, big]  # type: ignore[union-attr]

    async def go() -> None:
        report = await net.migrate(mode)
        assert report is not None and report["error_type"] == "CheckpointTooLarge", report
        assert not report["killed"] and net.records() == []
        assert net.source_started_from() == big and net.serving() == ["source"]
        assert "counter" not in net.target_hosting.objects
    run(go)


def test_the_source_dying_between_its_hold_and_its_record_serves_again(
        net: PrecopyNet, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the ``starting`` record is on disk, the object (taken over) is held: the restarted
    source cancels the target and makes the object serve again, from its own state."""
    async def go() -> None:
        def crash_before_the_record(*_: Any, **__: Any) -> None:
            raise migration_mod._Crashed("r22c killed between hold and record")

        monkeypatch.setattr(net.source, "_keep", crash_before_the_record)
        assert await net.migrate() is None
        process = net.source_hosting.objects["counter"].process
        assert process.held  # type: ignore[union-attr]
        [record] = net.records()
        assert record.phase == "starting"
        await net.restart_source(keep_objects=True)
        assert not process.held and net.serving() == ["source"]  # type: ignore[union-attr]
        assert net.sent[-1] == "MIGRATE_cancel" and net.records() == []
    run(go)


def test_break_before_make_whose_start_never_left_serves_here_again_at_once(
        bbm: PrecopyNet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that could not be sealed or connected (the target is no router of the run,
    or refuses connections) never reached it: the held object serves here again at once,
    with no cancel to wait for and nothing left undecided."""
    from agent.core.peer import PeerNotSent

    net = bbm

    async def not_sent(address: str, ctype: Any, body: dict, **kw: Any) -> dict:
        net.sent.append(f"{ctype.name} not sent")
        raise PeerNotSent(f"MIGRATE to {address} not sent: no public key for receiver {address}")

    monkeypatch.setattr(migration_mod, "peer_call", not_sent)

    async def go() -> None:
        report = await net.migrate("break-before-make")
        assert report is not None and not report["ok"] and not report["pending"], report
        assert "not sent" in report["error"]
        assert net.sent == ["MIGRATE not sent"]  # no cancel: nothing reached the target
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert net.records() == [] and net.source.departures == {}
    run(go)


def test_the_source_deregisters_through_its_foreign_agent_before_the_hold(net: PrecopyNet) -> None:
    """The old foreign agent drops its route only when it relays the deregistration's reply:
    the home address may go only after that, or a request it still routes here loops back to
    it (its own default route) until the TTL runs out (issue 18, one of co12's requests).
    The reply is slowed here, so an overlapped hold would come first."""
    order: list[str] = []

    async def go() -> None:
        hosted = net.source_hosting.objects["counter"]
        client, process = hosted.client, hosted.process

        async def slow_deregister() -> None:
            await asyncio.sleep(0.01)
            order.append("deregistered")

        real_call = process.call  # type: ignore[union-attr]

        async def call(cmd: str, **kw: Any) -> Any:
            if cmd == "hold":
                order.append("hold")
            return await real_call(cmd, **kw)

        client.deregister = slow_deregister  # type: ignore[union-attr,method-assign]
        process.call = call  # type: ignore[union-attr,method-assign]
        report = await net.migrate()
        assert report is not None and report["ok"], report
        assert order == ["deregistered", "hold"], order
    run(go)


def test_a_deregistration_that_fails_leaves_the_source_serving_and_not_held(net: PrecopyNet) -> None:
    async def go() -> None:
        hosted = net.source_hosting.objects["counter"]

        async def refused() -> None:
            raise OSError("no reply from the foreign agent")

        hosted.client.deregister = refused  # type: ignore[union-attr,method-assign]
        report = await net.migrate()
        assert report is not None and not report["ok"], report
        assert net.serving() == ["source"]
        assert "hold" not in hosted.process.calls  # type: ignore[union-attr]
        assert net.source_hosting.addresses == []  # its home address stayed
        assert net.records() == [] and net.source.departures == {}
    run(go)


def _at_home(hosted: Any, answer: int, order: list[str]) -> None:
    """The source's client at home, whose leave-home the home agent answers ``answer``."""
    client = hosted.client
    client.at_home, client.current = True, None

    async def leave_home() -> Any:
        order.append("left home")
        return SimpleNamespace(code=answer, error="" if answer == 0 else "denied")

    async def claim_home() -> None:
        order.append("claimed home")

    client.leave_home, client.claim_home = leave_home, claim_home


def test_from_home_the_source_leaves_home_before_the_hold_and_the_target_goes_live_before_it_serves(
        net: PrecopyNet) -> None:
    """The home agent keeps the target's binding on standby while the object is at home:
    the source says it leaves (then the home agent serves that binding) before it holds; the
    target takes its home address (go_live) before it restores and serves."""
    order: list[str] = []

    async def go() -> None:
        hosted = net.source_hosting.objects["counter"]
        client = hosted.client
        _at_home(hosted, 0, order)
        real_call = hosted.process.call

        async def call(cmd: str, **kw: Any) -> Any:
            if cmd == "hold":
                order.append("hold")
            return await real_call(cmd, **kw)

        hosted.process.call = call
        report = await net.migrate()
        assert report is not None and report["ok"], report
        assert order == ["left home", "hold"], order
        assert client.deregistered == 0  # no deregistration through an FOA
        log = [e[0] for e in net.target_hosting.log]
        assert log.index("go_live") < log.index("restore"), log
    run(go)


def test_a_refused_leave_home_leaves_the_source_serving_at_home(net: PrecopyNet) -> None:
    order: list[str] = []

    async def go() -> None:
        hosted = net.source_hosting.objects["counter"]
        _at_home(hosted, 133, order)
        report = await net.migrate()
        assert report is not None and not report["ok"], report
        assert "leave-home" in report["error"]
        assert net.serving() == ["source"]
        assert "hold" not in hosted.process.calls
        assert net.source_hosting.addresses == []
        assert order == ["left home", "claimed home"]  # the home link taken back
    run(go)
