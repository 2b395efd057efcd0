"""The corresponding object's side of the service broker (patent Fig. 12, steps 200-208 and
228-230), run inside a CO host: ``python -m nodetools.co ...``, one JSON line per command.

A CO that wants a service does, in the patent's order:

1. **find the broker** with no configuration (step 200): listen for a BROKER_ADVERT (UDP
   4340, to 224.0.0.1, sent by every router of a run with a broker), or send a
   BROKER_SOLICIT to 224.0.0.2 and to its LAN's broadcast address and take the first answer
   (:func:`discover_broker`, always bounded in time);
2. **lease** a service or a goal (``"text -> rtf"``, steps 202-208) from the broker with
   :class:`BrokerClient`: every message is one in-band exchange on TCP 4340 carrying an HMAC
   under the CO's own key (``auth.key_id`` = the CO's id, which the broker binds the lease
   to), with a fresh random transaction id; a refusal is a :class:`BrokerRefused` with the
   broker's machine-readable ``reason`` (``no_capacity``, ``unknown_service``,
   ``bad_credentials``, ``unknown_lease``, ``bad_request``, ...);
3. **use** it: :meth:`BrokerClient.call` sends a SERVICE_REQUEST to a hop's address and port
   with the hop's service credential (Fig. 10, 164); :meth:`BrokerClient.run_path` feeds each
   hop's result to the next hop, so a document crosses the whole dynamic service path;
4. **renew** while it is needed (:meth:`BrokerClient.keep`, Jini's renewal manager from
   :mod:`agent.broker.renewal`) and **cancel** when done (step 230: the broker frees the share
   and revokes the credential at once).

The key never appears on a command line: ``--keys FILE`` names the run's root-only key file
(``co_keys.json``, host -> hex key) and ``--co ID`` which key is ours. Exit status 0 with
``{"ok": false, "error", "reason", ...}`` is a refusal (by the broker or a service), 2 a usage
error; anything printed is one JSON line, like :mod:`nodetools.probes`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import logging
import math
import secrets
import select
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from packets import ControlMessage, ControlType, MalformedMessage
from packets.codes import CONTROL_PORT

from agent.broker import wire
from agent.broker.broker import Grant, HopGrant
from agent.broker.errors import BadRequest, BrokerError, LeaseDenied, UnknownLease
from agent.broker.leases import ANY, Duration, check_duration
from agent.broker.renewal import LeaseRenewalManager, ManagedLease, Renewal
from agent.core.msgauth import MessageAuthError, ReplayCache, sign_hmac, strip, verify_hmac
from agent.core.peer import PeerError, PeerRefused, peer_call
from agent.core.wait import WaitTimeout, wait_until
from nodetools import probes

log = logging.getLogger(__name__)

#: The type of the broker's answer to each request (the others answer in their own type).
ANSWER_TYPES = {ControlType.LEASE_REQUEST: ControlType.LEASE_GRANT}

ALL_SYSTEMS = "224.0.0.1"
ALL_ROUTERS = "224.0.0.2"
#: How long discovery waits by default: a few advertisement intervals of a default run.
DISCOVER_TIMEOUT = 3.0
#: One exchange with the broker, seconds.
BROKER_TIMEOUT = 40.0
#: One service request (each hop), seconds.
SERVICE_TIMEOUT = 10.0
#: An advertisement is a header and a small body; bigger datagrams are not decoded.
MAX_ADVERT = 2048
#: The longest a renewal loop runs, whatever it is asked (seconds).
MAX_KEEP_S = 3600.0
#: Request field of each document format a converter consumes or produces; a format not
#: listed is its own field name ("text", "html", "rtf"). Binary formats travel as base64.
FORMAT_FIELDS = {"word": "docx_b64", "docx": "docx_b64"}
BINARY_FIELDS = frozenset({"docx_b64"})
#: Linux's IP_PKTINFO (the socket module does not always export it).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


# --- errors --------------------------------------------------------------------------------


class CoError(Exception):
    """Base class: something a corresponding object could not get done; ``reason`` is a
    machine-readable code (the broker's or the service's when they gave one)."""

    reason = "error"

    def as_dict(self) -> dict[str, Any]:
        return {"ok": False, "error": str(self), "kind": type(self).__name__,
                "reason": self.reason}


class BrokerNotFound(CoError):
    """No broker advertisement arrived within the time allowed (step 200 failed)."""

    reason = "no_broker"


class BrokerUnreachable(CoError):
    """The broker did not answer (connection refused, timed out, garbled answer)."""

    reason = "unreachable"


class BrokerRefused(CoError):
    """The broker answered ``ok: false``: ``reason`` is its code, ``detail`` its words."""

    def __init__(self, reason: str, detail: str = "", error: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.error = error
        super().__init__(f"broker refused: {reason}" + (f" ({detail})" if detail else ""))

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> "BrokerRefused":
        """From a refusal on the wire; an answer without a code reads ``refused``."""
        reason = answer.get("reason")
        detail = answer.get("detail")
        error = answer.get("error")
        return cls(reason if isinstance(reason, str) and wire.NAME_RE.fullmatch(reason) else "refused",
                   detail[:500] if isinstance(detail, str) else "",
                   error[:500] if isinstance(error, str) else "")

    def as_broker_error(self) -> BrokerError:
        """The same refusal as the broker's own error class: what
        :class:`~agent.broker.renewal.LeaseRenewalManager` takes for a definite failure."""
        if self.reason == "unknown_lease":
            return UnknownLease(self.detail or "no such lease")
        if self.reason in LeaseDenied.REASONS:
            return LeaseDenied(self.reason, self.detail)
        return BadRequest(f"{self.reason}: {self.detail}")

    def as_dict(self) -> dict[str, Any]:
        return dict(super().as_dict(), detail=self.detail)


class ServiceRefused(CoError):
    """A hop's object refused a request: ``reason`` is its ``credential_error`` (``revoked``,
    ``expired``, ``forged``, ...) or ``service_error`` (the object's own refusal), or
    ``no_reply``."""

    def __init__(self, hop: HopGrant, reason: str, error: str) -> None:
        self.hop = hop
        self.reason = reason
        self.error = error
        super().__init__(f"{hop.service} at {hop.address}:{hop.port} refused: {error}")

    def as_dict(self) -> dict[str, Any]:
        return dict(super().as_dict(), service=self.hop.service, lease_id=self.hop.lease_id)


# --- step 200: finding the broker -------------------------------------------------------------


@dataclass(frozen=True)
class Advert:
    """A broker advertisement as heard: where the broker is, who sent it, and how it came
    (``advertisement``: the periodic multicast; ``solicited``: the answer to ours)."""

    broker: str
    port: int
    router: str
    sequence: int
    interval: float
    sender: str
    how: str
    delay: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_advert(data: bytes) -> dict[str, Any] | None:
    """The fields of a BROKER_ADVERT datagram, checked; None for anything else (another
    control message, a garbled or oversized datagram: a LAN carries all sorts)."""
    if len(data) > MAX_ADVERT:
        return None
    try:
        msg = ControlMessage.decode(data)
    except MalformedMessage:
        return None
    if msg.type != ControlType.BROKER_ADVERT:
        return None
    body = msg.body
    try:
        broker = wire.text(body, "broker", "advert", max_len=64)
        ipaddress.IPv4Address(broker)
        return {"broker": broker,
                "port": wire.integer(body, "port", "advert", lo=1, hi=65535),
                "router": wire.name(body, "router", "advert"),
                "sequence": wire.integer(body, "sequence", "advert", lo=0, hi=0xFFFFFFFF),
                "interval": wire.number(body, "interval", "advert", gt=0)}
    except (BadRequest, ValueError):
        return None


def ipv4_interfaces() -> list[tuple[str, str, str | None]]:
    """This host's IPv4 interfaces other than loopback: (name, address, broadcast)."""
    import fcntl

    siocgifaddr, siocgifbrdaddr = 0x8915, 0x8919
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifaddr, req)[20:24])
            except OSError:
                continue  # no IPv4 address
            if addr.startswith("127."):
                continue
            try:
                brd: str | None = socket.inet_ntoa(fcntl.ioctl(s.fileno(), siocgifbrdaddr, req)[20:24])
            except OSError:
                brd = None
            out.append((name, addr, brd if brd and brd != "0.0.0.0" else None))
    return out


