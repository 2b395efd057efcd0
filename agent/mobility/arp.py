"""Proxy and gratuitous ARP for away objects (RFC 5944 §4.6), crafted with Scapy.

While an object is away, its home object agent answers ARP requests for the object's home
address on the home LAN with its own MAC, so home-LAN traffic for the object reaches the HOA
(which tunnels it). When the first binding is made the HOA broadcasts a gratuitous ARP so
neighbours drop stale entries; when the object returns, its own router broadcasts one with
its MAC.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from scapy.layers.l2 import ARP, Ether

from agent.mobility.arpframe import ARP_REPLY, ARP_REQUEST, gratuitous_arp_frame

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
BROADCAST = "ff:ff:ff:ff:ff:ff"


def interface_mac(ifname: str) -> str:
    return Path(f"/sys/class/net/{ifname}/address").read_text().strip()


def gratuitous_arp(ifname: str, address: str, mac: str | None = None,
                   op: int = ARP_REQUEST) -> bytes:
    """A gratuitous ARP announcing ``address`` at ``mac`` (RFC 5944 §4.6)."""
    return gratuitous_arp_frame(mac or interface_mac(ifname), address, op)  # packed: fast


class Announcer:
    """Gratuitous ARPs on kept packet sockets, one per interface (bound to no protocol: they
    receive nothing). A socket opened and closed per announcement waits on close for the
    kernel's network synchronisation, 25-35 ms on this machine, on the event loop: twice on
    a move's switch to home it was most of the commit's time."""

    def __init__(self) -> None:
        self._socks: dict[str, tuple[socket.socket, str]] = {}

    def announce(self, ifname: str, address: str, count: int = 2) -> None:
        """Broadcast ``count`` gratuitous ARPs for ``address`` from ``ifname``'s MAC."""
        kept = self._socks.get(ifname)
        if kept is None:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.bind((ifname, 0))
                kept = (sock, interface_mac(ifname))
            except OSError:
                sock.close()
                raise
            self._socks[ifname] = kept
        sock, mac = kept
        # Requests and replies alike: a router resolving the address learns only from a
        # reply (arpframe.gratuitous_arp_frame), hosts from either.
        frames = [gratuitous_arp(ifname, address, mac, op) for op in (ARP_REPLY, ARP_REQUEST)]
        for n in range(count):
            sock.send(frames[n % 2])
        log.info("gratuitous ARP for %s on %s", address, ifname)

    def close(self) -> None:
        for sock, _mac in self._socks.values():
            sock.close()
        self._socks.clear()


class ProxyArp:
    """Answers ARP requests for a changing set of addresses on one interface."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ifname: str) -> None:
        self.ifname = ifname
        self.mac = interface_mac(ifname)
        self.addresses: set[str] = set()
        self.answered = 0
        self._loop = loop
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.bind((ifname, ETH_P_ARP))
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def start(self, address: str) -> None:
        """Proxy ``address`` and announce it (first binding of an away object), on this
        proxy's own socket: a packet socket opened and closed per announcement costs the
        kernel's network synchronisation on close, 25-35 ms, the most of a registration
        when a thousand objects register at once (issue 15)."""
        if address not in self.addresses:
            self.addresses.add(address)
            frames = [gratuitous_arp(self.ifname, address, self.mac, op)
                      for op in (ARP_REPLY, ARP_REQUEST)]
            try:
                for frame in frames:
                    self.sock.send(frame)
                log.info("gratuitous ARP for %s on %s", address, self.ifname)
            except OSError as exc:
                log.warning("gratuitous ARP for %s failed: %s", address, exc)

    def stop(self, address: str) -> None:
        self.addresses.discard(address)

    def _on_readable(self) -> None:
        for _ in range(64):
            try:
                frame, (_if, _proto, pkttype, *_rest) = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("proxy ARP receive failed: %s", exc)
                return
            if pkttype == socket.PACKET_OUTGOING or not self.addresses:
                continue
            try:
                pkt = Ether(frame)
            except Exception:  # Scapy dissection of garbage: never fatal  # noqa: BLE001
                continue
            arp = pkt.getlayer(ARP)
            if arp is None or arp.op != 1 or arp.pdst not in self.addresses:
                continue
            if arp.psrc == arp.pdst:
                continue  # someone else's gratuitous ARP, not a question
            reply = Ether(src=self.mac, dst=arp.hwsrc) / ARP(
                op=2, hwsrc=self.mac, psrc=arp.pdst, hwdst=arp.hwsrc, pdst=arp.psrc
            )
            try:
                self.sock.send(bytes(reply))
                self.answered += 1
            except OSError as exc:
                log.warning("proxy ARP reply failed: %s", exc)
