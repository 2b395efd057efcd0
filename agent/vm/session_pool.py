"""One authenticated SFTP session per remote site, kept open for the router's fetches.

Opening an SSH session (TCP, key exchange, host key check, public-key authentication, the
SFTP subsystem) cost most of a provisioning's fetch, every time: issue 14 measured a cached
version no faster than a cold one. A :class:`SessionPool` keeps one session per site
(:class:`SiteKey`: address, port, account, client key, pinned host key) and lends it to one
fetch at a time.

* **Pinned, always.** Every session, the first and every re-opened one, is opened by
  :func:`agent.vm.fetch.open_session`, which compares the site's host key with the pinned
  one and refuses (:class:`~agent.vm.errors.HostKeyMismatch`) before authenticating; a
  re-open is never more trusting than the first open.
* **Re-opened on failure.** A kept session found dead before use (the site restarted, the
  TCP connection reset, or no answer to one small request within ``check_timeout``: a
  firewall dropping the site's packets) is replaced; one that fails *during* a use (its transport dropped,
  a request timed out) is closed and the use is tried once more on a fresh session. A fresh
  session that fails is the caller's :class:`~agent.vm.errors.SiteUnreachable`. An SFTP
  error on a live session (no such file) is the use's own and is not retried.
* **Bounded.** At most ``max_sessions`` sites are kept; opening one more closes the least
  recently used idle one. Sessions idle longer than ``max_idle_s`` are re-opened rather
  than trusted to be alive.
* **Off the loop.** Every paramiko call runs in the caller's worker thread (the fetch is a
  blocking function run with ``asyncio.to_thread``); the pool's locks are thread locks, so
  two fetches from one site take turns and no coroutine ever blocks the event loop.
* **Closed at agent stop** (:meth:`close`; the VM manager's ``close``): a closed pool opens
  nothing more.

Counters (:meth:`status`) say how many sessions were opened, re-opened and reused, so a test
or a benchmark can see that a second provisioning opened no new session.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import paramiko

from agent.vm.errors import FetchError, SiteUnreachable

__all__ = ["SessionPool", "SiteKey", "KeptSession", "DEFAULT_MAX_SESSIONS", "DEFAULT_MAX_IDLE_S"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_SESSIONS = 4
#: A session unused this long is re-opened before use rather than trusted: a NAT or a
#: firewall between router and site may have forgotten it without either end noticing.
DEFAULT_MAX_IDLE_S = 300.0
#: A kept session answers one small request within this before it is lent (else it is
#: dropped and re-opened): a site that went silent (a firewall dropping its packets, a
#: crash without a reset) costs this, not a whole ``io_timeout``, before the re-open.
DEFAULT_CHECK_TIMEOUT = 2.0
#: Errors of the session itself (not of one SFTP request): the session is dropped.
SESSION_ERRORS = (socket.timeout, EOFError, paramiko.SSHException, ConnectionError)


@dataclass(frozen=True)
class SiteKey:
    """What identifies one kept session: a different account, client key or pinned host key
    for the same address is another session (never a borrowed one)."""

    host: str
    port: int
    user: str
    client_key: str
    known_host_key: str


class KeptSession:
    """An open SSH transport and its SFTP client."""

    def __init__(self, transport: Any, sftp: Any, now: float) -> None:
        self.transport = transport
        self.sftp = sftp
        self.opened_at = now
        self.last_used = now
        self.uses = 0

    def alive(self) -> bool:
        """The transport still runs and the SFTP channel is open (what paramiko knows: a
        peer that died silently is found by the use that fails)."""
        try:
            if not self.transport.is_active():
                return False
            channel = self.sftp.get_channel()
            return channel is None or not channel.closed
        except Exception:  # noqa: BLE001 - a half-torn session is a dead one
            return False

    def close(self) -> None:
        for thing in (self.sftp, self.transport):
            try:
                thing.close()
            except Exception:  # noqa: BLE001 - closing what is already broken
                pass


#: Opens one pinned, authenticated session: (site, timeout, io_timeout) -> (transport, sftp).
Opener = Callable[[SiteKey, float, float], "tuple[Any, Any]"]


class SessionPool:
    """Kept SFTP sessions, one per site (see the module docstring)."""

    def __init__(self, opener: Opener, *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_idle_s: float = DEFAULT_MAX_IDLE_S,
                 check_timeout: float = DEFAULT_CHECK_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``opener``: how a session is opened, pinned (:func:`agent.vm.fetch.open_session`;
        a test may give another)."""
        if max_sessions < 1:
            raise ValueError("a session pool keeps at least one session")
        self.max_sessions = max_sessions
        self.max_idle_s = max_idle_s
        self.check_timeout = check_timeout
        self._opener = opener
        self._clock = clock
        self._sessions: OrderedDict[SiteKey, KeptSession] = OrderedDict()
        self._locks: dict[SiteKey, threading.Lock] = {}
        self._guard = threading.Lock()  # the two tables above
        self._closed = False
        #: Sessions opened (the first and every re-opened one), re-opened after a failure,
        #: uses of a kept session, sessions closed to keep the bound, dropped as dead.
        self.opened = 0
        self.reopened = 0
        self.reused = 0
        self.evicted = 0
        self.dropped = 0

    # --- use --------------------------------------------------------------------------

    def run(self, site: SiteKey, use: Callable[[Any], T], *, timeout: float,
            io_timeout: float) -> tuple[T, str]:
        """``use(sftp)`` on the site's kept session (opened if there is none); returns its
        result and how the session came: ``"kept"``, ``"new"`` or ``"reopened"``. Blocking:
        call it from a worker thread."""
        with self._lock_for(site):
            if self._closed:
                raise SiteUnreachable("the router's session pool is closed (the agent stops)")
            session, how = self._usable(site, timeout, io_timeout)
            try:
                result = use(session.sftp)
            except Exception as exc:
                if not self._session_failed(session, exc):
                    session.last_used = self._clock()
                    raise
                self._drop(site, session, f"failed during use: {exc!r}")
                if how != "kept":
                    raise SiteUnreachable(f"the SFTP session with {site.host}:{site.port} "
                                          f"failed: {exc!r}") from None
                # The kept session died under us: once more on a fresh one, pinned as ever.
                session = self._open(site, timeout, io_timeout)
                self.reopened += 1
                how = "reopened"
                try:
                    result = use(session.sftp)
                except Exception as again:
                    if self._session_failed(session, again):
                        self._drop(site, session, f"failed during use: {again!r}")
                        raise SiteUnreachable(f"the SFTP session with {site.host}:{site.port} "
                                              f"failed again: {again!r}") from None
                    raise
            session.last_used = self._clock()
            session.uses += 1
            return result, how

    def _usable(self, site: SiteKey, timeout: float, io_timeout: float) -> tuple[KeptSession, str]:
        with self._guard:
            session = self._sessions.get(site)
        if session is not None:
            idle = self._clock() - session.last_used
            why = (f"idle {idle:.0f} s" if idle > self.max_idle_s
                   else "dead before use" if not session.alive()
                   else self._check(session, io_timeout))
            if why is None:
                with self._guard:
                    self._sessions.move_to_end(site)
                self.reused += 1
                return session, "kept"
            self._drop(site, session, why)
            fresh = self._open(site, timeout, io_timeout)
            self.reopened += 1
            return fresh, "reopened"
        return self._open(site, timeout, io_timeout), "new"

    def _check(self, session: KeptSession, io_timeout: float) -> str | None:
        """One small request with a short timeout (one round trip on a live session); why
        the session is not fit to lend, or None."""
        try:
            channel = session.sftp.get_channel()
            channel.settimeout(min(self.check_timeout, io_timeout))
            try:
                session.sftp.normalize(".")
            finally:
                channel.settimeout(io_timeout)
        except Exception as exc:  # noqa: BLE001 - whatever it is, the session is not lent
            return f"no answer to a check within {self.check_timeout:g} s: {exc!r}"
        return None

    @staticmethod
    def _session_failed(session: KeptSession, exc: BaseException) -> bool:
        """Whether ``exc`` broke the session (not only one request on it)."""
        if isinstance(exc, SiteUnreachable):
            return True
        if isinstance(exc, SESSION_ERRORS):
            return True
        return not session.alive()

    # --- opening, bounding, closing ---------------------------------------------------

    def _open(self, site: SiteKey, timeout: float, io_timeout: float) -> KeptSession:
        transport, sftp = self._opener(site, timeout, io_timeout)  # pinned host key checked there
        session = KeptSession(transport, sftp, self._clock())
        self.opened += 1
        evict: list[KeptSession] = []
        with self._guard:
            if self._closed:
                evict.append(session)
            else:
                self._sessions[site] = session
                self._sessions.move_to_end(site)
                for other in list(self._sessions):
                    if len(self._sessions) <= self.max_sessions:
                        break
                    lock = self._locks.get(other)
                    if other == site or (lock is not None and lock.locked()):
                        continue  # in use: closed when the bound is next enforced
                    evict.append(self._sessions.pop(other))
                    self.evicted += 1
        for old in evict:
            old.close()
        if self._closed:
            raise SiteUnreachable("the router's session pool is closed (the agent stops)")
        log.info("SFTP session to %s@%s:%d opened (%d kept)", site.user, site.host, site.port,
                 len(self._sessions))
        return session

    def _drop(self, site: SiteKey, session: KeptSession, why: str) -> None:
        with self._guard:
            if self._sessions.get(site) is session:
                del self._sessions[site]
        self.dropped += 1
        log.info("SFTP session to %s@%s:%d dropped: %s", site.user, site.host, site.port, why)
        session.close()

    def _lock_for(self, site: SiteKey) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(site, threading.Lock())

    def close(self) -> None:
        """Close every kept session; the pool opens none after this (blocking: the
        transports' threads are joined; call it with ``asyncio.to_thread``)."""
        with self._guard:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> dict[str, Any]:
        with self._guard:
            kept = [f"{k.user}@{k.host}:{k.port}" for k in self._sessions]
        return {"kept": kept, "opened": self.opened, "reopened": self.reopened,
                "reused": self.reused, "evicted": self.evicted, "dropped": self.dropped,
                "max_sessions": self.max_sessions, "closed": self._closed}


def site_key(host: str, port: int, user: str, client_key: Any, known_host_key: Any) -> SiteKey:
    """The :class:`SiteKey` of a site's access details (paths or key lines, as strings)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise FetchError(f"not a port: {port!r}")
    return SiteKey(str(host), port, str(user), str(client_key), str(known_host_key))
