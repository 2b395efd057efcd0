"""The process that runs one mobile object: ``python -m agent.runner ...`` (started by the VM).

It serves the object's requests on its home address (UDP, MOAT control framing: a
SERVICE_REQUEST with ``{"client", "seq", ...}`` gets a SERVICE_REPLY) and obeys its router
over a socketpair (JSON lines: ``get_state``, ``set_state``, ``serve``, ``stats``, ``stop``).

At-most-once semantics live here, not in each object: the runtime remembers, per client, the
last sequence number and reply. A duplicate gets the remembered reply again, an older
request is dropped, and that memory travels with the object's state, so during a
make-before-break move (both instances receiving every request) the new instance neither
double-counts nor misses a request. A new instance started *warm* queues requests until its
state arrives, then replays the queue through the same filter.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any

from packets import ControlMessage, ControlType, MalformedMessage

from .sdk import MobileObject, RequestError

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
MAX_QUEUE = 10_000
#: A checkpoint is one JSON line on the socketpair (see agent.runtime.LINE_LIMIT).
CONTROL_LINE_LIMIT = 64 << 20


def load_object(spec: str) -> MobileObject:
    """``package.module:Class`` → a new instance."""
    module_name, _, cls_name = spec.partition(":")
    if not cls_name:
        raise ValueError(f"object spec {spec!r} is not module:Class")
    cls = getattr(importlib.import_module(module_name), cls_name)
    obj = cls()
    if not isinstance(obj, MobileObject):
        raise TypeError(f"{spec} is not a MobileObject")
    return obj


class ObjectServer(asyncio.DatagramProtocol):
    """Requests in, replies out, with the dedup filter and the warm-up queue."""

    def __init__(self, obj: MobileObject, name: str, router: str, warm: bool,
                 extensible: bool = True) -> None:
        self.obj = obj
        #: Lifecycle policy: may another service use this one? (requests naming a
        #: ``from_service`` are refused when not)
        self.extensible = extensible
        self.name = name
        self.router = router
        self.instance = uuid.uuid4().hex[:8]
        self.warming = warm
        self.queue: list[tuple[ControlMessage, tuple]] = []
        self.seen: dict[str, list] = {}  # client -> [seq, reply body]
        self.stats = {"served": 0, "duplicates": 0, "stale": 0, "malformed": 0, "errors": 0,
                      "queued": 0, "started": time.time()}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            msg = ControlMessage.decode(data)
            if msg.type != ControlType.SERVICE_REQUEST:
                raise MalformedMessage(f"{msg.type.name} is not a service request")
            str(msg.body["client"])
            int(msg.body["seq"])
        except (MalformedMessage, KeyError, TypeError, ValueError) as exc:
            self.stats["malformed"] += 1
            log.debug("bad request from %s: %s", addr, exc)
            return
        if self.warming:
            if len(self.queue) < MAX_QUEUE:
                self.queue.append((msg, addr))
                self.stats["queued"] += 1
            return
        self._serve(msg, addr)

    def _serve(self, msg: ControlMessage, addr: tuple | None, replay: bool = False) -> None:
        client, seq = str(msg.body["client"]), int(msg.body["seq"])
        last = self.seen.get(client)
        if last is not None and seq <= last[0]:
            if seq == last[0] and not replay:  # (a queued request the checkpoint already
                # answered was answered by the other instance: no second reply)
                self.stats["duplicates"] += 1
                self._reply(msg.txid, last[1], addr)
            else:
                self.stats["stale"] += 1
            return
        try:
            if msg.body.get("from_service") and not self.extensible:
                raise RequestError(f"service {self.name} is not extensible: it refuses use by "
                                   f"another service ({msg.body['from_service']})")
            result = self.obj.handle(msg.body)
            body = {"ok": True, "result": result}
        except RequestError as exc:
            body = {"ok": False, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - an object bug is the client's error reply
            self.stats["errors"] += 1
            log.exception("object %s failed on a request", self.name)
            body = {"ok": False, "error": f"object error: {exc!r}"}
        body.update(client=client, seq=seq)
        self.seen[client] = [seq, body]
        self.stats["served"] += 1
        self._reply(msg.txid, body, addr)

    def _reply(self, txid: int, body: dict, addr: tuple | None) -> None:
        if addr is None or self.transport is None:
            return
        out = dict(body, served_by=self.router, instance=self.instance, at=time.time())
        self.transport.sendto(ControlMessage(ControlType.SERVICE_REPLY, txid, out).encode(), addr)

    # --- state ---------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """A JSON copy: it must not change when this instance serves the next request, and an
        object whose state is not JSON fails here, at its origin, not at the target."""
        # Requests received but not served yet (a held or warm instance) travel too: the
        # next instance answers them, so a request that reached this one is not lost.
        pending = [[m.txid, m.body, list(a)] for m, a in self.queue if isinstance(a, tuple)]
        return json.loads(json.dumps({"object": self.obj.get_state(), "seen": self.seen,
                                      "served": self.stats["served"], "pending": pending}))

    def restore(self, state: dict[str, Any]) -> None:
        self.obj.set_state(state["object"])
        # Transactions served travel with the object: a lifecycle limit counts the service's
        # use, wherever (and in whichever version) it ran.
        self.stats["served"] += int(state.get("served", 0))
        for client, (seq, body) in state.get("seen", {}).items():
            mine = self.seen.get(client)
            if mine is None or seq > mine[0]:
                self.seen[client] = [seq, body]
        for txid, body, addr in state.get("pending", []):
            if len(self.queue) < MAX_QUEUE:
                self.queue.append((ControlMessage(ControlType.SERVICE_REQUEST, int(txid), body), tuple(addr)))

    def hold(self) -> int:
        """Stop serving, keep receiving: requests queue (and go into the checkpoint) while
        the router takes the home address away, after which a reply could not be sent from
        it any more. Returns how many were queued already."""
        self.warming = True
        return len(self.queue)

    def serve(self) -> int:
        """Leave warm-up: replay the queue through the filter, then serve live."""
        queued, self.queue = self.queue, []
        self.warming = False
        # Per client in sequence order (a previous instance's pending requests and this
        # one's queue interleave); the sort is stable and clients are independent.
        queued.sort(key=lambda entry: int(entry[0].body["seq"]))
        for msg, addr in queued:
            self._serve(msg, addr, replay=True)
        return len(queued)


async def control_loop(server: ObjectServer, sock: socket.socket, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection(sock=sock, limit=CONTROL_LINE_LIMIT)
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            break  # the router went away: stop with it
        try:
            req = json.loads(line)
            cmd = req["cmd"]
            if cmd == "get_state":
                result: Any = server.checkpoint()
            elif cmd == "set_state":
                server.restore(req["state"])
                result = {"replayed": server.serve() if req.get("serve", True) else 0}
            elif cmd == "hold":
                result = {"queued": server.hold()}
            elif cmd == "serve":
                result = {"replayed": server.serve()}
            elif cmd == "stats":
                result = dict(server.stats, warming=server.warming, instance=server.instance,
                              pid=os.getpid(), state=server.obj.get_state())
            elif cmd == "stop":
                result = server.checkpoint()
                stop.set()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            answer = {"ok": True, "result": result}
        except Exception as exc:  # noqa: BLE001 - answer, never die
            answer = {"ok": False, "error": repr(exc)}
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
    stop.set()


async def run(args: argparse.Namespace) -> int:
    obj = load_object(args.spec)
    server = ObjectServer(obj, args.name, args.router, args.warm, extensible=not args.not_extensible)
    if args.state:
        server.restore(json.loads(args.state))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The home address may be configured a moment after the object starts (or not at all
    # yet during a make-before-break move): bind anyway.
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.bind((args.address, args.port))
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: server, sock=sock)
    stop = asyncio.Event()
    ctl = socket.socket(fileno=args.control_fd)
    log.info("object %s (%s) serving on %s:%d, warm=%s", args.name, args.spec, args.address,
             args.port, args.warm)
    await control_loop(server, ctl, stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.runner")
    parser.add_argument("--spec", required=True, help="module:Class of the object")
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True, help="the object's home address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--router", default="")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--warm", action="store_true", help="queue requests until set_state")
    parser.add_argument("--state", default="", help="initial state (JSON checkpoint)")
    parser.add_argument("--not-extensible", action="store_true",
                        help="refuse requests made on behalf of another service")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s object %(name)s %(levelname)s %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
