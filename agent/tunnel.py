"""GRE tunnels between object agents: one interface, two backends (DESIGN §5).

* :class:`UserspaceTunnel` — a TUN device plus a raw IP-protocol-47 socket. Works on any
  kernel with TUN (MOAT's CI machines have no GRE module); this is what CI exercises.
* :class:`KernelTunnel` — GRE netdevs through pyroute2, where the kernel has GRE.

Both put the same RFC 2784/2890 packets on the wire (key = binding id), and both leave
routing to the kernel: the HOA routes an away object's home address into the tunnel,
the FOA hands decapsulated packets back to the kernel, which routes them to wherever the
object runs. :func:`make_tunnel` picks the backend ("auto": kernel if it can make a GRE
device here, else userspace).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import subprocess
from typing import Any

from packets import MalformedMessage
from packets.codes import GRE_PROTO
from packets.gre import ETH_P_IP, GreHeader, decode_gre

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
TUN_MTU = 1500 - 20 - 8
REVERSE_TABLE = 4347  # policy-routing table for reverse-tunnelled sources
REVERSE_PRIORITY = 4347


class TunnelUnavailable(Exception):
    """The requested backend cannot run here (e.g. kernel GRE on a kernel without it)."""


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


def ipv4_addresses(packet: bytes) -> tuple[str, str] | None:
    """(src, dst) of an IPv4 packet, or None if it is not one."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    return socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])


class _Tables:
    """Who gets what: the state both backends keep, and what ``stats`` reports."""

    def __init__(self) -> None:
        self.peers: dict[str, list[tuple[str, int]]] = {}
        self.accepted: set[tuple[str, int]] = set()
        self.reverse: dict[str, tuple[str, int]] = {}
        self.stats = {"encapsulated": 0, "copies_sent": 0, "decapsulated": 0,
                      "dropped_unknown_peer": 0, "dropped_malformed": 0, "dropped_no_route": 0}