def _listener(port: int = CONTROL_PORT) -> socket.socket:
    """UDP 4340 on every address, in 224.0.0.1 on every interface, with the destination of
    each datagram (IP_PKTINFO) so an answer can be told from a multicast advertisement."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind(("0.0.0.0", port))
        for _name, address, _brd in ipv4_interfaces():
            mreq = socket.inet_aton(ALL_SYSTEMS) + socket.inet_aton(address)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            except OSError as exc:  # already a member (the kernel always is of 224.0.0.1)
                log.debug("joining %s on %s: %s", ALL_SYSTEMS, address, exc)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def solicit(sock: socket.socket, port: int = CONTROL_PORT) -> int:
    """Send one BROKER_SOLICIT on every interface, to 224.0.0.2 and to its broadcast
    address; return how many left (an interface that cannot send is skipped)."""
    data = ControlMessage(ControlType.BROKER_SOLICIT, secrets.randbits(32), {}).encode()
    sent = 0
    for name, address, brd in ipv4_interfaces():
        targets = [ALL_ROUTERS] + ([brd] if brd else [])
        for target in targets:
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
                sock.sendto(data, (target, port))
                sent += 1
            except OSError as exc:
                log.info("solicitation on %s to %s: %s", name, target, exc)
    return sent


def _receive(sock: socket.socket) -> tuple[bytes, str, str] | None:
    """One datagram: (data, sender, destination address), or None if none is waiting."""
    try:
        data, ancillary, _flags, addr = sock.recvmsg(MAX_ADVERT + 1, socket.CMSG_SPACE(12))
    except BlockingIOError:
        return None
    dest = ""
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
            dest = socket.inet_ntoa(value[8:12])
    return data, addr[0], dest


def discover_broker(timeout: float = DISCOVER_TIMEOUT, mode: str = "both",
                    port: int = CONTROL_PORT) -> Advert:
    """The first broker advertisement heard within ``timeout`` seconds.

    ``mode``: ``listen`` only waits for the periodic advertisements, ``solicit`` and ``both``
    also send a solicitation at once (whatever answers first wins). :class:`BrokerNotFound`
    when nothing came. ``port`` is the protocol's (UDP 4340) but for tests.
    """
    if mode not in ("listen", "solicit", "both"):
        raise ValueError(f"mode must be listen, solicit or both, not {mode!r}")
    start = time.monotonic()
    with _listener(port) as sock:
        if mode != "listen":
            solicit(sock, port)

        def heard() -> Advert | None:
            if not select.select([sock], [], [], 0.05)[0]:
                return None
            while (got := _receive(sock)) is not None:
                data, sender, dest = got
                fields = parse_advert(data)
                if fields is None:
                    continue
                multicast = bool(dest) and ipaddress.IPv4Address(dest).is_multicast
                return Advert(**fields, sender=sender,
                              how="advertisement" if multicast else "solicited",
                              delay=round(time.monotonic() - start, 4))
            return None

        try:
            return wait_until(heard, timeout, interval=0.0, what="a broker advertisement")
        except WaitTimeout:
            raise BrokerNotFound(f"no broker advertisement within {timeout:g}s "
                                 f"({'listening' if mode == 'listen' else 'after soliciting'})"
                                 ) from None


def own_address(towards: str) -> str:
    """The address this host sends from towards ``towards`` (no packet is sent): the
    ``co_address`` the broker measures network distance from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((towards, CONTROL_PORT))
        return str(s.getsockname()[0])


