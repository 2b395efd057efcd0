"""The control socket: JSON lines over a Unix socket in the run directory.

Out of band by design (like a router's console port): `moat show ...`, the experiments and
the tests use it, while protocol traffic always crosses the emulated network. One request per
line ``{"cmd": NAME, "args": {...}}``, one answer per line ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

from agent.core.errors import AgentError, ConfigError, ControlError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlServer:
    """Serves control requests with ``handler(cmd, args)``."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, str(self.path), limit=MAX_LINE)
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._answer(writer, {"ok": False, "error": "request line too long"})
                    return
                if not line:
                    return
                await self._answer(writer, await self._dispatch(line))
        except (ConnectionError, BrokenPipeError):
            return
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            cmd = req["cmd"]
            args = req.get("args") or {}
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise ValueError("cmd must be a string and args an object")
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        try:
            return {"ok": True, "result": await self.handler(cmd, args)}
        except (AgentError, TypeError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - report, never die
            log.exception("control command %s failed", cmd)
            return {"ok": False, "error": f"internal error: {exc!r}"}

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        writer.write(json.dumps(answer, default=str).encode() + b"\n")
        await writer.drain()


class ControlClient:
    """Blocking client for one agent's control socket (CLI, experiments, tests)."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one command and return its result; raise ControlError on a refusal."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as exc:
                raise ControlError(f"cannot reach agent at {self.path}: {exc}") from None
            s.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        try:
            answer = json.loads(buf)
        except ValueError:
            raise ControlError(f"agent at {self.path} sent a bad answer") from None
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "unknown error"))
        return answer.get("result")


__all__ = ["ControlClient", "ControlServer", "ConfigError"]
