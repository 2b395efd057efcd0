"""The hosting role's prestart (issue 14, item 2) on this machine's real cgroups and uids
(root): started as a router's hosting role starts it, it brings up the agent's fork server and
fills its sandbox slots, each with a live prepared launcher, without the caller waiting;
switched off, nothing is started; the role's stop (cancel, then close the pools) leaves no
launcher, uid claim or cgroup behind."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from agent.core.config import AgentConfig, Interface
from agent.hosting import forkserver, prestart, sandbox_pool
from agent.hosting.cgroups import CgroupManager, CgroupVersion, clean_run, detect
from agent.hosting.cgroups import find_run_cgroups, is_agent_leaf
from agent.hosting.object_uids import default_pool
from agent.hosting.sandbox import ENV_SANDBOX_START, proc_start_time


@pytest.fixture
def run(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if detect() is CgroupVersion.NONE:
        pytest.skip("no usable cgroup controllers here")
    run_id = f"tq{os.getpid()}{secrets.token_hex(2)}"
    manager = CgroupManager(run_id)
    d = Path(tempfile.mkdtemp(prefix="moat-prestart-"))
    os.chmod(d, 0o755)
    monkeypatch.setattr(forkserver, "_server", None)  # this agent has no fork server yet
    monkeypatch.setattr(sandbox_pool, "_pools", {})
    monkeypatch.setenv(ENV_SANDBOX_START, "fork")
    monkeypatch.setenv(sandbox_pool.ENV_POOL, "2")
    monkeypatch.delenv(sandbox_pool.ENV_PREFORK, raising=False)
    config = AgentConfig(name="r1", run_dir=str(d), roles=["hosting"],
                         interfaces=[Interface("r1-eth0", "10.0.0.1", 24)], run_id=run_id)
    try:
        yield config, manager
    finally:
        sandbox_pool.close_all()
        if forkserver._server is not None:
            forkserver._server.stop()
        manager.remove_objects()
        clean_run(run_id)
        shutil.rmtree(d, ignore_errors=True)


def test_prestart_brings_up_the_fork_server_and_slots_and_the_stop_leaves_nothing(
        run, monkeypatch) -> None:
    config, manager = run
    monkeypatch.delenv(prestart.ENV_PRESTART, raising=False)

    async def main() -> tuple[int, list[tuple[int, int]], list[int]]:
        p = prestart.begin(config, manager, delay=0.2)  # returns at once: a thread's work
        assert p is not None and not p.done.is_set()
        assert await asyncio.to_thread(p.done.wait, 60) and p.error is None
        server = forkserver._server
        assert server is not None and server.pid is not None
        pool = sandbox_pool.pool_for(Path(config.run_dir) / "objects", manager)
        slots = list(pool._idle)
        assert len(slots) == 2 and all(s.launcher is not None and s.launcher.alive()
                                       for s in slots)
        await prestart.end(p)  # the role's stop: then the pools close
        sandbox_pool.close_all()
        return server.pid, [(s.launcher.pid, s.launcher.object_pid) for s in slots], \
            [s.identity.uid for s in slots]

    server_pid, launchers, uids = asyncio.run(main())
    assert all(proc_start_time(pid) is None for pair in launchers for pid in pair)
    held = default_pool().claims()
    assert not any(uid in held for uid in uids)
    left = [p for p in find_run_cgroups(config.run_id)
            if not is_agent_leaf(p.name) and not p.name.endswith("objects")]
    assert left == []
    assert proc_start_time(server_pid) is not None  # the server lives on with its agent


def test_switched_off_nothing_is_started(run, monkeypatch) -> None:
    config, manager = run
    monkeypatch.setenv(prestart.ENV_PRESTART, "0")
    assert prestart.begin(config, manager) is None
    assert forkserver._server is None and sandbox_pool._pools == {}
    assert not (Path(config.run_dir) / "objects").exists()
