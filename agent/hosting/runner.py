"""The process that runs one mobile object: ``python -m agent.hosting.runner ...`` (started by the VM).

It serves the object's requests on its home address (MOAT control framing: a
SERVICE_REQUEST with ``{"client", "seq", ...}`` gets a SERVICE_REPLY) and obeys its router
over a socketpair (:mod:`agent.core.rpc`: ``get_state``, ``set_state``, ``hold``, ``serve``,
``stats``, ``stop``, and for a leased service ``credentials`` and ``revoke``).

A *leased* object (its VM's PROVISION said ``"leased": true``; ``--leased``) serves only
requests that carry a valid service credential (patent Fig. 10, 164): the broker issued it with
a lease, under a per-service key the router derives and hands over the socketpair (never on
the command line), and the object checks it itself — service, instance, expiry, and the
leases the broker cancelled since (``revoke``). Until the key arrives every request is refused:
the check fails closed. A refusal is an ordinary reply with a ``credential_error`` reason and
is not remembered by the at-most-once filter, so the client may retry with a credential.

Requests come over UDP and over TCP on the same address and port. A reply bigger than one
datagram can carry (a .docx in base64, say) cannot go back over UDP: the client gets a short
``{"ok": false, "too_large": N}`` reply instead and asks again, same client and sequence
number, over TCP, where the filter below answers it from memory (the object does not run the
request twice). Both transports go through one path: the filter, the warm-up queue, stats.

At-most-once semantics live here, not in each object: the runtime remembers, per client, the
sequence numbers it served and the last reply (:mod:`agent.hosting.at_most_once`: bounded,
and not silenced by one spoofed request). A duplicate of the last gets the remembered reply
again, a request served already is dropped, and that memory travels with the object's state,
so during a make-before-break move (both instances receiving every request) the new instance
neither double-counts nor misses a request. A checkpoint is strict JSON: an object whose state
is not (NaN, say) is refused a checkpoint, with a :class:`CheckpointError`, and serves on. A new instance started *warm* queues requests until its
state arrives, then replays the queue through the same filter.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any, Callable, Tuple, Union

from packets import ControlMessage, ControlType, MalformedMessage
from packets.control import HEADER, frame_length

from agent.core import rpc
from agent.core.errors import AgentError
from agent.hosting.at_most_once import (MAX_CLIENT_LEN, MAX_SEQ, RequestMemory, Verdict,
                                        encoded_size)
from agent.hosting.credential_check import CredentialCheck
from agent.hosting.streams import StreamPeer
from agent.sdk import MobileObject, RequestError

log = logging.getLogger(__name__)

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
MAX_QUEUE = 10_000
#: Largest UDP datagram read from the service socket.
MAX_DATAGRAM = 65_535
#: Largest encoded reply sent as one UDP datagram (IPv4 carries at most 65,507 bytes); a
#: bigger one is replaced by a short "too_large" reply telling the client to use TCP.
UDP_REPLY_LIMIT = 65_000
#: TCP connections served at once; more are refused. The sandbox gives an object
#: RLIMIT_NOFILE 256, and UDP, the control socketpair and Python need a few of those.
MAX_STREAMS = 64
#: A TCP connection that sends no complete request for this long is closed (unless requests
#: of its own still wait in the warm-up queue); it also bounds a request sent very slowly.
STREAM_IDLE_TIMEOUT = 30.0
#: Requests of one TCP connection that may wait in the warm-up queue at once; more are
#: dropped, so that one connection cannot fill the queue with 1 MiB requests.
MAX_STREAM_PENDING = 8
#: Source networks counted apart in the stats (more count as "other").
MAX_NETWORKS = 64


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


def _source(dest: "ReplyTo") -> str | None:
    """The address a request came from (UDP source, or TCP peer)."""
    if isinstance(dest, StreamPeer):
        peer = dest.writer.get_extra_info("peername")
        return str(peer[0]) if isinstance(peer, tuple) and peer else None
    return str(dest[0]) if isinstance(dest, tuple) and dest else None


def parse_request(data: bytes) -> ControlMessage:
    """One service request with a client and a sequence number, or :class:`MalformedMessage`.
    UDP and TCP requests are checked by this one function, so both count the same way."""
    msg = ControlMessage.decode(data)
    if msg.type != ControlType.SERVICE_REQUEST:
        raise MalformedMessage(f"{msg.type.name} is not a service request")
    client, seq = msg.body.get("client"), msg.body.get("seq")
    if not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_LEN:
        raise MalformedMessage(f"service request without a client id of 1 to {MAX_CLIENT_LEN} "
                               f"characters: {client!r:.80}")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise MalformedMessage(f"service request without a seq in [0, {MAX_SEQ}]: {seq!r:.80}")
    return msg


class CheckpointError(AgentError):
    """The object's state cannot be checkpointed: it is not strict JSON (NaN, infinity, a
    type JSON has not). The router is answered with this and the object keeps serving."""


def _pending_requests(raw: Any) -> list[tuple[ControlMessage, tuple[str, int]]]:
    """A checkpoint's pending requests, each checked like one from the wire."""
    if not isinstance(raw, list) or len(raw) > MAX_QUEUE:
        raise ValueError(f"checkpoint: pending is not a list of at most {MAX_QUEUE} requests")
    out = []
    for item in raw:
        try:
            txid, body, (host, port) = item
            if isinstance(txid, bool) or not isinstance(txid, int) or not isinstance(body, dict) \
                    or not isinstance(host, str) or isinstance(port, bool) \
                    or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
                raise ValueError("wrong types")
            msg = ControlMessage(ControlType.SERVICE_REQUEST, txid, body)
            parse_request(msg.encode())
        except (TypeError, ValueError, MalformedMessage) as exc:
            raise ValueError(f"checkpoint: a pending request is malformed: {exc}") from None
        out.append((msg, (host, port)))
    return out


