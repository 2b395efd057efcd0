"""GRE tunnels between object agents: one interface, two backends (DESIGN §5).

* :class:`UserspaceTunnel` — one TUN device plus one raw IP-protocol-47 socket, driven by the
  daemon's asyncio loop. It needs nothing but ``/dev/net/tun``: MOAT's development and CI
  machines have no GRE module, so this is the backend CI exercises.
* :class:`KernelTunnel` — GRE netdevs made with pyroute2 (one per ``(remote, key)``), bicast
  copies with a tc ``mirred`` action, for kernels that have ``ip_gre``.

Both put the same RFC 2784 / RFC 2890 packets on the wire (the key is the binding id), and
both leave routing to the kernel:

* HOA: :meth:`~Tunnel.set_peers` routes an away object's home address into the tunnel; every
  packet the kernel routes there leaves as one GRE copy per binding (bicast, RFC 5944 ``S``).
* FOA: :meth:`~Tunnel.accept` lets GRE from one ``(remote, key)`` in; anything else is dropped
  and counted. The inner packet goes back to the kernel, which routes it on (the daemon adds
  ``ip route <home>/32 via <router>`` itself when the object runs on another router).
* Reverse tunnelling (RFC 3024, ``T``): :meth:`~Tunnel.set_reverse` adds a source policy rule
  so that packets *from* a visitor's home address go back through the tunnel to its HOA.

:func:`make_tunnel` picks the backend: ``"auto"`` uses :func:`detect_backend` (kernel if it can
make a GRE netdev in this namespace, else userspace); ``"kernel"`` where the kernel cannot do
it raises :class:`TunnelUnavailable` with the reason.

Every packet handler catches its own errors and counts them in ``stats``: a malformed or
unexpected packet never raises into the daemon's loop.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from packets.errors import MalformedMessage
from packets.gre import ETH_P_IP, GreHeader, decode_gre

from agent.core.errors import AgentError

log = logging.getLogger(__name__)

GRE_PROTO = 47
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
#: Like a kernel GRE device on a 1500-byte link: outer IPv4 header (20) + keyed GRE (8).
TUN_MTU = 1500 - 20 - 8
TUN_QUEUE = 4096
SOCKET_BUFFER = 4 << 20
#: Policy-routing table (and rule priority) for reverse-tunnelled sources. The kernel backend
#: uses one table per HOA device, counting up from here.
REVERSE_TABLE = 4347
REVERSE_PRIORITY = 4347
#: tc filter priority of the kernel backend's bicast mirrors.
MIRROR_PRIO = 4347
GRE_KEY_FLAG = 0x2000  # GRE_KEY in if_tunnel.h, big-endian as IFLA_GRE_[IO]FLAGS carry it
READ_BURST = 256       # packets per readiness callback: never starve the loop
MAX_PACKET = 65535
NETLINK_TIMEOUT = 30.0

STAT_KEYS = (
    "encapsulated",          # inner packets taken from the kernel and sent (once per packet)
    "copies_sent",           # GRE packets sent (one per peer: bicast sends several)
    "decapsulated",          # inner packets handed back to the kernel
    "dropped_unknown_peer",  # GRE from a (remote, key) that was not accepted, or without a key
    "dropped_malformed",     # bad outer IPv4, bad GRE, not IPv4 inside
    "dropped_no_peer",       # routed into the tunnel but no peer for its dst nor reverse src
    "dropped_send_error",    # sendto/write failed (buffer full, no route to the remote...)
    "dropped_loop",          # our own GRE routed back into the tunnel
)


class TunnelError(AgentError):
    """A tunnel that cannot be set up (device, socket, netlink)."""


class TunnelUnavailable(TunnelError):
    """The requested backend cannot run here; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# --- small helpers ---------------------------------------------------------------------------


class Ipv4Header(NamedTuple):
    """The fields of an IPv4 header the tunnel looks at."""

    header_length: int  # bytes (IHL * 4)
    total_length: int
    protocol: int
    src: str
    dst: str


