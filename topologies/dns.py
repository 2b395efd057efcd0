"""The DNS server 23 of the patent: a Mininet host running ``dnsmasq`` that maps the mobile
objects' names to their home addresses (``counter.home.moat`` → 10.16.0.100), so a
corresponding object can find an object by name, as the patent's objects "obtain home
addresses through a dynamic name service (DNS) server 23 on network 16".

dnsmasq is authoritative for the run's domain only: ``no-resolv`` (it forwards nothing, so
no query leaves the emulated network), ``no-hosts`` (not the machine's ``/etc/hosts``),
names from one hosts file of the run, answered on the host's own address. A name of the
domain it does not know gets NXDOMAIN. It runs in the foreground through the node's daemon
hook (stopped and reaped with the node), logs every query to its log, and the node waits
until it answers before the build goes on.

Node params: ``run_dir`` (default ``<run>/<node>``), ``domain`` (default ``home.moat``),
``names`` — ``{name: address}`` for the hosts file (short names; the domain is appended).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any, Mapping

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)

from topologies.errors import DaemonError
from topologies.nodes import ServerHost

__all__ = ["DnsServer", "DNSMASQ", "dnsmasq_config_text", "hosts_text", "query", "parse_a_answer"]

log = logging.getLogger(__name__)

DNSMASQ = "/usr/sbin/dnsmasq"
DEFAULT_DOMAIN = "home.moat"
READY_TIMEOUT = 10.0


def hosts_text(names: Mapping[str, str], domain: str) -> str:
    """``/etc/hosts`` lines: each short name and its fully qualified form."""
    lines = []
    for name, address in sorted(names.items()):
        socket.inet_aton(address)  # refuses what is not an IPv4 address
        if not name or any(c.isspace() for c in name) or "." in name:
            raise DaemonError(f"bad DNS name {name!r} (a short name, no dots)")
        lines.append(f"{address} {name}.{domain} {name}")
    return "\n".join(lines) + "\n"


def dnsmasq_config_text(address: str, domain: str, hosts: Path, pid_file: Path, port: int = 53) -> str:
    return "\n".join([
        "# MOAT: the run's name server (topologies/dns.py); nothing from /etc.",
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces",
        f"listen-address={address}", f"port={port}",
        f"addn-hosts={hosts}", f"domain={domain}", f"local=/{domain}/", "expand-hosts",
        f"pid-file={pid_file}", "log-queries", "log-facility=-",
        "",
    ])


def query(name: str, txid: int = 0x4d4f) -> bytes:
    """A DNS query for ``name``'s A record (RFC 1035 §4.1), recursion desired."""
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", 1, 1)


def parse_a_answer(data: bytes) -> tuple[int, list[str]]:
    """(rcode, A record addresses) of a DNS response; ValueError when it is not one."""
    if len(data) < 12:
        raise ValueError("short DNS message")
    _txid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", data[:12])
    if not flags & 0x8000:
        raise ValueError("not a response")
    pos = 12

    def skip_name(p: int) -> int:
        while True:
            if p >= len(data):
                raise ValueError("name runs past the message")
            n = data[p]
            if n & 0xC0 == 0xC0:
                return p + 2
            if n == 0:
                return p + 1
            p += 1 + n

    for _ in range(qd):
        pos = skip_name(pos) + 4
    addresses = []
    for _ in range(an):
        pos = skip_name(pos)
        try:
            rtype, _cls, _ttl, length = struct.unpack("!HHIH", data[pos:pos + 10])
        except struct.error:
            raise ValueError("record runs past the message") from None
        if pos + 10 + length > len(data):
            raise ValueError("record data runs past the message")
        pos += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += length
    return flags & 0x000F, addresses


class DnsServer(ServerHost):
    """A Mininet host that runs dnsmasq for the run's object names."""

    def config(self, run_dir: str | os.PathLike[str] | None = None,  # type: ignore[override]
               domain: str = DEFAULT_DOMAIN, names: Mapping[str, str] | None = None,
               **params: Any) -> dict[str, Any]:
        self.setup_run_dir(run_dir, "dns")
        if not os.access(DNSMASQ, os.X_OK):
            raise DaemonError(f"{self.name}: {DNSMASQ} not found: install dnsmasq-base "
                              "(scripts/bootstrap.sh does)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)  # dnsmasq reads its hosts file after dropping root
        self.domain = domain
        self.address = str(params.get("ip", "")).split("/")[0]
        self.hosts_path = self.run_dir / "hosts"
        self.hosts_path.write_text(hosts_text(dict(names or {}), domain))
        os.chmod(self.hosts_path, 0o644)
        self.config_path = self.run_dir / "dnsmasq.conf"
        self.config_path.write_text(dnsmasq_config_text(self.address, domain, self.hosts_path,
                                                        self.run_dir / "dnsmasq.pid"))
        params.setdefault("daemon_log", str(self.run_dir / "dnsmasq.log"))
        result = super().config(**params)
        self._wait_ready()
        return result

    def daemon_command(self) -> list[str] | None:
        return [DNSMASQ, "--keep-in-foreground", f"--conf-file={self.config_path}"]

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until dnsmasq logs that it started (it has bound its socket by then)."""
        self.wait_for_log("started, version", "dnsmasq", timeout)
