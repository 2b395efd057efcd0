"""JSON-lines RPC: the one framing for the agent's control socket and its object channels.

Two channels in MOAT carry commands out of band: the agent's Unix control socket (``moat
show``, experiments, tests) and the socketpair between the agent and each sandboxed object
process. Both speak this module's protocol, one JSON object per line::

    request  {"id": 7, "cmd": "stats", "args": {...}}
    answer   {"id": 7, "ok": true, "result": ...}
             {"id": 7, "ok": false, "error": "..."}

The id is what makes a channel safe to reuse after a time-out: a call that gave up leaves its
answer on the wire, and without ids the next call on the same stream would take it for its own
(the object channel once did). :class:`RpcClient` matches answers to calls by id and discards
(and logs) anything else. A server answers one connection's requests one at a time, in order,
so a line that cannot be read (not JSON, no id, over the limit) belongs to the oldest request
still unanswered; only that call fails, with :class:`RpcProtocolError`, and the channel stays
usable because framing (the newline) is intact: an over-long line is skipped up to its newline.

A request without an id (a hand-typed probe) is still served; its answer has ``"id": null``.
Clients here always send one.

Line limits are parameters of this one implementation: the control socket reads requests up
to :data:`CONTROL_REQUEST_LIMIT`; everything that may carry a checkpoint (the object channel
both ways, control answers such as ``object_state``) goes up to :data:`CHECKPOINT_LINE_LIMIT`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

#: Control-socket requests: a command and its arguments, small by nature.
CONTROL_REQUEST_LIMIT = 1 << 20
#: A checkpoint is one line; it carries the replies an object remembers per client
#: (at-most-once), which may hold whole documents.
CHECKPOINT_LINE_LIMIT = 64 << 20
#: How long skipping the rest of an over-long line may take before the stream is given up.
SKIP_TIMEOUT = 10.0
#: Calls that timed out and are still unanswered; a peer that leaves more is not answering
#: at all, and the channel is declared broken rather than remembering ids forever.
MAX_UNANSWERED = 64

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


# --- errors ---------------------------------------------------------------------------------


class RpcError(AgentError):
    """A call that did not produce a result."""


class RpcRemoteError(RpcError):
    """The peer answered ``ok: false``: it refused or failed the command."""

    def __init__(self, cmd: str, error: str) -> None:
        self.cmd = cmd
        self.error = error
        super().__init__(error)


class RpcTimeout(RpcError, TimeoutError):
    """No answer within the call's time limit (a late one will be discarded)."""


class RpcProtocolError(RpcError):
    """A line that is not a valid request or answer of this protocol."""


class RpcLineTooLong(RpcProtocolError):
    """A line over the channel's limit (skipped up to its newline)."""


class RpcClosed(RpcError):
    """The channel is closed or broken: no call on it can succeed any more."""


class RpcUnreachable(RpcClosed):
    """The server could not be connected to at all."""


class RpcUnknownCommand(RpcError):
    """A command the server's table does not have."""


# --- framing --------------------------------------------------------------------------------


def _line(message: dict[str, Any], limit: int, what: str) -> bytes:
    """One encoded line; values JSON has no type for are sent as their ``str()``."""
    try:
        data = json.dumps(message, default=str).encode() + b"\n"
    except (TypeError, ValueError) as exc:  # a circular structure, say
        raise RpcError(f"{what} cannot be encoded: {exc}") from None
    if len(data) > limit:
        raise RpcLineTooLong(f"{what} of {len(data)} bytes exceeds the {limit}-byte line limit")
    return data


def encode_request(call_id: int, cmd: str, args: Mapping[str, Any], limit: int) -> bytes:
    """The request line; raises :class:`RpcError` for arguments that are not JSON or too long,
    before anything is sent (the peer would refuse it anyway)."""
    try:
        data = json.dumps({"id": call_id, "cmd": cmd, "args": dict(args)}).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise RpcError(f"arguments of {cmd} are not JSON: {exc}") from None
    if len(data) > limit:
        raise RpcLineTooLong(f"request {cmd} of {len(data)} bytes exceeds the {limit}-byte line limit")
    return data


def ok_answer(call_id: int | None, result: Any) -> dict[str, Any]:
    """The answer carrying ``result``; the id is the request's (None if it had none)."""
    return {"id": call_id, "ok": True, "result": result}


def error_answer(call_id: int | None, error: str) -> dict[str, Any]:
    """The answer of a refused or failed request."""
    return {"id": call_id, "ok": False, "error": error}


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Request:
    """One parsed request; ``call_id`` None for a request sent without an id."""

    call_id: int | None
    cmd: str
    args: dict[str, Any]