#: Where a reply goes: a UDP source address, a TCP connection, or nowhere (None).
ReplyTo = Union[Tuple[Any, ...], StreamPeer, None]


class ObjectServer(asyncio.DatagramProtocol):
    """Requests in, replies out, with the dedup filter and the warm-up queue.

    It is the UDP endpoint's protocol, and :meth:`serve_stream` is the TCP server's
    connection callback: both feed :meth:`_accept`.
    """

    def __init__(self, obj: MobileObject, name: str, router: str, warm: bool,
                 extensible: bool = True, leased: bool = False) -> None:
        self.obj = obj
        #: Requests must carry a valid service credential (Fig. 10, 164); None: open service.
        self.credentials: CredentialCheck | None = CredentialCheck() if leased else None
        #: Lifecycle policy: may another service use this one? (requests naming a
        #: ``from_service`` are refused when not)
        self.extensible = extensible
        self.name = name
        self.router = router
        self.instance = uuid.uuid4().hex[:8]
        self.warming = warm
        self.queue: list[tuple[ControlMessage, ReplyTo]] = []
        #: At-most-once memory per client, bounded (agent.hosting.at_most_once).
        self.seen = RequestMemory()
        #: Requests per source network (/24), for placing duplicates near the traffic.
        self.by_network: dict[str, int] = {}
        # too_large: UDP replies replaced by the "ask again over TCP" reply; dropped: requests
        # the warm-up queue had no room for; tcp_refused: connections over max_streams.
        self.stats = {"served": 0, "duplicates": 0, "stale": 0, "malformed": 0, "errors": 0,
                      "queued": 0, "too_large": 0, "dropped": 0, "tcp_refused": 0,
                      "refused": 0, "left_to_sibling": 0, "seq_refused": 0,
                      "started": time.time()}
        self.transport: asyncio.DatagramTransport | None = None
        #: The UDP service socket itself (start_service), read directly by :meth:`drain`.
        self.udp_socket: socket.socket | None = None
        #: Open TCP connections; bounds (attributes so that tests can shrink them).
        self.streams: set[StreamPeer] = set()
        self.max_streams = MAX_STREAMS
        self.idle_timeout = STREAM_IDLE_TIMEOUT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            msg = parse_request(data)
        except MalformedMessage as exc:
            self.stats["malformed"] += 1
            log.debug("bad request from %s: %s", addr, exc)
            return
        self._accept(msg, addr)

    def _accept(self, msg: ControlMessage, dest: ReplyTo) -> None:
        """A well-formed request from either transport: serve it, or queue it while warm."""
        if not self.warming:
            self._serve(msg, dest)
            return
        if len(self.queue) >= MAX_QUEUE or (
                isinstance(dest, StreamPeer) and dest.pending >= MAX_STREAM_PENDING):
            self.stats["dropped"] += 1
            return
        self.queue.append((msg, dest))
        self.stats["queued"] += 1
        if isinstance(dest, StreamPeer):
            dest.queued()

    def _count_source(self, dest: ReplyTo) -> None:
        """Requests per source network (/24): where the object's traffic comes from, which
        its router weighs when it places a duplicate (Fig. 12: optimise the service's
        path). Bounded: networks beyond the first :data:`MAX_NETWORKS` count as "other"."""
        host = _source(dest)
        try:
            network = str(ipaddress.ip_network(f"{host}/24", strict=False)) if host else "other"
        except ValueError:
            network = "other"
        if network not in self.by_network and len(self.by_network) >= MAX_NETWORKS:
            network = "other"
        self.by_network[network] = self.by_network.get(network, 0) + 1

    async def serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection (the ``asyncio.start_server`` callback): requests back to back,
        each through the same path as a datagram, replies back on this connection. A
        malformed frame is counted and closes this connection, never the object."""
        if len(self.streams) >= self.max_streams:
            self.stats["tcp_refused"] += 1
            log.info("object %s: %d TCP connections open, refusing %s", self.name,
                     len(self.streams), writer.get_extra_info("peername"))
            writer.transport.abort()
            return
        peer = StreamPeer(writer)
        self.streams.add(peer)
        try:
            await self._read_stream(reader, peer)
        except (ConnectionError, OSError) as exc:  # reset by the client: nothing to answer
            log.debug("TCP client %s: %r", peer.label, exc)
        finally:
            self.streams.discard(peer)
            writer.close()  # replies already written still go out before the FIN

    async def _read_stream(self, reader: asyncio.StreamReader, peer: StreamPeer) -> None:
        while True:
            try:  # readexactly consumes nothing until it has it all: a timeout loses no byte
                head = await asyncio.wait_for(reader.readexactly(HEADER.size), self.idle_timeout)
            except asyncio.TimeoutError:
                if peer.pending:
                    continue  # its requests wait for the state: not idle
                log.debug("TCP client %s idle for %.0f s: closing", peer.label, self.idle_timeout)
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    self.stats["malformed"] += 1
                    log.info("TCP client %s closed within a header", peer.label)
                    return
                await peer.settled()  # end of requests: answer the queued ones, then close
                return
            try:
                rest = await asyncio.wait_for(reader.readexactly(frame_length(head) - HEADER.size),
                                              self.idle_timeout)
                msg = parse_request(head + rest)
            except (MalformedMessage, asyncio.IncompleteReadError) as exc:
                self.stats["malformed"] += 1
                log.info("malformed request from TCP client %s, closing: %s", peer.label, exc)
                return
            except asyncio.TimeoutError:
                log.info("TCP client %s sent half a request in %.0f s: closing", peer.label,
                         self.idle_timeout)
                return
            self._accept(msg, peer)
            await peer.writer.drain()  # a client that does not read is not read either

    def _serve(self, msg: ControlMessage, dest: ReplyTo, replay: bool = False) -> None:
        client, seq = str(msg.body["client"]), int(msg.body["seq"])
        if self.credentials is not None:
            # Before the filter: a refusal is not remembered (the client may retry the same
            # seq with a credential), and a duplicate is not answered to one without.
            reason = self.credentials.refusal(msg.body.get("credential"), _source(dest))
            if reason is not None:
                self.stats["refused"] += 1
                self.credentials.refused[reason] += 1
                if self.credentials.silent(reason):
                    # Bicast: every instance of the service gets this request; the one the
                    # credential names (or, for a bad one, the primary) answers, once.
                    self.stats["left_to_sibling"] += 1
                    return
                self._reply(msg.txid, {"ok": False, "error": f"credential refused: {reason}",
                                       "credential_error": reason, "client": client, "seq": seq},
                            dest)
                return
            msg = ControlMessage(msg.type, msg.txid,
                                 {k: v for k, v in msg.body.items() if k != "credential"})
        self._count_source(dest)  # what this instance serves (not a sibling's, under bicast)
        verdict, remembered = self.seen.check(client, seq)
        if verdict is Verdict.DUPLICATE:
            # A queued UDP request the checkpoint already answered was answered by the other
            # instance (bicast): no second reply. A TCP connection reached only this
            # instance, so a duplicate on it is answered (the retry of a too_large reply).
            if not replay or isinstance(dest, StreamPeer):
                self.stats["duplicates"] += 1
                self._reply(msg.txid, remembered or {}, dest)
            else:
                self.stats["stale"] += 1
            return
        if verdict is Verdict.STALE:
            self.stats["stale"] += 1
            return
        if verdict is Verdict.AHEAD:
            # Not served and not remembered: one spoofed request cannot move the filter.
            self.stats["seq_refused"] += 1
            self._reply(msg.txid, {"ok": False, "client": client, "seq": seq, "seq_error": "ahead",
                                   "error": f"seq {seq} is too far ahead of this client's "
                                            "last: refused"}, dest)
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
        try:
            size = encoded_size(body)
        except (TypeError, ValueError, RecursionError) as exc:
            # A reply that is not JSON (NaN, a set) is never remembered as such: the memory
            # travels in the checkpoint, which must stay strict JSON.
            self.stats["errors"] += 1
            log.warning("object %s: its reply to %s seq %d is not JSON: %s", self.name,
                        client, seq, exc)
            body = {"ok": False, "error": f"object error: its reply is not JSON: {exc}",
                    "client": client, "seq": seq}
            size = encoded_size(body)
        self.seen.remember(client, seq, body, size)  # a huge reply: remembered as a short error
        self.stats["served"] += 1
        self._reply(msg.txid, body, dest)

    def _reply(self, txid: int, body: dict, dest: ReplyTo) -> None:
        if dest is None:
            return
        out = dict(body, served_by=self.router, instance=self.instance, at=time.time())
        data = self._encode_reply(txid, out)
        if isinstance(dest, StreamPeer):
            dest.send(data)
            return
        if self.transport is None:
            return
        if len(data) > UDP_REPLY_LIMIT:
            # The full reply stays in self.seen: the same (client, seq) over TCP gets it as a
            # duplicate, without running the request again.
            self.stats["too_large"] += 1
            notice = {"ok": False, "too_large": len(data),
                      "error": f"reply of {len(data)} bytes is too large for UDP: ask again over TCP"}
            data = self._encode_reply(txid, self._stamped(notice, out))
        self.transport.sendto(data, dest)

    @staticmethod
    def _stamped(body: dict, like: dict) -> dict:
        """``body`` with the client, seq and server fields of the reply ``like``."""
        keys = ("client", "seq", "served_by", "instance", "at")
        return dict(body, **{k: like[k] for k in keys if k in like})

    def _encode_reply(self, txid: int, out: dict) -> bytes:
        """The reply on the wire; one that cannot be encoded (bigger than the framing's 1 MiB
        body, or not JSON) becomes an error reply saying why, so the client is not left
        waiting and the server does not fail on every duplicate of it."""
        try:
            return ControlMessage(ControlType.SERVICE_REPLY, txid, out).encode()
        except (MalformedMessage, TypeError, ValueError) as exc:  # MalformedMessage: too big
            log.warning("object %s: reply to %s seq %s cannot be sent: %s", self.name,
                        out.get("client"), out.get("seq"), exc)
            error = {"ok": False, "error": f"the object's reply cannot be sent: {exc}"}
            return ControlMessage(ControlType.SERVICE_REPLY, txid, self._stamped(error, out)).encode()

    # --- state ---------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """A JSON copy: it must not change when this instance serves the next request, and an
        object whose state is not strict JSON (NaN, a set) fails here, at its origin, with a
        :class:`CheckpointError`, not at the target or halfway through a move."""
        # Requests received but not served yet (a held or warm instance) travel too: the
        # next instance answers them, so a request that reached this one is not lost.
        pending = [[m.txid, m.body, list(a)] for m, a in self.queue if isinstance(a, tuple)]
        try:
            state = {"object": self.obj.get_state(), "seen": self.seen.to_json(),
                     "served": self.stats["served"], "pending": pending}
            if self.credentials is not None and len(self.credentials.revocations):
                # Cancelled leases move with the object: its next process must not honour them.
                state["revocations"] = self.credentials.revocations.as_dict()
            return json.loads(json.dumps(state, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"object {self.name}: its state cannot be checkpointed "
                                  f"(not strict JSON): {exc}") from None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a checkpoint from another router: every field checked
        first; a bad one raises ValueError and changes nothing)."""
        if not isinstance(state, dict) or "object" not in state:
            raise ValueError("checkpoint: not an object with an 'object' state")
        served = state.get("served", 0)
        if isinstance(served, bool) or not isinstance(served, int) or served < 0:
            raise ValueError(f"checkpoint: served must be a count, not {served!r:.80}")
        pending = _pending_requests(state.get("pending", []))
        seen = RequestMemory(self.seen.max_clients, self.seen.max_bytes, self.seen.reply_limit)
        seen.merge(state.get("seen", {}))  # validates (ValueError) before anything changes
        self.obj.set_state(state["object"])
        # Transactions served travel with the object: a lifecycle limit counts the service's
        # use, wherever (and in whichever version) it ran.
        self.stats["served"] += served
        self.seen.merge(state.get("seen", {}))
        if self.credentials is not None and state.get("revocations"):
            self.credentials.revoke(state["revocations"])
        for entry in pending:
            if len(self.queue) < MAX_QUEUE:
                self.queue.append(entry)

    def hold(self) -> int:
        """Stop serving, keep receiving: requests queue (and go into the checkpoint) while
        the router takes the home address away, after which a reply could not be sent from
        it any more. Returns how many were queued already."""
        self.warming = True
        return len(self.queue)

    def drain(self) -> int:
        """Held or warm: read what the kernel still keeps for the UDP socket, so that it
        queues (and goes into the checkpoint) now. The loop reads one datagram per turn, and
        the router asks for the final checkpoint right after taking the home address away:
        a request delivered before that but not read yet was lost with the process. After
        the address went nothing new arrives, so this read catches the last one. Returns
        how many were read (at most :data:`MAX_QUEUE`)."""
        sock = self.udp_socket
        if sock is None or not self.warming:
            return 0
        read = 0
        while read < MAX_QUEUE:
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("object %s: reading its socket at a hold failed: %s", self.name, exc)
                break
            read += 1
            self.datagram_received(data, addr)
        return read

    def serve(self) -> int:
        """Leave warm-up: replay the queue through the filter, then serve live."""
        queued, self.queue = self.queue, []
        self.warming = False
        # Per client in sequence order (a previous instance's pending requests and this
        # one's queue interleave); the sort is stable and clients are independent.
        queued.sort(key=lambda entry: int(entry[0].body["seq"]))
        for msg, dest in queued:
            if isinstance(dest, StreamPeer):
                dest.dequeued()
            self._serve(msg, dest, replay=True)
        return len(queued)


