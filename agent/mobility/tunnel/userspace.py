"""The userspace GRE backend: one TUN device plus one raw IP-protocol-47 socket.

It needs nothing but ``/dev/net/tun``: MOAT's development and CI machines have no GRE module,
so this is the backend CI exercises. The daemon's asyncio loop drives both file descriptors;
routes and rules go through the netlink queue of :class:`~.base.Tunnel`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import logging
import os
import socket
import struct
from typing import Any, Callable

from packets.errors import MalformedMessage
from packets.gre import ETH_P_IP, GreHeader, decode_gre

from agent.core import netlink as nl
from agent.mobility.tunnel.base import (GRE_PROTO, REVERSE_PRIORITY, REVERSE_TABLE, Tunnel,
                                        TunnelError, TunnelUnavailable, check_address,
                                        check_peer, dedupe, parse_ipv4)

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
#: Like a kernel GRE device on a 1500-byte link: outer IPv4 header (20) + keyed GRE (8).
TUN_MTU = 1500 - 20 - 8
TUN_QUEUE = 4096
SOCKET_BUFFER = 4 << 20
READ_BURST = 256       # packets per readiness callback: never starve the loop
MAX_PACKET = 65535
#: Packets kept per inner destination whose last peer just went, until the kernel has deleted
#: its route into the TUN; then sent again for the kernel to route afresh (see set_peers).
REROUTE_MAX = 64


class UserspaceTunnel(Tunnel):
    """TUN device + raw GRE socket; the daemon's asyncio loop drives both.

    Outgoing: the kernel routes an inner packet into the TUN device (host routes for
    ``set_peers``, a policy table for ``set_reverse``); we read it, look up its destination
    (then its source), and send ``GreHeader(key=k).encode(inner)`` on a raw protocol-47 socket
    to every peer; the kernel adds the outer IPv4 header, with ``local`` as its source.

    Incoming: the raw socket gets every GRE packet addressed to this namespace, outer header
    included. We check it, check ``(outer source, key)`` is accepted, and write the inner
    packet to the TUN device, where the kernel receives and routes it.
    """

    backend = "userspace"
    peers_in_kernel = False  # its own table, read on the next packet

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 netlink: nl.Netlink | None = None, table: int = REVERSE_TABLE,
                 priority: int = REVERSE_PRIORITY) -> None:
        super().__init__(loop, local, name, netlink=netlink)
        self.table, self.priority = table, priority
        self.tun_fd: int | None = None
        self.sock: Any = None
        self._registered: list[int] = []
        self._rules: set[str] = set()
        self._reverse_route = False
        self._pktinfo = True  # send with IP_PKTINFO (source = local) until the kernel refuses
        self._closed = False
        #: (remote, key) -> the inner destinations it may carry (an FOA's visitor).
        self.destinations: dict[tuple[str, int], frozenset[str]] = {}
        #: (remote, key) -> (interface, MAC): delivered as frames to that neighbour.
        self.deliveries: dict[tuple[str, int], tuple[str, str]] = {}
        self._frames: socket.socket | None = None
        self._peer: tuple[str, int] | None = None  # of the last packet decapsulated
        #: Inner destination -> packets read while its route into the TUN is being deleted.
        self._leaving: dict[str, list[bytes]] = {}
        #: Raw IP socket (IPPROTO_RAW: the header as read) for those packets; made on first use.
        self.reroute_sock: Any = None

    # --- life cycle ------------------------------------------------------------------------

    def _begin(self) -> concurrent.futures.Future[Any] | None:
        """Make the TUN device and the raw socket; the device comes up via the netlink queue."""
        fd = self._open_tun()
        try:
            self._rp.relax_device(self.name)
            self._rp.relax_all()
            sock = self._open_socket()
        except BaseException:
            os.close(fd)
            self._rp.restore()
            raise
        self._closed = False
        # A longer TUN queue than the default 500 packets: the agent drains it from one
        # event loop, and bursts (a TCP window) arrive faster than one read per packet.
        up = self._apply(nl.op_link_set(self.name, up=True, mtu=TUN_MTU, txqlen=TUN_QUEUE),
                         f"cannot bring TUN device {self.name} up")
        self._attach(fd, sock)
        log.info("userspace GRE tunnel %s up (local %s)", self.name, self.local)
        return up

    def _open_tun(self) -> int:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunnelUnavailable(f"userspace GRE needs /dev/net/tun: {exc}") from exc
        try:
            ifr = struct.pack("16sH22x", self.name.encode(), IFF_TUN | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise TunnelError(f"cannot create TUN device {self.name}: {exc}") from exc
        return fd

    @staticmethod
    def _open_socket() -> socket.socket:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, GRE_PROTO)
        except OSError as exc:
            raise TunnelUnavailable(f"raw GRE socket (needs root / CAP_NET_RAW): {exc}") from exc
        sock.setblocking(False)
        # The bench found the FOA's raw socket buffer (the default ~200 KiB) overflowing
        # under TCP load; SO_RCVBUFFORCE passes the net.core.rmem_max cap as root.
        for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                break
            except OSError:
                continue
        return sock

    def _attach(self, tun_fd: int, sock: Any) -> None:
        """Take over a TUN fd and a raw socket and read both from the loop (tests pass fakes)."""
        self.tun_fd, self.sock = tun_fd, sock
        self.loop.add_reader(tun_fd, self._from_tun)
        self._registered.append(tun_fd)
        sock_fd = sock.fileno()
        if sock_fd >= 0:
            self.loop.add_reader(sock_fd, self._from_wire)
            self._registered.append(sock_fd)

    def close(self) -> None:
        """Remove routes, rules, the device and the socket; safe to call twice.

        The removals are queued before the TUN fd closes; the kernel drops the device's own
        routes with it anyway, and the policy rules are removed by the netlink worker.
        """
        if self._closed:
            return
        self._closed = True
        self._unroute_reverse()
        for dst in list(self.peers):
            self._apply(nl.op_route("del", f"{dst}/32", ifname=self.name), f"remove route {dst}/32")
        self.peers.clear()
        self.reverse.clear()
        self.accepted.clear()
        self._release_fds()
        self._rp.restore()
        log.info("userspace GRE tunnel %s closed: %s", self.name, self._counters)

    def _release_fds(self) -> None:
        for fd in self._registered:
            try:
                self.loop.remove_reader(fd)
            except (ValueError, OSError, RuntimeError):  # loop already closed
                pass
        self._registered.clear()
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        if self.tun_fd is not None:
            try:
                os.close(self.tun_fd)  # the kernel removes a non-persistent TUN with its last fd
            except OSError:
                pass
            self.tun_fd = None
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        if self.reroute_sock is not None:
            self.reroute_sock.close()
            self.reroute_sock = None
        self._leaving.clear()

    # --- tables ------------------------------------------------------------------------------

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        inner_dst = check_address(inner_dst, "inner destination")
        wanted = dedupe(peers)
        if wanted:
            self.peers[inner_dst] = wanted
            self._apply(nl.op_route("replace", f"{inner_dst}/32", ifname=self.name),
                        f"route {inner_dst}/32 dev {self.name}")
        elif self.peers.pop(inner_dst, None) is not None:
            # Until the kernel has deleted the route, packets for inner_dst still come into
            # the TUN (a moving object's clients, through the HOA, when it went home): keep
            # them and send them again once the route is gone, to wherever the kernel routes
            # them now, instead of dropping them.
            self._leaving[inner_dst] = []
            future = self._apply(nl.op_route("del", f"{inner_dst}/32", ifname=self.name),
                                 f"remove route {inner_dst}/32",
                                 on_error=lambda: self._leaving.pop(inner_dst, None))
            if future is None:
                self._leaving.pop(inner_dst, None)
            else:
                future.add_done_callback(lambda _f: self._soon(self._reroute, inner_dst))

    def _soon(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` on the loop (from the netlink worker); nothing once it closed."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            pass

    def _reroute(self, inner_dst: str) -> None:
        """The route into the TUN is gone: what came for ``inner_dst`` meanwhile goes out
        again through a raw IP socket, routed by the kernel as it is now (to the home LAN
        when the object came home, or into the TUN again to new peers).

        The TUN's queue is read first: a packet the kernel routed into it before the route
        went may still be waiting there (the loop ran this callback before the read), and
        once this entry is gone it would be dropped for want of a peer. After the route is
        gone nothing new for ``inner_dst`` enters the TUN, so this read catches the last."""
        if inner_dst in self._leaving and not self._closed:
            self._from_tun()
        packets = self._leaving.pop(inner_dst, [])
        if not packets or self._closed:
            return
        try:
            if self.reroute_sock is None:
                self.reroute_sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
                self.reroute_sock.setblocking(False)
            for packet in packets:
                self.reroute_sock.sendto(packet, (inner_dst, 0))
                self._counters["rerouted"] += 1
        except OSError as exc:
            self._counters["dropped_no_peer"] += len(packets)
            self._limit("reroute", logging.WARNING, "packets for %s not sent again: %s", inner_dst, exc)

    def set_delivery(self, remote: str, key: int, via: tuple[str, str] | None) -> None:
        peer = check_peer((remote, key))
        if via is None:
            self.deliveries.pop(peer, None)
        else:
            self.deliveries[peer] = via

    def _to_neighbour(self, inner: bytes, via: tuple[str, str]) -> None:
        ifname, mac = via
        try:
            if self._frames is None:  # a packet socket: the frame skips the routing table
                self._frames = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                             socket.htons(ETH_P_IP))
                self._frames.setblocking(False)
            self._frames.sendto(inner, (ifname, ETH_P_IP, 0, 0, bytes.fromhex(mac.replace(":", ""))))
            self._counters["decapsulated"] += 1
        except OSError as exc:
            self._counters["dropped_send_error"] += 1
            self._limit(f"frame-{ifname}", logging.INFO, "frame to %s on %s failed: %s", mac,
                        ifname, exc)

    def accept(self, remote: str, key: int) -> None:
        self.accepted.add(check_peer((remote, key)))

    def forget(self, remote: str, key: int) -> None:
        peer = check_peer((remote, key))
        self.accepted.discard(peer)
        self.destinations.pop(peer, None)

    def restrict(self, remote: str, key: int, destinations: frozenset[str] | None) -> None:
        peer = check_peer((remote, key))
        if destinations is None:
            self.destinations.pop(peer, None)
        else:
            self.destinations[peer] = frozenset(destinations)

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        inner_src = check_address(inner_src, "inner source")
        if peer is None:
            self.reverse.pop(inner_src, None)
            self._unroute_reverse(inner_src)
            return
        self.reverse[inner_src] = check_peer(peer)
        self._route_reverse(inner_src)

    # --- packets -----------------------------------------------------------------------------

    def _from_tun(self) -> None:
        for _ in range(READ_BURST):
            if self.tun_fd is None:
                return
            try:
                packet = os.read(self.tun_fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._limit("tun-read", logging.WARNING, "TUN %s read failed: %s", self.name, exc)
                return
            if not packet:
                return
            try:
                self.encapsulate(packet)
            except Exception:  # never into the loop
                self._counters["dropped_malformed"] += 1
                log.exception("encapsulation failed")

    def peers_for(self, packet: bytes) -> list[tuple[str, int]]:
        """Where an inner packet goes: its destination's peers, else its source's reverse peer."""
        header = parse_ipv4(packet)
        peers = self.peers.get(header.dst)
        if peers:
            return peers
        reverse = self.reverse.get(header.src)
        return [reverse] if reverse is not None else []

    def encapsulate(self, packet: bytes) -> int:
        """Send one inner packet (read from the TUN) to every peer; the number of copies sent."""
        try:
            header = parse_ipv4(packet)
            peers = self.peers_for(packet)
        except MalformedMessage as exc:
            self._counters["dropped_malformed"] += 1
            self._limit("tun-bad", logging.DEBUG, "not IPv4 from %s: %s", self.name, exc)
            return 0
        if not peers:
            waiting = self._leaving.get(header.dst)
            if waiting is not None and len(waiting) < REROUTE_MAX:
                waiting.append(packet)  # its route is being deleted: sent again after (_reroute)
                return 0
            self._counters["dropped_no_peer"] += 1
            self._limit("no-peer", logging.DEBUG, "no peer for %s -> %s", header.src, header.dst)
            return 0
        if header.protocol == GRE_PROTO and any(header.dst == remote for remote, _ in peers):
            # Our own outer packet came back into the tunnel: its remote is routed into it.
            self._counters["dropped_loop"] += 1
            self._limit("loop", logging.WARNING, "GRE to %s routed into %s: tunnel loop, dropped",
                        header.dst, self.name)
            return 0
        inner = packet[: header.total_length]
        self._counters["encapsulated"] += 1
        sent = 0
        for remote, key in peers:
            if self._send(GreHeader(ETH_P_IP, key=key).encode(inner), remote):
                sent += 1
        self._counters["copies_sent"] += sent
        return sent

    def _send(self, gre: bytes, remote: str) -> bool:
        if self.sock is None:
            self._counters["dropped_send_error"] += 1
            return False
        try:
            if self._pktinfo:
                try:
                    pktinfo = struct.pack("=I4s4s", 0, socket.inet_aton(self.local), b"\0\0\0\0")
                    self.sock.sendmsg([gre], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, (remote, 0))
                    return True
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EADDRNOTAVAIL):
                        raise
                    self._pktinfo = False
                    log.warning("cannot send GRE from %s (%s): the kernel picks the outer source",
                                self.local, exc)
            self.sock.sendto(gre, (remote, 0))
            return True
        except OSError as exc:
            self._counters["dropped_send_error"] += 1
            self._limit(f"send-{remote}", logging.INFO, "GRE to %s failed: %s", remote, exc)
            return False

    def _from_wire(self) -> None:
        for _ in range(READ_BURST):
            if self.sock is None:
                return
            try:
                data, _addr = self.sock.recvfrom(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._limit("gre-read", logging.WARNING, "GRE receive failed: %s", exc)
                return
            try:
                inner = self.decapsulate(data)
            except Exception:  # never into the loop
                self._counters["dropped_malformed"] += 1
                log.exception("decapsulation failed")
                continue
            if inner is None:
                continue
            via = self.deliveries.get(self._peer) if self.deliveries else None
            if via is not None:
                self._to_neighbour(inner, via)
            elif self.tun_fd is not None:
                self._to_tun(inner)

    def _to_tun(self, inner: bytes) -> None:
        try:
            os.write(self.tun_fd, inner)  # type: ignore[arg-type] - checked by the caller
            self._counters["decapsulated"] += 1
        except OSError as exc:
            self._counters["dropped_send_error"] += 1
            self._limit("tun-write", logging.INFO, "TUN %s write failed: %s", self.name, exc)

    def decapsulate(self, ip_packet: bytes) -> bytes | None:
        """The inner packet of one received GRE packet (outer IPv4 header included), if it is
        well formed and from an accepted ``(outer source, key)``; else None, counted."""
        try:
            outer = parse_ipv4(ip_packet)
            if outer.protocol != GRE_PROTO:
                raise MalformedMessage(f"IP protocol {outer.protocol} is not GRE")
            gre, inner = decode_gre(ip_packet[outer.header_length: outer.total_length])
            if gre.protocol != ETH_P_IP:
                raise MalformedMessage(f"GRE protocol type 0x{gre.protocol:04x} is not IPv4")
            inner_header = parse_ipv4(inner)
        except MalformedMessage as exc:
            self._counters["dropped_malformed"] += 1
            self._limit("gre-bad", logging.INFO, "malformed GRE dropped: %s", exc)
            return None
        if gre.key is None or (outer.src, gre.key) not in self.accepted:
            self._counters["dropped_unknown_peer"] += 1
            self._limit(f"unknown-{outer.src}-{gre.key}", logging.INFO,
                        "GRE from %s key %s not accepted: dropped", outer.src, gre.key)
            return None
        allowed = self.destinations.get((outer.src, gre.key))
        if allowed is not None and inner_header.dst not in allowed:
            self._counters["dropped_not_visitor"] += 1
            self._limit(f"not-visitor-{outer.src}-{gre.key}", logging.INFO,
                        "GRE from %s key %s for %s, not its visitor: dropped", outer.src,
                        gre.key, inner_header.dst)
            return None
        self._peer = (outer.src, gre.key)
        return inner[: inner_header.total_length]
