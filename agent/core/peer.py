"""The in-band peer transport: MOAT control messages between routers and sites on TCP 4340.

Routers move objects (MIGRATE, STATE_TRANSFER) and the remote site configures VMs
(PROVISION) over the emulated network, in MOAT's control framing, so captures show the whole
exchange. This module is only the transport: one request and one answer per exchange, the
answer carrying the request's type and transaction id. What a message means belongs to the
role that serves it (:class:`agent.core.role.InBand`); failures of the exchange itself are
:class:`PeerError`, which each role turns into its own error.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Collection, Mapping

from packets import ControlMessage, ControlType, MalformedMessage
from packets.codes import CONTROL_PORT
from packets.control import HEADER, frame_length

from agent.core.errors import AgentError, ControlError
from agent.core.msgauth import MessageAuthError, ReplayCache, sign_hmac, strip, verify_hmac
from agent.core.sealing import SealError, open_body, seal_body, secret_fields

log = logging.getLogger(__name__)

PEER_TIMEOUT = 15.0
#: Connections TCP 4340 serves at once: more are closed at once (work before authentication
#: is bounded, issue 12). Growing a service opens one per router; a run has far fewer.
MAX_CONNECTIONS = 64
#: A connection must deliver a whole message within this, or it is closed.
READ_DEADLINE = 10.0


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


async def peer_call(address: str, ctype: ControlType, body: dict[str, Any],
                    timeout: float = PEER_TIMEOUT, txid: int = 0,
                    key: bytes | None = None, port: int = CONTROL_PORT,
                    seal_keys: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """One request/answer with the agent at ``address``; with ``key`` (the run's router key)
    the body's secret fields are sealed for that router (its public key in ``seal_keys``, by
    address) and the body carries an HMAC authenticator for receiver ``address``
    (:mod:`agent.core.msgauth`). Without ``key`` the body goes as it is (already signed),
    unless it carries a secret in clear. Returns the answer's body when it says ``ok``;
    raises :class:`PeerError` otherwise, and before sending anything when a secret could not
    be sealed: no secret crosses the wire in clear (issue 12)."""
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
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerNotSent(f"target {address} unreachable: {exc!r}") from None
    try:
        writer.write(ControlMessage(ctype, txid, body).encode())
        await writer.drain()
        answer = await asyncio.wait_for(read_message(reader), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, MalformedMessage) as exc:
        raise PeerError(f"no valid answer from {address}: {exc!r}") from None
    finally:
        writer.close()
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
        return cls(key, config.addresses, config.seal_private())

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


class PeerServer:
    """TCP 4340: in-band control messages from other routers and sites (one message per
    connection at a time; answers carry the request's transaction id, and its type unless
    ``answer_type`` says otherwise). A handler
    that raises is answered ``{"ok": false, "error": ...}``; a malformed frame closes the
    connection and is counted."""

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
        self.connections = 0
        #: Connections closed at once because ``max_connections`` were open.
        self.refused = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        if self.port == 0:  # an ephemeral port (tests): learn which
            self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:  # rate-limited: a flood logs little
                log.warning("TCP %d: %d connections open, refused %d so far", self.port,
                            self.connections, self.refused)
            writer.transport.abort()
            return
        self.connections += 1
        try:
            await self._messages(reader, writer)
        finally:
            self.connections -= 1

    async def _messages(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(read_message(reader), READ_DEADLINE)
                except asyncio.IncompleteReadError:
                    return
                except (MalformedMessage, asyncio.TimeoutError) as exc:
                    self.malformed += 1
                    log.info("bad in-band control message: %s", exc)
                    return
                try:
                    body = await self.handler(msg)
                except Exception as exc:  # noqa: BLE001 - answer with the reason
                    log.info("in-band %s refused: %s", msg.type.name, exc)
                    body = refusal(exc)
                writer.write(ControlMessage(self.answer_type(msg.type), msg.txid, body).encode())
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