def control_commands(server: ObjectServer, stop: asyncio.Event
                     ) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """What the router may ask of this process over the socketpair."""

    def set_state(args: dict[str, Any]) -> dict[str, int]:
        server.restore(args["state"])
        return {"replayed": server.serve() if args.get("serve", True) else 0}

    def stats(_args: dict[str, Any]) -> dict[str, Any]:
        out = dict(server.stats, warming=server.warming, instance=server.instance,
                   pid=os.getpid(), state=server.obj.get_state(),
                   leased=server.credentials is not None, by_network=dict(server.by_network),
                   at_most_once={"clients": len(server.seen), "bytes": server.seen.nbytes,
                                 "evicted": server.seen.evicted})
        if server.credentials is not None:
            out["credentials"] = server.credentials.describe()
        return out

    def check(_args: dict[str, Any]) -> CredentialCheck:
        if server.credentials is None:
            raise ValueError(f"object {server.name} is not leased: it takes no credentials")
        return server.credentials

    def credentials(args: dict[str, Any]) -> dict[str, Any]:
        check(args).configure(args.get("service"), args.get("instance"), args.get("key"),
                              args.get("part", "primary"), args.get("networks", []),
                              args.get("aliases", []))
        return {"service": args["service"], "instance": args["instance"]}

    def revoke(args: dict[str, Any]) -> dict[str, int]:
        return {"revocations": check(args).revoke({"revoked": args.get("revoked")})}

    def stop_now(_args: dict[str, Any]) -> dict[str, Any]:
        # The process ends after this answer even when the state cannot be checkpointed
        # (the router is then answered the CheckpointError): a stop always stops.
        stop.set()
        # Held first: a request the loop still reads before the process ends is queued, not
        # answered after the final state was taken (whoever starts from that state would
        # give its count again: an upgrade's duplicate, found by moat run faults).
        server.hold()
        server.drain()
        return server.checkpoint()  # the final state, answered before the process ends

    return {
        "get_state": lambda _args: (server.drain(), server.checkpoint())[1],
        "set_state": set_state,
        "hold": lambda _args: {"queued": server.hold()},
        "serve": lambda _args: {"replayed": server.serve()},
        "stats": stats,
        "stop": stop_now,
        "credentials": credentials,
        "revoke": revoke,
    }


