"""The in-band peer transport: MOAT control messages between routers and sites on TCP 4340.

Routers move objects (MIGRATE, STATE_TRANSFER) and the remote site configures VMs
(PROVISION) over the emulated network, in MOAT's control framing, so captures show the whole
exchange. This module is only the transport: one request and one answer per exchange, the
answer carrying the request's type and transaction id. What a message means belongs to the
role that serves it (:class:`agent.core.role.InBand`); failures of the exchange itself are
:class:`PeerError`, which each role turns into its own error.

Connections are kept open and reused (issue 14: a new TCP connection per message was a fixed
cost of every move's commit). A caller's event loop keeps a :class:`PeerPool`: at most
:data:`POOL_PER_PEER` idle connections per peer, closed after :data:`POOL_IDLE` seconds,
each used by one exchange at a time. Nothing about a message changes: each is sealed and
authenticated for its receiver, and replay-checked there, on its own. A message is sent
again, re-signed, on a new connection only when the first provably did not reach the
peer's handler: a kept connection found closed before the message was written, or a
*goodbye* read instead of the answer (the server closes a connection that waits for a
message, idle or at its connection bounds, with a goodbye, and never reads a message from it
after that). On a connection that breaks after the message went, a caller that says the
message is ``idempotent`` gets one more try on a new connection; any other gets
:class:`PeerError`, as before (the peer may have acted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Collection, Mapping

from packets import ControlMessage, ControlType, MalformedMessage
from packets.codes import CONTROL_PORT
from packets.control import HEADER, frame_length

from agent.core.errors import AgentError, ControlError
from agent.core.msgauth import MessageAuthError, ReplayCache, sign_hmac, strip, verify_hmac
from agent.core.sealing import SealError, open_body, seal_body, secret_fields, warm

log = logging.getLogger(__name__)

PEER_TIMEOUT = 15.0
#: Connections TCP 4340 serves at once: more are closed at once (work before authentication
#: is bounded, issue 12), unless one waits idle between messages: it is closed instead, with
#: a goodbye. Growing a service opens one per router; a run has far fewer.
MAX_CONNECTIONS = 64
#: Connections from one address TCP 4340 serves at once (the same rule beyond it).
MAX_PER_PEER = 16
#: A connection must deliver a whole message within this, or it is closed: its first from
#: when it opened, a later one from its first byte.
READ_DEADLINE = 10.0
#: The server closes a connection that waited this long for its next message (with a
#: goodbye): three times the client's :data:`POOL_IDLE`, so it does not close one a client
#: is about to use.
IDLE_TIMEOUT = 30.0
#: Seconds a connection closed with a goodbye is drained (nothing of it is read as a
#: message) before its socket closes: closing with unread input would reset the connection
#: and could lose the goodbye on its way.
GOODBYE_LINGER = 1.0
#: Idle connections a client keeps per peer, and in all (least recently used go first).
POOL_PER_PEER = 2
POOL_TOTAL = 32
#: A client closes a connection that stayed idle this long.
POOL_IDLE = 10.0
#: Connections a client has open to one peer at once (exchanges beyond wait for one).
POOL_MAX_OPEN = 8
#: ``MOAT_PEER_REUSE=0`` in an agent's environment selects the old path for every call that
#: does not choose: a new connection per message (a baseline for the experiments).
REUSE_ENV = "MOAT_PEER_REUSE"


class PeerError(AgentError):
    """An exchange with a peer that did not give an accepted answer (unreachable, no valid
    answer, or refused with ``ok: false``)."""


class PeerNotSent(PeerError):
    """Nothing reached the peer: a secret could not be sealed, or no connection was made.
    Unlike a lost answer, this says for certain that the peer did not act on the message."""


class PeerRefused(PeerError):
    """The peer answered ``ok: false``; :attr:`reason` is its error text."""

    def __init__(self, address: str, reason: str, answer: dict[str, Any] | None = None) -> None:
        self.address = address
        self.reason = reason
        #: The whole answer (a broker's carries a ``reason`` code and ``detail``).
        self.answer = answer or {}
        super().__init__(f"{address} refused: {reason}")


async def read_message(reader: asyncio.StreamReader) -> ControlMessage:
    """One framed control message (header first: it gives the length)."""
    head = await reader.readexactly(HEADER.size)
    rest = await reader.readexactly(frame_length(head) - HEADER.size)
    return ControlMessage.decode(head + rest)


def goodbye(reason: str) -> ControlMessage:
    """What a server writes on a connection it closes while it waits for a message: the
    client learns that whatever it sent there was not read (:data:`ControlType.ERROR`,
    txid 0, ``goodbye``)."""
    return ControlMessage(ControlType.ERROR, 0, {
        "ok": False, "goodbye": reason,
        "error": f"connection closed ({reason}) before a message was read: send it again"})


def is_goodbye(msg: ControlMessage) -> bool:
    return msg.type == ControlType.ERROR and msg.txid == 0 and isinstance(msg.body.get("goodbye"), str)


class _Goodbye(Exception):
    """The server closed the connection without reading the message (it said so)."""


class _Connection:
    """One TCP connection to a peer, used by one exchange at a time."""

    def __init__(self, peer: tuple[str, int], reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.exchanges = 0

    def usable(self) -> bool:
        """Whether a kept connection may carry a message: not closed, and nothing arrived
        while it was idle (an end of stream, a goodbye or stray bytes: it is dropped before
        anything is written to it, so nothing was sent on it)."""
        if self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None:
            return False
        if len(getattr(self.reader, "_buffer", b"")):  # read by the loop, not by an exchange
            return False
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()  # the kernel's view: a FIN or bytes the loop has not read yet
        poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)

    async def exchange(self, frame: bytes, timeout: float) -> ControlMessage:
        """Write one request, read its answer (:class:`_Goodbye` when the server said it
        did not read the request)."""
        self.exchanges += 1
        self.writer.write(frame)
        async with asyncio.timeout(timeout):
            await self.writer.drain()
            answer = await read_message(self.reader)
        if is_goodbye(answer):
            raise _Goodbye(str(answer.body["goodbye"]))
        return answer

    def close(self) -> None:
        self.writer.close()


async def _connect(address: str, port: int, timeout: float) -> _Connection:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerNotSent(f"target {address} unreachable: {exc!r}") from None
    return _Connection((address, port), reader, writer)


class PeerPool:
    """The connections one event loop keeps to its peers (see the module's docstring):
    at most ``per_peer`` idle per peer and ``total`` in all, each closed after ``idle``
    seconds unused, and at most ``max_open`` per peer lent at once (more exchanges wait for
    one, within their time-out: a server serves :data:`MAX_PER_PEER` per address). A
    connection is lent to one exchange at a time and given back with :meth:`release`."""

    def __init__(self, per_peer: int = POOL_PER_PEER, total: int = POOL_TOTAL,
                 idle: float = POOL_IDLE, max_open: int = POOL_MAX_OPEN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_peer < 0 or total < 0 or idle <= 0 or max_open < 1:
            raise ValueError("a peer pool keeps a non-negative number of connections for a "
                             "positive time, and lends at least one")
        self.per_peer, self.total, self.idle, self.clock = per_peer, total, idle, clock
        self.max_open = max_open
        #: Idle connections per peer, most recently used last.
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        #: Per peer: how many connections are lent, and who waits for one.
        self._lent: dict[tuple[str, int], int] = {}
        self._slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._reaper: asyncio.Task | None = None
        #: Connections opened, and kept ones lent again (for benchmarks and tests).
        self.opened = 0
        self.reused = 0

    def idle_count(self, peer: tuple[str, int] | None = None) -> int:
        if peer is not None:
            return len(self._idle.get(peer, ()))
        return sum(len(conns) for conns in self._idle.values())

    def lent(self, peer: tuple[str, int]) -> int:
        return self._lent.get(peer, 0)

    async def acquire(self, address: str, port: int, timeout: float,
                      fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection to (address, port) lent to the caller, and whether it was kept from
        an earlier exchange (``fresh``: a new one); :class:`PeerNotSent` when none can be
        had within ``timeout``. The caller gives it back with :meth:`release`."""
        peer = (address, port)
        slots = self._slots.setdefault(peer, asyncio.Semaphore(self.max_open))
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise PeerNotSent(f"target {address}: {self.max_open} exchanges with it already "
                              f"under way for {timeout:.1f}s") from None
        self._lent[peer] = self._lent.get(peer, 0) + 1
        try:
            kept = self._idle.get(peer, [])
            while kept and not fresh:
                conn = kept.pop()
                if conn.usable() and self.clock() - conn.idle_since < self.idle:
                    self.reused += 1
                    return conn, True
                conn.close()  # found closed before anything was written to it
            conn = await _connect(address, port, timeout)
            self.opened += 1
            return conn, False
        except BaseException:
            self._give_slot(peer)
            raise
        finally:
            if not self._idle.get(peer):
                self._idle.pop(peer, None)

    def _give_slot(self, peer: tuple[str, int]) -> None:
        self._lent[peer] -= 1
        self._slots[peer].release()
        if not self._lent[peer]:
            del self._lent[peer]
            if peer not in self._idle:
                del self._slots[peer]

    def release(self, conn: _Connection, keep: bool = True) -> None:
        """Give a lent connection back: kept for the next exchange when ``keep`` (its
        exchange ended cleanly), it is usable and there is room; else closed."""
        self._give_slot(conn.peer)
        if not keep or self.per_peer == 0 or self.total == 0 or not conn.usable():
            conn.close()
            return
        conn.idle_since = self.clock()
        kept = self._idle.setdefault(conn.peer, [])
        kept.append(conn)
        while len(kept) > self.per_peer:
            kept.pop(0).close()
        while self.idle_count() > self.total:
            oldest = min((c for cs in self._idle.values() for c in cs), key=lambda c: c.idle_since)
            self._idle[oldest.peer].remove(oldest)
            oldest.close()
        self._idle = {p: cs for p, cs in self._idle.items() if cs}
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def expire(self) -> int:
        """Close the connections idle for ``idle`` seconds or found closed; how many."""
        now, closed = self.clock(), 0
        for peer in list(self._idle):
            keep = []
            for conn in self._idle[peer]:
                if now - conn.idle_since < self.idle and conn.usable():
                    keep.append(conn)
                else:
                    conn.close()
                    closed += 1
            if keep:
                self._idle[peer] = keep
            else:
                del self._idle[peer]
                if peer not in self._lent:
                    self._slots.pop(peer, None)
        return closed

    async def _reap(self) -> None:
        """Closes idle connections as they expire; cancelled (its loop ends), closes all."""
        try:
            while True:
                times = [c.idle_since for cs in self._idle.values() for c in cs]
                if not times:
                    return
                await asyncio.sleep(max(0.0, min(times) + self.idle - self.clock()) + 0.01)
                self.expire()
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._reaper = None  # no reference left to a loop that ended

    def close(self) -> None:
        """Close every idle connection (those lent out close when given back, if closed
        meanwhile they are not kept)."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._slots = {peer: slots for peer, slots in self._slots.items() if peer in self._lent}


_POOLS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PeerPool]" = weakref.WeakKeyDictionary()


def loop_pool() -> PeerPool:
    """The running event loop's pool (made on first use)."""
    loop = asyncio.get_running_loop()
    pool = _POOLS.get(loop)
    if pool is None:
        pool = _POOLS[loop] = PeerPool()
    return pool


def _prepare(address: str, ctype: ControlType, body: dict[str, Any], txid: int,
             key: bytes | None, seal_keys: Mapping[str, bytes] | None) -> bytes:
    """The request's frame: sealed and signed afresh (each try has its own nonce)."""
    if key is not None:
        try:
            body = seal_body(body, (seal_keys or {}).get(address), ctype=ctype, txid=txid,
                             to=address)
        except SealError as exc:
            raise PeerNotSent(f"{ctype.name} to {address} not sent: {exc}") from None
        body = sign_hmac(ctype, txid, body, key, to=address)
    elif secret_fields(ctype, body):
        raise PeerNotSent(f"{ctype.name} to {address} not sent: its "
                          f"{', '.join(secret_fields(ctype, body))} would cross the wire in clear "
                          "(no router key to seal and sign it with)")
    return ControlMessage(ctype, txid, body).encode()


async def peer_call(address: str, ctype: ControlType, body: dict[str, Any],
                    timeout: float = PEER_TIMEOUT, txid: int = 0,
                    key: bytes | None = None, port: int = CONTROL_PORT,
                    seal_keys: Mapping[str, bytes] | None = None, *,
                    idempotent: bool = False, reuse: bool | None = None,
                    pool: PeerPool | None = None) -> dict[str, Any]:
    """One request/answer with the agent at ``address``; with ``key`` (the run's router key)
    the body's secret fields are sealed for that router (its public key in ``seal_keys``, by
    address) and the body carries an HMAC authenticator for receiver ``address``
    (:mod:`agent.core.msgauth`). Without ``key`` the body goes as it is (already signed),
    unless it carries a secret in clear. Returns the answer's body when it says ``ok``;
    raises :class:`PeerError` otherwise, and :class:`PeerNotSent` when the peer provably did
    not act on it: before sending anything when a secret could not be sealed (no secret
    crosses the wire in clear, issue 12), or when no connection took it.

    The exchange goes on a kept connection of ``pool`` (default: the running loop's), or on
    a new one closed after it when ``reuse`` is false (the old path, for benchmarks; by
    default as :data:`REUSE_ENV` says, else kept).
    ``idempotent``: the peer answers a repeat of this message as it answered the first (a
    MIGRATE commit or cancel of one epoch), so it is sent once more, re-signed, when a kept
    connection broke after it went."""
    frame = _prepare(address, ctype, body, txid, key, seal_keys)
    if reuse is None:
        reuse = os.environ.get(REUSE_ENV, "1").strip() != "0"
    the_pool = (pool if pool is not None else loop_pool()) if reuse else None
    fresh = the_pool is None

    def done(conn: _Connection, keep: bool) -> None:
        if the_pool is None:
            conn.close()
        else:
            the_pool.release(conn, keep)

    for attempt in (1, 2):
        if the_pool is None:
            conn, reused = await _connect(address, port, timeout), False
        else:
            conn, reused = await the_pool.acquire(address, port, timeout, fresh=fresh)
        try:
            answer = await conn.exchange(frame, timeout)
        except _Goodbye as exc:
            done(conn, keep=False)
            if attempt == 1:
                log.debug("%s to %s: the peer closed the connection without reading it (%s): "
                          "sent again on a new one", ctype.name, address, exc)
                frame, fresh = _prepare(address, ctype, body, txid, key, seal_keys), True
                continue
            raise PeerNotSent(f"{ctype.name} to {address} not sent: the peer closed two "
                              f"connections without reading it ({exc})") from None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, MalformedMessage) as exc:
            done(conn, keep=False)
            broke = not isinstance(exc, (asyncio.TimeoutError, MalformedMessage))
            if attempt == 1 and reused and idempotent and broke:
                log.debug("%s to %s: a kept connection broke (%r): idempotent, sent again on a "
                          "new one", ctype.name, address, exc)
                frame, fresh = _prepare(address, ctype, body, txid, key, seal_keys), True
                continue
            raise PeerError(f"no valid answer from {address}: {exc!r}") from None
        except BaseException:
            done(conn, keep=False)
            raise
        if answer.txid != txid:
            done(conn, keep=False)  # out of step: never lent again
            raise PeerError(f"no valid answer from {address}: an answer to transaction "
                            f"{answer.txid}, not {txid}")
        done(conn, keep=True)
        break
    if answer.body.get("ok") is not True:
        raise PeerRefused(address, str(answer.body.get("error", "?")), answer.body)
    return answer.body


