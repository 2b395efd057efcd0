"""A VM's upgrade (issue 13, item 5): the new version runs from the old one's state, or the
old one runs again with its state: a remote site unreachable, a version that does not verify,
start or take the state each leave the VM on its previous version with the state it had.

Same real parts and fakes as test_vm_manager (its Env); the fake objects here also keep a
count (their state), hand it over at stop and may refuse one when they are the new version.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.hosting import runtime
from agent.vm.errors import SiteUnreachable
from test_vm_manager import Env, FakeProcess


class CountingProcess(FakeProcess):
    """A fake object with a count: ``get_state`` and ``stop`` give it, ``start`` takes it."""

    counts: dict[str, int]  # shared with the test: object name -> its count, as it runs
    refuse: Callable[["CountingProcess", Any], str | None]  # why this start fails, or None

    @property
    def new_version(self) -> bool:
        return "/versions/" in str(self.kw.get("code_dir", ""))

    async def start(self, warm: bool = False, state: Any = None) -> None:
        why = type(self).refuse(self, state)
        if why:
            raise runtime.ObjectProcessError(f"cannot start object {self.name}: {why}")
        await super().start(warm, state)
        self.counts[self.object_name] = (state or {}).get("count", 0)

    async def stop(self) -> Any:
        await super().stop()
        return {"count": self.counts[self.object_name]}

    async def call(self, cmd: str, timeout: float = 0, **args: Any) -> Any:
        if cmd == "get_state":
            return {"count": self.counts[self.object_name]}
        return await super().call(cmd, timeout, **args)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    env = Env(tmp_path, monkeypatch)
    CountingProcess.counts = {}
    CountingProcess.refuse = staticmethod(lambda process, state: None)
    monkeypatch.setattr(runtime, "ObjectProcess", CountingProcess)
    env.provision()
    CountingProcess.counts.update(counter=5, logger=2)  # what they served before the upgrade
    env.publish(version="2.0")
    return env


def upgrade(env: Env) -> dict[str, Any]:
    return asyncio.run(env.manager._upgrade(env.manager.vms["v1"], "2.0"))


def running_code(env: Env) -> set[str]:
    """The code directories of the objects the VM runs now."""
    return {str(p.kw["code_dir"]) for p in env.manager.vms["v1"].objects.values()
            if p.started and not p.stopped}


def test_an_upgrade_runs_the_new_version_from_the_old_ones_state(env: Env) -> None:
    old = env.manager.vms["v1"].installed
    outcome = upgrade(env)
    assert outcome["ok"] and not outcome["rolled_back"], outcome
    vm = env.manager.vms["v1"]
    assert vm.version == "2.0" and vm.installed != old
    assert not Path(old).exists()  # the old files go only once the new version runs
    assert all("/versions/" in c for c in running_code(env)) and len(running_code(env)) == 2
    assert CountingProcess.counts == {"counter": 5, "logger": 2}
    asyncio.run(env.manager.remove("v1"))
    assert env.leftovers("versions") == []


@pytest.mark.parametrize("why", ["does not start", "refuses the state"])
def test_a_new_version_that_fails_rolls_back_to_the_old_one_with_its_state(env: Env, why: str) -> None:
    """The new logger fails (after the new counter started): every new object stops, the
    old version runs again from the checkpoints the objects stopped with."""
    old = env.manager.vms["v1"].installed

    def refuse(process: CountingProcess, state: Any) -> str | None:
        if process.new_version and process.object_name == "logger":
            return why if why == "does not start" or state is not None else None
        return None

    CountingProcess.refuse = staticmethod(refuse)
    outcome = upgrade(env)
    assert not outcome["ok"] and outcome["rolled_back"], outcome
    assert why in outcome["error"]
    vm = env.manager.vms["v1"]
    assert vm.version == "1.0" and vm.installed == old and Path(old, "manifest.json").exists()
    assert running_code(env) == {f"{old}/counter", f"{old}/logger"}
    assert CountingProcess.counts == {"counter": 5, "logger": 2}
    assert env.leftovers("versions") == ["installed/v1"]  # the new version's files are gone
    assert any("rolled back to 1.0" in s for s, _ in vm.steps)
    assert env.manager.errors[-1]["step"].startswith("upgrade")


def test_the_remote_site_unreachable_during_an_upgrade_stops_nothing(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The update check saw 2.0; the site is gone when the upgrade fetches it: the old
    version never stopped (no request lost) and keeps its state."""
    vm = env.manager.vms["v1"]
    vm.policy["update_check_interval_s"] = 10
    vm.last_update_check = env.clock.now - 60
    fetch = env._fetch

    def flaky(*args: Any, **kw: Any) -> Any:
        if len(env.fetches) >= 2:  # the provision's, the update check's; then the upgrade's
            env.fetches.append("unreachable")
            raise SiteUnreachable("no route to 10.0.9.9")
        return fetch(*args, **kw)

    from agent.vm import fetch as fetch_mod
    monkeypatch.setattr(fetch_mod, "fetch_service", flaky)
    before = set(vm.objects.values())
    [outcome] = asyncio.run(env.manager.check_updates())
    assert env.fetches[-1] == "unreachable"
    assert not outcome["ok"] and not outcome["rolled_back"] and "SiteUnreachable" in outcome["error"]
    assert set(vm.objects.values()) == before and not any(p.stopped for p in before)
    assert vm.version == "1.0" and CountingProcess.counts == {"counter": 5, "logger": 2}
    assert env.leftovers("versions") == ["installed/v1"]


