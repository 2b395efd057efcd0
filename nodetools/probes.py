"""Small packet tools run *inside* a node's namespace: ``python -m nodetools.probes ...``.

Experiments and tests run these through ``node.cmd`` so that probes leave from the node
itself, as real packets on the emulated network. Each prints one JSON line.

* ``arp IFACE ADDRESS`` — who has ADDRESS? prints the MAC that answered (or null).
* ``solicit IFACE`` — send an Agent Solicitation, print who advertised back and how fast.
* ``control DST TYPE JSON`` — one MOAT control message over TCP 4340, print the answer
  (``--sign-key``: signed for DST, its secrets sealed for DST).
* ``service DST PORT JSON|@FILE [--tcp]`` — one service request, print the reply body. Over
  UDP, unless ``--tcp`` or the request does not fit one datagram; a reply too large for UDP
  is asked again over TCP (same client and seq: the object answers it from memory).
* ``udp DST PORT HEX [--timeout S]`` — send one datagram, print the reply (hex) or null.
* ``fuzz DST --count N --seed S`` — send N mutated registration and discovery messages to
  DST (UDP 434 and raw ICMP), bounded in count, and print how many were sent.
* ``regload SPEC --duration S --window W`` — act as a trusted FOA: send valid, authenticated
  Registration Requests (described by the JSON file SPEC) to one HOA from one UDP socket,
  at most W outstanding, for S seconds (bounded in time and count); print the replies by
  code, timeouts and reply latencies (``experiments.bench_registration`` runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from pathlib import Path

from packets import (
    AdvFlags,
    AgentAdvertisement,
    AgentSolicitation,
    ExtType,
    MalformedMessage,
    NaiExtension,
    RegistrationReply,
    RegistrationRequest,
    RequestFlags,
    append_auth,
)
from packets.codes import MIP_PORT

#: The most a UDP datagram carries over IPv4 (65,535 - 20 - 8): a bigger request goes over TCP.
UDP_MAX_PAYLOAD = 65_507


def arp(iface: str, address: str, timeout: float = 2.0) -> str | None:
    from scapy.layers.l2 import ARP, Ether
    from scapy.sendrecv import srp1

    answer = srp1(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, pdst=address), iface=iface,
                  timeout=timeout, verbose=False)
    return None if answer is None else answer[ARP].hwsrc


def solicit(iface: str, timeout: float = 3.0) -> dict:
    """Send one Agent Solicitation on ``iface`` (TTL 1, to 224.0.0.2) and wait for the first
    advertisement; report who answered and how long it took."""
    import struct

    from packets import decode_discovery

    ifindex = socket.if_nametoindex(iface)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=4s4si", b"\0" * 4, b"\0" * 4, ifindex))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
        start = time.monotonic()
        s.sendto(AgentSolicitation().encode(), ("224.0.0.2", 0))
        deadline = start + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            try:
                data, addr = s.recvfrom(65535)
            except socket.timeout:
                break
            icmp = data[(data[0] & 0x0F) * 4:]
            if icmp[:1] == b"\x09":
                adv = decode_discovery(icmp)
                return {"agent": addr[0], "delay": time.monotonic() - start, "ttl": data[8],
                        "sequence": adv.sequence}
    return {"agent": None, "delay": None}


#: The routers' public sealing keys (name -> addresses, X25519 public key), written by the
#: run beside its provider's key: a PROVISION's secrets are sealed for the router it goes to.
PEERS_FILE = "peers.json"


def seal_keys_from(path: Path) -> dict[str, bytes]:
    """Public sealing key by router address, from a :data:`PEERS_FILE` (agent config format)."""
    from agent.core.config import PeerRouter

    doc = json.loads(path.read_text())
    return {a: p.seal_key for n, p in ((n, PeerRouter.from_json(n, d)) for n, d in doc.items())
            for a in p.addresses}


def control(dst: str, ctype: str, body: dict, timeout: float = 120.0,
            sign_key: str | None = None, peers: str | None = None) -> dict:
    """One in-band control message over TCP 4340 (PROVISION from the remote site, say);
    returns the answer's body. ``sign_key``: the provider's Ed25519 private key file, to
    sign it for router ``dst`` (routers accept only PROVISIONs signed by a provider they
    authorize, for them); its secret fields (``mobile``: the objects' keys) are first sealed
    for ``dst``'s X25519 key, from ``peers`` (default: :data:`PEERS_FILE` beside the key),
    and the message is not sent if they cannot be. Without ``sign_key`` the body goes as it
    is (a message prepared elsewhere, or a test of the router's checks)."""
    import asyncio

    from agent.core.peer import PeerError, peer_call
    from packets import ControlType

    mtype = ControlType[ctype.upper()]
    if sign_key:
        from agent.core.msgauth import sign_ed25519
        from agent.core.sealing import SealError, seal_body
        from agent.vm.signing import key_id, load_private_key

        private = load_private_key(sign_key)
        table = Path(peers) if peers else Path(sign_key).parent / PEERS_FILE
        keys = seal_keys_from(table) if table.exists() else {}
        try:
            body = seal_body(body, keys.get(dst), ctype=mtype, txid=0, to=dst)
        except SealError as exc:
            return {"ok": False, "error": f"not sent: {exc}"}
        body = sign_ed25519(mtype, 0, body, private, key_id(private.public_key()), to=dst)
    try:
        return asyncio.run(peer_call(dst, mtype, body, timeout=timeout))
    except PeerError as exc:
        # A refusal's whole answer (a broker's carries its reason code and detail).
        return {**getattr(exc, "answer", {}), "ok": False, "error": str(exc)}


def service(dst: str, port: int, body: dict, timeout: float = 5.0, tcp: bool = False) -> dict:
    """One service request (MOAT framing) and its reply body, as a corresponding object
    sends it; ``client``/``seq`` are filled in when missing.

    UDP first, as a corresponding object does. A reply too big for one datagram comes back
    as ``{"ok": false, "too_large": N}``; the very same request (same client and seq, so the
    object answers from memory instead of running it again) then goes over TCP, and its full
    reply is returned. ``tcp`` goes to TCP straight away, as does a request that does not
    fit in a datagram itself.
    """
    from packets import ControlMessage, ControlType

    body = {"client": f"probe-{random.getrandbits(32):08x}", "seq": 1, **body}
    data = ControlMessage(ControlType.SERVICE_REQUEST, 1, body).encode()
    if not tcp and len(data) <= UDP_MAX_PAYLOAD:
        reply = _service_udp(dst, port, data, timeout)
        too_large = (reply.get("too_large") and reply.get("client") == body["client"]
                     and reply.get("seq") == body["seq"])
        if not too_large:
            return reply
    return _service_tcp(dst, port, data, timeout)


def _service_udp(dst: str, port: int, data: bytes, timeout: float) -> dict:
    from packets import ControlMessage

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, (dst, port))
        try:
            return ControlMessage.decode(s.recv(65535)).body
        except socket.timeout:
            return {"ok": False, "error": "no reply"}
        except MalformedMessage as exc:
            return {"ok": False, "error": f"malformed reply: {exc}"}


def _recv_exactly(s: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = s.recv(min(size - len(data), 1 << 16))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def _service_tcp(dst: str, port: int, data: bytes, timeout: float) -> dict:
    """One request over TCP and the one message that answers it (``timeout`` per step)."""
    from packets import ControlMessage
    from packets.control import HEADER, frame_length

    try:
        with socket.create_connection((dst, port), timeout=timeout) as s:
            s.sendall(data)
            head = _recv_exactly(s, HEADER.size)
            return ControlMessage.decode(head + _recv_exactly(s, frame_length(head) - HEADER.size)).body
    except socket.timeout:
        return {"ok": False, "error": "no reply over TCP"}
    except MalformedMessage as exc:
        return {"ok": False, "error": f"malformed reply over TCP: {exc}"}
    except OSError as exc:  # refused, reset, closed before the whole reply
        return {"ok": False, "error": f"TCP: {exc}"}


def udp(dst: str, port: int, payload: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, (dst, port))
        try:
            return s.recv(65535)
        except socket.timeout:
            return None


def seeds() -> list[bytes]:
    """Valid messages to mutate: an authenticated RRQ, an RRP, an advertisement."""
    rrq = RegistrationRequest("10.16.0.100", "10.16.0.2", "10.12.0.1", 1 << 62, 60,
                              RequestFlags.G, [NaiExtension("fuzz@home.moat")])
    raw = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, 256, b"k" * 32)
    raw = append_auth(raw, ExtType.MOBILE_FOREIGN_AUTH, 1000, b"j" * 32)
    rrp = RegistrationReply(0, "10.16.0.100", "10.16.0.2", 1 << 62, 60).encode()
    return [raw, rrp]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        else:
            b = bytearray(rng.randbytes(rng.randrange(1, 64)))
    return bytes(b)


def fuzz(dst: str, count: int, seed: int) -> dict:
    """Send ``count`` mutated UDP 434 datagrams and ``count`` mutated ICMP 9/10 messages."""
    rng = random.Random(seed)
    base = seeds()
    adv = AgentAdvertisement(1, 60, AdvFlags.F | AdvFlags.G, ["10.12.0.1"]).encode()
    sol = AgentSolicitation().encode()
    sent = {"udp": 0, "icmp": 0}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as r:
        for i in range(count):
            u.sendto(mutate(rng, rng.choice(base)), (dst, MIP_PORT))
            sent["udp"] += 1
            icmp = bytearray(mutate(rng, rng.choice([adv, sol])))
            while len(icmp) < 2:  # Linux refuses raw ICMP shorter than type + code (EFAULT)
                icmp.append(rng.randrange(256))
            icmp[0] = rng.choice((9, 10))  # keep it discovery so it reaches the parser
            r.sendto(bytes(icmp), (dst, 0))
            sent["icmp"] += 1
            if i % 100 == 99:
                time.sleep(0.01)  # bounded pacing: never flood the emulated link
    return sent


#: Hard bounds of ``regload``, whatever it is asked.
REGLOAD_MAX_DURATION = 60.0
REGLOAD_MAX_WINDOW = 1024
REGLOAD_MAX_REQUESTS = 1_000_000


def resolve(name: str, server: str, timeout: float = 2.0) -> dict:
    """One DNS query for ``name``'s A record to ``server`` (UDP 53); rcode and addresses."""
    from nodetools.dns import parse_a_answer, query

    txid = random.getrandbits(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query(name, txid), (server, 53))
        try:
            data = s.recv(4096)
        except socket.timeout:
            return {"rcode": None, "addresses": [], "error": "no answer"}
    if data[:2] != txid.to_bytes(2, "big"):
        return {"rcode": None, "addresses": [], "error": "answer to another query"}
    rcode, addresses = parse_a_answer(data)
    return {"rcode": rcode, "addresses": addresses}


def control_seeds() -> list[bytes]:
    """Well-framed in-band control messages the routers' TCP 4340 must refuse (they name
    no object, service or VM that exists), to mutate."""
    from packets import ControlMessage, ControlType

    bodies = [
        (ControlType.MIGRATE, {"action": "start", "spec": "agent.objects.counter:Counter", "warm": True,
                               "config": {"name": "ghost"}}),
        (ControlType.MIGRATE, {"action": "cancel", "name": "ghost"}),
        (ControlType.MIGRATE, {"action": "start", "config": {"name": "ghost"},
                               "vm": {"vm": "v", "objects": ["a", "b"]}}),
        (ControlType.STATE_TRANSFER, {"name": "ghost", "state": {"object": {"count": 1}}}),
        (ControlType.PROVISION, {"vm": "v", "kind": "nonsense", "service": "s"}),
        (ControlType.PROVISION, {"vm": "v", "kind": "service", "service": "s",
                                 "mobile": {"o": {"name": 1}}, "objects": "x"}),
        (ControlType.LEASE_REQUEST, {}),
    ]
    return [ControlMessage(t, i, b).encode() for i, (t, b) in enumerate(bodies)]


def ctlfuzz(dst: str, count: int, seed: int, timeout: float = 5.0) -> dict:
    """``count`` connections to ``dst``'s TCP 4340, each sending one mutated (or cut, or
    doubled) control message; counts how the agent answered. The agent must answer or
    close, never die (the caller checks it lives)."""
    from packets.codes import CONTROL_PORT

    rng = random.Random(seed)
    seeds = control_seeds()
    tally = {"sent": 0, "answered": 0, "closed": 0, "timeout": 0}
    for _ in range(count):
        data = mutate(rng, rng.choice(seeds))
        if rng.random() < 0.1:
            data += data  # two messages back to back
        try:
            with socket.create_connection((dst, CONTROL_PORT), timeout=timeout) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                tally["sent"] += 1
                tally["answered" if s.recv(1 << 16) else "closed"] += 1
        except socket.timeout:
            tally["timeout"] += 1
        except OSError:
            tally["closed"] += 1
    return tally


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all threads) from /proc, or None if unreadable."""
    try:
        text = open(f"/proc/{pid}/stat", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    if len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def regload(spec: dict, duration: float, window: int, max_requests: int, timeout: float,
            pids: list[int] | None = None) -> dict:
    """Registration load on one HOA, as a trusted FOA would relay it (RFC 5944 §3.7.3).

    Each request is what :class:`agent.mobility.foreign.ForeignAgent` relays: NAI + object-part NVSE,
    Mobile-Home auth under the object's key, care-of-name NVSE, Foreign-Home auth under the
    FOA's key, a fresh strictly increasing NTP Identification, lifetime ``spec["lifetime"]``.
    One UDP socket, connected to ``spec["home_agent"]``:434 (so only the HOA's replies count);
    at most ``window`` requests outstanding; a request unanswered after ``timeout`` s counts
    as a timeout and frees its slot. Sends for ``duration`` s or ``max_requests`` requests,
    whichever ends first, then waits up to ``timeout`` for the last replies (reported apart,
    not in the rate). ``pids``: CPU seconds of these processes are read at the start and the
    end of the sending window, so a caller can charge them to exactly that window.
    """
    import ipaddress
    import resource
    import select

    from packets import CareOfName, ObjectPart, PartRole, ReplyCode, new_identification, verify_auth
    from packets.extensions import encode_extension

    dst = spec["home_agent"]
    addr = ipaddress.IPv4Address(dst)
    if not addr.is_private or addr.is_loopback or addr.is_multicast or addr.is_unspecified:
        raise SystemExit(f"regload: {dst} is not an emulated-network unicast address")
    duration = min(max(duration, 0.1), REGLOAD_MAX_DURATION)
    window = min(max(window, 1), REGLOAD_MAX_WINDOW)
    max_requests = min(max(max_requests, 1), REGLOAD_MAX_REQUESTS)
    mh_spi, mh_key = int(spec["mobile_home"]["spi"]), bytes.fromhex(spec["mobile_home"]["key"])
    fh_spi, fh_key = int(spec["foreign_home"]["spi"]), bytes.fromhex(spec["foreign_home"]["key"])
    lifetime = int(spec.get("lifetime", 60))
    head_exts = [NaiExtension(spec["nai"]), ObjectPart(PartRole.PRIMARY, 0, "")]
    coname = encode_extension(CareOfName(spec["care_of_name"]))
    fh_keys = {fh_spi: fh_key}

    def build(ident: int) -> bytes:
        rrq = RegistrationRequest(spec["home_address"], dst, spec["care_of_address"], ident,
                                  lifetime, RequestFlags.G, head_exts)
        data = append_auth(rrq.encode(), ExtType.MOBILE_HOME_AUTH, mh_spi, mh_key) + coname
        return append_auth(data, ExtType.FOREIGN_HOME_AUTH, fh_spi, fh_key)

    outstanding: dict[int, float] = {}  # identification -> sent at (monotonic); insertion order
    codes: dict[str, int] = {}
    latencies: list[float] = []
    counts = {"sent": 0, "replies": 0, "accepted": 0, "timeouts": 0, "late_replies": 0,
              "late_timeouts": 0, "unmatched": 0, "bad_auth": 0, "malformed": 0, "icmp_errors": 0,
              "send_blocked": 0}
    last_ident: int | None = None
    in_window = True

    def on_reply(data: bytes, now: float) -> None:
        try:
            rrp = RegistrationReply.decode(data)
        except MalformedMessage:
            counts["malformed"] += 1
            return
        sent_at = outstanding.pop(rrp.identification, None)
        if sent_at is None:
            counts["unmatched"] += 1  # already timed out, or not ours
            return
        if not in_window:
            counts["late_replies"] += 1
            return
        counts["replies"] += 1
        latencies.append(now - sent_at)
        code = int(rrp.code)
        if code == ReplyCode.ACCEPTED:
            if not verify_auth(rrp, ExtType.FOREIGN_HOME_AUTH, fh_keys):
                counts["bad_auth"] += 1  # an acceptance an FOA would drop
                return
            counts["accepted"] += 1
        try:
            label = f"{code} {ReplyCode(code).name}"
        except ValueError:
            label = str(code)
        codes[label] = codes.get(label, 0) + 1

    def drain(now: float) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # ICMP port unreachable from the HOA's address
                counts["icmp_errors"] += 1
                continue
            on_reply(data, now)

    def expire(now: float) -> None:
        while outstanding:
            ident, sent_at = next(iter(outstanding.items()))
            if now - sent_at < timeout:
                return
            del outstanding[ident]
            counts["timeouts"] += 1

    cpu_before = {pid: _proc_cpu_seconds(pid) for pid in pids or []}
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((dst, MIP_PORT))
        sock.setblocking(False)
        start = time.monotonic()
        end = start + duration
        now = start
        while now < end:
            blocked = False
            while len(outstanding) < window and counts["sent"] < max_requests:
                last_ident = new_identification(last=last_ident)
                try:
                    sock.send(build(last_ident))
                except BlockingIOError:
                    counts["send_blocked"] += 1
                    blocked = True
                    break
                except ConnectionRefusedError:  # an earlier ICMP error, reported on this send
                    counts["icmp_errors"] += 1
                    break
                outstanding[last_ident] = time.monotonic()
                counts["sent"] += 1
            if not outstanding and counts["sent"] >= max_requests:
                break
            now = time.monotonic()
            wait = end - now
            if outstanding:
                wait = min(wait, next(iter(outstanding.values())) + timeout - now)
            if blocked:
                wait = min(wait, 0.001)
            if select.select([sock], [], [], max(0.0, wait))[0]:
                drain(time.monotonic())
            now = time.monotonic()
            expire(now)
        stop = min(time.monotonic(), end)
        cpu_after = {pid: _proc_cpu_seconds(pid) for pid in pids or []}
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        in_window = False
        counts["in_flight_at_end"] = len(outstanding)
        deadline = time.monotonic() + timeout
        while outstanding and (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                drain(time.monotonic())
        counts["late_timeouts"] += len(outstanding)
    elapsed = stop - start
    gen_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return dict(
        counts, codes=codes, elapsed=elapsed, window=window, duration=duration,
        max_requests=max_requests, timeout=timeout, lifetime=lifetime,
        request_bytes=len(build(new_identification(last=last_ident))),
        replies_per_s=counts["replies"] / elapsed if elapsed > 0 else 0.0,
        accepted_per_s=counts["accepted"] / elapsed if elapsed > 0 else 0.0,
        latencies=[round(x, 7) for x in latencies],
        generator_cpu_s=gen_cpu,
        pid_cpu={str(pid): [cpu_before[pid], cpu_after[pid]] for pid in pids or []},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodetools.probes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("arp")
    p.add_argument("iface")
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("solicit")
    p.add_argument("iface")
    p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("control")
    p.add_argument("dst")
    p.add_argument("type", help="a ControlType name, e.g. provision")
    p.add_argument("body", help="the JSON body, or @FILE (keeps credentials off the command line)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--sign-key", help="sign with this Ed25519 private key (a provider's PROVISION)")
    p.add_argument("--peers", help=f"the routers' sealing keys (default: {PEERS_FILE} beside the key)")
    p = sub.add_parser("service")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("body", help="the request body (JSON), or @FILE")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--tcp", action="store_true",
                   help="send over TCP straight away (for a request too big for UDP)")
    p = sub.add_parser("udp")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("hex")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("fuzz")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("resolve")
    p.add_argument("name")
    p.add_argument("server")
    p = sub.add_parser("ctlfuzz")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("regload")
    p.add_argument("spec", help="JSON: home_address, home_agent, care_of_address, nai, "
                   "care_of_name, lifetime, mobile_home {spi, key}, foreign_home {spi, key}")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="read this process's CPU time at the start and end of the window")
    args = parser.parse_args(argv)
    if args.cmd == "arp":
        out: object = {"mac": arp(args.iface, args.address, args.timeout)}
    elif args.cmd == "solicit":
        out = solicit(args.iface, args.timeout)
    elif args.cmd == "control":
        text = Path(args.body[1:]).read_text() if args.body.startswith("@") else args.body
        out = control(args.dst, args.type, json.loads(text), args.timeout, args.sign_key,
                      args.peers)
    elif args.cmd == "service":
        text = Path(args.body[1:]).read_text() if args.body.startswith("@") else args.body
        out = service(args.dst, args.port, json.loads(text), args.timeout, tcp=args.tcp)
    elif args.cmd == "udp":
        reply = udp(args.dst, args.port, bytes.fromhex(args.hex), args.timeout)
        out = {"reply": None if reply is None else reply.hex()}
    elif args.cmd == "regload":
        with open(args.spec, encoding="utf-8") as fh:
            spec = json.load(fh)
        out = regload(spec, args.duration, args.window, args.max_requests, args.timeout, args.pid)
    elif args.cmd == "resolve":
        out = resolve(args.name, args.server)
    elif args.cmd == "ctlfuzz":
        out = ctlfuzz(args.dst, min(args.count, 100_000), args.seed)
    else:
        out = fuzz(args.dst, min(args.count, 100_000), args.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