def open_secrets(msg: ControlMessage, body: dict[str, Any], private: bytes | None) -> dict[str, Any]:
    """``body`` (authenticated, without its authenticator) with its sealed secrets opened
    with this router's X25519 key ``private``; a :class:`SealError` refuses the message."""
    return open_body(body, private, ctype=msg.type, txid=msg.txid, to=str(msg.body["auth"]["to"]))


class RouterKeyAuth:
    """Authenticates messages one router sends another: HMAC under the run's router key, for
    one of this router's addresses (``receivers``), with a replay cache; then opens their
    sealed secrets with this router's X25519 key ``seal_key``. Without a key or an address
    (a hand-made configuration) every such message is refused, and without ``seal_key``
    every one with secrets: authentication fails closed (issue 12)."""

    def __init__(self, key: bytes | None, receivers: Collection[str] = (),
                 seal_key: bytes | None = None, cache: ReplayCache | None = None) -> None:
        self.key = key
        self.receivers = frozenset(receivers)
        self.seal_key = seal_key
        self.cache = cache if cache is not None else ReplayCache()

    @classmethod
    def of(cls, config: Any) -> "RouterKeyAuth":
        """The check of the router configured by ``config`` (an AgentConfig)."""
        key = bytes.fromhex(config.router_key) if config.router_key else None
        seal_key = config.seal_private()
        if seal_key is not None:
            try:
                warm(seal_key)
            except SealError as exc:  # the first sealed message will say it again
                log.warning("this router's sealing key is not usable: %s", exc)
        return cls(key, config.addresses, seal_key)

    def __call__(self, msg: ControlMessage) -> dict[str, Any]:
        if not self.key:
            log.warning("in-band %s refused: this router has no router key", msg.type.name)
            raise ControlError(f"{msg.type.name} refused: this router has no router key to "
                               "check it with")
        try:
            verify_hmac(msg.type, msg.txid, msg.body, self.key, self.cache, to=self.receivers)
            return open_secrets(msg, strip(msg.body), self.seal_key)
        except (MessageAuthError, SealError) as exc:
            log.warning("in-band %s refused: %s", msg.type.name, exc)
            raise ControlError(f"{msg.type.name} refused: {exc}") from None