class UserspaceTunnel(_Tables):
    """TUN device + raw GRE socket; the daemon's asyncio loop drives both."""

    backend = "userspace"

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0") -> None:
        super().__init__()
        self.loop, self.local, self.name = loop, local, name
        self.tun_fd: int | None = None
        self.sock: socket.socket | None = None
        self._rules: set[str] = set()

    def start(self) -> None:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError:
            os.close(fd)
            raise
        self.tun_fd = fd
        # Packets injected after decapsulation come in from this device with sources the
        # kernel would not route back through it: turn reverse-path filtering off here.
        with open(f"/proc/sys/net/ipv4/conf/{self.name}/rp_filter", "w") as f:
            f.write("0")
        # 1500 minus the outer IPv4 header and a keyed GRE header, as a kernel GRE device.
        _ip("link", "set", self.name, "mtu", str(TUN_MTU), "up")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, GRE_PROTO)
        self.sock.setblocking(False)
        try:
            self.sock.bind((self.local, 0))  # outer source = our care-of / agent address
        except OSError as exc:
            log.warning("GRE socket cannot bind %s (%s); the kernel picks the source", self.local, exc)
        self.loop.add_reader(fd, self._from_tun)
        self.loop.add_reader(self.sock.fileno(), self._from_wire)
        log.info("userspace GRE tunnel %s up (local %s)", self.name, self.local)

    def close(self) -> None:
        for home in list(self.peers):
            self.set_peers(home, [])
        for src in list(self.reverse):
            self.set_reverse(src, None)
        if self.tun_fd is not None:
            self.loop.remove_reader(self.tun_fd)
            os.close(self.tun_fd)  # the kernel removes the TUN device with its last fd
            self.tun_fd = None
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    # --- tables --------------------------------------------------------------------------

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        if peers:
            self.peers[inner_dst] = list(peers)
            out = _ip("route", "replace", f"{inner_dst}/32", "dev", self.name)
            if out.returncode:
                log.warning("route %s into %s: %s", inner_dst, self.name, out.stderr.strip())
        elif self.peers.pop(inner_dst, None) is not None:
            _ip("route", "del", f"{inner_dst}/32", "dev", self.name)

    def accept(self, remote: str, key: int) -> None:
        self.accepted.add((remote, key))

    def forget(self, remote: str, key: int) -> None:
        self.accepted.discard((remote, key))

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        if peer is not None:
            self.reverse[inner_src] = peer
            _ip("route", "replace", "default", "dev", self.name, "table", str(REVERSE_TABLE))
            if inner_src not in self._rules:
                _ip("rule", "add", "from", f"{inner_src}/32", "lookup", str(REVERSE_TABLE),
                    "priority", str(REVERSE_PRIORITY))
                self._rules.add(inner_src)
        else:
            self.reverse.pop(inner_src, None)
            if inner_src in self._rules:
                _ip("rule", "del", "from", f"{inner_src}/32", "lookup", str(REVERSE_TABLE),
                    "priority", str(REVERSE_PRIORITY))
                self._rules.discard(inner_src)

    # --- packets -------------------------------------------------------------------------

    def _from_tun(self) -> None:
        assert self.tun_fd is not None
        for _ in range(256):  # bounded: never starve the loop
            try:
                packet = os.read(self.tun_fd, 65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("TUN read failed: %s", exc)
                return
            self.encapsulate(packet)

    def encapsulate(self, packet: bytes) -> int:
        """Send one inner packet to every peer of its destination (or its reverse peer)."""
        addrs = ipv4_addresses(packet)
        if addrs is None:
            self.stats["dropped_malformed"] += 1
            return 0
        src, dst = addrs
        peers = self.peers.get(dst) or ([self.reverse[src]] if src in self.reverse else [])
        if not peers:
            self.stats["dropped_no_route"] += 1
            return 0
        self.stats["encapsulated"] += 1
        sent = 0
        for remote, key in peers:
            try:
                assert self.sock is not None
                self.sock.sendto(GreHeader(ETH_P_IP, key=key).encode(packet), (remote, 0))
                sent += 1
            except OSError as exc:
                log.info("GRE to %s failed: %s", remote, exc)
        self.stats["copies_sent"] += sent
        return sent

    def _from_wire(self) -> None:
        assert self.sock is not None
        for _ in range(256):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("GRE receive failed: %s", exc)
                return
            inner = self.decapsulate(data, addr[0])
            if inner is not None and self.tun_fd is not None:
                try:
                    os.write(self.tun_fd, inner)
                except OSError as exc:
                    log.info("TUN write failed: %s", exc)

    def decapsulate(self, ip_packet: bytes, source: str) -> bytes | None:
        """The inner packet of a GRE packet from an accepted (source, key), else None."""
        if len(ip_packet) < 20:
            self.stats["dropped_malformed"] += 1
            return None
        try:
            header, inner = decode_gre(ip_packet[(ip_packet[0] & 0x0F) * 4:])
        except MalformedMessage:
            self.stats["dropped_malformed"] += 1
            return None
        if header.protocol != ETH_P_IP or ipv4_addresses(inner) is None:
            self.stats["dropped_malformed"] += 1
            return None
        if header.key is None or (source, header.key) not in self.accepted:
            self.stats["dropped_unknown_peer"] += 1
            return None
        self.stats["decapsulated"] += 1
        return inner


class KernelTunnel(_Tables):
    """GRE netdevs (pyroute2): one per (remote, key); bicast copies with tc mirred."""

    backend = "kernel"

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0") -> None:
        super().__init__()
        self.loop, self.local, self.name = loop, local, name
        self.devices: dict[tuple[str, int], str] = {}
        self._rules: set[str] = set()

    def start(self) -> None:
        from pyroute2 import IPRoute

        self.ipr: Any = IPRoute()

    def _device(self, remote: str, key: int) -> str:
        dev = self.devices.get((remote, key))
        if dev is None:
            dev = f"mg{key}"[:15]
            self.ipr.link("add", ifname=dev, kind="gre", gre_local=self.local, gre_remote=remote,
                          gre_ikey=key, gre_okey=key, gre_iflags=0x2000, gre_oflags=0x2000)
            idx = self.ipr.link_lookup(ifname=dev)[0]
            self.ipr.link("set", index=idx, state="up")
            with open(f"/proc/sys/net/ipv4/conf/{dev}/rp_filter", "w") as f:
                f.write("0")
            self.devices[(remote, key)] = dev
        return dev

    def _drop_device(self, remote: str, key: int) -> None:
        dev = self.devices.pop((remote, key), None)
        if dev is not None:
            _ip("link", "del", dev)

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        old = self.peers.get(inner_dst, [])
        if peers:
            devs = [self._device(r, k) for r, k in peers]
            _ip("route", "replace", f"{inner_dst}/32", "dev", devs[0])
            subprocess.run(["tc", "qdisc", "del", "dev", devs[0], "clsact"], capture_output=True, timeout=10)
            if len(devs) > 1:  # bicast: mirror every packet routed to the first to the others
                subprocess.run(["tc", "qdisc", "add", "dev", devs[0], "clsact"], capture_output=True, timeout=10)
                actions = []
                for other in devs[1:]:
                    actions += ["action", "mirred", "egress", "mirror", "dev", other]
                subprocess.run(["tc", "filter", "add", "dev", devs[0], "egress", "matchall", *actions],
                               capture_output=True, timeout=10)
            self.peers[inner_dst] = list(peers)
        else:
            self.peers.pop(inner_dst, None)
            _ip("route", "del", f"{inner_dst}/32")
        for gone in set(old) - set(peers) - self.accepted:
            self._drop_device(*gone)

    def accept(self, remote: str, key: int) -> None:
        self._device(remote, key)  # the kernel decapsulates what matches it
        self.accepted.add((remote, key))

    def forget(self, remote: str, key: int) -> None:
        self.accepted.discard((remote, key))
        if not any((remote, key) in p for p in self.peers.values()):
            self._drop_device(remote, key)

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        if peer is not None:
            dev = self._device(*peer)
            _ip("route", "replace", "default", "dev", dev, "table", str(REVERSE_TABLE))
            if inner_src not in self._rules:
                _ip("rule", "add", "from", f"{inner_src}/32", "lookup", str(REVERSE_TABLE),
                    "priority", str(REVERSE_PRIORITY))
                self._rules.add(inner_src)
            self.reverse[inner_src] = peer
        else:
            self.reverse.pop(inner_src, None)
            if inner_src in self._rules:
                _ip("rule", "del", "from", f"{inner_src}/32", "lookup", str(REVERSE_TABLE),
                    "priority", str(REVERSE_PRIORITY))
                self._rules.discard(inner_src)

    def close(self) -> None:
        for src in list(self.reverse):
            self.set_reverse(src, None)
        for home in list(self.peers):
            self.set_peers(home, [])
        for remote, key in list(self.devices):
            self._drop_device(remote, key)
        if hasattr(self, "ipr"):
            self.ipr.close()


def detect_backend() -> str:
    """"kernel" if a GRE netdev can be made in this namespace, else "userspace"."""
    probe = f"moatgre{os.getpid() % 10000}"[:15]
    out = _ip("link", "add", probe, "type", "gre", "local", "127.0.0.1", "remote", "127.0.0.2")
    if out.returncode == 0:
        _ip("link", "del", probe)
        return "kernel"
    return "userspace"


def make_tunnel(backend: str = "auto", *, loop: asyncio.AbstractEventLoop, local: str,
                name: str = "moat0") -> UserspaceTunnel | KernelTunnel:
    """The tunnel for ``backend`` ("auto", "kernel" or "userspace")."""
    chosen = detect_backend() if backend == "auto" else backend
    if chosen == "kernel":
        if backend == "kernel" and detect_backend() != "kernel":
            raise TunnelUnavailable("kernel GRE requested but this kernel cannot create a GRE "
                                    "device (no ip_gre module); use --backend userspace")
        return KernelTunnel(loop, local, name)
    if chosen == "userspace":
        return UserspaceTunnel(loop, local, name)
    raise TunnelUnavailable(f"unknown tunnel backend {backend!r}")