class BadRequest(RpcProtocolError):
    """A request line that cannot be served; ``call_id`` when it was readable."""

    def __init__(self, reason: str, call_id: int | None = None) -> None:
        self.call_id = call_id
        super().__init__(f"bad request: {reason}")


def parse_request(line: bytes) -> Request:
    """The request on ``line``; :class:`BadRequest` (with the id, when readable) otherwise."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(str(exc)) from None
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object")
    call_id = req.get("id")
    if call_id is not None and not _valid_id(call_id):
        raise BadRequest("id must be an integer")
    cmd, args = req.get("cmd"), req.get("args") or {}
    if not isinstance(cmd, str) or not isinstance(args, dict):
        raise BadRequest("cmd must be a string and args an object", call_id)
    return Request(call_id, cmd, args)


def parse_answer(line: bytes) -> tuple[int, dict[str, Any]]:
    """``(id, answer)``; :class:`RpcProtocolError` for anything that is not an answer."""
    try:
        answer = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise RpcProtocolError(f"answer is not JSON: {line[:80]!r}") from None
    if not isinstance(answer, dict) or not _valid_id(answer.get("id")):
        raise RpcProtocolError(f"answer without an id: {line[:80]!r}")
    if answer.get("ok") is not True and not isinstance(answer.get("error"), str):
        raise RpcProtocolError(f"answer neither ok nor an error: {line[:80]!r}")
    return answer["id"], answer


def answer_result(cmd: str, answer: dict[str, Any]) -> Any:
    """The result of an ``ok`` answer; :class:`RpcRemoteError` for a refusal."""
    if answer.get("ok") is True:
        return answer.get("result")
    raise RpcRemoteError(cmd, answer["error"])


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line, None at end of stream (a last line without newline counts as one).

    The reader's own limit (set when the stream was opened) is the line limit: an over-long
    line is skipped up to its newline and reported with :class:`RpcLineTooLong`, so the
    next line is read from its start."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial or None
    except asyncio.LimitOverrunError as exc:
        await _skip_line(reader, exc.consumed)
        raise RpcLineTooLong("line exceeds the channel's limit") from None


async def _skip_line(reader: asyncio.StreamReader, consumed: int) -> None:
    async def skip() -> None:
        step = consumed
        while True:  # each turn consumes at least one byte; bounded by SKIP_TIMEOUT
            await reader.readexactly(step)
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                step = exc.consumed

    try:
        await asyncio.wait_for(skip(), SKIP_TIMEOUT)
    except asyncio.IncompleteReadError:
        return  # the stream ended inside the line: the next read sees the end
    except asyncio.TimeoutError:
        raise RpcClosed(f"an over-long line did not end within {SKIP_TIMEOUT:g}s") from None


async def open_stream(sock: socket.socket, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over one connected socket (a socketpair end), reading lines up to ``limit``."""
    return await asyncio.open_connection(sock=sock, limit=limit)


# --- server side ----------------------------------------------------------------------------


def command_table(commands: Mapping[str, Callable[[dict[str, Any]], Any]]) -> Handler:
    """A handler that runs ``commands[cmd](args)`` (plain functions) and refuses other names."""

    async def handler(cmd: str, args: dict[str, Any]) -> Any:
        try:
            run = commands[cmd]
        except KeyError:
            raise RpcUnknownCommand(f"unknown command {cmd!r}") from None
        return run(args)

    return handler


