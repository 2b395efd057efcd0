"""Prepared sandbox slots (agent.hosting.sandbox_pool): a slot is handed out once, a failed
preparation or start gives back what it took, the pool refills in the background up to its
bound, and closing it removes every idle slot. Fakes stand for the uid registry, the working
directory and the cgroups (the real ones are in tests/netns/test_sandbox_slots.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.core.errors import AgentError
from agent.core.wait import wait_until
from agent.hosting import sandbox_pool
from agent.hosting.cgroups import CgroupError, CgroupVersion
from agent.hosting.sandbox_pool import MAX_SIZE, SandboxPoolError, SlotPool, pool_size
from tests.unit.test_cgroups import HYBRID_PROC, proc_file, v1  # noqa: F401 - the fixture


@dataclass(frozen=True)
class Ident:
    uid: int
    gid: int
    name: str


class FakeUids:
    """Claims in a dict, as UidPool's registry: uid -> {"name"}."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.held: dict[int, dict] = {}
        self.numbers = itertools.count(620000)
        self.fail_after = fail_after
        self.claimed = 0

    def claim(self) -> Ident:
        if self.fail_after is not None and self.claimed >= self.fail_after:
            raise AgentError("no free uid")
        self.claimed += 1
        uid = next(self.numbers)
        ident = Ident(uid, uid, f"o{uid}-x")
        self.held[uid] = {"name": ident.name}
        return ident

    def release(self, ident: Ident) -> None:
        if self.held.get(ident.uid, {}).get("name") == ident.name:
            del self.held[ident.uid]

    def claims(self) -> dict[int, dict]:
        return dict(self.held)


class FakeCgroup:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.path = root / name
        self.path.mkdir()
        self.limits = None

    @property
    def dirs(self) -> list[Path]:
        return [self.path]

    def remove(self) -> None:
        if self.path.exists():
            self.path.rmdir()


class FakeManager:
    version = CgroupVersion.V1

    def __init__(self, root: Path, fail: bool = False) -> None:
        self.root = root
        self.fail = fail
        root.mkdir(exist_ok=True)

        self.kept: dict[str, FakeCgroup] = {}

    def prepare(self, name: str) -> FakeCgroup:
        if self.fail:
            raise CgroupError("no cgroups today")
        self.kept[name] = FakeCgroup(self.root, name)
        return self.kept[name]

    def create(self, name: str) -> FakeCgroup:
        """What an object's sandbox does: the kept one, else a new one (refused if there)."""
        return self.kept.pop(name, None) or FakeCgroup(self.root, name)

    def unprepare(self, name: str) -> FakeCgroup | None:
        return self.kept.pop(name, None)

    def prepared(self) -> set[str]:
        return set(self.kept)


def make_dir(parent: Path, name: str, uid: int, gid: int) -> Path:
    parent.mkdir(exist_ok=True)
    path = parent / name
    path.mkdir()  # refuses an existing one, as make_workdir does
    return path


def remove_dir(path: Path) -> None:
    if path.exists():
        path.rmdir()


@pytest.fixture
def world(tmp_path: Path):
    uids = FakeUids()
    manager = FakeManager(tmp_path / "cg")
    objects = tmp_path / "objects"
    objects.mkdir()

    def pool(size: int = 2, **kw) -> SlotPool:
        p = SlotPool(objects, kw.pop("manager", manager), size, uids=kw.pop("uids", uids),
                     make_dir=make_dir, remove_dir=remove_dir, refill_delay=kw.pop("delay", 0.0))
        pools.append(p)
        return p

    pools: list[SlotPool] = []
    yield pool, uids, manager, objects
    for p in pools:
        p.close()


def test_a_slot_is_handed_out_once_and_its_cgroup_taken_once(world) -> None:
    pool_of, uids, manager, objects = world
    pool = pool_of(size=3, delay=60.0)  # no refill during the test
    assert pool.fill() == 3
    slots = [pool.take() for _ in range(3)]
    assert pool.take() is None  # empty: the caller prepares its own
    assert len({s.identity.uid for s in slots}) == 3
    assert len({s.workdir for s in slots}) == 3
    for s in slots:
        assert s.taken and s.workdir.is_dir() and s.cgroup.path.is_dir()
        assert manager.create(s.identity.name) is s.cgroup  # the object's sandbox takes it
        with pytest.raises(FileExistsError):
            manager.create(s.identity.name)  # never twice: a second one is refused
    # A slot put back by mistake is refused, not handed to a second object.
    pool._idle.append(slots[0])
    with pytest.raises(SandboxPoolError, match="handed out already"):
        pool.take()