# --- documents along a path -------------------------------------------------------------------


def field_of(fmt: str) -> str:
    """The request/reply field that carries a document of format ``fmt``."""
    return FORMAT_FIELDS.get(fmt, fmt)


def document_for(fmt: str, data: bytes) -> dict[str, Any]:
    """The first hop's request body for a file of format ``fmt`` (text formats as UTF-8,
    binary ones as base64)."""
    key = field_of(fmt)
    if key in BINARY_FIELDS:
        return {key: base64.b64encode(data).decode()}
    return {key: data.decode("utf-8")}


def output_of(fmt: str, result: dict[str, Any]) -> bytes:
    """The document of format ``fmt`` in the last hop's result, as file bytes."""
    value = result.get(field_of(fmt))
    if not isinstance(value, str):
        raise CoError(f"the last hop's result has no {field_of(fmt)!r} string "
                      f"(fields: {sorted(result)})")
    if field_of(fmt) in BINARY_FIELDS:
        return base64.b64decode(value, validate=True)
    return value.encode("utf-8")


# --- steps 202-230: the broker client ---------------------------------------------------------


#: Instances a CO measures before a request, at most, and how long one handshake may take.
MAX_MEASURED = 32
MEASURE_TIMEOUT = 0.5


async def measure_costs(services: list[dict[str, Any]], timeout: float = MEASURE_TIMEOUT
                        ) -> dict[str, float]:
    """The CO's measured cost to each instance the broker lists: the TCP handshake round trip
    (ms) to the instance's service address and port (objects serve TCP there), all at once.
    An instance that does not answer within ``timeout`` is left out."""
    targets = [(str(i["instance_id"]), str(i["address"]), int(i["port"]))
               for s in services for i in s.get("instances", [])
               if isinstance(i, dict) and {"instance_id", "address", "port"} <= set(i)]

    async def one(iid: str, address: str, port: int) -> tuple[str, float] | None:
        start = time.perf_counter()
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        except (OSError, asyncio.TimeoutError, ValueError):
            return None
        rtt_ms = (time.perf_counter() - start) * 1000
        writer.close()
        return iid, round(rtt_ms, 3)

    found = await asyncio.gather(*(one(*t) for t in targets[:MAX_MEASURED]))
    return dict(f for f in found if f is not None)


