"""The eBPF backend's maps: their binary layout (as in ``bpf/moat_gre.c``) and the bpf(2)
calls that read and write them.

Pure encoders (``encode_*``) are unit-tested without a kernel; :class:`BpfMaps` opens the
pinned maps of one loaded object and applies :class:`MapOp` changes, which the backend
queues on the agent's netlink worker, so no call on the event loop waits for the kernel.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import socket
import struct
from collections.abc import Iterable
from typing import NamedTuple

from agent.mobility.tunnel.base import STAT_KEYS, TunnelError

log = logging.getLogger(__name__)

#: Bicast copies one home address can have (MAX_PEERS in moat_gre.c).
MAX_PEERS = 4
ACCEPT_RESTRICTED = 1
ACCEPT_DELIVER = 2

MAP_NAMES = ("moat_peers", "moat_reverse", "moat_accepted", "moat_allowed", "moat_config",
             "moat_stats")

# bpf(2) commands and the syscall's number per architecture.
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_OBJ_GET = 7
BPF_ANY = 0
_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
           "riscv64": 280}


class BpfError(TunnelError):
    """A bpf(2) call the kernel refused (``code`` is its errno)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


def _ip(address: str) -> bytes:
    """An IPv4 address as the 4 bytes of the wire (network order), as the programs compare."""
    return socket.inet_aton(address)


def encode_peer(remote: str, key: int) -> bytes:
    """``struct peer``: remote in network order, key in host order."""
    return _ip(remote) + struct.pack("=I", key)


def encode_peers(peers: list[tuple[str, int]]) -> bytes:
    """``struct peers``: a count and MAX_PEERS slots (unused ones zero)."""
    if not 1 <= len(peers) <= MAX_PEERS:
        raise ValueError(f"{len(peers)} peers: the eBPF backend bicasts to 1..{MAX_PEERS}")
    slots = b"".join(encode_peer(r, k) for r, k in peers)
    return struct.pack("=I", len(peers)) + slots + b"\0" * (8 * (MAX_PEERS - len(peers)))


def encode_accept_key(remote: str, key: int) -> bytes:
    return encode_peer(remote, key)


def _mac(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"MAC {mac!r} is not 6 bytes")
    return raw


def encode_accept_value(restricted: bool, delivery: tuple[int, str, str] | None = None) -> bytes:
    """``struct accept_val``: flags, and for a delivery (ifindex, router MAC, own MAC)."""
    flags = (ACCEPT_RESTRICTED if restricted else 0) | (ACCEPT_DELIVER if delivery else 0)
    if delivery is None:
        return struct.pack("=II", flags, 0) + b"\0" * 12
    ifindex, dmac, smac = delivery
    return struct.pack("=II", flags, ifindex) + _mac(dmac) + _mac(smac)


def encode_allowed_key(remote: str, key: int, dst: str) -> bytes:
    return encode_peer(remote, key) + _ip(dst)


def encode_config(local: str, tun_ifindex: int, tun_mac: str) -> bytes:
    """``struct config``: the local address, the tunnel device's index and MAC."""
    return _ip(local) + struct.pack("=I", tun_ifindex) + _mac(tun_mac) + b"\0\0"


def encode_u32(value: int) -> bytes:
    return struct.pack("=I", value)


class MapOp(NamedTuple):
    """One change to one map: ``value`` None deletes ``key`` (a missing key is fine)."""

    map: str
    key: bytes
    value: bytes | None


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs a per-CPU map has values for (``0-3`` -> 4, ``0,2-3`` -> 4)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def sum_stats(per_cpu: list[bytes]) -> dict[str, int]:
    """The counters (one per-CPU value list of 8-byte slots per index) summed over CPUs."""
    out = {k: 0 for k in STAT_KEYS}
    for index, raw in enumerate(per_cpu[: len(STAT_KEYS)]):
        out[STAT_KEYS[index]] = sum(v for (v,) in struct.iter_unpack("=Q", raw))
    return out