def test_a_failed_preparation_gives_back_what_it_took(world, tmp_path: Path) -> None:
    pool_of, uids, manager, objects = world
    broken = FakeManager(tmp_path / "cg2", fail=True)
    pool = pool_of(manager=broken, delay=60.0)
    assert pool.fill() == 0
    assert uids.claimed == 1 and uids.held == {}  # claimed, then released
    assert list(objects.iterdir()) == []
    with pytest.raises(CgroupError):
        pool.prepare()
    assert uids.held == {}


def test_a_start_that_failed_before_its_sandbox_loses_the_slots_cgroup(world) -> None:
    """The runtime released the uid and the directory (its failure path); the cgroup the
    sandbox never took is removed at the next refill."""
    pool_of, uids, manager, objects = world
    pool = pool_of(size=1, delay=60.0)
    pool.fill()
    slot = pool.take()
    assert slot is not None and slot.cgroup.path.is_dir()
    other = pool_of(size=1, delay=60.0)
    other.fill()
    kept = other.take()  # still starting: its claim is held
    uids.release(slot.identity)
    remove_dir(slot.workdir)
    assert pool.sweep() == [slot.identity.name]
    assert not slot.cgroup.path.exists()
    assert slot.identity.name not in manager.prepared()
    assert other.sweep() == [] and kept.cgroup.path.is_dir()
    # Once its sandbox took it, a stopped object's cgroup is the sandbox's to remove.
    assert manager.create(kept.identity.name) is kept.cgroup
    uids.release(kept.identity)
    assert other.sweep() == [] and kept.cgroup.path.is_dir() and other._handed == {}


def test_the_pool_refills_in_the_background_up_to_its_bound(world) -> None:
    pool_of, uids, manager, objects = world
    pool = pool_of(size=2, delay=0.01)
    assert pool.take() is None  # nothing made yet: this take schedules the first fill
    assert wait_until(lambda: pool.idle() == 2, timeout=5)
    taken = [pool.take(), pool.take()]
    assert all(taken) and wait_until(lambda: pool.idle() == 2, timeout=5)
    pool.wait_full(5)
    pool.fill()
    pool.fill()
    assert pool.idle() == 2 and pool.prepared == 4  # never more than the bound
    held = {s.identity.uid for s in taken} | {s.identity.uid for s in pool._idle}
    assert set(uids.held) == held


def test_a_removed_slot_is_discarded_not_used(world) -> None:
    pool_of, uids, manager, objects = world
    pool = pool_of(size=2, delay=60.0)
    pool.fill()
    first = pool._idle[0]
    remove_dir(first.workdir)  # its storage went (a VM removed)
    slot = pool.take()
    assert slot is not None and slot is not first
    assert first.identity.uid not in uids.held and not first.cgroup.path.exists()


def test_close_removes_every_idle_slot_and_stops_refilling(world) -> None:
    pool_of, uids, manager, objects = world
    pool = pool_of(size=3, delay=0.0)
    pool.fill()
    handed = pool.take()  # taken, its cgroup not yet taken by a sandbox
    assert wait_until(lambda: pool.idle() == 3, timeout=5)
    pool.close()
    assert pool.idle() == 0 and pool.take() is None
    assert set(uids.held) == {handed.identity.uid}  # the runtime releases the taken one
    assert sorted(p.name for p in (manager.root).iterdir()) == [] and manager.prepared() == set()
    assert sorted(p.name for p in objects.iterdir()) == [handed.identity.name]
    assert pool.fill() == 0


def test_pool_size_is_bounded_and_checked(monkeypatch) -> None:
    assert pool_size("0") == 0 and pool_size("3") == 3 and pool_size("") == 2
    for bad in ("-1", "x", str(MAX_SIZE + 1), "1.5"):
        with pytest.raises(SandboxPoolError):
            pool_size(bad)
    with pytest.raises(SandboxPoolError):
        SlotPool(Path("/nonexistent"), None, MAX_SIZE + 1, uids=FakeUids(), make_dir=make_dir,
                 remove_dir=remove_dir)
    monkeypatch.setenv(sandbox_pool.ENV_POOL, "0")
    assert sandbox_pool.pool_for(Path("/nonexistent"), None) is None


