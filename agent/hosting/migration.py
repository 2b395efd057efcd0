"""Moving a running object between routers, with its state, in band (TCP 4340).

The source router drives the move; the target obeys MIGRATE and STATE_TRANSFER messages in
MOAT's control framing, so captures show the whole exchange. Two modes (issue "handoff"):

* **make-before-break**: the target starts a *warm* instance (it queues requests) and
  registers it with ``S`` (the HOA bicasts to both); only then does the source deregister its
  own binding and stop, keeping its final checkpoint, which it sends to the target; the
  target replays its queue through the at-most-once filter and serves. Every request after
  the target's registration reaches the target, so none is lost; they are only delayed by
  the hand-over.
* **break-before-make**: the source stops (keeping the checkpoint), the target starts from it
  and registers without ``S``. Requests in between are lost.

Any failure leaves the object serving at the source with its state: before the source stops
nothing changed there; after, it restarts from the checkpoint it kept and registers again.
The target undoes whatever it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from packets import ControlMessage, ControlType, MalformedMessage
from packets.codes import CONTROL_PORT
from packets.control import HEADER, frame_length

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

PEER_TIMEOUT = 15.0
REGISTER_TIMEOUT = 10.0
MODES = ("make-before-break", "break-before-make")


class MigrationFailed(AgentError):
    """A move that did not happen; the object still serves where it was."""


@dataclass
class MigrationReport:
    """What happened, step by step, with monotonic timestamps (seconds)."""

    name: str
    mode: str
    source: str
    target: str
    ok: bool = False
    error: str = ""
    steps: list[tuple[str, float]] = field(default_factory=list)
    target_registration: dict[str, Any] | None = None
    #: The target's registration round trip (request sent to reply received), ms.
    registration_rtt_ms: float | None = None

    def step(self, what: str) -> None:
        self.steps.append((what, time.time()))
        log.info("migrate %s %s->%s: %s", self.name, self.source, self.target, what)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, steps=[list(s) for s in self.steps])


async def read_message(reader: asyncio.StreamReader) -> ControlMessage:
    head = await reader.readexactly(HEADER.size)
    rest = await reader.readexactly(frame_length(head) - HEADER.size)
    return ControlMessage.decode(head + rest)


async def peer_call(address: str, ctype: ControlType, body: dict[str, Any],
                    timeout: float = PEER_TIMEOUT, txid: int = 0,
                    key: bytes | None = None) -> dict[str, Any]:
    """One request/answer with another router's agent over TCP 4340; with ``key`` (the
    run's router key) the body carries an HMAC authenticator (agent.core.msgauth)."""
    if key is not None:
        from agent.core.msgauth import sign_hmac

        body = sign_hmac(ctype, txid, body, key)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, CONTROL_PORT), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise MigrationFailed(f"target {address} unreachable: {exc!r}") from None
    try:
        writer.write(ControlMessage(ctype, txid, body).encode())
        await writer.drain()
        answer = await asyncio.wait_for(read_message(reader), timeout)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, MalformedMessage) as exc:
        raise MigrationFailed(f"no valid answer from {address}: {exc!r}") from None
    finally:
        writer.close()
    if not answer.body.get("ok"):
        raise MigrationFailed(f"{address} refused: {answer.body.get('error', '?')}")
    return answer.body


Handler = Callable[[ControlMessage], Awaitable[dict[str, Any]]]


class PeerServer:
    """TCP 4340: in-band control messages from other routers (one message per connection
    at a time; answers carry the request's type and transaction id)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.malformed = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "0.0.0.0", CONTROL_PORT, reuse_address=True)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(read_message(reader), PEER_TIMEOUT * 4)
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
                    body = {"ok": False, "error": str(exc)}
                writer.write(ControlMessage(msg.type, msg.txid, body).encode())
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
