"""The router's side of an object process: start it, talk to it over a socketpair, stop it.

This is the minimal runtime the data plane needs; the full virtual machine of the patent
(provisioning, signed code from the remote site, cgroups, unprivileged users) grows from it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .errors import AgentError

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0


class ObjectProcessError(AgentError):
    """An object process that failed to start, answer or stop."""


class ObjectProcess:
    """One running object (``python -m agent.runner``), child of the agent daemon."""

    def __init__(self, name: str, spec: str, address: str, port: int, router: str,
                 workdir: Path) -> None:
        self.name, self.spec, self.address, self.port, self.router = name, spec, address, port, router
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, warm: bool = False, state: Any = None) -> None:
        parent, child = socket.socketpair()
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "agent.runner", "--spec", self.spec, "--name", self.name,
                "--address", self.address, "--port", str(self.port), "--router", self.router,
                "--control-fd", str(child.fileno())]
        if warm:
            argv.append("--warm")
        if state is not None:
            argv += ["--state", json.dumps(state)]
        log_file = open(self.workdir / "object.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                pass_fds=(child.fileno(),), cwd=str(self.workdir), close_fds=True,
                env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
            )
        except OSError as exc:
            raise ObjectProcessError(f"cannot start object {self.name}: {exc}") from exc
        finally:
            child.close()
            log_file.close()
        self._reader, self._writer = await asyncio.open_connection(sock=parent)
        await self.call("stats")  # answers once it serves: the start is complete
        log.info("object %s started (pid %d, warm=%s)", self.name, self.proc.pid, warm)

    async def call(self, cmd: str, **args: Any) -> Any:
        if self._writer is None or self._reader is None:
            raise ObjectProcessError(f"object {self.name} is not running")
        async with self._lock:
            try:
                self._writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
                await self._writer.drain()
                line = await asyncio.wait_for(self._reader.readline(), CALL_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                raise ObjectProcessError(f"object {self.name} did not answer {cmd}: {exc!r}") from None
        if not line:
            raise ObjectProcessError(f"object {self.name} exited (while asked {cmd})")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise ObjectProcessError(f"object {self.name} refused {cmd}: {answer.get('error')}")
        return answer["result"]

    async def stop(self) -> Any:
        """Stop the object and return its final state (None if it could not give one)."""
        state = None
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            try:
                state = await self.call("stop")
            except ObjectProcessError as exc:
                log.warning("%s", exc)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._writer is not None:
            self._writer.close()
        self._writer = self._reader = None
        return state