async def control_loop(server: ObjectServer, sock: socket.socket, stop: asyncio.Event) -> None:
    """Obey the router until it says ``stop`` or goes away (end of stream: stop with it)."""
    handler = rpc.command_table(control_commands(server, stop))
    channel = rpc.RpcServer(handler, request_limit=rpc.CHECKPOINT_LINE_LIMIT,
                            answer_limit=rpc.CHECKPOINT_LINE_LIMIT)
    await channel.serve_socket(sock, until=stop)
    stop.set()


def _service_socket(kind: socket.SocketKind, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    try:
        # The home address may be configured a moment after the object starts (or not at
        # all yet during a make-before-break move): bind anyway.
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:  # a restarted object rebinds over TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


async def start_service(server: ObjectServer, address: str, port: int
                        ) -> tuple[asyncio.DatagramTransport, asyncio.AbstractServer | None]:
    """Serve ``server`` on UDP and TCP ``address:port``.

    Port 0 (tests) picks one ephemeral port free for both. UDP is the service itself, so a
    UDP bind failure raises; a TCP one is logged and the object serves UDP alone (an object
    that started before TCP service existed must still start), without replies over 64 KB.
    """
    loop = asyncio.get_running_loop()
    if port == 0:
        for _ in range(20):
            tcp = _service_socket(socket.SOCK_STREAM, address, 0)
            try:
                udp = _service_socket(socket.SOCK_DGRAM, address, tcp.getsockname()[1])
                break
            except OSError:
                tcp.close()
        else:
            raise OSError(f"no port free for both UDP and TCP on {address}")
        tcp_sock: socket.socket | None = tcp
    else:
        udp = _service_socket(socket.SOCK_DGRAM, address, port)
        try:
            tcp_sock = _service_socket(socket.SOCK_STREAM, address, port)
        except OSError as exc:
            log.warning("object %s: no TCP on %s:%d (%s): replies over %d bytes cannot be "
                        "fetched", server.name, address, port, exc, UDP_REPLY_LIMIT)
            tcp_sock = None
    transport, _ = await loop.create_datagram_endpoint(lambda: server, sock=udp)
    server.udp_socket = udp
    tcp_server = None
    if tcp_sock is not None:
        tcp_server = await asyncio.start_server(server.serve_stream, sock=tcp_sock)
    return transport, tcp_server  # type: ignore[return-value]


async def run(args: argparse.Namespace) -> int:
    obj = load_object(args.spec)
    server = ObjectServer(obj, args.name, args.router, args.warm, extensible=not args.not_extensible,
                          leased=args.leased)
    if args.state:
        server.restore(json.loads(args.state))
    _transport, tcp_server = await start_service(server, args.address, args.port)
    stop = asyncio.Event()
    ctl = socket.socket(fileno=args.control_fd)
    log.info("object %s (%s) serving on %s:%d (UDP%s), warm=%s", args.name, args.spec,
             args.address, args.port, "" if tcp_server is None else " and TCP", args.warm)
    await control_loop(server, ctl, stop)
    if tcp_server is not None:
        tcp_server.close()  # open connections close as run() returns
    return 0


_parser: argparse.ArgumentParser | None = None
LOG_FORMAT = "%(asctime)s object %(name)s %(levelname)s %(message)s"


def arg_parser() -> argparse.ArgumentParser:
    """The runner's argument parser, built once per process: the object fork server builds
    it before it forks (half a millisecond of every forked object's start, issue 14)."""
    global _parser
    if _parser is None:
        _parser = _build_parser()
    return _parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.hosting.runner")
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
    parser.add_argument("--leased", action="store_true",
                        help="serve only requests with a valid service credential (the key "
                             "arrives over the control socket: until then, refuse all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
