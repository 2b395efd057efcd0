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
from typing import Any, Callable, Iterable, TypeVar

from packets import ControlMessage, ControlType

from agent.core.config import AgentConfig
from agent.core.control import ControlServer
from agent.core.errors import AgentError, ControlError
from agent.core.peer import PeerServer
from agent.core.role import Command, InBand, Periodic, Role
from agent.core.runfiles import RunDirError

log = logging.getLogger(__name__)

#: How often every role's housekeeping (expiry of bindings, visitors, pending relays) runs.
HOUSEKEEPING_PERIOD = 0.25

#: Seconds between two tries to bind a control socket the run directory refused.
CONTROL_RETRY = 2.0
#: Seconds between two log lines of one failure that keeps happening.
REPEAT_EVERY = 60.0

R = TypeVar("R", bound=Role)


class _Done(Exception):
    """A periodic job that has nothing left to do ends its timer."""


class RepeatedFailures:
    """Logs a failure with its traceback the first time, then the same failure (where,
    type, text) at most every ``every`` seconds with how often it happened: a timer that
    fails every 0.25 s on a full run directory must not fill the log nor hide the reason.
    A :class:`RunDirError` is logged as its sentence, without a traceback."""

    def __init__(self, logger: logging.Logger, every: float = REPEAT_EVERY,
                 clock: Callable[[], float] = time.monotonic, limit: int = 256) -> None:
        self.logger, self.every, self.clock, self.limit = logger, every, clock, limit
        self._seen: dict[tuple[str, str, str], list[float]] = {}  # key -> [last logged, count since]

    def log(self, where: str, exc: BaseException, what: str) -> bool:
        key = (where, type(exc).__name__, str(exc)[:200])
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.every:
            seen[1] += 1
            return False
        if seen is None and len(self._seen) >= self.limit:
            self._seen.clear()
        repeats = seen[1] if seen is not None else 0
        self._seen[key] = [now, 0]
        more = f" ({repeats} more times in {self.every:.0f} s)" if repeats else ""
        if isinstance(exc, RunDirError):
            self.logger.error("%s: %s: %s%s", where, what, exc, more)
        else:
            self.logger.error("%s %s%s", where, what, more, exc_info=exc)
        return True


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
        self._failures = RepeatedFailures(log)
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
        control_up = await self._start_control()
        self.peers = PeerServer(self.on_peer_message, answer_type=self.answer_type)
        await self.peers.start()
        jobs = [Periodic("housekeeping", HOUSEKEEPING_PERIOD, self.housekeeping)]
        for role in self.roles:
            jobs.extend(role.periodic())
        if not control_up:
            jobs.append(Periodic("control socket", CONTROL_RETRY, self._retry_control))
        self._tasks = [asyncio.create_task(self._every(job, self._failures), name=job.name) for job in jobs]
        log.info("agent %s up: roles=%s (%s) interfaces=%s pid=%d", cfg.name, cfg.roles,
                 ", ".join(r.name for r in self.roles),
                 [f"{i.name}={i.address}" for i in cfg.interfaces], os.getpid())
        await self._stop.wait()
        await self.shutdown()

    async def _start_control(self) -> bool:
        """Bind the control socket; when the run directory refuses it (read-only, gone),
        say so and serve on without it (``_retry_control`` binds it once it can)."""
        assert self.control is not None
        try:
            await self.control.start()
        except OSError as exc:
            self._failures.log("control socket", RunDirError(self.config.socket_path, exc),
                               "the control socket cannot be made; serving without it, retrying "
                               f"every {CONTROL_RETRY:g} s")
            return False
        return True

    async def _retry_control(self) -> None:
        if await self._start_control():
            log.warning("control socket %s is up again", self.config.socket_path)
            raise _Done

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
            try:
                await self.control.stop()
            except OSError as exc:  # the socket file cannot be removed: a read-only run directory
                log.error("%s", RunDirError(self.config.socket_path, exc))
        if self.peers is not None:
            await self.peers.stop()

    def stop(self) -> None:
        self._stop.set()

    # --- timers --------------------------------------------------------------------------

    @staticmethod
    async def _every(job: Periodic, failures: RepeatedFailures | None = None) -> None:
        """Run ``job`` now and then every period; a failure is logged (a repeating one
        rate-limited: a full run directory fails every tick), the timer goes on."""
        failures = failures or RepeatedFailures(log)
        while True:
            try:
                result = job.job()
                if asyncio.iscoroutine(result):
                    await result
            except _Done:
                return
            except Exception as exc:  # noqa: BLE001
                failures.log(job.name, exc, "failed")
            await asyncio.sleep(job.interval())

    def housekeeping(self) -> None:
        for role in self.roles:
            try:
                role.housekeeping()
            except Exception as exc:  # noqa: BLE001 - the other roles' housekeeping still runs
                self._failures.log(f"housekeeping of {role.name}", exc, "failed")

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
