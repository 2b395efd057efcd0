"""Prepared launchers in sandbox slots (issue 14): each slot's is handed to the start that took
the slot, once; a slot whose launcher died is replaced, not used; closing the pool, or a start
that failed before its sandbox took the launcher, ends it and gives the slot's uid back. Fakes
stand for the launcher, the uid registry, directories and cgroups (the real launchers are in
tests/netns/test_sandbox_slots.py and test_forkserver_isolation.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.errors import AgentError
from agent.hosting import sandbox_pool
from agent.hosting.sandbox_pool import SandboxPoolError, SlotPool, prefork
from tests.unit.test_sandbox_pool import FakeManager, FakeUids, make_dir, remove_dir


class FakeLauncher:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dead = False
        self.closed = False

    def alive(self) -> bool:
        return not self.dead and not self.closed

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def world(tmp_path: Path):
    uids = FakeUids()
    manager = FakeManager(tmp_path / "cg")
    objects = tmp_path / "objects"
    objects.mkdir()
    made: list[FakeLauncher] = []
    pools: list[SlotPool] = []

    def make_launcher(slot) -> FakeLauncher:
        assert slot.cgroup is not None and slot.cgroup.path.is_dir()  # made into its cgroup
        made.append(FakeLauncher(slot.workdir))
        return made[-1]

    def pool(size: int = 2, make=make_launcher) -> SlotPool:
        p = SlotPool(objects, manager, size, uids=uids, make_dir=make_dir,
                     remove_dir=remove_dir, refill_delay=60.0, make_launcher=make)
        pools.append(p)
        return p

    yield pool, uids, manager, made
    for p in pools:
        p.close()


def test_a_slots_launcher_goes_to_the_start_that_took_the_slot_once(world) -> None:
    pool_of, uids, manager, made = world
    pool = pool_of()
    assert pool.fill() == 2 and len(made) == 2
    slot = pool.take()
    assert slot is not None and slot.launcher in made
    assert pool.take_launcher(slot.workdir) is slot.launcher
    assert pool.take_launcher(slot.workdir) is None  # once
    other = next(s for s in pool._idle)
    assert pool.take_launcher(other.workdir) is None  # an idle slot's is not handed out
    assert not slot.launcher.closed  # the start's now: the pool does not end it


def test_a_slot_whose_launcher_died_is_replaced_not_used(world) -> None:
    pool_of, uids, manager, made = world
    pool = pool_of()
    pool.fill()
    dead = pool._idle[0]
    dead.launcher.dead = True
    slot = pool.take()
    assert slot is not None and slot is not dead and slot.launcher.alive()
    # The dead one's slot is gone entirely: launcher ended, uid, directory, cgroup given back.
    assert dead.launcher.closed
    assert dead.identity.uid not in uids.held
    assert not dead.workdir.exists() and not dead.cgroup.path.exists()
    assert dead.identity.name not in manager.prepared()
    assert pool.fill() == 2 and pool.idle() == 2  # and replaced by the next refill
    assert all(s.launcher.alive() for s in pool._idle)


def test_close_ends_idle_launchers_and_handed_ones_no_start_took(world) -> None:
    pool_of, uids, manager, made = world
    pool = pool_of(size=3)
    pool.fill()
    handed = pool.take()
    pool.close()
    assert all(launcher.closed for launcher in made)
    assert pool.take_launcher(handed.workdir) is None
    assert set(uids.held) == {handed.identity.uid}  # the start holds its own until it stops


def test_a_start_that_failed_before_its_sandbox_took_the_launcher_ends_it(world) -> None:
    """The runtime gives the uid back when its start fails; the next refill's sweep ends the
    launcher no start took (and removes the slot's cgroup, as before)."""
    pool_of, uids, manager, made = world
    pool = pool_of()
    pool.fill()
    slot = pool.take()
    kept = pool.take()
    uids.release(slot.identity)
    pool.sweep()
    assert slot.launcher.closed and not kept.launcher.closed
    assert pool.take_launcher(slot.workdir) is None
    assert pool.take_launcher(kept.workdir) is kept.launcher


def test_a_slot_without_a_launcher_still_serves(world) -> None:
    """The fork server cannot make one (it did not start, say): the slot is made without."""
    pool_of, uids, manager, made = world

    def failing(_slot) -> None:
        raise AgentError("no fork server today")

    pool = pool_of(make=failing)
    assert pool.fill() == 2
    slot = pool.take()
    assert slot is not None and slot.launcher is None and slot.workdir.is_dir()
    assert pool.take_launcher(slot.workdir) is None


def test_prefork_switch() -> None:
    assert prefork("1") and prefork("") and not prefork("0")
    with pytest.raises(SandboxPoolError):
        prefork("yes")


def test_the_agents_pools_prefork_only_for_the_fork_path(monkeypatch, tmp_path: Path) -> None:
    from agent.hosting.sandbox import ENV_SANDBOX_START

    monkeypatch.setattr(sandbox_pool, "_pools", {})
    monkeypatch.setenv(sandbox_pool.ENV_POOL, "1")
    seen = {}
    for mode, flag in (("fork", "1"), ("exec", "1"), ("fork", "0")):
        monkeypatch.setenv(ENV_SANDBOX_START, mode)
        monkeypatch.setenv(sandbox_pool.ENV_PREFORK, flag)
        d = tmp_path / f"{mode}{flag}"
        d.mkdir()
        pool = sandbox_pool.pool_for(d, None)
        seen[(mode, flag)] = pool.make_launcher is not None
        pool.close()
    assert seen == {("fork", "1"): True, ("exec", "1"): False, ("fork", "0"): False}