def test_an_object_that_gives_no_checkpoint_is_not_upgraded(env: Env,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async def silent(self: CountingProcess, cmd: str, timeout: float = 0, **args: Any) -> Any:
        raise runtime.ObjectProcessError(f"object {self.name} did not answer {cmd}")

    vm = env.manager.vms["v1"]
    before = set(vm.objects.values())
    monkeypatch.setattr(CountingProcess, "call", silent)
    outcome = upgrade(env)
    assert not outcome["ok"] and "gave no checkpoint" in outcome["error"]
    assert set(vm.objects.values()) == before and not any(p.stopped for p in before)
    assert vm.version == "1.0"


def test_a_version_that_rolled_back_is_not_tried_again_but_a_newer_one_is(env: Env) -> None:
    """Each try of a version that fails stops the objects: the update check leaves the one
    that rolled back alone and upgrades to the next version the site publishes."""
    broken = {"2.0"}  # the versions whose objects cannot start

    def refuse(process: CountingProcess, state: Any) -> str | None:
        installed = Path(str(process.kw["code_dir"])).parent / "manifest.json"
        return "broken" if process.new_version and json.loads(installed.read_text())["version"] in broken else None

    CountingProcess.refuse = staticmethod(refuse)
    vm = env.manager.vms["v1"]
    vm.policy["update_check_interval_s"] = 10
    vm.last_update_check = env.clock.now - 60
    [outcome] = asyncio.run(env.manager.check_updates())
    assert outcome["rolled_back"] and vm.version == "1.0", outcome
    started = len(env.journal)
    env.clock.now += 11  # the next check is due: the site still has 2.0
    assert asyncio.run(env.manager.check_updates()) == [] and len(env.journal) == started
    assert vm.version == "1.0" and CountingProcess.counts == {"counter": 5, "logger": 2}
    env.publish(version="3.0")
    env.clock.now += 11
    [again] = asyncio.run(env.manager.check_updates())
    assert again["ok"] and vm.version == "3.0", again
    assert CountingProcess.counts == {"counter": 5, "logger": 2}


class _AgentDied(BaseException):
    """The agent dying (kill -9) in the middle of an upgrade: nothing after it runs."""


class SavedCheckpoints:
    """Stands in for the VM record: what was saved of each object's checkpoint, and when."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] = {}
        self.saved: dict[str, Any] = {}

    def checkpoint(self, vm: str, obj: str, state: Any) -> bool:
        self.pending[obj] = state
        return True

    def save(self) -> None:
        self.saved.update(self.pending)

    def keep(self, *args: Any, **kw: Any) -> None:
        pass


def test_a_crash_between_the_stop_and_the_new_start_finds_the_final_checkpoints_recorded(
        env: Env) -> None:
    """The objects stopped for the upgrade gave their final counts; the agent dies before
    the new version runs: the record must already hold those counts (a restarted agent
    starts them from it), not the last periodic checkpoint taken before."""
    record = SavedCheckpoints()
    env.manager.record = record

    def die_at_new_start(process: CountingProcess, state: Any) -> str | None:
        if process.new_version:
            CountingProcess.counts[process.object_name] = -1  # never reached: it died first
            raise _AgentDied()
        return None

    CountingProcess.refuse = staticmethod(die_at_new_start)
    CountingProcess.counts.update(counter=7)  # served since the last periodic checkpoint
    with pytest.raises(_AgentDied):
        upgrade(env)
    assert record.saved == {"counter": {"count": 7}, "logger": {"count": 2}}
