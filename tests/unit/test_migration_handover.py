"""The hand-over protocol of a move (issue 13, item 4): its ledger alone on a fake clock,
its records on disk, and a source and a target role wired to each other (a fake transport
that hands each message to the other role's handler) through every fault point: the source
or the target dying after each step, the transfer or the commit answer cut, a lost cancel.
Each ends with exactly one instance serving, with the latest checkpoint."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from agent.core.peer import PeerError
from agent.hosting import migration as migration_mod
from agent.hosting.handover import (Arrivals, HandoverError, HandoverStore, Phase, SourceRecord)
from agent.hosting.migration import MigrationRole, _Crashed
from packets import ControlType
from test_migration_role import ARRIVAL, CHECKPOINT, FakeAgent, FakeHosting, FakeProcess
from test_migration_role import run_dir  # noqa: F401 - autouse: each router its run directory

SOURCE, TARGET = "10.12.0.1", "10.14.0.1"
#: The final checkpoint (newer than the one checked before the move: what must survive).
FINAL = {"state": {"count": 42}, "seen": {"co14": 42}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the ledger, pure -------------------------------------------------------------------------


def test_a_commit_needs_the_state_and_is_decided_once() -> None:
    arrivals = Arrivals(clock=Clock())
    arrivals.begin("counter", "e1", 5.0)
    with pytest.raises(HandoverError, match="no state yet"):
        arrivals.commit("counter", "e1")
    arrivals.restored("counter", "e1")
    assert arrivals.commit("counter", "e1") == (Phase.COMMITTED, True)
    assert arrivals.commit("counter", "e1") == (Phase.COMMITTED, False)  # a repeat: same answer
    assert arrivals.abort("counter", "e1") == (Phase.COMMITTED, None)  # too late to abort
    assert arrivals.abort("counter", None) == (Phase.ABORTED, None)  # nothing undecided


def test_an_abort_wins_over_a_late_transfer_and_commit() -> None:
    arrivals = Arrivals(clock=Clock())
    arrivals.begin("counter", "e1", 5.0)
    phase, arrival = arrivals.abort("counter", "e1")
    assert phase is Phase.ABORTED and arrival is not None and arrival.name == "counter"
    assert arrivals.abort("counter", "e1") == (Phase.ABORTED, None)  # dropped once only
    with pytest.raises(HandoverError, match="aborted"):
        arrivals.restored("counter", "e1")
    assert arrivals.commit("counter", "e1") == (Phase.ABORTED, False)
    assert arrivals.commit("counter", "never-seen") == (Phase.ABORTED, False)


def test_a_silent_source_lets_the_arrival_expire_each_message_renews_it() -> None:
    clock = Clock()
    arrivals = Arrivals(clock=clock)
    arrivals.begin("counter", "e1", 5.0)
    clock.now += 4.0
    arrivals.restored("counter", "e1")  # renews: 5 s from now
    clock.now += 4.0
    assert arrivals.expired() == []
    assert arrivals.next_deadline() == pytest.approx(clock.now + 1.0)
    clock.now += 1.0
    [gone] = arrivals.expired()
    assert gone.name == "counter" and gone.phase is Phase.ABORTED
    assert arrivals.commit("counter", "e1") == (Phase.ABORTED, False)
    assert arrivals.next_deadline() is None


def test_a_second_move_of_an_undecided_object_is_refused() -> None:
    arrivals = Arrivals(clock=Clock())
    arrivals.begin("counter", "e1", 5.0)
    with pytest.raises(HandoverError, match="already arriving"):
        arrivals.begin("counter", "e2", 5.0)
    arrivals.abort("counter", "e1")
    arrivals.begin("counter", "e2", 5.0)


def test_a_restarted_target_aborts_what_was_undecided_and_keeps_its_decisions() -> None:
    saved: list[list[dict[str, Any]]] = []
    before = Arrivals(clock=Clock(), persist=saved.append)
    for epoch in ("e1", "e2", "e3"):
        before.begin(f"obj-{epoch}", epoch, 5.0, restored=True)
    before.commit("obj-e1", "e1")
    before.abort("obj-e2", "e2")
    after = Arrivals(clock=Clock(), persist=saved.append)
    [undecided] = after.load(saved[-1])
    assert (undecided.name, undecided.phase) == ("obj-e3", Phase.ABORTED)
    assert after.commit("obj-e1", "e1") == (Phase.COMMITTED, False)
    assert after.commit("obj-e3", "e3") == (Phase.ABORTED, False)
    assert {r["epoch"]: r["phase"] for r in saved[-1]} == \
        {"e1": "committed", "e2": "aborted", "e3": "aborted"}


def test_records_are_root_only_and_unreadable_ones_are_skipped(tmp_path: Path) -> None:
    store = HandoverStore(tmp_path, "r22c")
    store.save(SourceRecord("counter", "e1", TARGET, "make-before-break", "stopped", FINAL,
                            {"name": "counter"}, spec="agent.objects.counter:Counter"))
    mine = tmp_path / "handover" / "r22c"
    (mine / "broken.json").write_text("{not json")
    (mine / "odd.json").write_text(json.dumps({"name": "x", "phase": "flying"}))
    assert stat.S_IMODE((tmp_path / "handover").stat().st_mode) == 0o700
    assert stat.S_IMODE(mine.stat().st_mode) == 0o700
    assert stat.S_IMODE((mine / "counter.json").stat().st_mode) == 0o600
    [record] = store.records()
    assert (record.name, record.epoch, record.state) == ("counter", "e1", FINAL)
    assert [p.name for p in mine.iterdir() if p.name.startswith(".")] == []
    store.remove("counter")
    assert store.records() == []


def test_each_router_of_a_run_reads_only_its_own_records_and_ledger(tmp_path: Path) -> None:
    """The run directory is shared: a restarted source must not take the target's ledger
    for its own (it would drop the object it serves) nor a target the source's records."""
    source, target = HandoverStore(tmp_path, "r22c"), HandoverStore(tmp_path, "r14a")
    source.save(SourceRecord("counter", "e1", TARGET, "make-before-break", "starting", None,
                             {"name": "counter"}))
    target.save_arrivals([{"name": "counter", "epoch": "e1", "phase": "warm"}])
    assert [r.epoch for r in source.records()] == ["e1"] and source.arrivals() == []
    assert target.records() == [] and [a["epoch"] for a in target.arrivals()] == ["e1"]
    with pytest.raises(ValueError):
        HandoverStore(tmp_path, "../r14a")


