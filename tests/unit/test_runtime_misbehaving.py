"""Objects that misbehave on their control channel (issue 12): one answering garbage, one
not answering at all, one whose state is NaN. Stopping any of them stops and kills its
process, whatever else fails on the way; the real runner refuses a NaN checkpoint with a clear
error and keeps serving."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from agent.core.config import AgentConfig, Interface
from agent.core.errors import ControlError
from agent.hosting import runtime
from agent.hosting.objects import HostedObject, HostingRole
from agent.hosting.runtime import ObjectProcess, ObjectProcessError
from plain_object import PlainSandbox, fake_child, object_on

REPO = Path(__file__).resolve().parents[2]


def fake_child_ignoring_term(body: str) -> list[str]:
    """A scripted child that ignores SIGTERM: only a kill ends it."""
    return fake_child(body, ignore_term=True)


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(main(), 60))




#: Answers every command with something that is not its answer, ignores the end of its
#: channel and SIGTERM: only a kill ends it.
GARBAGE_CHILD = fake_child_ignoring_term("""
    junk = [b"Traceback (most recent call last): not an answer",
            b'{"no": "id"}', b'{"id": 999999, "ok": true, "result": 1}',
            b'{"id": 1, "ok": "maybe"}', b"[" * 5000, b"\\xff\\xfe"]
    for i, line in enumerate(f):
        f.write(junk[i % len(junk)] + b"\\n")
        f.flush()
    signal.pause()
""")

#: Reads its commands and never answers; ignores the end of its channel and SIGTERM.
SILENT_CHILD = fake_child_ignoring_term("""
    for line in f:
        pass
    signal.pause()
""")


class FakeAgent:
    def __init__(self, tmp_path: Path) -> None:
        self.config = AgentConfig(name="r18b", run_dir=str(tmp_path), roles=[],
                                  interfaces=[Interface("eth0", "10.18.0.2")], router_key="ab" * 32)

    def role(self, cls: type) -> Any:
        return None


def hosting_with(tmp_path: Path, process: ObjectProcess, monkeypatch: pytest.MonkeyPatch,
                 address_fails: bool = False) -> tuple[HostingRole, list]:
    role = HostingRole(FakeAgent(tmp_path))
    removed: list = []

    async def home_address(self, address: str, add: bool) -> None:
        removed.append((address, add))
        if address_fails:
            raise ControlError(f"home address {address} on lo: no such address")

    monkeypatch.setattr(HostingRole, "_home_address", home_address)
    role.objects["counter"] = HostedObject("counter", "10.16.0.100", process=process)
    return role, removed


@pytest.mark.parametrize("argv", [GARBAGE_CHILD, SILENT_CHILD], ids=["garbage", "silent"])
@pytest.mark.parametrize("address_fails", [False, True], ids=["", "address-gone"])
def test_stopping_an_object_that_misbehaves_kills_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      argv: list[str], address_fails: bool) -> None:
    monkeypatch.setattr(runtime, "STOP_TIMEOUT", 0.5)
    monkeypatch.setattr(runtime, "CALL_TIMEOUT", 0.5)

    async def main() -> tuple[dict, PlainSandbox, list]:
        obj = await object_on(tmp_path, argv)
        role, removed = hosting_with(tmp_path, obj, monkeypatch, address_fails)
        with pytest.raises(ObjectProcessError):
            await obj.call("stats", timeout=0.5)
        sandbox = obj.sandbox
        stopped = await role.cmd_object_stop("counter", deregister=False)
        return stopped, sandbox, removed

    stopped, sandbox, removed = run(main)
    assert sandbox.killed and sandbox.proc.returncode == -9
    assert stopped["state"] is None and removed == [("10.16.0.100", False)]
    assert any("hold" in e for e in stopped["errors"]), stopped["errors"]
    assert any("home address" in e for e in stopped["errors"]) == address_fails


def test_kill_records_why_for_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "STOP_TIMEOUT", 0.5)

    async def main() -> tuple[HostingRole, PlainSandbox, float]:
        obj = await object_on(tmp_path, SILENT_CHILD)
        role, _ = hosting_with(tmp_path, obj, monkeypatch)
        sandbox = obj.sandbox
        started = asyncio.get_running_loop().time()
        await role.kill("counter", "did not answer get_state")
        return role, sandbox, asyncio.get_running_loop().time() - started

    role, sandbox, took = run(main)
    assert took < 0.5  # killed at once: nothing is asked of a process known not to answer
    assert sandbox.proc.returncode == -9 and "counter" not in role.objects
    (killed,) = role.status()["killed_objects"]
    assert killed["name"] == "counter" and killed["reason"] == "did not answer get_state"


NAN_OBJECT = """
from agent.objects.counter import Counter

class NaNCounter(Counter):
    def get_state(self):
        return {"count": self.count, "ratio": float("nan")}
"""


def test_the_real_runner_refuses_a_nan_checkpoint_keeps_serving_and_stops(tmp_path: Path) -> None:
    (tmp_path / "nan_object.py").write_text(NAN_OBJECT)
    argv = [sys.executable, "-m", "agent.hosting.runner", "--spec", "nan_object:NaNCounter",
            "--name", "counter", "--address", "127.0.0.1", "--port", "0", "--control-fd", "{fd}"]
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}")

    async def main() -> tuple[Any, ...]:
        obj = await object_on(tmp_path, argv, env)
        await obj.call("stats", timeout=20)  # the first answer waits for imports
        with pytest.raises(ObjectProcessError, match="not strict JSON") as refused:
            await obj.call("get_state")
        stats = await obj.call("stats")  # still answers: it is not a misbehaving process
        sandbox = obj.sandbox
        final = await obj.stop()
        return refused.value, stats, final, sandbox

    refused, stats, final, sandbox = run(main)
    assert "refused get_state" in str(refused)
    assert stats["served"] == 0
    assert final is None  # no checkpoint to give, but the stop stopped it by itself
    assert sandbox.proc.returncode == 0 and not sandbox.killed


def test_a_lingering_stop_lets_go_at_once_and_the_process_ends_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A move's held instance once its target serves (``linger``): no longer hosted nor
    addressed here when the stop returns, its process (here one that must be killed)
    ended after, off the move's path; a new instance of it waits for that end."""
    monkeypatch.setattr(runtime, "STOP_TIMEOUT", 0.5)
    monkeypatch.setattr(runtime, "CALL_TIMEOUT", 0.5)

    async def main() -> None:
        obj = await object_on(tmp_path, SILENT_CHILD)
        role, removed = hosting_with(tmp_path, obj, monkeypatch)
        sandbox = obj.sandbox
        stopped = await role.cmd_object_stop("counter", deregister=False, linger=True)
        assert stopped["state"] is None and "counter" not in role.objects
        assert removed == [("10.16.0.100", False)]
        assert sandbox.proc.returncode is None  # still being stopped
        await role.torn_down("counter")
        assert sandbox.killed and sandbox.proc.returncode == -9
        assert role._teardowns == {}

    run(main)