Handler = Callable[[ControlMessage], Awaitable[dict[str, Any]]]


def refusal(exc: Exception) -> dict[str, Any]:
    """The answer to a refused message: the error text and, for errors that carry one (the
    broker's), a machine-readable ``reason`` and ``detail``, so a peer need not parse prose."""
    body: dict[str, Any] = {"ok": False, "error": str(exc)}
    as_dict = getattr(exc, "as_dict", None)
    if callable(as_dict):
        coded = as_dict()
        body.update(kind=coded.get("error"), reason=coded.get("reason"), detail=coded.get("detail"))
    return body


@dataclass(eq=False)
class _Served:
    """One connection the server serves: who, and whether it waits for a message."""

    peer: str
    writer: asyncio.StreamWriter
    #: Waiting for the first byte of a message (nothing of it read): it may be closed with
    #: a goodbye, and once it was, nothing more of it is read as a message.
    waiting: bool = False
    #: Served at least one message (a kept connection between messages, not a new one).
    served: int = 0
    since: float = field(default_factory=time.monotonic)
    closed_by_us: str | None = None


class PeerServer:
    """TCP 4340: in-band control messages from other routers and sites, one message at a
    time per connection, any number of messages per connection (clients keep them open,
    :class:`PeerPool`). Answers carry the request's transaction id, and its type unless
    ``answer_type`` says otherwise. A handler that raises is answered
    ``{"ok": false, "error": ...}``; a malformed frame closes the connection and is counted.

    What it reads before any authentication is bounded: :data:`MAX_CONNECTIONS` in all and
    :data:`MAX_PER_PEER` per address (beyond either, a connection idle between messages is
    closed to make room, the longest idle first, else the new one is closed at once), a
    message within :data:`READ_DEADLINE` of its first byte (a new connection's first within
    that of its opening), at most :data:`IDLE_TIMEOUT` between messages, and a body of at most
    ``packets.control.MAX_BODY`` bytes. A connection closed while it waits for a message gets
    a goodbye first (:func:`goodbye`), so its client knows that what it sent was not read."""

    def __init__(self, handler: Handler, port: int = CONTROL_PORT, host: str = "0.0.0.0",
                 answer_type: Callable[[ControlType], ControlType] = lambda t: t) -> None:
        self.handler = handler
        #: The type an answer carries, given the request's (most answer with the same type).
        self.answer_type = answer_type
        self.port = port
        self.host = host
        self.server: asyncio.AbstractServer | None = None
        self.malformed = 0
        self.max_connections = MAX_CONNECTIONS
        self.max_per_peer = MAX_PER_PEER
        self.connections = 0
        #: Connections closed at once because ``max_connections`` were open.
        self.refused = 0
        #: Connections closed idle between messages: for room, and at IDLE_TIMEOUT.
        self.evicted = 0
        self.idle_closed = 0
        self._open: set[_Served] = set()
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        if self.port == 0:  # an ephemeral port (tests): learn which
            self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """No new connection, and no new message on an open one: those waiting for a
        message get a goodbye, those in an exchange close after its answer."""
        self._stopping = True
        if self.server:
            self.server.close()
        for conn in list(self._open):
            if conn.waiting:
                self._say_goodbye(conn, "stopping")
        if self.server:
            await self.server.wait_closed()

    def _say_goodbye(self, conn: _Served, reason: str) -> None:
        """Close ``conn`` (waiting for a message) with a goodbye; its input is drained, never
        read as a message, for :data:`GOODBYE_LINGER` seconds at most, then the socket closes."""
        if conn.closed_by_us is not None:
            return
        conn.closed_by_us = reason
        transport = conn.writer.transport
        try:
            conn.writer.write(goodbye(reason).encode())
            if conn.writer.can_write_eof():
                conn.writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            transport.abort()
            return
        asyncio.get_running_loop().call_later(GOODBYE_LINGER, transport.abort)

    def _make_room(self, peer: str) -> bool:
        """Whether a new connection from ``peer`` may be served: under both bounds, or after
        closing (goodbye) the longest idle kept connection, of that peer when it is at its
        own bound. Connections closing with a goodbye count apart, for at most their linger,
        and never more than ``max_connections`` of them."""
        live = [c for c in self._open if c.closed_by_us is None]
        mine = [c for c in live if c.peer == peer]
        if len(mine) < self.max_per_peer and len(live) < self.max_connections:
            return True
        if self.connections >= 2 * self.max_connections:
            return False
        idle = [c for c in (mine if len(mine) >= self.max_per_peer else live) if c.waiting and c.served]
        if not idle:
            return False
        self.evicted += 1
        self._say_goodbye(min(idle, key=lambda c: c.since), "room")
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else "?"
        if self._stopping or not self._make_room(peer):
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:  # rate-limited: a flood logs little
                log.warning("TCP %d: %d connections open, refused %d so far", self.port,
                            self.connections, self.refused)
            writer.transport.abort()
            return
        conn = _Served(peer, writer)
        self._open.add(conn)
        self.connections += 1
        try:
            await self._messages(reader, writer, conn)
        finally:
            self.connections -= 1
            self._open.discard(conn)

    async def _next(self, reader: asyncio.StreamReader, conn: _Served) -> ControlMessage | None:
        """The next message, or None: the connection ended, or was closed by this server
        while it waited (what came after is drained, never read as a message)."""
        loop = asyncio.get_running_loop()
        conn.waiting, conn.since = True, time.monotonic()
        try:
            if conn.served:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        first = await reader.readexactly(1)
                except TimeoutError:
                    self.idle_closed += 1
                    self._say_goodbye(conn, "idle")
                    first = b""
                deadline = loop.time() + READ_DEADLINE
            else:  # a new connection: its first message within READ_DEADLINE of now
                deadline = loop.time() + READ_DEADLINE
                async with asyncio.timeout_at(deadline):
                    first = await reader.readexactly(1)
        finally:
            conn.waiting = False
        if conn.closed_by_us is not None:
            await self._drain(reader)
            return None
        async with asyncio.timeout_at(deadline):
            head = first + await reader.readexactly(HEADER.size - 1)
            rest = await reader.readexactly(frame_length(head) - HEADER.size)
        return ControlMessage.decode(head + rest)

    @staticmethod
    async def _drain(reader: asyncio.StreamReader) -> None:
        """Discard input until the end of the stream (the linger's abort ends it)."""
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass

    async def _messages(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        conn: _Served) -> None:
        try:
            while True:
                if self._stopping:  # between two messages: the client learns it was not read
                    self._say_goodbye(conn, "stopping")
                    await self._drain(reader)
                    return
                try:
                    msg = await self._next(reader, conn)
                except asyncio.IncompleteReadError:
                    return
                except (MalformedMessage, TimeoutError) as exc:
                    self.malformed += 1
                    log.info("bad in-band control message: %s", exc or "not whole within the deadline")
                    return
                if msg is None:
                    return
                started = time.perf_counter()
                try:
                    body = await self.handler(msg)
                except Exception as exc:  # noqa: BLE001 - answer with the reason
                    log.info("in-band %s refused: %s", msg.type.name, exc)
                    body = refusal(exc)
                if log.isEnabledFor(logging.DEBUG):  # where a commit's time goes (issue 14)
                    log.debug("in-band %s txid %d from %s handled in %.2f ms", msg.type.name,
                              msg.txid, conn.peer, (time.perf_counter() - started) * 1e3)
                writer.write(ControlMessage(self.answer_type(msg.type), msg.txid, body).encode())
                await writer.drain()
                conn.served += 1
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