def test_a_run_directory_that_is_gone_is_logged_not_fatal(tmp_path: Path, caplog) -> None:
    store = HandoverStore(tmp_path / "gone", "r22c")
    with pytest.raises(OSError):
        store.save(SourceRecord("counter", "e1", TARGET, "break-before-make", "stopped", FINAL, {}))
    store.save_arrivals([{"name": "counter", "epoch": "e1", "phase": "warm"}])
    assert "not written" in caplog.text and not (tmp_path / "gone").exists()


# --- two roles, wired -------------------------------------------------------------------------


class HeldProcess(FakeProcess):
    """An arriving object's process: held until ``serve``; it records what it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.serving = False

    async def call(self, cmd: str, **_: Any) -> Any:
        self.calls.append(cmd)
        if cmd == "serve":
            self.serving = True
            return {"replayed": 3}
        return await super().call(cmd)


class TargetHosting(FakeHosting):
    """A target router: arrivals register at once; they run held processes."""

    def __init__(self) -> None:
        super().__init__()
        self.objects.clear()

    def put(self, name: str, process: Any = None) -> None:
        super().put(name, process or HeldProcess())
        self.objects[name].client.registered = True  # type: ignore[union-attr]

    def process(self, name: str) -> Any:
        return self.hosted(name).process


class Net:
    """A source (r22c) and a target (r14a): each MIGRATE/STATE_TRANSFER the source sends is
    handled by the target role; a target that "died" (or a message refused) is, to the
    sender, a refusal or a cut connection (PeerError)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = Clock()
        self.source_hosting = FakeHosting(FINAL)
        config = dict(ARRIVAL["config"])  # what the target's field checks accept
        self.source_hosting.objects["counter"].client.config.to_json = lambda: dict(config)  # type: ignore[union-attr]
        self.target_hosting = TargetHosting()
        self.source = self.role(self.source_hosting, "r22c")
        self.target = self.role(self.target_hosting, "r14a")
        self.target_down = False
        self.sent: list[str] = []
        monkeypatch.setattr(migration_mod, "peer_call", self.peer_call)
        monkeypatch.setattr(migration_mod, "RESOLVE_BACKOFF", (0.001, 0.002))

    def role(self, hosting: FakeHosting, name: str) -> MigrationRole:
        role = MigrationRole(FakeAgent(hosting, name))  # type: ignore[arg-type]
        role.arrivals.clock = self.clock

        def crash() -> None:
            raise _Crashed(f"{name} killed")

        role._crash = crash  # type: ignore[method-assign]
        return role

    async def peer_call(self, address: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        assert address == TARGET
        kind = ctype.name if ctype != ControlType.MIGRATE else f"MIGRATE_{body['action']}"
        self.sent.append(kind)
        if self.target_down:
            raise PeerError(f"target {address} unreachable: connection refused")
        handler = self.target.on_migrate if ctype == ControlType.MIGRATE else self.target.on_state_transfer
        try:
            return await handler(None, json.loads(json.dumps(body)))  # type: ignore[arg-type]
        except _Crashed:
            self.target_down = True
            raise PeerError(f"{kind} to {address}: connection reset by peer") from None
        except Exception as exc:  # noqa: BLE001 - a refusal, as the in-band server answers
            raise PeerError(f"{kind} refused by {address}: {exc}") from None

    async def migrate(self, mode: str = "make-before-break", transfer: str = "stop-copy") -> dict | None:
        """The move (these tests: the stop-copy transfer, test_precopy_migration the
        pre-copy); None when the source "died" during it."""
        try:
            return await self.source.cmd_migrate("counter", TARGET, mode=mode, deadline=5.0,
                                                 transfer=transfer)
        except _Crashed:
            return None

    async def restart_source(self, keep_objects: bool = False) -> None:
        """The source's agent comes back (``keep_objects``: its objects outlived it, else
        they died with it): it resolves its records."""
        if not keep_objects:
            self.source_hosting.objects.clear()
        self.source = self.role(self.source_hosting, "r22c")
        await self.source.start()
        await asyncio.gather(*self.source._tasks)

    async def restart_target(self, keep_objects: bool = True) -> None:
        """The target's agent comes back; ``keep_objects``: its held objects outlived it."""
        if not keep_objects:
            self.target_hosting.objects.clear()
        self.target = self.role(self.target_hosting, "r14a")
        self.target_down = False
        await self.target.start()

    async def deadline_passes(self) -> list[str]:
        self.clock.now += 10.0
        return await self.target.expire()

    # --- what serves ---------------------------------------------------------------------

    def serving(self) -> list[str]:
        """Where an instance answers requests: the source's objects run live; the target's
        only once served (a held one queues and answers nothing)."""
        where = []
        if "counter" in self.source_hosting.objects:
            where.append("source")
        hosted = self.target_hosting.objects.get("counter")
        if hosted is not None and hosted.process.serving:  # type: ignore[union-attr]
            where.append("target")
        return where

    def source_started_from(self) -> Any:
        starts = [e for e in self.source_hosting.log if e[0] == "start"]
        return starts[-1][3] if starts else None

    def records(self) -> list[SourceRecord]:
        return self.source.store.records()


def run(net_test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(net_test())


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> Net:
    return Net(monkeypatch)


@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_a_move_serves_at_the_target_only_after_the_commit(net: Net, mode: str) -> None:
    async def go() -> None:
        report = await net.migrate(mode)
        assert report is not None and report["ok"], report
        assert net.sent[-1] == "MIGRATE_commit"
        assert net.serving() == ["target"]
        assert net.target.arrivals.get("counter", report["epoch"]).phase is Phase.COMMITTED
        assert net.records() == [] and net.source.departures == {}
    run(go)


@pytest.mark.parametrize("mode", ["make-before-break", "break-before-make"])
def test_the_source_dying_after_it_stopped_the_object(net: Net, mode: str) -> None:
    """Its final checkpoint is on disk; the target never got a commit: it drops itself at its
    deadline, and the restarted source brings the object back from that checkpoint."""
    async def go() -> None:
        net.source.cmd_inject_fault("source_after_stop")
        assert await net.migrate(mode) is None
        [record] = net.records()
        assert record.state == FINAL and record.phase == "stopped"
        assert net.serving() == []  # the window: the source is down, the target held or absent
        await net.deadline_passes()
        assert "counter" not in net.target_hosting.objects
        await net.restart_source()
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert net.records() == []
    run(go)


@pytest.mark.parametrize("mode, point", [("make-before-break", "source_after_transfer"),
                                         ("break-before-make", "source_after_start")])
def test_the_source_dying_before_its_commit_restarts_from_its_checkpoint(net: Net, mode: str,
                                                                         point: str) -> None:
    """The target holds the instance (restored, registered) but answers nothing; the
    restarted source cancels it (dropped and deregistered at once) and serves from its
    final checkpoint."""
    async def go() -> None:
        net.source.cmd_inject_fault(point)
        assert await net.migrate(mode) is None
        held = net.target_hosting.objects["counter"]
        assert not held.process.serving  # type: ignore[union-attr]
        await net.restart_source()
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert ("stop", "counter", True) in net.target_hosting.log  # dropped, deregistered
        assert net.sent[-1] == "MIGRATE_cancel"
    run(go)


def test_the_source_dying_before_it_stopped_the_object_cancels_the_target_on_restart(net: Net) -> None:
    """Make-before-break, the source dies once the target registered: the object never
    stopped at the source (it outlives its agent: issue 13 item 3). Its ``starting`` record
    (no state) makes the restarted source cancel the warm instance at once, so the target
    takes the next move instead of refusing it until its deadline."""
    async def go() -> None:
        net.source.cmd_inject_fault("source_after_start")
        assert await net.migrate() is None
        [record] = net.records()
        assert (record.phase, record.state) == ("starting", None)
        assert net.serving() == ["source"]  # the target's instance is warm: it answers nothing
        assert "counter" in net.target_hosting.objects
        await net.restart_source(keep_objects=True)
        assert net.sent[-1] == "MIGRATE_cancel"
        assert ("stop", "counter", True) in net.target_hosting.log  # dropped, deregistered
        assert net.records() == [] and net.source.departures == {}
        assert net.serving() == ["source"] and net.source_started_from() is None
        report = await net.migrate()  # the target is free: the next move goes through
        assert report is not None and report["ok"], report
        assert net.serving() == ["target"]
    run(go)


def test_the_source_dying_before_it_stopped_the_object_lets_the_target_expire(net: Net) -> None:
    """Without its restart, the silent target drops its warm instance at its deadline."""
    async def go() -> None:
        net.source.cmd_inject_fault("source_after_start")
        assert await net.migrate() is None
        assert await net.deadline_passes() == ["counter"]
        assert ("stop", "counter", True) in net.target_hosting.log
        assert net.serving() == ["source"]
    run(go)


def test_a_refused_start_leaves_no_record_and_the_next_move_goes(net: Net) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault("migrate_start")
        report = await net.migrate()
        assert report is not None and not report["ok"] and "refused" in report["error"], report
        assert net.records() == [] and net.source.departures == {}
        assert net.serving() == ["source"]
        report = await net.migrate()
        assert report is not None and report["ok"], report
    run(go)


def test_the_source_dying_after_it_sent_the_commit_lets_the_target_serve(net: Net) -> None:
    async def go() -> None:
        net.source.cmd_inject_fault("source_after_commit")
        assert await net.migrate() is None
        assert [r.phase for r in net.records()] == ["committing"]
        await net.restart_source()
        assert net.serving() == ["target"] and net.records() == []
        assert net.source_started_from() is None  # never started again at the source
    run(go)


@pytest.mark.parametrize("point", ["target_after_start", "target_after_restore"])
@pytest.mark.parametrize("keep_objects", [True, False], ids=["objects-outlive", "objects-die"])
def test_the_target_dying_leaves_the_source_serving(net: Net, point: str, keep_objects: bool) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault(point)
        report = await net.migrate()
        assert report is not None and not report["ok"], report
        assert net.serving() == ["source"]
        if point == "target_after_restore":
            assert net.source_started_from() == FINAL
        await net.restart_target(keep_objects)
        assert "counter" not in net.target_hosting.objects  # aborted at its restart
        assert net.serving() == ["source"]
        assert await net.target._commit_arrival("counter", report["epoch"]) == \
            {"ok": True, "phase": "aborted", "replayed": 0}
    run(go)


def test_a_cut_transfer_restarts_the_source_and_drops_the_target(net: Net) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault("transfer_cut")
        report = await net.migrate()
        assert report is not None and not report["ok"] and "transfer_cut" in report["error"]
        assert net.sent == ["MIGRATE_start", "STATE_TRANSFER", "MIGRATE_cancel"]
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
        assert ("stop", "counter", True) in net.target_hosting.log
    run(go)


def test_a_cut_transfer_and_a_lost_cancel_never_make_two_instances_answer(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target restored and is registered beside the source, but held: it answers
    nothing, and without word from the source (every cancel lost) it drops itself
    (deregistered) at its deadline; a late commit of that move is refused as aborted."""
    monkeypatch.setattr(migration_mod, "CANCEL_TRIES", 0)

    async def go() -> None:
        net.target.cmd_inject_fault("transfer_cut")
        net.target.cmd_inject_fault("cancel_lost")
        report = await net.migrate()
        assert report is not None and not report["ok"]
        assert "counter" in net.target_hosting.objects  # held there, still registered
        assert net.serving() == ["source"]
        assert await net.deadline_passes() == ["counter"]
        assert ("stop", "counter", True) in net.target_hosting.log
        assert net.serving() == ["source"]
        answer = await net.target._commit_arrival("counter", report["epoch"])
        assert answer["phase"] == "aborted"
    run(go)


def test_a_lost_cancel_is_sent_again_and_the_target_drops_its_instance_before_its_deadline(
        net: Net) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault("transfer_cut")
        net.target.cmd_inject_fault("cancel_lost")
        report = await net.migrate()
        assert report is not None and not report["ok"]
        assert net.sent.count("MIGRATE_cancel") == 1
        await asyncio.gather(*net.source._tasks)  # the cancel, sent again
        assert net.sent.count("MIGRATE_cancel") == 2
        assert ("stop", "counter", True) in net.target_hosting.log  # dropped, deregistered
        assert net.target.arrivals.get("counter", report["epoch"]).phase is Phase.ABORTED
        assert net.serving() == ["source"] and net.source_started_from() == FINAL
    run(go)


def test_a_cut_commit_answer_is_asked_again_and_the_source_lets_go(net: Net) -> None:
    async def go() -> None:
        net.target.cmd_inject_fault("commit_cut")
        report = await net.migrate()
        assert report is not None and report["ok"], report
        assert net.sent[-2:] == ["MIGRATE_commit", "MIGRATE_commit"]
        assert net.serving() == ["target"] and net.source_started_from() is None
        [process] = [h.process for h in net.target_hosting.objects.values()]
        assert process.calls.count("serve") == 1  # idempotent: the repeat serves nothing twice
    run(go)


@pytest.mark.parametrize("target_expires", [False, True], ids=["then-answers", "expires-first"])
def test_an_unanswered_commit_is_undecided_until_the_target_answers(net: Net, target_expires: bool) -> None:
    """The commit never reaches the target: the source keeps its checkpoint and does not
    start the object (the target could have committed); the target's answer decides."""
    async def go() -> None:
        net.target.cmd_inject_fault("migrate_commit", migration_mod.COMMIT_TRIES)
        report = await net.migrate()
        assert report is not None and report["pending"] and report["error_type"] == "HandoverPending"
        assert net.serving() == []  # the window a lost commit opens: none answers, none twice
        assert [r.phase for r in net.records()] == ["committing"]
        if target_expires:
            await net.deadline_passes()
        await asyncio.gather(*net.source._tasks)  # the resolver asks again
        assert net.serving() == (["source"] if target_expires else ["target"])
        assert net.records() == [] and net.source.departures == {}
        if target_expires:
            assert net.source_started_from() == FINAL
    run(go)


def test_a_source_without_final_checkpoint_is_killed_and_its_target_dropped(net: Net) -> None:
    async def go() -> None:
        net.source_hosting.checkpoint = None
        report = await net.migrate()
        assert report is not None and report["killed"], report
        assert net.serving() == [] and "no final checkpoint" in net.source_hosting.killed["counter"]
        assert "counter" not in net.target_hosting.objects and net.records() == []
    run(go)


def test_a_move_of_an_object_still_undecided_is_refused(net: Net) -> None:
    async def go() -> None:
        net.target_down = True
        net.source.departures["counter"] = SourceRecord(
            "counter", "e0", TARGET, "make-before-break", "committing", CHECKPOINT, {})
        with pytest.raises(Exception, match="still undecided"):
            await net.source.cmd_migrate("counter", TARGET)
    run(go)
