"""The agent daemon: one asyncio process per router that composes roles.

The daemon owns only what every role shares: the event loop and signals, the router's
interface table, the Unix control socket (JSON lines, :mod:`agent.core.control`), the TCP 4340
peer socket (:mod:`agent.core.peer`), the timers, and two dispatch tables built from the roles
(control command → role method; in-band message type → role handler with its authenticator).
What a router does is in its roles (:mod:`agent.core.role`), given to it by its caller
(``python -m agent`` passes :data:`agent.roles.ROLES`), so ``core`` imports no role. Every handler's failure is caught and logged or answered: a
malformed packet or a bug in one message must never stop the daemon. See
docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any, Iterable, TypeVar

from packets import ControlMessage, ControlType

from agent.core.config import AgentConfig
from agent.core.control import ControlServer
from agent.core.errors import AgentError, ControlError
from agent.core.peer import PeerServer
from agent.core.role import Command, InBand, Periodic, Role

log = logging.getLogger(__name__)

#: How often every role's housekeeping (expiry of bindings, visitors, pending relays) runs.
HOUSEKEEPING_PERIOD = 0.25

R = TypeVar("R", bound=Role)


class AgentDaemon:
    """Loop, sockets, timers and dispatch around a router's roles."""

    def __init__(self, config: AgentConfig, roles: Iterable[type[Role]]) -> None:
        self.config = config
        self.started_at = time.time()
        self.ifindex = {i.name: socket.if_nametoindex(i.name) for i in config.interfaces}
        self.iface_by_index = {v: k for k, v in self.ifindex.items()}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.control: ControlServer | None = None
        self.peers: PeerServer | None = None
        self.roles: list[Role] = [cls(self) for cls in roles if cls.wanted(config)]
        self.commands: dict[str, Command] = self._command_table()
        self.in_band: dict[ControlType, InBand] = self._in_band_table()

    # --- composition ---------------------------------------------------------------------

    def _command_table(self) -> dict[str, Command]:
        table: dict[str, Command] = {"ping": self.cmd_ping, "status": self.cmd_status,
                                     "log": self.cmd_log, "stop": self.cmd_stop}
        owner = {name: "daemon" for name in table}
        for role in self.roles:
            for name, command in role.commands().items():
                if name in table:
                    raise AgentError(f"command {name!r} of role {role.name} is already "
                                     f"served by {owner[name]}")
                table[name], owner[name] = command, role.name
        return table

    def _in_band_table(self) -> dict[ControlType, InBand]:
        table: dict[ControlType, InBand] = {}
        for role in self.roles:
            for ctype, entry in role.in_band().items():
                if ctype in table:
                    raise AgentError(f"in-band {ctype.name} is served by two roles")
                table[ctype] = entry
        return table

    def role(self, cls: type[R]) -> R | None:
        """This router's instance of role ``cls``, or None when it does not run it."""
        return next((r for r in self.roles if isinstance(r, cls)), None)

    def require(self, cls: type[R]) -> R:
        """Like :meth:`role`, for roles another role cannot work without."""
        role = self.role(cls)
        if role is None:
            raise ControlError(f"{self.config.name} has no {cls.name} role")
        return role

    # --- set-up and tear-down ------------------------------------------------------------

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        cfg = self.config
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        for role in self.roles:
            await role.start()
        self.control = ControlServer(cfg.socket_path, self.handle_command)
        await self.control.start()
        self.peers = PeerServer(self.on_peer_message, answer_type=self.answer_type)
        await self.peers.start()
        jobs = [Periodic("housekeeping", HOUSEKEEPING_PERIOD, self.housekeeping)]
        for role in self.roles:
            jobs.extend(role.periodic())
        self._tasks = [asyncio.create_task(self._every(job), name=job.name) for job in jobs]
        log.info("agent %s up: roles=%s (%s) interfaces=%s pid=%d", cfg.name, cfg.roles,
                 ", ".join(r.name for r in self.roles),
                 [f"{i.name}={i.address}" for i in cfg.interfaces], os.getpid())
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        log.info("agent %s stopping", self.config.name)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for role in reversed(self.roles):
            try:
                await role.stop()
            except Exception:  # noqa: BLE001 - stop the other roles all the same
                log.exception("stopping role %s failed", role.name)
        if self.control is not None:
            await self.control.stop()
        if self.peers is not None:
            await self.peers.stop()

    def stop(self) -> None:
        self._stop.set()

    # --- timers --------------------------------------------------------------------------

    @staticmethod
    async def _every(job: Periodic) -> None:
        """Run ``job`` now and then every period; a failure is logged, the timer goes on."""
        while True:
            try:
                result = job.job()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001
                log.exception("%s failed", job.name)
            await asyncio.sleep(job.interval())

    def housekeeping(self) -> None:
        for role in self.roles:
            try:
                role.housekeeping()
            except Exception:  # noqa: BLE001 - the other roles' housekeeping still runs
                log.exception("housekeeping of %s failed", role.name)

    # --- dispatch ------------------------------------------------------------------------

    async def handle_command(self, cmd: str, args: dict[str, Any]) -> Any:
        handler = self.commands.get(cmd)
        if handler is None:
            raise ControlError(f"unknown command {cmd!r}")
        result = handler(**args)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def answer_type(self, ctype: ControlType) -> ControlType:
        """The type of the answer to an in-band ``ctype`` (the role's choice, else ``ctype``)."""
        entry = self.in_band.get(ctype)
        return entry.answer if entry is not None and entry.answer is not None else ctype

    async def on_peer_message(self, msg: ControlMessage) -> dict:
        """An in-band message: authenticated for its type's role, then served by it."""
        entry = self.in_band.get(msg.type)
        if entry is None:
            raise ControlError(f"unexpected in-band message {msg.type.name}")
        body = entry.authenticate(msg)
        return await entry.handler(msg, body)

    # --- the daemon's own commands -------------------------------------------------------

    def cmd_ping(self) -> str:
        return "pong"

    def cmd_status(self) -> dict:
        status: dict[str, Any] = {
            "name": self.config.name, "roles": self.config.roles, "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "interfaces": [i.__dict__ for i in self.config.interfaces],
            "malformed": sum(role.malformed for role in self.roles),
        }
        for role in self.roles:
            status.update(role.status())
        return status

    def cmd_log(self, lines: int = 50) -> list[str]:
        try:
            text = self.config.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return text[-int(lines):]

    def cmd_stop(self) -> str:
        self._stop.set()
        return "stopping"