def test_the_number_of_pools_is_bounded(monkeypatch, tmp_path: Path) -> None:
    """One pool per objects directory and manager; past MAX_POOLS the least recently used
    is closed (its idle slots given back)."""
    uids = FakeUids()
    import agent.hosting.object_uids as object_uids
    import agent.hosting.sandbox as sandbox

    monkeypatch.setattr(object_uids, "default_pool", lambda: uids)
    monkeypatch.setattr(sandbox, "make_workdir", make_dir)
    monkeypatch.setattr(sandbox, "remove_workdir", remove_dir)
    monkeypatch.setattr(sandbox_pool, "_pools", {})
    monkeypatch.setenv(sandbox_pool.ENV_POOL, "1")
    monkeypatch.setenv(sandbox_pool.ENV_PREFORK, "0")  # fake cgroups: no launcher to fork
    managers = [FakeManager(tmp_path / f"cg{i}") for i in range(sandbox_pool.MAX_POOLS + 1)]
    for i in range(len(managers)):
        (tmp_path / f"objects{i}").mkdir()
    pools = [sandbox_pool.pool_for(tmp_path / f"objects{i}", m) for i, m in enumerate(managers)]
    try:
        assert sandbox_pool.pool_for(tmp_path / "objects1", managers[1]) is pools[1]
        pools[0].fill()  # closed already: makes nothing
        assert pools[0].idle() == 0 and pools[0]._closed
        assert len(sandbox_pool._pools) == sandbox_pool.MAX_POOLS
        pools[1].fill()
        ident, workdir = sandbox_pool.claim(tmp_path / "objects1", managers[1])
        assert workdir.is_dir() and uids.held[ident.uid]["name"] == ident.name
        assert ident.name in managers[1].prepared()  # its cgroup waits for its sandbox
        assert pools[0].manager.prepared() == set()  # the closed pool's were removed
    finally:
        sandbox_pool.close_all()


def test_a_removed_objects_directory_is_never_made_again(world) -> None:
    """A run's (or a VM's) storage removed: the pool's refill makes nothing there."""
    pool_of, uids, manager, objects = world
    pool = pool_of(size=2, delay=60.0)
    objects.rmdir()
    assert pool.fill() == 0 and not objects.exists() and uids.claimed == 0


def test_the_cgroup_manager_hands_a_prepared_leaf_to_its_object_once(v1, tmp_path: Path) -> None:
    """CgroupManager.prepare makes the leaf without limits; create of that name takes it and
    writes the limits; a second create is refused; unprepare gives back an untaken one."""
    from agent.hosting.cgroups import CgroupManager, Limits

    m = CgroupManager("r1", root=v1.root, proc_self_cgroup=proc_file(tmp_path, HYBRID_PROC))
    cg = m.prepare("o620000-ab")
    leaf = v1.root / "pids" / "x" / "moat-r1-objects" / "moat-r1-o620000-ab"
    assert leaf.is_dir() and (leaf / "pids.max").read_text().strip() == "max"
    assert m.prepared() == {"o620000-ab"}
    assert m.create("o620000-ab", Limits(pids_max=7)) is cg
    assert (leaf / "pids.max").read_text() == "7" and m.prepared() == set()
    with pytest.raises(CgroupError, match="exists already"):
        m.create("o620000-ab", Limits(pids_max=7))
    other = m.prepare("o620001-cd")
    assert m.unprepare("o620001-cd") is other and m.unprepare("o620001-cd") is None


def test_the_hosting_roles_stop_closes_the_pools(tmp_path: Path, monkeypatch) -> None:
    """An agent forked by the zygote ends with os._exit (no atexit): its hosting role's stop
    removes the idle slots."""
    import asyncio

    from agent.core.config import AgentConfig, Interface
    from agent.hosting.objects import HostingRole

    class Agent:
        config = AgentConfig(name="r18b", run_dir=str(tmp_path), roles=[],
                             interfaces=[Interface("eth0", "10.18.0.2")], router_key="ab" * 32)

        def role(self, cls: type) -> None:
            return None

    closed = []
    monkeypatch.setattr(sandbox_pool, "close_all", lambda: closed.append(True))
    asyncio.run(HostingRole(Agent()).stop())
    assert closed == [True]