class BrokerClient:
    """One corresponding object talking to the broker and to the services it leases.

    ``co_id`` is the CO's id (the ``key_id`` of its HMAC, the holder of its leases) and
    ``key`` its key. Each method is one exchange; ``a*`` are the coroutine forms (for the
    renewal loop), the others run them to completion.
    """

    def __init__(self, broker_address: str, co_id: str, key: bytes, *,
                 port: int = CONTROL_PORT, timeout: float = BROKER_TIMEOUT,
                 co_address: str | None = None) -> None:
        wire.check_name(co_id, "CO id")
        if not key:
            raise ValueError("a CO needs a key")
        self.broker_address = broker_address
        self.co_id = co_id
        self._key = key
        self.port = port
        self.timeout = timeout
        self._co_address = co_address
        self._replays = ReplayCache()
        #: Service requests carry (client, seq) for the objects' at-most-once filter.
        self.client = f"{co_id}-{secrets.token_hex(4)}"
        self.seq = 0

    @property
    def co_address(self) -> str:
        if self._co_address is None:
            self._co_address = own_address(self.broker_address)
        return self._co_address

    async def _exchange(self, ctype: ControlType, body: dict[str, Any]) -> dict[str, Any]:
        txid = secrets.randbits(32)
        # For the broker at the address it is sent to (issue 12: a receiver is signed for).
        signed = sign_hmac(ctype, txid, body, self._key, key_id=self.co_id,
                           to=self.broker_address)
        try:
            answer = await peer_call(self.broker_address, ctype, signed, timeout=self.timeout,
                                     txid=txid, port=self.port)
        except PeerRefused as exc:
            raise BrokerRefused.from_answer(exc.answer) from None
        except PeerError as exc:
            raise BrokerUnreachable(str(exc)) from None
        return self._authentic(ANSWER_TYPES.get(ctype, ctype), txid, answer)

    def _authentic(self, answer_type: ControlType, txid: int, answer: dict[str, Any]
                   ) -> dict[str, Any]:
        """An accepted answer only if the broker signed it for this CO (HMAC under this CO's
        key over the answer's type, our transaction id and the body, for this CO's id; fresh
        nonce): a host advertising itself as the broker cannot hand out grants."""
        try:
            verify_hmac(answer_type, txid, answer, self._key, self._replays, to={self.co_id})
        except MessageAuthError as exc:
            raise BrokerUnreachable(f"an answer not from the broker: {exc}") from None
        return strip(answer)

    async def alist_services(self) -> list[dict[str, Any]]:
        answer = await self._exchange(ControlType.SERVICE_LIST, {})
        services = answer.get("services")
        if not isinstance(services, list) or not all(isinstance(s, dict) for s in services):
            raise BrokerUnreachable("the broker's service list is not a list of services")
        return services

    async def arequest(self, target: str, share: float, cpu: float,
                       duration: Duration = ANY, measure: bool = False) -> Grant:
        """With ``measure`` the request carries this CO's measured round trips to the listed
        instances (:func:`measure_costs`), which the broker then prefers to its hop counts."""
        body: dict[str, Any] = {"request": {"target": target, "share": share, "cpu": cpu,
                                            "duration": duration},
                                "co_address": self.co_address}
        if measure:
            body["costs"] = await measure_costs(await self.alist_services())
        answer = await self._exchange(ControlType.LEASE_REQUEST, body)
        return _checked(Grant.from_dict, answer.get("grant"))

    async def arenew(self, lease_id: str, duration: Duration = ANY) -> HopGrant:
        answer = await self._exchange(ControlType.LEASE_RENEW,
                                      {"lease_id": lease_id, "duration": duration})
        return _checked(HopGrant.from_dict, answer.get("hop"))

    async def acancel(self, lease_id: str) -> str:
        answer = await self._exchange(ControlType.LEASE_CANCEL, {"lease_id": lease_id})
        return str(answer.get("lease_id", lease_id))

    def list_services(self) -> list[dict[str, Any]]:
        """The broker's directory (service name list 160 with each instance's usage)."""
        return asyncio.run(self.alist_services())

    def request(self, target: str, share: float, cpu: float, duration: Duration = ANY,
                measure: bool = False) -> Grant:
        """Lease ``share`` % and ``cpu`` cores of a service or a goal for ``duration``
        seconds (or ``"any"``): the grant, one hop per service of the path."""
        return asyncio.run(self.arequest(target, share, cpu, duration, measure))

    def renew(self, lease_id: str, duration: Duration = ANY) -> HopGrant:
        """Renew one lease (Jini: now + the newly granted duration); its hop, with a new
        credential carrying the new expiry."""
        return asyncio.run(self.arenew(lease_id, duration))

    def cancel(self, lease_id: str) -> str:
        """End one lease now (step 230)."""
        return asyncio.run(self.acancel(lease_id))

    # --- using the leased services ----------------------------------------------------------

    def call(self, hop: HopGrant, body: dict[str, Any],
             timeout: float = SERVICE_TIMEOUT) -> dict[str, Any]:
        """One SERVICE_REQUEST to ``hop`` with its credential; the object's result.
        UDP first, TCP when the reply (or the request) is too large for a datagram."""
        self.seq += 1
        request = {**body, "client": self.client, "seq": self.seq, "credential": hop.credential}
        reply = probes.service(hop.address, hop.port, request, timeout)
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return reply["result"]
        error = str(reply.get("error", "no result"))[:500]
        coded = reply.get("credential_error")
        if isinstance(coded, str) and wire.NAME_RE.fullmatch(coded):
            raise ServiceRefused(hop, coded, error)
        raise ServiceRefused(hop, "no_reply" if error.startswith("no reply") else "service_error",
                             error)

    def run_path(self, grant: Grant, document: dict[str, Any],
                 timeout: float = SERVICE_TIMEOUT) -> dict[str, Any]:
        """Feed ``document`` to the first hop and each hop's result to the next (the
        converters name their input after their output: ``{"html"}`` in, ``{"rtf"}`` out);
        the last hop's result."""
        result = document
        for hop in grant.hops:
            result = self.call(hop, result, timeout)
        return result

    # --- renewing ----------------------------------------------------------------------------

    async def akeep(self, grant: Grant, for_s: float, renew_duration: Duration = ANY,
                    cancel_at_end: bool = False,
                    on_renewed: Callable[[HopGrant], None] | None = None) -> dict[str, Any]:
        """Keep every lease of ``grant`` alive for ``for_s`` seconds from now (at most
        :data:`MAX_KEEP_S`), renewing each before it expires; a report of the renewals and
        of the failures (a lease the broker no longer knows, or one that expired while the
        broker could not be reached)."""
        if not 0 < for_s <= MAX_KEEP_S or math.isnan(for_s):
            raise ValueError(f"keep for (0, {MAX_KEEP_S:g}] seconds, not {for_s!r}")
        failures: list[dict[str, Any]] = []
        renewed: list[dict[str, Any]] = []

        def lost(lease: ManagedLease, error: BaseException) -> None:
            failures.append({"lease_id": lease.lease_id, "error": str(error),
                             "reason": getattr(error, "reason", type(error).__name__)})

        manager = LeaseRenewalManager(listener=lost)
        now = time.monotonic()
        for hop in grant.hops:
            # The local grant time is its wall-clock expiry seen from here, never later.
            left = max(0.001, min(hop.granted_s, hop.expires_at - time.time()))
            manager.renew_for(hop.lease_id, left, for_s, renew_duration, granted_at=now,
                              cancel_at_end=cancel_at_end, payload=hop)

        async def renew(renewal: Renewal) -> float:
            try:
                hop = await self.arenew(renewal.lease_id, renewal.duration)
            except BrokerRefused as exc:
                raise exc.as_broker_error() from None
            renewed.append({"lease_id": hop.lease_id, "granted_s": hop.granted_s})
            if on_renewed is not None:
                on_renewed(hop)
            return hop.granted_s

        async def cancel(lease: ManagedLease) -> None:
            await self.acancel(lease.lease_id)

        await asyncio.wait_for(manager.run(renew, asyncio.sleep, cancel),
                               for_s + self.timeout + 5)
        return {"ok": not failures, "renewals": renewed, "failures": failures}


