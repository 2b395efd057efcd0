"""Prepared sandbox slots (agent.hosting.sandbox_pool, issue 14) on this machine's real
cgroups, uids and namespaces (root): an object started from a slot is confined exactly as one
started without (its credentials, capabilities, cgroups and their limits, rlimits, fds,
namespaces, mounts, directory), both ways an object starts; a start that fails after taking a
slot gives back its uid, directory and cgroup; closing the pool leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agent.core.wait import async_wait_until
from agent.hosting import sandbox_pool
from agent.hosting.cgroups import CgroupManager, CgroupVersion, Limits, clean_run, detect
from agent.hosting.cgroups import find_run_cgroups, is_agent_leaf
from agent.hosting.object_uids import default_pool
from agent.hosting.sandbox import ENV_SANDBOX_START, START_MODES, SandboxError, proc_start_time

MiB = 1 << 20
LIMITS = Limits(cpu_quota=0.5, memory_bytes=96 * MiB, pids_max=24)


@pytest.fixture(params=START_MODES)
def start(request, monkeypatch) -> str:
    monkeypatch.setenv(ENV_SANDBOX_START, request.param)
    return request.param


@pytest.fixture
def manager():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if detect() is not CgroupVersion.V1:
        pytest.skip("the facts below read cgroup v1 files")
    run_id = f"tp{os.getpid()}{secrets.token_hex(2)}"
    m = CgroupManager(run_id)
    try:
        yield m
    finally:
        sandbox_pool.close_all()
        m.remove_objects()
        clean_run(run_id)


@pytest.fixture
def objects_dir():
    d = Path(tempfile.mkdtemp(prefix="moat-pool-run-"))
    os.chmod(d, 0o755)
    (d / "objects").mkdir(mode=0o755)
    try:
        yield d / "objects"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def facts(pid: int, ident: Any, workdir: Path, cgroup_dirs: list[Path]) -> dict[str, Any]:
    """What confines process ``pid``, with its own uid and name written as U and N so that
    two objects' facts compare equal when they are confined alike."""
    def norm(text: str) -> str:
        return text.replace(ident.name, "N").replace(str(ident.uid), "U")

    proc = Path(f"/proc/{pid}")
    status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines()
                  if ":\t" in line)
    mounts = [norm(" ".join(line.split()[4:6])) for line in (proc / "mountinfo").read_text().splitlines()]
    st = workdir.stat()
    limits = {}
    for d in cgroup_dirs:
        for name in ("memory.limit_in_bytes", "pids.max", "cpu.cfs_quota_us", "cpu.cfs_period_us"):
            if (d / name).exists():
                limits[name] = (d / name).read_text().strip()
    return {
        "ids": [norm(status[k]) for k in ("Uid", "Gid", "Groups")],
        "caps": [status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")],
        "no_new_privs": status["NoNewPrivs"],
        "cgroups": sorted(norm(line.split(":", 2)[2]).rsplit("/", 1)[-1]
                          for line in (proc / "cgroup").read_text().splitlines()
                          if re.match(r"\d+:(cpu|cpuacct|memory|pids)[,:]", line)),
        "in_cgroups": all(str(pid) in (d / "cgroup.procs").read_text().split() for d in cgroup_dirs),
        "limits": limits,
        "rlimits": [line for line in (proc / "limits").read_text().splitlines()
                    if line.startswith(("Max open files", "Max file size", "Max core file size"))],
        # What each fd is (its number: the control socket's is the agent's socketpair's).
        "fds": sorted(norm(re.sub(r"\[\d+\]$", "", os.readlink(proc / "fd" / fd)))
                      for fd in os.listdir(proc / "fd")),
        "ns": {n: os.readlink(proc / "ns" / n) != os.readlink(f"/proc/self/ns/{n}")
               for n in ("pid", "mnt", "net", "user")},
        "mounts": sorted(mounts),
        "workdir": (norm(str(st.st_uid)), oct(st.st_mode & 0o7777), workdir.parent.name),
        "disk": disk(pid, workdir),
    }


def disk(pid: int, workdir: Path) -> tuple[int, int]:
    """The size and inodes of the object's tmpfs (its working directory, as it sees it)."""
    st = os.statvfs(f"/proc/{pid}/root{workdir}")
    return st.f_blocks * st.f_frsize, st.f_files


async def started(objects_dir: Path, manager: CgroupManager, name: str) -> tuple[Any, dict]:
    from agent.hosting.runtime import ObjectProcess

    p = ObjectProcess(name, "agent.objects.counter:Counter", "127.0.0.1", 0, "r1",
                      objects_dir=objects_dir, cgroups=manager, limits=LIMITS)
    await p.start()
    assert p.pid is not None and p.sandbox.cgroup is not None
    return p, facts(p.pid, p.identity, p.workdir, p.sandbox.cgroup.dirs)



def claimed_as(ident: Any) -> bool:
    """Whether ``ident``'s uid is still claimed under its own name: given back, another
    netns module running at the same time may claim the same uid for an object of its own
    at once, under another name."""
    return default_pool().claims().get(ident.uid, {}).get("name") == ident.name

def test_an_object_from_a_slot_is_confined_as_one_started_without(start, manager, objects_dir,
                                                                   monkeypatch) -> None:
    """Forked, the slot also holds a prepared launcher (forked ahead into the slot's cgroup
    and namespaces): the object it starts is confined as one started without a slot."""
    async def main() -> tuple[dict, dict, dict[str, Any], str, int, tuple]:
        monkeypatch.setenv(sandbox_pool.ENV_POOL, "0")
        plain, plain_facts = await started(objects_dir, manager, "plain")
        monkeypatch.setenv(sandbox_pool.ENV_POOL, "2")
        pool = sandbox_pool.pool_for(objects_dir, manager)
        assert pool is not None and await asyncio.to_thread(pool.wait_full, 30)
        ready = {s.identity.name: s.launcher for s in pool._idle}
        pooled, pooled_facts = await started(objects_dir, manager, "pooled")
        name, relay = pooled.identity.name, pooled.sandbox.proc.pid
        by = (plain.sandbox.started_by, pooled.sandbox.started_by)
        await plain.stop()
        await pooled.stop()
        return plain_facts, pooled_facts, ready, name, relay, by

    plain, pooled, ready, name, relay, by = asyncio.run(main())
    assert name in ready  # it did start from a prepared slot
    if start == "fork":  # ... and from its prepared launcher: the relay is that process
        assert ready[name] is not None and relay == ready[name].pid
        assert by == ("fork", "prepared")
    else:
        assert ready[name] is None  # (the exec path prepares none)
        assert by == ("exec", "exec")
    assert pooled == plain
    assert plain["in_cgroups"] and plain["ids"][0].split() == ["U"] * 4
    assert plain["caps"][2] == "0000000000000000" and plain["no_new_privs"] == "1"
    assert plain["limits"]["pids.max"] == "24"
    assert plain["limits"]["memory.limit_in_bytes"] == str(96 * MiB)
    assert set(plain["cgroups"]) == {manager.prefix + "N"} and plain["workdir"][:2] == ("U", "0o700")


def test_a_failed_start_gives_the_slot_back_and_close_leaves_nothing(manager, objects_dir,
                                                                     monkeypatch) -> None:
    from agent.hosting import sandbox
    from agent.hosting.runtime import ObjectProcess, ObjectProcessError

    monkeypatch.setenv(sandbox_pool.ENV_POOL, "2")
    monkeypatch.setenv(ENV_SANDBOX_START, "fork")  # (its slots hold prepared launchers)

    async def refused(*_a: Any, **_kw: Any) -> Any:
        raise SandboxError("refused by the test")

    async def main() -> tuple[Any, list]:
        pool = sandbox_pool.pool_for(objects_dir, manager)
        assert await asyncio.to_thread(pool.wait_full, 30)
        slot = pool._idle[0]
        monkeypatch.setattr(sandbox, "spawn", refused)
        p = ObjectProcess("doomed", "agent.objects.counter:Counter", "127.0.0.1", 0, "r1",
                          objects_dir=objects_dir, cgroups=manager, limits=LIMITS)
        with pytest.raises(ObjectProcessError, match="refused by the test"):
            await p.start()
        return slot, [s.identity for s in pool._idle]

    slot, idle = asyncio.run(main())
    assert slot.taken and not slot.workdir.exists()
    assert not any(d.exists() for d in slot.cgroup.dirs)
    assert not claimed_as(slot.identity)
    assert slot.launcher is not None and slot.launcher.pidfd is None  # ended with its start
    assert proc_start_time(slot.launcher.pid) is None
    launchers = [(s.launcher.pid, s.launcher.object_pid) for s in sandbox_pool.pool_for(
        objects_dir, manager)._idle]
    assert launchers and all(pid is not None for pair in launchers for pid in pair)
    sandbox_pool.close_all()
    assert not any(claimed_as(ident) for ident in idle)
    gone = {pid: proc_start_time(pid) is None for pair in launchers for pid in pair}
    assert all(gone.values()), gone  # every idle slot's launcher (relay and PID 1) ended
    assert [p for p in objects_dir.iterdir() if p.is_dir()] == []
    left = [p for p in find_run_cgroups(manager.run_id)
            if not is_agent_leaf(p.name) and not p.name.endswith("objects")]
    assert left == []


def test_a_slot_whose_launcher_died_is_replaced_not_used(manager, objects_dir,
                                                          monkeypatch) -> None:
    """SIGKILL to an idle slot's prepared launcher: the next start does not take that slot
    (whose uid, directory and cgroup are given back) and starts from another one."""
    monkeypatch.setenv(sandbox_pool.ENV_POOL, "2")
    monkeypatch.setenv(ENV_SANDBOX_START, "fork")

    async def main() -> tuple[Any, str, int, dict]:
        pool = sandbox_pool.pool_for(objects_dir, manager)
        assert await asyncio.to_thread(pool.wait_full, 30)
        dead = pool._idle[0]
        os.kill(dead.launcher.pid, signal.SIGKILL)
        await async_wait_until(lambda: not dead.launcher.alive(), 10,
                               what="the launcher seen dead")
        p, p_facts = await started(objects_dir, manager, "after")
        name, relay = p.identity.name, p.sandbox.proc.pid
        answer = await p.call("stats")
        await p.stop()
        return dead, name, relay, answer

    dead, name, relay, answer = asyncio.run(main())
    assert name != dead.identity.name and relay != dead.launcher.pid
    assert answer["served"] == 0  # it runs and answers
    assert not claimed_as(dead.identity)
    assert not dead.workdir.exists() and not any(d.exists() for d in dead.cgroup.dirs)
