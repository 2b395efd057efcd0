"""agent.mobility.tunnel without root: header parsing, tables, and packet dispatch through fakes.

The TUN device is faked by a datagram socketpair (one packet per read/write, like a TUN fd);
the raw GRE socket by an object that records what it is asked to send and returns queued
packets on receive. Routes, rules, links and tc go through a real netlink worker
(:class:`agent.core.netlink.Netlink`) whose IPRoute is a fake that records them, so nothing
here touches the machine's network; ``settle`` waits for the worker as the daemon would.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import GRE, ICMP, IP, UDP

import agent.mobility.tunnel as tunnel_mod
import agent.mobility.tunnel.choose as choose_mod
from agent.core.netlink import Netlink
from agent.mobility.tunnel import (
    GRE_KEY_FLAG,
    STAT_KEYS,
    KernelTunnel,
    TunnelUnavailable,
    UserspaceTunnel,
    detect_backend,
    ipv4_addresses,
    make_tunnel,
    parse_ipv4,
)
from packets.errors import MalformedMessage
from packets.gre import GreHeader

HOA, FOA, FOA2 = "10.99.0.1", "10.99.0.2", "10.99.1.2"
OBJ, CLIENT = "10.97.0.100", "10.98.0.2"


def inner_packet(src: str = CLIENT, dst: str = OBJ, payload: bytes = b"moat") -> bytes:
    return bytes(IP(src=src, dst=dst, id=7) / ICMP(id=1, seq=1) / payload)


def outer_packet(gre: bytes, src: str = HOA, dst: str = FOA, proto: int = 47) -> bytes:
    return bytes(IP(src=src, dst=dst, proto=proto) / gre)


# --- fakes ------------------------------------------------------------------------------------


class FakeNetlinkError(Exception):
    def __init__(self, code: int, msg: str = "") -> None:
        self.code = code
        super().__init__(code, msg or os.strerror(code))


class FakeIPRoute:
    """pyroute2's IPRoute as the tunnel uses it: links by name, routes, rules and tc recorded.

    ``calls`` has one readable line per change, like the ``ip``/``tc`` commands they replace.
    """

    def __init__(self, *devices: str) -> None:
        self.links: dict[str, dict[str, Any]] = {}
        self.index: dict[str, int] = {d: i for i, d in enumerate(devices, 1)}
        self.routes: list[tuple[str, dict[str, Any]]] = []
        self.rules: list[tuple[str, dict[str, Any]]] = []
        self.calls: list[str] = []
        self.threads: set[str] = set()
        self._next = 10
        self.closed = False
        self.add_error: Exception | None = None
        self.fail: set[str] = set()  # words: a call whose line contains one is refused

    def _name(self, index: int) -> str:
        return next(n for n, i in self.index.items() if i == index)

    def _record(self, line: str) -> None:
        import threading

        self.threads.add(threading.current_thread().name)
        self.calls.append(line)
        if any(word in line for word in self.fail):
            raise FakeNetlinkError(errno.EPERM)

    def link(self, op: str, **kw: Any) -> None:
        if op == "add":
            if self.add_error is not None:
                err, self.add_error = self.add_error, None
                raise err
            if kw["ifname"] in self.links:
                raise FakeNetlinkError(errno.EEXIST)
            self.links[kw["ifname"]] = kw
            self.index[kw["ifname"]] = self._next
            self._next += 1
        elif op == "set":
            name = self._name(kw["index"])
            self._record(f"link set {name} " + " ".join(f"{k} {v}" for k, v in kw.items() if k != "index"))
            self.links.setdefault(name, {})["state"] = kw.get("state")
        elif op == "del":
            name = self._name(kw["index"])
            self.links.pop(name, None)
            del self.index[name]

    def link_lookup(self, ifname: str) -> list[int]:
        return [self.index[ifname]] if ifname in self.index else []

    def route(self, op: str, **kw: Any) -> None:
        self.routes.append((op, kw))
        dev = f" dev {self._name(kw['oif'])}" if "oif" in kw else ""
        table = f" table {kw['table']}" if "table" in kw else ""
        self._record(f"route {op} {kw['dst']}{dev}{table}")

    def rule(self, op: str, **kw: Any) -> None:
        self.rules.append((op, kw))
        self._record(f"rule {op} from {kw['src']}/{kw['src_len']} lookup {kw['table']} priority {kw['priority']}")

    def tc(self, command: str, kind: str, index: int, handle: int = 0, **kw: Any) -> None:
        line = f"tc {command} {kind} {self._name(index)}"
        for key in kw.get("keys", []):
            line += f" match {key}"
        for action in kw.get("action", []):
            line += f" {action['action']} {self._name(action['ifindex'])}"
        self._record(line)

    def close(self) -> None:
        self.closed = True


class FakeRawSocket:
    """The raw protocol-47 socket: sends are recorded, receives come from ``incoming``."""

    def __init__(self, fd: int = -1) -> None:
        self.fd = fd
        self.sent: list[tuple[bytes, str, list]] = []
        self.incoming: list[bytes] = []
        self.error: OSError | None = None
        self.sendmsg_error: OSError | None = None
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def sendmsg(self, buffers: list[bytes], ancdata: list, flags: int, address: tuple[str, int]) -> int:
        if self.sendmsg_error is not None:
            raise self.sendmsg_error
        if self.error is not None:
            raise self.error
        data = b"".join(buffers)
        self.sent.append((data, address[0], ancdata))
        return len(data)

    def sendto(self, data: bytes, address: tuple[str, int]) -> int:
        if self.error is not None:
            raise self.error
        self.sent.append((bytes(data), address[0], []))
        return len(data)

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data = self.incoming.pop(0)
        return data, (socket.inet_ntoa(data[12:16]) if len(data) >= 20 else "0.0.0.0", 0)

    def close(self) -> None:
        self.closed = True


class Tun:
    """A TUN stand-in: ``fd`` goes to the tunnel, ``peer`` is the kernel's side."""

    def __init__(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        b.setblocking(False)
        self.fd = a.detach()
        self.peer = b

    def from_kernel(self, packet: bytes) -> None:
        self.peer.send(packet)

    def to_kernel(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(65535))
            except BlockingIOError:
                return out


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def ipr() -> FakeIPRoute:
    return FakeIPRoute("moat0", "moatx1")


@pytest.fixture
def netlink(ipr: FakeIPRoute) -> Iterator[Netlink]:
    worker = Netlink(lambda: ipr, timeout=5)
    yield worker
    worker.close()


class Rec:
    """The recorded kernel changes, read once the worker has applied everything queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ipr: FakeIPRoute) -> None:
        self.loop, self.ipr, self.tunnels = loop, ipr, []

    def settle(self) -> None:
        for t in self.tunnels:
            self.loop.run_until_complete(t.settle())

    @property
    def calls(self) -> list[str]:
        self.settle()
        return self.ipr.calls

    def joined(self) -> list[str]:
        return self.calls


@pytest.fixture
def rec(loop: asyncio.AbstractEventLoop, ipr: FakeIPRoute) -> Rec:
    return Rec(loop, ipr)


@pytest.fixture
def tun(loop: asyncio.AbstractEventLoop, rec: Rec, netlink: Netlink) -> Iterator[tuple[UserspaceTunnel, Tun, FakeRawSocket]]:
    fake_tun, sock = Tun(), FakeRawSocket()
    t = UserspaceTunnel(loop, HOA, netlink=netlink)
    rec.tunnels.append(t)
    t._attach(fake_tun.fd, sock)
    yield t, fake_tun, sock
    t.close()
    fake_tun.peer.close()


def sent_gre(sock: FakeRawSocket) -> list[tuple[str, GRE]]:
    """(remote, scapy GRE) of every packet the fake socket was asked to send."""
    return [(remote, GRE(data)) for data, remote, _ in sock.sent]


# --- IPv4 parsing -----------------------------------------------------------------------------


def test_parse_ipv4_fields() -> None:
    pkt = bytes(IP(src=CLIENT, dst=OBJ, options=[]) / UDP(sport=1, dport=2) / b"xyz")
    h = parse_ipv4(pkt)
    assert (h.header_length, h.total_length, h.protocol, h.src, h.dst) == (20, len(pkt), 17, CLIENT, OBJ)
    assert ipv4_addresses(pkt) == (CLIENT, OBJ)
    # options: IHL 6
    with_opts = bytes(IP(src=CLIENT, dst=OBJ, options=b"\x01\x01\x01\x01") / b"x")
    assert parse_ipv4(with_opts).header_length == 24
    # trailing bytes beyond the total length are tolerated (callers cut them)
    assert parse_ipv4(pkt + b"\0" * 10).total_length == len(pkt)


@pytest.mark.parametrize("data, reason", [
    (b"", "bytes < 20"),
    (b"\x45" + b"\0" * 10, "bytes < 20"),
    (bytes(IP(dst=OBJ))[:19], "bytes < 20"),
    (b"\x65" + bytes(IP(dst=OBJ))[1:], "version 6"),
    (b"\x44" + bytes(IP(dst=OBJ))[1:], "header length 16"),
    (b"\x4f" + bytes(IP(dst=OBJ))[1:], "header length 60"),
    (bytes(IP(dst=OBJ) / b"abc")[:21], "total length 23"),
    (bytes(IP(dst=OBJ, len=10)), "total length 10"),
])
def test_parse_ipv4_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        parse_ipv4(data)
    assert ipv4_addresses(data) is None


def test_parse_ipv4_fuzz_only_malformed() -> None:
    rng = random.Random(4347)
    base = inner_packet()
    for _ in range(2000):
        data = bytearray(base[: rng.randrange(len(base) + 1)])
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_ipv4(bytes(data))
        except MalformedMessage:
            pass


# --- tables -----------------------------------------------------------------------------------


def test_set_peers_installs_and_removes_the_host_route(tun, rec: Rec) -> None:
    t, _, _ = tun
    t.set_peers(OBJ, [(FOA, 42), (FOA2, 43), (FOA, 42)])
    assert t.peers == {OBJ: [(FOA, 42), (FOA2, 43)]}  # duplicates dropped, order kept
    assert rec.joined() == [f"route replace {OBJ}/32 dev moat0"]
    t.set_peers(OBJ, [(FOA2, 43)])
    assert t.peers[OBJ] == [(FOA2, 43)]
    t.set_peers(OBJ, [])
    assert OBJ not in t.peers
    assert rec.joined()[-1] == f"route del {OBJ}/32 dev moat0"
    n = len(rec.calls)
    t.set_peers(OBJ, [])  # nothing there: nothing to do
    assert len(rec.calls) == n


@pytest.mark.parametrize("call", [
    lambda t: t.set_peers("10.97.0", [(FOA, 1)]),
    lambda t: t.set_peers(OBJ, [("nope", 1)]),
    lambda t: t.set_peers(OBJ, [(FOA, -1)]),
    lambda t: t.set_peers(OBJ, [(FOA, 2**32)]),
    lambda t: t.accept(FOA, True),
    lambda t: t.accept("::1", 1),
    lambda t: t.set_reverse("x", (FOA, 1)),
])
def test_bad_arguments_raise_value_error(tun, call) -> None:
    with pytest.raises(ValueError):
        call(tun[0])


def test_accept_and_forget(tun) -> None:
    t, _, _ = tun
    t.accept(HOA, 42)
    t.accept(HOA, 42)
    t.accept(HOA, 43)
    assert t.accepted == {(HOA, 42), (HOA, 43)}
    t.forget(HOA, 42)
    t.forget(HOA, 99)  # unknown: no error
    assert t.accepted == {(HOA, 43)}


def test_set_reverse_rules_and_table(tun, rec: Rec) -> None:
    t, _, _ = tun
    t.set_reverse(OBJ, (HOA, 42))
    t.set_reverse("10.97.0.101", (HOA, 43))
    assert rec.joined() == [
        "route replace 0.0.0.0/0 dev moat0 table 4347",
        f"rule add from {OBJ}/32 lookup 4347 priority 4347",
        "rule add from 10.97.0.101/32 lookup 4347 priority 4347",
    ]
    assert t.reverse == {OBJ: (HOA, 42), "10.97.0.101": (HOA, 43)}
    t.set_reverse(OBJ, (HOA, 44))  # a new binding: same rule, new peer
    assert len(rec.calls) == 3 and t.reverse[OBJ] == (HOA, 44)
    t.set_reverse(OBJ, None)
    assert rec.joined()[-1] == f"rule del from {OBJ}/32 lookup 4347 priority 4347"
    t.set_reverse("10.97.0.101", None)
    assert rec.joined()[-2:] == ["rule del from 10.97.0.101/32 lookup 4347 priority 4347",
                                 "route del 0.0.0.0/0 dev moat0 table 4347"]
    assert t.reverse == {}


def test_close_removes_what_it_made_and_is_idempotent(loop, rec: Rec, netlink: Netlink) -> None:
    fake_tun, sock = Tun(), FakeRawSocket()
    t = UserspaceTunnel(loop, HOA, name="moatx1", netlink=netlink)
    rec.tunnels.append(t)
    t._attach(fake_tun.fd, sock)
    t.set_peers(OBJ, [(FOA, 42)])
    t.set_reverse("10.97.0.5", (FOA, 42))
    t.accept(FOA, 42)
    rec.calls.clear()
    t.close()
    assert set(rec.joined()) == {
        "rule del from 10.97.0.5/32 lookup 4347 priority 4347",
        "route del 0.0.0.0/0 dev moatx1 table 4347",
        f"route del {OBJ}/32 dev moatx1",
    }
    assert sock.closed and t.tun_fd is None and t.sock is None
    assert (t.peers, t.reverse, t.accepted) == ({}, {}, set())
    with pytest.raises(OSError):
        os.fstat(fake_tun.fd)  # the TUN fd is closed
    rec.calls.clear()
    t.close()
    assert rec.calls == []
    fake_tun.peer.close()


def test_stats_has_the_documented_counters(tun) -> None:
    stats = tun[0].stats
    for key in ("encapsulated", "decapsulated", "dropped_unknown_peer", "dropped_malformed", "copies_sent"):
        assert stats[key] == 0
    assert set(stats) == set(STAT_KEYS)
    stats["encapsulated"] = 99  # a copy: the tunnel's counters are not touched
    assert tun[0].stats["encapsulated"] == 0


# --- encapsulation (TUN -> GRE) -----------------------------------------------------------------


def test_encapsulates_with_the_binding_key(tun) -> None:
    t, fake_tun, sock = tun
    t.set_peers(OBJ, [(FOA, 42)])
    pkt = inner_packet()
    fake_tun.from_kernel(pkt)
    t._from_tun()
    [(remote, gre)] = sent_gre(sock)
    assert remote == FOA
    assert gre.key_present == 1 and gre.key == 42 and gre.proto == 0x0800 and gre.chksum_present == 0
    assert bytes(gre.payload) == pkt
    assert isinstance(gre.payload, IP) and gre.payload.dst == OBJ
    assert t.stats["encapsulated"] == 1 and t.stats["copies_sent"] == 1


def test_outer_source_is_the_local_address(tun) -> None:
    t, fake_tun, sock = tun
    t.set_peers(OBJ, [(FOA, 42)])
    t.encapsulate(inner_packet())
    [(level, kind, data)] = sock.sent[0][2]
    assert (level, kind) == (socket.IPPROTO_IP, tunnel_mod.IP_PKTINFO)
    ifindex, spec_dst, _ = struct.unpack("=I4s4s", data)
    assert ifindex == 0 and socket.inet_ntoa(spec_dst) == HOA


def test_falls_back_to_kernel_source_when_local_is_refused(tun) -> None:
    t, _, sock = tun
    t.set_peers(OBJ, [(FOA, 42)])
    sock.sendmsg_error = OSError(errno.EINVAL, "Invalid argument")
    assert t.encapsulate(inner_packet()) == 1
    assert t.encapsulate(inner_packet()) == 1
    assert [anc for _, _, anc in sock.sent] == [[], []]
    assert t.stats["copies_sent"] == 2 and t.stats["dropped_send_error"] == 0


def test_bicast_one_copy_per_binding_with_its_key(tun) -> None:
    t, fake_tun, sock = tun
    t.set_peers(OBJ, [(FOA, 42), (FOA2, 43), ("10.99.2.2", 44)])
    pkts = [inner_packet(payload=bytes([i]) * 10) for i in range(3)]
    for p in pkts:
        fake_tun.from_kernel(p)
    t._from_tun()
    got = sent_gre(sock)
    assert [(remote, g.key) for remote, g in got] == [(FOA, 42), (FOA2, 43), ("10.99.2.2", 44)] * 3
    assert [bytes(g.payload) for _, g in got] == [p for p in pkts for _ in range(3)]
    assert t.stats["encapsulated"] == 3 and t.stats["copies_sent"] == 9


def test_reverse_tunnel_by_source_when_no_destination_peer(tun) -> None:
    t, _, sock = tun
    t.set_reverse(OBJ, (HOA, 42))
    t.set_peers("10.97.0.7", [(FOA2, 43)])
    t.encapsulate(inner_packet(src=OBJ, dst=CLIENT))         # reply from the visitor
    t.encapsulate(inner_packet(src=OBJ, dst="10.97.0.7"))    # destination peers win
    assert [(remote, g.key) for remote, g in sent_gre(sock)] == [(HOA, 42), (FOA2, 43)]
    assert t.peers_for(inner_packet(src=CLIENT, dst="10.1.1.1")) == []


def test_packets_with_no_peer_are_dropped_and_counted(tun) -> None:
    t, fake_tun, sock = tun
    fake_tun.from_kernel(inner_packet())
    fake_tun.from_kernel(bytes(60))                      # not IPv4 (version 0)
    fake_tun.from_kernel(b"\x60" + bytes(39))            # IPv6 chatter
    t._from_tun()
    assert sock.sent == []
    assert t.stats["dropped_no_peer"] == 1 and t.stats["dropped_malformed"] == 2


def test_packets_caught_while_the_last_peers_route_goes_are_sent_again_after_it(
        tun, rec: Rec, loop: asyncio.AbstractEventLoop) -> None:
    """An object came home: its last binding went, and until the kernel has deleted the
    host route into the TUN, its clients' packets still arrive there. They are kept and
    sent again (raw IP, the header as read) once the route is gone, for the kernel to route
    to where the object is now; none is dropped, and only up to REROUTE_MAX are kept."""
    from agent.mobility.tunnel.userspace import REROUTE_MAX

    t, fake_tun, sock = tun
    t.reroute_sock = FakeRawSocket()
    t.set_peers(OBJ, [(FOA, 42)])
    rec.settle()
    t.set_peers(OBJ, [])                          # the deletion is queued, not done
    caught = [inner_packet(payload=bytes([i])) for i in range(REROUTE_MAX + 2)]
    for packet in caught:
        fake_tun.from_kernel(packet)
    t._from_tun()                                 # read before the loop hears it is done
    assert sock.sent == [] and t.reroute_sock.sent == []
    rec.settle()
    loop.run_until_complete(asyncio.sleep(0))     # the deletion's callback, on the loop
    assert rec.ipr.calls[-1] == f"route del {OBJ}/32 dev moat0"
    assert [(data, dst) for data, dst, _ in t.reroute_sock.sent] == \
        [(packet, OBJ) for packet in caught[:REROUTE_MAX]]
    assert t.stats["rerouted"] == REROUTE_MAX and t.stats["dropped_no_peer"] == 2
    fake_tun.from_kernel(inner_packet())          # after the route went: dropped as before
    t._from_tun()
    assert t.stats["dropped_no_peer"] == 3 and len(t.reroute_sock.sent) == REROUTE_MAX


def test_a_packet_still_queued_in_the_tun_when_the_route_goes_is_sent_again(
        tun, rec: Rec, loop: asyncio.AbstractEventLoop) -> None:
    """The kernel routed a packet into the TUN just before the route went, and the loop
    ran the deletion's callback before reading it (the race that lost one of dns23's
    requests when the object came home): it is read then and sent again, not dropped."""
    t, fake_tun, _ = tun
    t.reroute_sock = FakeRawSocket()
    t.set_peers(OBJ, [(FOA, 42)])
    rec.settle()
    t.set_peers(OBJ, [])
    late = inner_packet(payload=b"late")
    fake_tun.from_kernel(late)                    # queued in the TUN, not read yet
    rec.settle()
    loop.run_until_complete(asyncio.sleep(0))     # the deletion's callback runs first
    assert [(data, dst) for data, dst, _ in t.reroute_sock.sent] == [(late, OBJ)]
    assert t.stats["rerouted"] == 1 and t.stats["dropped_no_peer"] == 0


def test_own_gre_routed_back_into_the_tunnel_is_a_loop(tun) -> None:
    t, _, sock = tun
    t.set_peers(FOA, [(FOA, 42)])  # the remote itself is routed into the tunnel
    looped = outer_packet(GreHeader(key=42).encode(inner_packet()), src=HOA, dst=FOA)
    assert t.encapsulate(looped) == 0
    assert sock.sent == [] and t.stats["dropped_loop"] == 1


def test_send_errors_are_counted_not_raised(tun) -> None:
    t, _, sock = tun
    t.set_peers(OBJ, [(FOA, 42), (FOA2, 43)])
    sock.error = OSError(errno.ENETUNREACH, "Network is unreachable")
    assert t.encapsulate(inner_packet()) == 0
    assert t.stats["dropped_send_error"] == 2 and t.stats["copies_sent"] == 0


def test_trailing_bytes_after_total_length_are_not_sent(tun) -> None:
    t, _, sock = tun
    t.set_peers(OBJ, [(FOA, 42)])
    pkt = inner_packet()
    t.encapsulate(pkt + b"\xee" * 6)
    assert bytes(sent_gre(sock)[0][1].payload) == pkt


# --- decapsulation (GRE -> TUN) -----------------------------------------------------------------


def test_decapsulates_accepted_binding_into_the_tun(tun) -> None:
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    pkt = inner_packet()
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(pkt)))
    sock.incoming.append(outer_packet(GreHeader(key=42, sequence=5, checksum=True).encode(pkt)))
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(pkt + b"pad")))  # trimmed
    t._from_wire()
    assert fake_tun.to_kernel() == [pkt, pkt, pkt]
    assert t.stats["decapsulated"] == 3


def test_a_binding_with_a_delivery_goes_as_a_frame_to_that_neighbour_not_the_tun(tun) -> None:
    """An FOA that runs an instance of the object itself hands the instance behind it its
    packets as frames (by GRE key), never to its own stack (issue 11)."""
    t, fake_tun, sock = tun
    frames: list[tuple[bytes, tuple]] = []
    t._frames = type("Frames", (), {"sendto": lambda self, data, to: frames.append((data, to)),
                                    "close": lambda self: None})()
    t.accept(HOA, 42)
    t.accept(HOA, 43)
    t.set_delivery(HOA, 42, ("eth0", "02:00:00:00:12:02"))
    pkt = inner_packet()
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(pkt)))
    sock.incoming.append(outer_packet(GreHeader(key=43).encode(pkt)))
    t._from_wire()
    assert frames == [(pkt, ("eth0", 0x0800, 0, 0, bytes.fromhex("020000001202")))]
    assert fake_tun.to_kernel() == [pkt]  # key 43: this router's own instance
    t.set_delivery(HOA, 42, None)
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(pkt)))
    t._from_wire()
    assert len(frames) == 1 and fake_tun.to_kernel() == [pkt]  # routed again


def test_a_restricted_binding_decapsulates_only_for_its_visitor(tun) -> None:
    """Issue 12: an FOA drops what a known (remote, key) carries for anyone but its visitor."""
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    t.restrict(HOA, 42, frozenset({OBJ}))
    for_visitor, for_other = inner_packet(), inner_packet(dst="10.12.0.99")
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(for_visitor)))
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(for_other)))
    t._from_wire()
    assert fake_tun.to_kernel() == [for_visitor]
    assert t.stats["dropped_not_visitor"] == 1 and t.stats["decapsulated"] == 1
    t.forget(HOA, 42)
    assert (HOA, 42) not in t.destinations


def test_scapy_built_gre_is_accepted() -> None:
    t = UserspaceTunnel(asyncio.new_event_loop(), FOA)
    t.accept(HOA, 7)
    pkt = inner_packet()
    wire = bytes(IP(src=HOA, dst=FOA) / GRE(key_present=1, key=7, proto=0x0800) / IP(pkt))
    assert t.decapsulate(wire) == pkt
    t.loop.close()


def test_unknown_remote_or_key_dropped(tun) -> None:
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    pkt = inner_packet()
    sock.incoming += [
        outer_packet(GreHeader(key=43).encode(pkt)),              # other key
        outer_packet(GreHeader(key=42).encode(pkt), src=FOA2),    # other remote
        outer_packet(GreHeader().encode(pkt)),                    # no key at all
    ]
    t._from_wire()
    assert fake_tun.to_kernel() == []
    assert t.stats["dropped_unknown_peer"] == 3 and t.stats["decapsulated"] == 0


def _bad_checksum() -> bytes:
    gre = bytearray(GreHeader(key=42, checksum=True).encode(inner_packet()))
    gre[4] ^= 0xFF
    return bytes(gre)


MALFORMED = {
    "empty GRE": b"",
    "truncated base header": b"\x20\x00",
    "version 1": b"\x00\x01\x08\x00",
    "reserved bit": b"\x40\x00\x08\x00",
    "key cut short": b"\x20\x00\x08\x00\x00\x00",
    "bad checksum": _bad_checksum(),
    "IPv6 payload type": GreHeader(0x86DD, key=42).encode(inner_packet()),
    "transparent ethernet": GreHeader(0x6558, key=42).encode(bytes(14) + inner_packet()),
    "inner not IPv4": GreHeader(key=42).encode(b"\x60" + bytes(39)),
    "inner cut short": GreHeader(key=42).encode(inner_packet()[:15]),
    "inner total length too big": GreHeader(key=42).encode(inner_packet()[:-4]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_gre_counted_never_raised(tun, name: str) -> None:
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    sock.incoming.append(outer_packet(MALFORMED[name]))
    t._from_wire()
    assert fake_tun.to_kernel() == []
    assert t.stats["dropped_malformed"] == 1 and t.stats["decapsulated"] == 0


@pytest.mark.parametrize("outer", [
    b"",
    b"\x45\x00",
    bytes(IP(src=HOA, dst=FOA, proto=17) / GreHeader(key=42).encode(inner_packet())),  # not GRE
    b"\x65" + outer_packet(GreHeader(key=42).encode(inner_packet()))[1:],              # IP version 6
    outer_packet(GreHeader(key=42).encode(inner_packet()))[:-1],  # cut: total length lies
])
def test_malformed_outer_header_counted(tun, outer: bytes) -> None:
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    sock.incoming.append(outer)
    t._from_wire()
    assert fake_tun.to_kernel() == []
    assert t.stats["dropped_malformed"] == 1


def test_fuzzed_gre_never_raises(tun) -> None:
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    rng = random.Random(2784)
    good = GreHeader(key=42).encode(inner_packet())
    for _ in range(3000):
        data = bytearray(good[: rng.randrange(len(good) + 1)])
        for _ in range(rng.randrange(5)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        sock.incoming.append(outer_packet(bytes(data)))
        t._from_wire()
    fake_tun.to_kernel()
    s = t.stats
    assert s["decapsulated"] + s["dropped_malformed"] + s["dropped_unknown_peer"] == 3000


def test_handler_errors_never_reach_the_loop(tun, monkeypatch) -> None:
    t, fake_tun, sock = tun
    t.set_peers(OBJ, [(FOA, 42)])

    def boom(*_a: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(t, "decapsulate", boom)
    monkeypatch.setattr(t, "encapsulate", boom)
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(inner_packet())))
    fake_tun.from_kernel(inner_packet())
    t._from_wire()
    t._from_tun()
    assert t.stats["dropped_malformed"] == 2


def test_tun_write_failure_counted(tun) -> None:
    t, fake_tun, sock = tun
    t.accept(HOA, 42)
    fake_tun.peer.close()  # the kernel side is gone: writes fail
    sock.incoming.append(outer_packet(GreHeader(key=42).encode(inner_packet())))
    t._from_wire()
    assert t.stats["dropped_send_error"] == 1 and t.stats["decapsulated"] == 0


def test_loop_drives_both_directions(loop, netlink: Netlink) -> None:
    """Readers registered with a real loop: bytes in on either side come out on the other."""
    fake_tun = Tun()
    wire_a, wire_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    wire_a.setblocking(False)

    class WireSocket(FakeRawSocket):
        def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
            data = wire_a.recv(size)
            return data, ("?", 0)

    sock = WireSocket(wire_a.fileno())
    t = UserspaceTunnel(loop, FOA, netlink=netlink)
    t._attach(fake_tun.fd, sock)
    t.accept(HOA, 42)
    t.set_reverse(OBJ, (HOA, 42))
    wire_b.send(outer_packet(GreHeader(key=42).encode(inner_packet()), src=HOA, dst=FOA))
    fake_tun.from_kernel(inner_packet(src=OBJ, dst=CLIENT))

    async def until_done() -> None:
        for _ in range(100):
            if t.stats["decapsulated"] and sock.sent:
                return
            await asyncio.sleep(0.01)

    loop.run_until_complete(until_done())
    assert fake_tun.to_kernel() == [inner_packet()]
    assert [(remote, g.key, g.payload.src) for remote, g in sent_gre(sock)] == [(HOA, 42, OBJ)]
    t.close()
    assert not loop.remove_reader(wire_a.fileno())  # close() unregistered it
    wire_a.close()
    wire_b.close()
    fake_tun.peer.close()


# --- kernel backend with a fake netlink -------------------------------------------------------


class Settled:
    """The fake IPRoute, read only after the tunnel's queued changes are applied."""

    def __init__(self, rec: Rec) -> None:
        object.__setattr__(self, "rec", rec)

    def __getattr__(self, name: str) -> Any:
        self.rec.settle()
        return getattr(self.rec.ipr, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self.rec.settle()
        setattr(self.rec.ipr, name, value)


@pytest.fixture
def ktun(loop, rec: Rec, netlink: Netlink, tmp_path) -> tuple[KernelTunnel, Any, Rec]:
    t = KernelTunnel(loop, HOA, netlink=netlink, sysfs=str(tmp_path))
    rec.tunnels.append(t)
    t.start()
    return t, Settled(rec), rec


def test_kernel_set_peers_devices_route_and_bicast_mirror(ktun) -> None:
    t, ipr, rec = ktun
    t.set_peers(OBJ, [(FOA, 42), (FOA2, 43)])
    assert set(ipr.links) == {"mg42", "mg43"}
    spec = ipr.links["mg42"]
    assert spec["kind"] == "gre" and spec["state"] == "up"
    assert (spec["gre_local"], spec["gre_remote"], spec["gre_ikey"], spec["gre_okey"]) == (HOA, FOA, 42, 42)
    assert spec["gre_iflags"] == spec["gre_oflags"] == GRE_KEY_FLAG == 0x2000
    assert ipr.routes[-1] == ("replace", {"dst": f"{OBJ}/32", "oif": ipr.index["mg42"]})
    tc = [c for c in rec.joined() if c.startswith("tc")]
    assert tc == [
        "tc del clsact mg42",
        "tc add clsact mg42",
        "tc add-filter u32 mg42 match 0x0a610064/0xffffffff+16 mirror mg43",  # ip dst OBJ/32
    ]
    rec.calls.clear()
    t.set_peers(OBJ, [(FOA, 42)])  # one binding left: no mirror, mg43 goes
    assert [c for c in rec.joined() if c.startswith("tc")] == ["tc del clsact mg42"]
    assert set(ipr.links) == {"mg42"}
    t.set_peers(OBJ, [])
    assert ipr.routes[-1] == ("del", {"dst": f"{OBJ}/32"})
    assert ipr.links == {}


def test_kernel_accept_forget_and_shared_devices(ktun) -> None:
    t, ipr, _ = ktun
    t.accept(FOA, 42)
    assert ipr.links["mg42"]["gre_ikey"] == 42
    t.set_peers(OBJ, [(FOA, 42)])
    t.set_peers(OBJ, [])
    assert "mg42" in ipr.links  # still accepted
    t.forget(FOA, 42)
    assert ipr.links == {}


def test_kernel_device_names_unique_and_stale_device_replaced(ktun) -> None:
    t, ipr, _ = ktun
    t.accept(FOA, 42)
    t.accept(FOA2, 42)
    assert t.devices == {(FOA, 42): "mg42", (FOA2, 42): "mg42x1"}
    # a device left by a killed agent: deleted and made again
    ipr.links["mg7"] = {"ifname": "mg7"}
    ipr.index["mg7"] = 99
    t.accept(FOA, 7)
    assert ipr.links["mg7"]["gre_remote"] == FOA


def test_kernel_device_failure_is_a_tunnel_error(ktun) -> None:
    t, ipr, rec = ktun
    ipr.add_error = FakeNetlinkError(errno.EOPNOTSUPP)
    t.accept(FOA, 42)  # queued: the refusal comes back from settle
    with pytest.raises(tunnel_mod.TunnelError, match="cannot create GRE device mg42"):
        rec.settle()
    assert t.devices == {}  # forgotten, so the next accept tries again


def test_kernel_reverse_table_per_device(ktun) -> None:
    t, ipr, _ = ktun
    t.set_reverse(OBJ, (HOA, 42))
    t.set_reverse("10.97.0.101", (HOA, 43))
    t.set_reverse("10.97.0.102", (HOA, 42))
    tables = {kw["table"] for op, kw in ipr.routes if op == "replace" and kw["dst"] == "0.0.0.0/0"}
    assert tables == {4347, 4348}
    assert [(op, kw["src"], kw["table"]) for op, kw in ipr.rules] == [
        ("add", OBJ, 4347), ("add", "10.97.0.101", 4348), ("add", "10.97.0.102", 4347)]
    t.set_reverse(OBJ, None)
    assert "mg42" in ipr.links  # 10.97.0.102 still uses it
    t.set_reverse("10.97.0.102", None)
    assert "mg42" not in ipr.links
    assert ipr.rules[-1] == ("del", {"src": "10.97.0.102", "src_len": 32, "table": 4347, "priority": 4347})


def test_kernel_close_removes_everything(ktun) -> None:
    t, ipr, rec = ktun
    t.set_peers(OBJ, [(FOA, 42), (FOA2, 43)])
    t.accept(FOA, 44)
    t.set_reverse("10.97.0.5", (FOA, 44))
    t.close()
    t.close()
    assert ipr.links == {} and t.devices == {}
    assert ("del", {"src": "10.97.0.5", "src_len": 32, "table": 4347, "priority": 4347}) in ipr.rules
    assert not ipr.closed  # injected netlink belongs to the caller


def test_kernel_stats_from_device_counters(ktun, tmp_path) -> None:
    t, _, _ = ktun
    t.set_peers(OBJ, [(FOA, 42), (FOA2, 43)])
    for dev, tx, rx in (("mg42", 5, 1), ("mg43", 5, 0)):
        d = tmp_path / dev / "statistics"
        d.mkdir(parents=True)
        (d / "tx_packets").write_text(f"{tx}\n")
        (d / "rx_packets").write_text(f"{rx}\n")
    s = t.stats
    assert (s["encapsulated"], s["copies_sent"], s["decapsulated"]) == (5, 10, 1)


# --- choosing the backend ---------------------------------------------------------------------


def test_make_tunnel_forced_kernel_unavailable(monkeypatch, loop) -> None:
    monkeypatch.setattr(choose_mod, "_probe_kernel_gre", lambda: "the kernel cannot create a GRE device here: "
                        "(95, 'Operation not supported') (no ip_gre module)")
    monkeypatch.setattr(choose_mod, "probe_ebpf", lambda: "no clang")  # auto's next choice
    with pytest.raises(TunnelUnavailable, match="kernel GRE backend requested but unavailable.*no ip_gre") as exc:
        make_tunnel("kernel", loop=loop, local=HOA)
    assert "userspace" in str(exc.value) and "ip_gre" in exc.value.reason
    assert detect_backend() == "userspace"
    auto = make_tunnel("auto", loop=loop, local=HOA)
    assert isinstance(auto, UserspaceTunnel) and auto.backend == "userspace"
    forced = make_tunnel("userspace", loop=loop, local=HOA, name="moatu1")
    assert forced.name == "moatu1"


def test_make_tunnel_kernel_when_available(monkeypatch, loop) -> None:
    monkeypatch.setattr(choose_mod, "_probe_kernel_gre", lambda: None)
    assert detect_backend() == "kernel"
    assert isinstance(make_tunnel("auto", loop=loop, local=HOA), KernelTunnel)
    assert make_tunnel("kernel", loop=loop, local=HOA).backend == "kernel"
    with pytest.raises(ValueError, match="unknown tunnel backend"):
        make_tunnel("ovs", loop=loop, local=HOA)


@pytest.mark.parametrize("add_error, expect", [
    (None, None),
    (FakeNetlinkError(errno.EEXIST), None),
    (FakeNetlinkError(errno.EOPNOTSUPP), "no ip_gre module"),
    (FakeNetlinkError(errno.EPERM), "Operation not permitted"),
])
def test_probe_creates_and_deletes_a_throwaway_gre(add_error, expect) -> None:
    ipr = FakeIPRoute()
    ipr.add_error = add_error
    worker = Netlink(lambda: ipr, timeout=5)
    try:
        reason = tunnel_mod._probe_kernel_gre(worker)
    finally:
        worker.close()
    if expect is None:
        assert reason is None
    else:
        assert expect in reason
    assert ipr.links == {} and ipr.index == {} and ipr.closed  # nothing left behind


def test_probe_without_netlink_names_the_reason() -> None:
    def broken() -> Any:
        raise OSError(errno.EPROTONOSUPPORT, "no netlink here")

    worker = Netlink(broken, timeout=5)
    try:
        assert "netlink unavailable" in tunnel_mod._probe_kernel_gre(worker)
    finally:
        worker.close()


def test_tunnel_name_length_checked(loop) -> None:
    with pytest.raises(ValueError, match="1..15"):
        UserspaceTunnel(loop, HOA, name="x" * 16)
    with pytest.raises(ValueError):
        UserspaceTunnel(loop, "not-an-address")


def test_refused_rule_is_reported_undone_and_retried(tun, rec: Rec, ipr: FakeIPRoute) -> None:
    t, _, _ = tun
    ipr.fail = {"rule add"}
    t.set_reverse(OBJ, (HOA, 42))
    with pytest.raises(tunnel_mod.TunnelError, match=f"rule from {OBJ} lookup 4347"):
        rec.settle()
    assert t._rules == set()  # so that the next binding tries again
    ipr.fail = set()
    t.set_reverse(OBJ, None)
    t.set_reverse(OBJ, (HOA, 43))
    assert rec.joined()[-1] == f"rule add from {OBJ}/32 lookup 4347 priority 4347"


def test_kernel_changes_run_on_the_netlink_worker_not_the_loop(tun, rec: Rec, ipr: FakeIPRoute) -> None:
    t, _, _ = tun
    t.set_peers(OBJ, [(FOA, 42)])
    t.set_reverse(OBJ, (HOA, 42))
    rec.settle()
    assert ipr.threads == {"moat-netlink"}
