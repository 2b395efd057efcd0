"""Ready before the first object: the hosting role starts its router's object fork server and
fills its prepared sandbox slots in the background when it starts (issue 14, item 2).

Without it the first object a router starts (the first move to it, usually) pays for the fork
server's own start (one interpreter and the runtime's imports: 110-190 ms here) and finds no
prepared slot. With it that happens on a thread while the agent starts and serves; nothing
waits for it, and a start that comes first simply does what it did before (starts the server
itself, prepares its own slot). It begins :data:`DELAY` after the role's start.

Each fork server costs memory (about 24 MiB resident, most of it shared with nothing: see the
README's figure of its PSS), and a run's routers start theirs at once, so it is on by default
only for runs of up to :data:`MAX_ROUTERS` routers (the agent knows them: its configuration's
``peers``); ``MOAT_FORKSERVER_PRESTART=1`` or ``0`` decides for any run. With the fork path
off (``MOAT_SANDBOX_START=exec``) only the slots are filled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

ENV_PRESTART = "MOAT_FORKSERVER_PRESTART"
#: Up to this many routers in the run, every hosting router prestarts (when not told).
MAX_ROUTERS = 20
#: Seconds after the role's start before it begins: the agent's own start (its roles, its
#: first advertisements) does not share the two cores with a run's worth of fork servers.
DELAY = 1.0


class PrestartError(AgentError):
    """A bad ``MOAT_FORKSERVER_PRESTART``."""


def wanted(routers: int | None, text: str | None = None) -> bool:
    """Whether to prestart: ``MOAT_FORKSERVER_PRESTART`` (``text`` overrides it) "1" or
    "0"; unset, by the run's number of ``routers`` (None or 0: not known, then yes)."""
    text = os.environ.get(ENV_PRESTART) if text is None else text
    if text is not None and text.strip() != "":
        if text.strip() not in ("0", "1"):
            raise PrestartError(f"{ENV_PRESTART} must be 0 or 1, not {text!r}")
        return text.strip() == "1"
    return not routers or routers <= MAX_ROUTERS


def _start_server() -> None:
    from agent.hosting.forkserver import default_server
    from agent.hosting.sandbox import launcher_env

    default_server(launcher_env()).ensure_started()


def _pool(objects_dir: Path, manager: Any) -> Any:
    from agent.hosting import sandbox_pool

    return sandbox_pool.pool_for(objects_dir, manager)


class Prestart:
    """One background start: the fork server (when objects start forked), then the pool
    of ``objects_dir`` filled. :meth:`cancel` (the role's stop) makes sure no pool is made
    after it, so the role's ``sandbox_pool.close_all()`` that follows finds every one."""

    def __init__(self, objects_dir: Path, manager: Any, *, forking: bool | None = None,
                 start_server: Callable[[], None] = _start_server,
                 pool_for: Callable[[Path, Any], Any] = _pool, delay: float = DELAY) -> None:
        self.objects_dir = Path(objects_dir)
        self.manager = manager
        self.delay = delay
        self._stop = threading.Event()
        if forking is None:
            from agent.hosting.sandbox import start_mode

            forking = start_mode() == "fork"
        self.forking = forking
        self._start_server = start_server
        self._pool_for = pool_for
        self._lock = threading.Lock()
        self._cancelled = False
        self.done = threading.Event()
        self.error: str | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True, name="hosting prestart")
        self.thread.start()

    def _run(self) -> None:
        try:
            if self._stop.wait(self.delay):
                return
            if self.forking and not self._cancelled:
                self._start_server()
            with self._lock:
                if self._cancelled:
                    return
                if not self.objects_dir.is_dir():  # as the first object's start makes it
                    self.objects_dir.mkdir(parents=True, exist_ok=True)
                    os.chmod(self.objects_dir, 0o755)
                pool = self._pool_for(self.objects_dir, self.manager)
            if pool is not None:
                pool.fill()
        except (AgentError, OSError) as exc:
            self.error = str(exc)
            log.warning("hosting prestart: %s (objects start as without it)", exc)
        finally:
            self.done.set()

    def cancel(self, timeout: float = 10.0) -> None:
        """No pool is made from now on; waits (up to ``timeout``) for a start under way."""
        self._stop.set()
        with self._lock:
            self._cancelled = True
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)


def begin(config: Any, manager: Any, delay: float = DELAY) -> Prestart | None:
    """The hosting role's start: a :class:`Prestart` under way, or None when not
    :func:`wanted` for this run (``config.peers``: every router of the run), or when
    ``config`` is not an agent's configuration (a test's stand-in describes no run)."""
    from agent.core.config import AgentConfig

    if not isinstance(config, AgentConfig):
        return None
    routers = len(config.peers)
    try:
        if not wanted(routers or None):
            return None
    except PrestartError as exc:
        log.warning("%s: not prestarting", exc)
        return None
    prestart = Prestart(Path(config.run_dir) / "objects", manager, delay=delay)
    prestart.start()
    return prestart


async def end(prestart: Prestart | None) -> None:
    """The hosting role's stop, before it closes the pools: :meth:`Prestart.cancel` on a
    thread (a start under way may take a fork server's start to finish)."""
    if prestart is not None:
        await asyncio.to_thread(prestart.cancel)
