"""Small packet tools run *inside* a node's namespace: ``python -m experiments.probes ...``.

Experiments and tests run these through ``node.cmd`` so that probes leave from the node
itself, as real packets on the emulated network. Each prints one JSON line.

* ``arp IFACE ADDRESS`` — who has ADDRESS? prints the MAC that answered (or null).
* ``solicit IFACE`` — send an Agent Solicitation, print who advertised back and how fast.
* ``udp DST PORT HEX [--timeout S]`` — send one datagram, print the reply (hex) or null.
* ``fuzz DST --count N --seed S`` — send N mutated registration and discovery messages to
  DST (UDP 434 and raw ICMP), bounded in count, and print how many were sent.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import time

from packets import (
    AdvFlags,
    AgentAdvertisement,
    AgentSolicitation,
    ExtType,
    NaiExtension,
    RegistrationReply,
    RegistrationRequest,
    RequestFlags,
    append_auth,
)
from packets.codes import MIP_PORT


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.probes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("arp")
    p.add_argument("iface")
    p.add_argument("address")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("solicit")
    p.add_argument("iface")
    p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("udp")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("hex")
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("fuzz")
    p.add_argument("dst")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.cmd == "arp":
        out: object = {"mac": arp(args.iface, args.address, args.timeout)}
    elif args.cmd == "solicit":
        out = solicit(args.iface, args.timeout)
    elif args.cmd == "udp":
        reply = udp(args.dst, args.port, bytes.fromhex(args.hex), args.timeout)
        out = {"reply": None if reply is None else reply.hex()}
    else:
        out = fuzz(args.dst, min(args.count, 100_000), args.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
