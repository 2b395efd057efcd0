"""The DNS server 23 of the patent: a Mininet host running ``dnsmasq`` that maps the mobile
objects' names to their home addresses (``counter.home.moat`` → 10.16.0.100), so a
corresponding object can find an object by name, as the patent's objects "obtain home
addresses through a dynamic name service (DNS) server 23 on network 16".

dnsmasq is authoritative for the run's domain only: ``no-resolv`` (it forwards nothing, so
no query leaves the emulated network), ``no-hosts`` (not the machine's ``/etc/hosts``),
names from ``host-record`` lines of its configuration, answered on the host's own address.
A name of the domain it does not know gets NXDOMAIN. It runs in the foreground through the
node's daemon hook (stopped and reaped with the node), logs every query to its log, and the
node waits until it answers before the build goes on.

Its directory and files are root's alone (0700, 0600; the daemon's umask is 077): dnsmasq
reads its configuration as root before it drops to ``nobody``, so the names are in the
configuration rather than in a hosts file it would have to read afterwards, and it writes
no pid file (the node holds its pid).

Node params: ``run_dir`` (default ``<run>/<node>``), ``domain`` (default ``home.moat``),
``names`` — ``{name: address}`` (short names; the domain is appended).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any, Mapping

import topologies._mininet  # noqa: F401  - first: repairs logging (see module)

from nodetools.dns import parse_a_answer, query  # the client side, re-exported
from topologies.errors import DaemonError
from topologies.nodes import ServerHost
from topologies.run import write_private_file

__all__ = ["DnsServer", "DNSMASQ", "dnsmasq_config_text", "host_records", "query", "parse_a_answer"]

log = logging.getLogger(__name__)

DNSMASQ = "/usr/sbin/dnsmasq"
DEFAULT_DOMAIN = "home.moat"
READY_TIMEOUT = 10.0


#: One DNS label: no dot, space or comma can reach dnsmasq's configuration through a name.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,62}")


def host_records(names: Mapping[str, str], domain: str) -> list[str]:
    """dnsmasq ``host-record`` lines: each short name, its fully qualified form and its
    IPv4 address (the reverse name too)."""
    if not all(_NAME_RE.fullmatch(label) for label in domain.split(".")):
        raise DaemonError(f"bad DNS domain {domain!r}")
    lines = []
    for name, address in sorted(names.items()):
        socket.inet_aton(address)  # refuses what is not an IPv4 address
        if address.count(".") != 3:
            raise DaemonError(f"bad IPv4 address {address!r} for {name!r}")
        if not _NAME_RE.fullmatch(name):
            raise DaemonError(f"bad DNS name {name!r} (a short name: letters, digits, '_', '-')")
        lines.append(f"host-record={name}.{domain},{name},{address}")
    return lines


def dnsmasq_config_text(address: str, domain: str, names: Mapping[str, str], port: int = 53) -> str:
    return "\n".join([
        "# MOAT: the run's name server (topologies/dns.py); nothing from /etc.",
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces",
        f"listen-address={address}", f"port={port}",
        f"domain={domain}", f"local=/{domain}/",
        *host_records(names, domain),
        "pid-file=",  # none: the node holds dnsmasq's pid
        "log-queries", "log-facility=-",
        "",
    ])


class DnsServer(ServerHost):
    """A Mininet host that runs dnsmasq for the run's object names."""

    def config(self, run_dir: str | os.PathLike[str] | None = None,  # type: ignore[override]
               domain: str = DEFAULT_DOMAIN, names: Mapping[str, str] | None = None,
               **params: Any) -> dict[str, Any]:
        self.setup_run_dir(run_dir, "dns")
        if not os.access(DNSMASQ, os.X_OK):
            raise DaemonError(f"{self.name}: {DNSMASQ} not found: install dnsmasq-base "
                              "(scripts/bootstrap.sh does)")
        self.domain = domain
        self.address = str(params.get("ip", "")).split("/")[0]
        self.config_path = self.run_dir / "dnsmasq.conf"
        write_private_file(self.config_path,
                           dnsmasq_config_text(self.address, domain, dict(names or {})))
        params.setdefault("daemon_log", str(self.run_dir / "dnsmasq.log"))
        result = super().config(**params)
        self._wait_ready()
        return result

    def daemon_command(self) -> list[str] | None:
        return [DNSMASQ, "--keep-in-foreground", f"--conf-file={self.config_path}"]

    def _wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until dnsmasq logs that it started (it has bound its socket by then)."""
        self.wait_for_log("started, version", "dnsmasq", timeout)