def _checked(parse: Callable[[Any], Any], doc: Any) -> Any:
    """A broker answer's part, through the broker's own ``from_dict`` checks."""
    try:
        return parse(doc)
    except BadRequest as exc:
        raise BrokerUnreachable(f"the broker's answer does not parse: {exc.detail}") from None


# --- the command ------------------------------------------------------------------------------


def load_key(path: Path, co_id: str) -> bytes:
    """Our key from the run's key file (host -> hex key)."""
    try:
        keys = json.loads(path.read_text())
        return bytes.fromhex(keys[co_id])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CoError(f"no key for {co_id} in {path}: {exc!r}") from None


def _duration(text: str) -> Duration:
    return ANY if text == ANY else check_duration(float(text))


def _grant_file(path: str) -> Grant:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CoError(f"cannot read the grant {path}: {exc}") from None
    return _checked(Grant.from_dict, doc.get("grant", doc) if isinstance(doc, dict) else doc)


def _call(client: BrokerClient, args: argparse.Namespace) -> dict[str, Any]:
    """``call``: the grant's path on a file; a text result is printed, any result saved."""
    grant = _grant_file(args.grant)
    first, last = grant.hops[0], grant.hops[-1]
    data = Path(args.input).read_bytes()
    if first.consumes:
        document = document_for(first.consumes, data)
    else:
        document = json.loads(data)
        if not isinstance(document, dict):
            raise CoError("a service that converts no format takes a JSON object")
    result = client.run_path(grant, document, args.timeout)
    out: dict[str, Any] = {"ok": True, "hops": [h.service for h in grant.hops]}
    if last.produces:
        output = output_of(last.produces, result)
        out.update(format=last.produces, bytes=len(output))
        if args.output:
            Path(args.output).write_bytes(output)
            out["output"] = args.output
        if field_of(last.produces) not in BINARY_FIELDS:
            out["text"] = output.decode("utf-8")
    else:
        out["result"] = result
    return out