def parse_ipv4(data: bytes) -> Ipv4Header:
    """The header of an IPv4 packet; :class:`MalformedMessage` unless it is a sane one.

    Checks version 4, IHL >= 5 and that both the header and the total length fit in ``data``
    (trailing bytes after the total length are allowed; callers cut them off).
    """
    if len(data) < 20:
        raise MalformedMessage(f"IPv4 packet is {len(data)} bytes < 20")
    version, ihl = data[0] >> 4, (data[0] & 0x0F) * 4
    if version != 4:
        raise MalformedMessage(f"IP version {version} != 4", 0)
    if ihl < 20 or ihl > len(data):
        raise MalformedMessage(f"IPv4 header length {ihl} does not fit {len(data)} bytes", 0)
    (total,) = struct.unpack_from("!H", data, 2)
    if total < ihl or total > len(data):
        raise MalformedMessage(f"IPv4 total length {total} does not fit {len(data)} bytes", 2)
    return Ipv4Header(ihl, total, data[9], socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20]))


def ipv4_addresses(packet: bytes) -> tuple[str, str] | None:
    """(src, dst) of an IPv4 packet, or None if it is not one."""
    try:
        header = parse_ipv4(packet)
    except MalformedMessage:
        return None
    return header.src, header.dst


def _check_address(address: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(address))
    except (ipaddress.AddressValueError, ValueError) as exc:
        raise ValueError(f"{what} {address!r} is not an IPv4 address") from exc


