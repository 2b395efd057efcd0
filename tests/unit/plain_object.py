"""An ObjectProcess talking to a plain child process over its socketpair: no cgroup, no
sandbox, same user. Tests of the object channel (tests/unit/test_rpc.py) and of objects that
misbehave on it (test_runtime_misbehaving.py) script the child's side in a few lines."""

from __future__ import annotations

import asyncio
import socket
import sys
import textwrap
from pathlib import Path
from typing import Any

from agent.hosting.cgroups import Limits
from agent.hosting.runtime import ObjectProcess


class PlainSandbox:
    """What ObjectProcess uses of ObjectSandbox, for a plain child (no cgroup, same user)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self, timeout: float | None = None) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def exit_info(self) -> dict[str, Any] | None:
        rc = self.proc.returncode
        return None if rc is None else {"returncode": rc, "reason": "exited" if rc >= 0 else "killed"}

    def usage(self) -> dict[str, Any]:
        return {"cpu_seconds": None, "memory_bytes": None, "memory_peak_bytes": None, "pids": None}

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.killed = True
            self.proc.kill()
        await self.proc.wait()


async def object_on(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None) -> ObjectProcess:
    """An ObjectProcess talking to ``argv`` (``{fd}`` replaced by the child's socketpair end)."""
    obj = ObjectProcess("counter", "agent.objects.counter:Counter", "127.0.0.1", 0, "r1",
                        objects_dir=tmp_path, cgroups=None, limits=Limits())
    parent, child = socket.socketpair()
    fd = child.fileno()
    proc = await asyncio.create_subprocess_exec(*[a.replace("{fd}", str(fd)) for a in argv],
                                                pass_fds=(fd,), env=env)
    child.close()
    obj.sandbox = PlainSandbox(proc)
    await obj._open_channel(parent)
    return obj


def fake_child(body: str, ignore_term: bool = False) -> list[str]:
    """argv of a child running ``body`` with ``f``, its end of the channel, as a binary file
    (``ignore_term``: it ignores SIGTERM, so only a kill ends it)."""
    prelude = ("import json, signal, socket, sys\n"
               + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
               + "f = socket.socket(fileno=int(sys.argv[1])).makefile('rwb')\n")
    return [sys.executable, "-c", prelude + textwrap.dedent(body), "{fd}"]
