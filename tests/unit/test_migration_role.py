"""The migration role with a fake hosting role and a fake peer: what each mode sends, in which
order, and that every failure leaves the object serving at the source with its checkpoint."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from agent.core.config import AgentConfig, Interface
from agent.core import rpc
from agent.core.errors import ControlError
from agent.core.fields import FieldError
from agent.core.peer import PeerRefused
from agent.core.wait import async_wait_until
from agent.hosting import migration as migration_mod
from agent.hosting.migration import MigrationFailed, MigrationRole
from agent.hosting.objects import HostedObject, HostingRole
from agent.hosting.runtime import ObjectProcessError
from packets import ControlType

CHECKPOINT = {"state": {"count": 41}, "seen": {"co14": 41}}


class FakeClient:
    def __init__(self, name: str, care_of: str | None = "10.12.0.1") -> None:
        self.config = SimpleNamespace(to_json=lambda: {"name": name, "home_address": "10.16.0.100"})
        self.current = SimpleNamespace(care_of_address=care_of) if care_of else None
        self.deregistered = 0
        self.registered = False
        self.history: list[Any] = []
        self.at_home = False
        self.dark = False
        self.settled = asyncio.Event()

    async def deregister(self) -> None:
        self.deregistered += 1

    def status(self) -> dict:
        reg = {"care_of_address": "10.14.0.1"} if self.registered else None
        return {"registration": reg, "at_home": False, "attempts": [{"rtt": 0.0004}]}


class FakeProcess:
    """An object process whose ``get_state`` answers ``state``, or fails with ``error``
    (an ObjectProcessError caused by that RpcError, as ObjectProcess raises it)."""

    def __init__(self, state: Any = CHECKPOINT, error: rpc.RpcError | None = None) -> None:
        self.spec = "agent.objects.counter:Counter"
        self.state, self.error = state, error
        self.calls: list[str] = []

    async def call(self, cmd: str, **_: Any) -> Any:
        self.calls.append(cmd)
        if self.error is not None:
            raise ObjectProcessError(f"object counter did not answer {cmd}: {self.error}") from self.error
        if cmd == "serve":  # a restarted source makes sure an object it kept serves
            return {"replayed": 0}
        assert cmd == "get_state"
        return self.state


class FakeHosting:
    """The parts of HostingRole that migration uses, recording what it is asked. ``checkpoint``
    is the final state a stop gives; ``process`` answers the checkpoint taken before."""

    def __init__(self, checkpoint: Any = CHECKPOINT, process: FakeProcess | None = None,
                 restart_fails: bool = False) -> None:
        self.checkpoint = checkpoint
        self.objects: dict[str, HostedObject] = {}
        self.log: list[tuple] = []
        self.lingered: list[bool] = []
        self.killed: dict[str, str] = {}
        self.restart_fails = restart_fails
        self.put("counter", process)

    def put(self, name: str, process: FakeProcess | None = None) -> None:
        hosted = HostedObject(name, "10.16.0.100", client=FakeClient(name))  # type: ignore[arg-type]
        hosted.process = process or FakeProcess()  # type: ignore[assignment]
        hosted.resources = {"cpu": 1.0, "memory_mb": 256, "pids": 64}
        self.objects[name] = hosted

    async def kill(self, name: str, reason: str) -> dict:
        self.killed[name] = reason
        if name in self.objects:
            self.objects.pop(name)
            self.log.append(("stop", name, True))
        return {}

    def hosted(self, name: str) -> HostedObject:
        if name not in self.objects:
            raise ControlError(f"no object {name!r} here")
        return self.objects[name]

    def client(self, name: str) -> Any:
        return self.hosted(name).client

    async def cmd_object_stop(self, name: str, deregister: bool = True, linger: bool = False) -> dict:
        self.objects.pop(name)
        self.log.append(("stop", name, deregister))
        self.lingered.append(linger)
        return {"state": self.checkpoint}

    async def cmd_object_start(self, config: dict, spec: str | None = None, warm: bool = False,
                               state: Any = None, resources: Any = None, **_: Any) -> dict:
        self.log.append(("start", config["name"], spec, state, resources, warm))
        if self.restart_fails:
            raise ObjectProcessError(f"object {config['name']} did not answer set_state")
        self.put(config["name"])
        return {}

    async def cmd_object_restore(self, name: str, state: Any, serve: bool = True) -> dict:
        self.log.append(("restore", name, state))
        self.restored_serving = serve
        return {"replayed": 2}

    async def registered_at(self, name: str, care_of_address: str) -> bool:
        self.hosted(name)
        return False

    async def forget_dark(self, name: str) -> None:
        self.log.append(("forget_dark", name))

    async def go_live(self, name: str, serve: Any) -> Any:
        self.hosted(name)
        self.log.append(("go_live", name))
        return await serve()


#: Each test's run directory, shared by its routers (hand-over records: handover/<router>/).
RUN_DIR: list[str] = []


@pytest.fixture(autouse=True)
def run_dir(tmp_path) -> Any:
    RUN_DIR[:] = [str(tmp_path)]
    return tmp_path


class FakeAgent:
    def __init__(self, hosting: FakeHosting, name: str = "r22c") -> None:
        # Every router of a run shares its run directory, as in a real run.
        self.config = AgentConfig(name=name, run_dir=RUN_DIR[0], roles=[],
                                  interfaces=[Interface("eth0", "10.16.0.3")], router_key="ab" * 32)
        self.hosting = hosting

    def role(self, cls: type) -> Any:
        return self.hosting if cls is HostingRole else None

    def require(self, cls: type) -> Any:
        return self.role(cls)


class FakePeer:
    """Stands in for peer_call: records (type, body) and answers by a script."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.refuse = refuse
        self.sent: list[tuple[ControlType, dict]] = []

    async def __call__(self, target: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        self.sent.append((ctype, body))
        what = ctype.name if ctype != ControlType.MIGRATE else f"MIGRATE_{body['action']}"
        if what in self.refuse:
            raise PeerRefused(target, f"{what} refused by the fake target")
        if what == "MIGRATE_start":
            return {"ok": True, "registration": {"care_of_address": "10.14.0.1"},
                    "registration_rtt": 0.0005, "phase": "registered"}
        if what == "MIGRATE_commit":
            return {"ok": True, "phase": "committed", "replayed": 2}
        if what == "MIGRATE_cancel":
            return {"ok": True, "phase": "aborted"}
        return {"ok": True, "phase": "restored"}

    def kinds(self) -> list[str]:
        return [c.name if c != ControlType.MIGRATE else f"MIGRATE_{b['action']}" for c, b in self.sent]


def migrate(mode: str, refuse: set[str] = frozenset(), checkpoint: Any = CHECKPOINT,
            monkeypatch: Any = None, hosting: FakeHosting | None = None
            ) -> tuple[dict, FakeHosting, FakePeer]:
    hosting = hosting or FakeHosting(checkpoint)
    peer = FakePeer(refuse)
    monkeypatch.setattr(migration_mod, "peer_call", peer)
    role = MigrationRole(FakeAgent(hosting))
    # These tests pin the stop-copy transfer; test_precopy_migration covers the pre-copy.
    report = asyncio.run(role.cmd_migrate("counter", "10.14.0.1", mode=mode, transfer="stop-copy"))
    return report, hosting, peer


def test_make_before_break_registers_the_target_before_the_source_stops(monkeypatch) -> None:
    report, hosting, peer = migrate("make-before-break", monkeypatch=monkeypatch)
    assert report["ok"], report
    assert peer.kinds() == ["MIGRATE_start", "STATE_TRANSFER", "MIGRATE_commit"]
    start = peer.sent[0][1]
    assert start["warm"] is True and start["config"]["simultaneous"] is True and "state" not in start
    epoch = start["epoch"]
    assert peer.sent[1][1] == {"name": "counter", "epoch": epoch, "state": CHECKPOINT}
    assert peer.sent[2][1] == {"action": "commit", "name": "counter", "epoch": epoch}
    assert hosting.log == [("stop", "counter", False)]
    assert report["registration_rtt_ms"] == 0.5


def test_make_before_break_deregisters_only_a_different_care_of_address(monkeypatch) -> None:
    hosting = FakeHosting()
    client = hosting.objects["counter"].client
    monkeypatch.setattr(migration_mod, "peer_call", FakePeer())
    asyncio.run(MigrationRole(FakeAgent(hosting)).cmd_migrate("counter", "10.14.0.1",
                                                              transfer="stop-copy"))
    assert client.deregistered == 1  # 10.12.0.1 != the target's 10.14.0.1


def test_failed_state_transfer_cancels_the_target_and_restarts_from_the_checkpoint(monkeypatch) -> None:
    report, hosting, peer = migrate("make-before-break", refuse={"STATE_TRANSFER"}, monkeypatch=monkeypatch)
    assert not report["ok"] and "STATE_TRANSFER refused" in report["error"]
    assert peer.kinds() == ["MIGRATE_start", "STATE_TRANSFER", "MIGRATE_cancel"]
    assert peer.sent[2][1]["epoch"] == peer.sent[0][1]["epoch"]
    restarted = hosting.log[-1]
    assert restarted[:4] == ("start", "counter", "agent.objects.counter:Counter", CHECKPOINT)
    assert restarted[4] == {"cpu": 1.0, "memory_mb": 256, "pids": 64}
    assert "counter" in hosting.objects


def test_a_source_without_final_checkpoint_cancels_and_reports_it_killed(monkeypatch) -> None:
    """It answered before the move and gave no final state at its stop: it cannot be started
    again with its state, so it is reported killed (its process is gone), not 'serving'."""
    report, hosting, peer = migrate("make-before-break", checkpoint=None, monkeypatch=monkeypatch)
    assert not report["ok"] and "no final checkpoint" in report["error"]
    assert report["killed"] is True and "killed" in report["steps"][-1][0]
    assert peer.kinds() == ["MIGRATE_start", "MIGRATE_cancel"]
    assert "no final checkpoint" in hosting.killed["counter"]


def test_target_refusing_start_in_make_before_break_leaves_the_source_untouched(monkeypatch) -> None:
    report, hosting, peer = migrate("make-before-break", refuse={"MIGRATE_start"}, monkeypatch=monkeypatch)
    assert not report["ok"]
    assert hosting.log == []  # never stopped
    assert "counter" in hosting.objects


def test_break_before_make_sends_the_checkpoint_with_the_start(monkeypatch) -> None:
    report, hosting, peer = migrate("break-before-make", monkeypatch=monkeypatch)
    assert report["ok"], report
    assert peer.kinds() == ["MIGRATE_start", "MIGRATE_commit"]
    body = peer.sent[0][1]
    assert body["warm"] is False and body["state"] == CHECKPOINT and body["config"]["simultaneous"] is False
    assert hosting.log == [("stop", "counter", False)]


def test_failed_break_before_make_restarts_at_the_source(monkeypatch) -> None:
    report, hosting, peer = migrate("break-before-make", refuse={"MIGRATE_start"}, monkeypatch=monkeypatch)
    assert not report["ok"] and "keeps serving on r22c" in report["steps"][-1][0]
    assert hosting.log[0] == ("stop", "counter", False)
    assert hosting.log[1][:4] == ("start", "counter", "agent.objects.counter:Counter", CHECKPOINT)
    assert "counter" in hosting.objects


def test_unknown_mode_and_object_are_refused(monkeypatch) -> None:
    role = MigrationRole(FakeAgent(FakeHosting()))
    with pytest.raises(ControlError, match="mode must be one of"):
        asyncio.run(role.cmd_migrate("counter", "10.14.0.1", mode="teleport"))
    with pytest.raises(ControlError, match="no object 'ghost'"):
        asyncio.run(role.cmd_migrate("ghost", "10.14.0.1"))


# --- target side ---------------------------------------------------------------------------

#: A warm arrival, as a make-before-break source sends it.
#: What a source sends (its fields pass the target's checks, agent/hosting/migration_fields.py).
ARRIVAL = {"action": "start", "spec": "agent.objects.counter:Counter", "warm": True,
           "epoch": "e1", "deadline": 5.0,
           "config": {"name": "counter", "nai": "counter@moat", "home_address": "10.12.0.10",
                      "home_agent": "10.12.0.1",
                      "mobile_home": {"spi": 256, "key": "11" * 32},
                      "mobile_foreign": {"spi": 1000, "key": "22" * 32}},
           "resources": None}


def empty_target() -> tuple[FakeHosting, MigrationRole]:
    """A target router that hosts nothing yet."""
    hosting = FakeHosting()
    hosting.objects.clear()
    return hosting, MigrationRole(FakeAgent(hosting))


def test_arrival_that_never_registers_is_undone(monkeypatch) -> None:
    hosting, role = empty_target()

    async def arrive() -> dict:
        return await role.on_migrate(None, ARRIVAL)  # type: ignore[arg-type]

    original = role.wait_registered
    monkeypatch.setattr(role, "wait_registered", lambda name: original(name, timeout=0.05))
    with pytest.raises(MigrationFailed, match="did not register"):
        asyncio.run(arrive())
    assert hosting.log[-1] == ("stop", "counter", True)  # stopped and deregistered
    assert "counter" not in hosting.objects


def test_arrival_answers_with_its_registration() -> None:
    hosting, role = empty_target()

    async def arrive() -> dict:
        task = asyncio.create_task(role.on_migrate(None, ARRIVAL))  # type: ignore[arg-type]
        await async_wait_until(lambda: "counter" in hosting.objects, 5, interval=0,
                               what="the arriving object hosted")
        hosting.objects["counter"].client.registered = True  # type: ignore[union-attr]
        return await task

    answer = asyncio.run(arrive())
    assert answer["ok"] and answer["registration"] == {"care_of_address": "10.14.0.1"}
    assert answer["registration_rtt"] == 0.0004
    assert hosting.log[0][5] is True  # started warm


def test_injected_fault_refuses_the_next_state_transfer_once() -> None:
    hosting = FakeHosting()
    role = MigrationRole(FakeAgent(hosting))
    role.arrivals.begin("counter", "e1", 5.0)
    role.cmd_inject_fault("state_transfer", 1)
    msg_body = {"name": "counter", "epoch": "e1", "state": CHECKPOINT}
    with pytest.raises(ControlError, match="injected fault"):
        asyncio.run(role.on_state_transfer(None, msg_body))  # type: ignore[arg-type]
    assert asyncio.run(role.on_state_transfer(None, msg_body)) == {"ok": True, "phase": "restored"}  # type: ignore[arg-type]
    assert hosting.log == [("restore", "counter", CHECKPOINT)]
    assert hosting.restored_serving is False  # held: it serves only on the commit
    with pytest.raises(ControlError, match="fault point"):
        role.cmd_inject_fault("nowhere")


# --- objects that misbehave, checkpoints that cannot move (issue 12) ---------------------------

MODES = ["make-before-break", "break-before-make"]


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_too_large_to_move_is_refused_before_anything_stops(monkeypatch, mode) -> None:
    big = {"object": {"blob": "x" * migration_mod.MAX_CHECKPOINT_BYTES}, "seen": {}}
    hosting = FakeHosting(process=FakeProcess(big))
    report, hosting, peer = migrate(mode, monkeypatch=monkeypatch, hosting=hosting)
    assert not report["ok"] and report["error_type"] == "CheckpointTooLarge"
    assert f"more than the {migration_mod.MAX_CHECKPOINT_BYTES}" in report["error"]
    assert peer.sent == [] and hosting.log == []  # nothing sent, nothing stopped
    assert "counter" in hosting.objects and not report["killed"]


@pytest.mark.parametrize("mode", MODES)
def test_a_checkpoint_that_is_not_strict_json_is_refused_before_anything_stops(monkeypatch, mode) -> None:
    """What the real runner refuses itself (CheckpointError), a process answering it anyway
    (NaN decodes from its channel) is refused here: the move could not encode it."""
    for state in ({"object": {"ratio": float("nan")}}, ["not", "a", "checkpoint"]):
        hosting = FakeHosting(process=FakeProcess(state))
        report, hosting, peer = migrate(mode, monkeypatch=monkeypatch, hosting=hosting)
        assert not report["ok"] and report["error_type"] == "CheckpointInvalid", report
        assert peer.sent == [] and hosting.log == [] and "counter" in hosting.objects


@pytest.mark.parametrize("mode", MODES)
def test_an_object_refusing_its_checkpoint_keeps_serving(monkeypatch, mode) -> None:
    refused = rpc.RpcRemoteError("get_state", "object counter: its state cannot be "
                                 "checkpointed (not strict JSON): Out of range float values")
    hosting = FakeHosting(process=FakeProcess(error=refused))
    report, hosting, peer = migrate(mode, monkeypatch=monkeypatch, hosting=hosting)
    assert not report["ok"] and "not strict JSON" in report["error"]
    assert peer.sent == [] and hosting.log == [] and hosting.killed == {}
    assert "counter" in hosting.objects and "keeps serving on r22c" in report["steps"][-1][0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("error", [rpc.RpcTimeout("no answer to get_state within 5s"),
                                   rpc.RpcProtocolError("bad answer to get_state: not JSON"),
                                   rpc.RpcClosed("channel closed by the peer")],
                         ids=["silent", "garbage", "gone"])
def test_an_object_that_no_longer_answers_is_killed_and_reported(monkeypatch, mode, error) -> None:
    hosting = FakeHosting(process=FakeProcess(error=error))
    report, hosting, peer = migrate(mode, monkeypatch=monkeypatch, hosting=hosting)
    assert not report["ok"] and report["killed"] is True and report["error_type"] == "ObjectKilled"
    assert str(error) in report["error"] and str(error) in hosting.killed["counter"]
    assert peer.sent == []  # the target never heard of it
    assert hosting.log == [("stop", "counter", True)] and "counter" not in hosting.objects


def test_a_final_checkpoint_too_large_restarts_the_object_at_the_source(monkeypatch) -> None:
    """The checkpoint grew between the check and the stop (a held instance's queue): the
    target is cancelled and the object starts again here from that final state."""
    final = {"object": {"blob": "x" * migration_mod.MAX_CHECKPOINT_BYTES}, "seen": {}}
    report, hosting, peer = migrate("make-before-break", checkpoint=final, monkeypatch=monkeypatch)
    assert not report["ok"] and report["error_type"] == "CheckpointTooLarge"
    assert peer.kinds() == ["MIGRATE_start", "MIGRATE_cancel"]
    assert hosting.log[-1][:4] == ("start", "counter", "agent.objects.counter:Counter", final)
    assert "counter" in hosting.objects and not report["killed"]


@pytest.mark.parametrize("mode", MODES)
def test_an_object_that_cannot_restart_at_the_source_is_reported_killed(monkeypatch, mode) -> None:
    refuse = {"STATE_TRANSFER"} if mode == "make-before-break" else {"MIGRATE_start"}
    hosting = FakeHosting(restart_fails=True)
    report, hosting, peer = migrate(mode, refuse=refuse, monkeypatch=monkeypatch, hosting=hosting)
    assert not report["ok"] and report["killed"] is True
    assert "did not answer set_state" in report["error"]
    assert "could not start again" in hosting.killed["counter"]
    assert "keeps serving" not in report["steps"][-1][0]


def test_a_body_that_cannot_be_sent_fails_the_move_cleanly(monkeypatch) -> None:
    """An encoding error in the transport (here a ValueError) is a failed move, with the
    object started again from its checkpoint, not an exception out of the handler."""
    async def broken(target: str, ctype: ControlType, body: dict, **kw: Any) -> dict:
        raise ValueError("Out of range float values are not JSON compliant")

    hosting = FakeHosting()
    monkeypatch.setattr(migration_mod, "peer_call", broken)
    report = asyncio.run(MigrationRole(FakeAgent(hosting)).cmd_migrate(
        "counter", "10.14.0.1", mode="break-before-make", transfer="stop-copy"))
    assert not report["ok"] and "cannot send MIGRATE" in report["error"]
    assert hosting.log[-1][:2] == ("start", "counter") and "counter" in hosting.objects


@pytest.mark.parametrize("bad", [
    {"name": "../victim"},
    {"home_address": "10.14.0.10"},  # not on its home agent's network
    {"nai": "counter@moat\n"},
])
def test_a_migrate_with_a_bad_field_is_refused_before_anything_is_hosted(bad: dict) -> None:
    hosting, role = empty_target()
    body = dict(ARRIVAL, config={**ARRIVAL["config"], **bad})
    with pytest.raises(FieldError):
        asyncio.run(role.on_migrate(None, body))  # type: ignore[arg-type]
    assert hosting.objects == {} and hosting.log == []


def test_a_state_transfer_without_a_valid_name_is_refused_before_a_restore() -> None:
    hosting, role = empty_target()
    with pytest.raises(FieldError):
        asyncio.run(role.on_state_transfer(None, {"name": "a/b", "epoch": "e1", "state": {}}))  # type: ignore[arg-type]
    assert hosting.log == []