def _check_key(key: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= 0xFFFFFFFF:
        raise ValueError(f"GRE key {key!r} is not a 32-bit unsigned integer")
    return key


def _check_peer(peer: Sequence[Any]) -> tuple[str, int]:
    remote, key = peer
    return _check_address(remote, "remote"), _check_key(key)


def _dedupe(peers: Iterable[Sequence[Any]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for peer in peers:
        p = _check_peer(peer)
        if p not in out:
            out.append(p)
    return out


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_cmd(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``ip``/``tc``; never raises (a missing binary becomes returncode 127)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


def _write_sysctl(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc)
        return False


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class _RpFilter:
    """Decapsulated packets come in on the tunnel device with sources routed elsewhere.

    Reverse-path filtering must be off on the tunnel device; the kernel uses the larger of
    ``all`` and the device's value, so a strict (1) ``all`` is lowered to loose (2) while the
    tunnel runs, and restored on close.
    """

    ALL = "/proc/sys/net/ipv4/conf/all/rp_filter"

    def __init__(self) -> None:
        self._saved: str | None = None

    def device(self, ifname: str) -> None:
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter", "0")
        # A tunnel carries IPv4 only; no IPv6 link-local chatter into it.
        _write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")

    def relax_all(self) -> None:
        if _read_sysctl(self.ALL) == "1" and _write_sysctl(self.ALL, "2"):
            self._saved = "1"
            log.warning("net.ipv4.conf.all.rp_filter was strict (1): loose (2) while the tunnel runs, "
                        "so decapsulated packets are not dropped")

    def restore(self) -> None:
        if self._saved is not None:
            _write_sysctl(self.ALL, self._saved)
            self._saved = None


class _LogLimiter:
    """At most one log line per kind per ``interval`` seconds: a flood must not flood the log."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def __call__(self, kind: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if len(self._last) > 1024:  # kinds can come from the wire (sources, keys): stay bounded
            self._last.clear()
        if now - self._last.get(kind, -self.interval) >= self.interval:
            self._last[kind] = now
            log.log(level, msg, *args)


# --- the common part ---------------------------------------------------------------------------


class Tunnel:
    """What both backends keep and offer; see the module docstring."""

    backend = "none"

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 run: Runner | None = None) -> None:
        if not name or len(name) > 15:
            raise ValueError(f"interface name {name!r} must be 1..15 characters")
        self.loop = loop
        self.local = _check_address(local, "local address")
        self.name = name
        self._run: Runner = run or run_cmd
        #: inner destination (home address) -> [(remote, key)] in the order given
        self.peers: dict[str, list[tuple[str, int]]] = {}
        #: (remote, key) pairs whose GRE is decapsulated
        self.accepted: set[tuple[str, int]] = set()
        #: inner source (visitor's home address) -> (remote, key) it is reverse-tunnelled to
        self.reverse: dict[str, tuple[str, int]] = {}
        self._counters = {k: 0 for k in STAT_KEYS}
        self._rp = _RpFilter()
        self._limit = _LogLimiter()

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._counters)

    def _cmd(self, *argv: str, quiet: bool = False) -> bool:
        proc = self._run(list(argv))
        if proc.returncode != 0 and not quiet:
            log.warning("%s: %s", " ".join(argv), (proc.stderr or "").strip() or f"exit {proc.returncode}")
        return proc.returncode == 0

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        raise NotImplementedError

    def accept(self, remote: str, key: int) -> None:
        raise NotImplementedError

    def forget(self, remote: str, key: int) -> None:
        raise NotImplementedError

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} local={self.local} peers={self.peers} "
                f"accepted={sorted(self.accepted)} reverse={self.reverse}>")


# --- userspace backend -------------------------------------------------------------------------


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

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 run: Runner | None = None, table: int = REVERSE_TABLE,
                 priority: int = REVERSE_PRIORITY) -> None:
        super().__init__(loop, local, name, run=run)
        self.table, self.priority = table, priority
        self.tun_fd: int | None = None
        self.sock: Any = None
        self._registered: list[int] = []
        self._rules: set[str] = set()
        self._reverse_route = False
        self._pktinfo = True  # send with IP_PKTINFO (source = local) until the kernel refuses
        self._closed = False

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
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
        try:
            self._rp.device(self.name)
            self._rp.relax_all()
            # A longer TUN queue than the default 500 packets: the agent drains it from one
            # event loop, and bursts (a TCP window) arrive faster than one read per packet.
            if not self._cmd("ip", "link", "set", "dev", self.name, "mtu", str(TUN_MTU),
                             "txqueuelen", str(TUN_QUEUE), "up"):
                raise TunnelError(f"cannot bring TUN device {self.name} up")
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
        except BaseException:
            os.close(fd)
            self._rp.restore()
            raise
        self._closed = False
        self._attach(fd, sock)
        log.info("userspace GRE tunnel %s up (local %s)", self.name, self.local)

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
        """Remove routes, rules, the device and the socket; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for src in list(self._rules):
            self._del_rule(src)
        if self._reverse_route:
            self._cmd("ip", "route", "del", "default", "dev", self.name, "table", str(self.table), quiet=True)
            self._reverse_route = False
        for dst in list(self.peers):
            self._cmd("ip", "route", "del", f"{dst}/32", "dev", self.name, quiet=True)
        self.peers.clear()
        self.reverse.clear()
        self.accepted.clear()
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
        self._rp.restore()
        log.info("userspace GRE tunnel %s closed: %s", self.name, self._counters)

    # --- tables ------------------------------------------------------------------------------

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        inner_dst = _check_address(inner_dst, "inner destination")
        wanted = _dedupe(peers)
        if wanted:
            self.peers[inner_dst] = wanted
            self._cmd("ip", "route", "replace", f"{inner_dst}/32", "dev", self.name)
        elif self.peers.pop(inner_dst, None) is not None:
            self._cmd("ip", "route", "del", f"{inner_dst}/32", "dev", self.name, quiet=True)

    def accept(self, remote: str, key: int) -> None:
        self.accepted.add(_check_peer((remote, key)))

    def forget(self, remote: str, key: int) -> None:
        self.accepted.discard(_check_peer((remote, key)))

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        inner_src = _check_address(inner_src, "inner source")
        if peer is None:
            self.reverse.pop(inner_src, None)
            self._del_rule(inner_src)
            if not self.reverse and self._reverse_route:
                self._cmd("ip", "route", "del", "default", "dev", self.name, "table", str(self.table),
                          quiet=True)
                self._reverse_route = False
            return
        self.reverse[inner_src] = _check_peer(peer)
        if not self._reverse_route:
            self._reverse_route = self._cmd("ip", "route", "replace", "default", "dev", self.name,
                                            "table", str(self.table))
        if inner_src not in self._rules:
            if self._cmd("ip", "rule", "add", "from", f"{inner_src}/32", "lookup", str(self.table),
                         "priority", str(self.priority)):
                self._rules.add(inner_src)

    def _del_rule(self, inner_src: str) -> None:
        if inner_src in self._rules:
            self._cmd("ip", "rule", "del", "from", f"{inner_src}/32", "lookup", str(self.table),
                      "priority", str(self.priority), quiet=True)
            self._rules.discard(inner_src)

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
            if inner is None or self.tun_fd is None:
                continue
            try:
                os.write(self.tun_fd, inner)
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
        return inner[: inner_header.total_length]


# --- kernel backend ----------------------------------------------------------------------------


class _ThreadedIPRoute:
    """pyroute2's ``IPRoute`` on a thread of its own.

    pyroute2 >= 0.9 runs an asyncio loop inside its synchronous ``IPRoute`` and cannot be used
    from a thread whose loop is already running — the daemon's. Every call is handed to one
    worker thread (which inherits this thread's network namespace) and waited for.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moat-netlink")
        try:
            self._ipr = self._pool.submit(self._open).result(NETLINK_TIMEOUT)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise

    @staticmethod
    def _open() -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._pool.submit(lambda: getattr(self._ipr, name)(*args, **kwargs)).result(NETLINK_TIMEOUT)

        return call

    def close(self) -> None:
        try:
            self._pool.submit(self._ipr.close).result(NETLINK_TIMEOUT)
        finally:
            self._pool.shutdown(wait=True)


def _netlink_errno(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


class KernelTunnel(Tunnel):
    """GRE netdevs (pyroute2), one per ``(remote, key)``; bicast copies with tc mirred.

    * ``set_peers(dst, [(r1, k1), (r2, k2), ...])``: devices for every peer, the host route
      ``dst/32 dev <first>``, and on the first device a clsact egress ``u32`` filter matching
      ``ip dst dst/32`` with one ``mirred egress mirror dev <other>`` action per other peer.
      (``u32`` rather than ``matchall``: ``cls_u32`` is the classifier kernels most often
      have — MOAT's CI kernel lacks ``cls_matchall`` and ``cls_flower`` but has it — and the
      mirror copies only its own home address even if a device were shared.)
    * ``accept(remote, key)``: the device (``ikey``) so the kernel decapsulates; a GRE packet
      with another key or source matches no device and the kernel drops it.
    * ``set_reverse(src, peer)``: a table per peer device with ``default dev <device>`` and
      the rule ``from src/32 lookup <table>``.

    ``stats`` are read from the devices' kernel counters: ``copies_sent`` / ``decapsulated``
    are their tx / rx packets; the kernel does not report unknown keys per device, so
    ``dropped_unknown_peer`` stays 0. Counters of a deleted device are gone with it.
    """

    backend = "kernel"

    def __init__(self, loop: asyncio.AbstractEventLoop, local: str, name: str = "moat0", *,
                 run: Runner | None = None, netlink: Any = None, table: int = REVERSE_TABLE,
                 priority: int = REVERSE_PRIORITY, sysfs: str = "/sys/class/net") -> None:
        super().__init__(loop, local, name, run=run)
        self.ipr: Any = netlink
        self._own_netlink = netlink is None
        self.table_base, self.priority = table, priority
        self.sysfs = sysfs
        #: (remote, key) -> device name
        self.devices: dict[tuple[str, int], str] = {}
        #: device -> table used for reverse tunnelling through it
        self._tables: dict[str, int] = {}
        #: first device -> {inner dst: [mirror devices]} as installed with tc
        self._mirrors: dict[str, dict[str, list[str]]] = {}
        self._rules: set[str] = set()
        self._started = False

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.ipr is None:
            try:
                self.ipr = _ThreadedIPRoute()
            except ImportError as exc:
                raise TunnelUnavailable(f"kernel GRE backend needs pyroute2: {exc}") from exc
        self._rp.relax_all()
        self._started = True
        log.info("kernel GRE tunnel up (local %s)", self.local)

    def close(self) -> None:
        if not self._started:
            return
        for src in list(self.reverse):
            self.set_reverse(src, None)
        for dst in list(self.peers):
            self.set_peers(dst, [])
        for peer in list(self.accepted):
            self.forget(*peer)
        for peer in list(self.devices):
            self._drop_device(peer)
        if self._own_netlink and self.ipr is not None:
            try:
                self.ipr.close()
            except Exception as exc:  # noqa: BLE001 - closing must not fail
                log.debug("netlink close: %s", exc)
            self.ipr = None
        self._rp.restore()
        self._started = False
        log.info("kernel GRE tunnel closed")

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        primary = {self.devices[peers[0]] for peers in self.peers.values() if peers[0] in self.devices}
        primary |= {self.devices[p] for p in self.reverse.values() if p in self.devices}
        for dev in self.devices.values():
            tx = self._counter(dev, "tx_packets")
            out["copies_sent"] += tx
            if dev in primary:
                out["encapsulated"] += tx
            out["decapsulated"] += self._counter(dev, "rx_packets")
            out["dropped_malformed"] += self._counter(dev, "rx_errors")
            out["dropped_send_error"] += self._counter(dev, "tx_dropped")
        return out

    def _counter(self, dev: str, name: str) -> int:
        value = _read_sysctl(f"{self.sysfs}/{dev}/statistics/{name}")
        return int(value) if value and value.isdigit() else 0

    # --- devices ---------------------------------------------------------------------------

    def _device_name(self, key: int) -> str:
        taken = set(self.devices.values())
        name = f"mg{key}"
        n = 1
        while name in taken:
            name = f"mg{key}x{n}"
            n += 1
        return name

    def _index(self, dev: str) -> int:
        found = self.ipr.link_lookup(ifname=dev)
        if not found:
            raise TunnelError(f"GRE device {dev} vanished")
        return int(found[0])

    def _device(self, peer: tuple[str, int]) -> str:
        dev = self.devices.get(peer)
        if dev is not None:
            return dev
        remote, key = peer
        dev = self._device_name(key)
        spec = dict(ifname=dev, kind="gre", gre_local=self.local, gre_remote=remote, gre_ikey=key,
                    gre_okey=key, gre_iflags=GRE_KEY_FLAG, gre_oflags=GRE_KEY_FLAG, gre_ttl=64)
        try:
            self.ipr.link("add", **spec)
        except Exception as exc:
            if _netlink_errno(exc) != errno.EEXIST:
                raise TunnelError(f"cannot create GRE device {dev} to {remote} key {key}: {exc}") from exc
            # Left over by a killed agent in this namespace: replace it.
            log.warning("GRE device %s already exists: replacing it", dev)
            self.ipr.link("del", index=self._index(dev))
            self.ipr.link("add", **spec)
        self.ipr.link("set", index=self._index(dev), state="up")
        self._rp.device(dev)
        self.devices[peer] = dev
        log.info("GRE device %s: %s -> %s key %d", dev, self.local, remote, key)
        return dev

    def _in_use(self, peer: tuple[str, int]) -> bool:
        return (peer in self.accepted or peer in self.reverse.values()
                or any(peer in peers for peers in self.peers.values()))

    def _release(self, peer: tuple[str, int]) -> None:
        if not self._in_use(peer):
            self._drop_device(peer)

    def _drop_device(self, peer: tuple[str, int]) -> None:
        dev = self.devices.pop(peer, None)
        if dev is None:
            return
        self._mirrors.pop(dev, None)
        table = self._tables.pop(dev, None)
        if table is not None:
            self._route("del", "0.0.0.0/0", None, table=table)
        try:
            self.ipr.link("del", index=self._index(dev))
        except Exception as exc:  # noqa: BLE001 - already gone is fine
            log.debug("delete %s: %s", dev, exc)

    def _route(self, op: str, dst: str, dev: str | None, table: int | None = None) -> bool:
        kwargs: dict[str, Any] = {"dst": dst}
        if dev is not None:
            kwargs["oif"] = self._index(dev)
        if table is not None:
            kwargs["table"] = table
        try:
            self.ipr.route(op, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001 - log and keep the daemon going
            if op != "del":
                log.warning("route %s %s dev %s table %s: %s", op, dst, dev, table, exc)
            return False

    # --- HOA: peers and bicast -------------------------------------------------------------

    def set_peers(self, inner_dst: str, peers: list[tuple[str, int]]) -> None:
        inner_dst = _check_address(inner_dst, "inner destination")
        wanted = _dedupe(peers)
        old = self.peers.get(inner_dst, [])
        if wanted:
            devs = [self._device(p) for p in wanted]
            self.peers[inner_dst] = wanted
            self._route("replace", f"{inner_dst}/32", devs[0])
        else:
            self.peers.pop(inner_dst, None)
            self._route("del", f"{inner_dst}/32", None)
        self._sync_mirrors()
        for gone in old:
            if gone not in wanted:
                self._release(gone)

    def _sync_mirrors(self) -> None:
        want: dict[str, dict[str, list[str]]] = {}
        for dst, peers in self.peers.items():
            devs = [self.devices[p] for p in peers]
            if len(devs) > 1:
                want.setdefault(devs[0], {})[dst] = devs[1:]
        for dev in set(self._mirrors) | set(want):
            if self._mirrors.get(dev) == want.get(dev):
                continue
            # Deleting clsact removes its filters; then install what is wanted now.
            self._cmd("tc", "qdisc", "del", "dev", dev, "clsact", quiet=True)
            self._mirrors.pop(dev, None)
            if dev not in want:
                continue
            if not self._cmd("tc", "qdisc", "add", "dev", dev, "clsact"):
                continue
            ok = True
            for dst, others in sorted(want[dev].items()):
                argv = ["tc", "filter", "add", "dev", dev, "egress", "protocol", "ip", "prio",
                        str(MIRROR_PRIO), "u32", "match", "ip", "dst", f"{dst}/32"]
                for other in others:
                    argv += ["action", "mirred", "egress", "mirror", "dev", other]
                ok = self._cmd(*argv) and ok
            if ok:
                self._mirrors[dev] = want[dev]
            else:
                log.warning("bicast on %s incomplete: only the first binding gets copies", dev)

    # --- FOA: accept -----------------------------------------------------------------------

    def accept(self, remote: str, key: int) -> None:
        peer = _check_peer((remote, key))
        self._device(peer)  # the kernel decapsulates what matches it
        self.accepted.add(peer)

    def forget(self, remote: str, key: int) -> None:
        peer = _check_peer((remote, key))
        self.accepted.discard(peer)
        self._release(peer)

    # --- reverse tunnelling ----------------------------------------------------------------

    def _table_for(self, dev: str) -> int:
        table = self._tables.get(dev)
        if table is None:
            used = set(self._tables.values())
            table = self.table_base
            while table in used:
                table += 1
            self._tables[dev] = table
            self._route("replace", "0.0.0.0/0", dev, table=table)
        return table

    def _rule(self, op: str, src: str, table: int) -> bool:
        try:
            self.ipr.rule(op, src=src, src_len=32, table=table, priority=self.priority)
            return True
        except Exception as exc:  # noqa: BLE001
            if op != "del":
                log.warning("rule %s from %s lookup %d: %s", op, src, table, exc)
            return False

    def set_reverse(self, inner_src: str, peer: tuple[str, int] | None) -> None:
        inner_src = _check_address(inner_src, "inner source")
        new = _check_peer(peer) if peer is not None else None
        old = self.reverse.get(inner_src)
        if old == new:
            return
        if old is not None:
            del self.reverse[inner_src]
            if inner_src in self._rules:
                self._rule("del", inner_src, self._tables.get(self.devices.get(old, ""), self.table_base))
                self._rules.discard(inner_src)
        if new is not None:
            dev = self._device(new)
            self.reverse[inner_src] = new
            if self._rule("add", inner_src, self._table_for(dev)):
                self._rules.add(inner_src)
        if old is not None:
            if old not in self.reverse.values():
                table = self._tables.pop(self.devices.get(old, ""), None)
                if table is not None:
                    self._route("del", "0.0.0.0/0", None, table=table)
            self._release(old)


# --- choosing a backend ------------------------------------------------------------------------


def _probe_kernel_gre() -> str | None:
    """None if a GRE netdev can be created (and was deleted again) here, else the reason."""
    probe = f"moatgp{os.getpid() % 10_000_000}"[:15]
    spec = dict(ifname=probe, kind="gre", gre_local="127.0.0.1", gre_remote="127.0.0.2")
    try:
        ipr = _ThreadedIPRoute()
    except ImportError:
        proc = run_cmd(["ip", "link", "add", probe, "type", "gre", "local", "127.0.0.1", "remote", "127.0.0.2"])
        if proc.returncode == 0:
            run_cmd(["ip", "link", "del", probe])
            return None
        return f"ip link add type gre failed: {(proc.stderr or '').strip() or proc.returncode}"
    except Exception as exc:  # noqa: BLE001 - no netlink at all
        return f"netlink unavailable: {exc}"
    try:
        try:
            ipr.link("add", **spec)
        except Exception as exc:  # noqa: BLE001 - NetlinkError and friends
            code = _netlink_errno(exc)
            if code == errno.EEXIST:
                return None  # the kind exists; the name or endpoints were taken
            hint = " (no ip_gre module)" if code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL) else ""
            return f"the kernel cannot create a GRE device here: {exc}{hint}"
        try:
            ipr.link("del", index=ipr.link_lookup(ifname=probe)[0])
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete GRE probe device %s: %s", probe, exc)
        return None
    finally:
        try:
            ipr.close()
        except Exception:  # noqa: BLE001
            pass


def detect_backend() -> str:
    """``"kernel"`` if a GRE netdev can be made in this network namespace, else ``"userspace"``."""
    reason = _probe_kernel_gre()
    if reason is not None:
        log.debug("kernel GRE unavailable: %s", reason)
        return "userspace"
    return "kernel"


def make_tunnel(backend: str = "auto", *, loop: asyncio.AbstractEventLoop, local: str,
                name: str = "moat0", **kwargs: Any) -> UserspaceTunnel | KernelTunnel:
    """A tunnel of ``backend`` ("auto", "kernel" or "userspace"), not started yet.

    "auto" takes the kernel backend where the kernel can make GRE devices, else userspace;
    "kernel" where it cannot raises :class:`TunnelUnavailable` with the reason.
    """
    if backend == "auto":
        backend = detect_backend()
        log.info("tunnel backend auto-detected: %s", backend)
    elif backend == "kernel":
        reason = _probe_kernel_gre()
        if reason is not None:
            raise TunnelUnavailable(f"kernel GRE backend requested but unavailable: {reason}; "
                                    "use the userspace backend (tunnel_backend: userspace or auto)")
    if backend == "kernel":
        return KernelTunnel(loop, local, name, **kwargs)
    if backend == "userspace":
        return UserspaceTunnel(loop, local, name, **kwargs)
    raise ValueError(f"unknown tunnel backend {backend!r}: auto, kernel or userspace")