def send_prepared(broker: str, ctype: ControlType, body: dict[str, Any], txid: int,
                  timeout: float = BROKER_TIMEOUT) -> dict[str, Any]:
    """One message exactly as given (already signed, or deliberately not: a replay, a wrong
    key, a malformed body) and the broker's whole answer, refusal codes included."""
    try:
        return asyncio.run(peer_call(broker, ctype, body, timeout=timeout, txid=txid))
    except PeerRefused as exc:
        return exc.answer
    except PeerError as exc:
        raise BrokerUnreachable(str(exc)) from None


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.cmd == "discover":
        return {"ok": True, **discover_broker(args.timeout, args.mode).as_dict()}
    if args.cmd == "send":
        body = json.loads(Path(args.body).read_text())
        if not isinstance(body, dict):
            raise CoError("the body must be a JSON object")
        return send_prepared(args.broker, ControlType[args.type.upper()], body, args.txid)
    key = load_key(Path(args.keys), args.co)
    broker = args.broker or discover_broker(args.discover_timeout).broker
    client = BrokerClient(broker, args.co, key)
    if args.cmd == "list":
        return {"ok": True, "broker": broker, "services": client.list_services()}
    if args.cmd == "request":
        grant = client.request(args.target, args.share, args.cpu, _duration(args.duration),
                               measure=args.measure)
        return {"ok": True, "broker": broker, "grant": grant.as_dict()}
    if args.cmd == "renew":
        return {"ok": True, "hop": client.renew(args.lease, _duration(args.duration)).as_dict()}
    if args.cmd == "cancel":
        return {"ok": True, "lease_id": client.cancel(args.lease)}
    if args.cmd == "keep":
        return asyncio.run(client.akeep(_grant_file(args.grant), args.for_s,
                                        _duration(args.duration), args.cancel_at_end))
    return _call(client, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nodetools.co", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("discover", help="find the broker: listen, solicit, or both")
    p.add_argument("--mode", choices=["listen", "solicit", "both"], default="both")
    p.add_argument("--timeout", type=float, default=DISCOVER_TIMEOUT)

    p = sub.add_parser("send", help="send a prepared (signed or not) message as it is and "
                                    "print the broker's whole answer (tests, experiments)")
    p.add_argument("broker")
    p.add_argument("type", help="a ControlType name, e.g. lease_request")
    p.add_argument("body", help="a file with the JSON body (its auth included)")
    p.add_argument("--txid", type=int, default=0, help="the transaction id it was signed for")

    def co(p: argparse.ArgumentParser) -> None:
        p.add_argument("--co", required=True, help="this CO's id (its key's id)")
        p.add_argument("--keys", required=True, help="the run's CO key file (host -> hex key)")
        p.add_argument("--broker", help="the broker's address (default: discover it)")
        p.add_argument("--discover-timeout", type=float, default=DISCOVER_TIMEOUT)

    co(sub.add_parser("list", help="the broker's services"))
    p = sub.add_parser("request", help="lease a service or a goal ('text -> rtf')")
    co(p)
    p.add_argument("target")
    p.add_argument("--share", type=float, default=10.0, help="percent of the service")
    p.add_argument("--cpu", type=float, default=0.1, help="cores")
    p.add_argument("--duration", default=ANY, help='seconds, or "any"')
    p.add_argument("--measure", action="store_true",
                   help="measure the round trip to each instance and let the broker use it")
    for name in ("renew", "cancel"):
        p = sub.add_parser(name, help=f"{name} one lease")
        co(p)
        p.add_argument("lease")
        if name == "renew":
            p.add_argument("--duration", default=ANY)
    p = sub.add_parser("keep", help="renew a grant's leases for a while")
    co(p)
    p.add_argument("grant", help="a JSON file with the grant")
    p.add_argument("--for", dest="for_s", type=float, required=True, help="seconds")
    p.add_argument("--duration", default=ANY, help="what to ask for at each renewal")
    p.add_argument("--cancel-at-end", action="store_true")
    p = sub.add_parser("call", help="run a grant's path on a file")
    co(p)
    p.add_argument("grant", help="a JSON file with the grant")
    p.add_argument("input", help="the document (its first hop's format; JSON for a plain service)")
    p.add_argument("--output", help="write the resulting document here")
    p.add_argument("--timeout", type=float, default=SERVICE_TIMEOUT, help="per hop, seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = run_command(args)
    except CoError as exc:
        out = exc.as_dict()
    except (BrokerError, ValueError, OSError) as exc:  # a bad argument or file
        out = {"ok": False, "error": str(exc), "kind": type(exc).__name__, "reason": "usage"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