class RpcServer:
    """Answers requests with ``handler(cmd, args)``, one connection's requests in order.

    Errors the handler means (an :class:`AgentError`, a ``TypeError``/``ValueError`` for bad
    arguments) are answered with their message; anything else is a bug, logged with its
    traceback and answered as an internal error. The server never dies of a request."""

    def __init__(self, handler: Handler, *, request_limit: int,
                 answer_limit: int = CHECKPOINT_LINE_LIMIT) -> None:
        self.handler = handler
        self.request_limit = request_limit
        self.answer_limit = answer_limit

    async def serve_unix(self, path: Path | str) -> asyncio.AbstractServer:
        """Listen on a Unix socket; each connection is served on its own."""
        return await asyncio.start_unix_server(self.serve_stream, str(path), limit=self.request_limit)

    async def serve_socket(self, sock: socket.socket, until: asyncio.Event | None = None) -> None:
        """Serve one connected socket (a socketpair end) until it closes or ``until`` is set."""
        reader, writer = await open_stream(sock, self.request_limit)
        await self.serve_stream(reader, writer, until)

    async def serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           until: asyncio.Event | None = None) -> None:
        """Read, dispatch, answer, until end of stream or ``until`` (checked after each
        answer, so the command that sets it is still answered)."""
        try:
            while until is None or not until.is_set():
                try:
                    line = await read_line(reader)
                except RpcLineTooLong:
                    await self._send(writer, error_answer(None, "request line too long"))
                    continue
                if line is None:
                    return
                await self._send(writer, await self.answer(line))
        except (ConnectionError, RpcClosed) as exc:
            log.debug("rpc connection ended: %s", exc)
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line."""
        try:
            req = parse_request(line)
        except BadRequest as exc:
            return error_answer(exc.call_id, str(exc))
        try:
            return ok_answer(req.call_id, await self.handler(req.cmd, req.args))
        except (AgentError, TypeError, ValueError) as exc:
            return error_answer(req.call_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - report, never die
            log.exception("rpc command %s failed", req.cmd)
            return error_answer(req.call_id, f"internal error: {exc!r}")

    async def _send(self, writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
        try:
            data = _line(answer, self.answer_limit, "answer")
        except RpcError as exc:
            log.warning("%s", exc)
            data = _line(error_answer(answer.get("id"), str(exc)), self.answer_limit, "answer")
        writer.write(data)
        await writer.drain()


# --- async client ---------------------------------------------------------------------------


@dataclass
class _Call:
    """A request sent and not answered yet; its future is done once it timed out."""

    cmd: str
    future: asyncio.Future[dict[str, Any]]


class RpcClient:
    """Calls over one stream, answers matched by id (see the module docstring).

    A background task reads answers; a call waits for the one with its id. A call that timed
    out keeps its place until its answer arrives, which is then discarded, so no answer is ever
    returned to a call it does not belong to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 name: str, request_limit: int) -> None:
        self.name = name
        self.request_limit = request_limit
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._calls: OrderedDict[int, _Call] = OrderedDict()
        self._broken: str | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_answers())

    @classmethod
    async def over_socket(cls, sock: socket.socket, *, name: str, limit: int) -> RpcClient:
        """A client on a connected socket whose lines (both ways) are limited to ``limit``."""
        reader, writer = await open_stream(sock, limit)
        return cls(reader, writer, name=name, request_limit=limit)

    @classmethod
    async def resume(cls, sock: socket.socket, *, name: str, limit: int,
                     timeout: float) -> RpcClient:
        """A client on a channel an earlier client used and left without warning (its
        process died): it may have left half a request on the wire, answers unread, or read
        half an answer. A newline ends any half request; then a ``ping`` with a random id is
        sent, and every line up to its answer is discarded (a server answers in order), so
        the new client starts on a clean line with nothing stale to come. The server may
        refuse ``ping`` (an unknown command): the answer still carries the id.
        RpcTimeout/RpcClosed when the peer does not answer."""
        reader, writer = await open_stream(sock, limit)
        nonce = secrets.randbits(62) + (1 << 62)  # never an id of the earlier client's count
        try:
            writer.write(b"\n" + encode_request(nonce, "ping", {}, limit))
            await writer.drain()

            async def skip_to_nonce() -> None:
                while True:
                    try:
                        line = await read_line(reader)
                    except RpcLineTooLong:
                        continue
                    if line is None:
                        raise RpcClosed(f"{name}: closed while resuming")
                    try:
                        call_id, _answer = parse_answer(line)
                    except RpcProtocolError:
                        continue
                    if call_id == nonce:
                        return

            await asyncio.wait_for(skip_to_nonce(), timeout)
        except asyncio.TimeoutError:
            writer.close()
            raise RpcTimeout(f"{name}: no answer within {timeout:g}s while resuming") from None
        except (OSError, RpcError) as exc:
            writer.close()
            raise RpcClosed(f"{name}: cannot resume: {exc}") from None
        return cls(reader, writer, name=name, request_limit=limit)

    @property
    def broken(self) -> str | None:
        """Why the channel cannot be used any more, or None while it can."""
        return self._broken

    async def call(self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float) -> Any:
        """Send ``cmd`` and return its result; raise a :class:`RpcError` subclass otherwise."""
        if self._broken is not None:
            raise RpcClosed(f"{self.name}: {self._broken}")
        call_id = next(self._ids)
        data = encode_request(call_id, cmd, args or {}, self.request_limit)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = _Call(cmd, future)
        try:
            answer = await asyncio.wait_for(self._exchange(data, future), timeout)
        except asyncio.TimeoutError:
            future.cancel()  # timed out while sending, too: its answer is still late
            self._check_unanswered()
            raise RpcTimeout(f"{self.name}: no answer to {cmd} within {timeout:g}s") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: write on a closed transport
            self._calls.pop(call_id, None)
            self._break(f"cannot send: {exc!r}")
            raise RpcClosed(f"{self.name}: cannot send {cmd}: {exc!r}") from None
        return answer_result(cmd, answer)

    async def _exchange(self, data: bytes, future: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
        self._writer.write(data)
        await self._writer.drain()
        return await future

    async def close(self) -> None:
        """Close the stream and fail what still waits. Safe to repeat."""
        self._break("closed")
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)  # its end is logged already
        self._writer.close()

    # The reader task ---------------------------------------------------------------------

    async def _read_answers(self) -> None:
        reason = "closed by the peer"
        try:
            while True:
                try:
                    line = await read_line(self._reader)
                except RpcLineTooLong as exc:
                    self._fail_oldest(exc)
                    continue
                if line is None:
                    break
                try:
                    call_id, answer = parse_answer(line)
                except RpcProtocolError as exc:
                    self._fail_oldest(exc)
                    continue
                self._deliver(call_id, answer)
        except (OSError, RpcClosed) as exc:
            reason = f"broken: {exc}"
        except Exception:  # noqa: BLE001 - a bug here must still fail the waiting calls
            log.exception("%s: answer reader failed", self.name)
            reason = "broken: answer reader failed"
        finally:
            self._break(reason)

    def _deliver(self, call_id: int, answer: dict[str, Any]) -> None:
        if call_id not in self._calls:
            log.warning("%s: answer with unknown id %d discarded", self.name, call_id)
            return
        while self._calls:  # answers come in order: earlier calls will not be answered now
            earlier_id, call = self._calls.popitem(last=False)
            if earlier_id == call_id:
                break
            self._fail(earlier_id, call, RpcProtocolError(f"{self.name}: {call.cmd} was never answered"))
        if call.future.done():
            log.warning("%s: late answer to call %d (%s) discarded", self.name, call_id, call.cmd)
        else:
            call.future.set_result(answer)

    def _fail_oldest(self, exc: RpcProtocolError) -> None:
        """A line without a readable id belongs to the oldest request still unanswered."""
        if not self._calls:
            log.warning("%s: unexpected line discarded: %s", self.name, exc)
            return
        call_id, call = self._calls.popitem(last=False)
        self._fail(call_id, call, type(exc)(f"{self.name}: bad answer to {call.cmd}: {exc}"))

    def _fail(self, call_id: int, call: _Call, exc: RpcError, quiet: bool = False) -> None:
        if call.future.done():
            if not quiet:
                log.warning("%s: call %d (%s), timed out, then: %s", self.name, call_id, call.cmd, exc)
        else:
            call.future.set_exception(exc)

    def _check_unanswered(self) -> None:
        if sum(c.future.done() for c in self._calls.values()) > MAX_UNANSWERED:
            self._break(f"more than {MAX_UNANSWERED} calls left unanswered")

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
            log.debug("%s: channel %s", self.name, reason)
        calls, self._calls = self._calls, OrderedDict()
        for call_id, call in calls.items():
            self._fail(call_id, call, RpcClosed(f"{self.name}: channel {reason} (while asked {call.cmd})"),
                       quiet=True)


