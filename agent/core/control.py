"""The control socket: the agent's commands over a Unix socket in the run directory.

Out of band by design (like a router's console port): `moat show ...`, the experiments and
the tests use it, while protocol traffic always crosses the emulated network. The wire format
is :mod:`agent.core.rpc`'s JSON lines (``{"id", "cmd", "args"}`` → ``{"id", "ok", ...}``);
this module only places it: a server socket private to root, and a blocking client that
reports every failure as :class:`ControlError`, the one error its callers catch.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from agent.core import rpc
from agent.core.errors import ConfigError, ControlError

log = logging.getLogger(__name__)

Handler = rpc.Handler


class ControlServer:
    """Serves control requests with ``handler(cmd, args)``; requests are limited to
    ``request_limit`` bytes (commands are small; answers may carry a checkpoint)."""

    def __init__(self, path: Path, handler: Handler, *,
                 request_limit: int = rpc.CONTROL_REQUEST_LIMIT) -> None:
        self.path = Path(path)
        self.handler = handler
        self._rpc = rpc.RpcServer(handler, request_limit=request_limit,
                                  answer_limit=rpc.CHECKPOINT_LINE_LIMIT)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # left over from a killed daemon
            self.path.unlink()
        self._server = await self._rpc.serve_unix(self.path)
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class ControlClient:
    """Blocking client for one agent's control socket (CLI, experiments, tests)."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.path = str(path)
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one command and return its result; raise ControlError on a refusal, a
        time-out (``timeout`` bounds the whole call), or an agent that cannot be reached or
        answers something else."""
        try:
            return rpc.call_unix(self.path, cmd, args, timeout=self.timeout)
        except rpc.RpcRemoteError as exc:
            raise ControlError(exc.error) from exc
        except rpc.RpcUnreachable as exc:
            raise ControlError(f"cannot reach agent at {self.path}: {exc}") from exc
        except rpc.RpcProtocolError as exc:
            raise ControlError(f"agent at {self.path} sent a bad answer: {exc}") from exc
        except rpc.RpcError as exc:
            raise ControlError(f"agent at {self.path}: {exc}") from exc


__all__ = ["ControlClient", "ControlServer", "ConfigError"]