class _Syscall:
    """bpf(2) through libc's syscall()."""

    def __init__(self) -> None:
        number = _NR_BPF.get(platform.machine())
        if number is None:
            raise BpfError(f"no bpf(2) syscall number known for {platform.machine()}")
        self.number = number
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.syscall.restype = ctypes.c_long

    def __call__(self, cmd: int, attr: ctypes.Array) -> int:
        rc = self.libc.syscall(self.number, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
        if rc < 0:
            code = ctypes.get_errno()
            raise BpfError(f"bpf({cmd}): {os.strerror(code)}", code)
        return rc


class BpfMaps:
    """The pinned maps of one loaded object, by name; file descriptors closed by :meth:`close`."""

    def __init__(self, pin_dir: str, names: Iterable[str] = MAP_NAMES) -> None:
        self._bpf = _Syscall()
        self.fds: dict[str, int] = {}
        self.ncpus = possible_cpus()
        try:
            for name in names:
                self.fds[name] = self._obj_get(os.path.join(pin_dir, name))
        except BpfError:
            self.close()
            raise

    def _obj_get(self, path: str) -> int:
        raw = path.encode() + b"\0"
        buf = ctypes.create_string_buffer(raw)
        attr = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(buf), 0, 0), 128)
        try:
            return self._bpf(BPF_OBJ_GET, attr)
        except BpfError as exc:
            raise BpfError(f"cannot open pinned map {path}: {exc}", exc.code) from None

    def _elem(self, cmd: int, name: str, key: bytes, value: ctypes.Array | None) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key))
        vaddr = ctypes.addressof(value) if value is not None else 0
        attr = ctypes.create_string_buffer(
            struct.pack("=IIQQQ", self.fds[name], 0, ctypes.addressof(kbuf), vaddr, BPF_ANY), 128)
        self._bpf(cmd, attr)

    def update(self, name: str, key: bytes, value: bytes) -> None:
        self._elem(BPF_MAP_UPDATE_ELEM, name, key, ctypes.create_string_buffer(value, len(value)))

    def delete(self, name: str, key: bytes) -> None:
        try:
            self._elem(BPF_MAP_DELETE_ELEM, name, key, None)
        except BpfError as exc:
            if exc.code != errno.ENOENT:
                raise

    def lookup(self, name: str, key: bytes, size: int) -> bytes | None:
        value = ctypes.create_string_buffer(size)
        try:
            self._elem(BPF_MAP_LOOKUP_ELEM, name, key, value)
        except BpfError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        return value.raw

    def apply(self, ops: Iterable[MapOp]) -> None:
        """Apply changes in order; the first refusal raises (naming the map)."""
        for op in ops:
            try:
                if op.value is None:
                    self.delete(op.map, op.key)
                else:
                    self.update(op.map, op.key, op.value)
            except BpfError as exc:
                raise BpfError(f"{op.map}: {'delete' if op.value is None else 'update'} "
                               f"refused: {exc}", exc.code) from None

    def stats(self) -> dict[str, int]:
        """The programs' counters, summed over CPUs."""
        size = 8 * self.ncpus
        per_cpu = [self.lookup("moat_stats", encode_u32(i), size) or b"" for i in range(len(STAT_KEYS))]
        return sum_stats(per_cpu)

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def open_program(path: str) -> int:
    """A file descriptor of a pinned program (for a tc filter); the caller closes it."""
    bpf = _Syscall()
    raw = path.encode() + b"\0"
    buf = ctypes.create_string_buffer(raw)
    attr = ctypes.create_string_buffer(struct.pack("=QII", ctypes.addressof(buf), 0, 0), 128)
    try:
        return bpf(BPF_OBJ_GET, attr)
    except BpfError as exc:
        raise BpfError(f"cannot open pinned program {path}: {exc}", exc.code) from None