# --- synchronous client ---------------------------------------------------------------------

_sync_ids = itertools.count(1)


def call_unix(path: Path | str, cmd: str, args: Mapping[str, Any] | None = None, *,
              timeout: float, request_limit: int = CONTROL_REQUEST_LIMIT,
              answer_limit: int = CHECKPOINT_LINE_LIMIT) -> Any:
    """One blocking call on its own connection to a Unix server socket (CLI, experiments,
    tests: no event loop there). ``timeout`` bounds the whole exchange."""
    call_id = next(_sync_ids)
    data = encode_request(call_id, cmd, args or {}, request_limit)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise RpcUnreachable(f"cannot connect to {path}: {exc}") from None
        try:
            s.sendall(data)
            line = _recv_line(s, deadline, answer_limit)
        except socket.timeout:
            raise RpcTimeout(f"no answer to {cmd} within {timeout:g}s") from None
        except OSError as exc:
            raise RpcClosed(f"connection to {path} failed: {exc}") from None
    if not line.strip():
        # End of stream before any answer: the server went away mid-call (a crash, a stop).
        raise RpcClosed(f"{path} closed the connection before answering {cmd} "
                        f"(the agent stopped or died during the call)")
    answer_id, answer = parse_answer(line)
    if answer_id != call_id:
        raise RpcProtocolError(f"answer id {answer_id} is not request id {call_id}")
    return answer_result(cmd, answer)


def _recv_line(s: socket.socket, deadline: float, limit: int) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):  # bounded by the deadline and the limit
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        s.settimeout(left)
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise RpcLineTooLong(f"answer exceeds the {limit}-byte line limit")
    return bytes(buf)


__all__ = [
    "CHECKPOINT_LINE_LIMIT", "CONTROL_REQUEST_LIMIT", "BadRequest", "Handler", "RpcClient",
    "RpcClosed", "RpcError", "RpcLineTooLong", "RpcProtocolError", "RpcRemoteError", "RpcServer",
    "RpcTimeout", "RpcUnknownCommand", "RpcUnreachable", "call_unix", "command_table",
]
